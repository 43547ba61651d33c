/**
 * `mg cluster up/status/down` end to end, run as a user runs it (the CLI in a
 * subprocess), on the run's shared broker and registry with real Postgres.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import type { EventLog, Subscription } from '../../common/eventlog.ts';
import { isAlive, readPid } from '../../compose/supervise.ts';
import type { PlannedInstance } from '../../compose/spec.ts';
import {
  applyTopologyEvent, emptyTopology, foldTopology, type AgentCommandResult, type HealthEvent, type TopologyEvent,
} from '../../schemas/index.ts';
import { testCluster, until } from '../support/cluster.ts';
import { queryInstance as query } from '../support/postgres.ts';
import { testEventLog } from '../support/env.ts';

const cluster = testCluster('cluster', 0);
const { dataDir, prefix, flags, mg } = cluster;
// MultiOrch elects the primary when `up` runs (the first test).
let primary: PlannedInstance, replica1: PlannedInstance, replica2: PlannedInstance;

let eventLog: EventLog;
const early: TopologyEvent[] = [];
const heartbeats: Array<HealthEvent & { receivedAt: number }> = [];
const subs: Subscription[] = [];

before(async () => {
  eventLog = await testEventLog(prefix);
  // A consumer that follows the log from before the cluster exists (compared later with a late one).
  subs.push(await eventLog.subscribe('topology', (e) => void early.push(e)));
  subs.push(await eventLog.subscribe('health', (h) => void heartbeats.push({ ...h, receivedAt: Date.now() }), { since: new Date() }));
});

after(async () => {
  await Promise.all(subs.map((s) => s.stop()));
  await eventLog.close();
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

const postmasterPid = (dir: string) => Number(fs.readFileSync(path.join(dir, 'postmaster.pid'), 'utf8').split('\n')[0]);
const agentPid = (id: string) => Number(fs.readFileSync(path.join(dataDir, 'run', `agent-${id}.pid`), 'utf8').split(' ')[0]);
const latest = (id: string) => heartbeats.filter((h) => h.instanceId === id).at(-1);
const streaming = (id: string) => {
  const h = latest(id);
  return h && h.reachable && h.role === 'REPLICA' && h.walReceiverStatus === 'streaming' && Date.now() - h.receivedAt < 2_000 ? h : undefined;
};

/** Rows of `mg cluster status` keyed by instance id. */
function statusRows(out: string): Map<string, Record<string, string>> {
  const lines = out.trim().split('\n');
  const headerAt = lines.findIndex((l) => l.startsWith('INSTANCE'));
  const header = lines[headerAt].split(/\s{2,}/);
  return new Map(lines.slice(headerAt + 1).map((l) => {
    const cols = l.split(/\s{2,}/);
    return [cols[0], Object.fromEntries(header.map((h, i) => [h, cols[i] ?? '']))];
  }));
}

test('up starts 1 primary and 2 streaming replicas; status shows them healthy, read from the event log', cluster.explained(async (t) => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  // The poolers, the gateway and the materializer start side by side, in one step.
  assert.match(up.stdout, /\[11\/12\] MultiPoolers .*, MultiGateway .*, materializer .*: done in/);
  for (const name of ['pooler-postgres-0-zone1-0', 'pooler-postgres-0-zone2-1', 'pooler-postgres-0-zone3-2', 'gateway', 'materializer']) assert.match(up.stdout, new RegExp(`\n {6}${name}: pid \\d+, port \\d+\n`));
  assert.match(up.stdout, /\[12\/12\] instances the spec no longer has \(removed through MultiOrch\) \.\.\.\n {6}none\n/);
  t.diagnostic(up.stdout.split('\n').filter((l) => /^\[\d+\/12\]|is up in/.test(l)).join('\n'));
  const healthz = await fetch(`http://127.0.0.1:${cluster.spec.materializer.port}/healthz`);
  assert.equal(healthz.status, 200);
  assert.match(up.stdout, /postgres\/-: primary postgres-0-zone\d-\d, term \d+, policy ANY_2/);
  ({ primary, replicas: [replica1, replica2] } = await cluster.roles());
  assert.match(up.stdout, new RegExp(`psql -h 127.0.0.1 -p ${cluster.spec.gateway.port} -U postgres postgres`));

  const status = await mg('cluster', 'status', ...flags);
  assert.equal(status.code, 0, status.stderr);
  const rows = statusRows(status.stdout);
  assert.deepEqual([...rows.keys()].sort(), [primary.instanceId, replica1.instanceId, replica2.instanceId].sort());
  assert.deepEqual(Object.values(Object.fromEntries(rows)).map((r) => [r.TYPE, r.ROLE, r.HEALTH, r.SERVING]).sort(), [
    ['PRIMARY', 'PRIMARY', 'healthy', 'SERVING'], ['REPLICA', 'REPLICA', 'healthy', 'SERVING'], ['REPLICA', 'REPLICA', 'healthy', 'SERVING'],
  ]);

  // Replication works: a row written on the primary is read on both replicas.
  await query(primary.port, 'CREATE TABLE IF NOT EXISTS probe (id int PRIMARY KEY, note text)');
  await query(primary.port, "INSERT INTO probe VALUES (1, 'hello')");
  for (const r of [replica1, replica2]) {
    await until(`the row on ${r.instanceId}`, 10_000, async () => (await query(r.port, 'SELECT note FROM probe WHERE id = 1'))[0]?.note === 'hello');
  }
}));

