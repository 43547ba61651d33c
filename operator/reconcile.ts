/**
 * One reconcile of one MultigresCluster: read what is, compute what should be, make it so.
 * Level-triggered and idempotent: it never looks at which event woke it, and running it twice
 * in a row writes nothing the second time (server-side apply of unchanged objects is a no-op).
 */
import { randomBytes } from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';
import type { KubernetesObject } from '@kubernetes/client-node';
import type { Logger } from '../common/log.ts';
import { counter } from '../common/metrics.ts';
import { instanceGroups, shardRanges, SpecError, type ClusterSpec } from '../compose/spec.ts';
import type { VSchemaRecord } from '../schemas/index.ts';
import type { KubeClient as Kube } from './kube.ts';
import type { OrchestratorApi } from './orchestrator.ts';
import { DATABASE_FINALIZER, forgetTopologyRetries, reconcileTopology, retireDatabase, type Retirement, type TopologyLog } from './publish.ts';
import type { LogAddress, ShardPrimary } from './topology.ts';
import {
  API_VERSION, FINALIZER, LABEL_CLUSTER, OWNED_KINDS, clusterSpecOf, credentialsSecret, desiredObjects, names, shardLabel,
  type Condition, type Manifest, type MultigresCluster, type MultigresDatabase,
} from './resources.ts';
import type { ShardContext, ShardProgress, ShardRoller, ShardSet } from './roll.ts';
import { reconcileVSchema, type VSchemaOutcome } from './vschema.ts';

const applied = counter('mg_operator_objects_applied_total', 'Objects the operator applied (created or changed)', ['kind']);
const pruned = counter('mg_operator_objects_deleted_total', 'Owned objects the operator deleted because no resource asks for them', ['kind']);

export interface ReconcileResult {
  /** Reconcile again after this long even without an event (workloads still rolling out). */
  requeueAfterMs?: number;
}

const identity = (o: KubernetesObject) => `${o.kind}/${o.metadata!.name}`;

/**
 * The cluster's topology log: each shard's primary, registered instances, and the fold itself for publishing
 * the planned topology (operator/topology.ts; a fake in unit tests).
 */
export interface TopologySource extends TopologyLog {
  primaries(clusterKey: string, where: LogAddress, database: string, shards: string[]): { caughtUp: boolean; shards: ShardPrimary[] };
  vschema(clusterKey: string, where: LogAddress, database: string): { caughtUp: boolean; record?: VSchemaRecord };
  registered(clusterKey: string, where: LogAddress, databases: string[]): string[] | undefined;
  deregister(clusterKey: string, where: LogAddress, instanceIds: string[], reason: string): Promise<void>;
  forget(clusterKey: string): Promise<void>;
}

/** Planned changes of shards' pods (operator/roll.ts) and the orchestrators they ask. */
export interface PodChanges {
  roller: ShardRoller;
  /** The cluster's orchestrators, called with its API token. */
  orchestrator(cluster: MultigresCluster, token: string): OrchestratorApi;
}

