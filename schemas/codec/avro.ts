import avro from 'avsc';

/**
 * Avro longs as exact BigInts: LSNs and bigint keys exceed 2^53, where avsc's
 * default number-based long would throw.
 */
const BigIntLong = avro.types.LongType.__with({
  fromBuffer: (buf: Buffer) => buf.readBigInt64LE(),
  toBuffer: (n: bigint) => {
    const buf = Buffer.alloc(8);
    buf.writeBigInt64LE(n);
    return buf;
  },
  fromJSON: (v: unknown) => BigInt(v as number | string),
  toJSON: (n: bigint) => (Number.isSafeInteger(Number(n)) ? Number(n) : n.toString()),
  // Avro longs are signed; an LSN (unsigned in Postgres) would need 8 EiB of WAL to leave this range.
  isValid: (n: unknown) => typeof n === 'bigint' && n >= -(2n ** 63n) && n < 2n ** 63n,
  compare: (a: bigint, b: bigint) => (a === b ? 0 : a < b ? -1 : 1),
});

/**
 * Writing goes straight to the tap instead of through an 8-byte buffer per
 * value (avsc's path for custom longs, the largest cost of encoding change
 * events): avsc's own number path below 2^53, zigzag varint above.
 */
const SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const writeThroughBuffer = (BigIntLong as any)._write;
/** The avsc type is frozen: the fast writer is an object deriving from it. */
const FastBigIntLong: avro.Type = Object.freeze(Object.create(BigIntLong, {
  _write: {
    value(this: unknown, tap: { buf: Buffer; pos: number; writeLong(n: number): void }, val: bigint) {
      if (typeof val !== 'bigint' || val < -(2n ** 63n) || val >= 2n ** 63n) return writeThroughBuffer.call(this, tap, val); // throws avsc's error
      if (val >= -SAFE && val <= SAFE) return tap.writeLong(Number(val));
      let z = val >= 0n ? val << 1n : (-val << 1n) - 1n;
      const buf = tap.buf;
      while (z >= 0x80n) {
        buf[tap.pos++] = Number(z & 0x7fn) | 0x80;
        z >>= 7n;
      }
      buf[tap.pos++] = Number(z);
    },
  },
}));

/** timestamp-millis as a JS Date (the underlying long is a BigInt). */
class TimestampMillis extends avro.types.LogicalType {
  _fromValue(v: bigint): Date {
    return new Date(Number(v));
  }
  _toValue(d: unknown): bigint | undefined {
    return d instanceof Date ? BigInt(d.getTime()) : undefined;
  }
  _resolve(type: avro.Type) {
    if (avro.Type.isType(type, 'long', 'logical:timestamp-millis')) return this._fromValue.bind(this);
    return undefined;
  }
}

const LOGICAL_TYPES = { 'timestamp-millis': TimestampMillis };

/**
 * avsc looks up the registry only for type names, so `{"type": "long", ...}`
 * objects need the hook. A logical long we implement is seen twice: first to
 * build the logical type (leave it to avsc), then for its underlying long
 * (ours). Logical longs we do not implement (timestamp-micros, time-micros)
 * are plain BigInt longs.
 */
function bigIntLongHook() {
  const logicalSeen = new WeakSet<object>();
  return (schema: avro.Schema): avro.Type | undefined => {
    if (typeof schema !== 'object' || (schema as { type?: unknown }).type !== 'long') return undefined;
    const logical = (schema as { logicalType?: string }).logicalType;
    if (logical !== undefined && logical in LOGICAL_TYPES && !logicalSeen.has(schema)) {
      logicalSeen.add(schema);
      return undefined;
    }
    return FastBigIntLong;
  };
}

/** Parses a schema (object or JSON text) with the project's type mappings. */
export function parseAvro(schema: avro.Schema | string): avro.Type {
  const s = typeof schema === 'string' ? JSON.parse(schema) : schema;
  return avro.Type.forSchema(s, {
    registry: { long: FastBigIntLong },
    typeHook: bigIntLongHook(),
    logicalTypes: LOGICAL_TYPES,
    wrapUnions: 'auto',
  });
}
