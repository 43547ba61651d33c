/**
 * The agent's backup part: keeps the instance's pgBackRest configuration,
 * creates the shard's stanza when this instance becomes primary, answers
 * BACKUP_CREATE / BACKUP_INFO / BACKUP_VERIFY / BACKUP_EXPIRE / BACKUP_CHECK, publishes each
 * backup's steps to `mg.backups.v1`, restores new replicas from the
 * latest backup plus archived WAL, and a primary in place to a point in time
 * (RESTORE_IN_PLACE).
 */
import fs from 'node:fs';
import path from 'node:path';
import type { EventLog } from '../../common/eventlog.ts';
import type { Logger } from '../../common/log.ts';
import { counter, histogram } from '../../common/metrics.ts';
import { queryAt } from '../../common/postgres.ts';
import { BACKUP_TYPES, shardKey, type AgentAction, type AgentCommand, type BackupEvent, type BackupKind } from '../../schemas/index.ts';
import { stanzaOfAgent, type AgentConfig, type BackupConfig } from '../config.ts';
import type { PostgresInstance, Upstream } from '../postgres/instance.ts';
import { parseLsn } from '../postgres/lsn.ts';
import { PgBackRest, type LocalPostgres } from './pgbackrest.ts';
import { restorePromoted } from './pitr.ts';

/** Probes of Postgres before a backup is refused for want of an answer. */
const BACKUP_PROBE_TRIES = 5;

const backupsDone = counter('mg_agent_backups_total', 'Backups run by this agent', ['type', 'result']);
const backupSeconds = histogram('mg_agent_backup_duration_seconds', 'Time of one backup', ['type'], [1, 5, 15, 60, 300, 900, 3600]);
const restores = counter('mg_agent_replica_restores_total', 'Data directories made or rewritten from a copy, by source (a replica: backup or pg_basebackup; restore_as; in_place)', ['source']);

const PROGRESS_INTERVAL_MS = 2_000;
/** Postgres's default WAL segment size (initdb --wal-segsize is not used here). */
const WAL_SEGMENT_BYTES = 16n * 1024n * 1024n;
const SEGMENTS_PER_XLOGID = 0x1_0000_0000n / WAL_SEGMENT_BYTES;

type Handle = (action: AgentAction, handler: (cmd: AgentCommand) => Promise<string>) => void;
/** The agent's one-at-a-time lifecycle operations (Agent.exclusive): a restore must not meet the health loop's restart. */
type Exclusive = (op: () => Promise<void>, keepRunning: boolean) => Promise<void>;
/** Settings a restored copy brings along that its new life must not keep (see resetCopiedSettings). */
const COPIED_SETTINGS = ['restore_command', 'recovery_target_time', 'recovery_target_lsn', 'recovery_target_action', 'synchronous_standby_names'];

export class BackupService {
  readonly pgbackrest: PgBackRest;
  private readonly publish;
  /** The backup this agent runs now (pgBackRest also locks the stanza across agents). */
  private running: Promise<void> | undefined;

  constructor(private readonly cfg: AgentConfig & { backup: BackupConfig }, private readonly pg: PostgresInstance, eventLog: EventLog, private readonly log: Logger) {
    this.pgbackrest = new PgBackRest(cfg.backup, stanzaOfAgent(cfg), localOf(pg));
    this.publish = eventLog.publisher('backups');
  }

  register(handle: Handle, exclusive: Exclusive): void {
    handle('RESTORE_IN_PLACE', (cmd) => this.restoreInPlace(cmd, exclusive));
    handle('BACKUP_CREATE', (cmd) => this.create(cmd));
    handle('BACKUP_INFO', async () => JSON.stringify((await this.pgbackrest.info()) ?? null));
    handle('BACKUP_VERIFY', async () => (await this.pgbackrest.verify()).trim() || 'verified');
    handle('BACKUP_CHECK', async () => {
      // A commit record of this moment first: a restore to a time before now stops at the first commit after it.
      await this.pg.query('SELECT txid_current()');
      await this.pgbackrest.check();
      return 'archiving works: the current WAL segment reached the repository';
    });
    handle('BACKUP_EXPIRE', async (cmd) => (await this.pgbackrest.expire(cmd.args.label || undefined)).trim() || 'nothing to expire');
  }

