/**
 * The operator against a real Kubernetes control plane (etcd, kube-apiserver and
 * kube-controller-manager built from upstream, test/support/control-plane.ts): the kustomize
 * base installed with kubectl, two operator processes with the RBAC of that base, and a
 * 1-database 3-instance cluster taken through creation, readiness, spec changes, rolling
 * updates, scaling through the replica path, a leader's death and deletion.
 *
 * Two parts are played by the test: the kubelet's (no kubelet runs here: the test marks pods
 * Running and Ready itself, the way kwok would, and containers never start) and the
 * orchestrator's (no orchestrator pod runs: the operator is pointed at an HTTP server of the
 * test through MG_OPERATOR_ORCHESTRATOR_URL, which records each request and, for a switchover,
 * publishes the PrimaryChanged a real orchestrator would on the test's real Kafka; a VSchema it
 * validates with the project's own parseVSchema, refusing as the admin API does, and publishes). What only a
 * real cluster verifies: the orchestrator's own switchover and replica removal (their tests are
 * the orchestrator's), and pods that really stop and start (docs/operator.md).
 */
import assert from 'node:assert/strict';
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import YAML from 'yaml';
import {
  ApiextensionsV1Api, CoordinationV1Api, CoreV1Api, CustomObjectsApi, KubernetesObjectApi, PatchStrategy, setHeaderOptions,
  type KubeConfig, type V1Pod,
} from '@kubernetes/client-node';
import { OPERATOR_NAMESPACE, startControlPlane, type ControlPlane } from '../support/control-plane.ts';
import { bootstrap, registryUrl, testEventLog, uniquePrefix } from '../support/env.ts';
import { until } from '../support/wait.ts';
import { applyTopologyEvent, emptyTopology, kindOf, parseVSchema, payload, topologyKey, VSchemaError, type TopologyEvent, type TopologyState } from '../../schemas/index.ts';
import { parseSpec } from '../../compose/spec.ts';
import { topologyToPublish } from '../../compose/topology.ts';
import { vschemaFaults } from '../../orchestrator/api/vschemas.ts';
import type { EventLog } from '../../common/eventlog.ts';
import { nodeArgs } from '../../compose/launch.ts';

const runFile = promisify(execFile);
const repoRoot = path.resolve(import.meta.dirname, '..', '..');
const base = Number(process.env.MG_TEST_PORT_BASE ?? 30_000) + 2700;
const ns = 'mgtest';
const group = { group: 'multigres.io', version: 'v1alpha1', namespace: ns };
const mergePatch = setHeaderOptions('Content-Type', PatchStrategy.MergePatch);
const figures: string[] = [];

let cp: ControlPlane;
let admin: KubeConfig;
let custom: CustomObjectsApi;
let core: CoreV1Api;
let objects: KubernetesObjectApi;
const operators = new Map<string, { child: ChildProcess; metricsPort: number }>();
let dir: string;
const prefix = uniquePrefix('operator');
let eventLog: EventLog;

function startOperator(identity: string, metricsPort: number): void {
  const logFile = fs.openSync(path.join(dir, `${identity}.log`), 'a');
  const child = spawn(process.execPath, nodeArgs('operator/main.ts'), {
    cwd: repoRoot, stdio: ['ignore', logFile, logFile],
    env: {
      ...process.env, KUBECONFIG: cp.kubeconfigFile('operator'), MG_OPERATOR_NAMESPACE: ns,
      MG_OPERATOR_IDENTITY: identity, MG_OPERATOR_ORCHESTRATOR_URL: `http://127.0.0.1:${base + 12}`, MG_OPERATOR_LEASE_SECONDS: '3', MG_OPERATOR_RESYNC_SECONDS: '30', MG_OPERATOR_METRICS_PORT: String(metricsPort), MG_OPERATOR_METRICS_HOST: '127.0.0.1',
    },
  });
  operators.set(identity, { child, metricsPort });
}

/** A metric of one operator's /metrics, summed over the series matching `labels` (0 when absent). */
async function metric(identity: string, name: string, labels = ''): Promise<number> {
  const res = await fetch(`http://127.0.0.1:${operators.get(identity)!.metricsPort}/metrics`);
  return (await res.text()).split('\n')
    .filter((l) => (l.startsWith(`${name} `) || l.startsWith(`${name}{`)) && l.includes(labels))
    .reduce((sum, l) => sum + Number(l.split(' ').pop()), 0);
}

async function leaseHolder(): Promise<string | undefined> {
  try {
    const lease = await admin.makeApiClient(CoordinationV1Api).readNamespacedLease({ name: 'multigres-operator', namespace: OPERATOR_NAMESPACE });
    return lease.spec?.holderIdentity ?? undefined;
  } catch {
    return undefined;
  }
}

const getCluster = (name: string) => custom.getNamespacedCustomObject({ ...group, plural: 'multigresclusters', name }) as Promise<any>;
const conditionOf = (cluster: any, type: string) => cluster.status?.conditions?.find((c: any) => c.type === type);

const OWNED = [['v1', 'ConfigMap'], ['v1', 'Secret'], ['v1', 'Service'], ['apps/v1', 'Deployment'], ['apps/v1', 'StatefulSet'], ['policy/v1', 'PodDisruptionBudget']] as const;

/** Every object the operator owns in the namespace, by Kind/name. */
async function ownedObjects(): Promise<Map<string, any>> {
  const out = new Map<string, any>();
  for (const [apiVersion, kind] of OWNED) {
    const list = await objects.list(apiVersion, kind, ns, undefined, undefined, undefined, undefined, 'app.kubernetes.io/managed-by=multigres-operator');
    for (const o of list.items) out.set(`${kind}/${o.metadata!.name}`, o);
  }
  return out;
}

/** What a user changes and expects changed: the spec (or the data) of each owned object. */
const desiredPart = (o: any) => JSON.stringify(o.spec ?? o.data ?? {});

async function snapshot(): Promise<Map<string, string>> {
  return new Map([...(await ownedObjects())].map(([k, o]) => [k, desiredPart(o)]));
}

function changed(before: Map<string, string>, after: Map<string, string>): string[] {
  const keys = new Set([...before.keys(), ...after.keys()]);
  return [...keys].filter((k) => before.get(k) !== after.get(k)).sort();
}

/** Plays the kubelet for one pod: Running and Ready. False when the pod is gone meanwhile. */
async function markReady(pod: V1Pod): Promise<boolean> {
  const now = new Date();
  try {
    await core.patchNamespacedPodStatus({
      name: pod.metadata!.name!, namespace: ns,
      body: { status: { phase: 'Running', podIP: '10.0.0.1', startTime: now, conditions: [{ type: 'Ready', status: 'True', lastTransitionTime: now }, { type: 'ContainersReady', status: 'True', lastTransitionTime: now }] } },
    }, mergePatch);
    return true;
  } catch (err: any) {
    if (err.code !== 404) throw err; // deleted since the list (a controller's roll): nothing to mark
    return false;
  }
}

/** Plays the kubelet: every pod of the namespace is Running and Ready. */
async function markPodsReady(): Promise<void> {
  for (const pod of (await core.listNamespacedPod({ namespace: ns })).items) if (!isReady(pod)) await markReady(pod);
}

