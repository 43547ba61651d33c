/**
 * In-place point-in-time restore of a shard or a whole database, a planned
 * operation of MultiOrch (decision 0047): drain, restore, rejoin, elect.
 * While it runs, the orchestrator holds each shard's lease (other
 * orchestrators keep off: no failover) and its own keeper leaves the shards
 * alone; every instance is NOT_SERVING, so the gateways hold new statements
 * for up to their buffer window and then answer 57P03. The primary's agent
 * rewrites its data directory to the target (`pgbackrest restore --delta`,
 * promoted on a new timeline), takes a full backup on that timeline (the
 * repository's later backups lie on the abandoned one), the replicas rejoin
 * through the ordinary REPOINT (rewound, or rebuilt from that backup), and
 * an election under a new term puts the shard back in service.
 */
import { backupBefore, recoveryTargetOf, type ListedBackup, type OrchEventKind, type RecoveryTarget } from '../schemas/index.ts';
import type { Agents } from './agents.ts';
import type { Backups } from './backups.ts';
import { drainClients, type ElectionResult } from './election.ts';
import { REQUEST_WAIT_MS, type Journal } from './journal.ts';
import type { Keeper } from './keeper.ts';
import { OperationError } from './operations.ts';
import type { ClusterWatch, ShardView } from './view.ts';

type Step = (message: string) => void;

/** A restore replays the archive up to its target (as the agent's own timeout). */
const RESTORE_TIMEOUT_MS = 30 * 60_000;
/** The full backup on the new timeline copies the whole database. */
const BACKUP_TIMEOUT_MS = 6 * 3_600_000;
/** A rewind, or a rebuild from the new backup when rewinding is impossible (as the keeper's). */
const REPOINT_TIMEOUT_MS = 180_000;
/** Forcing a WAL switch and waiting for its archiving. */
const CHECK_TIMEOUT_MS = 120_000;
/**
 * The shards' lease during a restore, at least: renewed every third of it, so an operation of
 * hours leaves a renewal every 10 s in the journal (not three a second); a holder that dies
 * leaves the shard to the other orchestrators within it.
 */
const RESTORE_LEASE_MS = 30_000;
/** Elections tried before the restore is reported failed (the keepers go on trying after it). */
const ELECTION_ATTEMPTS = 3;
/** Client transactions on the primary get this long to end before it stops (new ones are held by the gateways). */
const DRAIN_MS = 3_000;

export interface RestoreRequest {
  /** ISO 8601: the first commit after it is the last one kept. */
  time?: string;
  /** A WAL position of the shard (one shard only: positions of different shards are unrelated). */
  lsn?: string;
}

/** An in-place restore goes to a point: a time or an LSN. */
type PointTarget = Extract<RecoveryTarget, { value: string }>;

interface Plan {
  shard: ShardView;
  primaryId: string;
  term: bigint;
  /** The backup the restore starts from. */
  set: string;
  /** The election that ended it. */
  elected?: ElectionResult;
}

export class RestoreManager {
  constructor(
    private readonly watch: ClusterWatch, private readonly keeper: Keeper, private readonly journal: Journal,
    private readonly agents: Agents, private readonly backups: Backups, private readonly leaseMs: number,
  ) {}

