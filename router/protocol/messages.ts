/**
 * The messages the proxy reads and writes. pg-protocol parses only what servers
 * send and serializes only what clients send, so the proxy, which is a server to
 * its clients, has its own decoders for client messages and writers for server
 * messages. Relayed traffic stays raw; only what routing needs is decoded.
 */
import { BodyReader, cstr, int16, int32, message, type Frame } from './frames.ts';
import { PgError, SQLSTATE, type Severity } from './errors.ts';

export const PROTOCOL_3 = 196608;
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
export const readyForQuery = (status: 'I' | 'T' | 'E') => message('Z', Buffer.from(status));
export const commandComplete = (tag: string) => message('C', cstr(tag));
export const emptyQueryResponse = () => message('I');
export const parseComplete = () => message('1');
export const bindComplete = () => message('2');
export const closeComplete = () => message('3');

export function rowDescription(columns: string[]): Buffer {
  // Every column as text (type oid 25), as admin consoles do.
  const fields = columns.map((c) => Buffer.concat([cstr(c), int32(0), int16(0), int32(25), int16(-1), int32(-1), int16(0)]));
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

function fields(severity: Severity, code: string, text: string, detail?: string, hint?: string): Buffer[] {
  const out = [Buffer.from('S'), cstr(severity), Buffer.from('V'), cstr(severity), Buffer.from('C'), cstr(code), Buffer.from('M'), cstr(text)];
  if (detail) out.push(Buffer.from('D'), cstr(detail));
  if (hint) out.push(Buffer.from('H'), cstr(hint));
  out.push(Buffer.from([0]));
  return out;
}
export const errorResponse = (e: PgError) => message('E', ...fields(e.severity, e.code, e.message, e.detail, e.hint));

// --- server messages the proxy looks into --------------------------------------------------

/** ErrorResponse / NoticeResponse fields by their one-letter codes (S, V, C, M, D, H, ...). */
export function decodeErrorFields(f: Frame): Record<string, string> {
  const r = new BodyReader(f.body);
  const out: Record<string, string> = {};
  for (;;) {
    const code = r.byte();
    if (code === 0) break;
    out[String.fromCharCode(code)] = r.cstr();
  }
  return out;
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
