/**
 * The PgBouncer-style admin console: connect to database `pgbouncer` and ask
 * SHOW POOLS / CLIENTS / SERVERS / STATS / CONFIG / DATABASES / LISTS / VERSION,
 * or PAUSE, RESUME, RELOAD. Simple query protocol only, like PgBouncer's.
 */
import type net from 'node:net';
import { PgError, SQLSTATE } from '../protocol/errors.ts';
import { message, MessageScanner, type MessageSink } from '../protocol/frames.ts';
import type { ClientSession } from './client.ts';
import type { PoolerConfig } from './config.ts';
import type { Pool } from './pool.ts';
import { type Column, commandComplete, errorResponse, readyForQuery, rowDescription, T } from '../protocol/messages.ts';
import { OutBatch } from '../protocol/output.ts';

/** One worker's pooler; pause, resume, reload and showEverywhere reach all of its workers. */
export interface AdminHost {
  readonly config: PoolerConfig;
  readonly startedAt: number;
  readonly version: string;
  pools(): Pool[];
  clients(): ClientSession[];
  pause(database?: string): Promise<void>;
  resume(database?: string): Promise<void>;
  reload(): Promise<string[]>;
  adminSessions(): number;
  /** localRows(what) of every worker, one list per worker. */
  showEverywhere(what: string): Promise<Cell[][][]>;
}

export type Cell = string | number | null;

const TEXT = 25;
const INT8 = 20;

const HELP = 'SHOW POOLS|CLIENTS|SERVERS|STATS|CONFIG|DATABASES|LISTS|VERSION|HELP, PAUSE [db], RESUME [db], RELOAD';

export class AdminSession implements MessageSink {
  private readonly scanner = new MessageScanner(1024 * 1024);
  private readonly out = new OutBatch();
  private skipTillSync = false;
  private busy: Promise<void> = Promise.resolve();
  private closed = false;

  constructor(private readonly socket: net.Socket, private readonly host: AdminHost, private readonly onClose: () => void) {
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', () => undefined);
    socket.on('close', () => this.finish());
  }

  feed(rest: Buffer): void {
    if (rest.length) this.onData(rest);
  }

  private onData(chunk: Buffer): void {
    try {
      this.scanner.push(chunk, this);
    } catch (err) {
      this.fail(err instanceof PgError ? err : new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, String(err)));
    }
  }

  onMessage(buf: Buffer, start: number, len: number): void {
    const type = buf[start];
    const body = Buffer.from(buf.subarray(start + 5, start + len));
    // Commands run one after another (PAUSE waits), answers stay in order.
    this.busy = this.busy.then(() => this.handle(type, body)).catch((err) => {
      this.write(errorResponse(err instanceof PgError ? err : new PgError('ERROR', SQLSTATE.INTERNAL_ERROR, String(err))));
      this.write(readyForQuery('I'));
    });
  }

  private async handle(type: number, body: Buffer): Promise<void> {
    if (this.closed) return;
    if (type === T.Terminate) {
      this.socket.end();
      return;
    }
    if (type === T.Sync) {
      this.skipTillSync = false;
      this.write(readyForQuery('I'));
      return;
    }
    if (type === T.Query) {
      const nul = body.indexOf(0);
      const sql = body.toString('utf8', 0, nul < 0 ? body.length : nul);
      const cmds = sql.split(';').map((s) => s.trim()).filter(Boolean);
      if (cmds.length === 0) this.write(message('I'));
      for (const cmd of cmds) {
        try {
          await this.command(cmd);
        } catch (err) {
          this.write(errorResponse(err instanceof PgError ? err : new PgError('ERROR', SQLSTATE.INTERNAL_ERROR, String(err))));
          break;
        }
      }
      this.write(readyForQuery('I'));
      return;
    }
    if (type === T.Flush || type === T.CopyData || type === T.CopyDone || type === T.CopyFail) return;
    if ([T.Parse, T.Bind, T.Describe, T.Execute, T.Close].includes(type as 0x50)) {
      if (!this.skipTillSync) {
        this.write(errorResponse(new PgError('ERROR', SQLSTATE.FEATURE_NOT_SUPPORTED, 'the admin console supports only the simple query protocol')));
        this.skipTillSync = true;
      }
      return;
    }
    this.fail(new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, `invalid frontend message type ${type}`));
  }

  private async command(cmd: string): Promise<void> {
    const words = cmd.split(/\s+/);
    const verb = words[0].toUpperCase();
    const arg = words[1];
    if (verb === 'SHOW' && arg && words.length === 2) {
      const what = arg.toUpperCase();
      const show = shows(this.host)[what];
      if (!show) throw new PgError('ERROR', SQLSTATE.FEATURE_NOT_SUPPORTED, `unsupported SHOW ${arg}; supported: ${HELP}`);
      const [cols] = show();
      const rows = mergeWorkers(what, await this.host.showEverywhere(what));
      this.write(rowDescription(cols));
      for (const r of rows) this.write(dataRow(r));
      this.write(commandComplete('SHOW'));
      return;
    }
    if (verb === 'PAUSE' && words.length <= 2) {
      await this.host.pause(arg);
      this.write(commandComplete('PAUSE'));
      return;
    }
    if (verb === 'RESUME' && words.length <= 2) {
      await this.host.resume(arg);
      this.write(commandComplete('RESUME'));
      return;
    }
    if (verb === 'RELOAD' && words.length === 1) {
      const notes = await this.host.reload();
      for (const n of notes) this.write(noticeMessage(n));
      this.write(commandComplete('RELOAD'));
      return;
    }
    throw new PgError('ERROR', SQLSTATE.FEATURE_NOT_SUPPORTED, `invalid admin console command: ${cmd}`, undefined, `Supported: ${HELP}`);
  }

  private write(b: Buffer): void {
    if (this.closed) return;
    this.out.add(b);
    queueMicrotask(() => this.out.writeTo(this.socket));
  }

  private fail(err: PgError): void {
    this.write(errorResponse(err));
    this.out.writeTo(this.socket);
    this.socket.end();
    this.finish();
  }

  private finish(): void {
    if (this.closed) return;
    this.closed = true;
    this.onClose();
  }
}

