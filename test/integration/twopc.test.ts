/**
 * Two-phase commit across the shards of a real cluster (database `bank`, 4
 * shards of one instance). Through the gateway, a node-postgres client moves
 * money from an account on one shard to accounts on two others in `twopc`
 * mode, and the gateway itself is killed with kill -9 at each step of the
 * protocol (MG_TWOPC_FAULT_POINT stops it there, deterministically), then
 * restarted; the orchestrators' in-doubt resolver finishes what it left. A
 * checker asserts what a user would: the total of the balances never
 * changes, every transfer is on all its shards or on none, nothing stays
 * prepared. Below the gateway: the pooler passes PREPARE TRANSACTION /
 * COMMIT PREPARED and lets the server connection go after PREPARE, and a
 * driver process (test/support/twopc-driver.ts) runs the coordinator on two
 * shards' poolers for the race with the resolver and the pruning.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { callOrchestrator } from '../../compose/orchestrators.ts';
import { parseGid } from '../../schemas/index.ts';
import { servicePid } from '../fault/support/faults.ts';
import { testCluster, until } from '../support/cluster.ts';
import { checkAllOrNothing, createAccounts, prepared, sql, startDriver, type ShardAt } from '../support/twopc.ts';
import { accountsOnShards, checkBank, createBank, gatewayClient, preparedAt, restartGateway, transfer, viaGateway } from '../support/twopc-gateway.ts';

// Long enough that a loaded machine still sees the transaction in doubt between the kill and the first check.
const GRACE_MS = 3_000;
const RETENTION_MS = 10_000;
// Two cells: two orchestrators, so two resolvers work on the same in-doubt transactions.
const cluster = testCluster('twopc', 4, {
  settings: { 'orchestrator.twopcGraceMs': GRACE_MS, 'orchestrator.twopcRetentionMs': RETENTION_MS },
  spec: { cells: ['zone1', 'zone2'], databases: [{ name: 'bank', sharded: true, shards: 4, instancesPerShard: 1, transactionMode: 'twopc' }] },
});
const { dataDir, flags, mg } = cluster;
// One instance per shard: each is its shard's primary. The driver works on the first two.
const SHARDS = ['-40', '40-80', '80-c0', 'c0-'];
const portOf = (shard: string) => cluster.instances.find((x) => x.database === 'bank' && x.shard === shard)!.port;
const allPorts = () => SHARDS.map(portOf);
const shards: ShardAt[] = SHARDS.slice(0, 2).map((shard) => {
  const i = cluster.instances.find((x) => x.database === 'bank' && x.shard === shard)!;
  return { shard, port: i.port, poolerPort: i.poolerPort };
});
const [left] = shards;

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  await createAccounts(shards);
  await createBank(cluster);
});

after(async () => {
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

async function twopcHistory(shard: string): Promise<Array<{ kind: string; summary: string; details: Record<string, string> }>> {
  const r = await callOrchestrator(cluster.spec, 'GET', `/v1/shards/bank/${encodeURIComponent(shard)}/history?limit=500`);
  assert.equal(r.status, 200);
  return r.body.events.filter((e: { operation: string }) => e.operation === 'twopc');
}

test('the pooler passes PREPARE TRANSACTION and COMMIT PREPARED, and keeps no server connection after PREPARE', cluster.explained(async () => {
  const a = new pg.Client({ host: '127.0.0.1', port: left.poolerPort, user: 'postgres', database: 'postgres' });
  await a.connect();
  try {
    await a.query('BEGIN');
    await a.query('UPDATE accounts SET balance = balance + 0 WHERE id = 1');
    await a.query("PREPARE TRANSACTION 'pooler-check'");
    const admin = new pg.Client({ host: '127.0.0.1', port: left.poolerPort, user: 'postgres', database: 'pgbouncer' });
    await admin.connect();
    const pools = (await admin.query('SHOW POOLS')).rows;
    await admin.end();
    const pool = pools.find((p) => p.database === 'postgres' && p.user === 'postgres');
    assert.equal(Number(pool.sv_active), 0, 'no server connection held for the client after PREPARE');
    assert.equal(Number(pool.cl_pinned), 0);
    assert.deepEqual(await prepared(left.port), ['pooler-check']);
    // The same client, on whatever server connection the pooler gives it now.
    await a.query("COMMIT PREPARED 'pooler-check'");
    assert.deepEqual(await prepared(left.port), []);
  } finally {
    await a.end();
  }
}));

/** The gids of the transfers that committed, for the pruning test. */
let committedGids: string[] = [];

test('transfers between the shards commit on both through the coordinator', cluster.explained(async () => {
  const driver = startDriver(shards, 30, 'none');
  assert.equal(await driver.exited, 0, driver.stderr());
  assert.equal(driver.events.filter((e) => e.event === 'committed').length, 30, JSON.stringify(driver.events.filter((e) => e.event === 'failed')));
  assert.equal((await checkAllOrNothing(shards)).size, 30);
  committedGids = driver.events.filter((e) => e.event === 'committed').map((e) => e.gid!);
  const decisions = await sql(left.port, 'SELECT gid, decision FROM mg_twopc.decisions WHERE gid = ANY($1)', [committedGids]);
  assert.ok(decisions.length > 0 && decisions.every((d) => d.decision === 'commit'), 'COMMIT decisions on the first participant\'s shard');
  assert.ok(decisions.some((d) => d.gid === committedGids.at(-1)), 'the newest decision is there (younger than the retention)');
}));


