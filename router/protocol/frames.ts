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

/**
 * Pull-style framing for the startup phase (untyped packets) and for code that
 * is not on the relay path; typed messages are split by MessageScanner.
 */
export class FrameReader implements MessageSink {
  private startup: Buffer = Buffer.alloc(0);
  private readonly scanner: MessageScanner;
  private readonly ready: Frame[] = [];
  /** True until the startup-phase messages (which carry no type byte) are over. */
  untyped: boolean;

  constructor(opts: { untyped?: boolean; maxMessage?: number } = {}) {
    this.untyped = opts.untyped ?? false;
    this.scanner = new MessageScanner(opts.maxMessage ?? DEFAULT_MAX_MESSAGE);
  }

  /** Throws PgError on a malformed length. */
  push(chunk: Buffer): void {
    if (this.untyped) this.startup = this.startup.length === 0 ? chunk : Buffer.concat([this.startup, chunk]);
    else this.scanner.push(chunk, this);
  }

  onMessage(buf: Buffer, start: number, len: number): void {
    this.ready.push(frameAt(buf, start, len));
  }

  /** The next complete frame, or undefined until more bytes arrive. Throws PgError on a malformed length. */
  next(): Frame | undefined {
    if (!this.untyped) return this.ready.shift();
    if (this.startup.length < 4) return undefined;
    const len = this.startup.readInt32BE(0);
    if (len < 8 || len > MAX_STARTUP) throw new InvalidStartupLength(len);
    if (this.startup.length < len) return undefined;
    const raw = this.startup.subarray(0, len);
    this.startup = this.startup.subarray(len);
    return { type: 0, body: raw.subarray(4), raw };
  }

  /** Startup-phase bytes received but not yet framed (e.g. what follows the startup packet). */
  takeRest(): Buffer {
    const rest = this.startup;
    this.startup = Buffer.alloc(0);
    return rest;
  }
}

/**
 * A startup packet whose length cannot be right. Postgres only logs it and closes
 * (a client may send its Terminate before its startup packet): no answer is sent.
 */
export class InvalidStartupLength extends PgError {
  constructor(readonly length: number) {
    super('FATAL', SQLSTATE.PROTOCOL_VIOLATION, 'invalid length of startup packet');
  }
}

/** A typed message at buf[start, start + len) as a Frame (views, no copy). */
export function frameAt(buf: Buffer, start: number, len: number): Frame {
  const raw = buf.subarray(start, start + len);
  return { type: raw[0], body: raw.subarray(5), raw };
}

export interface MessageSink {
  /** buf[start, start + len) is one whole message (type byte, length, body). */
  onMessage(buf: Buffer, start: number, len: number): void;
}

/** A message split across reads is assembled in one buffer of its size when it is at most this big. */
const ASSEMBLE_IN_PLACE_MAX = 1024 * 1024;

/**
 * Splits a byte stream of typed messages. Complete messages inside a chunk are
 * handed out in place (views of the chunk, valid during the call only when the
 * chunk is a reused read buffer: see output.ts inRead). A message split across
 * chunks is copied out of them as its bytes arrive, so no byte of a chunk is
 * kept after push() returns: up to ASSEMBLE_IN_PLACE_MAX straight into one
 * buffer of the message's size, beyond that (a length the sender may not keep
 * to) into copies of the parts, joined when the last byte arrives.
 */
export class MessageScanner {
  /** The header (type + length) of a split message, until its 5 bytes are in. */
  private readonly head = Buffer.allocUnsafe(5);
  /** The split message being assembled, when its size is known and small enough. */
  private whole: Buffer | null = null;
  /** Copies of a big split message's parts. */
  private parts: Buffer[] = [];
  private have = 0;
  /** Total size of the message being assembled, once its header is known (0 before). */
  private need = 0;

  constructor(private readonly maxMessage: number) {}

  /** Bytes held for an incomplete message. */
  get buffered(): number {
    return this.have;
  }

  /**
   * Frames chunk[0, end). Throws PgError (FATAL) on an impossible or oversized length;
   * the stream cannot be resynchronised after that.
   */
  push(chunk: Buffer, sink: MessageSink, end = chunk.length): void {
    let off = 0;
    if (this.have > 0) {
      if (this.need === 0) {
        const take = Math.min(5 - this.have, end);
        chunk.copy(this.head, this.have, 0, take);
        this.have += take;
        off = take;
        if (this.have < 5) return;
        this.begin(this.check(this.head.readInt32BE(1)) + 1);
        this.append(this.head, 0, 5, 0);
      }
      const take = Math.min(this.need - this.have, end - off);
      this.append(chunk, off, off + take, this.have);
      off += take;
      if (this.have < this.need) return;
      const msg = this.whole ?? Buffer.concat(this.parts, this.need);
      this.whole = null;
      this.parts = [];
      this.have = 0;
      this.need = 0;
      sink.onMessage(msg, 0, msg.length);
    }
    while (off + 5 <= end) {
      const total = this.check(chunk.readInt32BE(off + 1)) + 1;
      if (off + total > end) break;
      sink.onMessage(chunk, off, total);
      off += total;
    }
    if (off < end) {
      if (end - off < 5) {
        chunk.copy(this.head, 0, off, end);
        this.have = end - off;
        this.need = 0;
      } else {
        this.begin(this.check(chunk.readInt32BE(off + 1)) + 1);
        this.append(chunk, off, end, 0);
      }
    }
  }

  private begin(total: number): void {
    this.need = total;
    this.have = 0;
    this.whole = total <= ASSEMBLE_IN_PLACE_MAX ? Buffer.allocUnsafe(total) : null;
  }

  /** Copies src[s, e) to the message at `at` (the bytes it has so far). */
  private append(src: Buffer, s: number, e: number, at: number): void {
    if (e <= s) return;
    if (this.whole) src.copy(this.whole, at, s, e);
    else {
      const part = Buffer.allocUnsafe(e - s);
      src.copy(part, 0, s, e);
      this.parts.push(part);
    }
    this.have = at + (e - s);
  }

  private check(len: number): number {
    if (len < 4) throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, `invalid message length ${len}`);
    if (len > this.maxMessage) {
      throw new PgError('FATAL', SQLSTATE.PROGRAM_LIMIT_EXCEEDED, `message length ${len} exceeds the maximum of ${this.maxMessage} bytes`);
    }
    return len;
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