/** The shard's primary on the topology log, as an orchestrator would publish it after an election. */
async function publishPrimary(instance: string, term: bigint): Promise<void> {
  const e: TopologyEvent = {
    eventId: `e-${instance}-${term}`, ts: new Date(), source: 'test',
    payload: payload('PrimaryChanged', { database: 'orders', shard: '-', primaryInstanceId: instance, term, ruleNumber: term, reason: 'test' }),
  };
  await eventLog.publisher('topology')([{ key: topologyKey(e), value: e }]);
}

/**
 * Plays the orchestrators' REST API: records every request with its bearer token; a switchover
 * answers 200 and publishes the new primary in the next term after `publishDelayMs` (so an
 * operator that deleted the old primary's pod on the answer alone would be caught); a replica
 * removal is an operation that succeeds after `removeMs`; a VSchema is applyVSchema's.
 */
const orch = {
  requests: [] as Array<{ at: number; method: string; path: string; auth: string | undefined }>,
  primary: { instance: '', term: 0n },
  handOverTo: '',
  refuseSwitchovers: 0,
  publishedAt: [] as number[],
  publishDelayMs: 1_500,
  removeMs: 1_000,
  operations: new Map<string, { id: string; kind: string; target: string; state: string; steps: Array<{ message: string }>; error: null }>(),
  vschemas: [] as Array<{ database: string; body: unknown }>,
  vschemaVersions: new Map<string, bigint>(),
};
let orchServer: http.Server;

function serveOrchestrator(port: number): Promise<void> {
  orchServer = http.createServer((req, res) => {
    let text = '';
    req.on('data', (chunk) => (text += chunk));
    req.on('end', () => answerOrchestrator(req, text, res));
  });
  return new Promise((resolve) => orchServer.listen(port, '127.0.0.1', resolve));
}

function answerOrchestrator(req: http.IncomingMessage, text: string, res: http.ServerResponse) {
  const send = (status: number, body: unknown) => res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
  orch.requests.push({ at: Date.now(), method: req.method!, path: req.url!, auth: req.headers.authorization });
  let m;
  if (req.method === 'POST' && req.url === '/v1/shards/orders/-/switchover') {
    if (orch.refuseSwitchovers > 0) {
      orch.refuseSwitchovers--;
      return send(409, { error: 'test: no replica caught up enough to hand over to' });
    }
    const previous = orch.primary.instance;
    orch.primary = { instance: orch.handOverTo, term: orch.primary.term + 1n };
    const { instance, term } = orch.primary;
    setTimeout(() => void publishPrimary(instance, term).then(() => orch.publishedAt.push(Date.now())), orch.publishDelayMs);
    return send(200, { previous, primary: instance, term: String(term) });
  }
  if (req.method === 'DELETE' && (m = /^\/v1\/shards\/orders\/-\/replicas\/([^/?]+)$/.exec(req.url!))) {
    const op = { id: randomUUID(), kind: 'replica remove', target: `orders/- ${m[1]}`, state: 'running', steps: [{ message: `${m[1]}: out of routing (DRAINED)` }], error: null };
    orch.operations.set(op.id, op);
    setTimeout(() => (op.state = 'succeeded'), orch.removeMs);
    return send(202, { operation: op });
  }
  if (req.method === 'GET' && req.url === '/v1/operations') return send(200, { operations: [...orch.operations.values()] });
  if (req.method === 'GET' && (m = /^\/v1\/operations\/([^/]+)$/.exec(req.url!))) return orch.operations.has(m[1]) ? send(200, orch.operations.get(m[1])) : send(404, { error: 'no operation' });
  if (req.method === 'PUT' && (m = /^\/v1\/databases\/([^/]+)\/vschema$/.exec(req.url!))) return void applyVSchema(m[1], JSON.parse(text)).then(({ status, answer }) => send(status, answer));
  send(404, { error: `test orchestrator: no route ${req.method} ${req.url}` });
}

/**
 * The admin API's PUT of a VSchema as a real orchestrator answers it: validated by the project's
 * parseVSchema (a 400 naming the table, column and vindex, in the route's own words), then
 * published as the next version of VSchemaApplied on the test's real topology log.
 */
async function applyVSchema(database: string, raw: unknown): Promise<{ status: number; answer: unknown }> {
  orch.vschemas.push({ database, body: raw });
  let vschema;
  try {
    vschema = parseVSchema(raw);
  } catch (err) {
    if (!(err instanceof VSchemaError)) throw err;
    const fields = vschemaFaults(err);
    return { status: 400, answer: { error: `invalid VSchema: ${fields.map((f) => `${f.field}: ${f.message}`).join('; ')}`, fields } };
  }
  const version = (orch.vschemaVersions.get(database) ?? 0n) + 1n;
  orch.vschemaVersions.set(database, version);
  const e: TopologyEvent = { eventId: randomUUID(), ts: new Date(), source: 'test', payload: payload('VSchemaApplied', { database, version, vschema: JSON.stringify(vschema) }) };
  await eventLog.publisher('topology')([{ key: topologyKey(e), value: e }]);
  return { status: 200, answer: { database, version: String(version) } };
}

/** The topology log read from its start with the project's fold, and the events the operators published on it (kind and name). */
async function readTopology(): Promise<{ state: TopologyState; published: string[] }> {
  const state = emptyTopology();
  const published: string[] = [];
  const sub = await eventLog.subscribe('topology', (e) => {
    applyTopologyEvent(state, e);
    if (e.source === 'mg-operator' && kindOf(e).kind !== 'InstanceDeregistered') published.push(describeEvent(e));
  });
  await sub.caughtUp;
  await sub.stop();
  return { state, published };
}

function describeEvent(e: TopologyEvent): string {
  const b = kindOf(e).body as { cell?: string; database?: string; shard?: string };
  return `${kindOf(e).kind} ${b.cell ?? b.database}${b.shard ? `/${b.shard}` : ''}`;
}

const dbStatus = async () => ((await custom.getNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'orders' })) as any).status;
const podsOfShard = async () => (await core.listNamespacedPod({ namespace: ns, labelSelector: 'app.kubernetes.io/component=postgres' })).items;
const isReady = (p: V1Pod) => !!p.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True');

/**
 * The kubelet, running: marks each new pod Ready once it has existed for `readyDelayMs` (a
 * container starting: an operator that did not wait for readiness would delete the next pod
 * within that time), and notes when each postgres pod (by uid) disappeared (deleted, and
 * recreated by the StatefulSet controller under the same name) and when each was marked Ready.
 */
