/**
 * Sharded query serving end to end: a 2-shard database (one instance per
 * shard) brought up by `mg`, its VSchema applied with `mg vschema apply`, and a
 * multi-tenant workload driven through the gateway with node-postgres and
 * postgres.js (simple and extended protocol). Every result is compared with the
 * same workload on one unsharded Postgres, and routing is checked by where
 * rows and statements landed (inet_server_port() on each shard).
 * MG_SHARDING_SHARDS=4 runs the same against 4 shards (slower; not in the default run).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import pg from 'pg';
import postgres from 'postgres';
import { createLogger } from '../../common/log.ts';
import { PostgresInstance } from '../../ingest/postgres/instance.ts';
import { shardRanges } from '../../compose/spec.ts';
import type { EventLog, Subscription } from '../../common/eventlog.ts';
import { hashKeyspaceId, shardFor, type SchemaChange } from '../../schemas/index.ts';
import { testCluster, until } from '../support/cluster.ts';
import { testEventLog } from '../support/env.ts';

const SHARDS = Number(process.env.MG_SHARDING_SHARDS ?? 2);
const cluster = testCluster('sharding', 3, { spec: {
  cells: ['zone1'],
  databases: [{ name: 'postgres', sharded: true, shards: SHARDS, instancesPerShard: 1, durability: 'ANY_1' }],
} });
const { spec, flags, mg, dataDir, prefix } = cluster;
const gatewayPort = spec.gateway.port;
const RANGES = shardRanges(SHARDS);
const FIRST = RANGES[0].shard;
const LAST = RANGES[SHARDS - 1].shard;
const portOf = (shard: string) => cluster.instances.find((i) => i.shard === shard)!.port;
const shardOfTenant = (t: number) => shardFor(hashKeyspaceId(t), RANGES);
const tenantOn = (shard: string) => Array.from({ length: 12 }, (_, i) => i + 1).find((t) => shardOfTenant(t) === shard)!;

const VSCHEMA = `
vindexes:
  hash: { type: hash }
tables:
  tenants: { column_vindexes: [{ column: id, name: hash }] }
  users: { column_vindexes: [{ column: tenant_id, name: hash }] }
  orders: { column_vindexes: [{ column: tenant_id, name: hash }] }
  order_lines: { column_vindexes: [{ column: tenant_id, name: hash }] }
  products: { type: reference }
  events: { column_vindexes: [{ column: tenant_id, name: hash }], columns: [tenant_id, id, note] }
  blobs: { column_vindexes: [{ column: id, name: hash }] }
routines:
  tenant_port: { argument: 0, vindex: hash }
  rename_tenant: { argument: 0, vindex: hash }
`;
const DDL = [
  'CREATE TABLE tenants (id bigint PRIMARY KEY, name text NOT NULL)',
  'CREATE TABLE users (tenant_id bigint NOT NULL, id bigint NOT NULL, email text NOT NULL, name text, PRIMARY KEY (tenant_id, id))',
  'CREATE TABLE orders (tenant_id bigint NOT NULL, id bigint NOT NULL, user_id bigint NOT NULL, total numeric(10,2) NOT NULL, status text NOT NULL, PRIMARY KEY (tenant_id, id))',
  'CREATE TABLE order_lines (tenant_id bigint NOT NULL, order_id bigint NOT NULL, line int NOT NULL, product_id int NOT NULL, qty int NOT NULL, PRIMARY KEY (tenant_id, order_id, line))',
  'CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, price numeric(8,2) NOT NULL)',
  'CREATE TABLE events (tenant_id bigint NOT NULL, id bigint NOT NULL, note text, PRIMARY KEY (tenant_id, id))',
];
const TENANTS = 12;

let reference: PostgresInstance;
let eventLog: EventLog;
let changesSub: Subscription;
const schemaChanges: SchemaChange[] = [];
let gw: pg.Client;
let ref: pg.Client;

const gwClient = () => new pg.Client({ host: '127.0.0.1', port: gatewayPort, user: 'postgres', password: 'postgres', database: 'postgres' });

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  eventLog = await testEventLog(prefix);
  changesSub = await eventLog.subscribe('schemaChanges', (e) => void schemaChanges.push(e));
  await cluster.applyVSchema('postgres', VSCHEMA);
  reference = new PostgresInstance({ name: 'reference', dataDir: path.join(dataDir, 'reference'), port: Number(process.env.MG_TEST_PORT_BASE ?? 30_000) + 3 * 500 + 480, log: createLogger('sharding-test') });
  await reference.initPrimary();
  await reference.start();
  ref = new pg.Client({ host: '127.0.0.1', port: reference.port, user: 'postgres', database: 'postgres' });
  await ref.connect();
  gw = gwClient();
  // Before the gateway has folded the VSchema, tenants is refused (0A000); after, the shard says it does not exist yet.
  await until('the gateway to know the VSchema', 15_000, async () => {
    const c = gwClient();
    await c.connect();
    try {
      return await c.query('SELECT * FROM tenants').then(() => true, (e) => e.code === '42P01');
    } finally {
      await c.end();
    }
  });
  await gw.connect();
});

after(async () => {
  await changesSub?.stop();
  await eventLog?.close();
  await gw?.end().catch(() => undefined);
  await ref?.end().catch(() => undefined);
  await reference?.stop('immediate').catch(() => undefined);
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

/** The rows a query gives through the gateway and on the unsharded reference; sorted unless the query orders them. */
async function both(sql: string, params: unknown[] = []): Promise<{ sharded: unknown[]; single: unknown[] }> {
  const [a, b] = await Promise.all([gw.query(sql, params), ref.query(sql, params)]);
  const norm = (rows: unknown[]) => (/order by/i.test(sql) ? rows : rows.map((r) => JSON.stringify(r)).sort().map((r) => JSON.parse(r)));
  return { sharded: norm(a.rows), single: norm(b.rows) };
}
async function same(sql: string, params: unknown[] = []): Promise<void> {
  const { sharded, single } = await both(sql, params);
  assert.deepEqual(sharded, single, sql);
}
const code = (c: string) => (e: any) => e.code === c;

