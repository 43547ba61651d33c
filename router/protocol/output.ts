/**
 * Output batching for relayed traffic: what one socket event writes anywhere
 * goes out once, when the event's handler returns, and adjacent ranges of the
 * same input buffer leave as one slice (no copy, no re-encoding).
 */
import type net from 'node:net';

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
  /** Holds bytes of the reused read buffer (see inRead): they are copied before they outlive the read. */
  holdsReadBuffer = false;

  range(buf: Buffer, start: number, end: number): void {
    this.bytes += end - start;
    if (buf === readBuffer && !this.holdsReadBuffer) holdBytesOfRead(this);
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
    if (readBuffer !== null && b.buffer === readBuffer.buffer && !this.holdsReadBuffer) holdBytesOfRead(this);
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
    const copy = this.holdsReadBuffer;
    this.parts = [];
    this.bytes = 0;
    this.holdsReadBuffer = false;
    if (parts.length === 0 || socket.destroyed) return 0;
    if (copy) {
      // Views of the reused read buffer: a write the kernel does not take at once keeps a
      // reference to its bytes until it completes, by when the next read has overwritten them.
      socket.write(parts.length === 1 ? copyOf(parts[0]) : Buffer.concat(parts, bytes));
    } else if (parts.length === 1) {
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
    this.holdsReadBuffer = false;
  }

  /** The read is over: what is still held of the read buffer becomes a copy. */
  detachFromRead(): void {
    if (!this.holdsReadBuffer) return;
    this.holdsReadBuffer = false;
    const rb = readBuffer!.buffer;
    if (this.cur === readBuffer) {
      this.parts.push(copyOf(readBuffer!.subarray(this.s, this.e)));
      this.cur = null;
    }
    for (let i = 0; i < this.parts.length; i++) if (this.parts[i].buffer === rb) this.parts[i] = copyOf(this.parts[i]);
  }
}

function copyOf(b: Buffer): Buffer {
  const c = Buffer.allocUnsafe(b.length);
  b.copy(c);
  return c;
}

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

// ------------------------------------------------------------ reads into a buffer we own

/**
 * Size of the one read buffer a process reads all its `ownReads` sockets into. Node reads
 * up to 64 KiB per read by default, allocating a new buffer each time.
 */
const READ_BUFFER_SIZE = 64 * 1024;
/** The buffer every `ownReads` socket reads into: one, since libuv delivers one read at a time. */
const sharedReadBuffer = Buffer.allocUnsafeSlow(READ_BUFFER_SIZE);
/** The read buffer whose bytes are being handled now (inside inRead), else null. */
let readBuffer: Buffer | null = null;
/** Output batches holding views of it: detached (copied) when the read is over. */
const holders: OutBatch[] = [];

function holdBytesOfRead(b: OutBatch): void {
  b.holdsReadBuffer = true;
  holders.push(b);
}

/**
 * Whether buf is the read buffer of the read being handled: its bytes are overwritten by the
 * next read, so what is kept after the handler returns must be copied (see keep()).
 */
export function isReadBuffer(buf: Buffer): boolean {
  return buf === readBuffer;
}

/** buf[start, end) to keep past the current event: a copy when it lies in the reused read buffer. */
export function keep(buf: Buffer, start: number, end: number): Buffer {
  return readBuffer !== null && buf.buffer === readBuffer.buffer ? copyOf(buf.subarray(start, end)) : buf.subarray(start, end);
}

/**
 * The `onread` option for net.connect / new net.Socket: the socket reads into the process's
 * one read buffer, with no 'data' event and no Buffer per read; `feed(buf, end)` gets
 * buf[0, end) inside inRead. Nothing may keep a view of buf after feed returns: MessageScanner
 * copies a split message, OutBatch copies what it holds when the read ends, keep() copies
 * what a handler queues.
 */
export function ownReads(feed: (buf: Buffer, end: number) => void): net.OnReadOpts {
  return {
    buffer: sharedReadBuffer,
    callback: (n, buf) => {
      inRead(feed, buf as Buffer, n);
      return true;
    },
  };
}

/** Runs a read's handler as inEvent does, then detaches every output batch from the read buffer. */
export function inRead(fn: (buf: Buffer, end: number) => void, buf: Buffer, end: number): void {
  const outer = readBuffer;
  readBuffer = buf;
  eventDepth++;
  try {
    fn(buf, end);
  } finally {
    if (--eventDepth === 0) flushAll();
    for (let i = 0; i < holders.length; i++) holders[i].detachFromRead();
    holders.length = 0;
    readBuffer = outer;
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

/** Unsent bytes a client socket may hold before the servers feeding it stop being read. */
export const CLIENT_HIGH_WATER = 1024 * 1024;

/**
 * Backpressure from a client to the servers whose answers it gets: once the
 * client's socket holds more than CLIENT_HIGH_WATER unsent bytes, those servers'
 * sockets stop being read until it drains. What the proxy holds of a large
 * result is then bounded, whatever the client's speed, and the server (the
 * pooler, and through it Postgres) waits in its own socket write instead.
 */
export class ReadThrottle {
  private paused: net.Socket[] = [];

  constructor(private readonly client: net.Socket) {
    client.on('drain', () => this.release());
    client.once('close', () => this.release());
  }

  /** After writing to the client: stops reading `servers` while it is congested. */
  check(servers: Iterable<net.Socket>): void {
    if (this.client.writableLength <= CLIENT_HIGH_WATER || this.client.destroyed) return;
    for (const s of servers) {
      if (s.isPaused()) continue;
      s.pause();
      this.paused.push(s);
    }
  }

  /** Reads the paused servers again. */
  release(): void {
    for (const s of this.paused.splice(0)) s.resume();
  }
}
