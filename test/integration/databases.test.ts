/**
 * Databases at run time, as a user sees them through the gateway: CREATE /
 * DROP DATABASE register and deregister the database in the topology, hosted
 * on the instances that ran it, and the gateway serves it at once.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { testCluster } from '../support/cluster.ts';

const cluster = testCluster('databases', 2, {
  settings: { 'gateway.releaseIdleLinksAfterMs': 0 },
  spec: { cells: ['zone1'], databases: [{ name: 'postgres', instancesPerShard: 1, durability: 'ANY_1' }] },
});
const { spec, flags, mg } = cluster;

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
});
after(async () => {
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(cluster.dataDir, { recursive: true, force: true });
});

async function gw<T>(database: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end().catch(() => undefined);
  }
}

test('CREATE DATABASE through the gateway: connect right after, write, read; DROP DATABASE: 3D000 after', async () => {
  await assert.rejects(gw('shop', async () => undefined), (e: any) => e.code === '3D000');
  await gw('postgres', (c) => c.query('CREATE DATABASE shop'));
  await gw('shop', async (c) => {
    assert.equal((await c.query('SELECT current_database() AS d')).rows[0].d, 'shop');
    await c.query('CREATE TABLE items (id int PRIMARY KEY, name text)');
    await c.query("INSERT INTO items VALUES (1, 'one'), (2, 'two')");
    assert.deepEqual((await c.query('SELECT name FROM items ORDER BY id')).rows.map((r) => r.name), ['one', 'two']);
  });
  // A database made from inside a hosted one is hosted on the same instances.
  await gw('shop', (c) => c.query('CREATE DATABASE "Shop_Archive"'));
  await gw('Shop_Archive', async (c) => assert.equal((await c.query('SELECT current_database() AS d')).rows[0].d, 'Shop_Archive'));
  await gw('postgres', async (c) => {
    // The pooler's idle connections to the database do not stand in the way of the drop.
    await c.query('DROP DATABASE shop');
    await c.query('DROP DATABASE "Shop_Archive"');
  });
  await assert.rejects(gw('shop', async () => undefined), (e: any) => e.code === '3D000' && /database "shop" does not exist/.test(e.message));
  const status = await mg('cluster', 'status', ...flags);
  assert.doesNotMatch(status.stdout, /\bshop\b/);
});

test('the gateway refuses what would split the worlds: a known name again, a database with instances of its own', async () => {
  await gw('postgres', async (c) => {
    await c.query('CREATE DATABASE twice');
    await assert.rejects(c.query('CREATE DATABASE twice'), (e: any) => e.code === '42P04');
    await assert.rejects(c.query('DROP DATABASE postgres'), (e: any) => e.code === '55006' && /instances of its own/.test(e.message));
    await c.query('DROP DATABASE twice');
    // The session goes on normally after the refusals.
    assert.equal((await c.query('SELECT 1 AS one')).rows[0].one, 1);
  });
});
