/**
 * DES of one 8-byte block under the all-zero key, in JavaScript: what Vitess's `hash` vindex computes.
 * Its 3DES (EDE) under an all-zero key is plain DES under that key (the decryption undoes the first
 * encryption), and with every round key zero a round's function is P(S(E(R))). Node's cipher object costs
 * a call into OpenSSL and a new Buffer per block (microseconds); this costs table lookups (FIPS 46-3's
 * tables below). test/unit/vschema.test.ts checks it against OpenSSL.
 */

const IP = [
  58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4, 62, 54, 46, 38, 30, 22, 14, 6, 64, 56, 48, 40, 32, 24, 16, 8,
  57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3, 61, 53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7,
];
const P = [16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10, 2, 8, 24, 14, 32, 27, 3, 9, 19, 13, 30, 6, 22, 11, 4, 25];
const S = [
  [14, 4, 13, 1, 2, 15, 11, 8, 3, 10, 6, 12, 5, 9, 0, 7, 0, 15, 7, 4, 14, 2, 13, 1, 10, 6, 12, 11, 9, 5, 3, 8,
    4, 1, 14, 8, 13, 6, 2, 11, 15, 12, 9, 7, 3, 10, 5, 0, 15, 12, 8, 2, 4, 9, 1, 7, 5, 11, 3, 14, 10, 0, 6, 13],
  [15, 1, 8, 14, 6, 11, 3, 4, 9, 7, 2, 13, 12, 0, 5, 10, 3, 13, 4, 7, 15, 2, 8, 14, 12, 0, 1, 10, 6, 9, 11, 5,
    0, 14, 7, 11, 10, 4, 13, 1, 5, 8, 12, 6, 9, 3, 2, 15, 13, 8, 10, 1, 3, 15, 4, 2, 11, 6, 7, 12, 0, 5, 14, 9],
  [10, 0, 9, 14, 6, 3, 15, 5, 1, 13, 12, 7, 11, 4, 2, 8, 13, 7, 0, 9, 3, 4, 6, 10, 2, 8, 5, 14, 12, 11, 15, 1,
    13, 6, 4, 9, 8, 15, 3, 0, 11, 1, 2, 12, 5, 10, 14, 7, 1, 10, 13, 0, 6, 9, 8, 7, 4, 15, 14, 3, 11, 5, 2, 12],
  [7, 13, 14, 3, 0, 6, 9, 10, 1, 2, 8, 5, 11, 12, 4, 15, 13, 8, 11, 5, 6, 15, 0, 3, 4, 7, 2, 12, 1, 10, 14, 9,
    10, 6, 9, 0, 12, 11, 7, 13, 15, 1, 3, 14, 5, 2, 8, 4, 3, 15, 0, 6, 10, 1, 13, 8, 9, 4, 5, 11, 12, 7, 2, 14],
  [2, 12, 4, 1, 7, 10, 11, 6, 8, 5, 3, 15, 13, 0, 14, 9, 14, 11, 2, 12, 4, 7, 13, 1, 5, 0, 15, 10, 3, 9, 8, 6,
    4, 2, 1, 11, 10, 13, 7, 8, 15, 9, 12, 5, 6, 3, 0, 14, 11, 8, 12, 7, 1, 14, 2, 13, 6, 15, 0, 9, 10, 4, 5, 3],
  [12, 1, 10, 15, 9, 2, 6, 8, 0, 13, 3, 4, 14, 7, 5, 11, 10, 15, 4, 2, 7, 12, 9, 5, 6, 1, 13, 14, 0, 11, 3, 8,
    9, 14, 15, 5, 2, 8, 12, 3, 7, 0, 4, 10, 1, 13, 11, 6, 4, 3, 2, 12, 9, 5, 15, 10, 11, 14, 1, 7, 6, 0, 8, 13],
  [4, 11, 2, 14, 15, 0, 8, 13, 3, 12, 9, 7, 5, 10, 6, 1, 13, 0, 11, 7, 4, 9, 1, 10, 14, 3, 5, 12, 2, 15, 8, 6,
    1, 4, 11, 13, 12, 3, 7, 14, 10, 15, 6, 8, 0, 5, 9, 2, 6, 11, 13, 8, 1, 4, 10, 7, 9, 5, 0, 15, 14, 2, 3, 12],
  [13, 2, 8, 4, 6, 15, 11, 1, 10, 9, 3, 14, 5, 0, 12, 7, 1, 15, 13, 8, 10, 3, 7, 4, 12, 5, 6, 11, 0, 14, 9, 2,
    7, 11, 4, 1, 9, 12, 14, 2, 0, 6, 10, 13, 15, 3, 5, 8, 2, 1, 14, 7, 4, 10, 8, 13, 15, 12, 9, 0, 3, 5, 6, 11],
];

