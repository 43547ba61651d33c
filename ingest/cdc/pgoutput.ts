/**
 * Decoder of the replication stream: the CopyBoth framing of the walsender
 * (XLogData 'w', primary keepalive 'k') and the pgoutput logical messages
 * inside XLogData (protocol version 1, text tuples). Pure and synchronous;
 * anything malformed throws a ProtocolError that says what and where, so the
 * stream stops before acknowledging data it did not understand.
 */

export class ProtocolError extends Error {
  constructor(message: string, readonly context: { lsn?: bigint; messageType?: string; offset?: number; bytes?: string } = {}) {
    const where = [
      context.messageType && `message '${context.messageType}'`,
      context.lsn !== undefined && `at WAL ${formatLsnShort(context.lsn)}`,
      context.offset !== undefined && `offset ${context.offset}`,
    ].filter(Boolean).join(', ');
    super(where ? `${message} (${where})` : message);
  }
}

const formatLsnShort = (lsn: bigint) => `${(lsn >> 32n).toString(16).toUpperCase()}/${(lsn & 0xffffffffn).toString(16).toUpperCase()}`;

/** Microseconds between the Unix epoch and Postgres's (2000-01-01). */
const PG_EPOCH_OFFSET_US = 946_684_800_000_000n;

export type CopyMessage =
  | { kind: 'xlog'; walStart: bigint; walEnd: bigint; serverTimeUs: bigint; data: Buffer }
  | { kind: 'keepalive'; walEnd: bigint; serverTimeUs: bigint; replyRequested: boolean };

/** Splits one CopyData payload of the walsender. */
export function decodeCopyData(buf: Buffer): CopyMessage {
  const type = String.fromCharCode(buf[0] ?? 0);
  if (type === 'w') {
    if (buf.length < 25) throw new ProtocolError(`XLogData of ${buf.length} bytes is shorter than its 25-byte header`, { messageType: 'w' });
    return { kind: 'xlog', walStart: buf.readBigUInt64BE(1), walEnd: buf.readBigUInt64BE(9), serverTimeUs: buf.readBigInt64BE(17), data: buf.subarray(25) };
  }
  if (type === 'k') {
    if (buf.length < 18) throw new ProtocolError(`keepalive of ${buf.length} bytes is shorter than 18`, { messageType: 'k' });
    return { kind: 'keepalive', walEnd: buf.readBigUInt64BE(1), serverTimeUs: buf.readBigInt64BE(9), replyRequested: buf[17] === 1 };
  }
  throw new ProtocolError(`unknown replication message type 0x${(buf[0] ?? 0).toString(16)}`, { bytes: buf.subarray(0, 32).toString('hex') });
}

/** Standby status update ('r'): written, flushed and applied all set to `lsn`, the position whose events Kafka has acknowledged. */
export function standbyStatus(lsn: bigint, nowMs = Date.now(), replyRequested = false): Buffer {
  const buf = Buffer.alloc(34);
  buf.write('r', 0);
  buf.writeBigUInt64BE(lsn, 1);
  buf.writeBigUInt64BE(lsn, 9);
  buf.writeBigUInt64BE(lsn, 17);
  buf.writeBigInt64BE(BigInt(nowMs) * 1000n - PG_EPOCH_OFFSET_US, 25);
  buf.writeUInt8(replyRequested ? 1 : 0, 33);
  return buf;
}

/** Postgres timestamp (microseconds since 2000-01-01) to epoch milliseconds. */
export const pgTimeToMs = (us: bigint) => Number((us + PG_EPOCH_OFFSET_US) / 1000n);

export interface RelationColumn {
  name: string;
  typeOid: number;
  typmod: number;
  /** Part of the replica identity. */
  key: boolean;
}

/** 'n' null, 'u' unchanged TOASTed value (not sent), else the value's text form. */
export type TupleValue = null | typeof UNCHANGED_TOAST | string;
export const UNCHANGED_TOAST: unique symbol = Symbol('unchanged toast');

export type PgOutputMessage =
  | { tag: 'begin'; finalLsn: bigint; commitTimeMs: number; xid: number }
  | { tag: 'commit'; commitLsn: bigint; endLsn: bigint; commitTimeMs: number }
  | { tag: 'origin'; lsn: bigint; name: string }
  | { tag: 'relation'; relationId: number; schema: string; table: string; replicaIdentity: string; columns: RelationColumn[] }
  | { tag: 'type'; typeOid: number; schema: string; name: string }
  | { tag: 'insert'; relationId: number; after: TupleValue[] }
  | { tag: 'update'; relationId: number; before: TupleValue[] | null; beforeIsKeyOnly: boolean; after: TupleValue[] }
  | { tag: 'delete'; relationId: number; before: TupleValue[]; beforeIsKeyOnly: boolean }
  | { tag: 'truncate'; relationIds: number[]; cascade: boolean; restartIdentity: boolean }
  | { tag: 'message'; transactional: boolean; lsn: bigint; prefix: string; content: Buffer };

/** A cursor over one message that fails with context instead of reading past the end. */
class Reader {
  offset = 0;
  constructor(private readonly buf: Buffer, private readonly lsn: bigint, private readonly type: string) {}

