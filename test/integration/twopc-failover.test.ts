/**
 * Two-phase commit across a failover: database `bank` with 2 shards of 2
 * instances (ANY_2, so a PREPARE and a decision row are on the replica before
 * they are acknowledged). The transfer driver is killed right after the COMMIT
 * decision (the decision shard has committed, the other is prepared), and then
 * the primary of one participant is killed with kill -9
 * before the resolver's grace period is over: the transaction is in doubt on a
 * shard whose primary is gone. The new primary must list it, the resolver must
 * commit it there, and every transfer must be on both shards or neither.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { orchestratorStatus } from '../../compose/orchestrators.ts';
import { postgresPids, signalAll } from '../fault/support/faults.ts';
import { testCluster, until } from '../support/cluster.ts';
import { checkAllOrNothing, createAccounts, prepared, sql, startDriver, type ShardAt } from '../support/twopc.ts';

const GRACE_MS = 6_000;
const cluster = testCluster('twopcfo', 3, {
  settings: { 'orchestrator.twopcGraceMs': GRACE_MS, 'gateway.readOnlyToReplicas': true },
  spec: { cells: ['zone1', 'zone2'], databases: [{ name: 'bank', sharded: true, shards: 2, instancesPerShard: 2 }] },
});
const { dataDir, flags, mg } = cluster;

/** Each shard as MultiOrch has it now: its primary's ports and term. */
async function current(): Promise<Array<ShardAt & { primary: string; term: bigint }>> {
  const { shards } = await orchestratorStatus(cluster.spec);
  return ['-80', '80-'].map((shard) => {
    const s = shards.find((x) => x.database === 'bank' && x.shard === shard);
    const inst = cluster.instances.find((i) => i.instanceId === s?.primary);
    if (!s || !inst || s.term === null) throw new Error(`bank/${shard} has no primary now`);
    return { shard, port: inst.port, poolerPort: inst.poolerPort, primary: inst.instanceId, term: BigInt(s.term) };
  });
}

/** Both shards whole again: every instance serving, the replica streaming (a killed primary comes back as a replica). */
async function bothShardsWhole(): Promise<void> {
  await until('both shards back to full strength', 120_000, async () => {
    const { shards } = await orchestratorStatus(cluster.spec).catch(() => ({ shards: [] as never[] }));
    const bank = shards.filter((s) => s.database === 'bank');
    return bank.length === 2 && bank.every((s) => s.instances.length === 2 && s.instances.every((i) => i.serving === 'SERVING'
      && (i.instanceId === s.primary ? i.role === 'PRIMARY' : i.role === 'REPLICA' && i.walReceiverStatus === 'streaming')));
  });
}

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  await createAccounts(await current());
});