/** Bit `i` (1 = most significant) of a 64-bit block held as two 32-bit halves. */
const bitOf = (hi: number, lo: number, i: number) => (i <= 32 ? (hi >>> (32 - i)) & 1 : (lo >>> (64 - i)) & 1);

/**
 * A 64-bit permutation (output bit j is input bit `table[j - 1]`) as lookups by input byte: out = OR of
 * byteTable[position][byte], each entry a [hi, lo] pair flattened into one Int32Array.
 */
function byteTables(table: number[]): Int32Array {
  const out = new Int32Array(8 * 256 * 2);
  for (let pos = 0; pos < 8; pos++) {
    for (let v = 0; v < 256; v++) {
      const hi = pos < 4 ? v << (24 - 8 * pos) : 0;
      const lo = pos >= 4 ? v << (24 - 8 * (pos - 4)) : 0;
      let oh = 0;
      let ol = 0;
      for (let j = 1; j <= 64; j++) {
        if (!bitOf(hi, lo, table[j - 1])) continue;
        if (j <= 32) oh |= 1 << (32 - j);
        else ol |= 1 << (64 - j);
      }
      out[(pos * 256 + v) * 2] = oh;
      out[(pos * 256 + v) * 2 + 1] = ol;
    }
  }
  return out;
}

const IP_T = byteTables(IP);
const FP_T = byteTables(IP.map((_, j) => IP.indexOf(j + 1) + 1)); // the inverse of IP

/** SP[box * 64 + six bits] = P applied to S-box `box`'s four output bits in their place. */
const SP = (() => {
  const out = new Int32Array(8 * 64);
  for (let box = 0; box < 8; box++) {
    for (let x = 0; x < 64; x++) {
      const row = ((x >> 4) & 2) | (x & 1);
      const col = (x >> 1) & 15;
      const s = S[box][row * 16 + col] << (28 - 4 * box);
      let p = 0;
      for (let j = 1; j <= 32; j++) if ((s >>> (32 - P[j - 1])) & 1) p |= 1 << (32 - j);
      out[box * 64 + x] = p;
    }
  }
  return out;
})();

/** E, S and P of one round (zero round key): E's six-bit groups are R's bits 4i-1 .. 4i+4, wrapping around. */
function f(r: number): number {
  return SP[((r >>> 1) | (r << 31)) >>> 26 & 63]
    ^ SP[64 + ((r >>> 23) & 63)]
    ^ SP[128 + ((r >>> 19) & 63)]
    ^ SP[192 + ((r >>> 15) & 63)]
    ^ SP[256 + ((r >>> 11) & 63)]
    ^ SP[320 + ((r >>> 7) & 63)]
    ^ SP[384 + ((r >>> 3) & 63)]
    ^ SP[448 + (((r << 1) | (r >>> 31)) & 63)];
}

function permute(t: Int32Array, hi: number, lo: number, out: Int32Array): void {
  let oh = 0;
  let ol = 0;
  for (let pos = 0; pos < 8; pos++) {
    const v = pos < 4 ? (hi >>> (24 - 8 * pos)) & 255 : (lo >>> (24 - 8 * (pos - 4))) & 255;
    const at = (pos * 256 + v) * 2;
    oh |= t[at];
    ol |= t[at + 1];
  }
  out[0] = oh;
  out[1] = ol;
}

const halves = new Int32Array(2);

/** DES under the all-zero key of the block hi:lo (unsigned 32-bit halves), into `out` at `offset` (8 bytes). */
export function desZeroKey(hi: number, lo: number, out: Buffer, offset = 0): void {
  permute(IP_T, hi, lo, halves);
  let l = halves[0];
  let r = halves[1];
  for (let round = 0; round < 16; round++) {
    const next = l ^ f(r);
    l = r;
    r = next;
  }
  permute(FP_T, r, l, halves); // the halves swap after the last round
  out.writeInt32BE(halves[0], offset);
  out.writeInt32BE(halves[1], offset + 4);
}