  fail(message: string): never {
    throw new ProtocolError(message, { lsn: this.lsn, messageType: this.type, offset: this.offset, bytes: this.buf.subarray(0, 64).toString('hex') });
  }
  private need(n: number): void {
    if (this.offset + n > this.buf.length) this.fail(`truncated: needs ${n} more bytes, ${this.buf.length - this.offset} left`);
  }
  u8(): number { this.need(1); return this.buf[this.offset++]; }
  i16(): number { this.need(2); const v = this.buf.readInt16BE(this.offset); this.offset += 2; return v; }
  i32(): number { this.need(4); const v = this.buf.readInt32BE(this.offset); this.offset += 4; return v; }
  u32(): number { this.need(4); const v = this.buf.readUInt32BE(this.offset); this.offset += 4; return v; }
  u64(): bigint { this.need(8); const v = this.buf.readBigUInt64BE(this.offset); this.offset += 8; return v; }
  i64(): bigint { this.need(8); const v = this.buf.readBigInt64BE(this.offset); this.offset += 8; return v; }
  bytes(n: number): Buffer {
    if (n < 0) this.fail(`negative length ${n}`);
    this.need(n);
    const v = this.buf.subarray(this.offset, this.offset + n);
    this.offset += n;
    return v;
  }
  cstring(): string {
    const end = this.buf.indexOf(0, this.offset);
    if (end < 0) this.fail('unterminated string');
    const v = this.buf.toString('utf8', this.offset, end);
    this.offset = end + 1;
    return v;
  }
  done(): void {
    if (this.offset !== this.buf.length) this.fail(`${this.buf.length - this.offset} unexpected trailing bytes`);
  }

  tuple(): TupleValue[] {
    const n = this.i16();
    if (n < 0) this.fail(`negative column count ${n}`);
    const out: TupleValue[] = new Array(n);
    for (let i = 0; i < n; i++) {
      const kind = String.fromCharCode(this.u8());
      if (kind === 'n') out[i] = null;
      else if (kind === 'u') out[i] = UNCHANGED_TOAST;
      else if (kind === 't') out[i] = this.bytes(this.i32()).toString('utf8');
      else this.fail(`unknown tuple value kind '${kind}' in column ${i}`);
    }
    return out;
  }
}

/** Decodes one pgoutput message (the payload of an XLogData). `lsn` is only for error context. */
export function decodePgOutput(buf: Buffer, lsn = 0n): PgOutputMessage {
  const type = String.fromCharCode(buf[0] ?? 0);
  const r = new Reader(buf, lsn, type);
  r.u8();
  let msg: PgOutputMessage;
  switch (type) {
    case 'B': msg = { tag: 'begin', finalLsn: r.u64(), commitTimeMs: pgTimeToMs(r.i64()), xid: r.u32() }; break;
    case 'C': {
      r.u8(); // flags, unused
      msg = { tag: 'commit', commitLsn: r.u64(), endLsn: r.u64(), commitTimeMs: pgTimeToMs(r.i64()) };
      break;
    }
    case 'O': msg = { tag: 'origin', lsn: r.u64(), name: r.cstring() }; break;
    case 'R': {
      const relationId = r.u32();
      const schema = r.cstring();
      const table = r.cstring();
      const replicaIdentity = String.fromCharCode(r.u8());
      const n = r.i16();
      if (n < 0) r.fail(`negative column count ${n}`);
      const columns: RelationColumn[] = [];
      for (let i = 0; i < n; i++) {
        const flags = r.u8();
        columns.push({ key: (flags & 1) === 1, name: r.cstring(), typeOid: r.u32(), typmod: r.i32() });
      }
      msg = { tag: 'relation', relationId, schema, table, replicaIdentity, columns };
      break;
    }
    case 'Y': msg = { tag: 'type', typeOid: r.u32(), schema: r.cstring(), name: r.cstring() }; break;
    case 'I': {
      const relationId = r.u32();
      if (r.u8() !== 0x4e) r.fail("insert without its 'N' tuple");
      msg = { tag: 'insert', relationId, after: r.tuple() };
      break;
    }
    case 'U': {
      const relationId = r.u32();
      let kind = String.fromCharCode(r.u8());
      let before: TupleValue[] | null = null;
      const beforeIsKeyOnly = kind === 'K';
      if (kind === 'K' || kind === 'O') {
        before = r.tuple();
        kind = String.fromCharCode(r.u8());
      }
      if (kind !== 'N') r.fail(`update tuple marker '${kind}', expected 'N'`);
      msg = { tag: 'update', relationId, before, beforeIsKeyOnly, after: r.tuple() };
      break;
    }
    case 'D': {
      const relationId = r.u32();
      const kind = String.fromCharCode(r.u8());
      if (kind !== 'K' && kind !== 'O') r.fail(`delete tuple marker '${kind}', expected 'K' or 'O'`);
      msg = { tag: 'delete', relationId, before: r.tuple(), beforeIsKeyOnly: kind === 'K' };
      break;
    }
    case 'T': {
      const n = r.i32();
      if (n < 0) r.fail(`negative relation count ${n}`);
      const options = r.u8();
      const relationIds: number[] = [];
      for (let i = 0; i < n; i++) relationIds.push(r.u32());
      msg = { tag: 'truncate', relationIds, cascade: (options & 1) === 1, restartIdentity: (options & 2) === 2 };
      break;
    }
    case 'M': {
      const transactional = r.u8() === 1;
      const at = r.u64();
      const prefix = r.cstring();
      msg = { tag: 'message', transactional, lsn: at, prefix, content: r.bytes(r.i32()) };
      break;
    }
    default:
      throw new ProtocolError(`unknown pgoutput message type 0x${(buf[0] ?? 0).toString(16)}`, { lsn, offset: 0, bytes: buf.subarray(0, 64).toString('hex') });
  }
  r.done();
  return msg;
}