test('a bad VSchema is refused by mg vschema apply with the table and vindex named', cluster.explained(async () => {
  const file = path.join(dataDir, 'bad.yaml');
  fs.writeFileSync(file, 'tables:\n  orders: { column_vindexes: [{ column: tenant_id, name: nope }] }\n');
  const r = await mg('vschema', 'apply', 'postgres', file, '--data-dir', dataDir);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /table orders, column tenant_id: vindex nope is not defined/);
  const shown = await mg('vschema', 'show', 'postgres', '--data-dir', dataDir);
  assert.equal(shown.code, 0, shown.stderr);
  assert.match(shown.stdout, /# version 1\n[\s\S]*products:\n\s+type: reference/);
}));

test('DDL runs on every shard; the workload (simple and extended protocol) lands where the vindex says', cluster.explained(async () => {
  for (const ddl of DDL) {
    await gw.query(ddl);
    await ref.query(ddl);
  }
  const write = async (sql: string, params?: unknown[]) => {
    const [a, b] = await Promise.all([gw.query(sql, params), ref.query(sql, params)]);
    assert.equal(a.rowCount, b.rowCount, sql);
    assert.deepEqual(a.rows, b.rows, sql);
  };
  // Simple protocol: multi-row INSERTs whose rows go to both shards, with RETURNING.
  const tenants = Array.from({ length: TENANTS }, (_, i) => `(${i + 1}, 'tenant ${i + 1}')`).join(', ');
  await write(`INSERT INTO tenants (id, name) VALUES ${tenants}`);
  await write("INSERT INTO products (id, name, price) VALUES (1, 'pen', 1.50), (2, 'book', 12.00), (3, 'lamp', 30.25)");
  for (let t = 1; t <= TENANTS; t++) {
    await write(`INSERT INTO users (tenant_id, id, email, name) VALUES (${t}, 1, 'a@t${t}.example', 'Ann'), (${t}, 2, 'b@t${t}.example', NULL) RETURNING id, email`);
    // Extended protocol: parameters route the row.
    for (let o = 1; o <= 3; o++) {
      await write('INSERT INTO orders (tenant_id, id, user_id, total, status) VALUES ($1, $2, $3, $4, $5)', [t, o, 1 + (o % 2), (t * 10 + o * 1.25).toFixed(2), o === 3 ? 'open' : 'paid']);
      await write('INSERT INTO order_lines (tenant_id, order_id, line, product_id, qty) VALUES ($1, $2, 1, 1, $3), ($1, $2, 2, 3, 1)', [t, o, o]);
    }
  }
  await write("UPDATE orders SET status = 'shipped' WHERE tenant_id = 4 AND id = 1 RETURNING id, status");
  await write("UPDATE orders SET status = 'archived' WHERE total > 100"); // scatter write: counts add up
  await write('DELETE FROM order_lines WHERE tenant_id IN (2, 9) AND line = 2');
  await write('UPDATE products SET price = price + 1 WHERE id = 1'); // reference table: every shard

  // Each tenant's rows are on the shard its keyspace id names, and only there; products are everywhere.
  for (const { shard } of RANGES) {
    const direct = new pg.Client({ host: '127.0.0.1', port: portOf(shard), user: 'postgres', database: 'postgres' });
    await direct.connect();
    try {
      const { rows } = await direct.query('SELECT DISTINCT tenant_id::int AS t FROM orders ORDER BY 1');
      const expected = Array.from({ length: TENANTS }, (_, i) => i + 1).filter((t) => shardOfTenant(t) === shard);
      assert.deepEqual(rows.map((r) => r.t), expected, `tenants on ${shard}`);
      assert.ok(expected.length > 0, `shard ${shard} holds tenants`);
      assert.equal((await direct.query('SELECT count(*)::int AS n FROM products')).rows[0].n, 3);
      assert.equal((await direct.query('SELECT price FROM products WHERE id = 1')).rows[0].price, '2.50');
    } finally {
      await direct.end();
    }
  }
}));

