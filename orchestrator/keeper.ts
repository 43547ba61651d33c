/**
 * The shard keeper: every tick, for every shard, compares what is with what
 * should be and acts under the shard's lease: elects a new shard's first
 * primary, fails over a primary that is gone, keeps the rule and the
 * durability policy in place, points replicas (including a returning old
 * primary, and new empty instances, which get cloned) at the term's primary,
 * and puts a replica in service only once it has caught up (decision 0034).
 */
import type { EventLog } from '../common/eventlog.ts';
import type { Logger } from '../common/log.ts';
import { counter, gauge, histogram } from '../common/metrics.ts';
import { queryAt } from '../common/postgres.ts';
import { canAcknowledge, payload, RULE_TABLE, syncStandbyNames, type InstanceRegistered, type ServingState } from '../schemas/index.ts';
import type { Agents } from './agents.ts';
import type { OrchConfig } from './config.ts';
import { applyPolicy, Election, ElectionError, writeRule, type ElectionRequest, type ElectionResult } from './election.ts';
import { REQUEST_WAIT_MS, type Journal } from './journal.ts';
import type { ClusterWatch, ShardView } from './view.ts';

const elections = counter('mg_orch_elections_total', 'Elections run by this orchestrator', ['operation', 'result']);
const electionSeconds = histogram('mg_orch_election_duration_seconds', 'Time from decision to the new primary announced', ['operation'], [0.25, 0.5, 1, 2, 3, 5, 8, 13, 21]);
const repairs = counter('mg_orch_repairs_total', 'Repairs started (repoint, policy, bootstrap)', ['kind']);
const shardTerm = gauge('mg_orch_shard_term', 'Current term per shard', ['shard']);
const shardsHealthy = gauge('mg_orch_shards_healthy', 'Shards whose primary is healthy');

/** A repair of one instance is not retried sooner than this. */
const REPAIR_BACKOFF_MS = 3_000;
/** How long a database's agents have to start its instances after a wake before the shard is tended again (a silent primary fails over). */
const WAKE_GRACE_MS = 10_000;
/** A replica not streaming from the right primary this long gets repointed. */
const MISWIRED_MS = 2_000;
/** A rewind, or a clone when rewinding fails, may take this long. */
const REPOINT_TIMEOUT_MS = 180_000;
const STALE_PRIMARY = 'a stale primary';
/** How often the rule and the policy on a healthy primary are checked. */
const CHECK_PRIMARY_MS = 2_000;
/** A healthy primary left NOT_SERVING this long (by a switchover that failed) is put back in service. */
const PRIMARY_OUT_MS = 10_000;
/** A new shard is bootstrapped once its set of instances has not changed for this long (its agents start one by one). */
const BOOTSTRAP_SETTLE_MS = 1_500;

interface ShardState {
  busy: boolean;
  unhealthySince?: number;
  lastPrimaryCheck: number;
  miswiredSince: Map<string, number>;
  lastRepair: Map<string, number>;
  /** Instances with a REPOINT of ours in flight. */
  repairing: Set<string>;
  /** The term whose rule and policy were last found in place on its primary. */
  verifiedTerm?: bigint;
  /** Since when the healthy primary has been out of service (NOT_SERVING). */
  primaryOutSince?: number;
  /** A shard without a primary: its instances, and since when they have been these. */
  cohortSeen?: { ids: string; since: number };
}

export class Keeper {
  private readonly states = new Map<string, ShardState>();
  private readonly termsSeen = new Map<string, bigint>();
  private readonly election: Election;
  private timer: NodeJS.Timeout | undefined;
  private ticking = false;

  constructor(
    private readonly cfg: OrchConfig, eventLog: EventLog, private readonly watch: ClusterWatch,
    private readonly agents: Agents, private readonly journal: Journal, private readonly log: Logger,
  ) {
    this.election = new Election(cfg, eventLog, agents, journal, this.termsSeen);
  }

  start(): void {
    this.timer = setInterval(() => void this.tick(), this.cfg.tickMs);
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    while ([...this.states.values()].some((s) => s.busy)) await new Promise((r) => setTimeout(r, 50));
  }

  /** A planned switchover (REST, CLI); throws ElectionError with a status the API maps to HTTP. */
  async switchover(database: string, shardName: string, target?: string): Promise<ElectionResult> {
    const shard = this.watch.shard(database, shardName);
    if (!shard) throw new ElectionError(`no shard ${database}/${shardName}`, 'refused');
    if (target && !shard.cohort.some((i) => i.instanceId === target)) throw new ElectionError(`${target} is not an instance of ${shard.key}`, 'invalid');
    if (target && target === shard.primary?.instanceId) throw new ElectionError(`${target} is already the primary`, 'refused');
    return this.exclusive(shard, () => this.elect(shard, { operation: 'switchover', reason: 'requested', target }));
  }