  /** The shards to restore (one, or every shard of the database) and the target; an OperationError when it cannot start. */
  check(database: string, shardName: string | undefined, req: RestoreRequest): { shards: ShardView[]; target: PointTarget } {
    const db = this.watch.topology.databases.get(database);
    if (!db || db.dropped) throw new OperationError(404, `no database ${database}`);
    if (db.hostedOn !== null) throw new OperationError(409, `${database} is hosted on ${db.hostedOn}: restore ${db.hostedOn}, with every database it hosts`);
    if (this.watch.topology.inactive.has(database)) throw new OperationError(409, `database "${database}" is inactive (scaled to zero); activate it first`);
    const all = this.watch.shards().filter((s) => s.database === database);
    const shards = shardName === undefined ? all : all.filter((s) => s.shard === shardName);
    if (!shards.length) throw new OperationError(404, `no shard ${database}/${shardName ?? ''}`);
    if (!req.time && !req.lsn) throw new OperationError(400, 'body: give time or lsn (an in-place restore to the end of the archive would change nothing)');
    let target: RecoveryTarget;
    try {
      target = recoveryTargetOf(req);
    } catch (err) {
      throw new OperationError(400, `body: ${(err as Error).message.replace(/--/g, '')}`);
    }
    if (target.type === 'default') throw new OperationError(400, 'body: give time or lsn');
    if (req.time && new Date(req.time).getTime() > Date.now()) throw new OperationError(400, `body.time: ${req.time} is in the future`);
    if (req.lsn && shards.length > 1) throw new OperationError(400, `body.lsn: ${database} has ${shards.length} shards, whose WAL positions are unrelated: give a time, or restore one shard`);
    for (const s of shards) {
      const primary = s.primary && this.watch.fresh(s.primary.instanceId);
      if (!primary || primary.role !== 'PRIMARY') throw new OperationError(409, `${s.key} has no healthy primary now: nothing to restore in place (try again once it has one)`);
      if (this.journal.heldElsewhere(s.key)) throw new OperationError(409, `another orchestrator is at work on ${s.key}; try again`);
    }
    return { shards, target };
  }

  /** The operation itself (runs in the background; `step` says what it did and what it waits for). */
  async restore(database: string, shards: ShardView[], target: PointTarget, req: RestoreRequest, step: Step): Promise<void> {
    const what = `${target.type} ${target.type === 'time' ? req.time : target.value}`;
    if (shards.length === 1 && this.watch.topology.databases.get(database)?.sharded) {
      step(`${shards[0].key} alone: cross-shard transactions with the other shards of ${database} are not brought to the same point`);
    }
    // Before anything changes: a backup to start from, and the primary's current WAL in the archive (a refusal leaves the shard as it was).
    const plans: Plan[] = [];
    for (const checked of shards) {
      const shard = this.watch.shard(database, checked.shard) ?? checked; // its primary may have moved since the check
      const info = JSON.parse(await this.backups.repository(database, shard.shard, 'BACKUP_INFO')) as { backups: ListedBackup[] } | null;
      const set = backupBefore(info?.backups ?? [], { time: req.time ? new Date(req.time) : undefined, lsn: req.lsn })?.label;
      if (!set) throw new Error(`${shard.key}: no backup ended before ${what}${info?.backups.length ? `; the earliest ended at ${new Date(info.backups[0].stoppedAt).toISOString()} (${info.backups[0].stopLsn})` : ''}`);
      await this.backups.repository(database, shard.shard, 'BACKUP_CHECK', {}, CHECK_TIMEOUT_MS);
      plans.push({ shard, primaryId: shard.primary!.instanceId, term: shard.primary!.term, set });
      step(`${shard.key}: the primary's current WAL is archived; restoring from backup ${set} plus archived WAL to ${what}`);
    }
    await this.exclusively(plans.map((p) => p.shard), () => this.underLeases(database, plans, what, step, async () => {
      await Promise.all(plans.map((p) => this.drain(p, step)));
      this.assertHeld(database, plans);
      // Every shard restored before any is elected: the in-doubt resolver reads a decision shard only once it serves again (restored).
      await Promise.all(plans.map((p) => this.restorePrimary(p, target, step)));
      this.assertHeld(database, plans);
      await Promise.all(plans.map((p) => this.backupNewTimeline(p, step)));
      this.assertHeld(database, plans);
      const followers = await Promise.all(plans.map((p) => this.rejoinReplicas(p, step)));
      this.assertHeld(database, plans);
      for (const [n, p] of plans.entries()) await this.elect(p, [p.primaryId, ...followers[n]], what, step);
    }));
  }

  /** Runs `op` with this orchestrator's keeper off every one of the shards. */
  private exclusively(shards: ShardView[], op: () => Promise<void>): Promise<void> {
    const [first, ...rest] = shards;
    return first ? this.keeper.exclusive(first, () => this.exclusively(rest, op)) : op();
  }

