/**
 * Planned changes of a shard's pods with no client impact (decision 0055): a rolling update
 * replaces the replicas' pods one at a time, then asks the orchestrator for a switchover and
 * deletes the old primary's pod only once the topology log shows a new primary in a higher
 * term; one instance fewer is first removed through the orchestrator's replica path (after a
 * switchover when it is the primary), and only then does its StatefulSet shrink.
 *
 * Level-triggered: every step is decided from what is (pods and their revisions, the primary
 * and term on the topology log, the orchestrator's operations), so an operator restarted
 * mid-roll carries on. What it keeps in memory only paces it: a switchover asked for (to wait
 * for its new term) and the backoff after a refusal.
 */
import type { V1Pod } from '@kubernetes/client-node';
import type { Logger } from '../common/log.ts';
import { counter } from '../common/metrics.ts';
import { layoutInstanceId } from '../compose/spec.ts';
import type { OrchestratorApi } from './orchestrator.ts';
import type { ShardPrimary } from './topology.ts';

const podsReplaced = counter('mg_operator_pods_replaced_total', 'Pods the operator deleted to move them to a new pod template, by role', ['role']);
const switchovers = counter('mg_operator_switchover_requests_total', 'Switchovers the operator asked an orchestrator for, by result', ['result']);
const removals = counter('mg_operator_replica_removals_total', 'Instances the operator asked an orchestrator to remove before a StatefulSet shrinks, by result', ['result']);

/** How long a switchover the orchestrator accepted may take to show its new term on the topology log. */
export const SWITCHOVER_WAIT_MS = 30_000;
const BACKOFF_BASE_MS = 1_000;
const BACKOFF_MAX_MS = 60_000;

/** One shard as a reconcile sees it. */
export interface ShardContext {
  /** namespace/cluster/database/shard: what the roller's memory is keyed by. */
  key: string;
  database: string;
  shard: string;
  cells: string[];
  /** The primary and term on the topology log; undefined until the log is read to its end. */
  primary: ShardPrimary | undefined;
  orchestrator: () => Promise<OrchestratorApi>;
  log: Logger;
}

/** A StatefulSet of the shard as the API server returned it. */
export interface ShardSet {
  metadata?: { name?: string; generation?: number; labels?: Record<string, string> };
  spec?: { replicas?: number };
  status?: { observedGeneration?: number; updateRevision?: string };
}

/** Where a shard is, for the status: nothing to do is `undefined`. */
export interface ShardProgress {
  shard: string;
  reason: 'RollingUpdate' | 'ScalingDown' | 'SwitchoverFailed' | 'ReplicaRemovalFailed';
  message: string;
  failed: boolean;
  /** Look again after this long (the watches wake the reconcile sooner when pods or terms move). */
  recheckMs: number;
}

interface Backoff { failures: number; notBefore: number; reason: ShardProgress['reason']; message: string }

const ordinalOf = (pod: V1Pod) => Number(pod.metadata!.name!.slice(pod.metadata!.name!.lastIndexOf('-') + 1));
const isReady = (pod: V1Pod) => !pod.metadata?.deletionTimestamp && !!pod.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True');
const setOf = (pod: V1Pod) => pod.metadata?.ownerReferences?.find((r) => r.kind === 'StatefulSet')?.name;

export class ShardRoller {
  /** Switchovers asked for and not yet seen on the log: the term they started from. */
  private readonly asked = new Map<string, { term: number; at: number }>();
  /** Replica removals running on an orchestrator, by shard key and instance id. */
  private readonly removing = new Map<string, string>();
  private readonly backoffs = new Map<string, Backoff>();

  constructor(private readonly deletePod: (pod: V1Pod) => Promise<void>, private readonly now: () => number = Date.now) {}