export async function reconcileCluster(kube: Kube, topology: TopologySource, changes: PodChanges, namespace: string, name: string, log: Logger): Promise<ReconcileResult> {
  const cluster = await kube.getCustom<MultigresCluster>('MultigresCluster', namespace, name);
  if (!cluster) {
    // Its databases go with it (the garbage collector): the cluster's finalizer deregistered their instances.
    for (const db of await kube.listCustom<MultigresDatabase>('MultigresDatabase', namespace)) {
      if (db.spec.cluster === name && db.metadata!.deletionTimestamp) await releaseDatabase(kube, db);
    }
    await topology.forget(`${namespace}/${name}`);
    changes.roller.forget(`${namespace}/${name}/`);
    forgetTopologyRetries(`${namespace}/${name}`);
    return {}; // deleted: owner references let the garbage collector take the rest
  }
  if (cluster.metadata!.deletionTimestamp) return finalize(kube, topology, cluster, log);
  if (!cluster.metadata!.finalizers?.includes(FINALIZER)) {
    await kube.patchCustom('MultigresCluster', namespace, name, {
      metadata: { finalizers: [...(cluster.metadata!.finalizers ?? []), FINALIZER], resourceVersion: cluster.metadata!.resourceVersion },
    });
  }

  const ofCluster = (await kube.listCustom<MultigresDatabase>('MultigresDatabase', namespace)).filter((d) => d.spec.cluster === name);
  const databases = ofCluster.filter((d) => !d.metadata!.deletionTimestamp);
  // Deleted, held by the operator's finalizer until its database is dropped on the log (decision 0078).
  const leaving = ofCluster.filter((d) => d.metadata!.deletionTimestamp && d.metadata!.finalizers?.includes(DATABASE_FINALIZER));
  let spec;
  try {
    spec = clusterSpecOf(cluster, databases);
  } catch (err) {
    if (!(err instanceof SpecError)) throw err;
    // Nothing is applied from a spec that does not validate; what runs keeps running.
    await setStatus(kube, cluster, databases.length, [
      condition('Degraded', 'True', 'InvalidSpec', err.message),
      condition('Progressing', 'False', 'InvalidSpec', 'fix the spec to go on'),
      // What the log holds did not change: nothing is published from an invalid spec.
      ...(cluster.status?.conditions ?? []).filter((c) => c.type === 'TopologyPublished'),
    ]);
    log.warn({ cluster: name, err: err.message }, 'invalid cluster spec');
    return {};
  }

  for (const db of databases) await adoptDatabase(kube, cluster, db);
  await kube.createIfMissing(credentialsSecret(cluster, (n) => randomBytes(n).toString('base64url')));
  const desired = desiredObjects(cluster, databases, spec);
  const wanted = new Set(desired.map(identity));
  const owned = (await Promise.all(OWNED_KINDS.map((k) => kube.listOwned(k.apiVersion, k.kind, namespace, name)))).flat();
  const versions = new Map(owned.map((o) => [identity(o), o.metadata!.resourceVersion]));

  const where = { bootstrap: spec.kafka.bootstrap!, registryUrl: spec.registry.url!, topicPrefix: spec.kafka.topicPrefix };
  const primaries = new Map(databases.map((db) => [db.metadata!.name!, topology.primaries(`${namespace}/${name}`, where, db.metadata!.name!, shardRanges(db.spec.shards ?? 1).map((r) => r.shard))]));
  let token: Promise<string> | undefined;
  const orchestrator = async () => {
    token ??= kube.secretValue(namespace, names.credentials(name), 'orchestrator-api-token').then((t) => t ?? Promise.reject(new Error(`Secret ${names.credentials(name)} has no orchestrator-api-token`)));
    return changes.orchestrator(cluster, await token);
  };
  const shardContext = (db: string, shard: string): ShardContext => {
    const p = primaries.get(db)!;
    return { key: `${namespace}/${name}/${db}/${shard}`, database: db, shard, cells: spec.cells, primary: p.caughtUp ? p.shards.find((s) => s.shard === shard) : undefined, orchestrator, log };
  };
  const deactivated = new Set(databases.filter((db) => db.spec.deactivated).map((db) => db.metadata!.name!));
  const active = databases.map((db) => db.metadata!.name!).filter((db) => !deactivated.has(db));
  const progress = await shrinkThroughReplicaPath(kube, changes.roller, shardContext, spec, active, owned as Workload[], desired);
  const shrinking = new Set(progress.map((p) => p.shard));
  const retirements: Retirement[] = [];
  for (const db of leaving) {
    const dbName = db.metadata!.name!;
    retirements.push(await retireDatabase(topology, `${namespace}/${name}`, where, dbName,
      async () => (await kube.listPods(namespace, { [LABEL_CLUSTER]: name, 'multigres.io/database': dbName })).length,
      () => releaseDatabase(kube, db)));
  }
  const heldBack = new Set(leaving.filter((_, i) => retirements[i].hold).map((d) => d.metadata!.uid!));
  for (const r of retirements) log.info({ cluster: name, step: r.message }, 'deleting a database');
  // Independent objects: applied together, so a reconcile costs about one round trip, not sixteen.
  const current = await Promise.all(desired.map(async (obj) => {
    const after = await kube.apply(obj);
    if (after.metadata?.resourceVersion !== versions.get(identity(obj))) applied.inc({ kind: obj.kind! });
    return after;
  }));
  for (const obj of owned) {
    if (obj.kind === 'Secret' || wanted.has(identity(obj)) || progress.some((p) => p.holds?.includes(obj.metadata!.name!))) continue;
    if (obj.metadata!.ownerReferences?.some((r) => heldBack.has(r.uid))) continue; // a deleted database's, until it is dropped on the log
    log.info({ cluster: name, object: identity(obj) }, 'deleting an object no resource asks for any more');
    await kube.delete(obj);
    pruned.inc({ kind: obj.kind! });
  }

  // The cells, databases and shards on the topology log, as `mg cluster up` publishes them (decision 0078):
  // before the VSchemas, which the orchestrator accepts only for a database on the log.
  const topologyStep = await reconcileTopology(topology, `${namespace}/${name}`, where, spec, deactivated);
  if (topologyStep.published.length) log.info({ cluster: name, events: topologyStep.published }, 'published the planned topology');
  if (topologyStep.condition.status === 'False') log.warn({ cluster: name, reason: topologyStep.condition.reason, err: topologyStep.condition.message }, 'topology not published');

  let vschemaRetryMs: number | undefined;
  for (const db of databases) {
    const vschema = await reconcileVSchema(kube, db, topology.vschema(`${namespace}/${name}`, where, db.metadata!.name!), orchestrator);
    if (vschema.retryMs) vschemaRetryMs = vschema.retryMs;
    await setDatabaseStatus(kube, db, primaries.get(db.metadata!.name!)!.shards, vschema);
  }

  // Pods on an old template: replaced one at a time per shard, the primary's last and after a switchover.
  const pods = active.length ? await kube.listPods(namespace, { [LABEL_CLUSTER]: name, 'app.kubernetes.io/component': 'postgres' }) : [];
  for (const group of uniqueShards(spec, active)) {
    const shard = `${group.database}/${group.shard}`;
    if (shrinking.has(shard)) continue;
    const sets = current.filter((o) => o.kind === 'StatefulSet' && ofShard(o, group)) as ShardSet[];
    const step = await changes.roller.roll(shardContext(group.database, group.shard), sets, pods.filter((p) => ofShard(p, group)));
    if (step) progress.push(step);
  }

  const rollout = rolloutOf(current);
  const pending = retirements.filter((r) => !r.done);
  let conditions = progress.length ? withProgress(rollout.conditions, progress) : rollout.conditions;
  if (pending.length) conditions = conditions.map((c) => (c.type === 'Progressing' ? condition('Progressing', 'True', 'DeletingDatabase', pending.map((r) => r.message).join('; ')) : c));
  await setStatus(kube, cluster, databases.length, [...conditions, topologyStep.condition]);
  const recheck = [...pending.flatMap((r) => (r.retryMs ? [r.retryMs] : [])), ...progress.map((p) => p.recheckMs), ...(rollout.done ? [] : [5_000]), ...(vschemaRetryMs ? [vschemaRetryMs] : []), ...(topologyStep.retryMs ? [topologyStep.retryMs] : [])];
  return recheck.length ? { requeueAfterMs: Math.min(...recheck) } : {};
}

