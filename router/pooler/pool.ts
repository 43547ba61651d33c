/**
 * The server connections of one (user, database): at most poolSize of them, a
 * LIFO idle stack (so surplus connections go quiet and get reaped), a FIFO queue
 * of waiting clients with a timeout, reset of dirty connections before reuse,
 * idle reaping and a maximum lifetime.
 */
import type { Logger } from '../../common/log.ts';
import { PgError, SQLSTATE } from '../protocol/errors.ts';
import type { PoolerConfig } from './config.ts';
import type { ConnectionLeases, GiveBack } from './leases.ts';
import { ServerConn } from './server.ts';
import { Settings } from './settings.ts';
import { coarseNow, quoteIdent } from './text.ts';

export type AcquireCallback = (err: PgError | null, server?: ServerConn) => void;

interface Waiter {
  cb: AcquireCallback;
  fp: string;
  since: number;
  timer: NodeJS.Timeout;
}

export interface PoolStats {
  xacts: number;
  queries: number;
  received: number;
  sent: number;
  xactTimeUs: number;
  queryTimeUs: number;
  waitTimeUs: number;
  waits: number;
}

/** What pools need from the pooler: live config, log, metrics hooks, the leases that bound connections across workers. */
export interface PoolContext {
  config: PoolerConfig;
  log: Logger;
  leases: ConnectionLeases;
  /** Bumped as server connections open and as they are given back to another worker. */
  counters: { serverConnects: number; giveBacks: number };
  observeWait(seconds: number): void;
  countError(kind: string): void;
}

export interface StartupInfo {
  params: Map<string, string>;
  at: number;
}

const STARTUP_CACHE_TTL_MS = 60_000;
const STARTUP_CACHE_MAX = 1000;
/**
 * Asked to give back only a connection it leaves idle, a worker closes one idle at
 * least this long: under load a connection is idle for a round trip between two
 * transactions, and giving that one away would only make this worker ask for it back.
 */
const IDLE_GIVE_BACK_MS = 100;

export class Pool {
  readonly servers = new Set<ServerConn>();
  private idle: ServerConn[] = [];
  connecting = 0;
  /** Lease requests not yet granted (a worker of several opens a connection only under a lease). */
  private leasing = 0;
  /** Another worker waits for a lease of this pool and this one holds more than its fair share: the next connection freed is closed. */
  private giveBackNext = false;
  /** Another worker waits for a lease of this pool: the first connection idle for IDLE_GIVE_BACK_MS is closed. */
  private giveBackIdle = false;
  private giveBackTimer: NodeJS.Timeout | null = null;
  private readonly waiters = new Map<object, Waiter>();
  paused = false;
  private pauseWaiters: Array<() => void> = [];
  private retryTimer: NodeJS.Timeout | null = null;
  readonly stats: PoolStats = { xacts: 0, queries: 0, received: 0, sent: 0, xactTimeUs: 0, queryTimeUs: 0, waitTimeUs: 0, waits: 0 };
  /** ParameterStatus a client with these startup settings gets (fingerprint -> values). */
  readonly startupCache = new Map<string, StartupInfo>();
  lastActivity = Date.now();
  clients = 0;

  constructor(readonly user: string, readonly database: string, private readonly ctx: PoolContext) {}

  /** The pooler's name for this pool, also the key its leases go by. */
  get key(): string {
    return poolKey(this.user, this.database);
  }

  get idleCount(): number {
    return this.idle.length;
  }

  get activeCount(): number {
    let n = 0;
    for (const s of this.servers) if (s.state === 'active') n++;
    return n;
  }

  /** Whether acquire() would return a connection right away. */
  get hasIdle(): boolean {
    return !this.paused && this.waiters.size === 0 && this.idle.length > 0;
  }

  get waitingCount(): number {
    return this.waiters.size;
  }

  /** Longest current wait, in ms. */
  get maxWaitMs(): number {
    const first = this.waiters.values().next().value as Waiter | undefined;
    return first ? Date.now() - first.since : 0;
  }

