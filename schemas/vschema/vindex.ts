/**
 * Vindex functions: a column value -> an 8-byte keyspace id, and a keyspace id
 * -> the shard whose key range holds it. Pure, so the gateway and the
 * materializer compute the same placement. `hash` and `xxhash` give the same
 * keyspace ids as Vitess's vindexes of those names (docs/decisions/0017).
 */
import { xxh64 } from '@node-rs/xxhash';
import { desZeroKey } from './des.ts';

export type VindexType = 'hash' | 'xxhash' | 'identity' | 'lookup' | 'consistent_lookup_unique';
/** The vindex types computed from the value alone (lookups read a table). */
export const FUNCTIONAL_VINDEXES = ['hash', 'xxhash', 'identity'] as const;
export type FunctionalVindex = typeof FUNCTIONAL_VINDEXES[number];

export class VindexValueError extends Error {}

/** A value as it reaches the planner: SQL literal text, a bound parameter (text or bytes), or a number. */
export type VindexInput = string | number | bigint | Buffer;

const U64 = 2n ** 64n;
const I64_MIN = -(2n ** 63n);

function toUint64(v: VindexInput, vindex: string): bigint {
  let n: bigint;
  try {
    n = typeof v === 'bigint' ? v : typeof v === 'number' ? BigInt(v) : BigInt(Buffer.isBuffer(v) ? v.toString('utf8').trim() : v.trim());
  } catch {
    throw new VindexValueError(`vindex ${vindex} needs an integer, not ${JSON.stringify(String(v))}`);
  }
  if (n < I64_MIN || n >= U64) throw new VindexValueError(`vindex ${vindex}: ${n} is outside 64 bits`);
  return n < 0n ? n + U64 : n; // a negative bigint maps as its two's complement, as in Vitess
}

/** `hash`: the integer's 8 big-endian bytes, enciphered with 3DES (EDE, ECB) under a null key (des.ts). */
export function hashKeyspaceId(v: VindexInput): Buffer {
  const out = Buffer.allocUnsafe(8);
  const small = smallInteger(v);
  if (small !== undefined) {
    desZeroKey(Math.floor(small / 2 ** 32) >>> 0, small >>> 0, out); // >>> 0: two's complement of a negative, as toUint64
  } else {
    const n = toUint64(v, 'hash');
    desZeroKey(Number(n >> 32n), Number(n & 0xffffffffn), out);
  }
  return out;
}

/**
 * A value written as a decimal integer of at most 15 digits (what BigInt reads the same way), read without
 * BigInt, which costs more than the hash itself; anything else (spaces, hex, longer) is undefined.
 */
function smallInteger(v: VindexInput): number | undefined {
  if (typeof v === 'number') return Number.isSafeInteger(v) ? v : undefined;
  if (typeof v === 'bigint') return undefined;
  const text = typeof v === 'string';
  const negative = (text ? v.charCodeAt(0) : v[0]) === 45; // '-'
  const from = negative ? 1 : 0;
  if (v.length === from || v.length - from > 15) return undefined;
  let n = 0;
  for (let i = from; i < v.length; i++) {
    const c = text ? v.charCodeAt(i) : v[i];
    if (c < 48 || c > 57) return undefined;
    n = n * 10 + (c - 48);
  }
  return negative ? -n : n;
}

/** `xxhash`: xxHash64 (seed 0) of the value's bytes (UTF-8 for text), big-endian. */
export function xxhashKeyspaceId(v: VindexInput): Buffer {
  const bytes = Buffer.isBuffer(v) ? v : Buffer.from(String(v), 'utf8');
  const out = Buffer.alloc(8);
  out.writeBigUInt64BE(xxh64(bytes, 0n));
  return out;
}

/** `identity`: the integer is the keyspace id (8 big-endian bytes). */
export function identityKeyspaceId(v: VindexInput): Buffer {
  const out = Buffer.alloc(8);
  out.writeBigUInt64BE(toUint64(v, 'identity'));
  return out;
}

export function keyspaceId(type: FunctionalVindex, v: VindexInput): Buffer {
  switch (type) {
    case 'hash': return hashKeyspaceId(v);
    case 'xxhash': return xxhashKeyspaceId(v);
    case 'identity': return identityKeyspaceId(v);
  }
}

/** A shard's key range in lower-case hex, as ShardDefined carries it ('' = unbounded). */
export interface KeyRange { shard: string; start: string; end: string }

/** The shard whose [start, end) holds the keyspace id (compared as bytes, like Vitess). */
export function shardFor(ksid: Buffer, ranges: readonly KeyRange[]): string {
  const hex = ksid.toString('hex');
  for (const r of ranges) {
    // Lower-case hex strings order as their bytes do; a bound shorter than 16 digits is a prefix.
    if (r.start && hex < r.start) continue;
    if (r.end && hex >= r.end) continue;
    return r.shard;
  }
  throw new VindexValueError(`no shard holds keyspace id ${ksid.toString('hex')}`);
}