/** Whether a StatefulSet or pod is one of the shard's (by the labels every one of them carries). */
function ofShard(o: KubernetesObject, { database, shard }: { database: string; shard: string }): boolean {
  return o.metadata?.labels?.['multigres.io/database'] === database && o.metadata?.labels?.['multigres.io/shard'] === shardLabel(shard);
}

/** Each (database, shard) of the active databases once, in the plan's order. */
function uniqueShards(spec: ClusterSpec, active: string[]): Array<{ database: string; shard: string }> {
  const seen = new Map<string, { database: string; shard: string }>();
  for (const g of instanceGroups(spec)) if (active.includes(g.database)) seen.set(`${g.database}/${g.shard}`, { database: g.database, shard: g.shard });
  return [...seen.values()];
}

/**
 * One instance fewer goes through the orchestrator's replica path before its pod goes: each
 * StatefulSet the spec shrinks keeps its replicas (in `desired`, changed in place) until the
 * instance of its highest ordinal is out of the cohort. A set no longer desired at all (its
 * cell holds no instance of the shard any more) is scaled down the same way and kept from
 * pruning until it is at zero; the progress says which (`holds`).
 */
async function shrinkThroughReplicaPath(
  kube: Kube, roller: ShardRoller, shardContext: (db: string, shard: string) => ShardContext, spec: ClusterSpec,
  active: string[], owned: Workload[], desired: Manifest[],
): Promise<Array<ShardProgress & { holds?: string[] }>> {
  const out: Array<ShardProgress & { holds?: string[] }> = [];
  const desiredSets = new Map(desired.filter((o) => o.kind === 'StatefulSet').map((o) => [o.metadata!.name!, o as Manifest & { spec: { replicas: number } }]));
  for (const group of uniqueShards(spec, active)) {
    const sets = owned.filter((o) => o.kind === 'StatefulSet' && ofShard(o, group) && spec.cells.includes(o.metadata!.labels?.['multigres.io/cell'] ?? ''));
    const { replicas, progress } = await roller.shrink(shardContext(group.database, group.shard), sets.map((s) => ({
      name: s.metadata!.name!, cell: s.metadata!.labels!['multigres.io/cell'], current: s.spec?.replicas ?? 0, desired: desiredSets.get(s.metadata!.name!)?.spec.replicas ?? 0,
    })));
    const holds: string[] = [];
    for (const [setName, n] of replicas) {
      const want = desiredSets.get(setName);
      if (want) {
        want.spec.replicas = n;
        continue;
      }
      const set = sets.find((s) => s.metadata!.name === setName)!;
      if (n < (set.spec?.replicas ?? 0)) await kube.scale(set, n);
      if (n > 0) holds.push(setName);
    }
    if (progress) out.push({ ...progress, holds });
  }
  return out;
}

