// MultiPooler against a real Postgres 15 started here, with real clients (pg, postgres.js,
// psql, pgbench) and raw protocol bytes. The pool has 2 server connections, so clients
// constantly share them: everything below is about what a client must (and must not) see.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { promisify } from 'node:util';
import pg from 'pg';
import { parse as parseProtocol, serialize } from 'pg-protocol';
import postgres from 'postgres';
import { createLogger } from '../../common/log.ts';
import { PostgresInstance } from '../../ingest/postgres/instance.ts';
import { startPooler, type PoolerHandle } from '../../router/pooler/pooler.ts';
import { freePort, sleep, until } from '../support/wait.ts';
import { nodeArgs } from '../../compose/launch.ts';
import { encodeCancel } from '../../router/protocol/messages.ts';

process.env.MG_LOG_LEVEL ??= 'warn';
const log = createLogger('pooler-test');
const run = promisify(execFile);
const BIN = '/usr/lib/postgresql/15/bin';

let dir: string;
let pgInst: PostgresInstance;
let pooler: PoolerHandle;
let configFile: string;
let defaultTz: string;
const open: Array<{ end(): Promise<unknown> }> = [];


/** A node-postgres client through the pooler. */
async function client(opts: Partial<pg.ClientConfig> = {}): Promise<pg.Client> {
  const c = new pg.Client({ host: '127.0.0.1', port: pooler.port, user: 'postgres', database: 'postgres', ...opts });
  c.on('error', () => undefined);
  await c.connect();
  open.push(c);
  return c;
}

/** Straight to Postgres, to look at what the pooler did. */
async function direct<R extends pg.QueryResultRow = pg.QueryResultRow>(sql: string, values: unknown[] = []): Promise<R[]> {
  const c = new pg.Client({ host: '127.0.0.1', port: pgInst.port, user: 'postgres', database: 'postgres' });
  await c.connect();
  try {
    return (await c.query<R>(sql, values)).rows;
  } finally {
    await c.end();
  }
}

function js(opts: postgres.Options<Record<string, postgres.PostgresType>> = {}) {
  const sql = postgres({ host: '127.0.0.1', port: pooler.port, user: 'postgres', database: 'postgres', max: 1, onnotice: () => undefined, ...opts });
  open.push({ end: () => sql.end({ timeout: 1 }) });
  return sql;
}

async function one<T = unknown>(c: pg.Client, sql: string, values?: unknown[]): Promise<T> {
  const r = await c.query(sql, values);
  return Object.values(r.rows[0] as object)[0] as T;
}

async function admin(sql: string): Promise<Array<Record<string, unknown>>> {
  const c = new pg.Client({ host: '127.0.0.1', port: pooler.port, user: 'postgres', database: 'pgbouncer' });
  await c.connect();
  try {
    return (await c.query(sql)).rows;
  } finally {
    await c.end();
  }
}

/**
 * Runs `fn` on `c` while the server connection `c` last used is held by someone else,
 * so `fn` is sure to run on the other one (the pool has two).
 */
async function onOtherServer<T>(c: pg.Client, fn: () => Promise<T>): Promise<{ result: T; before: number; after: number }> {
  const before = await one<number>(c, 'SELECT pg_backend_pid()');
  const h1 = await client();
  const h2 = await client();
  await h1.query('BEGIN');
  await h2.query('BEGIN');
  const p1 = await one<number>(h1, 'SELECT pg_backend_pid()');
  const [keep, free] = p1 === before ? [h1, h2] : [h2, h1];
  await free.query('COMMIT');
  const result = await fn();
  const after = await one<number>(c, 'SELECT pg_backend_pid()').catch(() => -1);
  await keep.query('COMMIT');
  await h1.end();
  await h2.end();
  return { result, before, after };
}

/** A raw protocol conversation, for what client libraries never send. */
class Raw {
  readonly msgs: Array<{ name: string; [k: string]: unknown }> = [];
  private wake: (() => void) | null = null;
  closed = false;

  private constructor(readonly socket: net.Socket) {
    void parseProtocol(socket, (m) => {
      this.msgs.push(m as unknown as { name: string });
      this.wake?.();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake?.();
    });
    socket.on('error', () => undefined);
  }

  static async connect(params: Record<string, string> = {}): Promise<Raw> {
    const socket = net.connect({ host: '127.0.0.1', port: pooler.port });
    await new Promise((r) => socket.once('connect', r));
    const raw = new Raw(socket);
    socket.write(serialize.startup({ user: 'postgres', database: 'postgres', ...params }));
    await raw.until('readyForQuery');
    return raw;
  }

  send(...bufs: Buffer[]): void {
    this.socket.write(Buffer.concat(bufs));
  }

  /** Messages up to and including the next `name` (or the connection closing). */
  async until(name: string, timeoutMs = 5000): Promise<Array<{ name: string; [k: string]: unknown }>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.msgs.findIndex((m) => m.name === name);
      if (i >= 0) return this.msgs.splice(0, i + 1);
      if (this.closed) return this.msgs.splice(0);
      if (Date.now() > deadline) throw new Error(`no ${name}; got ${this.msgs.map((m) => m.name).join(',')}`);
      await new Promise<void>((r) => {
        this.wake = r;
        setTimeout(r, 50);
      });
    }
  }

  end(): void {
    this.socket.destroy();
  }
}

