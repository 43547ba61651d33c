/**
 * The Multigres operator: turns MultigresCluster and MultigresDatabase resources into
 * Kubernetes objects and keeps them so (docs/operator.md). Only the replica holding the
 * Lease watches and writes; the others wait for it. Configuration from the environment:
 *   KUBECONFIG (else in-cluster), MG_OPERATOR_NAMESPACE (watch one namespace; default all),
 *   MG_OPERATOR_LEASE_NAMESPACE, MG_OPERATOR_LEASE_NAME, MG_OPERATOR_IDENTITY,
 *   MG_OPERATOR_LEASE_SECONDS, MG_OPERATOR_RESYNC_SECONDS, MG_OPERATOR_METRICS_PORT, MG_OPERATOR_METRICS_HOST,
 *   MG_OPERATOR_ORCHESTRATOR_URL (the orchestrators' API when the operator runs outside the cluster).
 */
import os from 'node:os';
import { KubeConfig, type KubernetesObject } from '@kubernetes/client-node';
import { z } from 'zod';
import { onShutdown } from '../common/lifecycle.ts';
import { createLogger } from '../common/log.ts';
import { counter, histogram, serveMetrics } from '../common/metrics.ts';
import { Kube, PLURALS } from './kube.ts';
import { LeaderElector } from './leader.ts';
import { WorkQueue } from './queue.ts';
import { OrchestratorClient, orchestratorUrls } from './orchestrator.ts';
import { reconcileCluster, type PodChanges } from './reconcile.ts';
import { ShardRoller } from './roll.ts';
import { TopologyReaders } from './topology.ts';
import { GROUP, LABEL_CLUSTER, LABEL_MANAGED_BY, MANAGER, VERSION, type MultigresDatabase } from './resources.ts';
import { watchForever, type WatchHandle } from './watch.ts';

const configSchema = z.object({
  MG_OPERATOR_NAMESPACE: z.string().min(1).optional(),
  MG_OPERATOR_LEASE_NAMESPACE: z.string().min(1).default('multigres-system'),
  MG_OPERATOR_LEASE_NAME: z.string().min(1).default('multigres-operator'),
  MG_OPERATOR_IDENTITY: z.string().min(1).default(`${os.hostname()}-${process.pid}`),
  MG_OPERATOR_LEASE_SECONDS: z.coerce.number().int().min(2).max(300).default(15),
  MG_OPERATOR_RESYNC_SECONDS: z.coerce.number().int().min(5).max(86_400).default(300),
  MG_OPERATOR_METRICS_PORT: z.coerce.number().int().min(0).max(65535).default(9500),
  /** 0.0.0.0 in a pod (probes and Prometheus reach the pod's address). */
  MG_OPERATOR_METRICS_HOST: z.string().min(1).default('0.0.0.0'),
  /** Outside the cluster the orchestrators' Services do not resolve: one URL for every cluster's orchestrator API. */
  MG_OPERATOR_ORCHESTRATOR_URL: z.string().url().optional(),
});

