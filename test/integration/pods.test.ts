/**
 * The operator's pods really run a shard (issue 16, decision 0076): the image's entry point is
 * started as processes with exactly the args and env the operator's manifests give
 * (desiredObjects; field references and the credentials Secret resolved as the kubelet would, the
 * spec ConfigMap's content in a file for the mount), each "pod" on its own loopback address
 * 127.0.1.N (Linux routes all of 127/8 to lo, so the pods' fixed ports do not collide), against
 * the run's Kafka and registry. A 1-shard, 2-instance database comes up, a primary is elected,
 * the other instance streams from it, and a client writes and reads through the gateway with the
 * cluster's password.
 *
 * The topology (cells, database, shard) is published by the operator's own step (reconcileTopology,
 * operator/publish.ts, decision 0078: what `mg cluster up` publishes for the same spec), reading the log
 * with the operator's reader, as a reconcile of these resources does; the rest of the operator (the API
 * server, the StatefulSets) is operator.test.ts's.
 * What differs from a pod: the volume (PGDATA is a directory here; the manifest names the pod's),
 * and the spec's dataDir (the container's own filesystem in a pod, where the gateway keeps its TLS
 * material and the agents their backup repository: here one test directory, so the two pods
 * share a repository as they would share a bucket; decision 0076 "Backups"). Connections between
 * the pods come from 127.0.0.1 here (the kernel's source for 127/8), so the password between pods
 * is checked by test/unit/postgres-hba.test.ts instead.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { createLogger } from '../../common/log.ts';
import { nodeArgs } from '../../compose/launch.ts';
import { PostgresInstance } from '../../ingest/postgres/instance.ts';
import { reconcileTopology } from '../../operator/publish.ts';
import { clusterSpecOf, credentialsSecret, desiredObjects, PORTS, type MultigresCluster, type MultigresDatabase } from '../../operator/resources.ts';
import { TopologyReaders } from '../../operator/topology.ts';
import { bootstrap, registryUrl, testEventLog, uniquePrefix } from '../support/env.ts';
import { until } from '../support/wait.ts';

const repoRoot = path.resolve(import.meta.dirname, '..', '..');
const base = Number(process.env.MG_TEST_PORT_BASE ?? 30_000) + 4900;
const dir = fs.mkdtempSync(path.join(process.env.MG_TEST_DIR ?? '/tmp', 'pods-'));
fs.chmodSync(dir, 0o755); // Postgres runs as its own user and must reach the data dirs below

const cluster: MultigresCluster = {
  apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresCluster', metadata: { name: 'pods', namespace: 'test', uid: 'c-uid' },
  spec: {
    image: 'multigres:test', kafka: { bootstrap: bootstrap(), topicPrefix: uniquePrefix('pods') }, registry: { url: registryUrl() },
    cells: [{ name: 'zone1' }], gateway: { replicas: 1, port: base }, orchestrator: { port: base + 1 },
  },
};
const dbs: MultigresDatabase[] = [{ apiVersion: 'multigres.io/v1alpha1', kind: 'MultigresDatabase', metadata: { name: 'orders', namespace: 'test', uid: 'd-uid' }, spec: { cluster: 'pods', instancesPerShard: 2 } }];
const objects = desiredObjects(cluster, dbs, clusterSpecOf(cluster, dbs));
const secret = credentialsSecret(cluster, (n) => `secret-${n}-${Math.random().toString(36).slice(2)}`).stringData!;

// The spec ConfigMap, mounted: its dataDir moved off the machine's /var/lib (see above).
const specFile = path.join(dir, 'spec.json');
const spec = JSON.parse(objects.find((o) => o.kind === 'ConfigMap')!.data!['spec.json']);
fs.writeFileSync(specFile, JSON.stringify({ ...spec, dataDir: path.join(dir, 'multigres'), backup: { ...spec.backup, repoPath: path.join(dir, 'multigres', 'backups') } }));

interface Pod { name: string; ip: string; child: ChildProcess; exited: Promise<number | null> }
const pods: Pod[] = [];
const dataDirs: Array<{ pgdata: string; ip: string }> = [];

/** Starts one container of a workload as the kubelet would: the manifest's args and env, resolved. */
function startContainer(workload: string, container: string, name: string, ip: string, extraEnv: Record<string, string> = {}): Pod {
  const w = objects.find((o) => o.metadata!.name === workload) as any;
  const c = w.spec.template.spec.containers.find((x: any) => x.name === container);
  const env = Object.fromEntries(c.env.map((e: any) => [e.name, e.value ?? (e.valueFrom.fieldRef
    ? { 'metadata.name': name, 'status.podIP': ip }[e.valueFrom.fieldRef.fieldPath as string]
    : secret[e.valueFrom.secretKeyRef.key])]));
  const log = fs.openSync(path.join(dir, `${name}-${container}.log`), 'a');
  const child = spawn(process.execPath, [...nodeArgs('compose/entrypoint.ts'), ...c.args], {
    cwd: repoRoot, stdio: ['ignore', log, log], env: { ...process.env, ...env, MG_SPEC_FILE: specFile, ...extraEnv },
  });
  const pod = { name: `${name}/${container}`, ip, child, exited: new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code))) };
  pods.push(pod);
  return pod;
}