test('kill -9 of a replica Postgres: unreachable within 2 s, restarted by its agent, streaming again', cluster.explained(async () => {
  const victim = path.join(dataDir, 'postgres', replica1.instanceId);
  const oldPid = postmasterPid(victim);
  await until('replica streaming', 10_000, () => streaming(replica1.instanceId));
  const killedAt = Date.now();
  process.kill(oldPid, 'SIGKILL');
  const down = await until('an unreachable heartbeat', 5_000, () =>
    heartbeats.find((h) => h.instanceId === replica1.instanceId && !h.reachable && h.receivedAt >= killedAt));
  const detectMs = down.receivedAt - killedAt;
  assert.ok(detectMs < 2_000, `unreachable seen after ${detectMs} ms`);
  assert.equal(down.role, 'UNKNOWN');

  const back = await until('the replica streaming again', 60_000, () => {
    const h = streaming(replica1.instanceId);
    return h && h.receivedAt > down.receivedAt ? h : undefined;
  });
  assert.notEqual(back.postgresPid, oldPid);
  await query(primary.port, "INSERT INTO probe VALUES (2, 'after restart')");
  await until('the new row on the restarted replica', 10_000, async () => (await query(replica1.port, 'SELECT count(*)::int AS n FROM probe'))[0].n === 2);
}));

test('a hung Postgres (SIGSTOP) is reported unreachable within 2 s and left alone, then recovers on SIGCONT', cluster.explained(async () => {
  const pid = postmasterPid(path.join(dataDir, 'postgres', replica2.instanceId));
  await until('replica streaming', 10_000, () => streaming(replica2.instanceId));
  const stoppedAt = Date.now();
  process.kill(pid, 'SIGSTOP');
  try {
    const hung = await until('an unreachable heartbeat', 5_000, () =>
      heartbeats.find((h) => h.instanceId === replica2.instanceId && !h.reachable && h.receivedAt >= stoppedAt));
    assert.ok(hung.receivedAt - stoppedAt < 2_000, `unreachable seen after ${hung.receivedAt - stoppedAt} ms`);
    assert.match(hung.error ?? '', /no answer within/);
    assert.equal(hung.postgresPid, pid, 'a hung Postgres must not be restarted by the agent');
  } finally {
    process.kill(pid, 'SIGCONT');
  }
  await until('the replica streaming again', 20_000, () => {
    const h = streaming(replica2.instanceId);
    return h && h.receivedAt > stoppedAt + 1_000 ? h : undefined;
  });
}));

test('a consumer started late rebuilds the same topology as one that followed the log from the start', cluster.explained(async () => {
  const late = emptyTopology();
  const sub = await eventLog.subscribe('topology', (e) => void applyTopologyEvent(late, e));
  await sub.caughtUp;
  await sub.stop();
  assert.deepEqual(late, foldTopology(early));
  assert.equal(late.instances.size, 3);
  assert.equal(late.primaries.get('postgres/-')?.instanceId, primary.instanceId);
  assert.ok((late.primaries.get('postgres/-')?.term ?? 0n) >= 1n); // 1 unless the first election had to be retried
}));

test('up again is harmless, and it recovers an agent killed with kill -9', cluster.explained(async () => {
  const before = emptyTopology();
  const s1 = await eventLog.subscribe('topology', (e) => void applyTopologyEvent(before, e));
  await s1.caughtUp;
  await s1.stop();

  const killed = agentPid(replica2.instanceId);
  process.kill(killed, 'SIGKILL');
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  assert.match(up.stdout, new RegExp(`${primary.instanceId}: agent already running`));
  assert.match(up.stdout, /already in the log/);
  assert.notEqual(agentPid(replica2.instanceId), killed);

  const status = statusRows((await mg('cluster', 'status', ...flags)).stdout);
  assert.deepEqual([...status.values()].map((r) => r.HEALTH), ['healthy', 'healthy', 'healthy']);
  const afterUp = emptyTopology();
  const s2 = await eventLog.subscribe('topology', (e) => void applyTopologyEvent(afterUp, e));
  await s2.caughtUp;
  await s2.stop();
  assert.deepEqual(afterUp.primaries, before.primaries, 'a second up must not change who is primary');
}));

