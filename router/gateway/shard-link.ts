/**
 * One connection of a sharded session to one shard's pooler, used one request
 * at a time: a request is the messages up to and including a Query or Sync,
 * and ends with the ReadyForQuery it answers. What comes back goes to the
 * request's handler: relayed to the client, or collected for merging.
 */
import { PgError, SQLSTATE } from '../protocol/errors.ts';
import { cstr, int16, int32, message } from '../protocol/frames.ts';
import { errorFieldsAt, encodeQuery, PORTABLE_PARAM, SESSION_STATE_PARAM, SYNC, T } from '../protocol/messages.ts';
import { Upstream } from '../protocol/upstream.ts';
import type { Field, Row } from '../planner/merge.ts';
import type { Endpoint } from './discovery.ts';

type Status = 'I' | 'T' | 'E';
/** Gets each server message of a request but its ReadyForQuery. */
export type ResponseHandler = (type: number, buf: Buffer, start: number, len: number) => void;

const POOLER_REPORTS = new Set([SESSION_STATE_PARAM, PORTABLE_PARAM]);

export class ShardLink {
  private readonly waiting: Array<{ handler: ResponseHandler; done: (s: Status) => void; fail: (e: Error) => void }> = [];
  /** This link has begun the client's open transaction. */
  inTransaction = false;

  private constructor(readonly shard: string, readonly ep: Endpoint, readonly up: Upstream, onClosed: () => void) {
    up.handle({ onMessage: (buf, start, len) => this.onMessage(buf, start, len) }, () => {
      for (const w of this.waiting.splice(0)) w.fail(new PgError('FATAL', SQLSTATE.CONNECTION_FAILURE, `lost the connection to shard ${shard}`));
      onClosed();
    });
  }

  static async open(shard: string, ep: Endpoint, params: Record<string, string>, onClosed: () => void): Promise<ShardLink> {
    const up = await Upstream.connect({ host: ep.host, port: ep.port, params: { ...params, [SESSION_STATE_PARAM]: '' } });
    return new ShardLink(shard, ep, up, onClosed);
  }

  get closed(): boolean {
    return this.up.closed;
  }

  /** Sends raw messages ending with Query or Sync; resolves with the transaction status of the ReadyForQuery. */
  request(raw: Buffer, handler: ResponseHandler): Promise<Status> {
    if (this.up.closed) return Promise.reject(new PgError('FATAL', SQLSTATE.CONNECTION_FAILURE, `lost the connection to shard ${this.shard}`));
    return new Promise((done, fail) => {
      this.waiting.push({ handler, done, fail });
      this.up.write(raw);
    });
  }

  /** Runs SQL, collecting the result; a server error is thrown as a PgError naming the shard. */
  async query(sql: string | Buffer): Promise<ShardResult> {
    const r = new ShardResult(this.shard);
    await this.request(encodeQuery(typeof sql === 'string' ? sql : sql.toString('utf8')), r.collect);
    if (r.error) throw r.pgError();
    return r;
  }

  /** Runs one statement with text parameters (Parse/Bind/Execute/Sync of the unnamed statement), collecting the result; errors as query(). */
  async execute(sql: string, params: Array<string | null>): Promise<ShardResult> {
    const values = params.map((p) => (p === null ? int32(-1) : Buffer.concat([int32(Buffer.byteLength(p)), Buffer.from(p, 'utf8')])));
    const r = new ShardResult(this.shard);
    await this.request(Buffer.concat([
      message('P', cstr(''), cstr(sql), int16(0)),
      message('B', cstr(''), cstr(''), int16(0), int16(params.length), ...values, int16(0)),
      message('E', cstr(''), int32(0)),
      SYNC,
    ]), r.collect);
    if (r.error) throw r.pgError();
    return r;
  }

  private onMessage(buf: Buffer, start: number, len: number): void {
    const type = buf[start];
    if (type === T.ParameterStatus) {
      const nameEnd = buf.indexOf(0, start + 5);
      if (POOLER_REPORTS.has(buf.toString('utf8', start + 5, nameEnd))) return;
    }
    const w = this.waiting[0];
    if (!w) return; // a notice between requests: nobody asked
    if (type === T.ReadyForQuery) {
      this.waiting.shift();
      w.done(String.fromCharCode(buf[start + 5]) as Status);
      return;
    }
    w.handler(type, buf, start, len);
  }
}

