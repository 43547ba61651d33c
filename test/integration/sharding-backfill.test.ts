/**
 * Adding lookup vindexes to a sharded table that already has rows (decision
 * 0059), on a 2-shard database with one instance per shard: the vindexes are
 * applied write_only (writes keep them, reads do not route by them), a writer
 * inserts, updates and deletes users through the gateway the whole time
 * (simple protocol, bind parameters, and a prepared statement made before the
 * vindexes existed), `mg vschema backfill` fills each lookup table for the rows
 * that were there before (a unique one holding a value twice is an error
 * naming the value), and after `mg vschema externalize` reads route by them.
 * The lookup tables are then checked on the shards themselves: exactly one row
 * per owner row, nothing else.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { shardRanges } from '../../compose/spec.ts';
import { testCluster, until } from '../support/cluster.ts';
import { lookupChecks } from '../support/lookups.ts';

const cluster = testCluster('backfill', 1, {
  spec: { cells: ['zone1'], databases: [{ name: 'shop', sharded: true, shards: 2, instancesPerShard: 1, durability: 'ANY_1' }] },
  // Small pages: each shard's rows take several, and the writer's changes land between them.
  settings: { 'materializer.pageRows': 25 },
});
const { spec, flags, mg, dataDir } = cluster;
const mgOk = (...args: string[]) => cluster.mgOk(...args);
const RANGES = shardRanges(2);
const [FIRST, SECOND] = RANGES.map((r) => r.shard);
const portOf = (shard: string) => cluster.instances.find((i) => i.shard === shard)!.port;
const { onEachShard, assertLookupsExact, shardOfTenant } = lookupChecks(RANGES, portOf, 'shop');
const api = `http://127.0.0.1:${spec.orchestrator.basePort}/v1/databases/shop/vschema`;
const backfillApi = (vindex: string) => `http://127.0.0.1:${spec.materializer.port}/v1/databases/shop/vindexes/${vindex}/backfill`;

const BASE = `
vindexes:
  hash: { type: hash }
  text_hash: { type: xxhash }
tables:
  users: { column_vindexes: [{ column: tenant_id, name: hash }] }
  users_email_idx: { column_vindexes: [{ column: email, name: text_hash }] }
`;
const WITH_LOOKUPS = `
vindexes:
  hash: { type: hash }
  text_hash: { type: xxhash }
  email: { type: consistent_lookup_unique, params: { table: users_email_idx, from: email, to: keyspace_id, write_only: true }, owner: users }
  nick: { type: lookup, params: { table: users_nick_idx, from: nick, to: tenant_id, write_only: true }, owner: users }
tables:
  users: { column_vindexes: [{ column: tenant_id, name: hash }, { column: email, name: email }, { column: nick, name: nick }] }
  users_email_idx: { column_vindexes: [{ column: email, name: text_hash }] }
`;
const DDL = [
  'CREATE TABLE users (tenant_id bigint NOT NULL, id bigint NOT NULL, email text, nick text, PRIMARY KEY (tenant_id, id))',
  'CREATE TABLE users_email_idx (email text PRIMARY KEY, keyspace_id bytea NOT NULL)',
  'CREATE TABLE users_nick_idx (nick text NOT NULL, tenant_id bigint NOT NULL)',
  'CREATE INDEX ON users_nick_idx (nick)',
];
/** The insert the writer prepares before the lookup vindexes exist, and keeps executing after. */
const PREPARED_INSERT = { name: 'add_user', text: 'INSERT INTO users (tenant_id, id, email, nick) VALUES ($1, $2, $3, $4)' };

const gwClient = () => new pg.Client({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'shop' });
const putVSchema = async (yaml: string) => {
  const r = await fetch(api, { method: 'PUT', headers: { 'content-type': 'application/yaml' }, body: yaml });
  assert.equal(r.status, 200, await r.text());
};
const explain = async (c: pg.Client, sql: string) => (await c.query(`EXPLAIN ${sql}`)).rows.map((r) => r['QUERY PLAN']).join('\n');

// 300 users over 20 tenants; nicks repeat within a tenant (one lookup row per owner row, across pages);
// some emails and nicks NULL (no lookup row); two users on different shards share an email.
const TENANTS = Array.from({ length: 20 }, (_, i) => i + 1);
const DUP_A = TENANTS.find((t) => shardOfTenant(t) === FIRST)!;
const DUP_B = TENANTS.find((t) => shardOfTenant(t) === SECOND)!;
const initialUsers = () => [
  ...Array.from({ length: 300 }, (_, i) => [TENANTS[i % 20], i + 1, i % 10 === 9 ? null : `u${i + 1}@x.org`, i % 9 === 8 ? null : `n${i % 7}`]),
  [DUP_A, 301, 'dup@x.org', 'd'], [DUP_B, 302, 'dup@x.org', 'd'],
];