  /**
   * A server connection now (preferring an idle one whose settings already equal
   * `fp`), or null and `cb` is called later (FIFO) with one or with an error.
   */
  acquire(key: object, fp: string, cb: AcquireCallback): ServerConn | null {
    this.lastActivity = coarseNow();
    if (!this.paused && this.waiters.size === 0 && this.idle.length > 0) {
      const s = this.takeIdle(fp);
      this.ctx.observeWait(0);
      return s;
    }
    const timeoutMs = this.ctx.config.queueTimeoutMs;
    const since = Date.now();
    const timer = setTimeout(() => {
      if (!this.waiters.delete(key)) return;
      this.ctx.countError('queue_timeout');
      this.stats.waitTimeUs += (Date.now() - since) * 1000;
      cb(new PgError('ERROR', SQLSTATE.TOO_MANY_CONNECTIONS,
        `pool exhausted: no server connection for user "${this.user}" database "${this.database}" became free within ${timeoutMs} ms`,
        `pool_size is ${this.ctx.config.poolSize}; ${this.activeCount} server connections are busy and ${this.waiters.size} clients are waiting`,
        'Shorten transactions, raise poolSize, or retry later.'));
    }, timeoutMs);
    timer.unref();
    this.waiters.set(key, { cb, fp, since, timer });
    this.grow();
    return null;
  }

  cancelWait(key: object): boolean {
    const w = this.waiters.get(key);
    if (!w) return false;
    clearTimeout(w.timer);
    this.waiters.delete(key);
    return true;
  }

  private takeIdle(fp: string): ServerConn {
    let i = this.idle.length - 1;
    for (let j = i; j >= 0; j--) {
      if (this.idle[j].applied?.fp === fp) {
        i = j;
        break;
      }
    }
    const s = this.idle[i];
    this.idle.splice(i, 1);
    s.state = 'active';
    s.lastUsed = coarseNow();
    return s;
  }

  /** A checked-out connection comes back (owner already detached). */
  release(s: ServerConn): void {
    if (s.state === 'idle') {
      // Never hand one connection to two clients.
      this.ctx.log.error({ server: s.id }, 'server connection released twice; ignoring');
      return;
    }
    s.owner = null;
    s.ownerLabel = '';
    s.lastUsed = coarseNow();
    if (s.closed) return;
    if (s.retire || this.expired(s)) {
      this.retireServer(s);
      return;
    }
    if (s.beingCanceled(() => this.release(s))) return;
    const evict = s.needsReset ? [] : s.evictable(this.ctx.config.maxPreparedStatements);
    if (evict.length) {
      // Over the per-connection statement budget: drop the least recently used (same namespace as SQL DEALLOCATE).
      for (const n of evict) s.prepared.delete(n);
      s.state = 'resetting';
      s.runInternal([evict.map((n) => `DEALLOCATE ${quoteIdent(n)}`).join('; ')]).then((r) => {
        if (r.error) s.needsReset = true;
        this.release(s);
      }, () => undefined);
      return;
    }
    if (s.needsReset) {
      s.state = 'resetting';
      s.runInternal(['DISCARD ALL']).then((r) => {
        if (r.error) {
          this.ctx.log.warn({ err: r.error, server: s.id }, 'DISCARD ALL failed; closing the server connection');
          this.retireServer(s);
          return;
        }
        s.applied = Settings.EMPTY;
        s.prepared.clear();
        s.unnamedOwner = null;
        s.needsReset = false;
        this.offer(s);
      }, () => undefined /* closed: onServerClosed accounts for it */);
      return;
    }
    this.offer(s);
  }

