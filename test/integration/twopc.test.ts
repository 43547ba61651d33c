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
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { callOrchestrator } from '../../compose/orchestrators.ts';
import { testCluster, until } from '../support/cluster.ts';

const GRACE_MS = 1_500;
const ACCOUNTS = 10;
const START_BALANCE = 1_000;
const cluster = testCluster('twopc', 4, {
  settings: { 'orchestrator.twopcGraceMs': GRACE_MS },
  spec: { databases: [{ name: 'bank', shards: 2, instancesPerShard: 1 }] },
});
const { dataDir, flags, mg } = cluster;
const [left, right] = ['-80', '80-'].map((shard) => cluster.instances.find((i) => i.database === 'bank' && i.shard === shard)!);
const accountsOf = (shardIndex: number) => Array.from({ length: ACCOUNTS }, (_, k) => shardIndex * 100 + k + 1);
const driverPath = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'support', 'twopc-driver.ts');

async function sql<T extends pg.QueryResultRow = any>(port: number, text: string, params: unknown[] = []): Promise<T[]> {
  const c = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', database: 'postgres' });
  await c.connect();
  try {
    return (await c.query<T>(text, params)).rows;
  } finally {
    await c.end();
  }
}

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  assert.match(up.stdout, /bank\/-80: primary bank-_80-zone1-0/);
  assert.match(up.stdout, /bank\/80-: primary bank-80_-zone1-0/);
  for (const [i, inst] of [left, right].entries()) {
    await sql(inst.port, `CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
      CREATE TABLE ledger (txn text PRIMARY KEY, delta bigint NOT NULL);
      INSERT INTO accounts SELECT unnest($1::int[]), ${START_BALANCE}`.replace(/\$1::int\[\]/, `ARRAY[${accountsOf(i).join(',')}]`));
  }
});

after(async () => {
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

interface DriverEvent { event: string; txn?: string; gid?: string; code?: string; message?: string; at?: string }

/** Starts the driver; `events` fills as it prints; `paused` resolves at its pause point. */
function startDriver(transfers: number, pause: string, extraEnv: Record<string, string> = {}) {
  const child: ChildProcess = spawn(process.execPath, ['--import', 'tsx', driverPath], {
    env: {
      ...process.env, ...extraEnv, MG_DRIVER_TRANSFERS: String(transfers), MG_DRIVER_PAUSE: pause,
      MG_DRIVER_SHARDS: JSON.stringify([{ shard: '-80', port: left.poolerPort, accounts: accountsOf(0) }, { shard: '80-', port: right.poolerPort, accounts: accountsOf(1) }]),
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const events: DriverEvent[] = [];
  let stderr = '';
  let buffered = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const paused = new Promise<DriverEvent>((resolve, reject) => {
    child.stdout!.on('data', (d) => {
      buffered += d;
      const lines = buffered.split('\n');
      buffered = lines.pop()!;
      for (const line of lines) {
        const e = JSON.parse(line) as DriverEvent;
        events.push(e);
        if (e.event === 'paused') resolve(e);
      }
    });
    void exited.then((code) => reject(new Error(`driver exited (${code}) before pausing: ${stderr}`)));
  });
  paused.catch(() => {});
  return { child, events, paused, exited, stderr: () => stderr };
}

const prepared = async (port: number) => (await sql<{ gid: string }>(port, 'SELECT gid FROM pg_prepared_xacts')).map((r) => r.gid);

/** The user's checks: each ledger entry on both shards or neither, balances summing to the start, nothing prepared. */
async function check(): Promise<{ left: Set<string>; right: Set<string> }> {
  const [l, r] = await Promise.all([left, right].map(async (inst) => new Set((await sql<{ txn: string }>(inst.port, 'SELECT txn FROM ledger')).map((x) => x.txn))));
  assert.deepEqual([...l].sort(), [...r].sort(), 'every transfer landed on both shards or on neither');
  const totals = await Promise.all([left, right].map(async (inst) => Number((await sql(inst.port, 'SELECT sum(balance)::bigint AS s FROM accounts'))[0].s)));
  assert.equal(totals[0] + totals[1], 2 * ACCOUNTS * START_BALANCE, `balances ${totals.join(' + ')} still sum to the start`);
  assert.deepEqual([...(await prepared(left.port)), ...(await prepared(right.port))], []);
  return { left: l, right: r };
}

async function killAtPauseAndResolve(pause: string): Promise<{ txn: string; gid: string; landed: boolean; resolvedInMs: number }> {
  const driver = startDriver(5, pause);
  const p = await driver.paused;
  driver.child.kill('SIGKILL');
  await driver.exited;
  const txn = `${driver.child.pid}-5`;
  assert.ok(p.gid?.startsWith('mg2pc:bank:-80:'), `gid ${p.gid}`);
  const t0 = Date.now();
  const stillPrepared = [...(await prepared(left.port)), ...(await prepared(right.port))];
  assert.ok(stillPrepared.includes(p.gid!), `${p.gid} is in doubt after the kill (${stillPrepared.join(', ')})`);
  await until('the resolver to finish the in-doubt transaction', 30_000, async () => (await prepared(left.port)).length + (await prepared(right.port)).length === 0);
  const resolvedInMs = Date.now() - t0;
  const { left: l } = await check();
  return { txn, gid: p.gid!, landed: l.has(txn), resolvedInMs };
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

test('transfers between the shards commit on both through the coordinator', async () => {
  const driver = startDriver(30, 'none');
  assert.equal(await driver.exited, 0, driver.stderr());
  assert.equal(driver.events.filter((e) => e.event === 'committed').length, 30, JSON.stringify(driver.events.filter((e) => e.event === 'failed')));
  const { left: l } = await check();
  assert.equal(l.size, 30);
  const [decisions] = await sql(left.port, "SELECT count(*)::int AS n FROM mg_twopc.decisions WHERE decision = 'commit'");
  assert.equal(decisions.n, 30, 'one COMMIT decision per transfer, on the first participant\'s shard');
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
});

test('a coordinator slower than the grace period loses to the resolver\'s abort and rolls back everywhere', async () => {
  const driver = startDriver(3, 'slow-decision', { MG_DRIVER_SLOW_MS: String(GRACE_MS + 4_000) });
  assert.equal(await driver.exited, 0, driver.stderr());
  const last = driver.events.find((e) => e.txn?.endsWith('-3'))!;
  assert.equal(last.event, 'failed', JSON.stringify(last));
  assert.equal(last.code, '40001');
  assert.match(last.message!, /in-doubt resolver aborted it/);
  const { left: l } = await check();
  assert.ok(!l.has(last.txn!));
  assert.ok(l.has(`${driver.child.pid}-2`), 'the transfers before it committed');
});