  /** Holds each shard's lease (renewed in the background) for `op`, journaling its start and end; an election releases its shard's. */
  private async underLeases(database: string, plans: Plan[], what: string, step: Step, op: () => Promise<void>): Promise<void> {
    const started = Date.now();
    const record = (p: Plan, kind: OrchEventKind, summary: string) =>
      this.journal.record(database, p.shard.shard, kind, 'restore', summary, { term: p.term, durationMs: kind === 'DECIDED' ? undefined : Date.now() - started });
    const claimed: Plan[] = [];
    try {
      for (const p of plans) {
        await this.journal.awaitFree(p.shard.key, REQUEST_WAIT_MS);
        if (!(await this.journal.claim(database, p.shard.shard, 'restore', p.term, Math.max(this.leaseMs, RESTORE_LEASE_MS)))) {
          throw new Error(`${this.journal.whyNotClaimed(p.shard.key)}; nothing was changed`);
        }
        claimed.push(p);
        await record(p, 'DECIDED', `restore in place to ${what} from backup ${p.set}: drain, restore, rejoin, elect`);
      }
      await op();
      for (const p of plans) await record(p, 'COMPLETED', `restored in place to ${what}; ${p.elected!.primary} is primary of term ${p.elected!.term}`);
    } catch (err) {
      for (const p of claimed) await record(p, 'FAILED', `restore in place to ${what}: ${(err as Error).message}`).catch(() => undefined);
      throw err;
    } finally {
      for (const p of claimed) await this.journal.release(database, p.shard.shard, 'restore').catch(() => undefined);
    }
  }

  private assertHeld(database: string, plans: Plan[]): void {
    for (const p of plans) this.journal.assertHeld(database, p.shard.shard);
  }

  /** Every instance out of routing (the gateways hold new statements, then answer 57P03), then the primary's transactions get a moment to end. */
  private async drain(p: Plan, step: Step): Promise<void> {
    const t0 = Date.now();
    const ids = p.shard.members.map((i) => i.instanceId); // one being removed (DRAINED) stays so
    for (const id of ids) await this.keeper.setServing(id, 'NOT_SERVING', p.term);
    for (let waited = 0; ids.some((id) => this.watch.topology.serving.get(id) !== 'NOT_SERVING'); waited += 20) {
      if (waited > 10_000) throw new Error(`NOT_SERVING of ${p.shard.key}'s instances did not come back from the topology log`);
      await new Promise((r) => setTimeout(r, 20));
    }
    const primary = p.shard.cohort.find((i) => i.instanceId === p.primaryId)!;
    await drainClients(primary, DRAIN_MS).catch(() => undefined); // the restore ends what is left
    await this.note(p, 'ACTED', `drained: ${ids.join(', ')} NOT_SERVING (the gateways hold new statements)`, Date.now() - t0, step);
  }

  private async restorePrimary(p: Plan, target: PointTarget, step: Step): Promise<void> {
    step(`${p.shard.key}: ${p.primaryId} stops and restores its data directory (pgbackrest restore --delta), then replays archived WAL ...`);
    const t0 = Date.now();
    const r = await this.agents.send(p.primaryId, 'RESTORE_IN_PLACE', { type: target.type, value: target.value, set: p.set }, RESTORE_TIMEOUT_MS);
    if (r.status !== 'SUCCEEDED') throw new Error(`${p.shard.key}: the restore on ${p.primaryId} failed: ${r.message}`);
    await this.note(p, 'ACTED', `${p.primaryId}: ${r.message}`, Date.now() - t0, step);
  }

  /** A full backup on the new timeline: the replicas are rebuilt from it when they cannot be rewound, and later restores start from it. */
  private async backupNewTimeline(p: Plan, step: Step): Promise<void> {
    step(`${p.shard.key}: a full backup of ${p.primaryId} on its new timeline ...`);
    const t0 = Date.now();
    const r = await this.agents.send(p.primaryId, 'BACKUP_CREATE', { type: 'full' }, CHECK_TIMEOUT_MS);
    if (r.status !== 'SUCCEEDED') throw new Error(`${p.shard.key}: the full backup could not start: ${r.message}`);
    const e = await this.backups.outcome(p.shard.database, p.shard.shard, 'FULL', r.commandId, BACKUP_TIMEOUT_MS);
    if (e.state === 'FAILED') throw new Error(`${p.shard.key}: the full backup failed: ${e.error}`);
    await this.note(p, 'ACTED', `full backup ${e.label} on the new timeline (${mb(e.sizeBytes)})`, Date.now() - t0, step);
  }

