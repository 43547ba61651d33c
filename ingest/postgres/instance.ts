// Lifecycle of one Postgres 15 instance on this machine: initdb or clone, node-local
// config, start/stop, health probe. One ingest agent drives one instance.
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import { isIPv6 } from 'node:net';
import path from 'node:path';
import pg from 'pg';
import type { Logger } from '../../common/log.ts';
import { queryAt, withConnection } from '../../common/postgres.ts';
import { slotNameOf } from '../../schemas/consensus.ts';
import { parseLsn } from './lsn.ts';

export interface PostgresInstanceOptions {
  name: string;
  dataDir: string;
  port: number;
  /** The address Postgres listens on and registers: 127.0.0.1 locally, the pod's address in a pod. */
  host?: string;
  /** Defaults to `pg_config --bindir` of the Debian postgresql-15 package. */
  binDir?: string;
  log: Logger;
  /** postgresql.conf overrides, written last into mg.conf. */
  settings?: Record<string, string>;
}

/** How a standby got its data (reported in REPOINT's answer, so MultiOrch and `mg replica add` can say). */
export type ReplicaSource = 'restored from the latest backup' | 'cloned with pg_basebackup';

export interface Upstream {
  host: string;
  port: number;
}

export interface Probe {
  inRecovery: boolean;
  /** Primary only: pg_current_wal_lsn(). */
  currentLsn: bigint | null;
  /** Primary: pg_current_wal_flush_lsn(); replica: pg_last_wal_receive_lsn(). */
  flushLsn: bigint | null;
  /** Replica only: pg_last_wal_replay_lsn(). */
  replayLsn: bigint | null;
  /** Replica only: received but not yet replayed. */
  replayLagBytes: bigint | null;
  /** Replica only: age of the last replayed commit, 0 when everything received is replayed. */
  replayLagSeconds: number | null;
  /** Client backends, not counting the probe itself. */
  connections: number;
  maxConnections: number;
  /** 'host:port' the WAL receiver streams from. */
  upstream: string | null;
  walReceiverStatus: string | null;
  serverVersion: string;
}

const DEBIAN_BIN_DIR = '/usr/lib/postgresql/15/bin';
const START_STOP_TIMEOUT_S = '60';
const STALE_SHMEM_WAIT_MS = 10_000;

/**
 * Trust on the Unix socket and loopback, as locally. At another address (a pod's), that address is
 * trusted too (the pod's own containers, its pooler and agent, connect from it) and every other
 * one needs the login password (SCRAM): other pods' agents cloning, streaming, rewinding, the
 * orchestrators (decision 0076).
 */
function hba(host: string): string {
  const loopback = `# Written by the ingest agent (mg); rewritten on every config write.
local all         all                trust
host  all         all  127.0.0.1/32  trust
local replication all                trust
host  replication all  127.0.0.1/32  trust
`;
  if (host === '127.0.0.1') return loopback;
  const own = `${host}/${isIPv6(host) ? 128 : 32}`;
  return `${loopback}host  all         all  ${own}  trust
host  replication all  ${own}  trust
host  all         all  all  scram-sha-256
host  replication all  all  scram-sha-256
`;
}
const INCLUDE_LINE = "include_if_exists = 'mg.conf'";

// One statement, so the answer is a consistent snapshot; recovery state is read once
// because pg_current_wal_lsn() raises an error on a standby.
const PROBE_SQL = `
WITH r AS (SELECT pg_is_in_recovery() AS rec)
SELECT r.rec AS in_recovery,
  (CASE WHEN r.rec THEN NULL ELSE pg_current_wal_lsn() END)::text AS current_lsn,
  (CASE WHEN r.rec THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_flush_lsn() END)::text AS flush_lsn,
  (CASE WHEN r.rec THEN pg_last_wal_replay_lsn() END)::text AS replay_lsn,
  extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS replay_age,
  (SELECT count(*)::int FROM pg_stat_activity
    WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()) AS connections,
  current_setting('max_connections')::int AS max_connections,
  (SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver) AS upstream,
  (SELECT status FROM pg_stat_wal_receiver) AS wal_receiver_status,
  current_setting('server_version') AS server_version
FROM r`;

interface ProbeRow {
  in_recovery: boolean;
  current_lsn: string | null;
  flush_lsn: string | null;
  replay_lsn: string | null;
  replay_age: number | null;
  connections: number;
  max_connections: number;
  upstream: string | null;
  wal_receiver_status: string | null;
  server_version: string;
}