/** The admin SHOWs as this process sees them: its own pools and clients. */
function shows(h: AdminHost): Record<string, () => [Column[], Cell[][]]> {
  const t = (name: string): Column => ({ name, oid: TEXT });
  const n = (name: string): Column => ({ name, oid: INT8 });
  const ts = (ms: number) => new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
  return {
    POOLS: () => [
      [t('database'), t('user'), n('cl_active'), n('cl_waiting'), n('cl_active_cancel_req'), n('cl_waiting_cancel_req'),
        n('sv_active'), n('sv_active_cancel'), n('sv_being_canceled'), n('sv_idle'), n('sv_used'), n('sv_tested'), n('sv_login'),
        n('maxwait'), n('maxwait_us'), t('pool_mode'), n('cl_pinned')],
      h.pools().map((p) => {
        const clients = h.clients().filter((c) => c.pool === p);
        const waiting = p.waitingCount;
        const maxWait = p.maxWaitMs;
        return [p.database, p.user, clients.length - waiting, waiting, 0, 0, p.activeCount, 0, p.list().filter((s) => s.waitsForCancel).length, p.idleCount,
          p.list().filter((s) => s.state === 'resetting').length, 0, p.connecting, Math.floor(maxWait / 1000), (maxWait % 1000) * 1000,
          'transaction', clients.filter((c) => c.pins.size > 0).length];
      }),
    ],
    CLIENTS: () => [
      [t('type'), t('user'), t('database'), t('state'), t('addr'), n('port'), t('local_addr'), n('local_port'), t('connect_time'),
        t('request_time'), n('wait'), n('wait_us'), n('close_needed'), t('ptr'), t('link'), n('remote_pid'), t('tls'),
        t('application_name'), n('prepared_statements'), t('pinned')],
      h.clients().map((c) => {
        const w = c.waitingSince ? Date.now() - c.waitingSince : 0;
        return ['C', c.user, c.database, c.stateLabel, c.socket.remoteAddress ?? null, c.socket.remotePort ?? null,
          c.socket.localAddress ?? null, c.socket.localPort ?? null, ts(c.connectTime), ts(c.requestTime), Math.floor(w / 1000),
          (w % 1000) * 1000, 0, `c${c.pid}`, c.server ? `s${c.server.id}` : '', c.pid, '', c.applicationName, c.preparedCount,
          [...c.pins].join(',')];
      }),
    ],
    SERVERS: () => [
      [t('type'), t('user'), t('database'), t('state'), t('addr'), n('port'), t('local_addr'), n('local_port'), t('connect_time'),
        t('request_time'), n('wait'), n('wait_us'), n('close_needed'), t('ptr'), t('link'), n('remote_pid'), t('tls'),
        t('application_name'), n('prepared_statements')],
      h.pools().flatMap((p) => p.list().map((s) => [
        'S', p.user, p.database, s.state === 'resetting' ? 'used' : s.state, h.config.postgres.host, h.config.postgres.port,
        s.socket.localAddress ?? null, s.socket.localPort ?? null, ts(s.createdAt), ts(s.lastUsed), 0, 0, s.retire ? 1 : 0,
        `s${s.id}`, s.ownerLabel ? `c${s.ownerLabel}` : '', s.pid, '', s.params.get('application_name') ?? '', s.prepared.size,
      ])),
    ],
    STATS: () => {
      const byDb = new Map<string, Pool['stats']>();
      for (const p of h.pools()) {
        const acc = byDb.get(p.database) ?? { xacts: 0, queries: 0, received: 0, sent: 0, xactTimeUs: 0, queryTimeUs: 0, waitTimeUs: 0, waits: 0 };
        for (const k of Object.keys(acc) as Array<keyof Pool['stats']>) acc[k] += p.stats[k];
        byDb.set(p.database, acc);
      }
      const up = Math.max(1, (Date.now() - h.startedAt) / 1000);
      return [
        [t('database'), n('total_xact_count'), n('total_query_count'), n('total_received'), n('total_sent'), n('total_xact_time'),
          n('total_query_time'), n('total_wait_time'), n('avg_xact_count'), n('avg_query_count'), n('avg_recv'), n('avg_sent'),
          n('avg_xact_time'), n('avg_query_time'), n('avg_wait_time')],
        [...byDb].map(([db, s]) => [db, s.xacts, s.queries, s.received, s.sent, s.xactTimeUs, s.queryTimeUs, s.waitTimeUs,
          Math.round(s.xacts / up), Math.round(s.queries / up), Math.round(s.received / up), Math.round(s.sent / up),
          s.xacts ? Math.round(s.xactTimeUs / s.xacts) : 0, s.queries ? Math.round(s.queryTimeUs / s.queries) : 0,
          s.waits ? Math.round(s.waitTimeUs / s.waits) : 0]),
      ];
    },
    CONFIG: () => {
      const c = h.config;
      const rows: Cell[][] = [
        ['instance_id', c.instanceId, '', 'no'],
        ['listen_addr', c.listenHost, '127.0.0.1', 'no'],
        ['listen_port', c.listenPort, '', 'no'],
        ['postgres', `${c.postgres.host}:${c.postgres.port}`, '', 'no'],
        ['pool_mode', 'transaction', 'transaction', 'no'],
        ['default_pool_size', c.poolSize, 20, 'yes'],
        ['max_client_conn', c.maxClients, 10000, 'yes'],
        ['query_wait_timeout', c.queueTimeoutMs, 10000, 'yes'],
        ['server_idle_timeout', c.serverIdleTimeoutMs, 60000, 'yes'],
        ['server_lifetime', c.serverLifetimeMs, 3600000, 'yes'],
        ['server_connect_timeout', c.serverConnectTimeoutMs, 5000, 'yes'],
        ['max_prepared_statements', c.maxPreparedStatements, 500, 'yes'],
        ['max_packet_size', c.maxMessageBytes, 268435456, 'yes'],
        ['metrics_port', c.metricsPort ?? '', '', 'no'],
        ['shutdown_grace', c.shutdownGraceMs, 10000, 'yes'],
      ];
      return [[t('key'), t('value'), t('default'), t('changeable')], rows.map((r) => r.map((v) => (v === null ? null : String(v))))];
    },
    DATABASES: () => [
      [t('name'), t('host'), n('port'), t('database'), t('force_user'), n('pool_size'), n('min_pool_size'), n('reserve_pool'),
        n('server_lifetime'), t('pool_mode'), n('max_connections'), n('current_connections'), n('paused'), n('disabled')],
      h.pools().map((p) => [p.database, h.config.postgres.host, h.config.postgres.port, p.database, p.user, h.config.poolSize, 0, 0,
        Math.round(h.config.serverLifetimeMs / 1000), 'transaction', 0, p.servers.size, p.paused ? 1 : 0, 0]),
    ],
    LISTS: () => {
      const pools = h.pools();
      const servers = pools.flatMap((p) => p.list());
      return [[t('list'), n('items')], [
        ['databases', new Set(pools.map((p) => p.database)).size], ['users', new Set(pools.map((p) => p.user)).size],
        ['pools', pools.length], ['free_clients', 0], ['used_clients', h.clients().length + h.adminSessions()],
        ['login_clients', 0], ['free_servers', 0], ['used_servers', servers.length],
      ]];
    },
    VERSION: () => [[t('version')], [[h.version]]],
    HELP: () => [[t('command')], HELP.split(', ').map((c) => [c])],
  };
}

