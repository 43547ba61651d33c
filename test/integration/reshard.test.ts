/**
 * Reshard within one database (decision 0056), its first step: database `shop`
 * (2 shards, one instance each, CDC on) gets a second set of 4 shards with
 * `mg database add-shard-set` while a writer inserts through the gateway. The
 * new shards come up beside the old ones (their own instances, poolers and
 * elected primaries, in run-time port slots: no old instance's port moves),
 * and the gateway keeps routing by the old set only, because the serving set
 * was pinned to it before the new shards were defined: every acknowledged
 * insert is on the old shard its keyspace id names, and a scatter over the
 * database still answers (the new shards have no table yet).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { orchestratorStatus } from '../../compose/orchestrators.ts';
import { savedSpec } from '../../compose/cluster.ts';
import { instancesOf, shardRanges } from '../../compose/spec.ts';
import { hashKeyspaceId, shardFor } from '../../schemas/index.ts';
import { sleep, testCluster } from '../support/cluster.ts';

const asText = { getTypeParser: () => (v: string) => v };
const cluster = testCluster('reshard', 2, { spec: {
  cells: ['zone1'],
  databases: [{ name: 'shop', sharded: true, shards: 2, instancesPerShard: 1, durability: 'ANY_1', cdc: { enabled: true, heartbeatMs: 1000 } }],
} });
const { spec, mg, dataDir } = cluster;
const OLD = shardRanges(2);
const NEW = shardRanges(4);
const homeIn = (set: typeof OLD, id: number) => shardFor(hashKeyspaceId(String(id)), set);

async function connect(port: number, password?: string): Promise<pg.Client> {
  const c = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', password, database: 'shop', types: asText });
  await c.connect();
  return c;
}

/** Each acknowledged insert's id and the Postgres port that answered it. */
const acknowledged = new Map<number, number>();
const writerErrors: unknown[] = [];
let writing = true;

/** Inserts rows through the gateway, one statement at a time, until told to stop. */
async function writer(): Promise<void> {
  const c = await connect(spec.gateway.port, 'postgres');
  try {
    for (let id = 1_000; writing; id++) {
      const { rows } = await c.query("INSERT INTO orders (id, note) VALUES ($1, 'w') RETURNING inet_server_port() AS port", [id]);
      acknowledged.set(id, Number(rows[0].port));
    }
  } catch (err) {
    writerErrors.push(err);
  } finally {
    await c.end();
  }
}

before(async () => {
  const up = await mg('cluster', 'up', ...cluster.flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  await cluster.applyVSchema('shop', 'vindexes:\n  hash: { type: hash }\ntables:\n  orders: { column_vindexes: [{ column: id, name: hash }] }\n');
  const c = await connect(spec.gateway.port, 'postgres');
  await c.query('CREATE TABLE orders (id bigint PRIMARY KEY, note text)');
  await c.end();
});

after(async () => {
  writing = false;
  await mg('cluster', 'down', '--data-dir', dataDir, '--clean');
});

test('a second shard set comes up beside a serving database under a writer; the gateway routes by the old set only', async (t) => {
  const oldPorts = new Map(cluster.instances.map((i) => [i.instanceId, i.port]));
  const writing$ = writer();
  await sleep(500);
  const began = Date.now();
  const added = await mg('database', 'add-shard-set', 'shop', '--shards', '4', '--data-dir', dataDir);
  assert.equal(added.code, 0, added.stderr + added.stdout);
  t.diagnostic(`mg database add-shard-set shop --shards 4: ${Date.now() - began} ms`);
  await sleep(1_000); // writes after the new shards serve nothing: still the old set's
  writing = false;
  await writing$;
  assert.deepEqual(writerErrors, [], `the writer saw errors: ${writerErrors.map(String).join('; ')}`);
  t.diagnostic(`the writer made ${acknowledged.size} inserts`);

  // The new set: its own instances in run-time slots, each shard with an elected primary; the old instances did not move.
  const now = instancesOf(savedSpec(dataDir)!);
  for (const [id, port] of oldPorts) assert.equal(now.find((i) => i.instanceId === id)?.port, port, `${id} keeps its port`);
  const fresh = now.filter((i) => !oldPorts.has(i.instanceId));
  assert.deepEqual(fresh.map((i) => i.shard).sort(), NEW.map((r) => r.shard).sort());
  const status = await orchestratorStatus(spec);
  for (const { shard } of NEW) {
    const s = status.shards.find((x) => x.database === 'shop' && x.shard === shard);
    assert.ok(s?.primary, `shop/${shard} has an elected primary`);
  }

  // Every acknowledged insert was answered by the old shard its keyspace id names, and is there.
  const portOf = (shard: string) => now.find((i) => i.shard === shard)!.port;
  for (const [id, port] of acknowledged) assert.equal(port, portOf(homeIn(OLD, id)), `insert ${id} ran on the old set's ${homeIn(OLD, id)}`);
  let onOld = 0;
  for (const { shard } of OLD) {
    const c = await connect(portOf(shard));
    onOld += Number((await c.query('SELECT count(*) AS n FROM orders')).rows[0].n);
    await c.end();
  }
  assert.equal(onOld, acknowledged.size);
  // The new shards' Postgres runs, with nothing routed to it; a scatter through the gateway reads the old set only.
  for (const { shard } of NEW) {
    const c = await connect(portOf(shard));
    assert.equal((await c.query("SELECT to_regclass('public.orders') AS t")).rows[0].t, null, `nothing reached shop/${shard}`);
    await c.end();
  }
  const g = await connect(spec.gateway.port, 'postgres');
  assert.equal(Number((await g.query('SELECT count(*) AS n FROM orders')).rows[0].n), acknowledged.size);
  await g.end();
});
