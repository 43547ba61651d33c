/**
 * The fault suite: a real cluster (3 instances in 3 cells, one orchestrator
 * per cell), a continuous writer through the gateway that records every
 * acknowledged insert, and a monitor checking continuously that there are
 * never two writable primaries. Each fault runs MG_FAULT_RUNS times (1 in CI;
 * the long form, `npm run test:fault:long`, uses 20 and prints the figures).
 * After each: the cluster back at full strength; at the end: zero lost
 * acknowledged writes.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { callOrchestrator } from '../../compose/orchestrators.ts';
import type { EventLog, Subscription } from '../../common/eventlog.ts';
import type { OrchEvent } from '../../schemas/index.ts';
import { keepLogs, testCluster, until } from '../support/cluster.ts';
import { testEventLog } from '../support/env.ts';
import {
  freeze, fullStrength, newTerm, partitionPort, pendingRepairs, postgresPids, postmasterPid, restartService, servicePid, shardStatus,
} from './support/faults.ts';
import { PrimaryMonitor } from './support/monitor.ts';
import { lostWrites, Writer } from './support/writer.ts';

const RUNS = Number(process.env.MG_FAULT_RUNS ?? 1);
const cluster = testCluster('fault', 4);
const { flags, mg } = cluster;
const shardName = `${cluster.instances[0].database}/${cluster.instances[0].shard}`;
const figures = new Map<string, number[]>();
const clientErrors = new Map<string, number[]>();
let writer: Writer;
let monitor: PrimaryMonitor;
let eventLog: EventLog;
let journalSub: Subscription;
const journal: OrchEvent[] = [];

const record = (fault: string, ms: number, errors?: number) => {
  figures.set(fault, [...(figures.get(fault) ?? []), ms]);
  if (errors !== undefined) clientErrors.set(fault, [...(clientErrors.get(fault) ?? []), errors]);
};
const instance = (id: string) => cluster.instances.find((i) => i.instanceId === id)!;

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  assert.match(up.stdout, /MultiOrch .*: done in/);
  eventLog = await testEventLog(cluster.prefix);
  journalSub = await eventLog.subscribe('orchEvents', (e) => void journal.push(e), { since: new Date() });
  await fullStrength(cluster);
  writer = new Writer({ port: cluster.spec.gateway.port });
  await writer.setup();
  writer.start();
  monitor = new PrimaryMonitor(cluster.instances.map((i) => ({ instanceId: i.instanceId, port: i.port })));
  monitor.start();
  await until('writes flowing', 30_000, () => writer.acked.size > 20);
});

after(async () => {
  for (const repair of [...pendingRepairs]) repair();
  await writer?.stop();
  await monitor?.stop();
  await journalSub?.stop();
  await eventLog?.close();
  printFigures();
  await mg('cluster', 'down', ...flags);
  // The logs outlive the cluster, for reading a failed run.
  if (process.env.MG_TEST_DIR) keepLogs(cluster.dataDir, path.join(process.env.MG_TEST_DIR, 'fault-logs'));
  fs.rmSync(cluster.dataDir, { recursive: true, force: true });
});

test('bootstrap: the orchestrators wrote the rule of term 1 and the durability policy; status and OpenAPI answer', cluster.explained(async () => {
  const s = await shardStatus(cluster);
  assert.equal(s.policy, 'ANY_2');
  assert.equal(s.term, '1');
  const primary = instance(s.primary!);
  const { stdout } = await mg('shard', 'status', '--data-dir', cluster.dataDir);
  assert.match(stdout, new RegExp(`${shardName}\\s+term 1\\s+rule \\d+\\s+primary ${s.primary}\\s+policy ANY_2`));
  const pgq = await import('../../common/postgres.ts');
  const [row] = await pgq.queryAt<{ names: string; commit: string }>({ host: '127.0.0.1', port: primary.port },
    `SELECT current_setting('synchronous_standby_names') AS names, current_setting('synchronous_commit') AS commit`);
  assert.match(row.names, /^ANY 1 \(".*", ".*"\)$/);
  assert.equal(row.commit, 'on');
  const [rule] = await pgq.queryAt<{ term: string; primary_id: string }>({ host: '127.0.0.1', port: primary.port },
    'SELECT term::text, primary_id FROM multigres.rule ORDER BY rule_number DESC LIMIT 1');
  assert.deepEqual(rule, { term: '1', primary_id: s.primary });
  const api = await callOrchestrator(cluster.spec, 'GET', '/openapi.json');
  assert.ok(api.body.paths['/v1/shards/{database}/{shard}/switchover'].post);
  const bad = await callOrchestrator(cluster.spec, 'POST', '/v1/shards/nope/-/switchover', {});
  assert.equal(bad.status, 404);
  const badBody = await callOrchestrator(cluster.spec, 'POST', `/v1/shards/${shardName}/switchover`, { to: '' });
  assert.equal(badBody.status, 400);
  const badTarget = await callOrchestrator(cluster.spec, 'POST', `/v1/shards/${shardName}/switchover`, { to: 'no-such-instance' });
  assert.equal(badTarget.status, 400);
  assert.match(badTarget.body.error, /not an instance/);
}));

let killedOrchestrator = '';
const broughtBackByUp = new Set<string>();

/** Brings a killed service back: the first time of each kind with `mg cluster up` (what an operator runs), then directly (faster). */
async function restartOrUp(name: string): Promise<void> {
  const kind = name.startsWith('agent-') ? 'agent' : 'orchestrator';
  if (!broughtBackByUp.has(kind)) {
    broughtBackByUp.add(kind);
    const up = await mg('cluster', 'up', ...flags);
    assert.equal(up.code, 0, up.stderr + up.stdout);
  } else {
    await restartService(cluster, name);
  }
}