/** What one shard answered to one statement. */
export class ShardResult {
  /** The RowDescription as the shard sent it (relayed unchanged when rows are merged). */
  rowDescription: Buffer | undefined;
  rows: Buffer[] = [];
  tag: string | undefined;
  error: Record<string, string> | undefined;
  notices: Buffer[] = [];
  /** Extended protocol: a ParameterDescription from a Describe. */
  parameterDescription: Buffer | undefined;
  /** COPY TO: the shard's CopyOutResponse (its CopyData are in `rows`). */
  copyOutResponse: Buffer | undefined;

  constructor(readonly shard: string) {}

  readonly collect: ResponseHandler = (type, buf, start, len) => {
    const msg = Buffer.from(buf.subarray(start, start + len));
    switch (type) {
      case T.RowDescription: this.rowDescription = msg; break;
      case T.DataRow: this.rows.push(msg); break;
      case T.CommandComplete: this.tag = msg.toString('utf8', 5, msg.length - 1); break;
      case T.ErrorResponse: this.error ??= errorFieldsAt(buf, start, len); break;
      case T.NoticeResponse: this.notices.push(msg); break;
      case T.ParameterDescription: this.parameterDescription = msg; break;
      case T.CopyOutResponse: this.copyOutResponse = msg; break;
      case T.CopyData: this.rows.push(msg); break; // COPY TO: the data, row by row as the shard sends it
      default: break; // ParseComplete, BindComplete, NoData, EmptyQueryResponse: the session answers those itself
    }
  };

  /** The shard's error, its message prefixed with the shard so a failure says where. */
  pgError(named = true): PgError {
    return shardError(this.shard, this.error!, named);
  }
}

/** A shard's ErrorResponse fields as a PgError, its message prefixed with the shard when `named`. */
export function shardError(shard: string, e: Record<string, string>, named: boolean): PgError {
  return new PgError('ERROR', e.C ?? SQLSTATE.INTERNAL_ERROR, named ? `shard ${shard}: ${e.M}` : e.M, e.D, e.H);
}

export function decodeRowDescription(msg: Buffer): Field[] {
  const n = msg.readInt16BE(5);
  const fields: Field[] = [];
  let at = 7;
  for (let i = 0; i < n; i++) {
    const end = msg.indexOf(0, at);
    const name = msg.toString('utf8', at, end);
    at = end + 1 + 6; // table oid, column number
    const typeOid = msg.readInt32BE(at);
    at += 4 + 2 + 4; // type, size, modifier
    const binary = msg.readInt16BE(at) === 1;
    at += 2;
    fields.push({ name, typeOid, binary });
  }
  return fields;
}

export function decodeDataRow(msg: Buffer): Row {
  const n = msg.readInt16BE(5);
  const row: Row = [];
  let at = 7;
  for (let i = 0; i < n; i++) {
    const len = msg.readInt32BE(at);
    at += 4;
    if (len < 0) row.push(null);
    else {
      row.push(msg.subarray(at, at + len));
      at += len;
    }
  }
  return row;
}

export function encodeDataRow(row: Row): Buffer {
  let size = 7;
  for (const v of row) size += 4 + (v ? v.length : 0);
  const out = Buffer.allocUnsafe(size);
  out[0] = T.DataRow;
  out.writeInt32BE(size - 1, 1);
  out.writeInt16BE(row.length, 5);
  let at = 7;
  for (const v of row) {
    out.writeInt32BE(v ? v.length : -1, at);
    at += 4;
    if (v) at += v.copy(out, at);
  }
  return out;
}

/** A RowDescription or DataRow without its last `n` columns: the hidden items of a merged read (decision 0074). */
export function withoutLastColumns(msg: Buffer, n: number): Buffer {
  const count = msg.readInt16BE(5) - n;
  let at = 7;
  for (let i = 0; i < count; i++) {
    if (msg[0] === T.RowDescription) at = msg.indexOf(0, at) + 1 + 18; // name, then table, column, type, size, modifier, format
    else at += 4 + Math.max(0, msg.readInt32BE(at));
  }
  const out = Buffer.from(msg.subarray(0, at));
  out.writeInt32BE(at - 1, 1);
  out.writeInt16BE(count, 5);
  return out;
}