  /** Written at every agent start, before Postgres starts (its archive_command names the file). */
  writeConfig(): void {
    this.pgbackrest.writeConfig();
  }

  /**
   * This instance serves as primary (bootstrap, promotion): the stanza is
   * created the first time, and checked to match the database after that.
   * In the background, so an election never waits for it; archive-push
   * retries on its own until the stanza exists.
   */
  primaryStarted(): void {
    this.pgbackrest.stanzaCreate()
      .then(() => this.log.info({ stanza: this.pgbackrest.stanza }, 'pgBackRest stanza ready'))
      .then(() => this.pushPreviousTimeline())
      .catch((err) => this.log.error({ err, stanza: this.pgbackrest.stanza }, 'pgBackRest stanza-create or the push of the previous timeline failed: the archive may have a gap'));
  }

  /**
   * After a promotion: pushes the complete segments of the previous timeline
   * that this instance received while it was a standby. The old primary may
   * have died before archiving them; pgBackRest accepts the ones it did archive
   * again (same checksum), so the archive has no gap before the new timeline.
   * Only segments before the switch point: they were all streamed (real WAL),
   * while later names on the old timeline can be recycled files.
   */
  private async pushPreviousTimeline(): Promise<void> {
    const walDir = path.join(this.pg.dataDir, 'pg_wal');
    const history = fs.readdirSync(walDir).filter((f) => /^[0-9A-F]{8}\.history$/.test(f)).sort().at(-1);
    if (!history) return; // timeline 1: a bootstrap, nothing before it
    const last = fs.readFileSync(path.join(walDir, history), 'utf8').trim().split('\n').filter((l) => /^\d/.test(l)).at(-1);
    if (!last) return;
    const [parentTli, switchLsn] = last.split(/\s+/);
    const switchSegment = parseLsn(switchLsn) / WAL_SEGMENT_BYTES;
    const parent = Number(parentTli).toString(16).toUpperCase().padStart(8, '0');
    const segments = fs.readdirSync(walDir).filter((f) => /^[0-9A-F]{24}$/.test(f) && f.startsWith(parent)
      && (BigInt(`0x${f.slice(8, 16)}`) * SEGMENTS_PER_XLOGID + BigInt(`0x${f.slice(16)}`)) < switchSegment).sort();
    for (const f of segments) {
      const file = path.join(walDir, f);
      // A checkpoint of the new primary may remove an old segment meanwhile: it was archived then.
      await this.pgbackrest.run('archive-push', [], [file]).catch((err) => {
        if (fs.existsSync(file)) throw err;
      });
    }
    this.log.info({ timeline: parentTli, segments: segments.length }, 'pushed the previous timeline\'s segments held here');
  }

  /**
   * Makes the empty data directory a standby from the latest backup plus
   * archived WAL (it then streams from its upstream). False, with nothing
   * written, when the repository holds no backup yet.
   */
  async restoreStandby(): Promise<boolean> {
    if (!(await this.pgbackrest.hasBackup())) {
      restores.inc({ source: 'pg_basebackup' });
      return false;
    }
    const started = Date.now();
    await this.pgbackrest.restore(this.pg.dataDir, { type: 'standby' });
    restores.inc({ source: 'backup' });
    this.log.info({ stanza: this.pgbackrest.stanza, ms: Date.now() - started }, 'restored a standby from the latest backup');
    return true;
  }

  /**
   * A restored database's first primary (`mg backup restore --as`): the
   * source shard's backup plus archived WAL up to the target, promoted; then
   * the settings that came with the copy are reset (the source's recovery
   * target and archive, its synchronous standbys, which this shard does not
   * have). The data stays in the source's Postgres database until `mg backup
   * restore` has finished the prepared transactions that came with it and
   * renames it (a rename waits for those to end).
   */
  async restorePrimary(from: NonNullable<AgentConfig['restoreFrom']>): Promise<void> {
    const started = Date.now();
    // A file of its own, named by the recovery's restore_command until the reset below.
    const sourceConfig = `${this.pgbackrest.configFile}.${from.stanza}`;
    const source = new PgBackRest(this.cfg.backup, from.stanza, localOf(this.pg), sourceConfig);
    source.writeConfig();
    await restorePromoted(source, this.pg, from.target);
    await this.resetCopiedSettings();
    fs.rmSync(sourceConfig, { force: true });
    restores.inc({ source: 'restore_as' });
    this.log.info({ from: from.stanza, target: from.target, ms: Date.now() - started }, 'first primary restored from another database\'s backup');
  }