const errors = (ms: Array<{ name: string; [k: string]: unknown }>) => ms.filter((m) => m.name === 'error').map((m) => m.code as string);

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-pooler-'));
  fs.chmodSync(dir, 0o755);
  pgInst = new PostgresInstance({ name: 'pooler-pg', dataDir: path.join(dir, 'data'), port: await freePort(), log });
  await pgInst.initPrimary();
  await pgInst.start();
  configFile = path.join(dir, 'pooler.json');
  const config = {
    instanceId: 'pooler-test', listenPort: 0, postgres: { host: '127.0.0.1', port: pgInst.port },
    poolSize: 2, queueTimeoutMs: 2000, metricsPort: 0, maxPreparedStatements: 50,
  };
  fs.writeFileSync(configFile, JSON.stringify(config));
  pooler = await startPooler(config, log, { configPath: configFile });
  await direct(`
    CREATE SCHEMA a1; CREATE TABLE a1.marker (v text); INSERT INTO a1.marker VALUES ('a1');
    CREATE SCHEMA a2; CREATE TABLE a2.marker (v int, w int); INSERT INTO a2.marker VALUES (2, 22);
    CREATE TABLE items (id serial primary key, client int, n int);
    CREATE TABLE copy_t (a int, b text);
  `);
  defaultTz = (await direct<{ tz: string }>(`SELECT current_setting('TimeZone') AS tz`))[0].tz;
  for (let i = 0; i < 8; i++) await direct(`CREATE SCHEMA iso${i}; CREATE TABLE iso${i}.who (v int); INSERT INTO iso${i}.who VALUES (${i})`);
});

