/**
 * The messages the proxy reads and writes. pg-protocol parses only what servers
 * send and serializes only what clients send, so the proxy, which is a server to
 * its clients, has its own decoders for client messages and writers for server
 * messages. Relayed traffic stays raw; only what routing needs is decoded.
 */
import { BodyReader, cstr, int16, int32, message, type Frame } from './frames.ts';
import { PgError, PositionedError, SQLSTATE } from './errors.ts';

/** Message type bytes, by name. */
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

export const PROTOCOL_3 = 196608;

/**
 * Between gateway and pooler only: the gateway sends a session's settings as
 * this startup parameter (JSON, '[]' for none) and the pooler reports them back
 * as a ParameterStatus of the same name whenever they change, so a session
 * keeps its SETs when the gateway moves it to another pooler. Clients never
 * see it; a client's own value is overwritten.
 */
export const SESSION_STATE_PARAM = 'mg.session';
/**
 * Reported by the pooler to a gateway like SESSION_STATE_PARAM: 'off' while the
 * session holds state that cannot move to another pooler (pinned state such as
 * temp tables, advisory locks, WITH HOLD cursors, LISTEN; named prepared
 * statements), 'on' again once it holds none. Sessions start 'on'.
 */
export const PORTABLE_PARAM = 'mg.portable';
export const SSL_REQUEST = 80877103;
export const GSSENC_REQUEST = 80877104;
export const CANCEL_REQUEST = 80877102;

export type StartupMessage =
  | { kind: 'startup'; params: Record<string, string> }
  | { kind: 'ssl' }
  | { kind: 'gssenc' }
  | { kind: 'cancel'; pid: number; secret: number };

export function decodeStartup(frame: Frame): StartupMessage {
  const r = new BodyReader(frame.body);
  const code = r.int32();
  if (code === SSL_REQUEST) return { kind: 'ssl' };
  if (code === GSSENC_REQUEST) return { kind: 'gssenc' };
  if (code === CANCEL_REQUEST) return { kind: 'cancel', pid: r.int32(), secret: r.int32() };
  if (code >> 16 !== 3) {
    throw new PgError('FATAL', SQLSTATE.FEATURE_NOT_SUPPORTED, `unsupported frontend protocol ${code >> 16}.${code & 0xffff}: server supports 3.0`);
  }
  const params: Record<string, string> = {};
  for (;;) {
    const key = r.cstr();
    if (key === '') break;
    params[key] = r.cstr();
  }
  if (!params.user) throw new PgError('FATAL', SQLSTATE.INVALID_AUTHORIZATION_SPECIFICATION, 'no PostgreSQL user name specified in startup packet');
  return { kind: 'startup', params };
}

export function encodeStartup(params: Record<string, string>): Buffer {
  const parts = [int32(PROTOCOL_3), ...Object.entries(params).flatMap(([k, v]) => [cstr(k), cstr(v)]), Buffer.from([0])];
  const len = 4 + parts.reduce((n, p) => n + p.length, 0);
  return Buffer.concat([int32(len), ...parts]);
}

export function encodeCancel(pid: number, secret: number): Buffer {
  return Buffer.concat([int32(16), int32(CANCEL_REQUEST), int32(pid), int32(secret)]);
}

// --- client messages the proxy looks into -----------------------------------------------

export const decodeQuery = (f: Frame) => new BodyReader(f.body).cstr();

export interface ParseMessage { name: string; sql: string; paramTypes: number[] }
export function decodeParse(f: Frame): ParseMessage {
  const r = new BodyReader(f.body);
  const name = r.cstr();
  const sql = r.cstr();
  const n = r.int16();
  const paramTypes = Array.from({ length: n }, () => r.int32());
  return { name, sql, paramTypes };
}

/** Bind's portal and statement names; the rest of the body is kept raw. */
export function decodeBindNames(f: Frame): { portal: string; statement: string; rest: Buffer } {
  const r = new BodyReader(f.body);
  const portal = r.cstr();
  const statement = r.cstr();
  return { portal, statement, rest: r.rest() };
}

/** Describe ('D') and Close ('C'): 'S' for a statement or 'P' for a portal, and its name. */
export function decodeTarget(f: Frame): { target: 'S' | 'P'; name: string } {
  const r = new BodyReader(f.body);
  const target = String.fromCharCode(r.byte());
  if (target !== 'S' && target !== 'P') throw new PgError('ERROR', SQLSTATE.PROTOCOL_VIOLATION, `invalid ${String.fromCharCode(f.type) === 'D' ? 'DESCRIBE' : 'CLOSE'} message subtype ${target}`);
  return { target, name: r.cstr() };
}

export const encodeQuery = (sql: string) => message('Q', cstr(sql));
export const SYNC = message('S');
export const TERMINATE = message('X');