test('DDL is recorded on mg.schema.changes.v1: applied on every shard, failed naming the shard that refused it, at COMMIT only inside a transaction', cluster.explained(async () => {
  const changesOf = (statement: RegExp) => schemaChanges.filter((e) => statement.test(e.statement));
  await until('the CREATE TABLEs recorded', 15_000, () => DDL.every((ddl) => schemaChanges.some((e) => e.statement === ddl)));
  for (const ddl of DDL) {
    const [e] = changesOf(new RegExp(`^${ddl.replace(/[()]/g, '\\$&')}$`));
    assert.deepEqual([e.outcome, e.shards.sort(), e.failedShards, e.database, e.user], ['APPLIED', RANGES.map((r) => r.shard).sort(), [], 'postgres', 'postgres'], ddl);
  }
  // A table made behind the gateway's back on one shard: the same CREATE fails there only, and the shards now differ.
  const direct = new pg.Client({ host: '127.0.0.1', port: portOf(FIRST), user: 'postgres', database: 'postgres' });
  await direct.connect();
  await direct.query('CREATE TABLE drift (x int)').finally(() => direct.end());
  await assert.rejects(gw.query('CREATE TABLE drift (x int)'), (err: any) => err.code === '42P07' && err.message.includes(`shard ${FIRST}`));
  const failed = await until('the failed CREATE recorded', 15_000, () => changesOf(/^CREATE TABLE drift/)[0]);
  assert.deepEqual([failed.outcome, failed.failedShards], ['FAILED', [FIRST]]);
  assert.match(failed.error!, /"drift" already exists/);
  // Inside a transaction: nothing before COMMIT; a ROLLBACK TO or a ROLLBACK drops it.
  await gw.query('BEGIN');
  await gw.query('CREATE TABLE tx_undone (x int)');
  await gw.query('SAVEPOINT s');
  await gw.query('CREATE TABLE tx_kept (x int)');
  await gw.query('CREATE TABLE tx_rolled_back (x int)');
  await gw.query('ROLLBACK TO s');
  await gw.query('CREATE TABLE tx_kept (x int)');
  await new Promise((r) => setTimeout(r, 500));
  assert.deepEqual(changesOf(/^CREATE TABLE tx_/), [], 'nothing recorded before COMMIT');
  await gw.query('COMMIT');
  await until('the committed DDL recorded', 15_000, () => changesOf(/^CREATE TABLE tx_/).length >= 2);
  assert.deepEqual(changesOf(/^CREATE TABLE tx_/).map((e) => [e.statement, e.outcome]), [['CREATE TABLE tx_undone (x int)', 'APPLIED'], ['CREATE TABLE tx_kept (x int)', 'APPLIED']]);
  await gw.query('BEGIN; CREATE TABLE never (x int); ROLLBACK');
  await gw.query('DROP TABLE tx_undone, tx_kept');
  await until('the DROP recorded', 15_000, () => changesOf(/^DROP TABLE tx_undone/).length === 1);
  assert.deepEqual(changesOf(/never/), []);
}));