after(async () => {
  await Promise.allSettled(open.map((c) => c.end()));
  await pooler?.close();
  await pgInst?.stop('immediate').catch(() => undefined);
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

test('a pool of 2 server connections serves 12 concurrent clients', async () => {
  const clients = await Promise.all(Array.from({ length: 12 }, () => client()));
  await Promise.all(clients.map(async (c, i) => {
    for (let j = 0; j < 15; j++) {
      await c.query('BEGIN');
      await c.query('INSERT INTO items (client, n) VALUES ($1, $2)', [i, j]);
      await c.query('COMMIT');
    }
  }));
  assert.equal(Number((await direct('SELECT count(*) AS n FROM items'))[0].n), 180);
  const backends = await direct(`SELECT count(*) AS n FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()`);
  assert.ok(Number(backends[0].n) <= 2, `at most 2 server connections, saw ${backends[0].n}`);
  await Promise.all(clients.map((c) => c.end()));
});

test('startup parameters and options are the session settings on every server connection', async () => {
  const a = await client({ application_name: 'app-a', options: '-c search_path=a1 -c statement_timeout=4321 --lock-timeout=1234' });
  const b = await client({ application_name: 'app-b', options: '-c search_path=a2 -c TimeZone=Asia/Tokyo' });
  // ParameterStatus at startup, as Postgres reports it.
  const sql = js({ connection: { application_name: 'app-js', TimeZone: 'America/New_York' } });
  await sql`select 1`;
  assert.equal(sql.parameters.application_name, 'app-js');
  assert.equal(sql.parameters.TimeZone, 'America/New_York');
  assert.match(String(sql.parameters.server_version), /^15/);
  for (const k of ['client_encoding', 'DateStyle', 'integer_datetimes', 'standard_conforming_strings', 'is_superuser', 'session_authorization', 'IntervalStyle', 'server_encoding']) {
    assert.ok(k in sql.parameters, `ParameterStatus ${k}`);
  }
  const check = async () => {
    const ra = (await a.query(`SELECT v::text, current_setting('statement_timeout') st, current_setting('lock_timeout') lt,
      current_setting('application_name') app, current_setting('TimeZone') tz FROM marker`)).rows[0];
    assert.deepEqual(ra, { v: 'a1', st: '4321ms', lt: '1234ms', app: 'app-a', tz: defaultTz });
    const rb = (await b.query(`SELECT v::text, current_setting('statement_timeout') st, current_setting('application_name') app,
      current_setting('TimeZone') tz FROM marker`)).rows[0];
    assert.deepEqual(rb, { v: '2', st: '0', app: 'app-b', tz: 'Asia/Tokyo' });
    const [rj] = await sql`select current_setting('application_name') app, current_setting('TimeZone') tz, current_setting('search_path') sp`;
    assert.deepEqual({ ...rj }, { app: 'app-js', tz: 'America/New_York', sp: '"$user", public' });
  };
  for (let i = 0; i < 5; i++) await Promise.all([check(), check()]);
  const moved = await onOtherServer(a, check);
  assert.notEqual(moved.before, moved.after);
  // A bad startup setting fails the connection with Postgres's own error.
  const bad = new pg.Client({ host: '127.0.0.1', port: pooler.port, user: 'postgres', database: 'postgres', options: '-c statement_timeout=soon' });
  bad.on('error', () => undefined);
  await assert.rejects(bad.connect(), { code: '22023' });
  const nodb = new pg.Client({ host: '127.0.0.1', port: pooler.port, user: 'postgres', database: 'no_such_db' });
  nodb.on('error', () => undefined);
  await assert.rejects(nodb.connect(), { code: '3D000' });
});

test('SET, RESET and set_config are replayed on the next server connection; rolled-back ones are not kept', async () => {
  const a = await client({ options: '-c search_path=a1' });
  await a.query(`SET search_path TO a2`);
  await a.query(`SET TIME ZONE 'Asia/Kolkata'`);
  await a.query(`SELECT set_config('app.user_id', '42', false)`);
  await a.query(`SELECT set_config('app.dyn', (SELECT 'v' || 7), false)`);
  const state = `SELECT current_setting('search_path') sp, current_setting('TimeZone') tz,
    current_setting('app.user_id', true) uid, current_setting('app.dyn', true) dyn`;
  const expect = { sp: 'a2', tz: 'Asia/Kolkata', uid: '42', dyn: 'v7' };
  const moved = await onOtherServer(a, async () => (await a.query(state)).rows[0]);
  assert.notEqual(moved.before, moved.after, 'ran on the other server connection');
  assert.deepEqual(moved.result, expect);

  await a.query('BEGIN');
  await a.query(`SET search_path TO a1`);
  await a.query(`SET LOCAL TimeZone = 'UTC'`);
  await a.query('ROLLBACK');
  await assert.rejects(a.query(`SET TIME ZONE 'UTC'; SELECT 1/0`), { code: '22012' });
  await a.query(`BEGIN; SAVEPOINT s1; SET app.user_id = '7'; ROLLBACK TO SAVEPOINT s1; SET LOCAL search_path TO a1; COMMIT`);
  await a.query('BEGIN');
  await a.query(`SELECT set_config('app.user_id', '8', true)`);
  await a.query('COMMIT');
  assert.deepEqual((await onOtherServer(a, async () => (await a.query(state)).rows[0])).result, expect);

  await a.query('BEGIN');
  await a.query(`SET app.user_id = '9'`);
  await a.query('COMMIT');
  assert.equal((await onOtherServer(a, () => one(a, `SELECT current_setting('app.user_id')`))).result, '9');
  // RESET goes back to the session's startup value, not the server connection's.
  await a.query('RESET search_path');
  assert.equal((await onOtherServer(a, () => one(a, `SELECT current_setting('search_path')`))).result, 'a1');
  await a.query('RESET ALL');
  assert.deepEqual((await onOtherServer(a, async () => (await a.query(`SELECT current_setting('search_path') sp, current_setting('TimeZone') tz`)).rows[0])).result,
    { sp: 'a1', tz: defaultTz });
});

test('protocol-level prepared statements: same names, different SQL, two clients, across pooled transactions', async () => {
  const a = await client({ options: '-c search_path=a1' });
  const b = await client({ options: '-c search_path=a2' });
  const sa = js();
  const sb = js();
  for (let i = 0; i < 20; i++) {
    const [ra, rb, rc, rd] = await Promise.all([
      a.query({ name: 'q', text: 'SELECT $1::int + 1 AS v', values: [i] }),
      b.query({ name: 'q', text: `SELECT $1::text || '!' AS v`, values: [String(i)] }),
      // Same text under two search_paths: different result types, never one plan.
      a.query({ name: 'm', text: 'SELECT * FROM marker' }),
      b.query({ name: 'm', text: 'SELECT * FROM marker' }),
    ]);
    assert.equal(ra.rows[0].v, i + 1);
    assert.equal(rb.rows[0].v, `${i}!`);
    assert.deepEqual(rc.rows, [{ v: 'a1' }]);
    assert.deepEqual(rd.rows, [{ v: 2, w: 22 }]);
    const [x] = await sa`select ${i}::int * 2 as v`;
    const [y] = await sb`select ${String(i)}::text as v, 'b' as w`;
    assert.equal(x.v, i * 2);
    assert.deepEqual({ ...y }, { v: String(i), w: 'b' });
  }
  const moved = await onOtherServer(a, () => a.query({ name: 'q', text: 'SELECT $1::int + 1 AS v', values: [100] }));
  assert.equal(moved.result.rows[0].v, 101);
  // More statements than a server connection keeps (maxPreparedStatements 50): evicted ones come back on use.
  for (let k = 0; k < 80; k++) assert.equal((await a.query({ name: `many${k}`, text: `SELECT ${k} AS v` })).rows[0].v, k);
  for (let k = 0; k < 80; k += 7) assert.equal((await a.query({ name: `many${k}`, text: `SELECT ${k} AS v` })).rows[0].v, k);
  const perServer = await direct<{ n: number }>(`SELECT count(*)::int AS n FROM pg_prepared_statements`);
  assert.ok(perServer[0].n === 0, 'pg_prepared_statements is per backend; the direct one has none');
  const kept = (await admin('SHOW SERVERS')).map((r) => Number(r.prepared_statements));
  assert.ok(kept.every((n) => n <= 51), `prepared per server: ${kept}`);
});

test('a statement prepared again after its table changed type is planned afresh, as on a fresh connection', async () => {
  const ddl = await client();
  await ddl.query('DROP TABLE IF EXISTS flip; CREATE TABLE flip (v int); INSERT INTO flip VALUES (1)');
  // Both server connections plan the statement against v int (postgres.js prepares too).
  const b = await client();
  const sql = 'SELECT v FROM flip';
  assert.deepEqual((await b.query({ name: 'before', text: sql })).rows, [{ v: 1 }]);
  await onOtherServer(b, () => b.query({ name: 'before2', text: sql }));
  const pjs = js();
  assert.deepEqual([...(await pjs.unsafe(sql, [], { prepare: true }))], [{ v: 1 }]);
  // The table is dropped and re-created with another column type, through the pooler.
  await ddl.query(`DROP TABLE flip; CREATE TABLE flip (v text); INSERT INTO flip VALUES ('one')`);
  // Another client prepares the same text: it must not get the old plan (0A000 "cached plan must not change result type").
  const c = await client();
  assert.deepEqual((await c.query({ name: 'after', text: sql })).rows, [{ v: 'one' }]);
  const onOther = await onOtherServer(c, () => c.query({ name: 'after2', text: sql }));
  assert.deepEqual(onOther.result.rows, [{ v: 'one' }]);
  // The same client prepares it again under a new name: planned afresh too.
  assert.deepEqual((await b.query({ name: 'again', text: sql })).rows, [{ v: 'one' }]);
  // postgres.js on a new connection.
  const pjs2 = js();
  assert.deepEqual([...(await pjs2.unsafe(sql, [], { prepare: true }))], [{ v: 'one' }]);
  await ddl.query('DROP TABLE flip');
});

test('a failed Parse leaves the name free, and errors are the normal ones', async () => {
  const r = await Raw.connect();
  r.send(serialize.parse({ name: 'p1', text: 'SELEC 1' }), serialize.sync());
  assert.deepEqual(errors(await r.until('readyForQuery')), ['42601']);
  r.send(serialize.bind({ statement: 'p1' }), serialize.execute({}), serialize.sync());
  assert.deepEqual(errors(await r.until('readyForQuery')), ['26000']);
  r.send(serialize.parse({ name: 'p1', text: 'SELECT 41 + 1' }), serialize.bind({ statement: 'p1' }), serialize.execute({}), serialize.sync());
  let ms = await r.until('readyForQuery');
  assert.deepEqual(errors(ms), []);
  assert.deepEqual(ms.find((m) => m.name === 'dataRow')?.fields, ['42']);
  r.send(serialize.parse({ name: 'p1', text: 'SELECT 2' }), serialize.sync());
  assert.deepEqual(errors(await r.until('readyForQuery')), ['42P05']);
  // In a transaction the error aborts it, as Postgres's own would.
  r.send(serialize.query('BEGIN'));
  await r.until('readyForQuery');
  r.send(serialize.bind({ statement: 'nope' }), serialize.sync());
  ms = await r.until('readyForQuery');
  assert.deepEqual(errors(ms), ['26000']);
  assert.equal(ms.at(-1)?.status, 'E');
  r.send(serialize.query('ROLLBACK'));
  await r.until('readyForQuery');
  // A pipeline with a failing Parse in the middle: what came before stands, the rest is skipped.
  r.send(
    serialize.parse({ name: 'p2', text: 'SELECT 2' }), serialize.parse({ name: 'p3', text: 'SELECT FROM WHERE' }),
    serialize.parse({ name: 'p4', text: 'SELECT 4' }), serialize.sync(),
    serialize.bind({ statement: 'p2' }), serialize.execute({}), serialize.bind({ statement: 'p4' }), serialize.sync(),
  );
  assert.deepEqual(errors(await r.until('readyForQuery')), ['42601']);
  ms = await r.until('readyForQuery');
  assert.deepEqual(errors(ms), ['26000']);
  assert.deepEqual(ms.find((m) => m.name === 'dataRow')?.fields, ['2']);
  // The unnamed statement lives until the next unnamed Parse or simple Query, also across pooled transactions.
  r.send(serialize.parse({ text: 'SELECT 11' }), serialize.sync());
  await r.until('readyForQuery');
  const other = await client();
  await other.query({ text: 'SELECT $1::text AS x', values: ['other'] }); // another unnamed statement, maybe on the same server
  r.send(serialize.bind({}), serialize.execute({}), serialize.sync());
  ms = await r.until('readyForQuery');
  assert.deepEqual(ms.find((m) => m.name === 'dataRow')?.fields, ['11']);
  r.send(serialize.query('SELECT 12'), serialize.bind({}), serialize.execute({}), serialize.sync());
  await r.until('readyForQuery');
  assert.deepEqual(errors(await r.until('readyForQuery')), ['26000']);
  await other.end();
  // Close forgets the client's name only.
  r.send(serialize.close({ type: 'S', name: 'p2' }), serialize.bind({ statement: 'p2' }), serialize.sync());
  ms = await r.until('readyForQuery');
  assert.ok(ms.some((m) => m.name === 'closeComplete'));
  assert.deepEqual(errors(ms), ['26000']);
  r.end();
});

test('temp tables pin the client, and are gone once it leaves', async () => {
  const a = await client();
  const b = await client();
  await a.query('CREATE TEMP TABLE tt (x int)');
  await a.query('INSERT INTO tt VALUES (1), (2)');
  const others = await Promise.all(Array.from({ length: 3 }, () => client()));
  for (let i = 0; i < 5; i++) {
    await Promise.all(others.map((o) => o.query('SELECT 1')));
    assert.equal(await one(a, 'SELECT count(*)::int FROM tt'), 2);
    assert.equal(await one(b, `SELECT to_regclass('pg_temp.tt')::text`), null);
  }
  assert.ok((await admin('SHOW CLIENTS')).some((c) => c.pinned === 'temp'));
  await a.end();
  await until('temp table dropped', 3000, async () =>
    Number((await direct(`SELECT count(*) AS n FROM pg_class WHERE relname = 'tt' AND relpersistence = 't'`))[0].n) === 0);
  await b.query('CREATE TEMP TABLE tt (x int)');
  assert.equal(await one(b, 'SELECT count(*)::int FROM tt'), 0);
  await Promise.all([b.end(), ...others.map((o) => o.end())]);
});

test('session advisory locks pin the client and are released when it leaves', async () => {
  const a = await client();
  const b = await client();
  assert.equal(await one(a, 'SELECT pg_advisory_lock(4242)::text'), '');
  assert.equal(await one(b, 'SELECT pg_try_advisory_lock(4242)'), false);
  await Promise.all(Array.from({ length: 4 }, () => b.query('SELECT 1')));
  await a.end();
  await until('lock released', 3000, async () =>
    Number((await direct(`SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'`))[0].n) === 0);
  assert.equal(await one(b, 'SELECT pg_try_advisory_lock(4242)'), true);
  assert.equal(await one(b, 'SELECT pg_advisory_unlock(4242)'), true);
  await b.end();
  // Transaction-level locks do not pin.
  const c = await client();
  await c.query('BEGIN');
  await c.query('SELECT pg_advisory_xact_lock(1)');
  await c.query('COMMIT');
  assert.ok((await admin('SHOW CLIENTS')).every((r) => r.pinned === ''));
  await c.end();
});

test('LISTEN/NOTIFY through pooling: a shared listener fans notifications out', async () => {
  const a = await client();
  const b = await client();
  const got: Array<{ channel: string; payload?: string }> = [];
  a.on('notification', (n) => got.push({ channel: n.channel, payload: n.payload }));
  await a.query('LISTEN chan_a');
  await a.query('LISTEN "Chan B"');
  // a holds no server connection between statements: others can use both.
  const holders = await Promise.all([client(), client()]);
  await Promise.all(holders.map((h) => h.query('BEGIN')));
  const notify = b.query(`NOTIFY chan_a, 'hello'`); // waits for a server connection
  await sleep(100);
  await Promise.all(holders.map((h) => h.query('COMMIT')));
  await notify;
  await b.query(`NOTIFY "Chan B", 'second'`);
  await b.query(`SELECT pg_notify('chan_a', 'third')`);
  await until('notifications', 3000, async () => got.length >= 3);
  assert.deepEqual(got, [{ channel: 'chan_a', payload: 'hello' }, { channel: 'Chan B', payload: 'second' }, { channel: 'chan_a', payload: 'third' }]);
  await a.query('UNLISTEN chan_a');
  await b.query(`NOTIFY chan_a, 'not for a'`);
  await b.query(`NOTIFY "Chan B", 'still for a'`);
  await until('fourth', 3000, async () => got.length >= 4);
  await sleep(100);
  assert.deepEqual(got.slice(3), [{ channel: 'Chan B', payload: 'still for a' }]);
  // postgres.js (extended protocol) too.
  const sql = js();
  const jsGot: string[] = [];
  await sql.listen('chan_js', (p) => jsGot.push(p));
  await b.query(`NOTIFY chan_js, 'js'`);
  await until('postgres.js notification', 3000, async () => jsGot.length === 1);
  await Promise.all([a.end(), b.end(), ...holders.map((h) => h.end())]);
});

test('COPY in and out round-trip', async () => {
  const sql = js();
  const rows = Array.from({ length: 2000 }, (_, i) => `${i}\tvalue ${i} with\\ttab\n`).join('');
  const w = await sql`copy copy_t (a, b) from stdin`.writable();
  await pipeline(async function* () {
    for (let i = 0; i < rows.length; i += 7000) yield rows.slice(i, i + 7000);
  }, w);
  const chunks: Buffer[] = [];
  const r = await sql`copy (select * from copy_t order by a) to stdout`.readable();
  await pipeline(r, new Writable({ write(c, _e, cb) { chunks.push(c); cb(); } }));
  assert.equal(Buffer.concat(chunks).toString(), rows);
  // pg cannot stream COPY: it answers CopyInResponse with CopyFail, and the session goes on.
  const c = await client();
  await assert.rejects(c.query('COPY copy_t FROM STDIN'));
  assert.equal(await one(c, 'SELECT 9'), 9);
  await c.end();
  // psql's \copy goes through the pooler too.
  const file = path.join(dir, 'copy.tsv');
  await run(`${BIN}/psql`, ['-h', '127.0.0.1', '-p', String(pooler.port), '-U', 'postgres', '-X', '-q', '-c', `\\copy copy_t to '${file}'`, 'postgres']);
  assert.equal(fs.readFileSync(file, 'utf8'), rows);
});

test('cancel reaches the backend the client is on: pg_sleep gets 57014', async () => {
  const sql = js();
  const q = sql`select pg_sleep(10)`;
  setTimeout(() => q.cancel(), 300);
  const t0 = Date.now();
  await assert.rejects(q, { code: '57014' });
  assert.ok(Date.now() - t0 < 5000);
  assert.deepEqual([...await sql`select 1 as x`], [{ x: 1 }]);
});

/** A TCP proxy to `port` that holds each CancelRequest `delayMs` before passing it on: a cancel slow to reach Postgres. */
async function delayingCancels(port: number, delayMs: number): Promise<{ port: number; close(): void }> {
  // Half-open kept: the cancel's sender ends its side at once, and must see the connection close only when Postgres closes it.
  const server = net.createServer({ allowHalfOpen: true }, (down) => {
    down.once('data', (first) => {
      const cancel = first.length >= 8 && first.readInt32BE(4) === 80877102;
      setTimeout(() => {
        const up = net.connect({ host: '127.0.0.1', port }, () => {
          up.write(first);
          down.pipe(up).pipe(down);
        });
        for (const [a, b] of [[up, down], [down, up]]) {
          a.on('error', () => b.destroy());
          a.on('close', () => b.destroy());
        }
      }, cancel ? delayMs : 0);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { port: (server.address() as net.AddressInfo).port, close: () => server.close() };
}

test('a cancel still on its way holds its server connection: the next client given it is not canceled', async () => {
  // One server connection, and cancels that take 700 ms to reach Postgres: the first client's query ends on
  // its own before its cancel arrives; handed on at once, the connection would run the second client's
  // statement when the cancel lands.
  const proxy = await delayingCancels(pgInst.port, 700);
  const one = await startPooler({ instanceId: 'pooler-cancel', listenPort: 0, postgres: { host: '127.0.0.1', port: proxy.port }, poolSize: 1, queueTimeoutMs: 5000 }, log);
  const [a, b] = [new pg.Client({ host: '127.0.0.1', port: one.port, user: 'postgres', database: 'postgres' }), new pg.Client({ host: '127.0.0.1', port: one.port, user: 'postgres', database: 'postgres' })];
  try {
    await Promise.all([a.connect(), b.connect()]);
    const first = a.query('SELECT pg_sleep(0.3)');
    await sleep(100);
    const { processID, secretKey } = a as unknown as { processID: number; secretKey: number };
    const s = net.connect({ port: one.port, host: '127.0.0.1' }, () => s.end(encodeCancel(processID, secretKey)));
    s.on('error', () => undefined);
    await first; // ended on its own: the cancel is still on its way
    const began = Date.now();
    const { rows } = await b.query('SELECT pg_sleep(0.6), 1 AS done');
    assert.equal(rows[0].done, 1, 'the second client\'s statement ran to its end');
    assert.ok(Date.now() - began >= 800, 'it waited for the cancel to be done before it was given the connection');
  } finally {
    await Promise.all([a.end(), b.end()]).catch(() => undefined);
    await one.close();
    proxy.close();
  }
});

test('clients that vanish mid-transaction or mid-query leave nothing behind', async () => {
  const a = await client();
  await a.query('BEGIN');
  await a.query(`INSERT INTO items (client, n) VALUES (-1, -1)`);
  await a.query(`SET search_path TO a2`);
  (a as unknown as { connection: { stream: net.Socket } }).connection.stream.destroy();
  const b = await client();
  const c = await client();
  await until('server connection back in the pool', 3000, async () =>
    Number((await admin('SHOW POOLS')).find((r) => r.database === 'postgres')?.sv_active) === 0);
  await Promise.all([b.query('BEGIN'), c.query('BEGIN')]); // both server connections, whichever a had
  for (const x of [b, c]) {
    assert.equal(await one(x, `SELECT count(*)::int FROM items WHERE client = -1`), 0);
    assert.equal(await one(x, `SELECT current_setting('search_path')`), '"$user", public');
  }
  await Promise.all([b.query('COMMIT'), c.query('COMMIT')]);
  const d = await client();
  const running = d.query('SELECT pg_sleep(30)').catch(() => undefined);
  await until('sleeping', 3000, async () => (await direct(`SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'`)).length > 0);
  (d as unknown as { connection: { stream: net.Socket } }).connection.stream.destroy();
  await running;
  await until('its query cancelled', 3000, async () =>
    (await direct(`SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'`)).length === 0);
  assert.equal(await one(b, 'SELECT 1'), 1);
  await Promise.all([b.end(), c.end()]);
});

test('a terminated backend ends its client\'s session with 57P01, as Postgres does, and the pool heals', async () => {
  const ended = (c: pg.Client) => new Promise<void>((resolve) => c.once('end', () => resolve()));
  // Idle in a transaction: the FATAL arrives unasked and the connection closes.
  const a = await client();
  await a.query('BEGIN');
  const pid = await one<number>(a, 'SELECT pg_backend_pid()');
  const aEnded = ended(a);
  await direct('SELECT pg_terminate_backend($1)', [pid]);
  await aEnded;
  await assert.rejects(a.query('SELECT 1'), /not queryable|ended|terminated/i);
  // Terminated while running a query: the query fails with 57P01 and the connection closes.
  const b = await client();
  const bEnded = ended(b);
  const running = b.query('SELECT pg_sleep(5)').then(() => null, (err: pg.DatabaseError) => err.code);
  const victim = await until('sleeping backend', 3000, async () =>
    (await direct<{ pid: number }>(`SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(5)' AND state = 'active'`))[0]?.pid);
  await direct('SELECT pg_terminate_backend($1)', [victim]);
  assert.equal(await running, '57P01');
  await bEnded;
  // A client that was not using the terminated backend is untouched, and the pool opens new ones.
  const clients = await Promise.all(Array.from({ length: 6 }, () => client()));
  await Promise.all(clients.map(async (c, i) => {
    for (let j = 0; j < 5; j++) assert.equal(await one(c, 'SELECT 3').catch((err: Error & { code?: string }) => `client ${i}.${j}: ${err.code} ${err.message}`), 3);
  }));
  await Promise.all(clients.map((c) => c.end()));
});

test('an exhausted pool makes waiting clients fail after queueTimeoutMs with a clear error', async () => {
  const [h1, h2, c] = await Promise.all([client(), client(), client()]);
  await h1.query('BEGIN');
  await h2.query('BEGIN');
  const t0 = Date.now();
  await assert.rejects(c.query('SELECT 1'), (err: pg.DatabaseError) => {
    assert.equal(err.code, '53300');
    assert.match(err.message, /pool exhausted.*within 2000 ms/);
    return true;
  });
  assert.ok(Date.now() - t0 >= 1900);
  await h1.query('COMMIT');
  assert.equal(await one(c, 'SELECT 5'), 5);
  await h2.query('COMMIT');
  await Promise.all([h1.end(), h2.end(), c.end()]);
});

test('admin console: SHOW POOLS/CLIENTS/SERVERS/STATS/CONFIG, PAUSE/RESUME, RELOAD; /metrics', async () => {
  const c = await client();
  await c.query('SELECT 1');
  const pools = await admin('SHOW POOLS');
  const p = pools.find((r) => r.database === 'postgres' && r.user === 'postgres');
  assert.ok(p, 'pool row');
  for (const k of ['cl_active', 'cl_waiting', 'sv_active', 'sv_idle', 'sv_used', 'sv_login', 'maxwait', 'pool_mode']) assert.ok(k in p, k);
  assert.ok(Number(p.sv_active) + Number(p.sv_idle) <= 2);
  assert.ok((await admin('SHOW CLIENTS')).length >= 1);
  assert.ok((await admin('SHOW SERVERS')).every((s) => s.type === 'S'));
  const stats = (await admin('SHOW STATS')).find((r) => r.database === 'postgres')!;
  assert.ok(Number(stats.total_xact_count) > 0 && Number(stats.total_query_count) > 0);
  assert.ok((await admin('SHOW CONFIG')).some((r) => r.key === 'default_pool_size' && r.value === '2'));
  await assert.rejects(admin('SELECT 1'), { code: '0A000' });

  const ac = new pg.Client({ host: '127.0.0.1', port: pooler.port, user: 'postgres', database: 'pgbouncer' });
  await ac.connect();
  await ac.query('PAUSE');
  let done = false;
  const q = c.query('SELECT 6 AS v').then((r) => {
    done = true;
    return r;
  });
  await sleep(300);
  assert.equal(done, false, 'queries wait while paused');
  await ac.query('RESUME');
  assert.equal((await q).rows[0].v, 6);
  const cfg = JSON.parse(fs.readFileSync(configFile, 'utf8'));
  fs.writeFileSync(configFile, JSON.stringify({ ...cfg, queueTimeoutMs: 2500 }));
  await ac.query('RELOAD');
  assert.ok((await ac.query('SHOW CONFIG')).rows.some((r) => r.key === 'query_wait_timeout' && r.value === '2500'));
  fs.writeFileSync(configFile, JSON.stringify(cfg));
  await ac.query('RELOAD');
  await ac.end();

  const text = await (await fetch(`http://127.0.0.1:${pooler.metricsPort}/metrics`)).text();
  for (const m of ['mg_pooler_clients', 'mg_pooler_servers', 'mg_pooler_waiting_clients', 'mg_pooler_wait_seconds_bucket',
    'mg_pooler_transactions_total', 'mg_pooler_queries_total', 'mg_pooler_errors_total']) {
    assert.match(text, new RegExp(`^${m}`, 'm'), m);
  }
  await c.end();
});

test('pgbench -M extended and -M prepared with 8 clients through the pooler', async () => {
  await run(`${BIN}/pgbench`, ['-h', '127.0.0.1', '-p', String(pgInst.port), '-U', 'postgres', '-i', '-s', '1', '-q', 'postgres']);
  for (const mode of ['extended', 'prepared']) {
    const { stdout } = await run(`${BIN}/pgbench`, ['-h', '127.0.0.1', '-p', String(pooler.port), '-U', 'postgres', '-M', mode, '-c', '8', '-T', '2', 'postgres']);
    assert.match(stdout, /number of failed transactions: 0 /, `${mode}: ${stdout}`);
    const tps = Number(/tps = ([\d.]+)/.exec(stdout)?.[1]);
    assert.ok(tps > 50, `${mode}: tps ${tps}`);
  }
});

test('malformed protocol bytes get an ErrorResponse and never disturb other clients', async () => {
  const bystander = await client();
  let stop = false;
  const load = (async () => {
    let n = 0;
    while (!stop) {
      assert.equal(await one(bystander, 'SELECT 7'), 7);
      n++;
    }
    return n;
  })();
  /** `code` null: Postgres closes without a word (an invalid startup packet length). */
  const fatal = async (bytes: Buffer, code: string | null, startup = true) => {
    let r: Raw;
    if (startup) r = await Raw.connect();
    else {
      const socket = net.connect({ host: '127.0.0.1', port: pooler.port });
      await new Promise((res) => socket.once('connect', res));
      r = new (Raw as unknown as new (s: net.Socket) => Raw)(socket);
    }
    r.send(bytes);
    const ms = await r.until('never', 3000).catch(() => r.msgs);
    assert.deepEqual(code === null ? ms : errors(ms), code === null ? [] : [code], `bytes ${bytes.toString('hex').slice(0, 20)}`);
    await until('closed', 2000, async () => r.closed);
  };
  await fatal(Buffer.from([0x51, 0, 0, 0, 2]), '08P01'); // length below 4
  await fatal(Buffer.from([0x7a, 0, 0, 0, 4]), '08P01'); // unknown message type
  await fatal(Buffer.from([0x51, 0x7f, 0xff, 0xff, 0xff]), '54000'); // oversized
  await fatal(Buffer.from('GET / HTTP/1.1\r\n\r\n'), null, false); // not Postgres at all: an invalid startup length
  await fatal(Buffer.from([0x58, 0, 0, 0, 4]), null, false); // Terminate before the startup packet
  await fatal(Buffer.from([0, 0, 0, 8, 0, 2, 0, 0]), '0A000', false); // protocol 2
  // Malformed but framed messages: an ERROR, and the session goes on.
  const r = await Raw.connect();
  r.send(Buffer.from([0x42, 0, 0, 0, 6, 0x61, 0x62]), serialize.sync()); // Bind with unterminated strings
  let ms = await r.until('readyForQuery');
  assert.deepEqual(errors(ms), ['08P01']);
  r.send(Buffer.from([0x51, 0, 0, 0, 7, 0x61, 0x62, 0x63])); // Query without its terminator
  ms = await r.until('readyForQuery');
  assert.deepEqual(errors(ms), ['08P01']);
  r.send(serialize.query('SELECT 8'));
  ms = await r.until('readyForQuery');
  assert.deepEqual(ms.find((m) => m.name === 'dataRow')?.fields, ['8']);
  r.end();
  stop = true;
  assert.ok((await load) > 0, 'the bystander kept working throughout');
  await bystander.end();
});

test('two clients sharing server connections never see each other\'s session state', async () => {
  const N = 8;
  const clients = await Promise.all(Array.from({ length: N }, (_, i) =>
    client({ application_name: `iso-${i}`, options: `-c search_path=iso${i}` })));
  const tzs = ['UTC', 'Asia/Tokyo', 'Europe/Paris', 'America/Denver', 'Australia/Sydney', 'Africa/Cairo', 'Asia/Kolkata', 'Pacific/Auckland'];
  await direct('DROP ROLE IF EXISTS iso_role; CREATE ROLE iso_role; GRANT USAGE ON SCHEMA iso3 TO iso_role; GRANT SELECT ON iso3.who TO iso_role');
  await Promise.all(clients.map((c, i) => c.query(`SET TIME ZONE '${tzs[i]}'; SELECT set_config('app.tenant', 'tenant-${i}', false)`)));
  await clients[3].query('SET ROLE iso_role');
  // Client 0 keeps a temp table and a session lock, so it is pinned; all the others share the other server connection.
  await clients[0].query('CREATE TEMP TABLE iso_tmp (x int)');
  await clients[0].query('SELECT pg_advisory_lock(99)');
  const jsClients = Array.from({ length: 3 }, (_, i) => js({ connection: { application_name: `iso-js-${i}`, search_path: `iso${i + 4}` } }));
  const leaks: string[] = [];
  const backends = new Map<number, Set<number>>();
  const iterate = async (c: pg.Client, i: number) => {
    for (let k = 0; k < 12; k++) {
      const r = (await c.query({
        name: 'probe',
        text: `SELECT (SELECT v FROM who) AS who, current_setting('TimeZone') AS tz, current_setting('application_name') AS app,
          to_regclass('pg_temp.iso_tmp') IS NOT NULL AS tmp,
          (SELECT count(*)::int FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS locks,
          current_user AS usr, current_setting('app.tenant', true) AS tenant, $1::int AS me, pg_backend_pid() AS backend`,
        values: [i],
      })).rows[0];
      backends.set(r.backend, (backends.get(r.backend) ?? new Set()).add(i));
      delete r.backend;
      const want = { who: i, tz: tzs[i], app: `iso-${i}`, tmp: i === 0, locks: i === 0 ? 1 : 0,
        usr: i === 3 ? 'iso_role' : 'postgres', tenant: `tenant-${i}`, me: i };
      try {
        assert.deepEqual(r, want);
      } catch {
        leaks.push(`client ${i}: ${JSON.stringify(r)}`);
      }
      // Some try to change what others could inherit, inside transactions that roll back.
      if (k % 3 === i % 3) {
        await c.query('BEGIN');
        await c.query(`SET search_path TO iso${(i + 1) % N}`);
        await c.query(`SET application_name = 'intruder'`);
        await c.query('ROLLBACK');
      }
      // And the same statement name for a different statement each.
      const p = await c.query({ name: `s${k % 2}`, text: `SELECT $1::int * ${i + 1} AS v`, values: [k] });
      if (p.rows[0].v !== k * (i + 1)) leaks.push(`client ${i}: prepared ${JSON.stringify(p.rows[0])}`);
    }
  };
  const jsIterate = async (sql: postgres.Sql, i: number) => {
    for (let k = 0; k < 12; k++) {
      const [r] = await sql`select (select v from who) as who, current_setting('application_name') as app, current_setting('TimeZone') as tz,
        to_regclass('pg_temp.iso_tmp') is not null as tmp, current_user as usr, current_setting('app.tenant', true) as tenant`;
      // A custom GUC another session defined on this backend reads '' here, never its value (Postgres keeps placeholders per backend).
      if (r.tenant === '') r.tenant = null;
      const want = { who: i + 4, app: `iso-js-${i}`, tz: defaultTz, tmp: false, usr: 'postgres', tenant: null };
      if (JSON.stringify({ ...r }) !== JSON.stringify(want)) leaks.push(`js ${i}: ${JSON.stringify(r)}`);
    }
  };
  await Promise.all([...clients.map(iterate), ...jsClients.map(jsIterate)]);
  assert.deepEqual(leaks, []);
  assert.ok([...backends.values()].some((set) => set.size >= 5), 'the unpinned clients really shared one server connection');
  // The pinned client leaves; its state leaves with it.
  await clients[0].end();
  await until('pinned state gone', 3000, async () => {
    const [r] = await direct(`SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory')::int AS locks,
      (SELECT count(*) FROM pg_class WHERE relname = 'iso_tmp')::int AS tmp`);
    return r.locks === 0 && r.tmp === 0;
  });
  const servers = await admin('SHOW SERVERS');
  assert.ok(servers.length <= 2);
  await Promise.all(clients.slice(1).map((c) => c.end()));
});

test('idle server connections are reaped and old ones retired; SIGTERM drains the process', async () => {
  const cfg = {
    instanceId: 'pooler-reap', listenPort: await freePort(), postgres: { port: pgInst.port }, poolSize: 2,
    serverIdleTimeoutMs: 300, serverLifetimeMs: 1000, shutdownGraceMs: 3000,
  };
  const file = path.join(dir, 'reap.json');
  fs.writeFileSync(file, JSON.stringify(cfg));
  const child = execFile(process.execPath, [...nodeArgs('router/pooler/main.ts'), '--config', file], { env: { ...process.env, MG_LOG_LEVEL: 'info' } });
  let out = '';
  child.stdout?.on('data', (d: Buffer) => (out += d));
  const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  await until('pooler process listening', 15000, async () => out.includes('pooler listening'));
  const adminAt = async (sql: string) => {
    const c = new pg.Client({ host: '127.0.0.1', port: cfg.listenPort, user: 'postgres', database: 'pgbouncer' });
    await c.connect();
    try {
      return (await c.query(sql)).rows;
    } finally {
      await c.end();
    }
  };
  const c = new pg.Client({ host: '127.0.0.1', port: cfg.listenPort, user: 'postgres', database: 'postgres' });
  c.on('error', () => undefined);
  await c.connect();
  assert.equal(await one(c, 'SELECT 1'), 1);
  const first = await one<number>(c, 'SELECT pg_backend_pid()');
  await until('idle connection reaped', 3000, async () => (await adminAt('SHOW SERVERS')).length === 0);
  // Busy past its lifetime: retired when released, the next transaction gets a fresh one.
  await c.query('BEGIN');
  const old = await one<number>(c, 'SELECT pg_backend_pid()');
  assert.notEqual(old, first);
  await sleep(1100);
  await c.query('COMMIT');
  assert.notEqual(await one<number>(c, 'SELECT pg_backend_pid()'), old);
  // SIGTERM: a transaction in flight finishes, then clients get 57P01 and the process exits 0.
  await c.query('BEGIN');
  child.kill('SIGTERM');
  await sleep(200);
  assert.equal(await one(c, 'SELECT 10'), 10);
  // Listen before COMMIT: the 57P01 may arrive in the same packet as COMMIT's ReadyForQuery.
  const closed = new Promise((r) => c.once('error', r));
  await c.query('COMMIT');
  assert.equal(await exited, 0);
  assert.equal(((await closed) as pg.DatabaseError).code, '57P01');
  assert.match(out, /"msg":"pooler shutting down"/);
});