  /**
   * The replicas to apply to each of the shard's StatefulSets that the spec shrinks: the current
   * count until the instance of the highest ordinal is out of the cohort, then one fewer.
   */
  async shrink(ctx: ShardContext, sets: Array<{ name: string; cell: string; current: number; desired: number }>): Promise<{ replicas: Map<string, number>; progress?: ShardProgress }> {
    const replicas = new Map<string, number>();
    const shrinking = sets.filter((s) => s.current > s.desired);
    if (shrinking.length === 0) return { replicas };
    for (const s of shrinking) replicas.set(s.name, s.current);
    const set = shrinking[0];
    const instanceId = layoutInstanceId(ctx.cells, ctx.database, ctx.shard, set.cell, set.current - 1);
    const what = `${ctx.database}/${ctx.shard}: removing ${instanceId} (pod ${set.name}-${set.current - 1})`;
    const progress = (message: string, recheckMs = 1_000): ShardProgress => ({ shard: `${ctx.database}/${ctx.shard}`, reason: 'ScalingDown', message, failed: false, recheckMs });
    if (!ctx.primary) return { replicas, progress: progress(`${what}: waiting for the shard's primary on the topology log`) };
    if (ctx.primary.primary === instanceId) return { replicas, progress: await this.switchover(ctx, `${what}: it is the primary`, 'ScalingDown') };
    this.asked.delete(ctx.key);

    const waiting = this.waitingOut(ctx);
    if (waiting) return { replicas, progress: waiting };
    const done = () => {
      this.backoffs.delete(ctx.key);
      replicas.set(set.name, set.current - 1);
      ctx.log.info({ shard: `${ctx.database}/${ctx.shard}`, instance: instanceId, statefulSet: set.name, replicas: set.current - 1 }, 'instance out of the cohort; shrinking its StatefulSet');
      return { replicas, progress: progress(`${what}: out of the cohort; shrinking ${set.name} to ${set.current - 1}`) };
    };
    try {
      const orch = await ctx.orchestrator();
      const removalKey = `${ctx.key}/${instanceId}`;
      let opId = this.removing.get(removalKey) ?? (await runningRemoval(orch, ctx, instanceId));
      if (!opId) {
        const answer = await orch.removeReplica(ctx.database, ctx.shard, instanceId);
        // Not in the cohort (never registered, or removed already): nothing stands in the way.
        if (answer.status === 404) return done();
        if (answer.status !== 202 && answer.status !== 200) {
          removals.inc({ result: 'refused' });
          return { replicas, progress: this.fail(ctx, 'ReplicaRemovalFailed', `${what}: the orchestrator answered HTTP ${answer.status}: ${answer.body?.error ?? 'no reason given'}`) };
        }
        opId = answer.body.operation.id as string;
        removals.inc({ result: 'started' });
        ctx.log.info({ shard: `${ctx.database}/${ctx.shard}`, instance: instanceId, operation: opId }, 'asked the orchestrator to remove the instance');
      }
      this.removing.set(removalKey, opId);
      const op = await orch.operation(opId);
      if (op.status === 200 && op.body.state === 'running') return { replicas, progress: progress(`${what}: ${op.body.steps?.at(-1)?.message ?? 'removal running'} (operation ${opId})`) };
      this.removing.delete(removalKey);
      if (op.status === 200 && op.body.state === 'succeeded') return done();
      removals.inc({ result: 'failed' });
      return { replicas, progress: this.fail(ctx, 'ReplicaRemovalFailed', `${what}: operation ${opId} ${op.status === 200 ? `failed: ${op.body.error}` : `is gone (HTTP ${op.status})`}`) };
    } catch (err) {
      return { replicas, progress: this.fail(ctx, 'ReplicaRemovalFailed', `${what}: ${(err as Error).message}`) };
    }
  }

  /**
   * One step of the shard's rolling update: pods whose revision is not their StatefulSet's
   * update revision are deleted (the controller recreates them on the new template) one at a
   * time, replicas first, the primary's after a switchover. Waits while any pod is not Ready.
   */
  async roll(ctx: ShardContext, sets: ShardSet[], pods: V1Pod[]): Promise<ShardProgress | undefined> {
    const shard = `${ctx.database}/${ctx.shard}`;
    const progress = (message: string): ShardProgress => ({ shard, reason: 'RollingUpdate', message, failed: false, recheckMs: 1_000 });
    const byName = new Map(sets.map((s) => [s.metadata!.name!, s]));
    if (sets.some((s) => (s.status?.observedGeneration ?? 0) < (s.metadata?.generation ?? 0))) {
      return this.outdatedOf(pods, byName).length ? progress(`${shard}: waiting for the StatefulSet controller to see the new template`) : undefined;
    }
    const outdated = this.outdatedOf(pods, byName);
    if (outdated.length === 0) {
      this.asked.delete(ctx.key);
      return undefined;
    }
    const onNew = `${pods.length - outdated.length}/${pods.length} pods on the new template`;
    const notReady = pods.filter((p) => !isReady(p));
    const missing = sets.filter((s) => pods.filter((p) => setOf(p) === s.metadata!.name).length < (s.spec?.replicas ?? 0));
    if (notReady.length || missing.length) {
      const which = notReady.length ? `pod ${notReady[0].metadata!.name} to be Ready` : `a pod of ${missing[0].metadata!.name}`;
      return progress(`${shard}: waiting for ${which} before the next (${onNew})`);
    }
    if (!ctx.primary) return progress(`${shard}: waiting for the shard's primary on the topology log (${onNew})`);
    const instanceOf = (pod: V1Pod) => layoutInstanceId(ctx.cells, ctx.database, ctx.shard, byName.get(setOf(pod)!)!.metadata!.labels!['multigres.io/cell'], ordinalOf(pod));
    const replica = outdated.find((p) => instanceOf(p) !== ctx.primary!.primary);
    if (replica) {
      // After a switchover this is the old primary, a replica now that the log shows a higher term.
      const role = this.asked.has(ctx.key) ? 'old primary' : 'replica';
      this.asked.delete(ctx.key);
      await this.deletePod(replica);
      podsReplaced.inc({ role });
      ctx.log.info({ shard, pod: replica.metadata!.name, instance: instanceOf(replica), role, primary: ctx.primary.primary, term: ctx.primary.term }, 'deleted a pod to move it to the new template');
      return progress(`${shard}: replacing pod ${replica.metadata!.name} (${instanceOf(replica)}, ${role}; ${onNew})`);
    }
    return this.switchover(ctx, `${shard}: the primary ${ctx.primary.primary} is on pod ${outdated[0].metadata!.name} (${onNew})`, 'RollingUpdate');
  }