test('reads match one unsharded Postgres: pinned, IN, joins on the vindex, reference joins, scatter merges', cluster.explained(async () => {
  await same('SELECT * FROM orders WHERE tenant_id = 5 ORDER BY id');
  await same('SELECT * FROM orders WHERE tenant_id = $1 AND id = $2', [7, 2]);
  await same('SELECT tenant_id, id, total FROM orders WHERE tenant_id IN (1, 2, 3, 10)');
  await same('SELECT o.id, u.email, o.total FROM orders o JOIN users u ON u.tenant_id = o.tenant_id AND u.id = o.user_id WHERE o.tenant_id = 3 ORDER BY o.id');
  await same('SELECT l.order_id, p.name, l.qty * p.price AS amount FROM order_lines l JOIN products p ON p.id = l.product_id WHERE l.tenant_id = 8 ORDER BY 1, 2');
  await same('SELECT o.tenant_id, count(*) AS n FROM orders o JOIN order_lines l ON l.tenant_id = o.tenant_id AND l.order_id = o.id GROUP BY o.tenant_id ORDER BY o.tenant_id');
  await same('SELECT * FROM products ORDER BY id');
  // Subqueries, CTEs and FROM subselects that stay on the statement's shard.
  await same('SELECT o.id, o.total FROM orders o WHERE o.tenant_id = 4 AND o.id IN (SELECT l.order_id FROM order_lines l WHERE l.tenant_id = 4 AND l.qty > 1) ORDER BY o.id');
  await same('SELECT o.id, (SELECT count(*) FROM order_lines l WHERE l.tenant_id = o.tenant_id AND l.order_id = o.id) AS lines FROM orders o WHERE o.tenant_id = $1 ORDER BY o.id', [6]);
  await same('WITH mine AS (SELECT * FROM orders WHERE tenant_id = 2) SELECT m.id, u.email FROM mine m JOIN users u ON u.id = m.user_id WHERE u.tenant_id = 2 ORDER BY m.id');
  await same('SELECT s.status, count(*) AS n FROM (SELECT * FROM orders WHERE tenant_id = 9) s GROUP BY s.status ORDER BY s.status');
  // Writes that read other sharded tables on their own shard (an identity update: the rows stay as they were).
  await same('UPDATE orders o SET total = o.total FROM users u WHERE o.tenant_id = 3 AND u.tenant_id = o.tenant_id AND u.id = o.user_id RETURNING o.id, o.total');
  await same('UPDATE order_lines l SET qty = qty WHERE l.tenant_id = $1 AND l.order_id IN (SELECT o.id FROM orders o WHERE o.tenant_id = l.tenant_id AND o.status <> $2) RETURNING l.order_id, l.qty', [5, 'nope']);
  // Scatter: union, merge sort with LIMIT/OFFSET, aggregates, GROUP BY, DISTINCT.
  await same('SELECT tenant_id, id, status FROM orders');
  await same('SELECT tenant_id, id, total FROM orders ORDER BY total DESC, tenant_id LIMIT 10');
  await same('SELECT tenant_id, id, total FROM orders ORDER BY total, id LIMIT 5 OFFSET 7');
  // An aggregate of a subquery over a reference table is each row's, not the scatter's.
  await same('SELECT o.tenant_id, o.id, (SELECT count(*) FROM products p WHERE p.id <= o.user_id)::int AS n FROM orders o ORDER BY 1, 2');
  await same('SELECT tenant_id, id, total FROM orders ORDER BY total DESC LIMIT $1 OFFSET $2', [4, 3]);
  await same('SELECT * FROM users ORDER BY name NULLS FIRST, tenant_id, id LIMIT 6');
  await same('SELECT count(*) AS n, sum(total) AS s, min(total) AS lo, max(total) AS hi, count(name) AS named FROM orders o JOIN users u ON u.tenant_id = o.tenant_id AND u.id = o.user_id');
  await same('SELECT status, count(*) AS n, sum(total) AS s, max(id) AS m FROM orders GROUP BY status ORDER BY n DESC, status');
  await same('SELECT status, count(*) FROM orders GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 2');
  await same('SELECT DISTINCT status FROM orders ORDER BY status');
  await same('SELECT count(*) FROM orders WHERE total > 1000'); // no rows anywhere: still one row, 0
  await same('SELECT sum(qty) FROM order_lines WHERE qty > 1000'); // sum over nothing: NULL
}));

test('statements run only where they must (inet_server_port() answers which shard ran them)', cluster.explained(async () => {
  const ports = async (sql: string, params?: unknown[]) => (await gw.query(sql, params)).rows.map((r) => Number(r.p)).sort();
  for (const t of [1, 2, 3, 4]) {
    assert.deepEqual(await ports(`SELECT inet_server_port() AS p FROM tenants WHERE id = ${t}`), [portOf(shardOfTenant(t))]);
    assert.deepEqual(await ports('SELECT inet_server_port() AS p FROM tenants WHERE id = $1', [t]), [portOf(shardOfTenant(t))]);
  }
  const all = RANGES.map((r) => portOf(r.shard)).sort();
  assert.deepEqual(await ports('SELECT DISTINCT inet_server_port() AS p FROM tenants'), all);
  const a = tenantOn(FIRST);
  const b = tenantOn(LAST);
  assert.deepEqual(await ports(`SELECT DISTINCT inet_server_port() AS p FROM tenants WHERE id IN (${a}, ${b})`), [portOf(FIRST), portOf(LAST)].sort());
  assert.deepEqual(await ports(`SELECT DISTINCT inet_server_port() AS p FROM tenants WHERE id IN (${a}, ${a})`), [portOf(FIRST)]);
  assert.equal((await ports('SELECT inet_server_port() AS p FROM products WHERE id = 1')).length, 1);
  assert.deepEqual(await ports(`SELECT inet_server_port() AS p FROM tenants t WHERE t.id = ${b} AND (SELECT count(*) FROM orders o WHERE o.tenant_id = t.id) >= 0`), [portOf(LAST)]);
  const plan = (await gw.query(`EXPLAIN SELECT * FROM orders WHERE tenant_id = ${b}`)).rows.map((r) => r['QUERY PLAN']);
  assert.equal(plan[0], `mg route: single shard ${LAST} by vindex hash (hash) on orders.tenant_id`);
  assert.ok(plan.some((l) => /Scan/.test(l)), plan.join('\n'));
  await gw.query('SELECT * FROM orders ORDER BY total LIMIT 3');
  assert.equal((await gw.query('SHOW mg_plan')).rows[0].mg_plan, `scatter to ${SHARDS} shards (${RANGES.map((r) => r.shard).join(', ')}), gateway merge sort, limit`);
  // HAVING on an aggregate not selected: added to the shards' select list, stripped from what the client gets (decision 0074).
  const having = await gw.query('SELECT status FROM orders GROUP BY status HAVING sum(total) > 1 ORDER BY status');
  assert.deepEqual(having.fields.map((f) => f.name), ['status']);
  assert.match((await gw.query('SHOW mg_plan')).rows[0].mg_plan, /gateway aggregate, group by, having, streamed group by group, merge sort, 1 hidden column$/);
}));