test('a fourth instance added to the spec starts empty and MultiOrch clones it from the current primary', cluster.explained(async () => {
  const specFile = path.join(dataDir, 'four.yaml');
  fs.writeFileSync(specFile, JSON.stringify({ databases: [{ name: 'postgres', shards: 1, instancesPerShard: 4 }] }));
  const up = await mg('cluster', 'up', ...flags, '--spec', specFile);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  const added = 'postgres-0-zone1-3';
  assert.match(up.stdout, new RegExp(`${added}: agent pid \\d+`));
  const rows = statusRows((await mg('cluster', 'status', ...flags)).stdout);
  assert.deepEqual([rows.get(added)?.ROLE, rows.get(added)?.HEALTH], ['REPLICA', 'healthy']);
  const history = await mg('shard', 'history', 'postgres/-', '--data-dir', dataDir);
  assert.match(history.stdout, new RegExp(`${added}: cloned with pg_basebackup; streaming from 127.0.0.1:${primary.port}`));
  // It holds the data written before it existed, and follows new writes.
  const addedPort = cluster.spec.postgres.basePort + 3;
  assert.equal((await query(addedPort, 'SELECT note FROM probe WHERE id = 1'))[0]?.note, 'hello');
  await query(primary.port, "INSERT INTO probe VALUES (4, 'four') ON CONFLICT DO NOTHING");
  await until('the new row on the added replica', 10_000, async () => (await query(addedPort, 'SELECT 1 FROM probe WHERE id = 4')).length === 1);
}));

test('an agent command restarts Postgres and is answered with a result carrying its id', cluster.explained(async () => {
  const results: AgentCommandResult[] = [];
  const sub = await eventLog.subscribe('agentResults', (r) => void results.push(r), { since: new Date() });
  subs.push(sub);
  const oldPid = postmasterPid(path.join(dataDir, 'postgres', replica1.instanceId));
  const commandId = randomUUID();
  await eventLog.publisher('agentCommands')([{ key: replica1.instanceId, value: {
    commandId, instanceId: replica1.instanceId, issuedAt: new Date(), issuedBy: 'test', action: 'RESTART_POSTGRES', args: {},
  } }]);
  const result = await until('the command result', 30_000, () => results.find((r) => r.commandId === commandId));
  assert.deepEqual([result.status, result.instanceId], ['SUCCEEDED', replica1.instanceId]);
  assert.notEqual(postmasterPid(path.join(dataDir, 'postgres', replica1.instanceId)), oldPid);
  await until('the replica streaming again', 20_000, () => streaming(replica1.instanceId));
}));

test('agents serve Prometheus metrics and log structured JSON', cluster.explained(async (t) => {
  const metrics = await (await fetch(`http://127.0.0.1:${primary.metricsPort}/metrics`)).text();
  assert.match(metrics, /^mg_agent_heartbeats_total \d+/m);
  assert.match(metrics, /^mg_agent_postgres_up 1/m);
  const firstLine = fs.readFileSync(path.join(dataDir, 'logs', `agent-${primary.instanceId}.log`), 'utf8').split('\n')[0];
  const entry = JSON.parse(firstLine);
  assert.equal(entry.service, 'ingest-agent');
  assert.equal(entry.instance, primary.instanceId);
  const rssKb = Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${agentPid(primary.instanceId)}/status`, 'utf8'))![1]);
  t.diagnostic(`agent RSS: ${(rssKb / 1024).toFixed(1)} MiB`);
}));

test('a bad spec is refused with an error naming the field', cluster.explained(async () => {
  const res = await mg('cluster', 'up', '--data-dir', path.join(dataDir, 'other'), '--set', 'kafka.port=80', '--set', 'databases=oops');
  assert.equal(res.code, 2);
  assert.match(res.stderr, /kafka\.port: Number must be greater than or equal to 1024/);
  assert.match(res.stderr, /databases: Expected array/);
  assert.equal(fs.existsSync(path.join(dataDir, 'other')), false);
}));

test('down stops every agent and Postgres it started', cluster.explained(async () => {
  const pids = [primary, replica1, replica2].map((i) => agentPid(i.instanceId));
  const materializer = readPid(path.join(dataDir, 'run'), 'materializer');
  assert.ok(materializer, 'up started a materializer');
  const res = await mg('cluster', 'down', ...flags);
  assert.equal(res.code, 0, res.stderr);
  for (const pid of pids) assert.equal(isAlive(pid), false, `agent pid ${pid} still alive`);
  assert.equal(isAlive(materializer!), false, 'the materializer still runs');
  for (const inst of [primary, replica1, replica2]) {
    await assert.rejects(query(inst.port, 'SELECT 1'), /ECONNREFUSED/);
  }
}));