  /** Pods whose revision is not their StatefulSet's update revision. */
  private outdatedOf(pods: V1Pod[], sets: Map<string, ShardSet>): V1Pod[] {
    return pods.filter((p) => {
      const want = sets.get(setOf(p) ?? '')?.status?.updateRevision;
      return want !== undefined && p.metadata?.labels?.['controller-revision-hash'] !== want;
    }).sort((a, b) => a.metadata!.name!.localeCompare(b.metadata!.name!));
  }

  /**
   * Moves the primary away: asks for a switchover once, then waits until the topology log shows
   * a higher term (the caller then sees the old primary as a replica). A refusal, an error or no
   * new term in time is reported and retried with a backoff.
   */
  private async switchover(ctx: ShardContext, what: string, reason: 'RollingUpdate' | 'ScalingDown'): Promise<ShardProgress> {
    const shard = `${ctx.database}/${ctx.shard}`;
    const term = ctx.primary!.term;
    let asked = this.asked.get(ctx.key);
    if (asked && term > asked.term) asked = undefined; // a new term, and still the primary: ask again
    if (asked) {
      if (this.now() - asked.at > SWITCHOVER_WAIT_MS) {
        this.asked.delete(ctx.key);
        switchovers.inc({ result: 'timeout' });
        return this.fail(ctx, 'SwitchoverFailed', `${what}: no new primary on the topology log ${SWITCHOVER_WAIT_MS / 1000} s after the switchover (term still ${term})`);
      }
      return { shard, reason, message: `${what}: switchover asked for; waiting for a term above ${asked.term} on the topology log`, failed: false, recheckMs: 1_000 };
    }
    const waiting = this.waitingOut(ctx);
    if (waiting) return waiting;
    let answer;
    try {
      answer = await (await ctx.orchestrator()).switchover(ctx.database, ctx.shard);
    } catch (err) {
      switchovers.inc({ result: 'error' });
      return this.fail(ctx, 'SwitchoverFailed', `${what}: switchover: ${(err as Error).message}`);
    }
    if (answer.status !== 200) {
      switchovers.inc({ result: 'refused' });
      return this.fail(ctx, 'SwitchoverFailed', `${what}: switchover refused: HTTP ${answer.status}: ${answer.body?.error ?? 'no reason given'}`);
    }
    switchovers.inc({ result: 'accepted' });
    this.backoffs.delete(ctx.key);
    this.asked.set(ctx.key, { term, at: this.now() });
    ctx.log.info({ shard, from: ctx.primary!.primary, term, answer: answer.body }, 'switchover accepted; waiting for the new term on the topology log');
    return { shard, reason, message: `${what}: switchover asked for; waiting for a term above ${term} on the topology log`, failed: false, recheckMs: 1_000 };
  }

  /** The last failure while its backoff runs, else undefined. */
  private waitingOut(ctx: ShardContext): ShardProgress | undefined {
    const b = this.backoffs.get(ctx.key);
    if (!b || b.notBefore <= this.now()) return undefined;
    return { shard: `${ctx.database}/${ctx.shard}`, reason: b.reason, message: b.message, failed: true, recheckMs: b.notBefore - this.now() };
  }

  private fail(ctx: ShardContext, reason: ShardProgress['reason'], message: string): ShardProgress {
    const failures = (this.backoffs.get(ctx.key)?.failures ?? 0) + 1;
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (failures - 1));
    const full = `${message}; retrying in ${Math.round(delay / 1000)} s`;
    this.backoffs.set(ctx.key, { failures, notBefore: this.now() + delay, reason, message: full });
    ctx.log.warn({ shard: `${ctx.database}/${ctx.shard}`, failures, retryInMs: delay }, message);
    return { shard: `${ctx.database}/${ctx.shard}`, reason, message: full, failed: true, recheckMs: delay };
  }

  /** The cluster is gone: forget its shards. */
  forget(prefix: string): void {
    for (const map of [this.asked, this.removing, this.backoffs]) for (const k of map.keys()) if (k.startsWith(prefix)) map.delete(k);
  }
}

/** A removal of the instance an orchestrator is running already (started before an operator restart). */
async function runningRemoval(orch: OrchestratorApi, ctx: ShardContext, instanceId: string): Promise<string | undefined> {
  const list = await orch.operations();
  if (list.status !== 200) return undefined;
  const target = `${ctx.database}/${ctx.shard} ${instanceId}`;
  return (list.body.operations as Array<{ id: string; kind: string; target: string; state: string }>)
    .find((o) => o.kind === 'replica remove' && o.target === target && o.state === 'running')?.id;
}
