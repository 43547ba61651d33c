/**
 * A whole sharded database restored to one point into a new database of the
 * cluster (`mg backup restore <db> --as <name>`), as an operator runs it: the
 * bank of the two-phase-commit tests (2 shards) takes transfers through the
 * gateway; the operator notes a time, more transfers follow, and the restored
 * copy served by the gateway holds exactly the balances and ledger of that
 * time on both shards. Then a cross-shard transfer is left in doubt at the
 * restore's target (the gateway killed with kill -9 after the decision): the
 * restored copy commits it on the shard where it was still prepared, as the
 * restored decision says, so the shards agree.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, test } from 'node:test';
import { savedSpec } from '../../compose/cluster.ts';
import { instancesOf } from '../../compose/spec.ts';
import { servicePid } from '../fault/support/faults.ts';
import { sleep, testCluster, until } from '../support/cluster.ts';
import {
  BANK_ACCOUNTS, BANK_START, accountsOnShards, checkBank, createBank, gatewayClient, preparedAt, restartGateway, transfer, viaGateway,
} from '../support/twopc-gateway.ts';

const SHARDS = 2;
const cluster = testCluster('restoreas', 4, {
  // The original's resolver must leave the in-doubt transfer alone while the restore copies it.
  settings: { 'orchestrator.twopcGraceMs': 600_000 },
  spec: { cells: ['zone1'], databases: [{ name: 'bank', sharded: true, shards: SHARDS, instancesPerShard: 1, transactionMode: 'twopc' }] },
});
const { dataDir, flags, mg } = cluster;

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  await createBank(cluster);
  const backup = await mg('backup', 'create', 'bank', '--type', 'full', '--data-dir', dataDir);
  assert.equal(backup.code, 0, backup.stderr + backup.stdout);
});

after(async () => {
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

async function transfers(prefix: string, from: number, count: number): Promise<void> {
  await viaGateway(cluster, async (g) => {
    for (let n = from; n < from + count; n++) {
      const t = accountsOnShards(SHARDS, n, 2);
      await transfer(g, `${prefix}-${n}`, t.from, t.to, n);
    }
  });
}

const bankState = (database: string) => viaGateway(cluster, async (g) => ({
  balances: (await g.query('SELECT id, balance::int FROM accounts ORDER BY id')).rows,
  ledger: (await g.query('SELECT account_id, txn, delta::int FROM ledger ORDER BY account_id, txn')).rows,
}), database);

/** The Postgres ports of a database's instances, as `restore --as` saved them in the cluster's spec. */
function portsOf(database: string): number[] {
  return instancesOf(savedSpec(dataDir)!).filter((i) => i.database === database).map((i) => i.port);
}

async function restoreAs(name: string, time: Date): Promise<string> {
  const r = await mg('backup', 'restore', 'bank', '--as', name, '--time', time.toISOString(), '--data-dir', dataDir);
  assert.equal(r.code, 0, `restore --as ${name} failed:\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

test('restore --as: both shards at the noted time, served by the gateway under the new name; the original goes on', cluster.explained(async () => {
  await transfers('before', 0, 12);
  const then = await bankState('bank');
  await sleep(1_100);
  const noted = new Date();
  await sleep(1_100);
  await transfers('after', 100, 8); // commits after the noted time on both shards, so recovery finds its stop point
  const out = await restoreAs('bank_then', noted);
  assert.match(out, /bank_then: restored from bank and served by the gateways/);
  assert.match(out, /VSchema \(version \d+\) applied/);

  await until('the gateway to serve bank_then', 30_000, () => bankState('bank_then').then(() => true, () => false));
  assert.deepEqual(await bankState('bank_then'), then, 'every balance and ledger leg as it was at the noted time');
  const landed = await checkBank(cluster, portsOf('bank_then'), 2, 'bank_then');
  assert.equal(landed.size, 12);
  // The copy is a database of its own: a write there leaves the original alone.
  await viaGateway(cluster, (g) => g.query('UPDATE accounts SET balance = 0 WHERE id = 1'), 'bank_then');
  const original = await bankState('bank');
  assert.notEqual(original.balances.find((b) => b.id === 1)!.balance, 0);
  assert.equal(original.ledger.length, (12 + 8) * 2);
}));

test('restore --as with a cross-shard transfer in doubt at the target: committed on the prepared shard as the restored decision says', cluster.explained(async () => {
  const stopped = await restartGateway(cluster, 'after-decision');
  let client = gatewayClient(cluster);
  await until('the restarted gateway to take clients', 30_000, () => client.connect().then(() => true, () => {
    client = gatewayClient(cluster);
    return false;
  }));
  const t = accountsOnShards(SHARDS, 7, 2);
  const outcome = transfer(client, 'in-doubt', t.from, t.to, 7).then(() => 'committed', (err: Error) => err.message);
  await stopped();
  process.kill(servicePid(cluster, 'gateway'), 'SIGKILL');
  assert.match(await outcome, /Connection terminated|ECONNRESET|terminated unexpectedly/);
  const bankPorts = portsOf('bank');
  assert.equal((await Promise.all(bankPorts.map((p) => preparedAt(p)))).flat().length, 1, 'prepared on the shard that is not the decision shard');

  await restartGateway(cluster);
  await sleep(1_100);
  const noted = new Date();
  await sleep(1_100);
  await transfers('later', 200, 2);
  await restoreAs('bank_doubt', noted);

  await until('the gateway to serve bank_doubt', 30_000, () => bankState('bank_doubt').then(() => true, () => false));
  const landed = await checkBank(cluster, portsOf('bank_doubt'), 2, 'bank_doubt');
  assert.ok(landed.has('in-doubt'), 'the transfer decided before the target is on both shards of the copy');
  assert.ok(!landed.has('later-200'), 'nothing after the target');
  const total = await viaGateway(cluster, async (g) => Number((await g.query('SELECT sum(balance) AS s FROM accounts')).rows[0].s), 'bank_doubt');
  assert.equal(total, BANK_ACCOUNTS * BANK_START);
  // The original still holds it prepared (its resolver waits out a long grace period): the copy did not touch it.
  assert.equal((await Promise.all(bankPorts.map((p) => preparedAt(p)))).flat().length, 1);
}));