interface OsUser {
  uid?: number;
  gid?: number;
  home?: string;
}

let defaultBinDir: string | undefined;
function findBinDir(): string {
  defaultBinDir ??= execFileSync(path.join(DEBIAN_BIN_DIR, 'pg_config'), ['--bindir'], { encoding: 'utf8' }).trim();
  return defaultBinDir;
}

// Postgres refuses to run as root; as root we run its tools as the `postgres` user.
let osUser: OsUser | undefined;
function postgresOsUser(): OsUser {
  if (osUser) return osUser;
  if (process.getuid?.() !== 0) return (osUser = {});
  const fields = execFileSync('getent', ['passwd', 'postgres'], { encoding: 'utf8' }).trim().split(':');
  return (osUser = { uid: Number(fields[2]), gid: Number(fields[3]), home: fields[5] });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class PostgresInstance {
  readonly name: string;
  readonly dataDir: string;
  readonly port: number;
  readonly host: string;
  /** Physical slot this instance streams from on its upstream. */
  readonly slotName: string;
  private readonly binDir: string;
  private readonly log: Logger;
  private readonly settings: Record<string, string>;
  /** The Unix socket directory. */
  readonly runDir: string;
  private readonly logFile: string;

  constructor(opts: PostgresInstanceOptions) {
    this.name = opts.name;
    this.dataDir = path.resolve(opts.dataDir);
    this.port = opts.port;
    this.host = opts.host ?? '127.0.0.1';
    this.binDir = opts.binDir ?? findBinDir();
    this.log = opts.log.child({ instance: opts.name, port: opts.port });
    this.settings = opts.settings ?? {};
    this.slotName = slotNameOf(opts.name);
    this.runDir = path.join(path.dirname(this.dataDir), 'run');
    this.logFile = path.join(path.dirname(this.dataDir), `${opts.name}.log`);
  }

  isInitialized(): boolean {
    return fs.existsSync(path.join(this.dataDir, 'PG_VERSION'));
  }

  /** Creates the (empty) data directory and what lives beside it, for initdb, a clone or a restore. */
  prepareEmpty(): void {
    this.assertEmpty();
    this.prepareDirs();
  }

  async initPrimary(): Promise<void> {
    this.prepareEmpty();
    await this.run('initdb', [
      '-D', this.dataDir, '-A', 'trust', '--username=postgres', '--encoding=UTF8', '--locale=C.UTF-8',
    ]);
    this.writeConfig();
    this.log.info('initialized primary');
  }

  /**
   * Makes this empty data directory a standby of `upstream`: through
   * `restore` when given and it succeeds (e.g. from a backup plus archived WAL,
   * which spares the primary the copy), else with pg_basebackup from the upstream.
   */
  async initReplica(upstream: Upstream, restore?: () => Promise<boolean>): Promise<ReplicaSource> {
    this.prepareEmpty();
    await this.dropStaleSlot(upstream);
    if (restore && (await restore())) {
      // The slot keeps the upstream's WAL from now on; what the backup lacks before that comes from the archive.
      await queryAt(upstream, 'SELECT pg_create_physical_replication_slot($1, true)', [this.slotName]);
      this.configureStandby(upstream);
      this.writeConfig();
      this.log.info({ upstream }, 'initialized replica from a restore');
      return 'restored from the latest backup';
    }
    // -R writes standby.signal plus primary_conninfo/primary_slot_name; -c fast avoids
    // waiting for a spread checkpoint; -w never prompts for a password.
    await this.run('pg_basebackup', [
      '-h', upstream.host, '-p', String(upstream.port), '-U', 'postgres', '-w', '-D', this.dataDir,
      '-X', 'stream', '-R', '-c', 'fast', '-C', '-S', this.slotName,
    ]);
    this.writeConfig();
    this.log.info({ upstream }, 'initialized replica');
    return 'cloned with pg_basebackup';
  }

  /** Node-local settings; the clone copied the upstream's, so always rewrite after a clone or rewind. */
  writeConfig(): void {
    if (!this.isInitialized()) throw new Error(`${this.dataDir} is not an initialized data directory`);
    const settings: Record<string, string> = {
      port: String(this.port),
      listen_addresses: this.host,
      unix_socket_directories: this.runDir,
      // Also the walreceiver's application_name, so pg_stat_replication names this node.
      cluster_name: this.name,
      wal_level: 'logical',
      max_wal_senders: '20',
      max_replication_slots: '20',
      max_prepared_transactions: '50',
      wal_log_hints: 'on', // pg_rewind needs it (no data checksums)
      wal_keep_size: '512MB', // replicas cloned concurrently (or briefly disconnected) still find their WAL
      hot_standby: 'on',
      hot_standby_feedback: 'on',
      // A replica pointed at a new primary retries its connection this often (default 5 s, too slow for failover).
      wal_retrieve_retry_interval: '100ms',
      shared_buffers: '32MB',
      max_connections: '200',
      logging_collector: 'off', // pg_ctl -l captures the server log
      ...this.settings,
    };
    const lines = Object.entries(settings).map(([k, v]) => `${k} = ${confValue(k, v)}`);
    this.writeOwned('mg.conf', `# Written by the ingest agent (mg); node-local, rewritten on every config write.\n${lines.join('\n')}\n`);
    this.writeOwned('pg_hba.conf', hba(this.host));
    const main = path.join(this.dataDir, 'postgresql.conf');
    if (!fs.readFileSync(main, 'utf8').split('\n').includes(INCLUDE_LINE)) {
      fs.appendFileSync(main, `\n${INCLUDE_LINE}\n`);
    }
  }

  /** Starts the server and waits (up to timeoutS) until it accepts connections (a standby: once consistent). */
  async start(timeoutS = Number(START_STOP_TIMEOUT_S)): Promise<void> {
    if (this.isRunning()) return;
    await this.removeStaleLockFiles();
    this.prepareDirs();
    // detached: the server must outlive the agent and not share its process group.
    await this.run('pg_ctl', ['start', '-W', '-D', this.dataDir, '-l', this.logFile], true);
    // pg_ctl's own wait polls every 100 ms, a visible part of a wake from zero: watch the pid file's status line instead.
    const started = Date.now();
    for (;;) {
      const status = this.pidFileLines()?.[7]?.trim();
      if (status === 'ready' || status === 'standby') break;
      const gone = status === undefined ? Date.now() - started > 5_000 : !this.isRunning();
      if (gone) throw new Error(`${this.name} did not start; see ${this.logFile}`);
      if (Date.now() - started > timeoutS * 1_000) throw new Error(`timed out after ${timeoutS} s waiting for ${this.name} to start`);
      await sleep(10);
    }
    this.log.info({ pid: this.postmasterPid(), ms: Date.now() - started }, 'started');
  }

  async stop(mode: 'fast' | 'immediate' = 'fast'): Promise<void> {
    if (!this.isRunning()) return;
    // pg_ctl's own wait polls every 100 ms, a visible part of a switchover: signal, then watch the pid file (removed last).
    await this.run('pg_ctl', ['stop', '-W', '-m', mode, '-D', this.dataDir]);
    await this.pollUntil(`${this.name} to stop`, async () => this.pidFileLines() === undefined || !this.isRunning());
    this.log.info({ mode }, 'stopped');
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.start();
  }

  async promote(): Promise<void> {
    // As for stop: signal, then poll more often than pg_ctl would.
    await this.run('pg_ctl', ['promote', '-W', '-D', this.dataDir]);
    await this.watch(`${this.name} to leave recovery`, 'SELECT pg_is_in_recovery() AS rec', [], (rows) => !rows[0].rec, Number(START_STOP_TIMEOUT_S) * 1_000);
    this.log.info('promoted');
  }

  /**
   * Runs `sql` every `intervalMs` on one connection until `done` holds for
   * its rows (resolving with them), or throws after timeoutMs. For the short
   * waits inside an election: polling often is cheap on one connection, not
   * with a new backend each time.
   */
  async watch<T extends pg.QueryResultRow>(what: string, sql: string, params: unknown[], done: (rows: T[]) => boolean, timeoutMs: number, intervalMs = 10): Promise<T[]> {
    return withConnection({ host: this.host, port: this.port }, async (c) => {
      for (;;) {
        const { rows } = await c.query<T>(sql, params);
        if (done(rows)) return rows;
        await sleep(intervalMs);
      }
    }, timeoutMs).catch((err: Error) => {
      throw new Error(`waiting for ${what}: ${err.message}`);
    });
  }

  /** Polls `done` every 10 ms (errors count as not yet) until it holds; throws after the start/stop timeout. */
  private async pollUntil(what: string, done: () => Promise<boolean>): Promise<void> {
    const deadline = Date.now() + Number(START_STOP_TIMEOUT_S) * 1_000;
    while (!(await done().catch(() => false))) {
      if (Date.now() > deadline) throw new Error(`timed out after ${START_STOP_TIMEOUT_S} s waiting for ${what}`);
      await sleep(10);
    }
  }

  /** Re-reads the configuration files (pg_ctl reload). */
  async reload(): Promise<void> {
    await this.run('pg_ctl', ['reload', '-D', this.dataDir]);
  }

  /** Sends a signal to the postmaster without waiting; a frozen (SIGSTOPped) server acts on it once continued. */
  signal(sig: NodeJS.Signals): boolean {
    const pid = this.postmasterPid();
    if (pid === undefined) return false;
    process.kill(pid, sig);
    return true;
  }

  /** Whether the postmaster is stopped by a signal (SIGSTOP): it answers nothing until continued. */
  isFrozen(): boolean {
    const pid = this.postmasterPid();
    if (pid === undefined) return false;
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      return stat.slice(stat.lastIndexOf(')') + 2).startsWith('T');
    } catch {
      return false;
    }
  }

  /** Whether the data directory starts as a standby (standby.signal). */
  isStandby(): boolean {
    return fs.existsSync(path.join(this.dataDir, 'standby.signal'));
  }

  /**
   * Makes the data directory a standby of `upstream` (through its physical slot
   * `slotName`), or a standby that streams from nobody when upstream is null.
   * primary_conninfo lives in postgresql.auto.conf (pg_basebackup -R puts it
   * there, and that file is read last), so the lines are replaced there. A
   * running server picks the change up on reload.
   */
  configureStandby(upstream: Upstream | null): void {
    const auto = path.join(this.dataDir, 'postgresql.auto.conf');
    const kept = (readLines(auto) ?? []).filter((l) => !/^\s*(primary_conninfo|primary_slot_name)\s*=/.test(l) && l.trim() !== '');
    if (upstream) {
      const conninfo = `host=${upstream.host} port=${upstream.port} user=postgres application_name=${this.name}`;
      kept.push(`primary_conninfo = ${confValue('primary_conninfo', conninfo)}`, `primary_slot_name = ${confValue('primary_slot_name', this.slotName)}`);
    } else {
      kept.push("primary_conninfo = ''", "primary_slot_name = ''");
    }
    this.writeOwned('postgresql.auto.conf', `${kept.join('\n')}\n`);
    this.writeOwned('standby.signal', '');
  }

  /**
   * pg_rewind from `source` (a running primary): makes this stopped data
   * directory follow the source's timeline again. It copies the source's
   * configuration, so the caller rewrites node-local config afterwards.
   */
  async rewind(source: Upstream): Promise<void> {
    // pg_rewind first completes a crash recovery in single-user mode, which refuses standby mode.
    fs.rmSync(path.join(this.dataDir, 'standby.signal'), { force: true });
    await this.run('pg_rewind', ['-D', this.dataDir, '--source-server', `host=${source.host} port=${source.port} user=postgres dbname=postgres`]);
    this.log.info({ source }, 'rewound');
  }

  /** Throws the data directory away and clones it again (see initReplica) (when rewinding is impossible). */
  async rebuild(upstream: Upstream, restore?: () => Promise<boolean>): Promise<ReplicaSource> {
    if (this.isRunning()) throw new Error('cannot rebuild a running instance');
    fs.rmSync(this.dataDir, { recursive: true, force: true });
    return this.initReplica(upstream, restore);
  }

  /** One statement on this instance's `postgres` database, with a client-side timeout. */
  async query<T extends pg.QueryResultRow>(sql: string, params: unknown[] = [], timeoutMs = 5_000): Promise<T[]> {
    return queryAt<T>({ host: this.host, port: this.port }, sql, params, timeoutMs);
  }

  isRunning(): boolean {
    return this.postmasterPid() !== undefined;
  }

  /** The pid in postmaster.pid, only while that process is a live postgres serving this data dir. */
  postmasterPid(): number | undefined {
    const pid = this.pidFileLines()?.[0];
    if (!pid || !/^\d+$/.test(pid)) return undefined;
    return isPostmasterOf(Number(pid), this.dataDir) ? Number(pid) : undefined;
  }

  /** null when the server is down, refuses, errors, or does not answer within timeoutMs (e.g. SIGSTOPped). */
  async probe(timeoutMs: number): Promise<Probe | null> {
    const client = new pg.Client({
      host: this.host, port: this.port, user: 'postgres', database: 'postgres',
      application_name: 'mg-probe',
      // Server-side limit too, so a slow probe does not leave a backend working after we gave up.
      statement_timeout: timeoutMs,
    });
    // A connection dying outside a query is emitted as 'error'; the probe result already covers it.
    client.on('error', () => {});
    const attempt = (async () => {
      await client.connect();
      const { rows } = await client.query<ProbeRow>(PROBE_SQL);
      await client.end();
      return toProbe(rows[0]);
    })().catch((err: unknown) => {
      this.log.debug({ err }, 'probe failed');
      return null;
    });
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<null>((resolve) => {
      timer = setTimeout(() => resolve(null), timeoutMs);
    });
    try {
      return await Promise.race([attempt, timeout]);
    } finally {
      clearTimeout(timer);
      // A hung server never answers Terminate, so end() alone could wait forever.
      client.connection.stream.destroy();
    }
  }

  private assertEmpty(): void {
    if (fs.existsSync(this.dataDir) && fs.readdirSync(this.dataDir).length > 0) {
      throw new Error(`${this.dataDir} is not empty`);
    }
  }

  /** Data dir 0700, plus the socket dir and log file beside it, all owned by the server's OS user. */
  private prepareDirs(): void {
    fs.mkdirSync(path.dirname(this.dataDir), { recursive: true, mode: 0o755 });
    fs.mkdirSync(this.dataDir, { recursive: true });
    fs.chmodSync(this.dataDir, 0o700);
    this.chown(this.dataDir);
    fs.mkdirSync(this.runDir, { recursive: true, mode: 0o755 });
    this.chown(this.runDir);
    fs.closeSync(fs.openSync(this.logFile, 'a', 0o600));
    this.chown(this.logFile);
  }

  private chown(p: string): void {
    chownToPostgres(p);
  }

  /** Write-then-rename, so a crash never leaves a half-written config file. */
  private writeOwned(file: string, text: string): void {
    const target = path.join(this.dataDir, file);
    const tmp = `${target}.tmp`;
    fs.writeFileSync(tmp, text, { mode: 0o600 });
    this.chown(tmp);
    fs.renameSync(tmp, target);
  }

  private pidFileLines(): string[] | undefined {
    return readLines(path.join(this.dataDir, 'postmaster.pid'));
  }

  /**
   * After kill -9 the lock files stay, and their pid may be reused or a zombie (a
   * container's pid 1 may not reap), so Postgres's own kill(pid, 0) check refuses to
   * start. Removing postmaster.pid is safe only once no process of the old server
   * still holds its shared memory, so wait for that first. Call only when not running.
   */
  private async removeStaleLockFiles(): Promise<void> {
    const lines = this.pidFileLines();
    if (lines) {
      // Line 7: "<shmem key> <shmem id>".
      const shmid = lines[6]?.trim().split(/\s+/)[1];
      const deadline = Date.now() + STALE_SHMEM_WAIT_MS;
      while (shmid && shmAttachCount(shmid) > 0) {
        if (Date.now() > deadline) {
          throw new Error(`processes of the previous server of ${this.dataDir} still hold shared memory id ${shmid}`);
        }
        await sleep(50);
      }
      fs.rmSync(path.join(this.dataDir, 'postmaster.pid'), { force: true });
      this.log.warn({ stalePid: lines[0] }, 'removed stale postmaster.pid');
    }
    // Same format (pid, data dir); only ours if that server is gone.
    const socketLock = path.join(this.runDir, `.s.PGSQL.${this.port}.lock`);
    const sock = readLines(socketLock);
    if (sock && !isPostmasterOf(Number(sock[0]), sock[1] ?? '')) fs.rmSync(socketLock, { force: true });
  }

  /** A clone must start from a fresh slot; an active one means another node already uses this name. */
  private async dropStaleSlot(upstream: Upstream): Promise<void> {
    const client = new pg.Client({
      host: upstream.host, port: upstream.port, user: 'postgres', database: 'postgres',
      connectionTimeoutMillis: 10_000, query_timeout: 10_000,
    });
    client.on('error', () => {});
    await client.connect();
    try {
      const { rows } = await client.query<{ slot_type: string; active: boolean }>(
        'SELECT slot_type, active FROM pg_replication_slots WHERE slot_name = $1', [this.slotName]);
      const slot = rows[0];
      if (!slot) return;
      if (slot.slot_type !== 'physical' || slot.active) {
        throw new Error(`upstream slot ${this.slotName} is ${slot.active ? 'in use' : slot.slot_type}; refusing to replace it`);
      }
      await client.query('SELECT pg_drop_replication_slot($1)', [this.slotName]);
      this.log.info({ slot: this.slotName }, 'dropped stale replication slot on upstream');
    } finally {
      await client.end();
    }
  }

  private async run(tool: string, args: string[], detached = false): Promise<void> {
    const started = Date.now();
    this.log.debug({ tool, args }, 'running');
    await runAsPostgres(path.join(this.binDir, tool), args, { cwd: path.dirname(this.dataDir), detached });
    this.log.debug({ tool, ms: Date.now() - started }, 'finished');
  }
}

