/**
 * Framing of the Postgres wire protocol (v3). Regular messages are a type byte,
 * an int32 length (counting itself) and a body; the first message from a client
 * (startup, SSLRequest, CancelRequest) has no type byte. The reader yields whole
 * frames and never copies a body it does not have to.
 */
import { PgError, SQLSTATE } from './errors.ts';

export interface Frame {
  /** Message type (a char code), or 0 for an untyped startup-phase message. */
  type: number;
  /** The body, after the length. */
  body: Buffer;
  /** The whole message as it arrived, for relaying unchanged. */
  raw: Buffer;
}

/** Postgres's own limit on a message (PQ_LARGE_MESSAGE_LIMIT is 1 GiB - 1). */
export const DEFAULT_MAX_MESSAGE = 1024 * 1024 * 1024 - 1;
/** Startup packets are small; Postgres refuses ones over 10000 bytes. */
const MAX_STARTUP = 10_000;

export class FrameReader {
  private buf: Buffer = Buffer.alloc(0);
  /** True until the startup-phase messages (which carry no type byte) are over. */
  untyped: boolean;

  constructor(opts: { untyped?: boolean; maxMessage?: number } = {}) {
    this.untyped = opts.untyped ?? false;
    this.maxMessage = opts.maxMessage ?? DEFAULT_MAX_MESSAGE;
  }

  private readonly maxMessage: number;

  push(chunk: Buffer): void {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
  }

  /** The next complete frame, or undefined until more bytes arrive. Throws PgError on a malformed length. */
  next(): Frame | undefined {
    const header = this.untyped ? 4 : 5;
    if (this.buf.length < header) return undefined;
    const len = this.buf.readInt32BE(header - 4);
    const limit = this.untyped ? MAX_STARTUP : this.maxMessage;
    if (len < 4 || len > limit) {
      throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, `invalid ${this.untyped ? 'startup packet' : 'message'} length ${len}`);
    }
    const total = len + header - 4;
    if (this.buf.length < total) return undefined;
    const raw = this.buf.subarray(0, total);
    this.buf = this.buf.subarray(total);
    return { type: this.untyped ? 0 : raw[0], body: raw.subarray(header), raw };
  }

  /** Bytes received but not yet framed (e.g. a TLS handshake that follows SSLRequest). */
  takeRest(): Buffer {
    const rest = this.buf;
    this.buf = Buffer.alloc(0);
    return rest;
  }
}

/** Builds one typed message from its type char and body parts. */
export function message(type: string, ...parts: Buffer[]): Buffer {
  const bodyLen = parts.reduce((n, p) => n + p.length, 0);
  const out = Buffer.allocUnsafe(5 + bodyLen);
  out[0] = type.charCodeAt(0);
  out.writeInt32BE(4 + bodyLen, 1);
  let at = 5;
  for (const p of parts) {
    p.copy(out, at);
    at += p.length;
  }
  return out;
}

export const cstr = (s: string) => Buffer.from(`${s}\0`, 'utf8');
export const int16 = (n: number) => {
  const b = Buffer.allocUnsafe(2);
  b.writeInt16BE(n);
  return b;
};
export const int32 = (n: number) => {
  const b = Buffer.allocUnsafe(4);
  b.writeInt32BE(n);
  return b;
};

/** A cursor over a message body, for the few fields we decode. */
export class BodyReader {
  at = 0;
  constructor(readonly body: Buffer) {}

  cstr(): string {
    const end = this.body.indexOf(0, this.at);
    if (end < 0) throw new PgError('ERROR', SQLSTATE.PROTOCOL_VIOLATION, 'invalid string in message');
    const s = this.body.toString('utf8', this.at, end);
    this.at = end + 1;
    return s;
  }

  int16(): number {
    this.need(2);
    const v = this.body.readInt16BE(this.at);
    this.at += 2;
    return v;
  }

  int32(): number {
    this.need(4);
    const v = this.body.readInt32BE(this.at);
    this.at += 4;
    return v;
  }

  byte(): number {
    this.need(1);
    return this.body[this.at++];
  }

  bytes(n: number): Buffer {
    this.need(n);
    const b = this.body.subarray(this.at, this.at + n);
    this.at += n;
    return b;
  }

  rest(): Buffer {
    return this.body.subarray(this.at);
  }

  private need(n: number): void {
    if (this.at + n > this.body.length) throw new PgError('ERROR', SQLSTATE.PROTOCOL_VIOLATION, 'message too short for its contents');
  }
}