/**
 * One transfer over three shards through a gateway started with
 * MG_TWOPC_FAULT_POINT=`step`: its COMMIT stops at the step, the gateway is
 * killed with kill -9 there, then started again without the hook. Returns the gid in doubt, where it was prepared right after the kill,
 * and whether the transfer landed once the resolver is done.
 */
async function killGatewayAt(step: string, n: number) {
  const stopped = await restartGateway(cluster, step);
  // The new gateway answers once it has the topology.
  let client = gatewayClient(cluster);
  await until('the restarted gateway to take clients', 30_000, () => client.connect().then(() => true, () => {
    client = gatewayClient(cluster);
    return false;
  }));
  const t = accountsOnShards(SHARDS.length, n, 3);
  const txn = `kill-${step}`;
  const outcome = transfer(client, txn, t.from, t.to, n).then(() => 'committed', (err: Error) => err.message);
  const gid = await stopped();
  process.kill(servicePid(cluster, 'gateway'), 'SIGKILL');
  assert.match(await outcome, /Connection terminated|ECONNRESET|terminated unexpectedly/, 'the client sees its connection drop');
  const decisionShard = parseGid(gid)!.decisionShard;
  assert.ok(t.shards.includes(decisionShard), `the decision shard ${decisionShard} is one of the transfer's`);
  // The decision shard never prepares; how many of the two others are prepared is what the step left.
  const inDoubt = t.shards.filter((s) => s !== decisionShard);
  const preparedOn = (await Promise.all(t.shards.map(async (s) => ((await preparedAt(portOf(s))).includes(gid) ? [s] : [])))).flat();
  assert.ok(!preparedOn.includes(decisionShard));
  await restartGateway(cluster);
  await until('the resolver to finish the transfer', 30_000, async () => (await Promise.all(allPorts().map((p) => preparedAt(p)))).flat().length === 0);
  const landed = (await checkBank(cluster, allPorts(), 3)).has(txn);
  return { gid, decisionShard, others: inDoubt, preparedOn, landed };
}

test('transfers across three shards through the gateway commit everywhere (twopc mode)', cluster.explained(async () => {
  await viaGateway(cluster, async (g) => {
    for (let n = 0; n < 10; n++) {
      const t = accountsOnShards(SHARDS.length, n, 3);
      await transfer(g, `ok-${n}`, t.from, t.to, n);
    }
  });
  const landed = await checkBank(cluster, allPorts(), 3);
  assert.equal([...landed].filter((x) => x.startsWith('ok-')).length, 10);
}));

test('kill -9 of the gateway after the PREPAREs, before the decision: the resolver rolls the transfer back everywhere (presumed abort)', cluster.explained(async () => {
  const r = await killGatewayAt('before-decision', 11);
  assert.deepEqual(r.preparedOn.sort(), r.others.sort(), 'prepared on the two other shards');
  assert.equal(r.landed, false);
  const [row] = await sql(portOf(r.decisionShard), 'SELECT decision, decided_by FROM mg_twopc.decisions WHERE gid = $1', [r.gid], 'bank');
  assert.equal(row.decision, 'abort');
  assert.match(row.decided_by, /^orch-/);
  await until('the abort decision as an orchestrator event', 10_000, async () => (await twopcHistory(r.decisionShard)).some((e) => e.kind === 'DECIDED' && e.details.gid === r.gid));
}));

test('kill -9 of the gateway after the decision: the resolver commits the transfer on the prepared shards', cluster.explained(async () => {
  const r = await killGatewayAt('after-decision', 12);
  assert.deepEqual(r.preparedOn.sort(), r.others.sort(), 'prepared on the two other shards');
  assert.equal(r.landed, true);
  for (const shard of r.others) {
    await until(`the COMMIT PREPARED on ${shard} as an orchestrator event`, 10_000,
      async () => (await twopcHistory(shard)).some((e) => e.kind === 'ACTED' && e.details.gid === r.gid && e.summary.startsWith('COMMIT PREPARED')));
  }
}));

test('kill -9 of the gateway during COMMIT PREPARED: the resolver commits the shard still prepared', cluster.explained(async () => {
  const r = await killGatewayAt('during-commit-prepared', 13);
  assert.equal(r.preparedOn.length, 1, 'committed on one of the two other shards, still prepared on the last');
  assert.equal(r.landed, true);
  await until(`the COMMIT PREPARED on ${r.preparedOn[0]} as an orchestrator event`, 10_000,
    async () => (await twopcHistory(r.preparedOn[0])).some((e) => e.kind === 'ACTED' && e.details.gid === r.gid && e.summary.startsWith('COMMIT PREPARED')));
}));

test('a coordinator slower than the grace period loses to the resolver\'s abort and rolls back everywhere', cluster.explained(async () => {
  const driver = startDriver(shards, 3, 'slow-decision', { MG_DRIVER_SLOW_MS: String(GRACE_MS + 4_000) });
  assert.equal(await driver.exited, 0, driver.stderr());
  const last = driver.events.find((e) => e.txn?.endsWith('-3'))!;
  assert.equal(last.event, 'failed', JSON.stringify(last));
  assert.equal(last.code, '40001');
  assert.match(last.message!, /in-doubt resolver aborted it/);
  const ledger = await checkAllOrNothing(shards);
  assert.ok(!ledger.has(last.txn!));
  assert.ok(ledger.has(driver.txn(2)), 'the transfers before it committed');
}));

test('decisions of finished transactions are pruned after the retention period', cluster.explained(async () => {
  assert.equal(committedGids.length, 30);
  await until('the decisions to be pruned', 4 * RETENTION_MS, async () =>
    (await sql(left.port, 'SELECT count(*)::int AS n FROM mg_twopc.decisions WHERE gid = ANY($1)', [committedGids]))[0].n === 0);
}));