  /** Whether this orchestrator found the shard's rule and policy in place for its current term. */
  bootstrapped(shard: ShardView): boolean {
    return shard.primary !== undefined && this.states.get(shard.key)?.verifiedTerm === shard.primary.term;
  }

  private state(key: string): ShardState {
    let s = this.states.get(key);
    if (!s) this.states.set(key, (s = { busy: false, lastPrimaryCheck: 0, miswiredSince: new Map(), lastRepair: new Map(), repairing: new Set() }));
    return s;
  }

  /**
   * Runs `op` as the only operation of this keeper on the shard: its ticks
   * leave the shard alone meanwhile (other orchestrators keep off through the
   * shard's lease, which the caller holds when it changes anything).
   */
  async exclusive<T>(shard: ShardView, op: () => Promise<T>): Promise<T> {
    const s = this.state(shard.key);
    // Routine upkeep of the shard may be running: it is short, so wait for it.
    for (let waited = 0; s.busy; waited += 20) {
      if (waited > 10_000) throw new ElectionError(`${shard.key} is busy with another operation of this orchestrator`, 'busy');
      await new Promise((r) => setTimeout(r, 20));
    }
    s.busy = true;
    try {
      return await op();
    } finally {
      s.busy = false;
    }
  }

  /** One election, counted in the metrics; inside `exclusive` (a switchover, an in-place restore) or a tick's own work. */
  async elect(shard: ShardView, req: ElectionRequest): Promise<ElectionResult> {
    const end = electionSeconds.startTimer({ operation: req.operation });
    try {
      const result = await this.election.run(shard, req);
      end();
      elections.inc({ operation: req.operation, result: 'completed' });
      return result;
    } catch (err) {
      elections.inc({ operation: req.operation, result: (err as ElectionError).status ?? 'failed' });
      throw err;
    }
  }

  private async tick(): Promise<void> {
    if (this.ticking) return;
    this.ticking = true;
    try {
      let healthy = 0;
      for (const shard of this.watch.shards()) {
        if (shard.primary) shardTerm.set({ shard: shard.key }, Number(shard.primary.term));
        const s = this.state(shard.key);
        if (s.busy) continue;
        if (!shard.primary) {
          this.launch(shard, () => this.maybeBootstrap(shard, s));
        } else if (this.watch.resting(shard.database, WAKE_GRACE_MS)) {
          s.unhealthySince = undefined; // stopped on purpose (scale to zero), or its agents are starting it again
        } else if (this.primaryHealthy(shard)) {
          healthy++;
          s.unhealthySince = undefined;
          this.launch(shard, () => this.tend(shard, s));
        } else {
          s.unhealthySince ??= Date.now();
          this.launch(shard, () => this.maybeFailover(shard, s));
        }
      }
      shardsHealthy.set(healthy);
    } catch (err) {
      this.log.error({ err }, 'tick failed');
    } finally {
      this.ticking = false;
    }
  }

  /** Runs one shard's work in the background, one operation per shard at a time. */
  private launch(shard: ShardView, op: () => Promise<void>): void {
    const s = this.state(shard.key);
    if (s.busy) return;
    if (this.journal.heldElsewhere(shard.key)) return; // another orchestrator is at it
    s.busy = true;
    op().catch((err) => this.log.warn({ err: (err as Error).message, shard: shard.key }, 'shard operation failed'))
      .finally(() => (s.busy = false));
  }

  private primaryHealthy(shard: ShardView): boolean {
    const h = this.watch.fresh(shard.primary!.instanceId);
    return !!h && h.reachable && h.role === 'PRIMARY';
  }

