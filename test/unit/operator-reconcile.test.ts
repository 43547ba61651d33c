/**
 * The reconcile against an in-memory API (the integration test runs it against a real one):
 * idempotence, pruning, conditions, the finalizer's order, primaries in the status.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { KubernetesObject, V1Pod } from '@kubernetes/client-node';
import { createLogger } from '../../common/log.ts';
import type { KubeClient } from '../../operator/kube.ts';
import type { OrchestratorApi } from '../../operator/orchestrator.ts';
import { reconcileCluster, type PodChanges, type TopologySource } from '../../operator/reconcile.ts';
import { ShardRoller } from '../../operator/roll.ts';
import type { MultigresCluster, MultigresDatabase } from '../../operator/resources.ts';
import { applyTopologyEvent, emptyTopology, kindOf, payload, type TopologyEvent } from '../../schemas/index.ts';

const log = createLogger('test');
log.level = 'silent';

/** Objects by Kind/name in one namespace; a write that changes nothing keeps the resourceVersion, like server-side apply. */
class FakeApi implements KubeClient {
  objects = new Map<string, any>();
  custom = new Map<string, any>();
  writes = 0;
  private version = 1;

  private put(key: string, obj: any): any {
    const old = this.objects.get(key);
    const strip = (o: any) => JSON.stringify({ ...o, metadata: { ...o.metadata, resourceVersion: undefined }, status: undefined });
    if (old && strip(old) === strip({ ...old, ...obj, metadata: { ...old.metadata, ...obj.metadata } })) return old;
    this.writes++;
    const next = { ...old, ...obj, metadata: { ...old?.metadata, ...obj.metadata, resourceVersion: String(this.version++) } };
    this.objects.set(key, next);
    return next;
  }

  async apply<T extends KubernetesObject>(obj: T): Promise<T> {
    return this.put(`${obj.kind}/${obj.metadata!.name}`, structuredClone(obj));
  }
  async scale(obj: KubernetesObject, replicas: number): Promise<void> {
    const key = `${obj.kind}/${obj.metadata!.name}`;
    this.put(key, { ...this.objects.get(key), spec: { ...this.objects.get(key).spec, replicas } });
  }
  async createIfMissing(obj: KubernetesObject): Promise<boolean> {
    const key = `${obj.kind}/${obj.metadata!.name}`;
    if (this.objects.has(key)) return false;
    this.put(key, structuredClone(obj));
    return true;
  }
  async listOwned(_apiVersion: string, kind: string): Promise<KubernetesObject[]> {
    return [...this.objects.values()].filter((o) => o.kind === kind);
  }
  async delete(obj: KubernetesObject): Promise<void> {
    this.writes++;
    this.objects.delete(`${obj.kind}/${obj.metadata!.name}`);
  }
  async listCustom<T>(kind: string): Promise<T[]> {
    return [...this.custom.values()].filter((o) => o.kind === kind);
  }
  async getCustom<T>(kind: string, _ns: string, name: string): Promise<T | undefined> {
    return structuredClone(this.custom.get(`${kind}/${name}`));
  }
  async patchCustom(kind: string, _ns: string, name: string, body: any): Promise<unknown> {
    const o = this.custom.get(`${kind}/${name}`);
    o.metadata = { ...o.metadata, ...body.metadata, resourceVersion: String(this.version++) };
    return o;
  }
  pods: V1Pod[] = [];
  async listPods(): Promise<V1Pod[]> {
    return this.pods;
  }
  async deletePod(pod: V1Pod): Promise<void> {
    this.pods = this.pods.filter((p) => p.metadata!.name !== pod.metadata!.name);
  }
  async secretValue(): Promise<string | undefined> {
    return 'token';
  }
  configMaps = new Map<string, Record<string, string>>();
  async configMapData(_ns: string, name: string): Promise<Record<string, string> | undefined> {
    return this.configMaps.get(name);
  }
  async patchStatus(kind: string, _ns: string, name: string, status: any): Promise<unknown> {
    const o = this.custom.get(`${kind}/${name}`);
    o.status = { ...o.status, ...status };
    return o;
  }
  /** Plays the workload controllers and the kubelet: every pod asked for exists and is ready. */
  allReady(): void {
    for (const o of this.objects.values()) {
      if (o.kind === 'StatefulSet' || o.kind === 'Deployment') o.status = { observedGeneration: o.metadata.generation ?? 0, replicas: o.spec.replicas, readyReplicas: o.spec.replicas };
    }
  }
}