/** The conditions with the shards' planned changes: Progressing names them, a failing one degrades the cluster. */
function withProgress(conditions: Condition[], progress: ShardProgress[]): Condition[] {
  const failed = progress.filter((p) => p.failed);
  const messages = (list: ShardProgress[]) => list.map((p) => p.message).join('; ');
  return conditions.map((c) => {
    if (c.type === 'Progressing') return condition('Progressing', 'True', (failed[0] ?? progress[0]).reason, messages(progress));
    if (c.type === 'Degraded' && failed.length) return condition('Degraded', 'True', failed[0].reason, messages(failed));
    return c;
  });
}

/**
 * The cluster owns its databases: deleting it deletes them, and their objects with them. Each carries the
 * finalizer that drops it on the topology log when it is deleted on its own (decision 0078).
 */
async function adoptDatabase(kube: Kube, cluster: MultigresCluster, db: MultigresDatabase): Promise<void> {
  const refs = db.metadata!.ownerReferences ?? [];
  const finalizers = db.metadata!.finalizers ?? [];
  const owned = refs.some((r) => r.uid === cluster.metadata!.uid);
  if (owned && finalizers.includes(DATABASE_FINALIZER)) return;
  await kube.patchCustom('MultigresDatabase', db.metadata!.namespace!, db.metadata!.name!, {
    metadata: {
      resourceVersion: db.metadata!.resourceVersion,
      ...(owned ? {} : { ownerReferences: [...refs, { apiVersion: API_VERSION, kind: 'MultigresCluster', name: cluster.metadata!.name, uid: cluster.metadata!.uid, blockOwnerDeletion: true }] }),
      ...(finalizers.includes(DATABASE_FINALIZER) ? {} : { finalizers: [...finalizers, DATABASE_FINALIZER] }),
    },
  });
}