/** Runs one unplanned fault against the current primary and waits for the new term and full strength. */
async function unplanned(fault: string, inject: (primaryId: string) => Promise<void>, recover?: (oldPrimary: string) => Promise<void>) {
  for (let run = 0; run < RUNS; run++) {
    const before = await fullStrength(cluster);
    const t0 = Date.now();
    await inject(before.primary!);
    const after = await newTerm(cluster, BigInt(before.term!));
    await recover?.(before.primary!);
    await fullStrength(cluster);
    await until('writes after the failover', 30_000, () => [...writer.acked.values()].some((t) => t > t0 + 10) || undefined);
    record(fault, writer.outageAfter(t0));
    assert.notEqual(after.primary, undefined);
  }
}

test('kill -9 of the primary Postgres: a new primary, the old one back as a replica, no lost writes', cluster.explained(async () => {
  await unplanned('kill -9 postgres', async (p) => {
    process.kill(postmasterPid(cluster, p), 'SIGKILL');
  });
}));

test('planned switchover through the CLI: no client-visible errors', cluster.explained(async () => {
  for (let run = 0; run < RUNS; run++) {
    const before = await fullStrength(cluster);
    const t0 = Date.now();
    const r = await mg('shard', 'switchover', shardName, '--data-dir', cluster.dataDir);
    assert.equal(r.code, 0, r.stderr + r.stdout);
    assert.match(r.stdout, new RegExp(`${before.primary} -> `));
    await until('writes after the switchover', 30_000, () => [...writer.acked.values()].some((t) => t > Date.now() - 200) || undefined);
    const t1 = Date.now();
    record('switchover', writer.maxGap(t0, t1), writer.errorsBetween(t0, t1).length);
    assert.deepEqual(writer.errorsBetween(t0, t1), []);
    await fullStrength(cluster);
  }
}));

test('kill -9 of the primary agent: failover; the agent, started again (by mg cluster up the first time), rejoins as a replica', cluster.explained(async () => {
  await unplanned('kill -9 agent', async (p) => {
    process.kill(servicePid(cluster, `agent-${p}`), 'SIGKILL');
  }, async (old) => {
    await restartOrUp(`agent-${old}`);
  });
}));