/** The topology log as the operator folds it: what is published is folded at once (the real one waits for it to come back). */
class FakeTopologyLog {
  state = emptyTopology();
  caughtUp = true;
  failure: string | undefined;
  failPublish: string | undefined;
  published: string[] = [];
  held() {
    return { caughtUp: this.caughtUp, state: this.state, ...(this.failure ? { failure: this.failure } : {}) };
  }
  async publish(_k: string, _w: unknown, payloads: Array<TopologyEvent['payload']>): Promise<void> {
    if (this.failPublish) throw new Error(this.failPublish);
    for (const p of payloads) {
      const e: TopologyEvent = { eventId: `e${this.published.length}`, ts: new Date(), source: 'mg-operator', payload: p };
      applyTopologyEvent(this.state, e);
      const { kind, body } = kindOf(e);
      const b = body as { cell?: string; database?: string; shard?: string };
      this.published.push(`${kind} ${b.cell ?? b.database}${b.shard ? `/${b.shard}` : ''}`);
    }
  }
}

const primaries = (table: Record<string, { primary: string; term: number }> = {}, registered: string[] = [], deregistered: string[] = [], topo = new FakeTopologyLog()): TopologySource => ({
  held: () => topo.held(),
  publish: (k, w, p) => topo.publish(k, w, p),
  primaries: (_k, _w, database, shards) => ({ caughtUp: true, shards: shards.flatMap((shard) => (table[`${database}/${shard}`] ? [{ shard, ...table[`${database}/${shard}`] }] : [])) }),
  vschema: () => ({ caughtUp: true }),
  registered: () => registered,
  deregister: async (_k, _w, ids) => void deregistered.push(...ids),
  forget: async () => undefined,
});

/** An orchestrator that accepts every request; `calls` says which were made. */
function changes(api: FakeApi, calls: string[] = []): PodChanges {
  const orch: OrchestratorApi = {
    switchover: async (db, shard) => (calls.push(`switchover ${db}/${shard}`), { status: 200, body: {} }),
    removeReplica: async (db, shard, id) => (calls.push(`remove ${db}/${shard} ${id}`), { status: 202, body: { operation: { id: 'op' } } }),
    operation: async () => ({ status: 200, body: { state: 'succeeded' } }),
    operations: async () => ({ status: 200, body: { operations: [] } }),
    applyVSchema: async (db) => (calls.push(`vschema ${db}`), { status: 200, body: { version: '1' } }),
  };
  return { roller: new ShardRoller((p) => api.deletePod(p)), orchestrator: () => orch };
}

function setup(): FakeApi {
  const api = new FakeApi();
  const cluster: MultigresCluster = {
    apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresCluster', metadata: { name: 'c', namespace: 'ns', uid: 'c-uid', generation: 1 },
    spec: { image: 'mg:1', kafka: { bootstrap: 'k:9092' }, registry: { url: 'http://r:8081' }, cells: [{ name: 'z1' }, { name: 'z2' }, { name: 'z3' }] },
  };
  const db: MultigresDatabase = {
    apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresDatabase', metadata: { name: 'orders', namespace: 'ns', uid: 'd-uid', generation: 1 }, spec: { cluster: 'c', instancesPerShard: 3 },
  };
  api.custom.set('MultigresCluster/c', cluster);
  api.custom.set('MultigresDatabase/orders', db);
  return api;
}

const conditions = (api: FakeApi) => Object.fromEntries(api.custom.get('MultigresCluster/c').status.conditions.map((c: any) => [c.type, `${c.status}:${c.reason}`]));

test('the first reconcile creates every object and the finalizer; the second writes nothing', async () => {
  const api = setup();
  const result = await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  assert.equal(api.objects.size, 16);
  assert.deepEqual(api.custom.get('MultigresCluster/c').metadata.finalizers, ['multigres.io/drain']);
  assert.equal(api.custom.get('MultigresDatabase/orders').metadata.ownerReferences[0].uid, 'c-uid');
  assert.deepEqual(conditions(api), { Ready: 'False:PodsNotReady', Progressing: 'True:RollingOut', Degraded: 'False:AsExpected', TopologyPublished: 'True:Published' });
  assert.equal(result.requeueAfterMs, 5_000, 'a rollout in progress is looked at again');

  api.allReady();
  await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  assert.deepEqual(conditions(api), { Ready: 'True:AllReady', Progressing: 'False:RolledOut', Degraded: 'False:AsExpected', TopologyPublished: 'True:Published' });
  const writes = api.writes;
  await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  assert.equal(api.writes, writes, 'level-triggered and idempotent: nothing to change, nothing written');
});

