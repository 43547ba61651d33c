/**
 * Column values in Postgres's binary format, as far as a merge over shards reads and writes them
 * (decision 0077): integers and the date/time types (big-endian integers whose order is the
 * values' order, infinities at the ends), floats, intervals by their span, and numeric (base-10000
 * digits) to and from decimal text. Every other type the merge orders is compared by its bytes.
 */

/** Byte widths of the binary types that are one signed big-endian integer (oid: unsigned). */
const INTEGER_WIDTH = new Map<number, number>([
  [21, 2], [23, 4], [26, 4], [20, 8], // int2, int4, oid, int8
  [1082, 4], [1083, 8], [1114, 8], [1184, 8], // date (days), time, timestamp, timestamptz (microseconds)
]);

export const isBinaryInteger = (typeOid: number) => INTEGER_WIDTH.has(typeOid);

export function readBinaryInteger(v: Buffer, typeOid: number): bigint {
  switch (INTEGER_WIDTH.get(typeOid)) {
    case 2: return BigInt(v.readInt16BE(0));
    case 4: return BigInt(typeOid === 26 ? v.readUInt32BE(0) : v.readInt32BE(0));
    default: return v.readBigInt64BE(0);
  }
}

export function binaryInteger(n: bigint, typeOid: number): Buffer {
  const out = Buffer.allocUnsafe(INTEGER_WIDTH.get(typeOid)!);
  if (out.length === 2) out.writeInt16BE(Number(n));
  else if (out.length === 4) out.writeInt32BE(Number(n));
  else out.writeBigInt64BE(n);
  return out;
}

/** float4 or float8, by the value's width. */
export const readBinaryFloat = (v: Buffer) => (v.length === 4 ? v.readFloatBE(0) : v.readDoubleBE(0));

export function binaryFloat(n: number, typeOid: number): Buffer {
  const out = Buffer.allocUnsafe(typeOid === 700 ? 4 : 8);
  if (out.length === 4) out.writeFloatBE(n);
  else out.writeDoubleBE(n);
  return out;
}

/** An interval's span in microseconds, a month as 30 days (as Postgres compares intervals). */
export function binaryIntervalSpan(v: Buffer): bigint {
  const micros = v.readBigInt64BE(0);
  const days = BigInt(v.readInt32BE(8));
  const months = BigInt(v.readInt32BE(12));
  return (months * 30n + days) * 86_400_000_000n + micros;
}

const NUMERIC_SPECIAL: Record<number, string> = { 0xc000: 'NaN', 0xd000: 'Infinity', 0xf000: '-Infinity' };
const NUMERIC_NEGATIVE = 0x4000;

/** A binary numeric as its decimal text, with as many fraction digits as its display scale. */
export function numericText(v: Buffer): string {
  const ndigits = v.readInt16BE(0);
  const weight = v.readInt16BE(2);
  const sign = v.readUInt16BE(4);
  const dscale = v.readInt16BE(6);
  if (NUMERIC_SPECIAL[sign]) return NUMERIC_SPECIAL[sign];
  const digit = (i: number) => (i >= 0 && i < ndigits ? v.readInt16BE(8 + 2 * i) : 0);
  let int = '';
  for (let i = 0; i <= weight; i++) int += i === 0 ? String(digit(i)) : String(digit(i)).padStart(4, '0');
  let frac = '';
  for (let i = weight + 1; frac.length < dscale; i++) frac += String(digit(i)).padStart(4, '0');
  const text = `${int || '0'}${dscale ? `.${frac.slice(0, dscale)}` : ''}`;
  return sign === NUMERIC_NEGATIVE ? `-${text}` : text;
}

/** Decimal text (digits, an optional sign and fraction; or NaN, Infinity, -Infinity) as a binary numeric. */
export function binaryNumeric(text: string): Buffer {
  const special = Object.entries(NUMERIC_SPECIAL).find(([, t]) => t === text);
  if (special) return numericBytes([], 0, Number(special[0]), 0);
  const negative = text.startsWith('-');
  const [int, frac = ''] = text.replace(/^[-+]/, '').split('.');
  const intDigits = int.replace(/^0+/, '');
  const padded = intDigits.padStart(Math.ceil(intDigits.length / 4) * 4, '0') + frac.padEnd(Math.ceil(frac.length / 4) * 4, '0');
  const digits = Array.from({ length: padded.length / 4 }, (_, i) => Number(padded.slice(4 * i, 4 * i + 4)));
  let weight = intDigits.length ? Math.ceil(intDigits.length / 4) - 1 : -1;
  // Leading and trailing zero groups are not stored: the weight says where the first one stands.
  while (digits.length && digits[0] === 0) {
    digits.shift();
    weight--;
  }
  while (digits.length && digits[digits.length - 1] === 0) digits.pop();
  return numericBytes(digits, digits.length ? weight : 0, negative && digits.length ? NUMERIC_NEGATIVE : 0, frac.length);
}

function numericBytes(digits: number[], weight: number, sign: number, dscale: number): Buffer {
  const out = Buffer.allocUnsafe(8 + 2 * digits.length);
  out.writeInt16BE(digits.length, 0);
  out.writeInt16BE(weight, 2);
  out.writeUInt16BE(sign, 4);
  out.writeInt16BE(dscale, 6);
  digits.forEach((d, i) => out.writeInt16BE(d, 8 + 2 * i));
  return out;
}
