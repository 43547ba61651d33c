/**
 * Replicas at run time, as an operator runs them (the CLI in a subprocess) and
 * as a client of the gateway sees them: `mg replica add` restores a new
 * instance from the latest backup while a client writes and reads on the same
 * shard, and the gateway sends it reads once it has caught up; `mg replica
 * remove` (and a lowered instancesPerShard) takes one out of routing and out
 * of the policy's cohort, then stops, deletes and deregisters it; removing one
 * the policy needs, or the primary, is refused; the API names bad input. The
 * client sees no error.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { savedSpec } from '../../compose/cluster.ts';
import { callOrchestrator } from '../../compose/orchestrators.ts';
import { ADDED_SLOT_TOP } from '../../compose/spec.ts';
import { testCluster, until } from '../support/cluster.ts';
import { queryInstance as query } from '../support/postgres.ts';

// A primary and two replicas under ANY_2; the shard's first election makes postgres-0-zone1-0 primary (ties go by id).
const cluster = testCluster('replicas', 3, { spec: { databases: [{ name: 'postgres', instancesPerShard: 3, durability: 'ANY_2' }] } });
const { spec, dataDir, flags, mg } = cluster;
const addedPort = spec.postgres.basePort + ADDED_SLOT_TOP;
const added = `postgres-0-zone3-${ADDED_SLOT_TOP}`;


const gatewayClient = (database: string) =>
  new pg.Client({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database });

/**
 * The continuous client on the shard: one session writes through the gateway (each acknowledged id kept), and
 * reads run through `postgres@replica` on a new connection each time (the gateway picks a replica per session),
 * noting which Postgres answered (inet_server_port()).
 */
const acked: number[] = [];
const readPorts: number[] = [];
const errors: string[] = [];
let stopClient = false;
let clientDone: Promise<void> = Promise.resolve();

