/**
 * MultiPooler: accepts Postgres wire-protocol clients on loopback, or a pod's address
 * (trust: the gateway in front authenticates) and multiplexes them onto server connections
 * to its Postgres, pooled per (user, database), transaction by transaction.
 */
import cluster from 'node:cluster';
import { randomInt } from 'node:crypto';
import net from 'node:net';
import type { FastifyInstance } from 'fastify';
import type { Logger } from '../../common/log.ts';
import { listeningPort, serveMetrics } from '../../common/metrics.ts';
import { PgError, SQLSTATE } from '../protocol/errors.ts';
import { FrameReader, InvalidStartupLength } from '../protocol/frames.ts';
import { authenticationOk, backendKeyData, decodeStartup, errorResponse, negotiateProtocolVersion, parameterStatus, readyForQuery, SESSION_STATE_PARAM } from '../protocol/messages.ts';
import { EveryWorker, reportMetricsToPrimary } from '../cluster/workers.ts';
import { AdminSession, type AdminHost, type Cell, localRows } from './admin.ts';
import { DURABILITY_DETAIL, loadParser, weakensDurability } from './classify.ts';
import { ClientSession, type Counters, type GatewayState, type SessionServices } from './client.ts';
import { ConfigError, loadConfigFile, parseConfig, type PoolerConfig, type PoolerConfigInput } from './config.ts';
import { connectionLeases } from './leases.ts';
import { SharedListener } from './listener.ts';
import { observeWait, registerPooler, type PoolerSnapshot } from './metrics.ts';
import { Pool, type PoolContext, poolKey } from './pool.ts';
import type { ServerConn } from './server.ts';
import { decodeSessionState, settingsDelta, settingsFromStartup, startupSettings, type Settings } from './settings.ts';

export const POOLER_VERSION = 'MultiPooler 0.1.0 (multigres-ts)';
const STARTUP_TIMEOUT_MS = 10_000;
const POOL_IDLE_DROP_MS = 120_000;

export interface PoolerHandle {
  /** The port clients connect to. */
  readonly port: number;
  /** The /metrics port, when metricsPort was configured. */
  readonly metricsPort?: number;
  readonly pooler: Pooler;
  /** Graceful: stops accepting, lets running transactions finish (up to shutdownGraceMs), closes everything. */
  close(): Promise<void>;
  /** Re-reads the config file in this process (SIGHUP, which reaches each worker); returns notes about settings that need a restart. */
  reload(): Promise<string[]>;
}

/**
 * Starts a pooler in this process. `configPath` is what RELOAD re-reads.
 */
export async function startPooler(input: PoolerConfigInput | PoolerConfig, log: Logger, opts: { configPath?: string } = {}): Promise<PoolerHandle> {
  const config = parseConfig(input);
  await loadParser();
  const pooler = new Pooler(config, log, opts.configPath);
  const port = await pooler.listen();
  let metricsApp: FastifyInstance | undefined;
  // A worker's metrics are served summed by the primary (router/cluster).
  if (cluster.isWorker) reportMetricsToPrimary();
  else if (config.metricsPort !== undefined) metricsApp = await serveMetrics(config.metricsPort, () => !pooler.shuttingDown, undefined, config.listenHost);
  log.info({ port, metricsPort: metricsApp ? listeningPort(metricsApp) : undefined, postgres: config.postgres, poolSize: config.poolSize }, 'pooler listening');
  let closing: Promise<void> | undefined;
  return {
    port,
    metricsPort: metricsApp ? listeningPort(metricsApp) : undefined,
    pooler,
    close: () => {
      closing ??= pooler.shutdown().then(() => metricsApp?.close()).then(() => undefined);
      return closing;
    },
    reload: () => pooler.reloadLocal(),
  };
}

export class Pooler implements SessionServices, AdminHost, PoolContext {
  readonly startedAt = Date.now();
  readonly version = POOLER_VERSION;
  shuttingDown = false;
  readonly counters: Counters = { queries: 0, xacts: 0, errors: new Map(), serverConnects: 0, giveBacks: 0 };
  private readonly poolMap = new Map<string, Pool>();
  private readonly clientMap = new Map<number, ClientSession>();
  private readonly admins = new Set<AdminSession>();
  private readonly listeners = new Map<string, SharedListener>();
  private readonly sockets = new Set<net.Socket>();
  private readonly server: net.Server;
  private readonly reaper: NodeJS.Timeout;
  private readonly unregister: () => void;
  readonly leases = connectionLeases();
  /** The pooler's workers (this process alone when it runs as one): cancels, schema changes and the admin console reach them all. */
  private readonly workers = new EveryWorker();