test('objects nobody asks for any more are deleted; the credentials stay', async () => {
  const api = setup();
  await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  const secret = JSON.stringify(api.objects.get('Secret/c-credentials'));
  api.custom.get('MultigresCluster/c').spec.cells.pop();
  await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  assert.ok(!api.objects.has('StatefulSet/c-orders-0-z3') && !api.objects.has('Deployment/c-orch-z3') && !api.objects.has('Service/c-orch-z3'));
  assert.equal(api.objects.get('StatefulSet/c-orders-0-z1').spec.replicas, 2, 'the third instance moved to the first cell');
  assert.equal(JSON.stringify(api.objects.get('Secret/c-credentials')), secret);
});

test('an invalid spec degrades the cluster and applies nothing', async () => {
  const api = setup();
  api.custom.get('MultigresDatabase/orders').spec.durability = 'MULTI_CELL_ANY_4';
  await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  assert.equal(api.objects.size, 0);
  assert.equal(conditions(api).Degraded, 'True:InvalidSpec');
  assert.match(api.custom.get('MultigresCluster/c').status.conditions.find((c: any) => c.type === 'Degraded').message, /durability/);
});

test("each shard's primary and term go to the database status", async () => {
  const api = setup();
  await reconcileCluster(api, primaries({ 'orders/-': { primary: 'orders-0-z2-1', term: 7 } }), changes(api), 'ns', 'c', log);
  assert.deepEqual(api.custom.get('MultigresDatabase/orders').status.shards, [{ shard: '-', primary: 'orders-0-z2-1', term: 7 }]);
});

test('deletion drains every workload before the finalizer goes', async () => {
  const api = setup();
  await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  api.allReady();
  api.custom.get('MultigresCluster/c').metadata.deletionTimestamp = new Date();
  let result = await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  const workloads = [...api.objects.values()].filter((o) => o.kind === 'StatefulSet' || o.kind === 'Deployment');
  assert.ok(workloads.every((w) => w.spec.replicas === 0), 'every workload scaled to zero');
  assert.deepEqual(api.custom.get('MultigresCluster/c').metadata.finalizers, ['multigres.io/drain'], 'kept while pods run');
  assert.equal(result.requeueAfterMs, 1_000);
  assert.equal(conditions(api).Ready, 'False:Draining');

  api.allReady(); // the controllers removed the pods: status.replicas 0
  const deregistered: string[] = [];
  result = await reconcileCluster(api, primaries({}, ['orders-0-z1-0', 'orders-0-z2-1'], deregistered), changes(api), 'ns', 'c', log);
  assert.deepEqual(deregistered, ['orders-0-z1-0', 'orders-0-z2-1'], 'the instances deregistered on the log before the finalizer goes');
  assert.deepEqual(api.custom.get('MultigresCluster/c').metadata.finalizers, []);
  assert.deepEqual(result, {});
});