function startClient(): void {
  const writer = (async () => {
    const c = gatewayClient('postgres');
    await c.connect();
    for (let id = 1; !stopClient; id++) {
      try {
        await c.query('INSERT INTO acked VALUES ($1)', [id]);
        acked.push(id);
      } catch (err) {
        errors.push(`write ${id}: ${(err as Error).message}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    await c.end();
  })();
  const reader = (async () => {
    while (!stopClient) {
      const c = gatewayClient('postgres@replica');
      try {
        await c.connect();
        const [row] = (await c.query<{ port: number; n: number }>('SELECT inet_server_port() AS port, count(*)::int AS n FROM acked')).rows;
        readPorts.push(row.port);
      } catch (err) {
        errors.push(`read: ${(err as Error).message}`);
      } finally {
        await c.end().catch(() => undefined);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  })();
  clientDone = Promise.all([writer, reader]).then(() => undefined);
}

const ok = (...args: string[]) => cluster.mgOk(...args);

const instancesNow = async (): Promise<string[]> =>
  (await callOrchestrator(spec, 'GET', '/v1/status')).body.shards[0].instances.map((i: { instanceId: string }) => i.instanceId).sort();

const syncStandbyNames = async (port: number) => (await query<{ s: string }>(port, "SELECT current_setting('synchronous_standby_names') AS s"))[0].s;

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
});

after(async () => {
  stopClient = true;
  await clientDone;
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

test('replica add: restored from the latest backup while a client writes and reads; serves reads once caught up; kept in the spec', cluster.explained(async (t) => {
  const { primary } = await cluster.roles();
  await query(primary.port, 'CREATE TABLE acked (id int PRIMARY KEY)');
  startClient();
  await until('the client to write', 10_000, () => acked.length > 10);
  await ok('backup', 'create', 'postgres/-', '--type', 'full');

  const out = await ok('replica', 'add', 'postgres/-', '--cell', 'zone3');
  t.diagnostic(out);
  assert.match(out, new RegExp(`${added}: registered`));
  assert.match(out, new RegExp(`${added}: restored from the latest backup; streaming from 127\\.0\\.0\\.1:${primary.port}`));
  assert.match(out, /waiting until it has caught up with the primary/);
  assert.match(out, new RegExp(`${added}: caught up with the primary: serving`));
  assert.match(out, /replica add postgres\/-: done in/);

  // Every write acknowledged so far is on it, and it follows new ones.
  const ids = acked.slice();
  await until('the acknowledged rows on the new replica', 15_000, async () =>
    (await query<{ n: number }>(addedPort, 'SELECT count(*)::int AS n FROM acked WHERE id = ANY($1)', [ids]))[0].n === ids.length);
  // The gateway sends it reads.
  const before = readPorts.length;
  await until('a read through the gateway answered by the new replica', 30_000, () => readPorts.slice(before).includes(addedPort));

  const saved = savedSpec(dataDir)!;
  assert.deepEqual(saved.databases[0].addedInstances, [{ shard: '-', cell: 'zone3', slot: ADDED_SLOT_TOP }]);
  assert.match(await syncStandbyNames(primary.port), new RegExp(`ANY 1 \\(.*"${added}"`));
}));

test('the admin API names bad input: an unknown cell (400), an unknown shard or instance (404); removing the primary is refused (409)', cluster.explained(async () => {
  const { primary } = await cluster.roles();
  const badCell = await callOrchestrator(spec, 'POST', '/v1/shards/postgres/-/replicas', { cell: 'zone9' });
  assert.equal(badCell.status, 400);
  assert.match(badCell.body.error, /body\.cell: no cell "zone9" \(cells: zone1, zone2, zone3\)/);
  const badField = await callOrchestrator(spec, 'POST', '/v1/shards/postgres/-/replicas', { cells: 'zone1' });
  assert.equal(badField.status, 400);
  assert.match(badField.body.error, /body\.cells: unknown field/);
  const noShard = await callOrchestrator(spec, 'POST', '/v1/shards/postgres/-80/replicas', {});
  assert.deepEqual([noShard.status, noShard.body.error], [404, 'no shard postgres/-80']);
  const noInstance = await callOrchestrator(spec, 'DELETE', '/v1/shards/postgres/-/replicas/postgres-0-zone1-7');
  assert.deepEqual([noInstance.status, noInstance.body.error], [404, 'postgres-0-zone1-7 is not an instance of postgres/-']);

  const primaryGone = await callOrchestrator(spec, 'DELETE', `/v1/shards/postgres/-/replicas/${primary.instanceId}`);
  assert.equal(primaryGone.status, 409);
  assert.match(primaryGone.body.error, /is the primary of postgres\/-: switch over first/);
  const cli = await mg('replica', 'remove', 'postgres/-', primary.instanceId, '--data-dir', dataDir);
  assert.notEqual(cli.code, 0);
  assert.match(cli.stderr, /switch over first/);
}));

test('replica remove: out of routing and the cohort, then stopped, deleted and deregistered; reads go on elsewhere', cluster.explained(async (t) => {
  const { primary, replicas } = await cluster.roles();
  assert.equal(primary.instanceId, 'postgres-0-zone1-0');
  const [leaving, staying] = replicas;
  const out = await ok('replica', 'remove', 'postgres/-', leaving.instanceId);
  t.diagnostic(out);
  assert.match(out, new RegExp(`${leaving.instanceId}: out of routing \\(DRAINED\\) and out of the durability policy's cohort`));
  assert.match(out, new RegExp(`${leaving.instanceId} left the cohort: synchronous_standby_names = ANY 1 \\("${staying.instanceId}", "${added}"\\); rule \\d+ acknowledged without it`));
  assert.match(out, new RegExp(`${leaving.instanceId}: deregistered`));
  assert.match(out, /replica remove postgres\/- \S+: done in/);

  assert.deepEqual(await instancesNow(), [primary.instanceId, staying.instanceId, added]);
  assert.equal(await syncStandbyNames(primary.port), `ANY 1 ("${staying.instanceId}", "${added}")`);
  assert.deepEqual(await query(primary.port, 'SELECT slot_name FROM pg_replication_slots WHERE slot_name = $1', [leaving.instanceId.replace(/-/g, '_')]), []);
  assert.equal(fs.existsSync(path.join(dataDir, 'postgres', leaving.instanceId)), false, 'its data directory is gone');
  assert.deepEqual(savedSpec(dataDir)!.databases[0].removedInstances, [leaving.instanceId]);
  const before = readPorts.length;
  await until('reads through the gateway after the removal', 10_000, () => readPorts.length > before + 5);
  assert.deepEqual(readPorts.slice(before + 1).filter((p) => p !== staying.port && p !== addedPort), []);
}));

test('a lowered instancesPerShard: mg cluster up removes the instance the spec no longer has and keeps the added replica', cluster.explained(async (t) => {
  const { primary, replicas: [, dropped] } = await cluster.roles();
  assert.equal(dropped.instanceId, 'postgres-0-zone3-2');
  fs.writeFileSync(path.join(dataDir, 'test-spec.yaml'), JSON.stringify({ databases: [{ name: 'postgres', instancesPerShard: 2, durability: 'ANY_2' }] }));
  const up = await mg('cluster', 'up', ...flags);
  t.diagnostic(up.stdout);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  assert.match(up.stdout, new RegExp(`${added}: agent already running`));
  assert.match(up.stdout, new RegExp(`${dropped.instanceId}: deregistered`));
  assert.deepEqual(await instancesNow(), [primary.instanceId, added]);
  assert.equal(await syncStandbyNames(primary.port), `ANY 1 ("${added}")`);
  // The saved spec keeps every other port where it was: the layout stays, the dropped instance is recorded as removed.
  const saved = savedSpec(dataDir)!.databases[0];
  assert.deepEqual([saved.instancesPerShard, saved.removedInstances, saved.addedInstances.length], [3, ['postgres-0-zone2-1', dropped.instanceId], 1]);
  const before = readPorts.length;
  await until('reads through the gateway after the removal', 10_000, () => readPorts.length > before + 5);
  assert.deepEqual([...new Set(readPorts.slice(before + 1))], [addedPort]);
}));

test('the last replica the durability policy needs, and the primary, are refused (409); the client saw no error and lost no write', cluster.explained(async () => {
  const { primary } = await cluster.roles();
  const needed = await mg('replica', 'remove', 'postgres/-', added, '--data-dir', dataDir);
  assert.notEqual(needed.code, 0);
  assert.match(needed.stderr, new RegExp(`the durability policy ANY_2 of postgres/- needs ${added}`));
  const rest = await callOrchestrator(spec, 'DELETE', `/v1/shards/postgres/-/replicas/${added}`);
  assert.equal(rest.status, 409);

  stopClient = true;
  await clientDone;
  assert.deepEqual(errors, [], 'the continuous client saw no error');
  assert.ok(acked.length > 50, `the client kept writing (${acked.length} acknowledged)`);
  const onPrimary = await query<{ n: number }>(primary.port, 'SELECT count(*)::int AS n FROM acked WHERE id = ANY($1)', [acked]);
  assert.equal(onPrimary[0].n, acked.length);
  await until('every acknowledged row on the added replica', 10_000, async () =>
    (await query<{ n: number }>(addedPort, 'SELECT count(*)::int AS n FROM acked WHERE id = ANY($1)', [acked]))[0].n === acked.length);
}));
