/**
 * Two-phase commit across the two shards of a real cluster: the pooler passes
 * PREPARE TRANSACTION / COMMIT PREPARED and lets the server connection go
 * after PREPARE; a driver process (test/support/twopc-driver.ts) moves money
 * between accounts on the two shards through the poolers with the real
 * coordinator, and is killed with kill -9 at each point of the protocol; the
 * orchestrators' in-doubt resolver then finishes what it left. A checker
 * asserts what a user would: every transfer is on both shards or on neither,
 * the total of the balances never changes, nothing stays prepared.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { callOrchestrator } from '../../compose/orchestrators.ts';
import { testCluster, until } from '../support/cluster.ts';
import { checkAllOrNothing, createAccounts, prepared, sql, startDriver, type ShardAt } from '../support/twopc.ts';

// Long enough that a loaded machine still sees the transaction in doubt between the kill and the first check.
const GRACE_MS = 3_000;
const RETENTION_MS = 10_000;
// Two cells: two orchestrators, so two resolvers work on the same in-doubt transactions.
const cluster = testCluster('twopc', 4, {
  settings: { 'orchestrator.twopcGraceMs': GRACE_MS, 'orchestrator.twopcRetentionMs': RETENTION_MS },
  spec: { cells: ['zone1', 'zone2'], databases: [{ name: 'bank', sharded: true, shards: 2, instancesPerShard: 1 }] },
});
const { dataDir, flags, mg } = cluster;
// One instance per shard: each is its shard's primary.
const shards: ShardAt[] = ['-80', '80-'].map((shard) => {
  const i = cluster.instances.find((x) => x.database === 'bank' && x.shard === shard)!;
  return { shard, port: i.port, poolerPort: i.poolerPort };
});
const [left, right] = shards;

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  assert.match(up.stdout, /bank\/-80: primary bank-_80-zone1-0/);
  assert.match(up.stdout, /bank\/80-: primary bank-80_-zone1-0/);
  await createAccounts(shards);
});

after(async () => {
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

async function killAtPauseAndResolve(pause: string): Promise<{ gid: string; landed: boolean }> {
  const driver = startDriver(shards, 5, pause);
  const p = await driver.paused;
  driver.child.kill('SIGKILL');
  await driver.exited;
  assert.ok(p.gid?.startsWith('mg2pc:bank:-80:'), `gid ${p.gid}`);
  const stillPrepared = [...(await prepared(left.port)), ...(await prepared(right.port))];
  assert.ok(stillPrepared.includes(p.gid!), `${p.gid} is in doubt after the kill (${stillPrepared.join(', ')})`);
  await until('the resolver to finish the in-doubt transaction', 30_000, async () => (await prepared(left.port)).length + (await prepared(right.port)).length === 0);
  const ledger = await checkAllOrNothing(shards);
  return { gid: p.gid!, landed: ledger.has(driver.txn(5)) };
}

async function twopcHistory(shard: string): Promise<Array<{ kind: string; summary: string; details: Record<string, string> }>> {
  const r = await callOrchestrator(cluster.spec, 'GET', `/v1/shards/bank/${encodeURIComponent(shard)}/history?limit=500`);
  assert.equal(r.status, 200);
  return r.body.events.filter((e: { operation: string }) => e.operation === 'twopc');
}

test('the pooler passes PREPARE TRANSACTION and COMMIT PREPARED, and keeps no server connection after PREPARE', async () => {
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
});

/** The gids of the transfers that committed, for the pruning test. */
let committedGids: string[] = [];

test('transfers between the shards commit on both through the coordinator', async () => {
  const driver = startDriver(shards, 30, 'none');
  assert.equal(await driver.exited, 0, driver.stderr());
  assert.equal(driver.events.filter((e) => e.event === 'committed').length, 30, JSON.stringify(driver.events.filter((e) => e.event === 'failed')));
  assert.equal((await checkAllOrNothing(shards)).size, 30);
  committedGids = driver.events.filter((e) => e.event === 'committed').map((e) => e.gid!);
  const decisions = await sql(left.port, 'SELECT gid, decision FROM mg_twopc.decisions WHERE gid = ANY($1)', [committedGids]);
  assert.ok(decisions.length > 0 && decisions.every((d) => d.decision === 'commit'), 'COMMIT decisions on the first participant\'s shard');
  assert.ok(decisions.some((d) => d.gid === committedGids.at(-1)), 'the newest decision is there (younger than the retention)');
});


test('kill -9 after some PREPAREs: the resolver rolls the transfer back on both shards (presumed abort)', async () => {
  const r = await killAtPauseAndResolve('after-some-prepares');
  assert.equal(r.landed, false);
  const [row] = await sql(left.port, 'SELECT decision, decided_by FROM mg_twopc.decisions WHERE gid = $1', [r.gid]);
  assert.equal(row.decision, 'abort');
  assert.match(row.decided_by, /^orch-/);
  await until('the abort decision as an orchestrator event', 10_000, async () => (await twopcHistory('-80')).some((e) => e.kind === 'DECIDED' && e.details.gid === r.gid));
  assert.ok((await twopcHistory('-80')).some((e) => e.kind === 'ACTED' && e.details.gid === r.gid && e.summary.startsWith('ROLLBACK PREPARED')));
});

test('kill -9 after the decision: the resolver commits the transfer on both shards', async () => {
  const r = await killAtPauseAndResolve('after-decision');
  assert.equal(r.landed, true);
  for (const shard of ['-80', '80-']) {
    await until(`the COMMIT PREPARED on ${shard} as an orchestrator event`, 10_000,
      async () => (await twopcHistory(shard)).some((e) => e.kind === 'ACTED' && e.details.gid === r.gid && e.summary.startsWith('COMMIT PREPARED')));
  }
});

test('kill -9 during COMMIT PREPARED: the resolver commits the shard still prepared', async () => {
  const r = await killAtPauseAndResolve('during-commit-prepared');
  assert.equal(r.landed, true);
  await until('the COMMIT PREPARED on 80- as an orchestrator event', 10_000,
    async () => (await twopcHistory('80-')).some((e) => e.kind === 'ACTED' && e.details.gid === r.gid && e.summary.startsWith('COMMIT PREPARED')));
});

test('a coordinator slower than the grace period loses to the resolver\'s abort and rolls back everywhere', async () => {
  const driver = startDriver(shards, 3, 'slow-decision', { MG_DRIVER_SLOW_MS: String(GRACE_MS + 4_000) });
  assert.equal(await driver.exited, 0, driver.stderr());
  const last = driver.events.find((e) => e.txn?.endsWith('-3'))!;
  assert.equal(last.event, 'failed', JSON.stringify(last));
  assert.equal(last.code, '40001');
  assert.match(last.message!, /in-doubt resolver aborted it/);
  const ledger = await checkAllOrNothing(shards);
  assert.ok(!ledger.has(last.txn!));
  assert.ok(ledger.has(driver.txn(2)), 'the transfers before it committed');
});

test('decisions of finished transactions are pruned after the retention period', async () => {
  assert.equal(committedGids.length, 30);
  await until('the decisions to be pruned', 4 * RETENTION_MS, async () =>
    (await sql(left.port, 'SELECT count(*)::int AS n FROM mg_twopc.decisions WHERE gid = ANY($1)', [committedGids]))[0].n === 0);
});