/** This worker's rows of SHOW `what` (a worker answers this for the console of any other). */
export function localRows(h: AdminHost, what: string): Cell[][] {
  return shows(h)[what]?.()[1] ?? [];
}

/**
 * One view of every worker's rows: a pool or database shows once with its
 * counts summed (waits: the longest), clients and servers are listed from all,
 * settings and version are the same everywhere (the first worker's).
 */
function mergeWorkers(what: string, perWorker: Cell[][][]): Cell[][] {
  switch (what) {
    case 'POOLS': return sumByKey(perWorker, 2, [13, 14]);
    case 'STATS': return sumByKey(perWorker, 1, [14]).map((r) => {
      // Averages per transaction and per query from the summed totals.
      r[12] = r[1] ? Math.round(Number(r[5]) / Number(r[1])) : 0;
      r[13] = r[2] ? Math.round(Number(r[6]) / Number(r[2])) : 0;
      return r;
    });
    case 'DATABASES': return sumByKey(perWorker, 5, [12], [5, 6, 7, 8, 9, 10]);
    case 'LISTS': return sumByKey(perWorker, 1, [], [], (r) => ['databases', 'users', 'pools'].includes(String(r[0])));
    case 'CLIENTS': case 'SERVERS': return perWorker.flat();
    default: return perWorker[0] ?? [];
  }
}