  constructor(readonly config: PoolerConfig, readonly log: Logger, private readonly configPath?: string) {
    this.server = net.createServer({ noDelay: true }, (s) => this.accept(s));
    this.server.on('error', (err) => log.error({ err }, 'listener error'));
    this.reaper = setInterval(() => this.reap(), 1000);
    this.reaper.unref();
    this.unregister = registerPooler(() => this.snapshot());
    this.leases.onWanted((key, only) => this.poolMap.get(key)?.giveBack(only));
    this.workers.on('cancel', (args) => {
      const { pid, secret } = args as { pid: number; secret: number };
      return this.cancelLocal(pid, secret);
    });
    this.workers.on('schema-changed', (args) => {
      const { database, from } = args as { database: string; from: number };
      if (from !== process.pid) this.bumpSchemaEpoch(database);
    });
    this.workers.on('show', (what) => localRows(this, what as string));
    this.workers.on('pause', (database) => this.pauseLocal(database as string | undefined));
    this.workers.on('resume', (database) => this.resumeLocal(database as string | undefined));
    this.workers.on('reload', () => this.reloadLocal());
  }

  listen(): Promise<number> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.config.listenPort, this.config.listenHost, () => {
        this.server.off('error', reject);
        resolve((this.server.address() as net.AddressInfo).port);
      });
    });
  }

  // --- PoolContext / SessionServices -------------------------------------------------------

  observeWait(seconds: number): void {
    observeWait(seconds);
  }

  countError(kind: string): void {
    this.counters.errors.set(kind, (this.counters.errors.get(kind) ?? 0) + 1);
  }

  listener(database: string, user: string): SharedListener {
    let l = this.listeners.get(database);
    if (!l) {
      l = new SharedListener({
        host: this.config.postgres.host, port: this.config.postgres.port, user, database, timeoutMs: this.config.serverConnectTimeoutMs,
      }, this.log);
      this.listeners.set(database, l);
    }
    return l;
  }

  /** Per database: bumped by every schema change seen, so statements prepared before it are not reused (0043). */
  private readonly schemaEpochs = new Map<string, number>();

  schemaEpoch(database: string): number {
    return this.schemaEpochs.get(database) ?? 0;
  }

  schemaChanged(database: string): void {
    this.bumpSchemaEpoch(database);
    // Every worker's pooled statements were planned against the old schema too.
    void this.workers.ask('schema-changed', { database, from: process.pid });
  }

  private bumpSchemaEpoch(database: string): void {
    this.schemaEpochs.set(database, this.schemaEpoch(database) + 1);
  }

  releaseDatabase(database: string): void {
    for (const p of this.poolMap.values()) if (p.database === database) p.closeIdle();
    const listener = this.listeners.get(database);
    if (listener && listener.channelCount === 0) { // one with subscribers is a user of the database: Postgres refuses the drop
      listener.close();
      this.listeners.delete(database);
    }
  }

  sessionClosed(c: ClientSession): void {
    this.clientMap.delete(c.pid);
  }

  // --- AdminHost ---------------------------------------------------------------------------

  pools(): Pool[] {
    return [...this.poolMap.values()];
  }

  clients(): ClientSession[] {
    return [...this.clientMap.values()];
  }

  adminSessions(): number {
    return this.admins.size;
  }

  /** Rows of an admin SHOW from every worker, one list per worker. */
  showEverywhere(what: string): Promise<Cell[][][]> {
    return this.workers.ask<Cell[][]>('show', what);
  }

  /** PAUSE in every worker; an unknown database is one no worker has a pool for. */
  async pause(database?: string): Promise<void> {
    const found = await this.workers.ask<boolean>('pause', database ?? null);
    if (database && !found.includes(true)) throw new PgError('ERROR', SQLSTATE.INVALID_CATALOG_NAME, `no such database: ${database}`);
  }

  async resume(database?: string): Promise<void> {
    const found = await this.workers.ask<boolean>('resume', database ?? null);
    if (database && !found.includes(true)) throw new PgError('ERROR', SQLSTATE.INVALID_CATALOG_NAME, `no such database: ${database}`);
  }

  private async pauseLocal(database?: string): Promise<boolean> {
    const pools = this.pools().filter((p) => !database || p.database === database);
    this.log.info({ database }, 'PAUSE');
    await Promise.all(pools.map((p) => p.pause()));
    return pools.length > 0;
  }

  private resumeLocal(database?: string): boolean {
    const pools = this.pools().filter((p) => !database || p.database === database);
    this.log.info({ database }, 'RESUME');
    for (const p of pools) p.resume();
    return pools.length > 0;
  }

  /** RELOAD: every worker re-reads the config file; the notes are said once. */
  async reload(): Promise<string[]> {
    const notes = await this.workers.ask<string[]>('reload');
    return [...new Set(notes.flat())];
  }

  /** Re-reads the config file in this process (SIGHUP reaches each worker). */
  async reloadLocal(): Promise<string[]> {
    if (!this.configPath) return ['started without a config file: nothing to reload'];
    let next: PoolerConfig;
    try {
      next = loadConfigFile(this.configPath);
    } catch (err) {
      throw new PgError('ERROR', '22023', err instanceof ConfigError ? err.message : String(err));
    }
    const notes: string[] = [];
    const fixed = ['instanceId', 'listenPort', 'listenHost', 'metricsPort', 'workers'] as const;
    for (const k of fixed) if (next[k] !== this.config[k]) notes.push(`${k} changed; it takes effect on restart`);
    if (JSON.stringify(next.postgres) !== JSON.stringify(this.config.postgres)) notes.push('postgres changed; it takes effect on restart');
    const reloadable = ['poolSize', 'maxClients', 'queueTimeoutMs', 'serverIdleTimeoutMs', 'serverLifetimeMs', 'serverConnectTimeoutMs',
      'maxPreparedStatements', 'maxMessageBytes', 'shutdownGraceMs'] as const;
    const changed: Record<string, unknown> = {};
    for (const k of reloadable) {
      if (next[k] !== this.config[k]) {
        changed[k] = next[k];
        (this.config as Record<string, unknown>)[k] = next[k];
      }
    }
    this.log.info({ changed, notes }, 'configuration reloaded');
    for (const p of this.pools()) p.grow();
    return notes;
  }

  // --- connections -------------------------------------------------------------------------

  private accept(socket: net.Socket): void {
    this.sockets.add(socket);
    socket.on('close', () => this.sockets.delete(socket));
    socket.on('error', () => undefined);
    if (this.shuttingDown) {
      socket.end(errorResponse(new PgError('FATAL', SQLSTATE.CANNOT_CONNECT_NOW, 'the database system is shutting down')));
      return;
    }
    const reader = new FrameReader({ untyped: true });
    const timer = setTimeout(() => socket.destroy(), STARTUP_TIMEOUT_MS);
    timer.unref();
    const onData = (chunk: Buffer): void => {
      reader.push(chunk);
      try {
        for (let f = reader.next(); f; f = reader.next()) {
          const m = decodeStartup(f);
          if (m.kind === 'ssl' || m.kind === 'gssenc') {
            // Loopback only: no TLS between the gateway and the pooler.
            socket.write('N');
            continue;
          }
          socket.off('data', onData);
          clearTimeout(timer);
          if (m.kind === 'cancel') {
            this.cancel(m.pid, m.secret);
            socket.end();
            return;
          }
          socket.pause();
          this.startSession(socket, m.params, f.body.readInt32BE(0) & 0xffff, reader.takeRest()).catch((err) => {
            this.log.error({ err }, 'client startup failed');
            this.reject(socket, new PgError('FATAL', SQLSTATE.INTERNAL_ERROR, String(err)));
          });
          return;
        }
      } catch (err) {
        clearTimeout(timer);
        socket.off('data', onData);
        this.countError('client_startup');
        if (err instanceof InvalidStartupLength) {
          this.log.info({ length: err.length }, err.message);
          socket.destroy();
          return;
        }
        this.reject(socket, err instanceof PgError ? err : new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, String(err)));
      }
    };
    socket.on('data', onData);
  }

  private reject(socket: net.Socket, err: PgError): void {
    const e = err.severity === 'FATAL' ? err : new PgError('FATAL', err.code, err.message, err.detail, err.hint);
    socket.end(errorResponse(e));
  }

  /** A cancel key may belong to a client of another worker: the connection it came on landed wherever the kernel put it. */
  private cancel(pid: number, secret: number): void {
    if (this.cancelLocal(pid, secret)) return;
    void this.workers.ask('cancel', { pid, secret });
  }

  private cancelLocal(pid: number, secret: number): boolean {
    const c = this.clientMap.get(pid);
    if (!c || c.secret !== secret) return false;
    this.log.debug({ client: pid }, 'cancel request');
    c.cancel();
    return true;
  }

  private async startSession(socket: net.Socket, params: Record<string, string>, minor: number, rest: Buffer): Promise<void> {
    const user = params.user;
    const database = params.database || user;
    if (this.shuttingDown) return this.reject(socket, new PgError('FATAL', SQLSTATE.CANNOT_CONNECT_NOW, 'the database system is shutting down'));
    const unsupported = Object.keys(params).filter((k) => k.startsWith('_pq_.'));
    const preamble = minor > 0 || unsupported.length > 0 ? [negotiateProtocolVersion(0, unsupported)] : [];
    if (database === 'pgbouncer') {
      const admin = new AdminSession(socket, this, () => this.admins.delete(admin));
      this.admins.add(admin);
      socket.write(Buffer.concat([
        ...preamble, authenticationOk(),
        ...[['server_version', '15.0 (MultiPooler)'], ['client_encoding', 'UTF8'], ['server_encoding', 'UTF8'], ['DateStyle', 'ISO, MDY'],
          ['TimeZone', 'UTC'], ['integer_datetimes', 'on'], ['standard_conforming_strings', 'on'], ['application_name', params.application_name ?? ''],
          ['is_superuser', 'on'], ['session_authorization', user], ['IntervalStyle', 'postgres']].map(([k, v]) => parameterStatus(k, v)),
        backendKeyData(0, 0), readyForQueryIdle(),
      ]));
      socket.resume();
      admin.feed(rest);
      return;
    }
    if (params.replication && !['false', 'off', 'no', '0'].includes(params.replication.toLowerCase())) {
      return this.reject(socket, new PgError('FATAL', SQLSTATE.FEATURE_NOT_SUPPORTED, 'replication connections are not supported through the pooler'));
    }
    if (this.clientMap.size >= this.config.maxClients) {
      this.countError('max_clients');
      return this.reject(socket, new PgError('FATAL', SQLSTATE.TOO_MANY_CONNECTIONS, 'sorry, too many clients already'));
    }
    let gucs: Map<string, string>;
    try {
      gucs = startupSettings(params);
    } catch (err) {
      return this.reject(socket, err as PgError);
    }
    const syncCommit = gucs.get('synchronous_commit');
    if (syncCommit !== undefined && weakensDurability('synchronous_commit', syncCommit)) {
      return this.reject(socket, new PgError('FATAL', SQLSTATE.INSUFFICIENT_PRIVILEGE, 'permission denied to set parameter "synchronous_commit"', DURABILITY_DETAIL));
    }
    const startup = settingsFromStartup(gucs);
    let fromGateway: GatewayState | undefined;
    try {
      const state = params[SESSION_STATE_PARAM];
      if (state !== undefined) fromGateway = { carried: state === '' ? undefined : decodeSessionState(state) };
    } catch (err) {
      return this.reject(socket, err as PgError);
    }
    const pool = this.pool(user, database);
    pool.clients++;
    let reported: Map<string, string>;
    try {
      const cached = pool.startupCache.get(startup.fp);
      reported = cached ? cached.params : await this.learnStartupParams(pool, startup, socket);
    } catch (err) {
      pool.clients--;
      return this.reject(socket, err instanceof PgError ? err : new PgError('FATAL', SQLSTATE.CONNECTION_FAILURE, String(err)));
    }
    pool.clients--;
    if (socket.destroyed) return;
    let pid = randomInt(1, 0x7fffffff);
    while (this.clientMap.has(pid)) pid = randomInt(1, 0x7fffffff);
    const secret = randomInt(-0x80000000, 0x7fffffff);
    const c = new ClientSession(socket, pid, secret, user, database, pool, startup, fromGateway, gucs.get('application_name') ?? '', reported, this);
    pool.clients++;
    this.clientMap.set(pid, c);
    const frames = [...preamble, authenticationOk()];
    for (const [k, v] of reported) frames.push(parameterStatus(k, v));
    frames.push(backendKeyData(pid, secret), readyForQueryIdle());
    socket.write(Buffer.concat(frames));
    socket.resume();
    c.feed(rest);
    this.log.debug({ client: pid, user, database }, 'client connected');
  }

  /**
   * What Postgres would report to a client with these startup settings, learnt
   * by applying them on a server connection once (which also validates them:
   * a bad value fails the startup with Postgres's own error).
   */
  private learnStartupParams(pool: Pool, startup: Settings, socket: net.Socket): Promise<Map<string, string>> {
    return new Promise((resolve, reject) => {
      const key = {};
      const onClose = () => pool.cancelWait(key);
      socket.once('close', onClose);
      const go = (s: ServerConn) => {
        socket.off('close', onClose);
        const delta = settingsDelta(s.applied, startup);
        (delta ? s.runInternal([delta]) : Promise.resolve({ rows: [], error: undefined })).then((r) => {
          if (r.error) {
            s.applied = null;
            pool.release(s);
            reject(new PgError('FATAL', r.error.code, r.error.message, r.error.detail, r.error.hint));
            return;
          }
          s.applied = startup;
          const params = new Map(s.params);
          pool.release(s);
          pool.cacheStartup(startup.fp, params);
          resolve(params);
        }, reject);
      };
      const s = pool.acquire(key, startup.fp, (err, srv) => {
        if (err || !srv) {
          socket.off('close', onClose);
          reject(err ?? new PgError('FATAL', SQLSTATE.INTERNAL_ERROR, 'no server connection'));
        } else go(srv);
      });
      if (s) go(s);
    });
  }

  private pool(user: string, database: string): Pool {
    const key = poolKey(user, database);
    let p = this.poolMap.get(key);
    if (!p) {
      p = new Pool(user, database, this);
      this.poolMap.set(key, p);
    }
    return p;
  }

  private reap(): void {
    const now = Date.now();
    for (const [key, p] of this.poolMap) {
      p.reap(now);
      if (p.empty && now - p.lastActivity > POOL_IDLE_DROP_MS) this.poolMap.delete(key);
    }
  }

  private snapshot(): PoolerSnapshot {
    const clients = { active: 0, waiting: 0, idle: 0, pinned: 0 };
    for (const c of this.clientMap.values()) {
      clients[c.stateLabel as 'active' | 'waiting' | 'idle']++;
      if (c.pins.size > 0) clients.pinned++;
    }
    const servers = { active: 0, idle: 0, resetting: 0, connecting: 0 };
    for (const p of this.poolMap.values()) {
      servers.connecting += p.connecting;
      for (const s of p.servers) if (s.state !== 'closed') servers[s.state]++;
    }
    let notifications = 0;
    for (const l of this.listeners.values()) notifications += l.delivered;
    const { queries, xacts, errors, serverConnects, giveBacks } = this.counters;
    return { clients, servers, queries, xacts, errors, notifications, serverConnects, giveBacks };
  }

  async shutdown(): Promise<void> {
    if (this.shuttingDown) return;
    this.shuttingDown = true;
    this.log.info({ clients: this.clientMap.size }, 'pooler shutting down');
    this.server.close();
    clearInterval(this.reaper);
    const bye = () => new PgError('FATAL', SQLSTATE.ADMIN_SHUTDOWN, 'terminating connection due to administrator command');
    const deadline = Date.now() + this.config.shutdownGraceMs;
    for (;;) {
      for (const c of this.clients()) if (!c.server && !c.waiting) c.fatal(bye());
      if (this.clientMap.size === 0 || Date.now() >= deadline) break;
      await new Promise((r) => setTimeout(r, 20));
    }
    for (const c of this.clients()) c.fatal(bye());
    for (const p of this.poolMap.values()) p.closeAll();
    for (const l of this.listeners.values()) l.close();
    // Let the goodbyes reach the clients before anything is cut.
    const open = [...this.sockets].filter((s) => !s.destroyed);
    for (const s of open) s.end();
    await Promise.race([
      Promise.all(open.map((s) => new Promise((r) => (s.closed ? r(null) : s.once('close', r))))),
      new Promise((r) => setTimeout(r, 1000)),
    ]);
    for (const s of this.sockets) s.destroy();
    this.unregister();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

const readyForQueryIdle = () => readyForQuery('I');
