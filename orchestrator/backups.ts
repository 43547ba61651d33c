/**
 * Backups as cluster management: which instance of a shard takes a backup (a
 * streaming replica when one is healthy, else the primary), and the schedule
 * of each database (run by the orchestrator in the cell of the shard's
 * primary, so one orchestrator per shard decides; see decision 0023).
 */
import type { EventLog, Subscription } from '../common/eventlog.ts';
import type { Logger } from '../common/log.ts';
import { counter } from '../common/metrics.ts';
import { shardKey, type AgentCommandResult, type BackupEvent, type BackupKind, type InstanceRegistered } from '../schemas/index.ts';
import type { Agents } from './agents.ts';
import type { BackupSchedule } from './config.ts';
import type { ClusterWatch, ShardView } from './view.ts';

const scheduled = counter('mg_orch_backups_scheduled_total', 'Backups started by the schedule', ['type']);

const COMMAND_TIMEOUT_MS = 30_000;
const SCHEDULE_TICK_MS = 10_000;
/** A scheduled backup that started this long ago and never ended is taken as lost (its agent died). */
const LOST_AFTER_MS = 6 * 3_600_000;
/** After a scheduled backup failed, the next attempt waits this long. */
const RETRY_AFTER_MS = 5 * 60_000;

export class BackupError extends Error {
  constructor(readonly status: 404 | 409 | 503, message: string) {
    super(message);
  }
}

export interface BackupStarted {
  backupId: string;
  instanceId: string;
  fromStandby: boolean;
  message: string;
}

