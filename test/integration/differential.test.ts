/**
 * Differential test: the same SQL sessions run directly against Postgres and
 * through the gateway (+ pooler) must give exactly the same results: rows as
 * text, column names and types, command tags, errors (SQLSTATE and message),
 * notices and notifications. Each target works in its own schema, set with SET
 * (so transaction pooling must carry it between transactions). The gateway
 * runs as two worker processes here, so the same holds across its workers.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { encodeCancel } from '../../router/protocol/messages.ts';
import type { PlannedInstance } from '../../compose/spec.ts';
import { sleep, testCluster } from '../support/cluster.ts';

// One instance: every comparison is with the primary (no replica, no cell but one; suite time, like gateway-fidelity.test.ts).
const cluster = testCluster('diff', 2, {
  settings: { 'gateway.workers': 2 },
  spec: { cells: ['zone1'], databases: [{ name: 'postgres', instancesPerShard: 1, durability: 'ANY_1' }] },
});
let primary: PlannedInstance; // MultiOrch elects it during `up`

before(async () => {
  const up = await cluster.mg('cluster', 'up', ...cluster.flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  ({ primary } = await cluster.roles());
});
after(async () => {
  await cluster.mg('cluster', 'down', '--clean', ...cluster.flags);
  fs.rmSync(cluster.dataDir, { recursive: true, force: true });
});

const raw = { getTypeParser: () => (v: string) => v } as unknown as typeof pg.types;
const direct = () => new pg.Client({ host: '127.0.0.1', port: primary.port, user: 'postgres', database: 'postgres', types: raw });
const viaGateway = () => new pg.Client({ host: '127.0.0.1', port: cluster.spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres', types: raw });

type Step = string | { text: string; values?: unknown[]; name?: string };

/** Runs the steps in one session and records everything a client can observe. */
async function record(client: pg.Client, schema: string, steps: Step[]): Promise<unknown[]> {
  const seen: unknown[] = [];
  await client.connect();
  try {
    await client.query(`SET client_min_messages = warning; DROP SCHEMA IF EXISTS ${schema} CASCADE; RESET client_min_messages`);
    await client.query(`CREATE SCHEMA ${schema}`);
    await client.query(`SET search_path TO ${schema}`);
    client.on('notice', (n) => seen.push({ notice: n.message?.replaceAll(schema, '<schema>'), code: n.code }));
    client.on('notification', (n) => seen.push({ notification: n.channel, payload: n.payload }));
    for (const step of steps) {
      const q = typeof step === 'string' ? { text: step } : step;
      try {
        const res = await client.query({ ...q, rowMode: 'array' } as pg.QueryConfig);
        const results = Array.isArray(res) ? res : [res];
        seen.push(results.map((r: pg.QueryResult) => ({
          command: r.command, rowCount: r.rowCount, fields: r.fields.map((f) => [f.name, f.dataTypeID]), rows: r.rows,
        })));
      } catch (err) {
        const e = err as pg.DatabaseError;
        seen.push({ error: e.code, message: e.message.replaceAll(schema, '<schema>') });
      }
      await new Promise((r) => setImmediate(r));
    }
    await new Promise((r) => setTimeout(r, 200)); // late notifications
    await client.query(`DROP SCHEMA ${schema} CASCADE`);
  } finally {
    await client.end();
  }
  return seen;
}

async function same(name: string, steps: Step[]) {
  const a = await record(direct(), `diff_direct_${name}`, steps);
  const b = await record(viaGateway(), `diff_gw_${name}`, steps);
  assert.deepEqual(b, a);
}

test('types come back byte for byte', () => same('types', [
  `SELECT 1::int2, 2::int4, 9223372036854775807::int8, 1.5::float4, 2.25::float8, 12345678901234567890.123456789::numeric`,
  `SELECT 'text'::text, 'ü'::varchar(3), true, false, NULL::int, '\\xdeadbeef'::bytea, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid`,
  `SELECT '{"a": [1, 2]}'::json, '{"b": {"c": null}}'::jsonb, ARRAY[1, 2, NULL], ARRAY['x', 'y z'], '{{1,2},{3,4}}'::int[]`,
  `SELECT '2024-02-29'::date, '23:59:59.999999'::time, '2024-02-29 12:00:00'::timestamp, '2024-02-29 12:00:00+02'::timestamptz AT TIME ZONE 'UTC', '1 day 02:03:04'::interval`,
  `SELECT 'NaN'::float8, 'Infinity'::float8, '-0'::float8, 1e-300::float8, '(1,2)'::point, '[1,5)'::int4range, 'a & b'::tsquery`,
  { text: 'SELECT $1::int + $2::int AS sum, $3::text AS t, $4::bool AS b', values: [40, 2, 'param', true] },
]));

