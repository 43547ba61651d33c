/**
 * The image's entry point maps a pod's environment to each component's configuration
 * (compose/pod-config.ts): the environment taken from the operator's own manifests
 * (desiredObjects, with the values the kubelet would fill in), each configuration checked
 * against the component's own schema.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { agentConfigSchema } from '../../ingest/config.ts';
import { orchConfigSchema } from '../../orchestrator/config.ts';
import { PoolerConfigSchema } from '../../router/pooler/config.ts';
import { podConfig } from '../../compose/pod-config.ts';
import { clusterSpecOf, desiredObjects, PGDATA, type MultigresCluster, type MultigresDatabase } from '../../operator/resources.ts';

const cluster: MultigresCluster = {
  apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresCluster', metadata: { name: 'prod', namespace: 'db', uid: 'c-uid' },
  spec: { image: 'mg:1', kafka: { bootstrap: 'kafka-0:9092,kafka-1:9092', topicPrefix: 'p1' }, registry: { url: 'http://registry:8081' }, cells: [{ name: 'a' }, { name: 'b' }, { name: 'c' }] },
};
const dbs: MultigresDatabase[] = [{ apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresDatabase', metadata: { name: 'orders', namespace: 'db', uid: 'd' }, spec: { cluster: 'prod', shards: 2, sharded: true, instancesPerShard: 5 } }];
const objects = desiredObjects(cluster, dbs, clusterSpecOf(cluster, dbs));
const specJson = JSON.parse((objects.find((o) => o.kind === 'ConfigMap')!.data!)['spec.json']);
const TOKEN = 'a-token-of-enough-length';

/** A container's environment as the kubelet fills it in: field references and the Secret's keys resolved. */
function envOf(workload: string, container: string, pod: string): Record<string, string> {
  const w = objects.find((o) => o.metadata!.name === workload) as any;
  const c = w.spec.template.spec.containers.find((x: any) => x.name === container);
  return Object.fromEntries(c.env.map((e: any) => [e.name, e.value ?? (
    e.valueFrom.fieldRef ? { 'metadata.name': pod, 'status.podIP': '10.1.2.3' }[e.valueFrom.fieldRef.fieldPath as string] : { 'postgres-password': 'pw', 'orchestrator-api-token': TOKEN }[e.valueFrom.secretKeyRef.key as string]
  )]));
}

test("a shard's agent and pooler: the instance its pod's ordinal is, the pod's fixed ports and volume, the manifests' event log", () => {
  // Instance 4 of shard 80- is cell b's second pod (instances go to cells in turn: b holds 1 and 4).
  const pod = 'prod-orders-80-ff-b-1';
  const agent = podConfig('agent', envOf('prod-orders-80-ff-b', 'agent', pod), specJson);
  assert.equal(agent.entry, 'ingest/main.ts');
  const a = agentConfigSchema.parse(agent.config);
  assert.deepEqual([a.instanceId, a.database, a.shard, a.cell, a.port, a.dataDir, a.poolerPort, a.metricsPort], ['orders-80_-b-4', 'orders', '80-', 'b', 5432, PGDATA, 6432, 9100]);
  assert.deepEqual([a.brokers, a.registryUrl, a.topicPrefix], [['kafka-0:9092', 'kafka-1:9092'], 'http://registry:8081', 'p1']);

  const pooler = podConfig('pooler', envOf('prod-orders-80-ff-b', 'pooler', pod), specJson);
  const p = PoolerConfigSchema.parse(pooler.config);
  assert.deepEqual([pooler.entry, p.instanceId, p.listenPort, p.postgres.port, p.metricsPort], ['router/pooler/main.ts', 'orders-80_-b-4', 6432, 5432, 9200]);
});

test("a shard's pod is reached at its own address, and leaves loopback with the cluster's password", () => {
  const pod = 'prod-orders-80-ff-b-1';
  const agent = podConfig('agent', envOf('prod-orders-80-ff-b', 'agent', pod), specJson);
  const a = agentConfigSchema.parse(agent.config);
  // Postgres listens and registers at the pod's address (replicas clone and stream from it); the first primary sets the password.
  assert.deepEqual([a.host, a.loginPassword], ['10.1.2.3', 'pw']);
  const p = PoolerConfigSchema.parse(podConfig('pooler', envOf('prod-orders-80-ff-b', 'pooler', pod), specJson).config);
  assert.deepEqual([p.listenHost, p.postgres.host], ['10.1.2.3', '10.1.2.3'], 'the gateways dial the pooler at the pod');
  // Every component's connections to other pods' Postgres authenticate (libpq and node-postgres read PGPASSWORD).
  assert.deepEqual(agent.env, { PGPASSWORD: 'pw' });
  assert.deepEqual(podConfig('orchestrator', envOf('prod-orch-c', 'orchestrator', 'prod-orch-c-5d-q'), specJson).env, { PGPASSWORD: 'pw' });
});

test("the gateway and each cell's orchestrator, the orchestrator with the cluster's API token", () => {
  const gateway = podConfig('gateway', envOf('prod-gateway', 'gateway', 'prod-gateway-7c9-x2'), specJson) as { entry: string; config: any };
  assert.deepEqual([gateway.entry, gateway.config.port, gateway.config.metricsPort, gateway.config.brokers], ['router/gateway/main.ts', 5432, 9300, ['kafka-0:9092', 'kafka-1:9092']]);
  assert.equal(gateway.config.host, '10.1.2.3', 'the gateway Service sends clients to the pod');
  const orch = podConfig('orchestrator', envOf('prod-orch-c', 'orchestrator', 'prod-orch-c-5d-q'), specJson);
  const o = orchConfigSchema.parse(orch.config);
  assert.deepEqual([orch.entry, o.id, o.cell, o.port, o.apiToken, o.provisioner], ['orchestrator/main.ts', 'orch-c', 'c', 9400, TOKEN, undefined]);
});

test('a missing variable or a pod name without an ordinal is refused by name', () => {
  const env = envOf('prod-orders-00-80-a', 'agent', 'prod-orders-00-80-a-0');
  assert.throws(() => podConfig('agent', { ...env, MG_SHARD: undefined }, specJson), /MG_SHARD is not set/);
  assert.throws(() => podConfig('agent', { ...env, MG_POD_NAME: 'somepod' }, specJson), /MG_POD_NAME somepod is not a StatefulSet pod's name/);
  assert.throws(() => podConfig('agent', { ...env, MG_REGISTRY_URL: 'nope' }, specJson), /agent: MG_REGISTRY_URL: Invalid url/);
  assert.throws(() => podConfig('agent', { ...env, MG_CELL: 'x' }, specJson), /MG_CELL x is not a cell of the spec \(a, b, c\)/);
  assert.throws(() => podConfig('agent', { ...env, MG_PASSWORD: undefined }, specJson), /agent: MG_PASSWORD: Required/);
  assert.throws(() => podConfig('pooler', { ...env, MG_POD_IP: 'pod' }, specJson), /pooler: MG_POD_IP: Invalid ip/);
});