  private async maybeFailover(shard: ShardView, s: ShardState): Promise<void> {
    const primaryId = shard.primary!.instanceId;
    const inst = shard.cohort.find((i) => i.instanceId === primaryId);
    if (!inst) return;
    const silentMs = Date.now() - this.watch.lastHeard(primaryId);
    const latest = this.watch.latest(primaryId);
    let reason: string | undefined;
    if (silentMs >= this.cfg.agentDownMs) {
      // With no other voter there is nobody to fail over to: an election would only shut the primary down and
      // promote it again once its agent is back.
      if (shard.cohort.length === 1) return;
      reason = `no heartbeat from the primary's agent for ${silentMs} ms`;
    } else if (Date.now() - s.unhealthySince! >= this.cfg.detectMs && this.watch.fresh(primaryId)) {
      // The agent says unreachable (or not primary): confirm with a probe of our own.
      const probe = await queryAt<{ rec: boolean }>({ host: inst.host, port: inst.port }, 'SELECT pg_is_in_recovery() AS rec', [], 1_000)
        .then((r) => (r[0].rec ? 'in recovery' : 'primary'), (err: Error) => err.message);
      if (probe === 'primary') return;
      reason = `primary ${latest?.reachable ? `reports role ${latest.role}` : `unreachable (${latest?.error ?? 'no detail'})`}; direct probe: ${probe}`;
    }
    if (!reason) return;
    await this.journal.record(shard.database, shard.shard, 'OBSERVED', 'failover', `primary ${primaryId} failed: ${reason}`, { term: shard.primary!.term });
    await this.electOrRetryLater(shard, { operation: 'failover', reason });
  }

  /** An unrequested election (failover, bootstrap): a failure is logged and the next tick tries again, after a pause. */
  private async electOrRetryLater(shard: ShardView, req: ElectionRequest): Promise<void> {
    try {
      const r = await this.elect(shard, req);
      this.log.info({ shard: shard.key, term: r.term.toString(), primary: r.primary, ms: r.durationMs }, `${req.operation} completed`);
    } catch (err) {
      this.log.warn({ shard: shard.key, err: (err as Error).message }, `${req.operation} did not complete; will retry`);
      await new Promise((r) => setTimeout(r, 300 + Math.random() * 700)); // do not duel with another orchestrator
    }
  }

  /**
   * A shard that never had a primary: once its instances are all heard from,
   * enough for the policy, and no new one registered for a moment, elect the
   * first primary (term 1 on a new shard; the election refuses unless every
   * voter answered that it holds no data).
   */
  private async maybeBootstrap(shard: ShardView, s: ShardState): Promise<void> {
    const ids = shard.cohort.map((i) => i.instanceId).join(',');
    if (s.cohortSeen?.ids !== ids) s.cohortSeen = { ids, since: Date.now() };
    if (!ids || Date.now() - s.cohortSeen.since < BOOTSTRAP_SETTLE_MS) return;
    if (!canAcknowledge(shard.policy, shard.cohort) || !shard.cohort.every((i) => this.watch.fresh(i.instanceId))) return;
    await this.electOrRetryLater(shard, { operation: 'bootstrap', reason: `a new shard of ${shard.cohort.length} instances under ${shard.policyText}` });
  }

  /** Healthy primary: rule, policy, and the wiring of every other instance. */
  private async tend(shard: ShardView, s: ShardState): Promise<void> {
    const primary = shard.cohort.find((i) => i.instanceId === shard.primary!.instanceId);
    if (!primary) return;
    if (Date.now() - s.lastPrimaryCheck >= CHECK_PRIMARY_MS) {
      s.lastPrimaryCheck = Date.now();
      await this.checkPrimary(shard, primary);
    }
    // A switchover that failed after taking the primary out of service must not leave it there (the wait covers
    // a switchover in progress whose claim this orchestrator has not read yet).
    if (this.watch.topology.serving.get(primary.instanceId) === 'SERVING') s.primaryOutSince = undefined;
    else if (Date.now() - (s.primaryOutSince ??= Date.now()) >= PRIMARY_OUT_MS) await this.election.serving(primary.instanceId, 'SERVING', shard.primary!.term);
    const upstream = `${primary.host}:${primary.port}`;
    const now = Date.now();
    for (const inst of shard.members) {
      if (inst.instanceId === primary.instanceId) continue;
      const h = this.watch.fresh(inst.instanceId);
      if (!h) continue; // its agent is away: nothing can be done through it now
      const wired = h.reachable && h.role === 'REPLICA' && h.upstream === upstream && h.walReceiverStatus === 'streaming';
      if (wired) {
        s.miswiredSince.delete(inst.instanceId);
        if (this.watch.topology.serving.get(inst.instanceId) !== 'SERVING' && !s.repairing.has(inst.instanceId)) await this.serveOnceCaughtUp(shard, inst, primary);
        continue;
      }
      const since = s.miswiredSince.get(inst.instanceId) ?? now;
      s.miswiredSince.set(inst.instanceId, since);
      if (now - since < MISWIRED_MS || now - (s.lastRepair.get(inst.instanceId) ?? 0) < REPAIR_BACKOFF_MS || s.repairing.has(inst.instanceId)) continue;
      s.lastRepair.set(inst.instanceId, now);
      await this.repoint(shard, s, inst, primary, h.role === 'PRIMARY' ? STALE_PRIMARY : `upstream ${h.upstream ?? 'none'}, ${h.walReceiverStatus ?? 'no WAL receiver'}`);
    }
  }

