/**
 * Wire-level helpers the pooler needs beyond router/protocol: a zero-copy message
 * scanner (messages are handed out as (buffer, start, length) so relayed bytes are
 * never copied or re-encoded), an output batcher that coalesces adjacent relayed
 * ranges into one write, and the few server messages router/protocol has no writer for.
 */
import type net from 'node:net';
import { cstr, int16, int32, message } from '../protocol/frames.ts';
import { PgError, SQLSTATE } from '../protocol/errors.ts';

export const T = {
  // client -> server
  Query: 0x51, // Q
  Parse: 0x50, // P
  Bind: 0x42, // B
  Execute: 0x45, // E
  Describe: 0x44, // D
  Close: 0x43, // C
  Sync: 0x53, // S
  Flush: 0x48, // H
  FunctionCall: 0x46, // F
  CopyData: 0x64, // d
  CopyDone: 0x63, // c
  CopyFail: 0x66, // f
  Terminate: 0x58, // X
  // server -> client
  ParseComplete: 0x31, // 1
  BindComplete: 0x32, // 2
  CloseComplete: 0x33, // 3
  ParameterDescription: 0x74, // t
  RowDescription: 0x54, // T
  NoData: 0x6e, // n
  DataRow: 0x44, // D
  CommandComplete: 0x43, // C
  EmptyQuery: 0x49, // I
  PortalSuspended: 0x73, // s
  ErrorResponse: 0x45, // E
  NoticeResponse: 0x4e, // N
  ReadyForQuery: 0x5a, // Z
  ParameterStatus: 0x53, // S
  Notification: 0x41, // A
  CopyInResponse: 0x47, // G
  CopyOutResponse: 0x48, // H
  CopyBothResponse: 0x57, // W
  FunctionCallResponse: 0x56, // V
  BackendKeyData: 0x4b, // K
  NegotiateProtocolVersion: 0x76, // v
} as const;

export interface MessageSink {
  /** buf[start, start + len) is one whole message (type byte, length, body). */
  onMessage(buf: Buffer, start: number, len: number): void;
}

/**
 * Splits a byte stream of typed messages. Complete messages inside a chunk are
 * handed out in place; a message split across chunks is assembled once, from
 * the parts, when its last byte arrives (no quadratic re-concatenation).
 */
export class MessageScanner {
  private parts: Buffer[] = [];
  private have = 0;
  /** Total size of the message being assembled, once its header is known. */
  private need = 0;

  constructor(private readonly maxMessage: number) {}

  /** Bytes held for an incomplete message. */
  get buffered(): number {
    return this.have;
  }

  /** Throws PgError (FATAL) on an impossible or oversized length; the stream cannot be resynchronised after that. */
  push(chunk: Buffer, sink: MessageSink): void {
    let off = 0;
    if (this.have > 0) {
      if (this.need === 0) {
        const take = Math.min(5 - this.have, chunk.length);
        this.parts.push(chunk.subarray(0, take));
        this.have += take;
        off = take;
        if (this.have < 5) return;
        const head = Buffer.concat(this.parts, 5);
        this.need = this.check(head.readInt32BE(1)) + 1;
        this.parts = [head];
      }
      const take = Math.min(this.need - this.have, chunk.length - off);
      this.parts.push(chunk.subarray(off, off + take));
      this.have += take;
      off += take;
      if (this.have < this.need) return;
      const msg = this.parts.length === 1 ? this.parts[0] : Buffer.concat(this.parts, this.need);
      this.parts = [];
      this.have = 0;
      this.need = 0;
      sink.onMessage(msg, 0, msg.length);
    }
    const n = chunk.length;
    while (off + 5 <= n) {
      const total = this.check(chunk.readInt32BE(off + 1)) + 1;
      if (off + total > n) break;
      sink.onMessage(chunk, off, total);
      off += total;
    }
    if (off < n) {
      const rest = chunk.subarray(off);
      this.parts = [rest];
      this.have = rest.length;
      this.need = rest.length >= 5 ? this.check(rest.readInt32BE(1)) + 1 : 0;
    }
  }