export class Backups {
  /** The latest event per shard and backup type. */
  private readonly lastByShardType = new Map<string, BackupEvent>();
  /** Callers waiting for a backup's COMPLETED or FAILED event, by backupId. */
  private readonly awaitingOutcome = new Map<string, (e: BackupEvent) => void>();
  private sub: Subscription | undefined;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly eventLog: EventLog, private readonly watch: ClusterWatch, private readonly agents: Agents,
    private readonly cell: string, private readonly schedules: Record<string, BackupSchedule>, private readonly log: Logger,
  ) {}

  async start(): Promise<void> {
    this.sub = await this.eventLog.subscribe('backups', (e) => {
      this.lastByShardType.set(`${shardKey(e.database, e.shard)}|${e.type}`, e);
      if (e.state === 'COMPLETED' || e.state === 'FAILED') this.awaitingOutcome.get(e.backupId)?.(e);
    });
    await this.sub.caughtUp;
    this.timer = setInterval(() => void this.tick(), SCHEDULE_TICK_MS);
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.sub?.stop();
  }

  /** Starts a backup of the shard; its outcome is a COMPLETED or FAILED event with the returned backupId. */
  async create(database: string, shard: string, type: BackupKind): Promise<BackupStarted> {
    const s = this.shardOrThrow(database, shard);
    const primary = this.primaryOf(s);
    if (!primary) throw new BackupError(503, `${database}/${shard} has no serving primary: nothing to back up from`);
    const replica = s.cohort.find((i) => {
      const h = this.watch.fresh(i.instanceId);
      return i.instanceId !== primary.instanceId && h?.reachable && h.role === 'REPLICA' && h.walReceiverStatus === 'streaming';
    });
    const source = replica ?? primary;
    const r = await this.agents.send(source.instanceId, 'BACKUP_CREATE', {
      type, ...(replica ? { primaryHost: primary.host, primaryPort: String(primary.port) } : {}),
    }, COMMAND_TIMEOUT_MS);
    this.failed(r);
    return { backupId: r.commandId, instanceId: source.instanceId, fromStandby: replica !== undefined, message: r.message };
  }

  /**
   * The COMPLETED or FAILED event of backup `backupId` (of `type`) of the
   * shard, as soon as it is read (already, when it was); an Error after timeoutMs.
   */
  outcome(database: string, shard: string, type: BackupEvent['type'], backupId: string, timeoutMs: number): Promise<BackupEvent> {
    const seen = this.lastByShardType.get(`${shardKey(database, shard)}|${type}`);
    if (seen?.backupId === backupId && (seen.state === 'COMPLETED' || seen.state === 'FAILED')) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.awaitingOutcome.delete(backupId);
        reject(new Error(`backup ${backupId} of ${database}/${shard} did not end within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      this.awaitingOutcome.set(backupId, (e) => {
        clearTimeout(timer);
        this.awaitingOutcome.delete(backupId);
        resolve(e);
      });
    });
  }

  /** BACKUP_INFO / BACKUP_VERIFY / BACKUP_EXPIRE on one reachable instance of the shard (the repository is shared); BACKUP_CHECK needs the primary. */
  async repository(database: string, shard: string, action: 'BACKUP_INFO' | 'BACKUP_VERIFY' | 'BACKUP_EXPIRE' | 'BACKUP_CHECK', args: Record<string, string> = {}, timeoutMs = COMMAND_TIMEOUT_MS): Promise<string> {
    const s = this.shardOrThrow(database, shard);
    const primary = this.primaryOf(s);
    const target = primary ?? (action === 'BACKUP_CHECK' ? undefined : s.cohort.find((i) => this.watch.fresh(i.instanceId)?.reachable));
    if (!target) throw new BackupError(503, `no instance of ${database}/${shard} answers`);
    const r = await this.agents.send(target.instanceId, action, args, timeoutMs);
    this.failed(r);
    return r.message;
  }

  private shardOrThrow(database: string, shard: string): ShardView {
    const s = this.watch.shard(database, shard);
    if (!s) throw new BackupError(404, `no shard ${database}/${shard}`);
    return s;
  }

  private primaryOf(s: ShardView): InstanceRegistered | undefined {
    const p = s.primary && s.cohort.find((i) => i.instanceId === s.primary!.instanceId);
    return p && this.watch.fresh(p.instanceId)?.role === 'PRIMARY' ? p : undefined;
  }

  private failed(r: AgentCommandResult): void {
    if (r.status === 'REJECTED') throw new BackupError(503, `the agent of ${r.instanceId} does not take backups (backup.enabled is off?): ${r.message}`);
    if (r.status === 'FAILED') throw new BackupError(409, r.message);
  }

  /** Starts what the schedule says is due, for the shards whose primary is in this orchestrator's cell. */
  private async tick(): Promise<void> {
    const now = Date.now();
    for (const s of this.watch.shards()) {
      const schedule = this.schedules[s.database];
      const primary = this.primaryOf(s);
      if (!schedule || !primary || primary.cell !== this.cell) continue;
      // Out of service: a switchover or an in-place restore (which takes its own backup) is at work on the shard.
      if (this.watch.topology.serving.get(primary.instanceId) === 'NOT_SERVING') continue;
      const createdAt = this.watch.topology.databases.get(s.database)?.createdAt ?? null;
      const type = dueType(schedule, ofCurrentSystem((t) => this.lastByShardType.get(`${s.key}|${t}`), createdAt), now);
      if (!type) continue;
      try {
        const started = await this.create(s.database, s.shard, type);
        scheduled.inc({ type });
        this.log.info({ shard: s.key, type, ...started }, 'scheduled backup started');
      } catch (err) {
        this.log.warn({ err, shard: s.key, type }, 'scheduled backup could not start');
      }
    }
  }
}

/**
 * A shard's latest backup of each type, as its schedule counts them: those taken since the database was created.
 * A database dropped and created again under its name is another Postgres system with its own stanza (decision
 * 0064); the earlier system's backups do not start its clocks.
 */
export function ofCurrentSystem(last: (t: BackupEvent['type']) => BackupEvent | undefined, createdAt: Date | null): (t: BackupEvent['type']) => BackupEvent | undefined {
  const since = createdAt?.getTime() ?? 0;
  return (t) => {
    const e = last(t);
    return e && e.ts.getTime() >= since ? e : undefined;
  };
}

/**
 * The type of backup due now, the largest first (a full one also renews the
 * diff and incr clocks, a diff the incr one); undefined while one runs.
 */
export function dueType(schedule: BackupSchedule, last: (t: BackupEvent['type']) => BackupEvent | undefined, now: number): BackupKind | undefined {
  const events = (['FULL', 'DIFF', 'INCR'] as const).map((t) => last(t)).filter((e): e is BackupEvent => e !== undefined);
  if (events.some((e) => (e.state === 'STARTED' || e.state === 'PROGRESS') && now - e.ts.getTime() < LOST_AFTER_MS)) return undefined;
  if (events.some((e) => e.state === 'FAILED' && now - e.ts.getTime() < RETRY_AFTER_MS)) return undefined;
  const lastDone = (types: Array<BackupEvent['type']>) => Math.max(0, ...events.filter((e) => types.includes(e.type) && e.state === 'COMPLETED').map((e) => e.ts.getTime()));
  const due = (minutes: number | undefined, types: Array<BackupEvent['type']>) => minutes !== undefined && now - lastDone(types) >= minutes * 60_000;
  if (due(schedule.fullEveryMinutes, ['FULL'])) return 'full';
  if (due(schedule.diffEveryMinutes, ['FULL', 'DIFF'])) return 'diff';
  if (due(schedule.incrEveryMinutes, ['FULL', 'DIFF', 'INCR'])) return 'incr';
  return undefined;
}