test('SIGSTOP of the primary beyond the detection window, then SIGCONT: failover, the frozen one fenced and back as a replica', cluster.explained(async () => {
  await unplanned('SIGSTOP primary', async (p) => freeze(postgresPids(cluster, p), 6_000));
}));

test('a network partition isolating the primary: failover; once healed, the old primary rejoins as a replica', cluster.explained(async () => {
  await unplanned('network partition', async (p) => {
    const heal = partitionPort(instance(p).port);
    setTimeout(heal, 8_000);
  });
}));

test('an orchestrator killed mid-failover: another finishes under a newer term', cluster.explained(async () => {
  await unplanned('orchestrator killed mid-failover', async (p) => {
    const from = journal.length;
    process.kill(postmasterPid(cluster, p), 'SIGKILL');
    const decided = await until('an orchestrator deciding whom to promote', 30_000, () =>
      journal.slice(from).find((e) => e.kind === 'DECIDED' && e.summary.startsWith('promote')));
    killedOrchestrator = decided.orchestrator;
    process.kill(servicePid(cluster, decided.orchestrator), 'SIGKILL');
  }, async () => {
    await restartOrUp(killedOrchestrator);
  });
}));

test('two orchestrators racing for the same switchover: one wins, terms never repeat', cluster.explained(async () => {
  for (let run = 0; run < RUNS; run++) {
    const before = await fullStrength(cluster);
    const t0 = Date.now();
    const [a, b] = await Promise.all(cluster.spec.cells.slice(0, 2).map((_, i) =>
      fetch(`http://127.0.0.1:${cluster.spec.orchestrator.basePort + i}/v1/shards/${shardName}/switchover`, {
        method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}',
      }).then((r) => r.status)));
    assert.ok([a, b].includes(200), `statuses ${a}, ${b}`);
    const after = await fullStrength(cluster);
    assert.ok(BigInt(after.term!) > BigInt(before.term!));
    record('two orchestrators racing', writer.maxGap(t0, Date.now()), writer.errorsBetween(t0, Date.now()).length);
  }
  const completed = journal.filter((e) => e.kind === 'COMPLETED' && (e.operation === 'failover' || e.operation === 'switchover'));
  const terms = completed.map((e) => String(e.term));
  assert.equal(new Set(terms).size, terms.length, `a term was completed twice: ${terms.join(', ')}`);
}));

test('zero lost acknowledged writes and never two writable primaries', cluster.explained(async () => {
  await writer.stop();
  await monitor.stop();
  const s = await fullStrength(cluster);
  const lost = await lostWrites(writer.acked.keys(), instance(s.primary!).port);
  assert.ok(writer.acked.size > 100, `only ${writer.acked.size} writes acknowledged`);
  assert.deepEqual(lost, [], `${lost.length} acknowledged writes lost`);
  assert.ok(monitor.samples > 50);
  assert.deepEqual(monitor.violations, []);
  figures.set('lost acknowledged writes', [lost.length]);
  figures.set('acknowledged writes', [writer.acked.size]);
  figures.set('monitor samples', [monitor.samples]);
}));

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)];
}

function printFigures(): void {
  const lines = [`fault suite figures (runs per fault: ${RUNS})`, 'fault | runs | p50 ms | p95 ms | max ms | client errors'];
  for (const [fault, xs] of figures) {
    if (['lost acknowledged writes', 'acknowledged writes', 'monitor samples'].includes(fault)) {
      lines.push(`${fault}: ${xs[0]}`);
      continue;
    }
    const errs = clientErrors.get(fault);
    lines.push(`${fault} | ${xs.length} | ${pct(xs, 50)} | ${pct(xs, 95)} | ${Math.max(...xs)} | ${errs ? errs.reduce((a, b) => a + b, 0) : '-'}`);
  }
  const text = lines.join('\n');
  console.log(text);
  if (process.env.MG_FAULT_FIGURES) fs.writeFileSync(path.resolve(process.env.MG_FAULT_FIGURES), `${text}\n`);
}