test('errors keep their SQLSTATE and message, and the session goes on', () => same('errors', [
  'SELECT 1/0', 'SELEC 1', 'SELECT * FROM nosuchtable', 'SELECT nosuchcolumn FROM pg_class',
  `SELECT 'abc'::int`, 'CREATE TABLE t (id int PRIMARY KEY)', 'INSERT INTO t VALUES (1)', 'INSERT INTO t VALUES (1)',
  `DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$`, `DO $$ BEGIN RAISE EXCEPTION 'custom' USING ERRCODE = 'P0042'; END $$`,
  { text: 'SELECT $1::int', values: ['not a number'] }, 'SELECT 1',
]));

test('transactions: commit, rollback, savepoints, errors inside', () => same('tx', [
  'CREATE TABLE acct (id int PRIMARY KEY, bal int)', 'BEGIN', 'INSERT INTO acct VALUES (1, 100), (2, 50)', 'COMMIT',
  'BEGIN', 'UPDATE acct SET bal = bal - 10 WHERE id = 1', 'SAVEPOINT s1', 'UPDATE acct SET bal = 0', 'ROLLBACK TO s1',
  'SELECT * FROM acct ORDER BY id', 'SELECT 1/0', 'SELECT 1', 'ROLLBACK', 'SELECT * FROM acct ORDER BY id',
  'BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY', `SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')`,
  'INSERT INTO acct VALUES (3, 0)', 'ROLLBACK',
  'INSERT INTO acct VALUES (3, 1); UPDATE acct SET bal = bal + 1 RETURNING id, bal; SELECT count(*) FROM acct',
]));

test('session settings and prepared statements survive transaction pooling', () => same('session', [
  `SET TimeZone = 'Asia/Kathmandu'`, `SELECT current_setting('TimeZone'), '2024-01-01 00:00:00+00'::timestamptz::text`,
  `SET statement_timeout = '3s'`, `SELECT current_setting('statement_timeout')`,
  `SELECT set_config('application_name', 'diff-app', false)`, `SELECT current_setting('application_name')`,
  { name: 'by_id', text: 'SELECT $1::int * 2 AS doubled', values: [21] },
  { name: 'by_id', text: 'SELECT $1::int * 2 AS doubled', values: [50] },
  'BEGIN', `SET LOCAL TimeZone = 'UTC'`, `SELECT current_setting('TimeZone')`, 'COMMIT', `SELECT current_setting('TimeZone')`,
  'BEGIN', `SET DateStyle = 'German'`, 'ROLLBACK', `SELECT current_setting('DateStyle')`,
  'RESET TimeZone', `SELECT current_setting('TimeZone') = current_setting('TimeZone')`,
  `PREPARE sqlprep (int) AS SELECT $1 + 1`, 'EXECUTE sqlprep(41)', 'DEALLOCATE sqlprep',
]));

test('temp tables, cursors, COPY and notifications', () => same('features', [
  'CREATE TEMP TABLE tmp (a int, b text)', `INSERT INTO tmp SELECT g, 'row ' || g FROM generate_series(1, 5) g`,
  'SELECT count(*), min(b), max(b) FROM tmp',
  'BEGIN', 'DECLARE c CURSOR FOR SELECT a FROM tmp ORDER BY a', 'FETCH 2 FROM c', 'FETCH 2 FROM c', 'CLOSE c', 'COMMIT',
  'DECLARE h CURSOR WITH HOLD FOR SELECT a FROM tmp ORDER BY a DESC', 'FETCH 3 FROM h', 'CLOSE h',
  'CREATE TABLE copied (a int, b text)', `COPY (SELECT a, b FROM tmp) TO STDOUT`,
  'LISTEN diff_channel', `NOTIFY diff_channel, 'payload one'`, `SELECT pg_notify('diff_channel', 'payload two')`, 'UNLISTEN diff_channel',
  'DROP TABLE tmp', 'SELECT count(*) FROM pg_class WHERE relname = \'tmp\' AND relpersistence = \'t\'',
]));

test('a two-worker gateway: cancels reach the query whichever worker the cancel lands on; metrics are summed', cluster.explained(async () => {
  const clients = Array.from({ length: 4 }, viaGateway);
  await Promise.all(clients.map((c) => c.connect()));
  try {
    for (const c of clients) {
      const slow = c.query('SELECT pg_sleep(20)');
      await sleep(200);
      const { processID, secretKey } = c as unknown as { processID: number; secretKey: number };
      const s = net.connect({ host: '127.0.0.1', port: cluster.spec.gateway.port }, () => s.end(encodeCancel(processID, secretKey)));
      s.on('error', () => undefined);
      await assert.rejects(slow, (e: any) => e.code === '57014');
    }
    const text = await (await fetch(`http://127.0.0.1:${cluster.spec.gateway.metricsPort}/metrics`)).text();
    assert.match(text, /^mg_gateway_clients 4$/m);
  } finally {
    await Promise.all(clients.map((c) => c.end()));
  }
}));