// --- server messages the proxy writes ------------------------------------------------------

export const authenticationOk = () => message('R', int32(0));
export const authenticationSasl = (mechanisms: string[]) => message('R', int32(10), ...mechanisms.map(cstr), Buffer.from([0]));
export const authenticationSaslContinue = (data: string) => message('R', int32(11), Buffer.from(data));
export const authenticationSaslFinal = (data: string) => message('R', int32(12), Buffer.from(data));
export const parameterStatus = (name: string, value: string) => message('S', cstr(name), cstr(value));
export const backendKeyData = (pid: number, secret: number) => message('K', int32(pid), int32(secret));
const READY = { I: message('Z', Buffer.from('I')), T: message('Z', Buffer.from('T')), E: message('Z', Buffer.from('E')) };
export const readyForQuery = (status: 'I' | 'T' | 'E') => READY[status];
export const commandComplete = (tag: string) => message('C', cstr(tag));
export const EMPTY_QUERY_RESPONSE = message('I');
export const PARSE_COMPLETE = message('1');
export const BIND_COMPLETE = message('2');
export const CLOSE_COMPLETE = message('3');
export const NO_DATA = message('n');

/** NegotiateProtocolVersion: the newest minor version we speak and the options we ignored. */
export const negotiateProtocolVersion = (minor: number, unsupported: string[]) =>
  message('v', int32(minor), int32(unsupported.length), ...unsupported.map(cstr));

/** A result column: its name and type oid (default 25, text). */
export interface Column { name: string; oid?: number }
export function rowDescription(columns: Column[]): Buffer {
  const fields = columns.map((c) => {
    const oid = c.oid ?? 25;
    return Buffer.concat([cstr(c.name), int32(0), int16(0), int32(oid), int16(oid === 20 ? 8 : -1), int32(-1), int16(0)]);
  });
  return message('T', int16(columns.length), ...fields);
}

export function dataRow(values: Array<string | null>): Buffer {
  const cells = values.map((v) => {
    if (v === null) return int32(-1);
    const b = Buffer.from(v, 'utf8');
    return Buffer.concat([int32(b.length), b]);
  });
  return message('D', int16(values.length), ...cells);
}

/** Re-encodes error fields (order kept), e.g. after changing the severity of a relayed error. */
export function encodeErrorFields(type: 'E' | 'N', fields: Record<string, string>): Buffer {
  const parts: Buffer[] = [];
  for (const [k, v] of Object.entries(fields)) parts.push(Buffer.from(k), cstr(v));
  parts.push(Buffer.from([0]));
  return message(type, ...parts);
}

/** An ErrorResponse with every field we know (clients read S, V, C, M, D, H, and P for a position). */
export function errorResponse(e: PgError): Buffer {
  const fields: Record<string, string> = { S: e.severity, V: e.severity, C: e.code, M: e.message };
  if (e.detail) fields.D = e.detail;
  if (e.hint) fields.H = e.hint;
  if (e instanceof PositionedError) fields.P = String(e.position);
  return encodeErrorFields('E', fields);
}

// --- server messages the proxy looks into --------------------------------------------------

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

export const decodeErrorFields = (f: Frame) => errorFieldsAt(f.raw, 0, f.raw.length);

export const pgErrorFromFields = (f: Record<string, string>, fallbackCode: string = SQLSTATE.CONNECTION_FAILURE) =>
  new PgError((f.V ?? f.S ?? 'ERROR') as 'ERROR', f.C ?? fallbackCode, f.M ?? 'server error', f.D, f.H);

/** Reads a NUL-terminated string at `at`; returns [value, offset after the NUL]. */
export function cstrAt(buf: Buffer, at: number, end: number): [string, number] {
  const nul = buf.indexOf(0, at);
  if (nul < 0 || nul >= end) throw new PgError('ERROR', SQLSTATE.PROTOCOL_VIOLATION, 'invalid string in message');
  return [buf.toString('utf8', at, nul), nul + 1];
}

export const decodeReadyStatus = (f: Frame) => String.fromCharCode(f.body[0]) as 'I' | 'T' | 'E';
export function decodeParameterStatus(f: Frame): { name: string; value: string } {
  const r = new BodyReader(f.body);
  return { name: r.cstr(), value: r.cstr() };
}
export function decodeBackendKey(f: Frame): { pid: number; secret: number } {
  const r = new BodyReader(f.body);
  return { pid: r.int32(), secret: r.int32() };
}
/** Authentication request code (0 ok, 3 cleartext, 5 md5, 10 SASL, 11 continue, 12 final) and its data. */
export function decodeAuthentication(f: Frame): { code: number; data: Buffer } {
  const r = new BodyReader(f.body);
  return { code: r.int32(), data: r.rest() };
}