after(async () => {
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

test('bank@replica: each shard is read on its replica, a read transaction spans shards even in twopc mode, writes get 25006; READ ONLY transactions of bank go to the replicas', cluster.explained(async () => {
  await bothShardsWhole();
  await cluster.applyVSchema('bank', 'vindexes: { hash: { type: hash } }\ntables: { visits: { column_vindexes: [{ column: id, name: hash }] } }');
  const gateway = (database: string) => new pg.Client({ host: '127.0.0.1', port: cluster.spec.gateway.port, user: 'postgres', password: 'postgres', database });
  const writer = gateway('bank');
  const reader = gateway('bank@replica');
  await Promise.all([writer.connect(), reader.connect()]);
  try {
    await until('the gateway to know the VSchema', 15_000, () => writer.query('CREATE TABLE visits (id int PRIMARY KEY)').then(() => true, () => false));
    await writer.query(`INSERT INTO visits (id) VALUES ${Array.from({ length: 40 }, (_, i) => `(${i + 1})`).join(', ')}`);
    const primaries = (await current()).map((s) => s.primary);
    const replicaPorts = cluster.instances.filter((i) => !primaries.includes(i.instanceId)).map((i) => i.port).sort();
    const byPort = async () => (await reader.query('SELECT inet_server_port() AS port, count(*)::int AS n FROM visits GROUP BY 1')).rows;
    await until('both replicas to have replayed the 40 rows', 30_000, () => byPort().then((rows) => rows.reduce((n, r) => n + r.n, 0) === 40, () => false));
    assert.deepEqual((await byPort()).map((r) => r.port).sort(), replicaPorts);

    await reader.query("SET mg.transaction_mode = 'twopc'");
    await reader.query('BEGIN');
    assert.equal((await reader.query('SELECT count(*)::int AS n FROM visits')).rows[0].n, 40);
    await reader.query('COMMIT'); // both shards took part: a standby cannot PREPARE, so nothing may try

    for (const write of ['DELETE FROM visits WHERE id = 1', 'INSERT INTO visits (id) VALUES (41)', 'CREATE TABLE t (x int)']) {
      await assert.rejects(reader.query(write), (err: { code?: string; message: string }) => err.code === '25006' && /bank@replica/.test(err.message), write);
    }
    assert.equal((await reader.query('SELECT count(*)::int AS n FROM visits')).rows[0].n, 40, 'nothing was written, and the session goes on');

    // readOnlyToReplicas: a transaction of `bank` that begins READ ONLY reads every shard on its replica, then the session is back on the primaries.
    const primaryPorts = cluster.instances.filter((i) => primaries.includes(i.instanceId)).map((i) => i.port).sort();
    const portsOf = async (client: pg.Client) => (await client.query('SELECT inet_server_port() AS port, count(*)::int AS n FROM visits GROUP BY 1')).rows.map((r) => r.port).sort();
    await writer.query("SET mg.transaction_mode = 'twopc'");
    await writer.query('BEGIN READ ONLY');
    assert.deepEqual(await portsOf(writer), replicaPorts);
    await assert.rejects(writer.query('INSERT INTO visits (id) VALUES (42)'), (err: { code?: string }) => err.code === '25006');
    await writer.query('ROLLBACK');
    await writer.query('BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY');
    assert.deepEqual(await portsOf(writer), replicaPorts);
    await writer.query('COMMIT'); // plain COMMIT on the standbys, even in twopc mode
    assert.deepEqual(await portsOf(writer), primaryPorts, 'outside the transaction: the primaries');
    await writer.query('BEGIN');
    assert.deepEqual(await portsOf(writer), primaryPorts, 'a read-write transaction: the primaries');
    await writer.query('COMMIT');
  } finally {
    await Promise.all([writer.end(), reader.end()]);
  }
}));

for (const [victim, role] of [[1, 'a participant'], [0, 'the decision shard']] as const) {
  test(`kill -9 of ${role}'s primary while a committed transfer is in doubt: the new primary finishes it`, async () => {
    await bothShardsWhole();
    const before = await current();
    const driver = startDriver(before, 3, 'after-decision');
    const paused = await driver.paused;
    driver.child.kill('SIGKILL');
    await driver.exited;
    // The decision shard never prepares (its COMMIT is the decision): there the committed decision row is what must survive.
    if (victim === 1) assert.ok((await prepared(before[victim].port)).includes(paused.gid!), 'in doubt on the victim before the kill');
    else assert.equal((await sql(before[victim].port, 'SELECT decision FROM mg_twopc.decisions WHERE gid = $1', [paused.gid]))[0]?.decision, 'commit');

    signalAll(postgresPids(cluster, before[victim].primary), 'SIGKILL');
    const t0 = Date.now();
    await until(`a new primary for bank/${before[victim].shard}`, 60_000, async () => {
      const now = await current().catch(() => undefined);
      return now && now[victim].term > before[victim].term && now[victim].primary !== before[victim].primary;
    });
    // The new primary replayed the PREPARE (and, on the decision shard, the decision row): the resolver commits from there.
    await until('the resolver to finish the transfer on the new primary', 120_000, async () => {
      const now = await current().catch(() => undefined);
      if (!now) return false;
      const left = await Promise.all(now.map((s) => prepared(s.port).catch(() => ['unreachable'])));
      return left.flat().length === 0;
    });
    const ledger = await checkAllOrNothing(await current());
    assert.ok(ledger.has(driver.txn(3)), 'the transfer decided COMMIT is committed on both shards');
    assert.ok(ledger.has(driver.txn(1)) && ledger.has(driver.txn(2)));
    console.log(`# ${role}: failover and resolution took ${Date.now() - t0} ms`);
  });
}