test('constructs that cannot be answered correctly get 0A000 naming them, and the session goes on', cluster.explained(async () => {
  const refused: Array<[string, RegExp]> = [
    ['SELECT * FROM orders o JOIN users u ON u.id = o.user_id', /join of sharded tables orders and users not on their primary vindex/],
    ['SELECT avg(total) FROM orders', /avg\(\.\.\.\) over all shards/],
    ['SELECT tenant_id, rank() OVER (ORDER BY total) FROM orders', /window function over all shards/],
    ['SELECT * FROM orders WHERE id IN (SELECT order_id FROM order_lines)', /subquery or WITH over sharded table order_lines/],
    ['SELECT * FROM nosuch', /table nosuch is not in the VSchema/],
    ['UPDATE orders SET tenant_id = 99 WHERE tenant_id = 1', /primary vindex column/],
    ['INSERT INTO orders (id, user_id, total, status) VALUES (1, 1, 1, \'x\')', /without its primary vindex column tenant_id/],
    // Postgres refuses it too; the column the merge would add to the shards' select list must not make it valid there.
    ['SELECT DISTINCT status FROM orders ORDER BY total', /DISTINCT with ORDER BY, GROUP BY or HAVING on what it does not select/],
  ];
  for (const [sql, message] of refused) {
    await assert.rejects(gw.query(sql), (e: any) => e.code === '0A000' && message.test(e.message), sql);
    assert.equal((await gw.query('SELECT count(*)::int AS n FROM tenants')).rows[0].n, TENANTS, 'the session goes on');
  }
  await assert.rejects(gw.query('SELEC 1'), code('42601'));
  assert.equal((await gw.query('SELECT 1 AS one')).rows[0].one, 1);
}));

test('transactions: one shard unchanged; single refuses a second shard; multi spans shards; twopc commits on both or neither', cluster.explained(async () => {
  const a = tenantOn(FIRST);
  const b = tenantOn(LAST);
  const c = gwClient();
  await c.connect();
  try {
    const name = async (t: number) => (await c.query('SELECT name FROM tenants WHERE id = $1', [t])).rows[0].name;
    await c.query("SET mg.transaction_mode = 'single'");
    await c.query('BEGIN');
    await c.query(`UPDATE tenants SET name = 'in tx' WHERE id = ${a}`);
    assert.equal(await name(a), 'in tx', 'a transaction reads its own writes');
    await assert.rejects(c.query(`UPDATE tenants SET name = 'x' WHERE id = ${b}`), (e: any) => e.code === '0A000' && /transaction_mode single/.test(e.message));
    await assert.rejects(c.query('SELECT 1'), code('25P02'));
    await c.query('ROLLBACK');
    assert.notEqual(await name(a), 'in tx');

    await c.query("SET mg.transaction_mode = 'multi'");
    await c.query('BEGIN');
    await c.query(`UPDATE tenants SET name = 'moved' WHERE id IN (${a}, ${b})`);
    assert.deepEqual((await c.query(`SELECT id::int, name FROM tenants WHERE id IN (${a}, ${b}) ORDER BY id`)).rows.map((r) => r.name), ['moved', 'moved']);
    await c.query('ROLLBACK');
    assert.notEqual(await name(b), 'moved', 'rolled back on every shard');
    await c.query('BEGIN');
    await c.query(`UPDATE tenants SET name = 'both' WHERE id = ${a}`);
    await c.query(`UPDATE tenants SET name = 'both' WHERE id = ${b}`);
    await c.query('COMMIT');
    assert.deepEqual([await name(a), await name(b)], ['both', 'both']);

    await c.query("SET mg.transaction_mode = 'twopc'");
    await c.query('BEGIN');
    await c.query(`UPDATE tenants SET name = 'twopc' WHERE id = ${a}`);
    await c.query(`UPDATE tenants SET name = 'twopc' WHERE id = ${b}`);
    await c.query('COMMIT');
    assert.deepEqual([await name(a), await name(b)], ['twopc', 'twopc'], 'committed on both shards');
    let decisions = 0;
    for (const shard of [FIRST, LAST]) {
      const direct = new pg.Client({ host: '127.0.0.1', port: portOf(shard), user: 'postgres', database: 'postgres' });
      await direct.connect();
      try {
        const left = await direct.query("SELECT count(*)::int AS n FROM pg_prepared_xacts WHERE gid LIKE 'mg2pc:%'");
        assert.equal(left.rows[0].n, 0, `nothing left prepared on ${shard}`);
        const table = await direct.query("SELECT to_regclass('mg_twopc.decisions') IS NOT NULL AS present");
        if (table.rows[0].present) decisions += (await direct.query("SELECT count(*)::int AS n FROM mg_twopc.decisions WHERE decision = 'commit'")).rows[0].n;
      } finally {
        await direct.end();
      }
    }
    assert.equal(decisions, 1, 'the COMMIT decision was recorded once, on one participant shard, before COMMIT PREPARED');
    await c.query('BEGIN');
    await c.query(`UPDATE tenants SET name = 'one shard' WHERE id = ${a}`);
    await c.query('COMMIT'); // one participant: a plain commit, whatever the mode
    assert.equal(await name(a), 'one shard');
  } finally {
    await c.end();
  }
}));

