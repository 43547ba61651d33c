/**
 * One reconcile of one MultigresCluster: read what is, compute what should be, make it so.
 * Level-triggered and idempotent: it never looks at which event woke it, and running it twice
 * in a row writes nothing the second time (server-side apply of unchanged objects is a no-op).
 */
import { randomBytes } from 'node:crypto';
import type { KubernetesObject } from '@kubernetes/client-node';
import type { Logger } from '../common/log.ts';
import { counter } from '../common/metrics.ts';
import { shardRanges, SpecError } from '../compose/spec.ts';
import type { KubeClient as Kube } from './kube.ts';
import type { ShardPrimary } from './topology.ts';
import {
  API_VERSION, FINALIZER, OWNED_KINDS, clusterSpecOf, credentialsSecret, desiredObjects,
  type Condition, type MultigresCluster, type MultigresDatabase,
} from './resources.ts';

const applied = counter('mg_operator_objects_applied_total', 'Objects the operator applied (created or changed)', ['kind']);
const pruned = counter('mg_operator_objects_deleted_total', 'Owned objects the operator deleted because no resource asks for them', ['kind']);

export interface ReconcileResult {
  /** Reconcile again after this long even without an event (workloads still rolling out). */
  requeueAfterMs?: number;
}

const identity = (o: KubernetesObject) => `${o.kind}/${o.metadata!.name}`;

/** Where a reconcile learns each shard's primary (operator/topology.ts; a fake in unit tests). */
export interface PrimarySource {
  primaries(clusterKey: string, where: { bootstrap: string; registryUrl: string; topicPrefix: string }, database: string, shards: string[]): ShardPrimary[];
  forget(clusterKey: string): Promise<void>;
}

export async function reconcileCluster(kube: Kube, topology: PrimarySource, namespace: string, name: string, log: Logger): Promise<ReconcileResult> {
  const cluster = await kube.getCustom<MultigresCluster>('MultigresCluster', namespace, name);
  if (!cluster) {
    await topology.forget(`${namespace}/${name}`);
    return {}; // deleted: owner references let the garbage collector take the rest
  }
  if (cluster.metadata!.deletionTimestamp) return finalize(kube, cluster, log);
  if (!cluster.metadata!.finalizers?.includes(FINALIZER)) {
    await kube.patchCustom('MultigresCluster', namespace, name, {
      metadata: { finalizers: [...(cluster.metadata!.finalizers ?? []), FINALIZER], resourceVersion: cluster.metadata!.resourceVersion },
    });
  }

  const databases = (await kube.listCustom<MultigresDatabase>('MultigresDatabase', namespace)).filter((d) => d.spec.cluster === name && !d.metadata!.deletionTimestamp);
  let spec;
  try {
    spec = clusterSpecOf(cluster, databases);
  } catch (err) {
    if (!(err instanceof SpecError)) throw err;
    // Nothing is applied from a spec that does not validate; what runs keeps running.
    await setStatus(kube, cluster, databases.length, [
      condition('Degraded', 'True', 'InvalidSpec', err.message),
      condition('Progressing', 'False', 'InvalidSpec', 'fix the spec to go on'),
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
  // Independent objects: applied together, so a reconcile costs about one round trip, not sixteen.
  const current = await Promise.all(desired.map(async (obj) => {
    const after = await kube.apply(obj);
    if (after.metadata?.resourceVersion !== versions.get(identity(obj))) applied.inc({ kind: obj.kind! });
    return after;
  }));
  for (const obj of owned) {
    if (obj.kind === 'Secret' || wanted.has(identity(obj))) continue;
    log.info({ cluster: name, object: identity(obj) }, 'deleting an object no resource asks for any more');
    await kube.delete(obj);
    pruned.inc({ kind: obj.kind! });
  }

  const where = { bootstrap: spec.kafka.bootstrap!, registryUrl: spec.registry.url!, topicPrefix: spec.kafka.topicPrefix };
  for (const db of databases) {
    const shards = shardRanges(db.spec.shards ?? 1).map((r) => r.shard);
    await setDatabaseStatus(kube, db, topology.primaries(`${namespace}/${name}`, where, db.metadata!.name!, shards));
  }
  const rollout = rolloutOf(current);
  await setStatus(kube, cluster, databases.length, rollout.conditions);
  return rollout.done ? {} : { requeueAfterMs: 5_000 };
}

/** The cluster owns its databases: deleting it deletes them, and their objects with them. */
async function adoptDatabase(kube: Kube, cluster: MultigresCluster, db: MultigresDatabase): Promise<void> {
  const refs = db.metadata!.ownerReferences ?? [];
  if (refs.some((r) => r.uid === cluster.metadata!.uid)) return;
  await kube.patchCustom('MultigresDatabase', db.metadata!.namespace!, db.metadata!.name!, {
    metadata: {
      resourceVersion: db.metadata!.resourceVersion,
      ownerReferences: [...refs, { apiVersion: API_VERSION, kind: 'MultigresCluster', name: cluster.metadata!.name, uid: cluster.metadata!.uid, blockOwnerDeletion: true }],
    },
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
 * then the instances), and only once no pod of the cluster is left remove the finalizer; the
 * garbage collector then deletes every owned object.
 */
async function finalize(kube: Kube, cluster: MultigresCluster, log: Logger): Promise<ReconcileResult> {
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
  log.info({ cluster: name }, 'drained; removing the finalizer');
  await kube.patchCustom('MultigresCluster', namespace, name, {
    metadata: { finalizers: cluster.metadata!.finalizers.filter((f) => f !== FINALIZER), resourceVersion: cluster.metadata!.resourceVersion },
  });
  return {};
}

/** Each shard's primary and term as the topology log has them. */
async function setDatabaseStatus(kube: Kube, db: MultigresDatabase, shards: ShardPrimary[]): Promise<void> {
  const status = { observedGeneration: db.metadata!.generation, shards };
  if (JSON.stringify({ observedGeneration: db.status?.observedGeneration, shards: db.status?.shards ?? [] }) === JSON.stringify(status)) return;
  await kube.patchStatus('MultigresDatabase', db.metadata!.namespace!, db.metadata!.name!, status);
}

function condition(type: Condition['type'], status: Condition['status'], reason: string, message: string): Condition {
  return { type, status, reason, message };
}

/** Writes conditions, keeping lastTransitionTime of those whose status did not change. */
async function setStatus(kube: Kube, cluster: MultigresCluster, databases: number | undefined, conditions: Condition[]): Promise<void> {
  const now = new Date().toISOString().replace(/\.\d+Z$/, 'Z');
  const previous = cluster.status?.conditions ?? [];
  const generation = cluster.metadata!.generation;
  const next = conditions.map((c) => {
    const old = previous.find((p) => p.type === c.type);
    return { ...c, observedGeneration: generation, lastTransitionTime: old && old.status === c.status ? old.lastTransitionTime : now };
  });
  const unchanged = cluster.status?.observedGeneration === generation && (databases === undefined || cluster.status?.databases === databases) &&
    JSON.stringify(next) === JSON.stringify(previous);
  if (unchanged) return;
  await kube.patchStatus('MultigresCluster', cluster.metadata!.namespace!, cluster.metadata!.name!, {
    observedGeneration: generation, conditions: next, ...(databases === undefined ? {} : { databases }),
  });
}
