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