/**
 * Runs a Postgres tool (or pgBackRest) as the server's OS user and resolves
 * with its stdout; a failure's error carries the tail of its output.
 */
export function runAsPostgres(file: string, args: string[], opts: { cwd: string; detached?: boolean }): Promise<string> {
  const { uid, gid, home } = postgresOsUser();
  // Inherited PG* variables (PGPORT, PGDATA, ...) would silently change what the tools do.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('PG')));
  if (home) env.HOME = home;
  const tool = path.basename(file);
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, {
      uid, gid, env, detached: opts.detached ?? false,
      cwd: opts.cwd, // the server's user may not be able to enter ours
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let output = '';
    child.stdout.on('data', (d: Buffer) => {
      stdout += d;
      output += d;
    });
    child.stderr.on('data', (d: Buffer) => (output += d));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (code === 0) resolve(stdout);
      else reject(new Error(`${tool} failed (${signal ?? `exit ${code}`}): ${output.trim().slice(-2000)}`));
    });
  });
}

/** Makes a file or directory the server's OS user's (as root, the tools run as `postgres`). */
export function chownToPostgres(p: string): void {
  const { uid, gid } = postgresOsUser();
  if (uid !== undefined && gid !== undefined) fs.chownSync(p, uid, gid);
}

function toProbe(row: ProbeRow): Probe {
  const lsn = (text: string | null) => (text === null ? null : parseLsn(text));
  const flushLsn = lsn(row.flush_lsn);
  const replayLsn = lsn(row.replay_lsn);
  // After a restart the receive position can start behind what was already replayed.
  const caughtUp = flushLsn !== null && replayLsn !== null && replayLsn >= flushLsn;
  return {
    inRecovery: row.in_recovery,
    currentLsn: lsn(row.current_lsn),
    flushLsn,
    replayLsn,
    replayLagBytes: !row.in_recovery || flushLsn === null || replayLsn === null ? null : caughtUp ? 0n : flushLsn - replayLsn,
    replayLagSeconds: !row.in_recovery ? null : caughtUp ? 0 : row.replay_age,
    connections: row.connections,
    maxConnections: row.max_connections,
    upstream: row.upstream,
    walReceiverStatus: row.wal_receiver_status,
    serverVersion: row.server_version,
  };
}

