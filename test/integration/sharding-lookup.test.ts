/**
 * Lookup vindexes end to end on a 2-shard database (one instance per shard):
 * the VSchema applied through the orchestrator's REST route, users written
 * through the gateway with node-postgres and postgres.js (simple and extended
 * protocol), and after every write the lookup tables read on the shards
 * themselves must hold exactly one row per owner row, on the shard their own
 * vindex names. Reads by a lookup column must reach the owner's shard only
 * (SHOW mg_plan, EXPLAIN, inet_server_port()).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import pg from 'pg';
import postgres from 'postgres';
import { shardRanges } from '../../compose/spec.ts';
import { hashKeyspaceId } from '../../schemas/index.ts';
import { testCluster, until } from '../support/cluster.ts';
import { lookupChecks } from '../support/lookups.ts';

const cluster = testCluster('lookup', 1, {
  spec: { cells: ['zone1'], databases: [{ name: 'shop', sharded: true, shards: 2, instancesPerShard: 1, durability: 'ANY_1' }] },
});
const { spec, flags, mg, dataDir } = cluster;
const RANGES = shardRanges(2);
const [FIRST, SECOND] = RANGES.map((r) => r.shard);
const portOf = (shard: string) => cluster.instances.find((i) => i.shard === shard)!.port;
const { onEachShard, assertLookupsExact, shardOfTenant, shardOfEmail } = lookupChecks(RANGES, portOf, 'shop');
const tenantOn = (shard: string, after = 0) => Array.from({ length: 40 }, (_, i) => after + i + 1).find((t) => shardOfTenant(t) === shard)!;
const api = `http://127.0.0.1:${spec.orchestrator.basePort}/v1/databases`;

const VSCHEMA = `
vindexes:
  hash: { type: hash }
  text_hash: { type: xxhash }
  email: { type: consistent_lookup_unique, params: { table: users_email_idx, from: email, to: keyspace_id }, owner: users }
  nick: { type: lookup, params: { table: users_nick_idx, from: nick, to: tenant_id }, owner: users }
tables:
  users: { column_vindexes: [{ column: tenant_id, name: hash }, { column: email, name: email }, { column: nick, name: nick }] }
  users_email_idx: { column_vindexes: [{ column: email, name: text_hash }] }
`;
const DDL = [
  'CREATE TABLE users (tenant_id bigint NOT NULL, id bigint NOT NULL, email text, nick text, name text, PRIMARY KEY (tenant_id, id))',
  'CREATE TABLE users_email_idx (email text PRIMARY KEY, keyspace_id bytea NOT NULL)',
  'CREATE TABLE users_nick_idx (nick text NOT NULL, tenant_id bigint NOT NULL)',
  'CREATE INDEX ON users_nick_idx (nick)',
];

const gwClient = () => new pg.Client({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'shop' });
let gw: pg.Client;

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  // The VSchema goes in through the admin API, as YAML.
  const put = await fetch(`${api}/shop/vschema`, { method: 'PUT', headers: { 'content-type': 'application/yaml' }, body: VSCHEMA });
  assert.equal(put.status, 200, await put.clone().text());
  assert.equal((await put.json()).version, '1');
  gw = gwClient();
  await gw.connect();
  await until('the gateway to know the VSchema', 15_000, async () => gw.query('SELECT 1 FROM users LIMIT 1').then(() => false, (e) => e.code === '42P01'));
  for (const ddl of DDL) await gw.query(ddl);
});

after(async () => {
  await gw?.end().catch(() => undefined);
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

test('the VSchema REST route: GET gives the applied one; a bad one is 400 naming each fault, as mg vschema apply reports it', cluster.explained(async () => {
  const got = await (await fetch(`${api}/shop/vschema`)).json();
  assert.equal(got.version, '1');
  assert.equal(got.vschema.vindexes.email.type, 'consistent_lookup_unique');
  const bad = {
    vindexes: { hash: { type: 'hash' }, email: { type: 'consistent_lookup_unique', params: { table: 'users_email_idx', from: 'email', to: 'keyspace_id' } } },
    tables: { users: { column_vindexes: [{ column: 'tenant_id', name: 'hash' }, { column: 'email', name: 'emial' }] } },
  };
  const r = await fetch(`${api}/shop/vschema`, { method: 'PUT', headers: { 'content-type': 'application/json' }, body: JSON.stringify(bad) });
  assert.equal(r.status, 400);
  const body = await r.json();
  assert.deepEqual(body.fields, [
    { field: 'table users, column email', message: 'vindex emial is not defined' },
    { field: 'vindex email', message: 'a consistent_lookup_unique vindex needs an owner table (whose writes keep the lookup table in step)' },
  ]);
  assert.match(body.error, /^invalid VSchema: table users, column email: vindex emial is not defined; vindex email: /);
  // The CLI goes through the same route and prints the same faults.
  const file = path.join(dataDir, 'bad.yaml');
  fs.writeFileSync(file, JSON.stringify(bad));
  const cli = await mg('vschema', 'apply', 'shop', file, '--data-dir', dataDir);
  assert.equal(cli.code, 2);
  assert.match(cli.stderr, /invalid VSchema .*bad\.yaml:\ntable users, column email: vindex emial is not defined\nvindex email: a consistent_lookup_unique vindex needs an owner/);
  assert.equal((await fetch(`${api}/shop/vschema`, { method: 'PUT', headers: { 'content-type': 'application/yaml' }, body: 'tables: [' })).status, 400);
  const list = await fetch(`${api}/shop/vschema`, { method: 'PUT', headers: { 'content-type': 'application/yaml' }, body: '- tables\n' });
  assert.equal(list.status, 400);
  assert.deepEqual((await list.json()).fields, [{ field: 'body', message: 'must be object' }]);
  const missing = await fetch(`${api}/nowhere/vschema`, { method: 'PUT', headers: { 'content-type': 'application/json' }, body: '{}' });
  assert.equal(missing.status, 404);
  assert.match((await missing.json()).error, /database nowhere does not exist/);
  // Nothing bad was published: still version 1.
  const shown = await mg('vschema', 'show', 'shop', '--data-dir', dataDir);
  assert.equal(shown.code, 0, shown.stderr);
  assert.match(shown.stdout, /^# version 1\n[\s\S]*consistent_lookup_unique/);
}));

test('INSERTs through the gateway write their lookup rows where the lookup vindexes say (node-postgres and postgres.js, bind parameters too)', cluster.explained(async () => {
  const a = tenantOn(FIRST);
  const b = tenantOn(SECOND);
  // Simple protocol, one statement whose rows go to both shards.
  await gw.query(`INSERT INTO users (tenant_id, id, email, nick, name) VALUES (${a}, 1, 'ann@a.org', 'kim', 'Ann'), (${b}, 1, 'bob@b.org', 'kim', 'Bob'), (${a}, 2, NULL, NULL, 'Nobody')`);
  // Extended protocol with bind parameters (node-postgres).
  await gw.query('INSERT INTO users (tenant_id, id, email, nick, name) VALUES ($1, $2, $3, $4, $5), ($6, $7, $8, $9, $10)',
    [b, 2, 'cy@b.org', 'lee', 'Cy', a, 3, 'di@a.org', 'kim', 'Di']);
  // postgres.js: prepared statements with its own parameter handling.
  const js = postgres({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'shop', max: 1, onnotice: () => undefined });
  try {
    for (let i = 0; i < 6; i++) {
      const t = tenantOn(i % 2 ? SECOND : FIRST, 10 * (i + 1));
      const [row] = await js`INSERT INTO users (tenant_id, id, email, nick, name) VALUES (${t}, ${100 + i}, ${`js${i}@x.org`}, ${i % 3 ? 'kim' : null}, ${'js'}) RETURNING id`;
      assert.equal(Number(row.id), 100 + i);
    }
    const found = await js`SELECT name, tenant_id FROM users WHERE email = ${'js3@x.org'}`;
    assert.deepEqual(found.map((r) => Number(r.tenant_id)), [tenantOn(SECOND, 40)]);
  } finally {
    await js.end();
  }
  const users = await assertLookupsExact();
  assert.equal(users.length, 11);
  const emails = await onEachShard('SELECT email FROM users_email_idx');
  assert.ok(emails[FIRST].length > 0 && emails[SECOND].length > 0, `the email lookup table is sharded: ${JSON.stringify(emails)}`);
}));

test('a SELECT by a lookup column (literal, $n, IN) returns the row from the one shard the lookup names', cluster.explained(async () => {
  const b = tenantOn(SECOND);
  const r = await gw.query("SELECT inet_server_port() AS port, tenant_id::int AS t, name FROM users WHERE email = 'bob@b.org'");
  assert.deepEqual(r.rows, [{ port: portOf(SECOND), t: b, name: 'Bob' }]);
  assert.equal((await gw.query('SHOW mg_plan')).rows[0].mg_plan,
    `single shard ${SECOND} by lookup vindex email (consistent_lookup_unique) on users.email via lookup table users_email_idx`);
  const p = await gw.query('SELECT inet_server_port() AS port, name FROM users WHERE email = $1', ['ann@a.org']);
  assert.deepEqual(p.rows, [{ port: portOf(FIRST), name: 'Ann' }]);
  const plan = (await gw.query("EXPLAIN SELECT * FROM users WHERE email = 'ann@a.org'")).rows.map((x) => x['QUERY PLAN']);
  assert.match(plan[0], new RegExp(`^mg route: single shard ${FIRST} by lookup vindex email`));
  assert.deepEqual(plan.filter((l) => l.startsWith('shard ')), [`shard ${FIRST}:`]);
  // IN over both shards, ordered; an unknown value reaches no owner row.
  const both = await gw.query("SELECT name FROM users WHERE email IN ('bob@b.org', 'ann@a.org', 'nobody@x.org') ORDER BY name");
  assert.deepEqual(both.rows.map((x) => x.name), ['Ann', 'Bob']);
  assert.deepEqual((await gw.query("SELECT name FROM users WHERE email = 'nobody@x.org'")).rows, []);
  // The non-unique lookup names every shard that has the nick, and only those.
  const kims = await gw.query("SELECT name FROM users WHERE nick = 'kim' AND name <> 'js' ORDER BY name");
  assert.deepEqual(kims.rows.map((x) => x.name), ['Ann', 'Bob', 'Di']);
  assert.match((await gw.query('SHOW mg_plan')).rows[0].mg_plan, /^2 shards .* by lookup vindex nick \(lookup\)/);
  const lee = await gw.query("SELECT inet_server_port() AS port FROM users WHERE nick = 'lee'");
  assert.deepEqual(lee.rows, [{ port: portOf(SECOND) }]);
}));

test('a duplicate on a consistent_lookup_unique column is 23505 on the owner statement, and nothing of it is written', cluster.explained(async () => {
  const a = tenantOn(FIRST);
  const b = tenantOn(SECOND);
  const before = await assertLookupsExact();
  const dup = await gw.query(`INSERT INTO users (tenant_id, id, email, nick, name) VALUES (${b}, 50, 'new@b.org', 'zed', 'New'), (${a}, 51, 'ann@a.org', NULL, 'Dup')`).catch((e) => e);
  assert.equal(dup.code, '23505');
  assert.match(dup.message, /duplicate key value violates unique lookup vindex email of users\.email/);
  assert.match(dup.detail, /Key \(email\)=\(ann@a\.org\) already exists in lookup table users_email_idx/);
  const bound = await gw.query('INSERT INTO users (tenant_id, id, email, nick, name) VALUES ($1, $2, $3, $4, $5)', [b, 52, 'bob@b.org', null, 'Dup']).catch((e) => e);
  assert.equal(bound.code, '23505');
  // An UPDATE to a taken email fails the same way; the session goes on.
  const moved = await gw.query(`UPDATE users SET email = 'bob@b.org' WHERE tenant_id = ${a} AND id = 1`).catch((e) => e);
  assert.equal(moved.code, '23505');
  assert.deepEqual((await gw.query("SELECT count(*)::int AS n FROM users WHERE name IN ('New', 'Dup')")).rows, [{ n: 0 }]);
  assert.deepEqual((await gw.query(`SELECT email FROM users WHERE tenant_id = ${a} AND id = 1`)).rows, [{ email: 'ann@a.org' }]);
  assert.equal((await assertLookupsExact()).length, before.length);
}));

test('UPDATE of a lookup column moves its lookup rows, DELETE removes them; in a transaction, ROLLBACK leaves none', cluster.explained(async () => {
  const a = tenantOn(FIRST);
  const b = tenantOn(SECOND);
  // By the primary vindex, simple protocol; by the lookup itself, extended protocol.
  assert.equal((await gw.query(`UPDATE users SET email = 'ann@new.org', nick = 'ann' WHERE tenant_id = ${a} AND id = 1`)).rowCount, 1);
  assert.equal((await gw.query('UPDATE users SET email = $1, nick = NULL WHERE email = $2', ['bob@new.org', 'bob@b.org'])).rowCount, 1);
  assert.match((await gw.query('SHOW mg_plan')).rows[0].mg_plan, new RegExp(`^single shard ${SECOND} by lookup vindex email .*keeps lookup vindex email \\(users_email_idx\\), vindex nick \\(users_nick_idx\\)$`));
  // A column that is not a lookup column leaves the lookups alone.
  await gw.query("UPDATE users SET name = 'Ann B' WHERE email = 'ann@new.org'");
  await assertLookupsExact();
  assert.deepEqual((await gw.query("SELECT name FROM users WHERE email = 'ann@new.org'")).rows, [{ name: 'Ann B' }]);
  assert.deepEqual((await gw.query("SELECT name FROM users WHERE email = 'bob@b.org'")).rows, []);
  // DELETE by a lookup column (RETURNING kept), and over every shard.
  const del = await gw.query('DELETE FROM users WHERE email = $1 RETURNING name', ['cy@b.org']);
  assert.deepEqual(del.rows, [{ name: 'Cy' }]);
  assert.equal((await gw.query("DELETE FROM users WHERE name = 'js' AND nick = 'kim'")).rowCount, 4);
  await assertLookupsExact();
  // In a transaction the lookup rows are part of it: its reads see them, ROLLBACK takes them away.
  await gw.query("SET mg.transaction_mode = 'twopc'");
  await gw.query('BEGIN');
  await gw.query(`INSERT INTO users (tenant_id, id, email, nick, name) VALUES (${b}, 60, 'tx@x.org', 'tx', 'Tx')`);
  assert.deepEqual((await gw.query("SELECT name FROM users WHERE email = 'tx@x.org'")).rows, [{ name: 'Tx' }]);
  await gw.query('ROLLBACK');
  assert.deepEqual((await gw.query("SELECT name FROM users WHERE email = 'tx@x.org'")).rows, []);
  await gw.query('BEGIN');
  await gw.query(`INSERT INTO users (tenant_id, id, email, nick, name) VALUES (${b}, 61, 'kept@x.org', 'kept', 'Kept')`);
  await gw.query(`DELETE FROM users WHERE tenant_id = ${a} AND id = 3`);
  await gw.query('COMMIT');
  const users = await assertLookupsExact();
  assert.ok(users.some((u) => u.email === 'kept@x.org') && !users.some((u) => u.email === 'di@a.org'));
  assert.deepEqual(await onEachShard('SELECT gid FROM pg_prepared_xacts'), { [FIRST]: [], [SECOND]: [] });
  // The gateway counts its lookup statements, and no delete missed its lookup row.
  const metrics = await (await fetch(`http://127.0.0.1:${spec.gateway.metricsPort}/metrics`)).text();
  for (const op of ['read', 'insert', 'delete']) assert.match(metrics, new RegExp(`^mg_gateway_lookup_statements_total\\{op="${op}"\\} [1-9]`, 'm'), op);
  assert.doesNotMatch(metrics, /^mg_gateway_lookup_rows_missing_total\{[^}]*\} [1-9]/m);
}));