const log = createLogger('operator');
const parsed = configSchema.safeParse(process.env);
if (!parsed.success) {
  log.fatal({ issues: parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`) }, 'invalid operator configuration');
  process.exit(2);
}
const config = parsed.data;
const reconciles = counter('mg_operator_reconciles_total', 'Cluster reconciles, by result', ['result']);
const reconcileSeconds = histogram('mg_operator_reconcile_seconds', 'Time one cluster reconcile took', [], [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]);

const kc = new KubeConfig();
kc.loadFromDefault();
const kube = new Kube(kc);
const queue = new WorkQueue();
const known = new Set<string>();
const topology = new TopologyReaders(log, (key) => queue.add(key));
const podChanges: PodChanges = {
  roller: new ShardRoller((pod) => kube.deletePod(pod)),
  orchestrator: (cluster, token) => new OrchestratorClient(orchestratorUrls(cluster, config.MG_OPERATOR_ORCHESTRATOR_URL), token),
};
const watches: WatchHandle[] = [];
const elector = new LeaderElector(kc, {
  namespace: config.MG_OPERATOR_LEASE_NAMESPACE, name: config.MG_OPERATOR_LEASE_NAME,
  identity: config.MG_OPERATOR_IDENTITY, leaseSeconds: config.MG_OPERATOR_LEASE_SECONDS, log,
});
const metricsServer = await serveMetrics(config.MG_OPERATOR_METRICS_PORT, () => true, undefined, config.MG_OPERATOR_METRICS_HOST);
log.info({ identity: config.MG_OPERATOR_IDENTITY, namespace: config.MG_OPERATOR_NAMESPACE ?? '(all)', metricsPort: config.MG_OPERATOR_METRICS_PORT }, 'operator started; waiting for the lease');

const enqueue = (namespace: string | undefined, cluster: string | undefined) => {
  if (!namespace || !cluster) return;
  const key = `${namespace}/${cluster}`;
  known.add(key);
  queue.add(key);
};

/** Each database's vschemaRef (namespace/database to namespace/ConfigMap and its cluster), so a ConfigMap change wakes the cluster that reads it. */
const vschemaRefs = new Map<string, { configMap: string; cluster: string }>();

function noteVSchemaRef(type: string, db: MultigresDatabase): void {
  const key = `${db.metadata?.namespace}/${db.metadata?.name}`;
  if (type === 'DELETED' || !db.spec?.vschemaRef) vschemaRefs.delete(key);
  else vschemaRefs.set(key, { configMap: `${db.metadata?.namespace}/${db.spec.vschemaRef.name}`, cluster: db.spec.cluster });
}

function startWatching(): void {
  const nsPath = config.MG_OPERATOR_NAMESPACE ? `/namespaces/${config.MG_OPERATOR_NAMESPACE}` : '';
  const custom = (plural: string) => `/apis/${GROUP}/${VERSION}${nsPath}/${plural}`;
  const owned = { labelSelector: `${LABEL_MANAGED_BY}=${MANAGER}` };
  watches.push(
    watchForever(kc, custom(PLURALS.MultigresCluster), {}, log, (_t, o) => enqueue(o.metadata?.namespace, o.metadata?.name)),
    watchForever(kc, custom(PLURALS.MultigresDatabase), {}, log, (type, o) => {
      const db = o as MultigresDatabase;
      noteVSchemaRef(type, db);
      enqueue(db.metadata?.namespace, db.spec?.cluster);
    }),
  );
  // A workload's status moving (pods ready) or someone editing an owned object wakes its cluster.
  for (const path of [`/apis/apps/v1${nsPath}/statefulsets`, `/apis/apps/v1${nsPath}/deployments`, `/api/v1${nsPath}/services`]) {
    watches.push(watchForever(kc, path, owned, log, (_t, o: KubernetesObject) => enqueue(o.metadata?.namespace, o.metadata?.labels?.[LABEL_CLUSTER])));
  }
  // Every ConfigMap, not only owned ones: a database's VSchema is in one of the user's (decision 0075).
  watches.push(watchForever(kc, `/api/v1${nsPath}/configmaps`, {}, log, (_t, o: KubernetesObject) => {
    const namespace = o.metadata?.namespace;
    enqueue(namespace, o.metadata?.labels?.[LABEL_MANAGED_BY] === MANAGER ? o.metadata?.labels?.[LABEL_CLUSTER] : undefined);
    for (const ref of vschemaRefs.values()) if (ref.configMap === `${namespace}/${o.metadata?.name}`) enqueue(namespace, ref.cluster);
  }));
  // Resync: every cluster again now and then, in case an event was missed between two watches.
  setInterval(() => known.forEach((k) => queue.add(k)), config.MG_OPERATOR_RESYNC_SECONDS * 1000).unref();
}

async function work(key: string): Promise<void> {
  if (!elector.isLeader()) return;
  const [namespace, name] = key.split('/');
  const clusterLog = log.child({ cluster: key });
  const stopTimer = reconcileSeconds.startTimer();
  try {
    const result = await reconcileCluster(kube, topology, podChanges, namespace, name, clusterLog);
    queue.forget(key);
    reconciles.inc({ result: 'ok' });
    const seconds = stopTimer();
    clusterLog.debug({ ms: Math.round(seconds * 1000) }, 'reconciled');
    if (result.requeueAfterMs) setTimeout(() => queue.add(key), result.requeueAfterMs).unref();
  } catch (err) {
    stopTimer();
    reconciles.inc({ result: 'error' });
    const delay = queue.retry(key);
    clusterLog.warn({ err: (err as Error).message, retryInMs: delay }, 'reconcile failed; retrying');
  }
}

elector.start(() => {
  startWatching();
  void queue.run(work);
}, () => {
  // Another replica may act from now on: stop at once (a restart starts clean as a follower).
  process.exit(1);
});

onShutdown(log, async () => {
  watches.forEach((w) => w.stop());
  queue.stop();
  await topology.close();
  await elector.release();
  await metricsServer.close();
});