test('savepoints and SET LOCAL span shards as on one Postgres, also on a shard that joins after them (differential)', cluster.explained(async () => {
  const [a, b] = [tenantOn(FIRST), tenantOn(LAST)];
  const c = gwClient();
  await c.connect();
  const outcome = async (client: pg.Client, sql: string) => {
    try {
      const r = await client.query(sql);
      return { command: r.command, rows: /order by/i.test(sql) ? r.rows : r.rows.map((x) => JSON.stringify(x)).sort() };
    } catch (err) {
      return { code: (err as { code?: string }).code };
    }
  };
  const run = async (script: string[]) => {
    for (const sql of script) assert.deepEqual(await outcome(c, sql), await outcome(ref, sql), sql);
  };
  const settingOnBoth = `SELECT DISTINCT current_setting('work_mem') AS w FROM users WHERE tenant_id IN (${a}, ${b})`;
  const mine = 'SELECT tenant_id::int, id::int, name FROM users WHERE id >= 1000 ORDER BY 1, 2';
  try {
    await run([
      'SAVEPOINT nowhere', "SET LOCAL work_mem = '2MB'", 'RELEASE SAVEPOINT nowhere', // outside a transaction
      'BEGIN',
      `INSERT INTO users (tenant_id, id, email, name) VALUES (${a}, 1001, 'x@a', 'before s1')`,
      'SAVEPOINT s1',
      "SET LOCAL work_mem = '1234kB'",
      `INSERT INTO users (tenant_id, id, email, name) VALUES (${b}, 1002, 'x@b', 'after s1')`, // the second shard joins here
      settingOnBoth,
      'SAVEPOINT "S 2"',
      "UPDATE users SET name = 'in s2' WHERE id >= 1000",
      mine,
      'ROLLBACK TO SAVEPOINT "S 2"',
      mine,
      'RELEASE "S 2"',
      `INSERT INTO users (tenant_id, id, email, name) VALUES (${a}, 1001, 'dup', 'dup')`, // 23505 aborts the transaction
      mine,
      'ROLLBACK TO s1', // recovers it, and undoes everything after s1 on both shards
      mine,
      settingOnBoth,
      `INSERT INTO users (tenant_id, id, email, name) VALUES (${b}, 1003, 'y@b', 'after recovery')`,
      'RELEASE SAVEPOINT s1',
      'ROLLBACK TO s1', // released: 3B001
      'ROLLBACK',
      'BEGIN',
      `INSERT INTO users (tenant_id, id, email, name) VALUES (${a}, 1004, 'z@a', 'kept')`,
      'SAVEPOINT s',
      `INSERT INTO users (tenant_id, id, email, name) VALUES (${b}, 1005, 'z@b', 'kept too')`,
      'RELEASE s',
      'COMMIT',
      mine,
    ]);
    assert.deepEqual((await c.query(mine)).rows.map((r) => r.id).sort(), [1004, 1005], 'only the committed transaction\'s rows stay');
  } finally {
    await c.end();
  }
}));

