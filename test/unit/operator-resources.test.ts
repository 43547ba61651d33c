import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SpecError } from '../../compose/spec.ts';
import { WorkQueue } from '../../operator/queue.ts';
import { clusterSpecOf, credentialsSecret, desiredObjects, shardLabel, type MultigresCluster, type MultigresDatabase } from '../../operator/resources.ts';

const cluster: MultigresCluster = {
  apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresCluster', metadata: { name: 'prod', namespace: 'db', uid: 'c-uid' },
  spec: { image: 'mg:1', kafka: { bootstrap: 'kafka:9092' }, registry: { url: 'http://registry:8081' }, cells: [{ name: 'a', zone: 'z-a' }, { name: 'b' }] },
};
const database = (name: string, spec: Partial<MultigresDatabase['spec']> = {}): MultigresDatabase => ({
  apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresDatabase', metadata: { name, namespace: 'db', uid: `${name}-uid` }, spec: { cluster: 'prod', ...spec },
});

test('a sharded database becomes one StatefulSet per shard and cell, spread like the local plan', () => {
  const dbs = [database('orders', { shards: 2, sharded: true, instancesPerShard: 3 })];
  const objects = desiredObjects(cluster, dbs, clusterSpecOf(cluster, dbs));
  const sets = objects.filter((o) => o.kind === 'StatefulSet') as any[];
  // Instances go to cells in turn: 3 instances over 2 cells are 2 in a, 1 in b, per shard.
  assert.deepEqual(sets.map((s) => [s.metadata.name, s.spec.replicas]), [
    ['prod-orders-00-80-a', 2], ['prod-orders-00-80-b', 1], ['prod-orders-80-ff-a', 2], ['prod-orders-80-ff-b', 1],
  ]);
  const zoneOf = (s: any) => s.spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values;
  assert.deepEqual(sets.map(zoneOf), [['z-a'], ['b'], ['z-a'], ['b']], 'a cell without a zone uses its name');
  assert.ok(sets.every((s) => s.metadata.ownerReferences[0].uid === 'orders-uid'));
  const headless = objects.filter((o) => o.kind === 'Service' && (o.spec as any).clusterIP === 'None').map((o) => o.metadata!.name);
  assert.deepEqual(headless, ['prod-orders-00-80', 'prod-orders-80-ff']);
  assert.ok(objects.filter((o) => o.kind !== 'StatefulSet' && !o.metadata!.name!.includes('orders')).every((o) => o.metadata!.ownerReferences![0].uid === 'c-uid'));
});

test("a shard's pod runs one postmaster, the agent's: no second container on the data directory", () => {
  const dbs = [database('orders', { resources: { requests: { cpu: '2' } } })];
  const [sts] = desiredObjects(cluster, dbs, clusterSpecOf(cluster, dbs)).filter((o) => o.kind === 'StatefulSet') as any[];
  const pod = sts.spec.template.spec;
  // The agent initdb's, starts, stops and pg_rewinds Postgres itself (pg_ctl), as locally (decision 0076).
  assert.deepEqual(pod.containers.map((c: any) => c.name), ['agent', 'pooler']);
  const agent = pod.containers[0];
  assert.deepEqual(agent.ports.map((p: any) => [p.name, p.containerPort]), [['postgres', 5432], ['agent-metrics', 9100]]);
  assert.deepEqual(agent.resources, { requests: { cpu: '2' } }, "Postgres's resources are the agent container's");
  assert.deepEqual(pod.containers.filter((c: any) => c.volumeMounts.some((m: any) => m.name === 'data')).map((c: any) => c.name), ['agent']);
  assert.equal(pod.shareProcessNamespace, undefined);
});

test('a deactivated database keeps its StatefulSets at zero replicas', () => {
  const dbs = [database('idle', { instancesPerShard: 2, deactivated: true })];
  const sets = desiredObjects(cluster, dbs, clusterSpecOf(cluster, dbs)).filter((o) => o.kind === 'StatefulSet');
  assert.deepEqual(sets.map((s) => (s.spec as any).replicas), [0, 0]);
});

test('the cluster spec refuses what mg cluster up refuses, naming the field', () => {
  assert.throws(() => clusterSpecOf(cluster, [database('orders', { instancesPerShard: 2, durability: 'ANY_3' })]), (err: Error) =>
    err instanceof SpecError && /databases\.0\.durability: durability needs more instances per shard/.test(err.message));
  assert.throws(() => clusterSpecOf(cluster, [database('orders', { shards: 2 })]), /more than one shard needs sharded: true/);
});

test('shard names become DNS labels', () => {
  assert.deepEqual(['-', '-80', '80-', '40-80'].map(shardLabel), ['0', '00-80', '80-ff', '40-80']);
});

test('credentials are random per cluster and carry the owner', () => {
  let n = 0;
  const secret = credentialsSecret(cluster, () => `r${n++}`);
  assert.deepEqual(secret.stringData, { 'postgres-password': 'r0', 'orchestrator-api-token': 'r1', 'rest-jwt-secret': 'r2' });
  assert.equal(secret.metadata!.ownerReferences![0].uid, 'c-uid');
});

test('the work queue runs a key once however often it is added, and backs off on failure', async () => {
  const queue = new WorkQueue({ baseDelayMs: 20, maxDelayMs: 100 });
  const seen: string[] = [];
  queue.add('a');
  queue.add('a');
  queue.add('b');
  let failures = 0;
  const running = queue.run(async (key) => {
    seen.push(key);
    if (key === 'b' && failures++ < 2) queue.retry(key);
  });
  await new Promise((r) => setTimeout(r, 300));
  queue.stop();
  await running;
  assert.deepEqual(seen, ['a', 'b', 'b', 'b']);
  const delays = new WorkQueue({ baseDelayMs: 20, maxDelayMs: 100 });
  assert.deepEqual([1, 2, 3, 4, 5].map(() => delays.retry('c')), [20, 40, 80, 100, 100]);
  delays.forget('c');
  assert.equal(delays.retry('c'), 20, 'a success starts the backoff over');
  delays.stop();
});