  /**
   * Sends REPOINT under the lease, then lets go of the lease: a rewind or a
   * clone can take long, and the command is idempotent and bound to its term.
   * The outcome is journaled when it arrives.
   */
  private async repoint(shard: ShardView, s: ShardState, inst: InstanceRegistered, primary: InstanceRegistered, why: string): Promise<void> {
    const term = shard.primary!.term;
    if (!(await this.journal.claim(shard.database, shard.shard, 'repoint', term, this.cfg.leaseMs))) return;
    repairs.inc({ kind: 'repoint' });
    const started = Date.now();
    let outcome: Promise<void>;
    try {
      await this.journal.record(shard.database, shard.shard, 'DECIDED', 'repoint', `repoint ${inst.instanceId} to ${primary.instanceId}: ${why}`, { term });
      if (why === STALE_PRIMARY && this.watch.topology.serving.get(inst.instanceId) === 'SERVING') await this.election.serving(inst.instanceId, 'NOT_SERVING', term);
      outcome = this.agents.send(inst.instanceId, 'REPOINT', { term: String(term), host: primary.host, port: String(primary.port) }, REPOINT_TIMEOUT_MS)
        .then(async (r) => {
          await this.journal.record(shard.database, shard.shard, r.status === 'SUCCEEDED' ? 'COMPLETED' : 'FAILED', 'repoint',
            `${inst.instanceId}: ${r.message}`, { term, durationMs: Date.now() - started });
          if (r.status === 'SUCCEEDED') await this.serveOnceCaughtUp(shard, inst, primary);
        });
    } finally {
      await this.journal.release(shard.database, shard.shard, 'repoint');
    }
    s.repairing.add(inst.instanceId);
    outcome.catch((err) => this.log.warn({ err: (err as Error).message, instance: inst.instanceId }, 'repoint did not complete'))
      .finally(() => s.repairing.delete(inst.instanceId));
  }

  /**
   * The caught-up gate: a replica is put in service (SERVING, so the gateways
   * send it reads) only when the primary sees it streaming with its replay
   * within servingLagBytes of the primary's WAL; otherwise the next tick asks
   * again. A replica already in service is never taken out for lagging: the
   * gateways skip one past their own lag threshold per transaction.
   */
  private async serveOnceCaughtUp(shard: ShardView, inst: InstanceRegistered, primary: InstanceRegistered): Promise<void> {
    const [row] = await queryAt<{ lag: string }>({ host: primary.host, port: primary.port }, `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint::text AS lag
      FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming' AND replay_lsn IS NOT NULL`, [inst.instanceId], 2_000);
    if (!row || BigInt(row.lag) > BigInt(this.cfg.servingLagBytes)) return;
    const term = shard.primary!.term;
    await this.election.serving(inst.instanceId, 'SERVING', term);
    await this.journal.record(shard.database, shard.shard, 'ACTED', 'serve', `${inst.instanceId}: caught up (replay ${row.lag} bytes behind the primary): serving`, { term });
  }

  /**
   * Takes a replica out of routing and out of the policy's cohort before it is
   * removed: DRAINED (the gateways stop sending it reads; the keepers stop
   * tending it), then the primary's synchronous standbys without it and a new
   * rule written under them, so the remaining members hold every commit the
   * leaving one acknowledged. Returns what it recorded (the new standby names
   * and rule). Throws ElectionError('refused') when the policy needs it or
   * when it is the primary.
   */
  async removeFromCohort(database: string, shardName: string, instanceId: string): Promise<string> {
    const shard = this.watch.shard(database, shardName);
    if (!shard) throw new ElectionError(`no shard ${database}/${shardName}`, 'invalid');
    const refusal = this.removalRefusal(shard, instanceId);
    if (refusal) throw new ElectionError(refusal, 'refused');
    return this.exclusive(shard, async () => {
      const term = shard.primary!.term;
      await this.journal.awaitFree(shard.key, REQUEST_WAIT_MS);
      if (!(await this.journal.claim(database, shardName, 'policy', term, this.cfg.leaseMs))) throw new ElectionError(this.journal.whyNotClaimed(shard.key), 'busy');
      const started = Date.now();
      try {
        await this.election.serving(instanceId, 'DRAINED', term);
        for (let waited = 0; this.watch.topology.serving.get(instanceId) !== 'DRAINED'; waited += 20) {
          if (waited > 10_000) throw new ElectionError(`DRAINED of ${instanceId} did not come back from the topology log`, 'failed');
          await new Promise((r) => setTimeout(r, 20));
        }
        const now = this.watch.shard(database, shardName)!;
        const primary = now.cohort.find((i) => i.instanceId === now.primary?.instanceId);
        if (!primary || now.primary!.term !== term) throw new ElectionError(`${shard.key} changed primary meanwhile; try again`, 'busy');
        const names = await applyPolicy(now, primary);
        const rule = await writeRule({ ...now, cohort: now.members }, primary, term, this.cfg.id);
        const summary = `${instanceId} left the cohort: synchronous_standby_names = ${names}; rule ${rule} acknowledged without it`;
        await this.journal.record(database, shardName, 'COMPLETED', 'policy', summary, { term, durationMs: Date.now() - started });
        return summary;
      } finally {
        await this.journal.release(database, shardName, 'policy');
      }
    });
  }