/** Lets a deleted database resource go (its finalizer removed). */
async function releaseDatabase(kube: Kube, db: MultigresDatabase): Promise<void> {
  const finalizers = db.metadata!.finalizers ?? [];
  if (!finalizers.includes(DATABASE_FINALIZER)) return;
  await kube.patchCustom('MultigresDatabase', db.metadata!.namespace!, db.metadata!.name!, {
    metadata: { finalizers: finalizers.filter((f) => f !== DATABASE_FINALIZER), resourceVersion: db.metadata!.resourceVersion },
  });
}

interface Workload extends KubernetesObject {
  spec?: { replicas?: number };
  status?: { observedGeneration?: number; readyReplicas?: number; updatedReplicas?: number; replicas?: number };
}

/** Ready, Progressing and Degraded from what the workload controllers report, never guessed. */
function rolloutOf(owned: KubernetesObject[]): { done: boolean; conditions: Condition[] } {
  const workloads = owned.filter((o) => o.kind === 'StatefulSet' || o.kind === 'Deployment') as Workload[];
  const behind = workloads.filter((w) => {
    const want = w.spec?.replicas ?? 1;
    const s = w.status ?? {};
    return (s.observedGeneration ?? 0) < (w.metadata!.generation ?? 0) || (s.readyReplicas ?? 0) < want || (s.replicas ?? 0) > want;
  });
  const want = workloads.reduce((n, w) => n + (w.spec?.replicas ?? 1), 0);
  const ready = workloads.reduce((n, w) => n + Math.min(w.status?.readyReplicas ?? 0, w.spec?.replicas ?? 1), 0);
  const summary = `${ready}/${want} pods ready in ${workloads.length} workloads`;
  if (behind.length === 0) {
    return { done: true, conditions: [condition('Ready', 'True', 'AllReady', summary), condition('Progressing', 'False', 'RolledOut', summary), condition('Degraded', 'False', 'AsExpected', '')] };
  }
  const waiting = behind.slice(0, 5).map((w) => `${w.kind}/${w.metadata!.name}`).join(', ') + (behind.length > 5 ? ', ...' : '');
  return {
    done: false,
    conditions: [
      condition('Ready', 'False', 'PodsNotReady', `${summary}; waiting for ${waiting}`),
      condition('Progressing', 'True', 'RollingOut', summary),
      condition('Degraded', 'False', 'AsExpected', ''),
    ],
  };
}

/**
 * Deletion: drain first (gateways to zero so clients leave through the remaining ones' Service,
 * then the instances); once no pod of the cluster is left, deregister its databases' instances on
 * the topology log (no orchestrator is left to do it, and the log outlives the cluster), and only
 * then remove the finalizer; the garbage collector then deletes every owned object.
 */