  private check(len: number): number {
    if (len < 4) throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, `invalid message length ${len}`);
    if (len > this.maxMessage) {
      throw new PgError('FATAL', SQLSTATE.PROGRAM_LIMIT_EXCEEDED, `message length ${len} exceeds the maximum of ${this.maxMessage} bytes`);
    }
    return len;
  }
}

/**
 * Collects what one event will write to a socket. Adjacent ranges of the same
 * input buffer (a run of relayed messages) become a single slice; the batch is
 * written once, with cork/uncork so several slices go out in one writev.
 */
export class OutBatch {
  private parts: Buffer[] = [];
  private cur: Buffer | null = null;
  private s = 0;
  private e = 0;
  bytes = 0;

  range(buf: Buffer, start: number, end: number): void {
    this.bytes += end - start;
    if (this.cur === buf && this.e === start) {
      this.e = end;
      return;
    }
    if (this.cur) this.parts.push(this.cur.subarray(this.s, this.e));
    this.cur = buf;
    this.s = start;
    this.e = end;
  }

  add(b: Buffer): void {
    this.bytes += b.length;
    if (this.cur) {
      this.parts.push(this.cur.subarray(this.s, this.e));
      this.cur = null;
    }
    this.parts.push(b);
  }

  get empty(): boolean {
    return this.cur === null && this.parts.length === 0;
  }

  /** Writes everything collected; returns the bytes written. */
  writeTo(socket: net.Socket): number {
    if (this.cur) {
      this.parts.push(this.cur.subarray(this.s, this.e));
      this.cur = null;
    }
    const parts = this.parts;
    const bytes = this.bytes;
    this.parts = [];
    this.bytes = 0;
    if (parts.length === 0 || socket.destroyed) return 0;
    if (parts.length === 1) {
      socket.write(parts[0]);
    } else if (bytes <= 16_384) {
      // One small copy is cheaper than Node's writev path.
      socket.write(Buffer.concat(parts, bytes));
    } else {
      socket.cork();
      for (const p of parts) socket.write(p);
      socket.uncork();
    }
    return bytes;
  }

  clear(): void {
    this.parts = [];
    this.cur = null;
    this.bytes = 0;
  }
}

let coarse = Date.now();
setInterval(() => {
  coarse = Date.now();
}, 20).unref();
/** Wall clock in ms, updated every 20 ms: for bookkeeping on the hot path (idle times, SHOW output). */
export const coarseNow = () => coarse;

/** Something with buffered output: flushed once per I/O event, not once per message. */
export interface Flushable {
  flushQueued: boolean;
  flush(): void;
}

let eventDepth = 0;
const toFlush: Flushable[] = [];

/**
 * Asks for `f.flush()` at the end of the current socket event (see inEvent), or
 * in a microtask when called outside one (timers, promise callbacks).
 */
export function requestFlush(f: Flushable): void {
  if (f.flushQueued) return;
  f.flushQueued = true;
  toFlush.push(f);
  if (eventDepth === 0 && toFlush.length === 1) queueMicrotask(flushAll);
}

/** Runs a socket event handler; everything it wrote anywhere goes out once it returns. */
export function inEvent<A>(fn: (a: A) => void, a: A): void {
  eventDepth++;
  try {
    fn(a);
  } finally {
    if (--eventDepth === 0) flushAll();
  }
}

function flushAll(): void {
  for (let i = 0; i < toFlush.length; i++) {
    const f = toFlush[i];
    f.flushQueued = false;
    f.flush();
  }
  toFlush.length = 0;
}

/** Reads a NUL-terminated string at `at`; returns [value, offset after the NUL]. */
export function cstrAt(buf: Buffer, at: number, end: number): [string, number] {
  const nul = buf.indexOf(0, at);
  if (nul < 0 || nul >= end) throw new PgError('ERROR', SQLSTATE.PROTOCOL_VIOLATION, 'invalid string in message');
  return [buf.toString('utf8', at, nul), nul + 1];
}

