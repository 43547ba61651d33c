/**
 * LISTEN/NOTIFY through transaction pooling: one listener connection per
 * database LISTENs the union of what its clients listen to and fans each
 * NotificationResponse out to the subscribed clients. A client's LISTEN is
 * answered once the listener's own LISTEN has completed, so a NOTIFY issued
 * after the client saw "LISTEN" is delivered.
 */
import type { Logger } from '../../common/log.ts';
import { PgError, SQLSTATE } from '../protocol/errors.ts';
import { ServerConn, type ServerOwner } from './server.ts';
import { quoteIdent } from './text.ts';
import { T } from '../protocol/messages.ts';

export interface Subscriber {
  deliverNotification(buf: Buffer): void;
}

export interface ListenerTarget {
  host: string;
  port: number;
  user: string;
  database: string;
  timeoutMs: number;
}

export class SharedListener implements ServerOwner {
  private conn: ServerConn | null = null;
  private connecting: Promise<ServerConn> | null = null;
  private readonly subs = new Map<string, Set<Subscriber>>();
  /** Channels the listener connection LISTENs to. */
  private readonly listening = new Set<string>();
  private chain: Promise<unknown> = Promise.resolve();
  private closed = false;
  delivered = 0;

  constructor(private readonly target: ListenerTarget, private readonly log: Logger) {}

  get channelCount(): number {
    return this.subs.size;
  }

  /** Subscribes; resolves when notifications on `channel` are sure to reach `sub`. */
  listen(sub: Subscriber, channel: string): Promise<void> {
    let set = this.subs.get(channel);
    if (!set) this.subs.set(channel, (set = new Set()));
    set.add(sub);
    return this.serial(async () => {
      if (this.listening.has(channel) && this.conn && !this.conn.closed) return;
      const conn = await this.connection();
      if (!this.listening.has(channel)) {
        const r = await conn.runInternal([`LISTEN ${quoteIdent(channel)}`]);
        if (r.error) throw r.error;
        this.listening.add(channel);
      }
    });
  }

  unlisten(sub: Subscriber, channel: string | null): void {
    const channels = channel === null ? [...this.subs.keys()] : [channel];
    const drop: string[] = [];
    for (const ch of channels) {
      const set = this.subs.get(ch);
      if (!set) continue;
      set.delete(sub);
      if (set.size === 0) {
        this.subs.delete(ch);
        drop.push(ch);
      }
    }
    if (drop.length === 0) return;
    void this.serial(async () => {
      const conn = this.conn;
      const still = drop.filter((ch) => !this.subs.has(ch) && this.listening.has(ch));
      if (!conn || conn.closed || still.length === 0) return;
      for (const ch of still) this.listening.delete(ch);
      await conn.runInternal([still.map((ch) => `UNLISTEN ${quoteIdent(ch)}`).join('; ')]);
    }).catch(() => undefined);
  }

  private serial<R>(fn: () => Promise<R>): Promise<R> {
    const run = this.chain.then(fn, fn);
    this.chain = run.catch(() => undefined);
    return run;
  }

  private connection(): Promise<ServerConn> {
    if (this.conn && !this.conn.closed) return Promise.resolve(this.conn);
    if (this.closed) return Promise.reject(new PgError('ERROR', SQLSTATE.ADMIN_SHUTDOWN, 'pooler is shutting down'));
    this.connecting ??= ServerConn.connect({ ...this.target, log: this.log }).then((c) => {
      this.conn = c;
      this.connecting = null;
      c.owner = this;
      c.state = 'active';
      c.ownerLabel = 'listener';
      this.listening.clear();
      this.log.info({ database: this.target.database, pid: c.pid }, 'shared listener connected');
      return c;
    }, (err) => {
      this.connecting = null;
      throw err;
    });
    return this.connecting;
  }

  onServerMessage(buf: Buffer, start: number, len: number): void {
    if (buf[start] !== T.Notification) return;
    // int32 pid, channel, payload
    const chStart = start + 9;
    const nul = buf.indexOf(0, chStart);
    if (nul < 0 || nul >= start + len) return;
    const set = this.subs.get(buf.toString('utf8', chStart, nul));
    if (!set) return;
    // Its own copy: buf is the reused read buffer, and a client's output may outlive this read.
    const frame = Buffer.from(buf.subarray(start, start + len));
    for (const sub of set) {
      sub.deliverNotification(frame);
      this.delivered++;
    }
  }

  onServerLost(_s: ServerConn, err: PgError): void {
    this.conn = null;
    this.listening.clear();
    if (this.closed || this.subs.size === 0) return;
    // Re-listen to everything on a new connection; notifications sent meanwhile are lost.
    this.log.warn({ err: err.message, database: this.target.database }, 'shared listener lost its connection; reconnecting');
    const relisten = () => {
      if (this.closed || this.subs.size === 0) return;
      void this.serial(async () => {
        const conn = await this.connection();
        const chans = [...this.subs.keys()].filter((c) => !this.listening.has(c));
        if (chans.length === 0) return;
        const r = await conn.runInternal([chans.map((c) => `LISTEN ${quoteIdent(c)}`).join('; ')]);
        if (r.error) throw r.error;
        for (const c of chans) this.listening.add(c);
      }).catch((e: Error) => {
        this.log.warn({ err: e.message }, 'shared listener reconnect failed; retrying');
        setTimeout(relisten, 1000).unref();
      });
    };
    setTimeout(relisten, 100).unref();
  }

  onServerDrain(): void {}

  close(): void {
    this.closed = true;
    this.conn?.close();
    this.conn = null;
  }
}