before(async () => {
  // The cluster's cells, database and shard on the topology log, published by the operator's step for these
  // resources (decision 0078), through the operator's reader of the log, until it says so.
  const eventLog = await testEventLog(cluster.spec.kafka.topicPrefix!); // the run's topics under this prefix
  await eventLog.close();
  const readers = new TopologyReaders(createLogger('pods-test-operator'), () => undefined);
  const where = { bootstrap: cluster.spec.kafka.bootstrap, registryUrl: cluster.spec.registry.url, topicPrefix: cluster.spec.kafka.topicPrefix! };
  const published: string[] = [];
  const outcome = await until('the operator to publish the topology', 60_000, async () => {
    const step = await reconcileTopology(readers, 'test/pods', where, clusterSpecOf(cluster, dbs));
    published.push(...step.published);
    return step.condition.status === 'True' && step;
  });
  assert.deepEqual(published, ['CellRegistered zone1', 'DatabaseCreated orders', 'ShardDefined orders/-'], outcome.condition.message);
  await readers.close();
  startContainer('pods-orch-zone1', 'orchestrator', 'pods-orch-zone1-7f-a', '127.0.1.40');
  for (const k of [0, 1]) {
    const ip = `127.0.1.${41 + k}`;
    const name = `pods-orders-0-zone1-${k}`;
    // The pod's volume (the manifest mounts it at /var/lib/postgresql/data).
    const pgdata = path.join(dir, name, 'data', 'pgdata');
    fs.mkdirSync(path.dirname(pgdata), { recursive: true, mode: 0o755 });
    fs.chmodSync(path.join(dir, name), 0o755);
    dataDirs.push({ pgdata, ip });
    startContainer('pods-orders-0-zone1', 'agent', name, ip, { PGDATA: pgdata });
    startContainer('pods-orders-0-zone1', 'pooler', name, ip);
  }
  startContainer('pods-gateway', 'gateway', 'pods-gateway-5c-b', '127.0.1.43');
});

after(async () => {
  for (const p of pods) p.child.kill('SIGTERM');
  await Promise.all(pods.map((p) => Promise.race([p.exited, new Promise((r) => setTimeout(r, 15_000))])));
  for (const p of pods) if (p.child.exitCode === null) p.child.kill('SIGKILL');
  // The agent's Postgres outlives it (as locally): stop what the pods started.
  const log = createLogger('pods-test');
  for (const d of dataDirs) await new PostgresInstance({ name: 'pod', dataDir: d.pgdata, host: d.ip, port: PORTS.postgres, log }).stop('immediate').catch(() => undefined);
});

const instance = (ip: string) => new pg.Client({ host: ip, port: PORTS.postgres, user: 'postgres', database: 'orders', password: secret['postgres-password'] });

test('a 1-shard, 2-instance database runs from the manifests: a primary elected, a replica streaming, a client through the gateway', async () => {
  const gateway = () => new pg.Client({ host: '127.0.1.43', port: base, user: 'postgres', database: 'orders', password: secret['postgres-password'], connectionTimeoutMillis: 5_000 });
  // The gateway authenticates with the password the shard's first primary's agent set from MG_PASSWORD.
  await until('a write through the gateway', 240_000, async () => {
    for (const p of pods) if (p.child.exitCode !== null) throw new Error(`${p.name} exited with ${p.child.exitCode}; see ${dir}`);
    const c = gateway();
    c.on('error', () => {});
    try {
      await c.connect();
      await c.query('CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY, v text)');
      await c.query("INSERT INTO t VALUES (1, 'from a pod') ON CONFLICT (id) DO NOTHING");
      return true;
    } catch {
      return false;
    } finally {
      await c.end().catch(() => {});
    }
  });
  const c = gateway();
  await c.connect();
  try {
    assert.deepEqual((await c.query('SELECT v FROM t WHERE id = 1')).rows, [{ v: 'from a pod' }]);
  } finally {
    await c.end();
  }
  await assert.rejects(async () => {
    const wrong = new pg.Client({ host: '127.0.1.43', port: base, user: 'postgres', database: 'orders', password: 'wrong' });
    try {
      await wrong.connect();
    } finally {
      await wrong.end().catch(() => {});
    }
  }, /password authentication failed/);

  // One primary, the other instance a standby of it that has the row: each pod's Postgres at its own address.
  const roles = await until('the replica to have streamed the row', 60_000, async () => {
    const seen: Array<[string, boolean, number]> = [];
    for (const { ip } of dataDirs) {
      const pgc = instance(ip);
      pgc.on('error', () => {});
      try {
        await pgc.connect();
        const { rows: [r] } = await pgc.query(`SELECT pg_is_in_recovery() AS rec, (SELECT count(*)::int FROM t) AS n`);
        seen.push([ip, r.rec, r.n]);
      } catch {
        return false;
      } finally {
        await pgc.end().catch(() => {});
      }
    }
    return seen.every(([, , n]) => n === 1) && seen;
  });
  assert.deepEqual(roles.map(([, rec]) => rec).sort(), [false, true], `one primary, one replica: ${JSON.stringify(roles)}`);
  const primaryIp = roles.find(([, rec]) => !rec)![0];
  const replica = instance(roles.find(([, rec]) => rec)![0]);
  await replica.connect();
  try {
    const { rows: [r] } = await replica.query('SELECT sender_host, sender_port FROM pg_stat_wal_receiver');
    assert.deepEqual([r.sender_host, r.sender_port], [primaryIp, PORTS.postgres], "the replica streams from the primary's pod address");
  } finally {
    await replica.end();
  }
});