/** A writer through the gateway until stopped: inserts, lookup column updates and deletes, outside transactions (each its own two-phase commit). */
function startWriter(prepared: pg.Client) {
  const live = initialUsers().filter(([, id]) => Number(id) <= 300).map(([t, id]) => [Number(t), Number(id)] as [number, number]);
  const state = { stop: false, ops: { insert: 0, email: 0, nick: 0, delete: 0 }, errors: [] as string[] };
  let next = 1000;
  const pick = () => live[Math.floor(Math.random() * live.length)];
  const done = (async () => {
    const c = gwClient();
    await c.connect();
    try {
      while (!state.stop) {
        const n = next++;
        const op = n % 4;
        try {
          if (op === 0) {
            const t = TENANTS[n % 20];
            // Every other insert through the statement prepared before the lookup vindexes existed.
            if (n % 8 === 0) await prepared.query({ ...PREPARED_INSERT, values: [t, n, `w${n}@x.org`, `n${n % 7}`] });
            else await c.query(`INSERT INTO users (tenant_id, id, email, nick) VALUES (${t}, ${n}, 'w${n}@x.org', 'n${n % 7}')`);
            live.push([t, n]);
            state.ops.insert++;
          } else if (op === 1) {
            const [t, id] = pick();
            await c.query('UPDATE users SET email = $1 WHERE tenant_id = $2 AND id = $3', [`e${n}@x.org`, t, id]);
            state.ops.email++;
          } else if (op === 2) {
            const [t, id] = pick();
            await c.query('UPDATE users SET nick = $1 WHERE tenant_id = $2 AND id = $3', [n % 3 === 0 ? null : `n${n % 5}`, t, id]);
            state.ops.nick++;
          } else {
            const i = Math.floor(Math.random() * live.length);
            const [t, id] = live[i];
            live.splice(i, 1);
            await c.query(`DELETE FROM users WHERE tenant_id = ${t} AND id = ${id}`);
            state.ops.delete++;
          }
        } catch (err) {
          state.errors.push(`${op}: ${(err as Error).message}`);
        }
      }
    } finally {
      await c.end();
    }
  })();
  return { state, stop: async () => { state.stop = true; await done; } };
}

let gw: pg.Client;
let prepared: pg.Client;

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  await putVSchema(BASE);
  gw = gwClient();
  await gw.connect();
  await until('the gateway to know the VSchema', 15_000, async () => gw.query('SELECT 1 FROM users LIMIT 1').then(() => false, (e) => e.code === '42P01'));
  for (const ddl of DDL) await gw.query(ddl);
  const rows = initialUsers();
  await gw.query(`INSERT INTO users (tenant_id, id, email, nick) VALUES ${rows.map((_, i) => `($${4 * i + 1}, $${4 * i + 2}, $${4 * i + 3}, $${4 * i + 4})`).join(', ')}`, rows.flat());
  prepared = gwClient();
  await prepared.connect();
  await prepared.query({ ...PREPARED_INSERT, values: [TENANTS[0], 999, 'w999@x.org', 'n0'] }); // planned now, without lookups
});