/** ErrorResponse/NoticeResponse fields of a message in place. */
export function errorFieldsAt(buf: Buffer, start: number, len: number): Record<string, string> {
  const out: Record<string, string> = {};
  let at = start + 5;
  const end = start + len;
  while (at < end) {
    const code = buf[at++];
    if (code === 0) break;
    const nul = buf.indexOf(0, at);
    if (nul < 0 || nul >= end) break;
    out[String.fromCharCode(code)] = buf.toString('utf8', at, nul);
    at = nul + 1;
  }
  return out;
}

/** Re-encodes error fields (order kept), e.g. after changing the severity of a relayed error. */
export function encodeErrorFields(type: 'E' | 'N', fields: Record<string, string>): Buffer {
  const parts: Buffer[] = [];
  for (const [k, v] of Object.entries(fields)) parts.push(Buffer.from(k), cstr(v));
  parts.push(Buffer.from([0]));
  return message(type, ...parts);
}

/** An ErrorResponse with every field we know (Postgres clients read S, V, C, M, D, H). */
export function errorMessage(e: PgError): Buffer {
  const fields: Record<string, string> = { S: e.severity, V: e.severity, C: e.code, M: e.message };
  if (e.detail) fields.D = e.detail;
  if (e.hint) fields.H = e.hint;
  if (e instanceof PositionedError) fields.P = String(e.position);
  return encodeErrorFields('E', fields);
}

/** An error pointing at a character of the query (1-based), like Postgres's syntax errors. */
export class PositionedError extends PgError {
  constructor(code: string, message: string, readonly position: number) {
    super('ERROR', code, message);
  }
}

export const pgErrorFromFields = (f: Record<string, string>, fallbackCode: string = SQLSTATE.CONNECTION_FAILURE) =>
  new PgError((f.V ?? f.S ?? 'ERROR') as 'ERROR', f.C ?? fallbackCode, f.M ?? 'server error', f.D, f.H);

export const READY_IDLE = message('Z', Buffer.from('I'));
export const READY_TX = message('Z', Buffer.from('T'));
export const READY_FAILED = message('Z', Buffer.from('E'));
export const readyFor = (s: 'I' | 'T' | 'E') => (s === 'I' ? READY_IDLE : s === 'T' ? READY_TX : READY_FAILED);
export const PARSE_COMPLETE = message('1');
export const BIND_COMPLETE = message('2');
export const CLOSE_COMPLETE = message('3');
export const NO_DATA = message('n');
export const commandCompleteMsg = (tag: string) => message('C', cstr(tag));

/** NegotiateProtocolVersion: the newest minor version we speak and the options we ignored. */
export const negotiateProtocolVersion = (minor: number, unsupported: string[]) =>
  message('v', int32(minor), int32(unsupported.length), ...unsupported.map(cstr));

/** A column of an admin-console result: its name and type oid (25 text, 20 int8). */
export interface Column { name: string; oid: number }
export function typedRowDescription(columns: Column[]): Buffer {
  const fields = columns.map((c) => Buffer.concat([
    cstr(c.name), int32(0), int16(0), int32(c.oid), int16(c.oid === 20 ? 8 : -1), int32(-1), int16(0),
  ]));
  return message('T', int16(columns.length), ...fields);
}

/** SQL string literal that means the same with standard_conforming_strings on or off. */
export function quoteLiteral(s: string): string {
  return s.includes('\\') ? `E'${s.replace(/\\/g, '\\\\').replace(/'/g, "''")}'` : `'${s.replace(/'/g, "''")}'`;
}

export function quoteIdent(s: string): string {
  return `"${s.replace(/"/g, '""')}"`;
}

/** Splits a startup `options` string as Postgres does (pg_split_opts): whitespace separates, backslash escapes. */
export function splitOptions(s: string): string[] {
  const out: string[] = [];
  let cur = '';
  let inTok = false;
  for (let i = 0; i < s.length; i++) {
    const ch = s[i];
    if (ch === '\\' && i + 1 < s.length) {
      cur += s[++i];
      inTok = true;
    } else if (/\s/.test(ch)) {
      if (inTok) out.push(cur);
      cur = '';
      inTok = false;
    } else {
      cur += ch;
      inTok = true;
    }
  }
  if (inTok) out.push(cur);
  return out;
}