test('functions and procedures are created on every shard and run on the shard of the argument the VSchema names', cluster.explained(async () => {
  await gw.query("CREATE FUNCTION tenant_port(t bigint) RETURNS int LANGUAGE sql AS 'SELECT inet_server_port()'");
  await gw.query('CREATE PROCEDURE rename_tenant(t bigint, n text) LANGUAGE plpgsql AS $$ BEGIN UPDATE tenants SET name = n WHERE id = t; COMMIT; END $$');
  for (const t of [1, 2, 3, 4]) {
    assert.equal((await gw.query(`SELECT tenant_port(${t}) AS p`)).rows[0].p, portOf(shardOfTenant(t)));
    assert.equal((await gw.query('SELECT tenant_port($1) AS p', [t])).rows[0].p, portOf(shardOfTenant(t)));
  }
  await gw.query("CALL rename_tenant(7, 'called')"); // a procedure that commits inside, on its shard
  assert.equal((await gw.query('SELECT name FROM tenants WHERE id = 7')).rows[0].name, 'called');
}));

test('session settings reach every shard the session uses', cluster.explained(async () => {
  const c = gwClient();
  await c.connect();
  try {
    await c.query("SET application_name = 'sharded-app'");
    const { rows } = await c.query("SELECT DISTINCT current_setting('application_name') AS a, inet_server_port() AS p FROM tenants");
    assert.equal(rows.length, 2);
    assert.ok(rows.every((r) => r.a === 'sharded-app'));
  } finally {
    await c.end();
  }
}));

test('temporary tables are the session\'s: a copy on every shard it uses, written on each, read and joined like a reference table; other sessions do not see them (differential)', cluster.explained(async () => {
  const other = gwClient();
  await other.connect();
  try {
    for (const db of [gw, ref]) {
      await db.query('CREATE TEMP TABLE picked (tenant_id bigint PRIMARY KEY, note text)');
      await db.query('INSERT INTO picked VALUES ($1, $2), ($3, $4)', [tenantOn(FIRST), 'first', tenantOn(LAST), 'last']);
      await db.query("UPDATE picked SET note = note || '!'");
    }
    await same('SELECT * FROM picked ORDER BY tenant_id');
    await same('SELECT o.tenant_id, o.id, p.note FROM orders o JOIN picked p ON p.tenant_id = o.tenant_id ORDER BY 1, 2');
    await same('SELECT count(*)::int AS n FROM orders WHERE tenant_id IN (SELECT tenant_id FROM picked WHERE note = $1)', ['last!']);
    // Each shard's backend of this session has the whole table.
    const perShard = await gw.query('SELECT DISTINCT inet_server_port() AS port, p.tenant_id FROM orders CROSS JOIN picked p');
    assert.equal(perShard.rows.length, 2 * SHARDS);
    assert.equal(new Set(perShard.rows.map((r) => r.port)).size, SHARDS);
    await assert.rejects(other.query('SELECT * FROM picked'), code('0A000'), 'another session has no such table');
    for (const db of [gw, ref]) await db.query('DROP TABLE picked');
    await assert.rejects(gw.query('SELECT * FROM picked'), code('0A000'), 'dropped');
    await same('SELECT count(*)::int AS n FROM orders');
  } finally {
    await other.end();
  }
}));

/** psql's \copy of `data` into port's database; its output (COPY n) or its error. */
function psqlCopy(port: number, copy: string, data: string): { out: string; err: string } {
  const r = spawnSync('psql', ['-h', '127.0.0.1', '-p', String(port), '-U', 'postgres', '-d', 'postgres', '-v', 'ON_ERROR_STOP=1', '-c', `\\copy ${copy}`], {
    input: data, encoding: 'utf8', env: { ...process.env, PGPASSWORD: 'postgres', PGSSLMODE: 'disable' },
  });
  return { out: r.stdout.trim(), err: r.stderr.trim() };
}