test('one instance fewer goes through the orchestrator first: the StatefulSet keeps its pod until the instance is out', async () => {
  const api = setup();
  api.custom.get('MultigresDatabase/orders').spec.instancesPerShard = 4;
  await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  api.allReady();
  assert.equal(api.objects.get('StatefulSet/c-orders-0-z1').spec.replicas, 2);

  // The fourth instance (z1's second pod) is the primary: a switchover first, the set untouched.
  const calls: string[] = [];
  const pods = changes(api, calls);
  api.custom.get('MultigresDatabase/orders').spec.instancesPerShard = 3;
  await reconcileCluster(api, primaries({ 'orders/-': { primary: 'orders-0-z1-3', term: 7 } }), pods, 'ns', 'c', log);
  assert.deepEqual(calls, ['switchover orders/-']);
  assert.equal(api.objects.get('StatefulSet/c-orders-0-z1').spec.replicas, 2);
  assert.deepEqual(conditions(api).Progressing, 'True:ScalingDown');
  assert.match(api.custom.get('MultigresCluster/c').status.conditions.find((c: any) => c.type === 'Progressing').message, /orders\/-: removing orders-0-z1-3 \(pod c-orders-0-z1-1\): it is the primary/);

  // A new primary: the instance is removed through the replica path, then the set shrinks.
  await reconcileCluster(api, primaries({ 'orders/-': { primary: 'orders-0-z2-1', term: 8 } }), pods, 'ns', 'c', log);
  assert.deepEqual(calls, ['switchover orders/-', 'remove orders/- orders-0-z1-3']);
  assert.equal(api.objects.get('StatefulSet/c-orders-0-z1').spec.replicas, 1);

  // Two instances: z3 holds none any more; its set goes only after its instance was removed.
  api.custom.get('MultigresDatabase/orders').spec.instancesPerShard = 2;
  await reconcileCluster(api, primaries({ 'orders/-': { primary: 'orders-0-z2-1', term: 8 } }), pods, 'ns', 'c', log);
  assert.deepEqual(calls.slice(2), ['remove orders/- orders-0-z3-2']);
  assert.ok(!api.objects.has('StatefulSet/c-orders-0-z3'));
});

test('a deactivated database scales to zero directly, without the replica path', async () => {
  const api = setup();
  await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  const calls: string[] = [];
  api.custom.get('MultigresDatabase/orders').spec.deactivated = true;
  await reconcileCluster(api, primaries({ 'orders/-': { primary: 'orders-0-z1-0', term: 2 } }), changes(api, calls), 'ns', 'c', log);
  assert.deepEqual(calls, []);
  assert.equal(api.objects.get('StatefulSet/c-orders-0-z1').spec.replicas, 0);
});

test('deactivated on the log: held (no client wakes pods scaled to zero) once, activated once when cleared; an idle scale to zero is the gateways\' and stays', async () => {
  const api = setup();
  const topo = new FakeTopologyLog();
  const reconcile = () => reconcileCluster(api, primaries({}, [], [], topo), changes(api), 'ns', 'c', log);
  await reconcile();
  const before = topo.published.length;
  api.custom.get('MultigresDatabase/orders').spec.deactivated = true;
  await reconcile();
  await reconcile();
  assert.deepEqual(topo.published.slice(before), ['DatabaseActivationChanged orders']);
  assert.deepEqual(topo.state.inactive.get('orders'), { reason: 'deactivated: true on MultigresDatabase orders', since: topo.state.inactive.get('orders')!.since, held: true });
  api.custom.get('MultigresDatabase/orders').spec.deactivated = false;
  await reconcile();
  await reconcile();
  assert.deepEqual(topo.published.slice(before), ['DatabaseActivationChanged orders', 'DatabaseActivationChanged orders']);
  assert.equal(topo.state.inactive.has('orders'), false);

  // A gateway scaled it to zero for want of clients: the next client wakes it; the operator does not.
  await topo.publish('', undefined, [payload('DatabaseActivationChanged', { database: 'orders', active: false, held: false, reason: 'no session for 600000 ms on gw-0' })]);
  await reconcile();
  assert.equal(topo.published.length, before + 3);
  assert.equal(topo.state.inactive.get('orders')?.held, false);
});

test('down to one instance: every StatefulSet no longer wanted is kept until its own instance is out', async () => {
  const api = setup();
  await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  const calls: string[] = [];
  const pods = changes(api, calls);
  const primary = primaries({ 'orders/-': { primary: 'orders-0-z1-0', term: 3 } });
  api.custom.get('MultigresDatabase/orders').spec.instancesPerShard = 1;
  await reconcileCluster(api, primary, pods, 'ns', 'c', log);
  assert.deepEqual(calls, ['remove orders/- orders-0-z2-1']);
  assert.ok(!api.objects.has('StatefulSet/c-orders-0-z2'));
  assert.equal(api.objects.get('StatefulSet/c-orders-0-z3')?.spec.replicas, 1, 'z3 waits for its turn');
  await reconcileCluster(api, primary, pods, 'ns', 'c', log);
  assert.deepEqual(calls, ['remove orders/- orders-0-z2-1', 'remove orders/- orders-0-z3-2']);
  assert.ok(!api.objects.has('StatefulSet/c-orders-0-z3'));
});