  /**
   * The replicas follow the restored primary through the ordinary REPOINT:
   * their WAL went past the new timeline's fork, so the agent rewinds them,
   * or rebuilds them from the new backup. One that does not make it is left
   * to the keeper (it retries), as long as the election finds enough voters.
   * Resolves with those that rejoined.
   */
  private async rejoinReplicas(p: Plan, step: Step): Promise<string[]> {
    const primary = p.shard.cohort.find((i) => i.instanceId === p.primaryId)!;
    const rejoined: string[] = [];
    await Promise.all(p.shard.members.filter((i) => i.instanceId !== p.primaryId).map(async (inst) => {
      if (!this.watch.fresh(inst.instanceId)) {
        await this.note(p, 'OBSERVED', `${inst.instanceId}: its agent is not heard from; left to MultiOrch, which repoints it once it is back`, 0, step);
        return;
      }
      step(`${p.shard.key}: ${inst.instanceId} rejoins ${p.primaryId} (rewound, or rebuilt from the new backup) ...`);
      const t0 = Date.now();
      const r = await this.agents.send(inst.instanceId, 'REPOINT', { term: String(p.term), host: primary.host, port: String(primary.port) }, REPOINT_TIMEOUT_MS)
        .catch((err: Error) => ({ status: 'TIMEOUT', message: err.message }));
      await this.note(p, r.status === 'SUCCEEDED' ? 'ACTED' : 'OBSERVED', `${inst.instanceId}: ${r.status === 'SUCCEEDED' ? r.message : `did not rejoin yet (${r.message}); MultiOrch retries`}`, Date.now() - t0, step);
      if (r.status === 'SUCCEEDED') rejoined.push(inst.instanceId);
    }));
    return rejoined;
  }

  /**
   * A new term for the restored shard: the voters pledge it, the most
   * advanced of the `candidates` (the restored primary among equals) is
   * promoted, the rule is written; then archiving is checked on the new primary.
   */
  private async elect(p: Plan, candidates: string[], what: string, step: Step): Promise<void> {
    const { database, shard: name } = p.shard;
    step(`${p.shard.key}: electing a primary under a new term among ${candidates.join(', ')} ...`);
    for (let attempt = 1; !p.elected; attempt++) {
      const shard = this.watch.shard(database, name);
      if (!shard) throw new Error(`${p.shard.key} is gone`);
      try {
        p.elected = await this.keeper.elect(shard, { operation: 'restore', reason: `restored in place to ${what}`, target: p.primaryId, candidates });
      } catch (err) {
        // As the keeper retries an election: a voter slow to answer on a busy machine is not a reason to give up the restore.
        if (attempt === ELECTION_ATTEMPTS) throw err;
        step(`${p.shard.key}: the election did not complete (${(err as Error).message}); trying again under a newer term`);
        await new Promise((res) => setTimeout(res, 1_000));
      }
    }
    const r = p.elected;
    step(`${p.shard.key}: ${r.primary} is primary of term ${r.term} (election ${r.durationMs} ms); the gateways serve ${p.shard.database} again`);
    // The check goes to the primary this orchestrator's view shows: the announcement must have come back first.
    for (let waited = 0; this.watch.shard(database, name)?.primary?.term !== r.term || this.watch.fresh(r.primary)?.role !== 'PRIMARY'; waited += 50) {
      if (waited > 10_000) throw new Error(`${p.shard.key}: the announcement of term ${r.term} did not come back from the topology log`);
      await new Promise((res) => setTimeout(res, 50));
    }
    const archived = await this.backups.repository(database, name, 'BACKUP_CHECK', {}, CHECK_TIMEOUT_MS);
    step(`${p.shard.key}: pgbackrest check on the new primary: ${archived}`);
  }

  /** An ACTED or OBSERVED event of the operation, and the same line as a step. */
  private async note(p: Plan, kind: OrchEventKind, summary: string, durationMs: number, step: Step): Promise<void> {
    step(`${p.shard.key}: ${summary}`);
    await this.journal.record(p.shard.database, p.shard.shard, kind, 'restore', summary, { term: p.term, durationMs });
  }
}

const mb = (n: bigint | null) => (n === null ? 'size unknown' : `${(Number(n) / 1024 / 1024).toFixed(1)} MB`);