/**
 * Rows with the same first `keyCols` cells become one: numbers summed, except
 * the `maxCols` (and every number of a row for which `maxRow` holds), which keep
 * the largest, and the `sameCols`, which keep the first worker's.
 */
function sumByKey(perWorker: Cell[][][], keyCols: number, maxCols: number[], sameCols: number[] = [], maxRow?: (r: Cell[]) => boolean): Cell[][] {
  const merged = new Map<string, Cell[]>();
  for (const row of perWorker.flat()) {
    const key = JSON.stringify(row.slice(0, keyCols));
    const acc = merged.get(key);
    if (!acc) {
      merged.set(key, [...row]);
      continue;
    }
    row.forEach((v, i) => {
      if (i < keyCols || typeof v !== 'number' || sameCols.includes(i)) return;
      acc[i] = maxCols.includes(i) || maxRow?.(row) ? Math.max(Number(acc[i]), v) : Number(acc[i]) + v;
    });
  }
  return [...merged.values()];
}

function dataRow(values: Cell[]): Buffer {
  const cells = values.map((v) => {
    if (v === null) return Buffer.from([0xff, 0xff, 0xff, 0xff]);
    const b = Buffer.from(String(v), 'utf8');
    const len = Buffer.allocUnsafe(4);
    len.writeInt32BE(b.length);
    return Buffer.concat([len, b]);
  });
  const n = Buffer.allocUnsafe(2);
  n.writeInt16BE(values.length);
  return message('D', n, ...cells);
}

function noticeMessage(text: string): Buffer {
  return message('N', Buffer.from(`SNOTICE\0VNOTICE\0C00000\0M${text}\0\0`, 'utf8'));
}
