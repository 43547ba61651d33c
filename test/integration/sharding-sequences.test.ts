/**
 * Sequences of a sharded database end to end (and multi-row INSERTs with
 * parameters split across shards): a 2-shard
 * database (one instance per shard) behind a gateway of two worker processes
 * (two holders of sequence blocks), driven with node-postgres and postgres.js,
 * simple and extended protocol. Rows are checked on the shards themselves, and
 * each statement's shards by inet_server_port().
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, test } from 'node:test';
import pg from 'pg';
import postgres from 'postgres';
import { shardRanges } from '../../compose/spec.ts';
import { hashKeyspaceId, shardFor } from '../../schemas/index.ts';
import { testCluster, until } from '../support/cluster.ts';

const cluster = testCluster('sequences', 3, {
  settings: { 'gateway.workers': 2 },
  spec: { cells: ['zone1'], databases: [{ name: 'postgres', sharded: true, shards: 2, instancesPerShard: 1, durability: 'ANY_1' }] },
});
const { spec, flags, mg, dataDir } = cluster;
const RANGES = shardRanges(2);
const FIRST = RANGES[0].shard;
const portOf = (shard: string) => cluster.instances.find((i) => i.shard === shard)!.port;
const shardOf = (id: number | string) => shardFor(hashKeyspaceId(Number(id)), RANGES);
const CACHE = 5;

const VSCHEMA = `
vindexes:
  hash: { type: hash }
tables:
  tenants: { column_vindexes: [{ column: id, name: hash }], auto_increment: { column: id, sequence: tenant_seq } }
  orders: { column_vindexes: [{ column: tenant_id, name: hash }], auto_increment: { column: id, sequence: order_seq } }
sequences:
  tenant_seq: { cache: ${CACHE} }
  order_seq: { cache: ${CACHE} }
`;
const DDL = [
  'CREATE TABLE tenants (id bigint PRIMARY KEY, name text NOT NULL)',
  'CREATE TABLE orders (tenant_id bigint NOT NULL, id bigint NOT NULL, total numeric(10,2) NOT NULL, PRIMARY KEY (tenant_id, id))',
];

const gwClient = () => new pg.Client({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres' });
const direct = async <T>(shard: string, fn: (c: pg.Client) => Promise<T>): Promise<T> => {
  const c = new pg.Client({ host: '127.0.0.1', port: portOf(shard), user: 'postgres', database: 'postgres' });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
};
/** Every row of a table on each shard, as `shard: [ids]`. */
const placement = async (sql: string): Promise<Record<string, string[]>> => Object.fromEntries(await Promise.all(RANGES.map(async ({ shard }) => [shard, (await direct(shard, (c) => c.query(sql))).rows.map((r) => String(r.id))])));

let gw: pg.Client;

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  await cluster.applyVSchema('postgres', VSCHEMA);
  gw = gwClient();
  await gw.connect();
  for (const ddl of DDL) await gw.query(ddl);
  // Both gateway workers must have folded the VSchema: every fresh connection knows tenants.
  await until('the gateway workers to know the VSchema', 15_000, async () => {
    const cs = [gwClient(), gwClient()];
    try {
      await Promise.all(cs.map((c) => c.connect()));
      return (await Promise.all(cs.map((c) => c.query('SELECT count(*) FROM tenants').then(() => true, () => false)))).every(Boolean);
    } finally {
      await Promise.all(cs.map((c) => c.end()));
    }
  });
});