  /** Flips an instance's serving flag under `term` (an in-place restore takes a shard's instances out of routing). */
  async setServing(instanceId: string, state: ServingState, term: bigint): Promise<void> {
    await this.election.serving(instanceId, state, term);
  }

  /** The last step of removing an instance: it leaves the topology (its processes are gone by now). */
  async deregister(instanceId: string, reason: string): Promise<void> {
    await this.election.topology(payload('InstanceDeregistered', { instanceId, reason }));
  }

  /** Why `instanceId` may not leave the shard now, or undefined when it may. */
  removalRefusal(shard: ShardView, instanceId: string): string | undefined {
    if (!shard.cohort.some((i) => i.instanceId === instanceId)) return `${instanceId} is not an instance of ${shard.key}`;
    if (!shard.primary) return `${shard.key} has no primary yet`;
    if (shard.primary.instanceId === instanceId) return `${instanceId} is the primary of ${shard.key}: switch over first (mg shard switchover ${shard.key})`;
    // What acknowledges commits without it: the primary and the replicas streaming now.
    const upstream = shard.cohort.find((i) => i.instanceId === shard.primary!.instanceId);
    const streaming = shard.members.filter((i) => {
      if (i.instanceId === instanceId) return false;
      if (i.instanceId === shard.primary!.instanceId) return true;
      const h = this.watch.fresh(i.instanceId);
      return !!h && h.reachable && h.walReceiverStatus === 'streaming' && h.upstream === `${upstream?.host}:${upstream?.port}`;
    });
    if (!canAcknowledge(shard.policy, streaming)) {
      return `the durability policy ${shard.policyText} of ${shard.key} needs ${instanceId}: without it only ${streaming.map((i) => i.instanceId).join(', ')} ` +
        'would acknowledge commits (add a replica first)';
    }
    return undefined;
  }

  /** The primary holds the rule of its term and enforces the policy; bootstraps both on a new shard. */
  private async checkPrimary(shard: ShardView, primary: InstanceRegistered): Promise<void> {
    const at = { host: primary.host, port: primary.port };
    const term = shard.primary!.term;
    const want = syncStandbyNames(shard.policy, shard.members, primary);
    const [{ names, hasRules }] = await queryAt<{ names: string; hasRules: boolean }>(at, `SELECT current_setting('synchronous_standby_names') AS names,
      to_regclass('${RULE_TABLE}') IS NOT NULL AS "hasRules"`, [], 2_000);
    const rule = hasRules ? (await queryAt<{ term: string | null }>(at, `SELECT max(term)::text AS term FROM ${RULE_TABLE}`, [], 2_000))[0].term : null;
    const ruleTerm = rule === null ? undefined : BigInt(rule);
    if (names === want && ruleTerm !== undefined && ruleTerm >= term) {
      this.state(shard.key).verifiedTerm = term;
      return;
    }
    const operation = ruleTerm === undefined ? 'bootstrap' : 'policy';
    if (!(await this.journal.claim(shard.database, shard.shard, operation, term, this.cfg.leaseMs))) return;
    repairs.inc({ kind: operation });
    const started = Date.now();
    try {
      if (names !== want) {
        await applyPolicy(shard, primary);
        await this.journal.record(shard.database, shard.shard, 'ACTED', operation, `synchronous_standby_names = ${want} on ${primary.instanceId}`, { term });
      }
      if (ruleTerm === undefined || ruleTerm < term) {
        const n = await writeRule(shard, primary, term, this.cfg.id);
        await this.journal.record(shard.database, shard.shard, 'COMPLETED', operation, `rule ${n} of term ${term} written on ${primary.instanceId}`, { term, durationMs: Date.now() - started });
      }
      this.state(shard.key).verifiedTerm = term;
    } finally {
      await this.journal.release(shard.database, shard.shard, operation);
    }
  }
}