function runKubelet(readyDelayMs = 500): { deleted: Array<{ name: string; uid: string; at: number }>; readyAt: Array<{ name: string; uid: string; at: number }>; stop: () => Promise<void> } {
  const deleted: Array<{ name: string; uid: string; at: number }> = [];
  const readyAt: Array<{ name: string; uid: string; at: number }> = [];
  const firstSeen = new Map<string, number>();
  let postgres = new Map<string, string>();
  let stopped = false;
  const loop = (async () => {
    let first = true;
    while (!stopped) {
      try {
        const pods = (await core.listNamespacedPod({ namespace: ns })).items;
        const now = new Map(pods.filter((p) => p.metadata!.labels?.['app.kubernetes.io/component'] === 'postgres').map((p) => [p.metadata!.uid!, p.metadata!.name!]));
        if (!first) for (const [uid, name] of postgres) if (!now.has(uid)) deleted.push({ name, uid, at: Date.now() });
        postgres = now;
        first = false;
        for (const pod of pods.filter((p) => !isReady(p))) {
          const uid = pod.metadata!.uid!;
          if (!firstSeen.has(uid)) firstSeen.set(uid, Date.now());
          if (Date.now() - firstSeen.get(uid)! < readyDelayMs) continue;
          if (await markReady(pod)) readyAt.push({ name: pod.metadata!.name!, uid, at: Date.now() });
        }
      } catch {
        // The API server busy for a moment: the next round tries again.
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  return { deleted, readyAt, stop: async () => { stopped = true; await loop; } };
}

/** Every postgres pod on `image`, Ready, and the cluster no longer Progressing. */
async function rolledTo(image: string, pods: number): Promise<boolean> {
  const list = await podsOfShard();
  if (list.length !== pods || !list.every((p) => isReady(p) && p.spec!.containers.find((c) => c.name === 'agent')!.image === image)) return false;
  return conditionOf(await getCluster('alpha'), 'Progressing')?.status === 'False';
}

const expectedNames = [
  'ConfigMap/alpha-spec', 'Secret/alpha-credentials',
  'Deployment/alpha-gateway', 'Service/alpha-gateway', 'PodDisruptionBudget/alpha-gateway',
  ...['zone1', 'zone2', 'zone3'].flatMap((c) => [`Deployment/alpha-orch-${c}`, `Service/alpha-orch-${c}`, `StatefulSet/alpha-orders-0-${c}`]),
  'Service/alpha-orders-0', 'PodDisruptionBudget/alpha-orders-0',
].sort();

before(async () => {
  dir = fs.mkdtempSync(path.join(process.env.MG_TEST_DIR ?? '/tmp', 'operator-'));
  let installMs = 0;
  cp = await startControlPlane({
    dir, basePort: base,
    // The CRDs go in before the controller manager starts, so its garbage collector knows them at once.
    beforeControllers: async (kc, kubeconfig) => {
      const t = Date.now();
      await runFile('kubectl', ['--kubeconfig', kubeconfig, 'apply', '-k', path.join(repoRoot, 'compose', 'k8s', 'base')]);
      const ext = kc.makeApiClient(ApiextensionsV1Api);
      await until('the CRDs to be Established', 30_000, async () => {
        const crds = await Promise.all(['multigresclusters', 'multigresdatabases'].map((p) => ext.readCustomResourceDefinition({ name: `${p}.multigres.io` })));
        return crds.every((c) => c.status?.conditions?.some((x) => x.type === 'Established' && x.status === 'True'));
      });
      installMs = Date.now() - t;
    },
  });
  figures.push(`control plane (etcd + kube-apiserver) ready in ${(cp.startMs / 1000).toFixed(1)}s; kustomize base applied with kubectl in ${(installMs / 1000).toFixed(1)}s`);
  admin = cp.kubeConfig('admin');
  custom = admin.makeApiClient(CustomObjectsApi);
  core = admin.makeApiClient(CoreV1Api);
  objects = KubernetesObjectApi.makeApiClient(admin);
  await core.createNamespace({ body: { metadata: { name: ns } } });
  eventLog = await testEventLog(prefix);
  await serveOrchestrator(base + 12);
  startOperator('op-a', base + 10);
  await until('op-a to hold the lease', 60_000, async () => (await leaseHolder()) === 'op-a');
  startOperator('op-b', base + 11);
  await until('op-b to serve metrics', 60_000, async () => {
    try {
      return (await fetch(`http://127.0.0.1:${base + 11}/healthz`)).ok;
    } catch {
      return false;
    }
  });
});

after(async () => {
  await eventLog?.close();
  orchServer?.close();
  for (const { child } of operators.values()) child.kill('SIGKILL');
  await cp?.stop();
  if (figures.length) console.log(`operator figures:\n  ${figures.join('\n  ')}`);
});

describe('the operator on a real API server', () => {
  test('a 1-database, 3-instance cluster becomes every object, owned, with a finalizer', async () => {
    const t0 = Date.now();
    await custom.createNamespacedCustomObject({ ...group, plural: 'multigresclusters', body: {
      apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresCluster', metadata: { name: 'alpha' },
      spec: {
        image: 'multigres/multigres:1.0', kafka: { bootstrap: bootstrap(), topicPrefix: prefix }, registry: { url: registryUrl() },
        cells: [{ name: 'zone1', zone: 'eu-1a' }, { name: 'zone2', zone: 'eu-1b' }, { name: 'zone3', zone: 'eu-1c' }],
      },
    } });
    await custom.createNamespacedCustomObject({ ...group, plural: 'multigresdatabases', body: {
      apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresDatabase', metadata: { name: 'orders' },
      spec: { cluster: 'alpha', instancesPerShard: 3, storage: { size: '5Gi', storageClassName: 'fast' } },
    } });
    const owned = await until('every object of the cluster', 60_000, async () => {
      const o = await ownedObjects();
      return expectedNames.every((n) => o.has(n)) && o;
    });
    figures.push(`apply of a 1-database, 3-instance cluster to all ${expectedNames.length} objects created: ${((Date.now() - t0) / 1000).toFixed(2)}s`);
    assert.deepEqual([...owned.keys()].sort(), expectedNames, 'exactly the planned objects, nothing else');

    const cluster = await getCluster('alpha');
    const db = await custom.getNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'orders' }) as any;
    assert.deepEqual(cluster.metadata.finalizers, ['multigres.io/drain']);
    assert.deepEqual(db.metadata.ownerReferences.map((r: any) => [r.kind, r.name, r.uid]), [['MultigresCluster', 'alpha', cluster.metadata.uid]]);
    for (const [key, o] of owned) {
      const [ref] = o.metadata.ownerReferences;
      const owner = key.startsWith('StatefulSet/') || key.endsWith('/alpha-orders-0') ? db : cluster;
      assert.deepEqual([ref.kind, ref.name, ref.uid, ref.controller], [owner.kind, owner.metadata.name, owner.metadata.uid, true], `owner of ${key}`);
    }

    for (const [i, zone] of ['eu-1a', 'eu-1b', 'eu-1c'].entries()) {
      const sts = owned.get(`StatefulSet/alpha-orders-0-zone${i + 1}`);
      assert.equal(sts.spec.replicas, 1, 'one instance per cell');
      assert.equal(sts.spec.serviceName, 'alpha-orders-0');
      assert.equal(sts.spec.updateStrategy.type, 'OnDelete');
      const pod = sts.spec.template.spec;
      assert.deepEqual(pod.containers.map((c: any) => c.name), ['agent', 'pooler']);
      assert.equal(pod.containers[0].image, 'multigres/multigres:1.0');
      assert.deepEqual(pod.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values, [zone]);
      assert.equal(pod.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey, 'kubernetes.io/hostname');
      assert.deepEqual(sts.spec.volumeClaimTemplates[0].spec.resources.requests, { storage: '5Gi' });
      assert.equal(sts.spec.volumeClaimTemplates[0].spec.storageClassName, 'fast');
    }
    assert.equal(owned.get('Deployment/alpha-gateway').spec.replicas, 2);
    assert.equal(owned.get('Service/alpha-orders-0').spec.clusterIP, 'None');
    assert.deepEqual(owned.get('Service/alpha-gateway').spec.ports.map((p: any) => p.port), [5432]);
    assert.equal(owned.get('PodDisruptionBudget/alpha-orders-0').spec.maxUnavailable, 1);
    assert.deepEqual(Object.keys(owned.get('Secret/alpha-credentials').data).sort(), ['orchestrator-api-token', 'postgres-password', 'rest-jwt-secret']);
    const spec = JSON.parse(owned.get('ConfigMap/alpha-spec').data['spec.json']);
    assert.deepEqual(spec.databases.map((d: any) => [d.name, d.shards, d.instancesPerShard]), [['orders', 1, 3]]);
    assert.deepEqual(spec.cells, ['zone1', 'zone2', 'zone3']);

    // kubectl shows the printer columns.
    const table = await until('kubectl get to show the status', 30_000, async () => {
      const { stdout } = await runFile('kubectl', ['--kubeconfig', cp.kubeconfigFile('admin'), '-n', ns, 'get', 'multigresclusters']);
      return /alpha\s+False\s+True\s+False\s+1\s/.test(stdout) && stdout;
    });
    assert.match(table.split('\n')[0], /NAME\s+READY\s+PROGRESSING\s+DEGRADED\s+DATABASES\s+AGE/);
  });

  test('status conditions follow the pods, and an invalid database degrades the cluster', async () => {
    let cluster = await until('Progressing while no pod is ready', 30_000, async () => {
      const c = await getCluster('alpha');
      return conditionOf(c, 'Progressing')?.status === 'True' && c;
    });
    assert.equal(conditionOf(cluster, 'Ready').status, 'False');
    assert.match(conditionOf(cluster, 'Ready').message, /0\/8 pods ready/);

    // The StatefulSet and ReplicaSet controllers create pods; without a kubelet the test makes them ready.
    await until('the 8 pods (3 instances, 2 gateways, 3 orchestrators)', 60_000, async () => (await core.listNamespacedPod({ namespace: ns })).items.length === 8);
    await markPodsReady();
    cluster = await until('Ready', 60_000, async () => {
      const c = await getCluster('alpha');
      return conditionOf(c, 'Ready')?.status === 'True' && c;
    });
    assert.equal(conditionOf(cluster, 'Progressing').status, 'False');
    assert.equal(conditionOf(cluster, 'Degraded').status, 'False');

    // Idempotent: a reconcile with nothing to change writes no object.
    const appliedBefore = await metric('op-a', 'mg_operator_objects_applied_total');
    const reconcilesBefore = await metric('op-a', 'mg_operator_reconciles_total', '{result="ok"}');
    await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresclusters', name: 'alpha', body: { metadata: { annotations: { touched: 'yes' } } } }, mergePatch);
    await until('a reconcile after the annotation', 30_000, async () => (await metric('op-a', 'mg_operator_reconciles_total', '{result="ok"}')) > reconcilesBefore);
    assert.equal(await metric('op-a', 'mg_operator_objects_applied_total'), appliedBefore, 'no object written by a no-op reconcile');

    // ANY_4 needs 4 instances: the CRD schema accepts the text, the cluster spec refuses it.
    const before = await snapshot();
    await custom.createNamespacedCustomObject({ ...group, plural: 'multigresdatabases', body: {
      apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresDatabase', metadata: { name: 'bad' }, spec: { cluster: 'alpha', instancesPerShard: 3, durability: 'ANY_4' },
    } });
    cluster = await until('Degraded', 30_000, async () => {
      const c = await getCluster('alpha');
      return conditionOf(c, 'Degraded')?.status === 'True' && c;
    });
    assert.equal(conditionOf(cluster, 'Degraded').reason, 'InvalidSpec');
    assert.match(conditionOf(cluster, 'Degraded').message, /durability needs more instances per shard/);
    assert.deepEqual(changed(before, await snapshot()), [], 'nothing applied from an invalid spec');

    await custom.deleteNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'bad' });
    await until('Degraded cleared', 30_000, async () => conditionOf(await getCluster('alpha'), 'Degraded')?.status === 'False');
    // A schema violation never reaches the operator: the API server refuses it.
    await assert.rejects(custom.createNamespacedCustomObject({ ...group, plural: 'multigresdatabases', body: {
      apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresDatabase', metadata: { name: 'worse' }, spec: { cluster: 'alpha', shards: 3 },
    } }), (err: any) => err.code === 422 && /shards/.test(typeof err.body === 'string' ? err.body : JSON.stringify(err.body)));
  });

  test("the cluster's topology is on the log as `mg cluster up` would publish it: cells, the database, its shard; a second reconcile publishes nothing", async () => {
    const cluster = await until('TopologyPublished', 60_000, async () => {
      const c = await getCluster('alpha');
      return conditionOf(c, 'TopologyPublished')?.status === 'True' && c;
    });
    assert.match(conditionOf(cluster, 'TopologyPublished').message, new RegExp(`^3 cells, 1 databases, 1 shards on the topology log \\(${bootstrap()}, prefix ${prefix}\\)$`));
    // Read back with the project's fold, as an orchestrator and every gateway read it.
    let log = await readTopology();
    assert.deepEqual([...log.state.cells.keys()].sort(), ['zone1', 'zone2', 'zone3']);
    const { createdAt, ...orders } = log.state.databases.get('orders')!;
    assert.deepEqual(orders, { durabilityPolicy: null, hostedOn: null, dropped: false, sharded: false, transactionMode: 'multi' });
    assert.ok(createdAt instanceof Date, 'created at the time of its DatabaseCreated');
    assert.deepEqual([...log.state.shards.values()].map((s) => [s.database, s.shard, s.keyRangeStart, s.keyRangeEnd]), [['orders', '-', '', '']]);
    assert.deepEqual(log.published, ['CellRegistered zone1', 'CellRegistered zone2', 'CellRegistered zone3', 'DatabaseCreated orders', 'ShardDefined orders/-']);
    // The same events `mg cluster up` publishes for the spec the pods mount (one function: compose/topology.ts).
    const spec = parseSpec(JSON.parse((await core.readNamespacedConfigMap({ name: 'alpha-spec', namespace: ns })).data!['spec.json']), 'alpha-spec');
    assert.deepEqual(topologyToPublish(spec, emptyTopology()).map((p) => describeEvent({ eventId: '', ts: new Date(), source: '', payload: p })), log.published);

    const reconciles = await metric('op-a', 'mg_operator_reconciles_total', '{result="ok"}');
    await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresclusters', name: 'alpha', body: { metadata: { annotations: { touched: 'topology' } } } }, mergePatch);
    await until('two more reconciles', 30_000, async () => (await metric('op-a', 'mg_operator_reconciles_total', '{result="ok"}')) >= reconciles + 2);
    log = await readTopology();
    assert.equal(log.published.length, 5, 'level-triggered: nothing published again');
    const { stdout } = await runFile('kubectl', ['--kubeconfig', cp.kubeconfigFile('admin'), '-n', ns, 'get', 'multigresclusters', '-o', 'wide']);
    assert.match(stdout, /TOPOLOGY/);
    assert.match(stdout.split('\n')[1], /\sTrue\s/);
  });

  test("each shard's primary and term come from the topology log, newer terms winning", async () => {
    await publishPrimary('orders-0-zone2-1', 3n);
    await until('the primary in the status', 30_000, async () => (await dbStatus())?.shards?.[0]?.term === 3);
    assert.deepEqual((await dbStatus()).shards, [{ shard: '-', primary: 'orders-0-zone2-1', term: 3 }]);
    // An older term arriving later changes nothing; a newer one does.
    await publishPrimary('orders-0-zone1-0', 2n);
    await publishPrimary('orders-0-zone3-2', 4n);
    orch.primary = { instance: 'orders-0-zone3-2', term: 4n };
    await until('term 4 in the status', 30_000, async () => (await dbStatus())?.shards?.[0]?.term === 4);
    assert.deepEqual((await dbStatus()).shards, [{ shard: '-', primary: 'orders-0-zone3-2', term: 4 }]);
    const { stdout } = await runFile('kubectl', ['--kubeconfig', cp.kubeconfigFile('admin'), '-n', ns, 'get', 'multigresdatabases']);
    assert.match(stdout, /orders\s+alpha\s+1\s+3\s+orders-0-zone3-2\s+4\s+false/);
  });

  test('a spec change produces exactly the expected object changes', async () => {
    // One more instance: the fourth goes to the first cell (instances spread over cells in order).
    let before = await snapshot();
    let t = Date.now();
    await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'orders', body: { spec: { instancesPerShard: 4 } } }, mergePatch);
    let after = await until('zone1 to hold 2 instances', 30_000, async () => {
      const s = await snapshot();
      return JSON.parse(s.get('StatefulSet/alpha-orders-0-zone1')!).replicas === 2 && s;
    });
    const scaleMs = Date.now() - t;
    await new Promise((r) => setTimeout(r, 1_000)); // anything else it would change, it changes in the same reconcile
    after = await snapshot();
    assert.deepEqual(changed(before, after), ['ConfigMap/alpha-spec', 'StatefulSet/alpha-orders-0-zone1']);
    assert.equal(JSON.parse(after.get('StatefulSet/alpha-orders-0-zone2')!).replicas, 1);
    assert.equal(JSON.parse(JSON.parse(after.get('ConfigMap/alpha-spec')!)['spec.json']).databases[0].instancesPerShard, 4);

    // A new image: every workload running Multigres containers, and nothing else.
    before = after;
    t = Date.now();
    await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresclusters', name: 'alpha', body: { spec: { image: 'multigres/multigres:1.1' } } }, mergePatch);
    after = await until('the new image everywhere', 30_000, async () => {
      const s = await snapshot();
      return [...s.entries()].filter(([k]) => /^(StatefulSet|Deployment)\//.test(k)).every(([, v]) => v.includes('multigres/multigres:1.1') && !v.includes('multigres/multigres:1.0')) && s;
    });
    const imageMs = Date.now() - t;
    await new Promise((r) => setTimeout(r, 1_000));
    after = await snapshot();
    assert.deepEqual(changed(before, after), [
      'Deployment/alpha-gateway', 'Deployment/alpha-orch-zone1', 'Deployment/alpha-orch-zone2', 'Deployment/alpha-orch-zone3',
      'StatefulSet/alpha-orders-0-zone1', 'StatefulSet/alpha-orders-0-zone2', 'StatefulSet/alpha-orders-0-zone3',
    ]);
    const sts = JSON.parse(after.get('StatefulSet/alpha-orders-0-zone1')!);
    assert.deepEqual(sts.template.spec.containers.map((c: any) => c.image), ['multigres/multigres:1.1', 'multigres/multigres:1.1']);
    figures.push(`reconcile of a spec change (event to objects changed): one more instance ${scaleMs} ms, a new image on 7 workloads ${imageMs} ms`);

    // Deactivated: every StatefulSet of the database at zero, the rest untouched.
    before = after;
    await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'orders', body: { spec: { deactivated: true } } }, mergePatch);
    after = await until('the instances scaled to zero', 30_000, async () => {
      const s = await snapshot();
      return ['zone1', 'zone2', 'zone3'].every((c) => JSON.parse(s.get(`StatefulSet/alpha-orders-0-${c}`)!).replicas === 0) && s;
    });
    assert.deepEqual(changed(before, after), ['StatefulSet/alpha-orders-0-zone1', 'StatefulSet/alpha-orders-0-zone2', 'StatefulSet/alpha-orders-0-zone3']);
    // ... and held stopped on the topology log, so the gateways refuse its clients rather than wait for pods (decision 0084).
    const held = await until('a held deactivation on the log', 15_000, async () => (await readTopology()).state.inactive.get('orders')?.held && true);
    assert.equal(held, true);
    await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'orders', body: { spec: { deactivated: false } } }, mergePatch);
    await until('the activation on the log', 15_000, async () => !(await readTopology()).state.inactive.has('orders'));
  });

  test("a new image rolls the shard's pods: replicas one at a time, then a switchover, then the old primary's pod", async () => {
    // The spec change above left 4 instances on the previous image, reactivated: their pods come back.
    const kubelet = runKubelet();
    try {
      await until('4 ready pods and a Ready cluster', 60_000, async () => (await podsOfShard()).filter(isReady).length === 4 && conditionOf(await getCluster('alpha'), 'Ready')?.status === 'True');
      const token = Buffer.from((await core.readNamespacedSecret({ name: 'alpha-credentials', namespace: ns })).data!['orchestrator-api-token'], 'base64').toString();
      const progressing = new Set<string>();
      const sampler = setInterval(() => void getCluster('alpha').then((c) => {
        const p = conditionOf(c, 'Progressing');
        if (p?.status === 'True') progressing.add(`${p.reason}: ${p.message}`);
      }, () => undefined), 150);
      orch.handOverTo = 'orders-0-zone1-0';
      const t0 = Date.now();
      kubelet.deleted.length = 0;
      await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresclusters', name: 'alpha', body: { spec: { image: 'multigres/multigres:1.2' } } }, mergePatch);
      await until('every pod replaced on the new image', 120_000, () => rolledTo('multigres/multigres:1.2', 4));
      const rollMs = Date.now() - t0;
      clearInterval(sampler);
      figures.push(`rolling update of a new image, resource patched to all 4 pods of the shard replaced and Ready (test's kubelet marks a pod Ready 0.5 s after it appears, the orchestrator answers at once and publishes the term 1.5 s later): ${(rollMs / 1000).toFixed(1)}s`);

      // The replicas' pods first (the primary orders-0-zone3-2 is on alpha-orders-0-zone3-0), one at a time.
      assert.deepEqual(kubelet.deleted.map((d) => d.name), ['alpha-orders-0-zone1-0', 'alpha-orders-0-zone1-1', 'alpha-orders-0-zone2-0', 'alpha-orders-0-zone3-0']);
      for (let i = 1; i < 4; i++) {
        const ready = kubelet.readyAt.find((r) => r.name === kubelet.deleted[i - 1].name && r.uid !== kubelet.deleted[i - 1].uid);
        assert.ok(ready && ready.at <= kubelet.deleted[i].at, `${kubelet.deleted[i].name} deleted only after ${kubelet.deleted[i - 1].name}'s replacement was Ready`);
      }
      // Then one switchover request naming the shard, with the cluster's token, and the old primary's pod only after the new term was on the log.
      const switchovers = orch.requests.filter((r) => r.at >= t0 && r.path.endsWith('/switchover'));
      assert.deepEqual(switchovers.map((r) => [r.method, r.path, r.auth]), [['POST', '/v1/shards/orders/-/switchover', `Bearer ${token}`]]);
      assert.ok(switchovers[0].at > kubelet.deleted[2].at, 'the switchover after the replicas');
      assert.ok(orch.publishedAt.length === 1 && kubelet.deleted[3].at > orch.publishedAt[0], "the old primary's pod deleted after term 5 was on the log, not on the switchover's answer");
      assert.deepEqual((await dbStatus()).shards, [{ shard: '-', primary: 'orders-0-zone1-0', term: 5 }]);
      assert.ok([...progressing].some((m) => /^RollingUpdate: orders\/-: replacing pod alpha-orders-0-zone\d-\d \(orders-0-zone\d-\d, replica; \d\/4 pods on the new template\)/.test(m)), [...progressing].join('\n'));
      assert.ok([...progressing].some((m) => /switchover asked for; waiting for a term above 4/.test(m)), [...progressing].join('\n'));
      const sts = (await ownedObjects()).get('StatefulSet/alpha-orders-0-zone1');
      assert.equal(sts.spec.updateStrategy.type, 'OnDelete', 'the operator rolls, not the StatefulSet controller');

      // A refused switchover: the primary's pod stays, the cluster is Degraded with the reason, and the operator retries.
      orch.refuseSwitchovers = 2;
      orch.handOverTo = 'orders-0-zone3-2';
      const t1 = Date.now();
      await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresclusters', name: 'alpha', body: { spec: { image: 'multigres/multigres:1.3' } } }, mergePatch);
      const degraded = await until('Degraded by the refusal', 60_000, async () => {
        const d = conditionOf(await getCluster('alpha'), 'Degraded');
        return d?.status === 'True' && d;
      });
      assert.equal(degraded.reason, 'SwitchoverFailed');
      assert.match(degraded.message, /orders\/-: the primary orders-0-zone1-0 is on pod alpha-orders-0-zone1-0 .*switchover refused: HTTP 409: test: no replica caught up enough to hand over to; retrying in \d+ s/);
      await until('the pods replaced after the retries', 120_000, () => rolledTo('multigres/multigres:1.3', 4));
      const tries = orch.requests.filter((r) => r.at >= t1 && r.path.endsWith('/switchover')).map((r) => r.at);
      assert.equal(tries.length, 3, 'two refusals, then accepted');
      assert.ok(tries[1] - tries[0] >= 1_000 && tries[2] - tries[1] >= 2_000, `the retries back off 1 s, then 2 s (${tries[1] - tries[0]} ms, ${tries[2] - tries[1]} ms)`);
      const primaryPodGone = kubelet.deleted.find((d) => d.name === 'alpha-orders-0-zone1-0' && d.at > t1)!;
      assert.ok(primaryPodGone.at > orch.publishedAt[1], "the primary's pod was left alone until the accepted switchover's term");
      assert.equal(conditionOf(await getCluster('alpha'), 'Degraded').status, 'False');
    } finally {
      await kubelet.stop();
    }
  });

  test('one instance fewer goes through the replica path: removed by the orchestrator, then its pod goes', async () => {
    const kubelet = runKubelet();
    try {
      // Four instances: the fourth, orders-0-zone1-3, is zone1's second pod and a replica (the primary is orders-0-zone3-2).
      const t0 = Date.now();
      await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'orders', body: { spec: { instancesPerShard: 3 } } }, mergePatch);
      const removal = await until('the removal request', 30_000, () => orch.requests.find((r) => r.at >= t0 && r.method === 'DELETE'));
      assert.equal(removal.path, '/v1/shards/orders/-/replicas/orders-0-zone1-3');
      assert.equal(JSON.parse((await snapshot()).get('StatefulSet/alpha-orders-0-zone1')!).replicas, 2, 'the pod stays while the orchestrator removes the instance');
      await until('zone1 down to one pod', 30_000, async () => JSON.parse((await snapshot()).get('StatefulSet/alpha-orders-0-zone1')!).replicas === 1);
      const op = [...orch.operations.values()].find((o) => o.target === 'orders/- orders-0-zone1-3')!;
      assert.equal(op.state, 'succeeded');
      assert.ok(Date.now() - removal.at >= orch.removeMs, 'shrunk only once the removal succeeded');
      await until('the pod gone', 30_000, async () => !(await podsOfShard()).some((p) => p.metadata!.name === 'alpha-orders-0-zone1-1'));

      // Two instances: the one to go, orders-0-zone3-2, is the primary: a switchover first, then its removal, then its StatefulSet.
      orch.handOverTo = 'orders-0-zone2-1';
      const t1 = Date.now();
      await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'orders', body: { spec: { instancesPerShard: 2 } } }, mergePatch);
      await until('the zone3 StatefulSet gone', 60_000, async () => !(await snapshot()).has('StatefulSet/alpha-orders-0-zone3'));
      const calls = orch.requests.filter((r) => r.at >= t1 && r.method !== 'GET').map((r) => `${r.method} ${r.path}`);
      assert.deepEqual(calls, ['POST /v1/shards/orders/-/switchover', 'DELETE /v1/shards/orders/-/replicas/orders-0-zone3-2']);
      const deleteAt = orch.requests.find((r) => r.at >= t1 && r.method === 'DELETE')!.at;
      assert.ok(deleteAt > orch.publishedAt.at(-1)!, 'removed only once the new primary was on the log');
      assert.deepEqual((await dbStatus()).shards, [{ shard: '-', primary: 'orders-0-zone2-1', term: 7 }]);

      // Back to three (the tests after this one expect the three cells' StatefulSets): a scale up is direct.
      const before = orch.requests.length;
      await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'orders', body: { spec: { instancesPerShard: 3 } } }, mergePatch);
      await until('zone3 back', 30_000, async () => (await snapshot()).has('StatefulSet/alpha-orders-0-zone3'));
      assert.equal(orch.requests.slice(before).filter((r) => r.method !== 'GET').length, 0, 'adding an instance asks the orchestrator nothing');
    } finally {
      await kubelet.stop();
    }
  });

  test("a sharded database's vschemaRef is applied once per content; a refusal, a missing ConfigMap and an unsharded database show as conditions", async () => {
    const GOOD = 'vindexes: { hash: { type: hash } }\ntables:\n  users: { column_vindexes: [{ column: id, name: hash }] }\n';
    const MORE = `${GOOD}  countries: { type: reference }\n`;
    const BAD = '{"vindexes": {"hash": {"type": "hash"}}, "tables": {"users": {"column_vindexes": [{"column": "id", "name": "nope"}]}}}';
    const setVSchema = (text: string) => core.replaceNamespacedConfigMap({ name: 'users-vschema', namespace: ns, body: { metadata: { name: 'users-vschema' }, data: { 'vschema.yaml': text } } });
    const users = async () => ((await custom.getNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'users' })) as any).status;
    const vschemaCondition = (status: any) => conditionOf({ status }, 'VSchemaApplied');
    const puts = (db = 'users') => orch.vschemas.filter((v) => v.database === db);

    await core.createNamespacedConfigMap({ namespace: ns, body: { metadata: { name: 'users-vschema' }, data: { 'vschema.yaml': GOOD } } });
    await custom.createNamespacedCustomObject({ ...group, plural: 'multigresdatabases', body: {
      apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresDatabase', metadata: { name: 'users' },
      spec: { cluster: 'alpha', sharded: true, shards: 2, instancesPerShard: 1, vschemaRef: { name: 'users-vschema', key: 'vschema.yaml' } },
    } });
    let status = await until('the VSchema applied', 60_000, async () => {
      const st = await users();
      return vschemaCondition(st)?.status === 'True' && st;
    });
    assert.equal(vschemaCondition(status).message, 'ConfigMap users-vschema key vschema.yaml is version 1 on the topology log');
    assert.deepEqual(puts().map((p) => p.body), [YAML.parse(GOOD)], 'the YAML sent as the VSchema, once');
    assert.equal(orch.requests.find((r) => r.method === 'PUT')!.auth, `Bearer ${Buffer.from((await core.readNamespacedSecret({ name: 'alpha-credentials', namespace: ns })).data!['orchestrator-api-token'], 'base64').toString()}`);
    assert.equal(status.vschema.version, 1);
    // A database resource added later: its database and its two shards on the log (before its VSchema: the orchestrator needs it there).
    // (After the orders events: its cells, database and shard, then its deactivation and activation in the spec-change test.)
    assert.deepEqual((await readTopology()).published.slice(7), ['DatabaseCreated users', 'ShardDefined users/-80', 'ShardDefined users/80-']);

    // Reconciles with nothing new send nothing.
    const reconciles = await metric('op-a', 'mg_operator_reconciles_total', '{result="ok"}');
    await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'users', body: { metadata: { annotations: { touched: 'yes' } } } }, mergePatch);
    await until('two more reconciles', 30_000, async () => (await metric('op-a', 'mg_operator_reconciles_total', '{result="ok"}')) >= reconciles + 2);
    assert.equal(puts().length, 1, 'the same content is never applied twice');

    // A changed ConfigMap is applied again, woken by the ConfigMap watch (the test's resync is 30 s).
    const t0 = Date.now();
    await setVSchema(MORE);
    status = await until('version 2', 20_000, async () => {
      const st = await users();
      return st?.vschema?.version === 2 && vschemaCondition(st)?.status === 'True' && st;
    });
    figures.push(`vschemaRef: ConfigMap changed to its VSchema applied (version 2 in the status): ${Date.now() - t0} ms`);
    assert.deepEqual(puts().map((p) => p.body), [YAML.parse(GOOD), YAML.parse(MORE)]);

    // One the orchestrator refuses: the condition carries its reason, naming the table and the vindex; not sent again.
    await setVSchema(BAD);
    status = await until('the refusal in the status', 20_000, async () => {
      const st = await users();
      return vschemaCondition(st)?.status === 'False' && st;
    });
    assert.equal(vschemaCondition(status).reason, 'InvalidVSchema');
    assert.match(vschemaCondition(status).message, /^ConfigMap users-vschema key vschema.yaml refused by the orchestrator: invalid VSchema: table users, column id: vindex nope/);
    assert.equal(status.vschema.error, vschemaCondition(status).message);
    const after = await metric('op-a', 'mg_operator_reconciles_total', '{result="ok"}');
    await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'users', body: { metadata: { annotations: { touched: 'again' } } } }, mergePatch);
    await until('two more reconciles', 30_000, async () => (await metric('op-a', 'mg_operator_reconciles_total', '{result="ok"}')) >= after + 2);
    assert.equal(puts().length, 3, 'a refused content is not sent again');

    // A ConfigMap that does not exist; an unsharded database with a vschemaRef.
    await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'users', body: { spec: { vschemaRef: { name: 'missing' } } } }, mergePatch);
    status = await until('ConfigMapNotFound', 20_000, async () => {
      const st = await users();
      return vschemaCondition(st)?.reason === 'ConfigMapNotFound' && st;
    });
    assert.equal(vschemaCondition(status).message, `ConfigMap missing (vschemaRef) does not exist in namespace ${ns}`);
    await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'orders', body: { spec: { vschemaRef: { name: 'users-vschema', key: 'vschema.yaml' } } } }, mergePatch);
    const orders = await until('NotSharded', 20_000, async () => {
      const st = await dbStatus();
      return vschemaCondition(st)?.reason === 'NotSharded' && st;
    });
    assert.equal(vschemaCondition(orders).message, 'database orders is not sharded (sharded: true): a VSchema applies to sharded databases only');
    assert.equal(puts('orders').length, 0);
    await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'orders', body: { spec: { vschemaRef: null } } }, mergePatch);
    await until('the condition gone with the reference', 20_000, async () => !vschemaCondition(await dbStatus()));
    assert.equal(puts().length, 3);

    // The tests after this one expect the one database. Deleting its resource drops it on the log (decision 0078),
    // its objects go, and once its pods are gone its instances are deregistered and the finalizer lets it go.
    const registered: TopologyEvent = {
      eventId: 'reg-users', ts: new Date(), source: 'test',
      payload: payload('InstanceRegistered', { instanceId: 'users-80-zone2-0', database: 'users', shard: '80-', cell: 'zone2', host: '10.0.0.7', port: 5432, type: 'PRIMARY', agentMetricsPort: null, poolerPort: null }),
    };
    await eventLog.publisher('topology')([{ key: topologyKey(registered), value: registered }]);
    assert.deepEqual((await custom.getNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'users' }) as any).metadata.finalizers, ['multigres.io/deregister']);
    await custom.deleteNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'users' });
    await core.deleteNamespacedConfigMap({ name: 'users-vschema', namespace: ns });
    await until("the users database's objects gone", 60_000, async () => ![...(await ownedObjects()).keys()].some((k) => k.includes('-users-')));
    await until('the users resource gone', 60_000, async () => {
      try {
        await custom.getNamespacedCustomObject({ ...group, plural: 'multigresdatabases', name: 'users' });
        return false;
      } catch (err: any) {
        return err.code === 404;
      }
    });
    const onLog = await readTopology();
    assert.equal(onLog.state.databases.get('users')?.dropped, true, 'DatabaseDropped on the log');
    assert.ok(![...onLog.state.instances.keys()].includes('users-80-zone2-0'), 'its instance deregistered');
    assert.equal(onLog.state.databases.get('orders')?.dropped, false);
    assert.deepEqual(onLog.published.slice(10), ['DatabaseDropped users']);
  });

  test("the image's entry point runs an orchestrator from its Deployment's exact args and env, with the cluster's API token", async () => {
    // What the kubelet would give the container: the manifest's env with field references and the Secret's keys
    // resolved, and the spec ConfigMap (mounted at /etc/multigres in a pod) in a file here.
    const deployment = (await ownedObjects()).get('Deployment/alpha-orch-zone1');
    const container = deployment.spec.template.spec.containers[0];
    const secret = (await core.readNamespacedSecret({ name: 'alpha-credentials', namespace: ns })).data!;
    const specFile = path.join(dir, 'spec.json');
    fs.writeFileSync(specFile, (await ownedObjects()).get('ConfigMap/alpha-spec').data['spec.json']);
    const env = Object.fromEntries(container.env.map((e: any) => [e.name, e.value ?? (e.valueFrom.fieldRef
      ? { 'metadata.name': 'alpha-orch-zone1-5f7d-x', 'status.podIP': '127.0.0.1' }[e.valueFrom.fieldRef.fieldPath as string]
      : Buffer.from(secret[e.valueFrom.secretKeyRef.key], 'base64').toString())]));
    assert.deepEqual(container.args, ['orchestrator']);
    const logFile = fs.openSync(path.join(dir, 'entrypoint-orchestrator.log'), 'a');
    const child = spawn(process.execPath, [...nodeArgs('compose/entrypoint.ts'), ...container.args], {
      cwd: repoRoot, stdio: ['ignore', logFile, logFile], env: { ...process.env, ...env, MG_SPEC_FILE: specFile },
    });
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    try {
      const url = `http://127.0.0.1:${container.ports[0].containerPort}/v1/status`;
      const status = await until('the orchestrator to answer its admin API', 60_000, async () => {
        try {
          const res = await fetch(url, { headers: { authorization: `Bearer ${env.MG_API_TOKEN}` } });
          return res.status === 200 && (await res.json());
        } catch {
          return false;
        }
      });
      assert.equal(status.orchestrator, 'orch-zone1');
      assert.equal((await fetch(url)).status, 401, 'the admin API wants the Secret\'s token');
    } finally {
      child.kill('SIGTERM');
    }
    assert.equal(await exited, 0, 'SIGTERM passed on to the orchestrator, which stopped cleanly');
  });

  test('two operator replicas never both act: the follower waits, then takes over from a dead leader', async () => {
    assert.equal(await leaseHolder(), 'op-a');
    assert.ok(await metric('op-a', 'mg_operator_reconciles_total', '{result="ok"}') > 0, 'the leader reconciles');
    assert.equal(await metric('op-b', 'mg_operator_reconciles_total', '{result="ok"}'), 0, 'the follower never reconciled');
    assert.equal(await metric('op-b', 'mg_operator_leader'), 0);
    assert.equal(await metric('op-a', 'mg_operator_leader'), 1);

    const rss = Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${operators.get('op-a')!.child.pid}/status`, 'utf8'))![1]);
    figures.push(`operator memory (leader, RSS after the runs above): ${(rss / 1024).toFixed(0)} MB`);

    const killedAt = Date.now();
    operators.get('op-a')!.child.kill('SIGKILL');
    await until('op-b to take the lease', 30_000, async () => (await leaseHolder()) === 'op-b');
    const takeoverMs = Date.now() - killedAt;
    assert.ok(takeoverMs >= 2_000, `the lease (3 s) was not taken before it expired (${takeoverMs} ms)`);
    await custom.patchNamespacedCustomObject({ ...group, plural: 'multigresclusters', name: 'alpha', body: { spec: { gateway: { replicas: 3 } } } }, mergePatch);
    await until('op-b to apply the change', 30_000, async () => JSON.parse((await snapshot()).get('Deployment/alpha-gateway')!).replicas === 3);
    // Counted once the whole reconcile (status included) is done, which may be after the change is visible.
    await until('op-b to count its reconcile', 30_000, async () => (await metric('op-b', 'mg_operator_reconciles_total', '{result="ok"}')) > 0);
    figures.push(`leader failover: the follower took the lease ${(takeoverMs / 1000).toFixed(1)}s after the leader was killed (lease 3 s)`);
  });

  test('deleting the cluster drains it through the finalizer, deregisters its instances, then everything it owned goes', async () => {
    // Instances as their agents would have registered them, and one of a database of another cluster on the same log.
    const registered = ['orders-0-zone1-0', 'orders-0-zone2-1', 'orders-0-zone3-2', 'elsewhere-0-zone1-0'].map((instanceId, i): TopologyEvent => ({
      eventId: `reg-${instanceId}`, ts: new Date(), source: 'test',
      payload: payload('InstanceRegistered', { instanceId, database: instanceId.split('-')[0], shard: '-', cell: 'zone1', host: `10.0.0.${i}`, port: 5432, type: 'REPLICA', agentMetricsPort: null, poolerPort: null }),
    }));
    await eventLog.publisher('topology')(registered.map((e) => ({ key: topologyKey(e), value: e })));
    await custom.deleteNamespacedCustomObject({ ...group, plural: 'multigresclusters', name: 'alpha' });
    // While the finalizer holds the resource, the workloads go to zero first.
    const drained = await until('the workloads scaled to zero', 30_000, async () => {
      const o = await ownedObjects();
      const workloads = [...o.entries()].filter(([k]) => /^(StatefulSet|Deployment)\//.test(k));
      return workloads.length === 7 && workloads.every(([, w]) => w.spec.replicas === 0) && o;
    });
    assert.ok(drained.size > 0);
    await until('the cluster resource to be gone', 60_000, async () => {
      try {
        await getCluster('alpha');
        return false;
      } catch (err: any) {
        return err.code === 404;
      }
    });
    // Read right after the resource went: the deregistrations were on the log before the finalizer let go.
    const deregistered: Array<{ instanceId: string; reason: string }> = [];
    const sub = await eventLog.subscribe('topology', (e) => {
      const { kind, body } = kindOf(e);
      // (The users database's instance was deregistered when its resource was deleted, in the VSchema test.)
      if (kind === 'InstanceDeregistered' && (body as { reason: string }).reason !== `MultigresDatabase ${ns}/users deleted`) deregistered.push(body as { instanceId: string; reason: string });
    });
    await sub.caughtUp;
    await sub.stop();
    assert.deepEqual(deregistered.map((d) => d.instanceId).sort(), ['orders-0-zone1-0', 'orders-0-zone2-1', 'orders-0-zone3-2'], 'every instance of the cluster, and only those');
    assert.ok(deregistered.every((d) => d.reason === `cluster ${ns}/alpha deleted`));
    await until('the garbage collector to delete every owned object and the database', 90_000, async () => {
      const dbs = await custom.listNamespacedCustomObject({ ...group, plural: 'multigresdatabases' }) as any;
      return (await ownedObjects()).size === 0 && dbs.items.length === 0;
    });
  });
});