  private offer(s: ServerConn): void {
    if (this.giveBackNext) {
      // Above its fair share: the lease goes to the waiting worker even if a client here waits too.
      this.giveBackNext = false;
      this.ctx.counters.giveBacks++;
      this.retireServer(s);
      return;
    }
    if (!this.paused) {
      const first = this.waiters.entries().next().value as [object, Waiter] | undefined;
      if (first) {
        const [key, w] = first;
        this.waiters.delete(key);
        clearTimeout(w.timer);
        s.state = 'active';
        s.lastUsed = coarseNow();
        const waited = Date.now() - w.since;
        this.stats.waitTimeUs += waited * 1000;
        this.stats.waits++;
        this.ctx.observeWait(waited / 1000);
        w.cb(null, s);
        return;
      }
    }
    s.state = 'idle';
    this.idle.push(s);
    this.checkPaused();
  }

  /**
   * The primary asks for one lease back. `next` (this worker is above its fair
   * share): the least recently used idle connection now, or the next one freed.
   * `idle`: only a connection this worker leaves idle (decision 0057).
   */
  giveBack(only: GiveBack): void {
    if (only === 'idle') {
      this.giveBackIdle = true;
      this.giveBackIfIdle();
      return;
    }
    const s = this.idle[0];
    if (!s) {
      this.giveBackNext = true;
      return;
    }
    this.ctx.counters.giveBacks++;
    this.retireServer(s);
  }

  /**
   * Closes the least recently used idle connection once it has been idle
   * IDLE_GIVE_BACK_MS, as seen from a timer that runs after pending reads
   * (`confirmed`): a process that stalled runs its timers before its reads, and a
   * client's next query may still be unread. Also checked by the reaper.
   */
  private giveBackIfIdle(confirmed = false): void {
    const s = this.idle[0];
    if (!this.giveBackIdle || !s || this.giveBackTimer) return;
    const wait = IDLE_GIVE_BACK_MS - (coarseNow() - s.lastUsed);
    if (wait > 0 || !confirmed) {
      this.giveBackTimer = setTimeout(() => {
        this.giveBackTimer = null;
        this.giveBackIfIdle(true);
      }, Math.max(0, wait));
      this.giveBackTimer.unref();
      return;
    }
    this.giveBackIdle = false;
    this.ctx.counters.giveBacks++;
    this.retireServer(s);
  }

  private expired(s: ServerConn): boolean {
    return coarseNow() - s.createdAt > this.ctx.config.serverLifetimeMs;
  }

  private retireServer(s: ServerConn): void {
    this.removeIdle(s);
    s.close();
    // onServerClosed follows from the socket; a waiter may need a fresh connection.
  }

  private removeIdle(s: ServerConn): void {
    const i = this.idle.indexOf(s);
    if (i >= 0) this.idle.splice(i, 1);
  }

  /** Opens connections while clients wait and the pool has room, each under a lease. */
  grow(): void {
    if (this.paused) return;
    const size = this.ctx.config.poolSize;
    while (this.waiters.size > this.connecting + this.leasing && this.servers.size + this.connecting + this.leasing < size) {
      this.leasing++;
      this.ctx.leases.request(this.key, size, () => {
        this.leasing--;
        // Clients may have stopped waiting (or the pool paused) while the lease was on its way.
        if (!this.paused && this.waiters.size > this.connecting && this.servers.size + this.connecting < this.ctx.config.poolSize) this.spawn();
        else this.ctx.leases.release(this.key);
      });
    }
  }

  private spawn(): void {
    this.connecting++;
    const { config, log } = this.ctx;
    ServerConn.connect({
      host: config.postgres.host, port: config.postgres.port, user: this.user, database: this.database,
      timeoutMs: config.serverConnectTimeoutMs, log,
    }).then((s) => {
      this.connecting--;
      this.ctx.counters.serverConnects++;
      this.servers.add(s);
      s.onClosed(() => this.onServerClosed(s));
      log.debug({ server: s.id, pid: s.pid, user: this.user, database: this.database }, 'server connection opened');
      this.offer(s);
    }, (err: Error) => {
      this.connecting--;
      this.ctx.leases.release(this.key);
      this.ctx.countError('server_connect');
      log.warn({ err: err.message, user: this.user, database: this.database }, 'server connection failed');
      const pgErr = err instanceof PgError ? err : new PgError('ERROR', SQLSTATE.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION, err.message);
      if (this.servers.size === 0 && this.connecting === 0) {
        // Nothing will come back to this pool: tell everyone waiting now.
        for (const [key, w] of [...this.waiters]) {
          this.waiters.delete(key);
          clearTimeout(w.timer);
          w.cb(pgErr);
        }
      } else if (!this.retryTimer) {
        this.retryTimer = setTimeout(() => {
          this.retryTimer = null;
          this.grow();
        }, 500);
        this.retryTimer.unref();
      }
    });
  }