function confValue(key: string, value: string): string {
  // Keys and values end up in a config file: no way to smuggle in another line.
  if (!/^[A-Za-z_][A-Za-z0-9_.]*$/.test(key)) throw new Error(`invalid setting name: ${JSON.stringify(key)}`);
  if (/[\r\n\0]/.test(value)) throw new Error(`invalid value for ${key}: contains a line break`);
  return `'${value.replace(/\\/g, '\\\\').replace(/'/g, "''")}'`;
}

/** Linux /proc: alive (not a zombie), named postgres, and working in this data dir (the postmaster chdirs there). */
function isPostmasterOf(pid: number, dataDir: string): boolean {
  try {
    return (
      fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'postgres' &&
      fs.readlinkSync(`/proc/${pid}/cwd`) === fs.realpathSync(dataDir)
    );
  } catch {
    return false;
  }
}

function readLines(file: string): string[] | undefined {
  try {
    return fs.readFileSync(file, 'utf8').split('\n');
  } catch {
    return undefined;
  }
}

/** nattch of a SysV shared memory segment; 0 when it no longer exists. */
function shmAttachCount(shmid: string): number {
  for (const line of fs.readFileSync('/proc/sysvipc/shm', 'utf8').split('\n').slice(1)) {
    const cols = line.trim().split(/\s+/);
    if (cols[1] === shmid) return Number(cols[6]);
  }
  return 0;
}