async function finalize(kube: Kube, topology: TopologySource, cluster: MultigresCluster, log: Logger): Promise<ReconcileResult> {
  const { namespace, name } = cluster.metadata! as { namespace: string; name: string };
  if (!cluster.metadata!.finalizers?.includes(FINALIZER)) return {};
  const workloads = (await Promise.all(['Deployment', 'StatefulSet'].map((kind) => kube.listOwned('apps/v1', kind, namespace, name)))).flat() as Workload[];
  const running = workloads.filter((w) => (w.status?.replicas ?? 0) > 0);
  for (const w of workloads) {
    if ((w.spec?.replicas ?? 1) === 0) continue;
    await kube.scale(w, 0);
  }
  if (running.length > 0) {
    await setStatus(kube, cluster, undefined, [condition('Ready', 'False', 'Draining', `waiting for ${running.length} workloads to stop`), condition('Progressing', 'True', 'Draining', 'deleting')]);
    return { requeueAfterMs: 1_000 };
  }
  const resources = (await kube.listCustom<MultigresDatabase>('MultigresDatabase', namespace)).filter((d) => d.spec.cluster === name);
  const databases = resources.map((d) => d.metadata!.name!);
  const where = { bootstrap: cluster.spec.kafka.bootstrap, registryUrl: cluster.spec.registry.url, topicPrefix: cluster.spec.kafka.topicPrefix ?? '' };
  const instances = topology.registered(`${namespace}/${name}`, where, databases);
  if (!instances) {
    await setStatus(kube, cluster, undefined, [condition('Ready', 'False', 'Draining', 'drained; reading the topology log to deregister the instances'), condition('Progressing', 'True', 'Draining', 'deleting')]);
    return { requeueAfterMs: 1_000 };
  }
  if (instances.length) {
    await topology.deregister(`${namespace}/${name}`, where, instances, `cluster ${namespace}/${name} deleted`);
    log.info({ cluster: name, instances }, 'deregistered the instances on the topology log');
  }
  // Its databases go with it (the garbage collector, next): their instances are deregistered above, so their own finalizers have nothing left to do.
  for (const db of resources) await releaseDatabase(kube, db);
  log.info({ cluster: name }, 'drained; removing the finalizer');
  await kube.patchCustom('MultigresCluster', namespace, name, {
    metadata: { finalizers: cluster.metadata!.finalizers.filter((f) => f !== FINALIZER), resourceVersion: cluster.metadata!.resourceVersion },
  });
  return {};
}

/** Each shard's primary and term as the topology log has them, and where its VSchema stands (written only when something changed). */
async function setDatabaseStatus(kube: Kube, db: MultigresDatabase, shards: ShardPrimary[], vschema: VSchemaOutcome): Promise<void> {
  const previous = db.status?.conditions ?? [];
  const conditions = vschema.condition ? withTransitionTime([vschema.condition], previous, db.metadata!.generation) : db.spec.vschemaRef ? previous : [];
  const status = {
    observedGeneration: db.metadata!.generation, shards, conditions,
    ...(vschema.sent !== undefined ? { vschema: vschema.sent } : {}),
  };
  const held = { observedGeneration: db.status?.observedGeneration, shards: db.status?.shards ?? [], conditions: previous, ...(vschema.sent !== undefined ? { vschema: db.status?.vschema ?? null } : {}) };
  if (sameJson(held, status)) return;
  await kube.patchStatus('MultigresDatabase', db.metadata!.namespace!, db.metadata!.name!, status);
}

/** Equal as JSON, whatever the order of keys: the API server returns them sorted, not in the order written. */
function sameJson(a: unknown, b: unknown): boolean {
  return isDeepStrictEqual(JSON.parse(JSON.stringify(a)), JSON.parse(JSON.stringify(b)));
}

function condition(type: Condition['type'], status: Condition['status'], reason: string, message: string): Condition {
  return { type, status, reason, message };
}

/** The conditions with observedGeneration, keeping lastTransitionTime of those whose status did not change. */
function withTransitionTime(conditions: Condition[], previous: Condition[], generation: number | undefined): Condition[] {
  const now = new Date().toISOString().replace(/\.\d+Z$/, 'Z');
  return conditions.map((c) => {
    const old = previous.find((p) => p.type === c.type);
    return { ...c, observedGeneration: generation, lastTransitionTime: old && old.status === c.status ? old.lastTransitionTime : now };
  });
}

/** Writes conditions, keeping lastTransitionTime of those whose status did not change. */
async function setStatus(kube: Kube, cluster: MultigresCluster, databases: number | undefined, conditions: Condition[]): Promise<void> {
  const previous = cluster.status?.conditions ?? [];
  const generation = cluster.metadata!.generation;
  const next = withTransitionTime(conditions, previous, generation);
  const unchanged = cluster.status?.observedGeneration === generation && (databases === undefined || cluster.status?.databases === databases) &&
    sameJson(next, previous);
  if (unchanged) return;
  await kube.patchStatus('MultigresCluster', cluster.metadata!.namespace!, cluster.metadata!.name!, {
    observedGeneration: generation, conditions: next, ...(databases === undefined ? {} : { databases }),
  });
}