  /**
   * In-place point-in-time restore of this shard's primary (`mg backup
   * restore --in-place`), while MultiOrch holds the shard out of service:
   * Postgres stops, `pgbackrest restore --delta` rewrites the data directory
   * from backup `set` (only the files that differ are copied), recovery
   * replays the archive up to the target and promotes: a new timeline, which
   * archives into the same stanza. The settings that came with the backup are
   * reset; the orchestrator's election applies the shard's policy again.
   */
  private async restoreInPlace(cmd: AgentCommand, exclusive: Exclusive): Promise<string> {
    const { type, value, set } = cmd.args;
    if ((type !== 'time' && type !== 'lsn') || !value) throw new Error('RESTORE_IN_PLACE needs args type (time or lsn) and value');
    const started = Date.now();
    // keepRunning: a restore that fails leaves Postgres to the health loop, which brings it back fenced (a standby of nobody).
    await exclusive(() => restorePromoted(this.pgbackrest, this.pg, { type, value }, { set }), true);
    await this.resetCopiedSettings();
    const [{ tli, lsn }] = await this.pg.query<{ tli: number; lsn: string }>(`SELECT
      ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int AS tli, pg_current_wal_lsn()::text AS lsn`);
    restores.inc({ source: 'in_place' });
    const ms = Date.now() - started;
    this.log.info({ target: { type, value }, set, timeline: tli, lsn, ms }, 'restored in place');
    return `restored in place from backup ${set ?? '(latest)'} to ${type} ${value} in ${(ms / 1000).toFixed(1)} s: a primary on timeline ${tli} at ${lsn}`;
  }

  /**
   * A restored copy's postgresql.auto.conf holds what recovery needed and the
   * synchronous standbys of the backup's time: recovery settings must not
   * apply to a later start as a standby, and a commit must not wait for
   * standbys that do not stream from this instance (the election sets them again).
   */
  private async resetCopiedSettings(): Promise<void> {
    for (const setting of COPIED_SETTINGS) await this.pg.query(`ALTER SYSTEM RESET ${setting}`);
    await this.pg.query('SELECT pg_reload_conf()');
  }