test("a sharded database's VSchema by reference: applied once, in the database's status, and applied again when it changes", async () => {
  const api = setup();
  Object.assign(api.custom.get('MultigresDatabase/orders').spec, { sharded: true, shards: 2, vschemaRef: { name: 'orders-vschema' } });
  api.configMaps.set('orders-vschema', { 'vschema.json': '{"tables": {"items": {"type": "reference"}}}' });
  const calls: string[] = [];
  const result = await reconcileCluster(api, primaries(), changes(api, calls), 'ns', 'c', log);
  assert.deepEqual(calls, ['vschema orders']);
  const status = api.custom.get('MultigresDatabase/orders').status;
  assert.deepEqual(status.conditions.map((c: any) => [c.type, c.status, c.reason, c.message]), [['VSchemaApplied', 'True', 'Applied', 'ConfigMap orders-vschema key vschema.json is version 1 on the topology log']]);
  assert.deepEqual([status.vschema.configMap, status.vschema.key, status.vschema.version], ['orders-vschema', 'vschema.json', 1]);
  assert.equal(result.requeueAfterMs, 5_000, 'the rollout, not the VSchema');

  await reconcileCluster(api, primaries(), changes(api, calls), 'ns', 'c', log);
  assert.deepEqual(calls, ['vschema orders'], 'the same content is not sent again');
  api.configMaps.set('orders-vschema', { 'vschema.json': 'tables: { items: { type: reference }, more: { type: reference } }' });
  await reconcileCluster(api, primaries(), changes(api, calls), 'ns', 'c', log);
  assert.deepEqual(calls, ['vschema orders', 'vschema orders'], 'a changed ConfigMap is');

  delete api.custom.get('MultigresDatabase/orders').spec.vschemaRef;
  await reconcileCluster(api, primaries(), changes(api, calls), 'ns', 'c', log);
  const cleared = api.custom.get('MultigresDatabase/orders').status;
  assert.deepEqual([cleared.conditions, cleared.vschema], [[], null], 'no reference: no condition, nothing recorded');
});

test("the planned topology is published once, as `mg cluster up` would: cells, the database, its shards; a database added later publishes its own", async () => {
  const api = setup();
  const topo = new FakeTopologyLog();
  await reconcileCluster(api, primaries({}, [], [], topo), changes(api), 'ns', 'c', log);
  assert.deepEqual(topo.published, ['CellRegistered z1', 'CellRegistered z2', 'CellRegistered z3', 'DatabaseCreated orders', 'ShardDefined orders/-']);
  const cond = () => api.custom.get('MultigresCluster/c').status.conditions.find((c: any) => c.type === 'TopologyPublished');
  assert.equal(cond().status, 'True');
  assert.match(cond().message, /3 cells, 1 databases, 1 shards on the topology log \(k:9092\)/);

  // Level-triggered: a second reconcile finds it all on the log and publishes nothing.
  await reconcileCluster(api, primaries({}, [], [], topo), changes(api), 'ns', 'c', log);
  assert.equal(topo.published.length, 5);

  // A sharded database added later: its database and its two shards, nothing else.
  api.custom.set('MultigresDatabase/users', {
    apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresDatabase', metadata: { name: 'users', namespace: 'ns', uid: 'u-uid', generation: 1 },
    spec: { cluster: 'c', shards: 2, sharded: true, instancesPerShard: 3 },
  });
  await reconcileCluster(api, primaries({}, [], [], topo), changes(api), 'ns', 'c', log);
  assert.deepEqual(topo.published.slice(5), ['DatabaseCreated users', 'ShardDefined users/-80', 'ShardDefined users/80-']);
  assert.equal(topo.state.databases.get('users')?.sharded, true);
  assert.match(cond().message, /3 cells, 2 databases, 3 shards/);

  // The same spec through `mg cluster up`'s function publishes exactly this (one function: compose/topology.ts).
  const { topologyToPublish } = await import('../../compose/topology.ts');
  const { clusterSpecOf } = await import('../../operator/resources.ts');
  const spec = clusterSpecOf(api.custom.get('MultigresCluster/c'), [api.custom.get('MultigresDatabase/orders'), api.custom.get('MultigresDatabase/users')]);
  assert.equal(topologyToPublish(spec, emptyTopology()).length, 8);
  assert.deepEqual(topologyToPublish(spec, topo.state), []);
});

