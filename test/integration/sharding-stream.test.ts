/**
 * A slow client of a scatter read on a sharded database (decision 0062): a
 * client whose socket reads nothing must leave the rows in the shards'
 * Postgres (each backend blocked writing, wait_event ClientWrite), not in the
 * gateway's memory; once it reads, every row arrives.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { shardRanges } from '../../compose/spec.ts';
import { hashKeyspaceId, shardFor } from '../../schemas/index.ts';
import { testCluster, until } from '../support/cluster.ts';
import { queryInstance } from '../support/postgres.ts';
import { heldWritingFor, pausedQuery, residentBytes } from '../support/slow-client.ts';

const cluster = testCluster('sharding-stream', 1, { spec: {
  cells: ['zone1'],
  databases: [{ name: 'postgres', sharded: true, shards: 2, instancesPerShard: 1, durability: 'ANY_1' }],
} });
const { spec, flags, mg, dataDir } = cluster;
const ranges = shardRanges(2);
const shardPorts = ranges.map((r) => cluster.instances.find((i) => i.shard === r.shard)!.port);
/** The first id the hash vindex places on `shard`. */
const idOn = (shard: string) => Array.from({ length: 20 }, (_, i) => i + 1).find((id) => shardFor(hashKeyspaceId(id), ranges) === shard)!;
const gwClient = () => new pg.Client({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres' });
let gw: pg.Client;

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  await cluster.applyVSchema('postgres', 'vindexes:\n  hash: { type: hash }\ntables:\n  blobs: { column_vindexes: [{ column: id, name: hash }] }\n');
  gw = gwClient();
  await gw.connect();
  // Before the gateway has folded the VSchema, blobs is refused (0A000); after, the shards say it does not exist yet.
  await until('the gateway to know the VSchema', 15_000, () => gw.query('SELECT * FROM blobs').then(() => true, (e) => e.code === '42P01'));
  await gw.query('CREATE TABLE blobs (id bigint PRIMARY KEY)');
  await gw.query('CREATE SEQUENCE made'); // on every shard: how many rows its Postgres has made of a result
});

after(async () => {
  await gw?.end().catch(() => undefined);
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

test('a scatter read to a client that reads nothing: both shards\' backends wait writing and make no more rows, the gateway\'s memory stays flat, and every row arrives', async () => {
  // One stored row on each shard, made into PER_SHARD rows of PAD bytes by its shard as it sends them: 150 MB
  // from each shard, twice what the sockets from one shard's Postgres through its pooler to the gateway could hold
  // at most (Linux's 4 MB send and 32 MB receive buffers each); held, a shard has made 10-18 MB of it.
  const PER_SHARD = 1_500;
  const PAD = 100_000;
  await gw.query(`INSERT INTO blobs (id) VALUES ${ranges.map((r) => `(${idOn(r.shard)})`).join(', ')}`);
  const statement = `SELECT b.id, g, nextval('made'), repeat('x', ${PAD}) AS pad FROM blobs b, generate_series(1, ${PER_SHARD}) g`;
  const made = () => Promise.all(shardPorts.map(async (port) => Number((await queryInstance(port, 'SELECT last_value FROM made'))[0].last_value)));
  const slow = gwClient();
  await slow.connect();
  try {
    const before = await residentBytes(spec.gateway.metricsPort);
    const q = pausedQuery(slow, statement, 'pad');
    await heldWritingFor(shardPorts, statement, 2_000, 60_000);
    // Waiting in ClientWrite alone could be a gateway that reads slowly (a busy machine): held, the shards make no row more.
    const madeWhenHeld = await made();
    await heldWritingFor(shardPorts, statement, 1_000, 10_000);
    assert.deepEqual(await made(), madeWhenHeld, 'rows made on each shard while its backend was held');
    assert.ok(madeWhenHeld.every((n) => n < PER_SHARD), `each shard held before its last row (made: ${madeWhenHeld.join(', ')} of ${PER_SHARD})`);
    const held = await residentBytes(spec.gateway.metricsPort);
    q.resume();
    const rows = ranges.length * PER_SHARD;
    assert.deepEqual(await q.done, { rows, bytes: rows * PAD });
    console.log(`a ${rows * PAD / 1e6} MB scatter read with the client paused: held at rows ${madeWhenHeld.join(' and ')} of ${PER_SHARD} per shard, gateway RSS ${(before / 1e6).toFixed(0)} MB before, ${(held / 1e6).toFixed(0)} MB while held`);
    assert.ok(held - before < 50e6, `the gateway grew by ${((held - before) / 1e6).toFixed(0)} MB while the client read nothing`);
  } finally {
    await slow.end();
  }
});