  /**
   * Starts a backup and answers at once (a backup may take hours, and
   * commands to this agent must not wait behind it); its outcome is the
   * COMPLETED or FAILED event with backupId = the command's id.
   */
  private async create(cmd: AgentCommand): Promise<string> {
    const type = (cmd.args.type ?? 'incr') as BackupKind;
    if (!BACKUP_TYPES.includes(type)) throw new Error(`type must be one of ${BACKUP_TYPES.join(', ')}, not ${JSON.stringify(cmd.args.type)}`);
    if (this.running) throw new Error('a backup of this agent is already running');
    // A backup is in no hurry: a server busy just after a start or a promotion gets a few probes before we give up.
    let probe = await this.pg.probe(this.cfg.probeTimeoutMs);
    for (let tries = 1; !probe && tries < BACKUP_PROBE_TRIES; tries++) {
      await new Promise((r) => setTimeout(r, this.cfg.probeTimeoutMs));
      probe = await this.pg.probe(this.cfg.probeTimeoutMs);
    }
    if (!probe) throw new Error(`postgres does not answer (${BACKUP_PROBE_TRIES} probes of ${this.cfg.probeTimeoutMs} ms): cannot back it up`);
    let primary: LocalPostgres | undefined;
    if (probe.inRecovery) {
      const host = cmd.args.primaryHost;
      const port = Number(cmd.args.primaryPort);
      if (!host || !Number.isInteger(port)) throw new Error('this instance is a replica: a backup from it needs args primaryHost and primaryPort');
      primary = await describePrimary({ host, port });
      await this.alignTimeline({ host, port });
    }
    const base = { backupId: cmd.commandId, database: this.cfg.database, shard: this.cfg.shard, stanza: this.pgbackrest.stanza, instanceId: this.cfg.instanceId, fromStandby: primary !== undefined };
    const event = (state: BackupEvent['state'], extra: Partial<BackupEvent> = {}) => this.publish([{ key: shardKey(this.cfg.database, this.cfg.shard), value: {
      ...base, ts: new Date(), state, type: type.toUpperCase() as BackupEvent['type'], label: null, startLsn: null, stopLsn: null,
      sizeBytes: null, repoSizeBytes: null, doneBytes: null, durationMs: null, error: null, ...extra,
    } }]);
    await event('STARTED');
    const started = Date.now();
    const end = backupSeconds.startTimer({ type });
    this.running = (async () => {
      const progress = setInterval(() => {
        void this.pgbackrest.info().then((i) => i?.progress && event('PROGRESS', { doneBytes: BigInt(i.progress.done), sizeBytes: BigInt(i.progress.total) }))
          .catch(() => undefined);
      }, PROGRESS_INTERVAL_MS);
      try {
        await this.pgbackrest.backup(type, primary);
        const latest = (await this.pgbackrest.info())?.backups.at(-1);
        await event('COMPLETED', {
          label: latest?.label ?? null,
          startLsn: latest?.startLsn ? parseLsn(latest.startLsn) : null, stopLsn: latest?.stopLsn ? parseLsn(latest.stopLsn) : null,
          sizeBytes: latest ? BigInt(latest.sizeBytes) : null, repoSizeBytes: latest ? BigInt(latest.repoDeltaBytes) : null,
          durationMs: BigInt(Date.now() - started),
        });
        backupsDone.inc({ type, result: 'completed' });
        this.log.info({ type, label: latest?.label, ms: Date.now() - started, fromStandby: base.fromStandby }, 'backup completed');
      } catch (err) {
        backupsDone.inc({ type, result: 'failed' });
        this.log.error({ err, type }, 'backup failed');
        await event('FAILED', { durationMs: BigInt(Date.now() - started), error: (err as Error).message }).catch(() => undefined);
      } finally {
        clearInterval(progress);
        end();
        this.running = undefined;
      }
    })();
    return `${type} backup ${cmd.commandId} started${primary ? ' from this replica' : ' on the primary'}`;
  }

  /**
   * A standby's pg_control names the timeline of its last restartpoint, so
   * after a failover it lags the WAL it replays until the next one, and
   * pgBackRest refuses the backup ("WAL timeline 2 does not match pg_control
   * timeline 1"). A checkpoint on the primary, replayed here, then one here
   * (a restartpoint) brings it up to date.
   */
  private async alignTimeline(primary: Upstream): Promise<void> {
    await queryAt(primary, 'CHECKPOINT', [], ALIGN_TIMEOUT_MS);
    const [{ lsn }] = await queryAt<{ lsn: string }>(primary, 'SELECT pg_current_wal_lsn()::text AS lsn');
    const deadline = Date.now() + ALIGN_TIMEOUT_MS;
    for (;;) {
      const [{ caughtUp }] = await this.pg.query<{ caughtUp: boolean }>('SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn AS "caughtUp"', [lsn]);
      if (caughtUp) break;
      if (Date.now() > deadline) throw new Error(`this replica did not replay the primary's checkpoint (${lsn}) within ${ALIGN_TIMEOUT_MS} ms`);
      await new Promise((r) => setTimeout(r, 100));
    }
    await this.pg.query('CHECKPOINT', [], ALIGN_TIMEOUT_MS);
  }
}

/** How long a standby may take to replay the primary's fresh checkpoint before a backup from it. */
const ALIGN_TIMEOUT_MS = 30_000;

function localOf(pg: PostgresInstance): LocalPostgres {
  return { dataDir: pg.dataDir, port: pg.port, socketDir: pg.runDir };
}

/** The primary's data directory and socket, which a backup from a standby needs (pgBackRest reaches both locally). */
async function describePrimary(primary: Upstream): Promise<LocalPostgres> {
  const [row] = await queryAt<{ dir: string; sock: string; rec: boolean }>(primary,
    `SELECT current_setting('data_directory') AS dir, split_part(current_setting('unix_socket_directories'), ',', 1) AS sock, pg_is_in_recovery() AS rec`);
  if (row.rec) throw new Error(`${primary.host}:${primary.port} is not the primary (in recovery)`);
  return { dataDir: row.dir, port: primary.port, socketDir: row.sock.trim() };
}