test('nothing is published before the log is read to its end, nor from an invalid spec; an unreachable log or a failed publish is retried with a growing delay', async () => {
  const api = setup();
  const topo = new FakeTopologyLog();
  const cond = () => api.custom.get('MultigresCluster/c').status.conditions.find((c: any) => c.type === 'TopologyPublished');
  topo.caughtUp = false;
  await reconcileCluster(api, primaries({}, [], [], topo), changes(api), 'ns', 'c', log);
  assert.deepEqual(topo.published, [], 'the log not read to its end: a missing event may only be unread');
  assert.equal(`${cond().status}:${cond().reason}`, 'Unknown:ReadingLog');

  topo.failure = 'Connection error: connect ECONNREFUSED 127.0.0.1:9092';
  let result = await reconcileCluster(api, primaries({}, [], [], topo), changes(api), 'ns', 'c', log);
  assert.equal(`${cond().status}:${cond().reason}`, 'False:LogUnreachable');
  assert.match(cond().message, /ECONNREFUSED/);
  assert.equal(result.requeueAfterMs, 1_000);
  result = await reconcileCluster(api, primaries({}, [], [], topo), changes(api), 'ns', 'c', log);
  assert.equal(result.requeueAfterMs, 2_000, 'doubling');

  topo.caughtUp = true;
  topo.failure = undefined;
  topo.failPublish = 'KafkaJSNumberOfRetriesExceeded';
  result = await reconcileCluster(api, primaries({}, [], [], topo), changes(api), 'ns', 'c', log);
  assert.equal(`${cond().status}:${cond().reason}`, 'False:PublishFailed');
  assert.match(cond().message, /publishing CellRegistered z1, .*ShardDefined orders\/-.*KafkaJSNumberOfRetriesExceeded; retrying/);
  assert.equal(result.requeueAfterMs, 4_000);

  topo.failPublish = undefined;
  api.allReady();
  result = await reconcileCluster(api, primaries({}, [], [], topo), changes(api), 'ns', 'c', log);
  assert.equal(`${cond().status}:${cond().reason}`, 'True:Published');
  assert.equal(topo.published.length, 5);
  assert.deepEqual(result, {}, 'nothing left to retry');

  // An invalid spec publishes nothing and keeps the condition as it was.
  api.custom.get('MultigresDatabase/orders').spec.durability = 'MULTI_CELL_ANY_4';
  api.custom.set('MultigresDatabase/extra', { apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresDatabase', metadata: { name: 'extra', namespace: 'ns', uid: 'x-uid', generation: 1 }, spec: { cluster: 'c' } });
  await reconcileCluster(api, primaries({}, [], [], topo), changes(api), 'ns', 'c', log);
  assert.equal(topo.published.length, 5);
  assert.equal(conditions(api).Degraded, 'True:InvalidSpec');
  assert.equal(`${cond().status}:${cond().reason}`, 'True:Published');
});

test("a deleted database resource: dropped on the log first, its objects then, its instances deregistered once its pods are gone, then it goes", async () => {
  const api = setup();
  const topo = new FakeTopologyLog();
  api.custom.set('MultigresDatabase/users', {
    apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresDatabase', metadata: { name: 'users', namespace: 'ns', uid: 'u-uid', generation: 1 }, spec: { cluster: 'c', instancesPerShard: 1 },
  });
  await reconcileCluster(api, primaries({}, [], [], topo), changes(api), 'ns', 'c', log);
  assert.deepEqual(api.custom.get('MultigresDatabase/users').metadata.finalizers, ['multigres.io/deregister']);
  assert.deepEqual(api.custom.get('MultigresDatabase/orders').metadata.finalizers, ['multigres.io/deregister']);
  applyTopologyEvent(topo.state, { eventId: 'r', ts: new Date(), source: 'agent', payload: payload('InstanceRegistered', { instanceId: 'users-0-z1-0', database: 'users', shard: '-', cell: 'z1', host: '10.0.0.9', port: 5432, type: 'PRIMARY', agentMetricsPort: null, poolerPort: null }) });
  const usersObjects = () => [...api.objects.values()].filter((o) => o.metadata.ownerReferences?.[0]?.uid === 'u-uid').map((o) => `${o.kind}/${o.metadata.name}`);
  assert.deepEqual(usersObjects().sort(), ['PodDisruptionBudget/c-users-0', 'Service/c-users-0', 'StatefulSet/c-users-0-z1']);

  // Deleted; the log not read to its end yet: nothing published, its objects (and pods) kept.
  api.custom.get('MultigresDatabase/users').metadata.deletionTimestamp = new Date().toISOString();
  api.pods = [{ metadata: { name: 'c-users-0-z1-0', labels: { 'multigres.io/database': 'users' } } }];
  topo.caughtUp = false;
  await reconcileCluster(api, primaries({}, [], [], topo), changes(api), 'ns', 'c', log);
  assert.equal(usersObjects().length, 3);
  assert.ok(!topo.published.includes('DatabaseDropped users'));
  assert.equal(conditions(api).Progressing, 'True:DeletingDatabase');

  // A database created on it through a gateway holds it, as `mg database drop` refuses then.
  topo.caughtUp = true;
  applyTopologyEvent(topo.state, { eventId: 'h', ts: new Date(), source: 'gateway', payload: payload('DatabaseCreated', { database: 'tenant', durabilityPolicy: null, sharded: false, transactionMode: null, hostedOn: 'users' }) });
  await reconcileCluster(api, primaries({}, [], [], topo), changes(api), 'ns', 'c', log);
  assert.equal(usersObjects().length, 3);
  assert.ok(!topo.published.includes('DatabaseDropped users'));
  assert.match(api.custom.get('MultigresCluster/c').status.conditions.find((c: any) => c.type === 'Progressing').message, /users: deleting waits: databases tenant are hosted on it/);
  applyTopologyEvent(topo.state, { eventId: 'hd', ts: new Date(), source: 'gateway', payload: payload('DatabaseDropped', { database: 'tenant' }) });

  // Read: dropped on the log, then its objects pruned; the finalizer waits for its pods.
  const deregistered: string[] = [];
  let result = await reconcileCluster(api, primaries({}, [], deregistered, topo), changes(api), 'ns', 'c', log);
  assert.deepEqual(topo.published.slice(-1), ['DatabaseDropped users']);
  assert.equal(topo.state.databases.get('users')?.dropped, true);
  assert.deepEqual(usersObjects(), []);
  assert.deepEqual(deregistered, []);
  assert.deepEqual(api.custom.get('MultigresDatabase/users').metadata.finalizers, ['multigres.io/deregister']);
  assert.equal(result.requeueAfterMs, 1_000);
  assert.match(api.custom.get('MultigresCluster/c').status.conditions.find((c: any) => c.type === 'Progressing').message, /users: dropped on the topology log; waiting for its 1 pods to stop/);

  // Its pod gone: its instance deregistered, the finalizer removed; the other database untouched, nothing published twice.
  api.pods = [];
  await reconcileCluster(api, primaries({}, [], deregistered, topo), changes(api), 'ns', 'c', log);
  assert.deepEqual(deregistered, ['users-0-z1-0']);
  assert.deepEqual(api.custom.get('MultigresDatabase/users').metadata.finalizers, []);
  assert.equal(topo.published.filter((p) => p.startsWith('DatabaseDropped')).length, 1);
  assert.equal(topo.state.databases.get('orders')?.dropped, false);
});

test("deleting the cluster lets its databases go without their own finalizer's steps (the cluster's deregisters their instances)", async () => {
  const api = setup();
  await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  assert.deepEqual(api.custom.get('MultigresDatabase/orders').metadata.finalizers, ['multigres.io/deregister']);
  api.allReady();
  api.custom.get('MultigresCluster/c').metadata.deletionTimestamp = new Date();
  await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  api.allReady();
  await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  assert.deepEqual(api.custom.get('MultigresCluster/c').metadata.finalizers, []);
  assert.deepEqual(api.custom.get('MultigresDatabase/orders').metadata.finalizers, []);

  // A database deleted after its cluster was gone (finalizer removed by hand): released, not left hanging.
  api.custom.delete('MultigresCluster/c');
  api.custom.get('MultigresDatabase/orders').metadata.finalizers = ['multigres.io/deregister'];
  api.custom.get('MultigresDatabase/orders').metadata.deletionTimestamp = new Date().toISOString();
  await reconcileCluster(api, primaries(), changes(api), 'ns', 'c', log);
  assert.deepEqual(api.custom.get('MultigresDatabase/orders').metadata.finalizers, []);
});