test('COPY FROM STDIN (psql \\copy in CSV, postgres.js in text, no column list) puts every row on its shard, all or nothing', cluster.explained(async () => {
  const csv = ['tenant_id,id,note', ...Array.from({ length: 30 }, (_, i) => `${(i % TENANTS) + 1},${i + 1},"note ${i}, with ""quotes""${i % 7 === 0 ? '\nand a newline' : ''}"`)].join('\n');
  for (const port of [gatewayPort, reference.port]) {
    assert.deepEqual(psqlCopy(port, 'events (tenant_id, id, note) FROM STDIN WITH (FORMAT csv, HEADER)', `${csv}\n`), { out: 'COPY 30', err: '' });
  }
  const text = Array.from({ length: 20 }, (_, i) => `${(i % TENANTS) + 1}\t${100 + i}\ttab\\there ${i}\n`).join('');
  for (const port of [gatewayPort, reference.port]) {
    const sql = postgres({ host: '127.0.0.1', port, user: 'postgres', password: 'postgres', database: 'postgres', max: 1 });
    try {
      const writable = await sql`COPY events FROM STDIN`.writable();
      await new Promise<void>((resolve, reject) => {
        writable.on('error', reject);
        writable.end(text, () => resolve());
      });
      // The COPY has ended when the connection answers again.
      assert.equal((await sql`SELECT count(*)::int AS n FROM events WHERE id >= 100`)[0].n, 20);
    } finally {
      await sql.end();
    }
  }
  await same('SELECT * FROM events ORDER BY tenant_id, id');
  // Each row is on the shard of its tenant.
  const byPort = (await gw.query('SELECT inet_server_port() AS p, count(*)::int AS n FROM events GROUP BY 1')).rows;
  const expected = new Map<number, number>();
  for (const { tenant_id: t } of (await ref.query('SELECT tenant_id FROM events')).rows) expected.set(portOf(shardOfTenant(Number(t))), (expected.get(portOf(shardOfTenant(Number(t)))) ?? 0) + 1);
  assert.deepEqual(new Map(byPort.map((r) => [Number(r.p), r.n])), expected);
  // One row a shard refuses (a duplicate key) and the rows bound for the other shard do not land either; the session goes on.
  const before = (await gw.query('SELECT count(*)::int AS n FROM events')).rows[0].n;
  const a = tenantOn(FIRST);
  const b = tenantOn(LAST);
  const failed = psqlCopy(gatewayPort, 'events FROM STDIN', `${b}\t900\tnew\n${a}\t1000\tnew\n${a}\t1000\tagain\n`);
  assert.match(failed.err, /duplicate key value violates unique constraint "events_pkey"/);
  assert.match(psqlCopy(gatewayPort, 'events FROM STDIN', `${a}\t901\tx\n\\N\t902\tno tenant\n`).err, /a row without a value in its primary vindex column events.tenant_id/);
  assert.equal((await gw.query('SELECT count(*)::int AS n FROM events')).rows[0].n, before, 'nothing of the failed COPYs landed');
  // COPY TO STDOUT: every shard's rows, or the one shard a query pins.
  const lines = (port: number, copy: string) => psqlCopy(port, copy, '').out.split('\n').sort();
  assert.deepEqual(lines(gatewayPort, 'events TO STDOUT'), lines(reference.port, 'events TO STDOUT'));
  const pinned = `(SELECT id, note FROM events WHERE tenant_id = ${a}) TO STDOUT WITH (FORMAT csv)`;
  assert.deepEqual(lines(gatewayPort, pinned), lines(reference.port, pinned));
  assert.ok(lines(gatewayPort, pinned).length > 1);
  const scattered = '(SELECT tenant_id, id, note FROM events WHERE id > 3) TO STDOUT'; // every shard's rows, nothing to merge
  assert.deepEqual(lines(gatewayPort, scattered), lines(reference.port, scattered));
  const withHeader = 'events TO STDOUT WITH (FORMAT csv, HEADER)';
  assert.deepEqual(lines(gatewayPort, withHeader), lines(reference.port, withHeader), 'one header line, as from one Postgres');
  const metrics = await (await fetch(`http://127.0.0.1:${spec.gateway.metricsPort}/metrics`)).text();
  assert.ok(Number(/^mg_gateway_sharded_copy_rows_total (\d+)/m.exec(metrics)?.[1]) >= 50, 'the 50 rows copied in, counted');
  assert.match(metrics, /mg_gateway_sharded_statements_total\{route="copy_out"\} [1-9]/);
}));

test('postgres.js (extended protocol, and simple) gets the same answers, and portals with row limits work on scatter results', cluster.explained(async () => {
  const sql = postgres({ host: '127.0.0.1', port: gatewayPort, user: 'postgres', password: 'postgres', database: 'postgres', max: 1, onnotice: () => undefined });
  try {
    const t = 6;
    const pinned = await sql`SELECT id, total FROM orders WHERE tenant_id = ${t} ORDER BY id`;
    assert.deepEqual([...pinned], (await ref.query('SELECT id, total FROM orders WHERE tenant_id = $1 ORDER BY id', [t])).rows);
    const top = await sql`SELECT tenant_id, id, total FROM orders ORDER BY total DESC, tenant_id LIMIT ${5}`;
    assert.deepEqual([...top], (await ref.query('SELECT tenant_id, id, total FROM orders ORDER BY total DESC, tenant_id LIMIT 5')).rows);
    const counts = await sql`SELECT status, count(*)::int AS n FROM orders GROUP BY status ORDER BY status`.simple();
    assert.deepEqual([...counts], (await ref.query('SELECT status, count(*)::int AS n FROM orders GROUP BY status ORDER BY status')).rows);
    const batches: number[] = [];
    await sql`SELECT tenant_id, id FROM orders ORDER BY tenant_id, id`.cursor(10, (rows) => {
      batches.push(rows.length);
    });
    assert.deepEqual(batches, [10, 10, 10, 6]);
    await assert.rejects(sql`SELECT avg(total) FROM orders`, (e: any) => e.code === '0A000');
    assert.equal((await sql`SELECT count(*)::int AS n FROM tenants`)[0].n, TENANTS);
  } finally {
    await sql.end();
  }
}));