  private onServerClosed(s: ServerConn): void {
    this.servers.delete(s);
    this.ctx.leases.release(this.key);
    this.removeIdle(s);
    this.ctx.log.debug({ server: s.id, pid: s.pid }, 'server connection closed');
    this.grow();
    this.checkPaused();
  }

  /** Closes idle connections unused for serverIdleTimeoutMs or older than serverLifetimeMs. */
  reap(now: number): void {
    const { serverIdleTimeoutMs } = this.ctx.config;
    for (const s of [...this.idle]) {
      if (now - s.lastUsed > serverIdleTimeoutMs || this.expired(s)) {
        this.ctx.log.debug({ server: s.id, idleMs: now - s.lastUsed }, 'reaping server connection');
        this.retireServer(s);
      }
    }
    this.giveBackIfIdle();
    for (const [fp, info] of this.startupCache) if (now - info.at > STARTUP_CACHE_TTL_MS) this.startupCache.delete(fp);
    // Connections beyond a lowered poolSize go when they are next idle.
    let extra = this.servers.size - this.ctx.config.poolSize;
    for (const s of [...this.idle]) {
      if (extra-- <= 0) break;
      this.retireServer(s);
    }
  }

  cacheStartup(fp: string, params: Map<string, string>): void {
    if (this.startupCache.size >= STARTUP_CACHE_MAX) this.startupCache.clear();
    this.startupCache.set(fp, { params: new Map(params), at: Date.now() });
  }

  /** PAUSE: no new checkouts; resolves once no server connection is in use. */
  pause(): Promise<void> {
    this.paused = true;
    return new Promise((resolve) => {
      this.pauseWaiters.push(resolve);
      this.checkPaused();
    });
  }

  resume(): void {
    this.paused = false;
    for (const w of this.pauseWaiters.splice(0)) w();
    while (this.waiters.size > 0 && this.idle.length > 0) {
      const s = this.idle.pop()!;
      this.offer(s);
    }
    this.grow();
  }

  private checkPaused(): void {
    if (!this.paused || this.pauseWaiters.length === 0) return;
    for (const s of this.servers) if (s.state === 'active' || s.state === 'resetting') return;
    for (const w of this.pauseWaiters.splice(0)) w();
  }

  get empty(): boolean {
    return this.servers.size === 0 && this.connecting === 0 && this.waiters.size === 0 && this.clients === 0;
  }

  /** Closes the idle server connections (busy ones stay with their clients). */
  closeIdle(): void {
    for (const s of [...this.idle]) this.retireServer(s);
  }

  closeAll(): void {
    for (const [key, w] of [...this.waiters]) {
      this.waiters.delete(key);
      clearTimeout(w.timer);
      w.cb(new PgError('FATAL', SQLSTATE.ADMIN_SHUTDOWN, 'terminating connection due to administrator command'));
    }
    if (this.retryTimer) clearTimeout(this.retryTimer);
    if (this.giveBackTimer) clearTimeout(this.giveBackTimer);
    for (const s of [...this.servers]) {
      if (s.state === 'idle') s.close();
      else s.destroy();
    }
    this.idle = [];
  }

  /** For SHOW SERVERS. */
  list(): ServerConn[] {
    return [...this.servers];
  }
}

export function poolKey(user: string, database: string): string {
  return `${user}\u0000${database}`;
}