after(async () => {
  await gw?.end().catch(() => undefined);
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

test('sequences: missing or DEFAULT auto-increment ids are filled from blocks; the filled id places the row; RETURNING shows it', cluster.explained(async () => {
  // Simple protocol, multi-row, the sequence column is the primary vindex column: each row goes where its new id hashes.
  const t = await gw.query("INSERT INTO tenants (name) VALUES ('a'), ('b'), ('c'), ('d') RETURNING id, name");
  assert.deepEqual(t.rows.map((r) => r.name), ['a', 'b', 'c', 'd']);
  const ids = t.rows.map((r) => String(r.id));
  assert.equal(new Set(ids).size, 4);
  assert.deepEqual(ids.map(Number), [...ids.map(Number)].sort((a, b) => a - b), 'one session gets increasing ids');
  const placed = await placement('SELECT id FROM tenants');
  for (const id of ids) assert.ok(placed[shardOf(id)].includes(id), `tenant ${id} on ${shardOf(id)}: ${JSON.stringify(placed)}`);
  // DEFAULT, mixed with an explicit id, extended protocol.
  const d = await gw.query('INSERT INTO tenants (id, name) VALUES (DEFAULT, $1), (1000, $2) RETURNING id', ['e', 'f']);
  assert.equal(d.rows[1].id, '1000');
  assert.ok(!ids.includes(String(d.rows[0].id)));
  const e = await gw.query('SELECT inet_server_port() AS p, name FROM tenants WHERE id = $1', [d.rows[0].id]);
  assert.deepEqual(e.rows, [{ p: portOf(shardOf(d.rows[0].id)), name: 'e' }]);
  // The sequence rows live on the first shard only.
  const seq = await direct(FIRST, (c) => c.query("SELECT next_id::int AS next, cache::int AS cache FROM mg_sharding.sequences WHERE name = 'tenant_seq'"));
  assert.equal(seq.rows[0].cache, CACHE);
  assert.ok(seq.rows[0].next > Math.max(...ids.map(Number), Number(d.rows[0].id)), JSON.stringify(seq.rows));
  const other = RANGES[1].shard;
  assert.equal((await direct(other, (c) => c.query("SELECT to_regclass('mg_sharding.sequences') AS t"))).rows[0].t, null);
  assert.match((await gw.query('EXPLAIN INSERT INTO orders (tenant_id, total) VALUES (1, 2)')).rows[0]['QUERY PLAN'], /id from sequence order_seq/);
}));

test('sequences: ids stay unique across shards and sessions of a gateway with two worker processes, in simple and extended protocol', cluster.explained(async () => {
  const clients = Array.from({ length: 4 }, gwClient);
  await Promise.all(clients.map((c) => c.connect()));
  const js = postgres({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres', max: 1, onnotice: () => undefined });
  try {
    const got: string[] = [];
    await Promise.all(clients.map(async (c, i) => {
      for (let round = 0; round < 4; round++) {
        const tenant = 1 + ((i + round) % 7);
        const r = round % 2
          ? await c.query('INSERT INTO orders (tenant_id, total) VALUES ($1, $2), ($3, $4) RETURNING id', [tenant, 1, tenant + 1, 2])
          : await c.query(`INSERT INTO orders (tenant_id, total) VALUES (${tenant}, 3), (${tenant + 2}, 4), (${tenant + 3}, 5) RETURNING id`);
        got.push(...r.rows.map((x) => String(x.id)));
      }
    }));
    for (const row of await js`INSERT INTO orders (tenant_id, total) VALUES (${5}, ${6}), (${6}, ${7}) RETURNING id`) got.push(String(row.id));
    for (const row of await js`INSERT INTO orders (tenant_id, id, total) VALUES (7, DEFAULT, 8) RETURNING id`.simple()) got.push(String(row.id));
    assert.equal(got.length, 4 * (2 + 3) * 2 + 3);
    assert.equal(new Set(got).size, got.length, `duplicate ids: ${got.join(',')}`);
    const stored = await placement('SELECT id FROM orders');
    assert.deepEqual(Object.values(stored).flat().sort(), [...got].sort(), 'every id is stored once, on one shard');
    assert.ok(Object.values(stored).every((ids) => ids.length > 0));
    // Ids come in whole blocks handed out by the sequence row (which worker took which is the kernel's choice).
    const { rows } = await direct(FIRST, (c) => c.query("SELECT next_id::int AS next FROM mg_sharding.sequences WHERE name = 'order_seq'"));
    const blocks = (rows[0].next - 1) / CACHE;
    assert.ok(Number.isInteger(blocks) && blocks >= Math.ceil(got.length / CACHE), `blocks ${blocks} for ${got.length} ids`);
    assert.ok(Math.max(...got.map(Number)) < rows[0].next);
  } finally {
    await Promise.all(clients.map((c) => c.end()));
    await js.end();
  }
}));

test('a multi-row INSERT with parameters is split across shards in the extended protocol', cluster.explained(async () => {
  const rows = Array.from({ length: 8 }, (_, i) => i + 100);
  const values = rows.map((_, i) => `($${2 * i + 1}, $${2 * i + 2})`).join(', ');
  const r = await gw.query(`INSERT INTO tenants (id, name) VALUES ${values} RETURNING id, name`, rows.flatMap((id) => [id, `t${id}`]));
  assert.equal(r.rowCount, 8);
  assert.deepEqual(r.rows.map((x) => Number(x.id)).sort(), rows);
  const placed = await placement('SELECT id FROM tenants WHERE id BETWEEN 100 AND 107');
  for (const id of rows) assert.ok(placed[shardOf(id)].includes(String(id)), `${id} on ${shardOf(id)}`);
  assert.ok(RANGES.every(({ shard }) => placed[shard].length > 0), JSON.stringify(placed));
  const names = await gw.query('SELECT id, name FROM tenants WHERE id IN (100, 101, 102, 103, 104, 105, 106, 107) ORDER BY id');
  assert.deepEqual(names.rows.map((x) => x.name), rows.map((id) => `t${id}`));
}));