after(async () => {
  await gw?.end().catch(() => undefined);
  await prepared?.end().catch(() => undefined);
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

test('lookup vindexes added write_only, backfilled under writes, then externalized: exact lookup tables, reads routed by them', cluster.explained(async () => {
  const applied = Date.now();
  await putVSchema(WITH_LOOKUPS);
  await until('the gateway to keep the write-only lookups', 15_000, async () =>
    /keeps lookup vindex email \(users_email_idx\), vindex nick \(users_nick_idx\)/.test(await explain(gw, "INSERT INTO users (tenant_id, id, email, nick) VALUES (1, 1, 'a', 'b')")));
  // Write-only: reads do not route by them yet.
  assert.match(await explain(gw, "SELECT * FROM users WHERE email = 'u1@x.org'"), /^mg route: scatter to 2 shards/);

  const writer = startWriter(prepared);
  try {
    // The unique lookup's backfill finds the shared email: an error naming it (after waiting for the gateways to fold the VSchema).
    const dup = await mg('vschema', 'backfill', 'shop', 'email', '--data-dir', dataDir);
    assert.equal(dup.code, 1, dup.stdout + dup.stderr);
    const failed = await (await fetch(backfillApi('email'))).json();
    const began = failed.steps.find((s: any) => s.message.startsWith('lookup vindex email'));
    assert.ok(Date.parse(began.at) >= applied + 10_000, `the backfill began ${began.at}, 10 s after the VSchema (${new Date(applied).toISOString()})`);
    assert.deepEqual([failed.state, failed.code], ['failed', '23505']);
    assert.match(dup.stderr, /backfill shop\/email failed: duplicate key value violates unique lookup vindex email of users\.email: more than one row of users has email = "dup@x\.org" \(keyspace ids \\x[0-9a-f]{16}, \\x[0-9a-f]{16}\)/);
    await gw.query(`UPDATE users SET email = 'dup2@x.org' WHERE tenant_id = ${DUP_B} AND id = 302`);

    // Run again: it goes on where the rows are missing, and prints its progress.
    const ok = await mg('vschema', 'backfill', 'shop', 'email', '--data-dir', dataDir);
    assert.equal(ok.code, 0, ok.stdout + ok.stderr);
    assert.match(ok.stdout, new RegExp(`shard ${FIRST}: done, \\d+ rows scanned, \\d+ lookup rows inserted[\\s\\S]*shard ${SECOND}: done`));
    assert.match(ok.stdout, /done: \d+ rows of users scanned, \d+ lookup rows inserted/);
    assert.match(ok.stdout, /backfill shop\/email: done in/);

    // The same through REST, for the non-unique lookup (its table on the first shard).
    const started = await fetch(backfillApi('nick'), { method: 'POST' });
    assert.equal(started.status, 202, await started.clone().text());
    let nick: any;
    await until('the nick backfill to end', 60_000, async () => (nick = await (await fetch(backfillApi('nick'))).json()).state !== 'running');
    assert.equal(nick.state, 'succeeded', nick.error);
    assert.ok(nick.rowsScanned >= 250 && nick.rowsInserted > 0, JSON.stringify(nick));
    assert.deepEqual(nick.shards.map((s: any) => [s.shard, s.done]), [[FIRST, true], [SECOND, true]]);
  } finally {
    await writer.stop();
  }
  assert.deepEqual(writer.state.errors, []);
  for (const [op, n] of Object.entries(writer.state.ops)) assert.ok(n > 5, `the writer did ${n} ${op}s during the backfills`);
  const users = await assertLookupsExact();
  assert.ok(users.some((u) => Number(u.id) >= 1000 && Number(u.id) % 8 === 0), 'rows of the statement prepared before the vindexes are there');

  // Run again when nothing is missing: it inserts nothing.
  assert.equal((await fetch(backfillApi('email'), { method: 'POST' })).status, 202);
  let again: any;
  await until('the second email backfill to end', 60_000, async () => (again = await (await fetch(backfillApi('email'))).json()).state !== 'running');
  assert.deepEqual([again.state, again.rowsInserted], ['succeeded', 0]);
  assert.equal(again.rowsScanned, users.length);
  // Not a lookup vindex, or an unknown database: 404 naming it.
  const bad = await fetch(`http://127.0.0.1:${spec.materializer.port}/v1/databases/shop/vindexes/hash/backfill`, { method: 'POST' });
  assert.equal(bad.status, 404);
  assert.match((await bad.json()).error, /has no lookup vindex hash/);

  // Externalized: reads by the lookup columns go to the shards their rows are on.
  assert.match(await mgOk('vschema', 'externalize', 'shop', 'email'), /vschema of shop: version 3 published/);
  assert.match(await mgOk('vschema', 'externalize', 'shop', 'nick'), /vschema of shop: version 4 published/);
  assert.match(await mgOk('vschema', 'externalize', 'shop', 'nick'), /is not write_only: reads route by it already/);
  assert.doesNotMatch(await mgOk('vschema', 'show', 'shop'), /write_only/);
  await until('reads to route by the email lookup', 15_000, async () => /by lookup vindex email/.test(await explain(gw, "SELECT * FROM users WHERE email = 'x'")));
  await until('reads to route by the nick lookup', 15_000, async () => /by lookup vindex nick/.test(await explain(gw, "SELECT * FROM users WHERE nick = 'x'")));
  const sample = users.filter((u) => u.email !== null).filter((_, i) => i % 25 === 0);
  for (const u of sample) {
    const { rows } = await gw.query('SELECT tenant_id::text, id::text FROM users WHERE email = $1', [u.email]);
    assert.deepEqual(rows, [{ tenant_id: u.tenant_id, id: u.id }], `the user with ${u.email}`);
    assert.equal((await gw.query('SHOW mg_plan')).rows[0].mg_plan,
      `single shard ${shardOfTenant(u.tenant_id)} by lookup vindex email (consistent_lookup_unique) on users.email via lookup table users_email_idx`);
  }
  const byNick = await gw.query("SELECT tenant_id::text, id::text FROM users WHERE nick = 'n3'");
  const ids = (rows: Array<{ tenant_id: string; id: string }>) => rows.map((u) => `${u.tenant_id}/${u.id}`).sort();
  assert.deepEqual(ids(byNick.rows), ids(users.filter((u) => u.nick === 'n3')));
  assert.match((await gw.query('SHOW mg_plan')).rows[0].mg_plan, /by lookup vindex nick \(lookup\)/);
  assert.deepEqual(await onEachShard('SELECT gid FROM pg_prepared_xacts'), { [FIRST]: [], [SECOND]: [] });
}));
