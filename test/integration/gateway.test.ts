/**
 * The gateway as applications use it: real clients (psql, pgbench, node-postgres,
 * postgres.js) through MultiGateway + MultiPooler of a cluster brought up by `mg`.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import pg from 'pg';
import postgres from 'postgres';
import { portAnswers } from '../../compose/supervise.ts';
import { encodeCancel } from '../../router/protocol/messages.ts';
import type { PlannedInstance } from '../../compose/spec.ts';
import { sleep, testCluster, until } from '../support/cluster.ts';
import { heldWritingFor, pausedQuery, residentBytes } from '../support/slow-client.ts';
import { nodeArgs } from '../../compose/launch.ts';

const MAX_CLIENTS = 40;
const RELEASE_MS = 1_000;
const cluster = testCluster('gateway', 1, { settings: {
  'gateway.maxClients': MAX_CLIENTS, 'gateway.readOnlyToReplicas': true, 'gateway.releaseIdleLinksAfterMs': RELEASE_MS,
} });
const { spec, flags, mg } = cluster;
// MultiOrch elects the primary during `up`.
let primary: PlannedInstance, replica1: PlannedInstance, replica2: PlannedInstance;
const gatewayPort = spec.gateway.port;
const bin = '/usr/lib/postgresql/15/bin';
const run = promisify(execFile);
const env = { ...process.env, PGPASSWORD: 'postgres', PGHOST: '127.0.0.1', PGPORT: String(gatewayPort), PGUSER: 'postgres' };

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  ({ primary, replicas: [replica1, replica2] } = await cluster.roles());
});
after(async () => {
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(cluster.dataDir, { recursive: true, force: true });
});

async function gw<T>(database: string, fn: (c: pg.Client) => Promise<T>, password = 'postgres'): Promise<T> {
  const client = new pg.Client({ host: '127.0.0.1', port: gatewayPort, user: 'postgres', password, database, application_name: 'gw-test' });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end().catch(() => undefined);
  }
}
const one = async (c: pg.Client, sql: string) => (await c.query(sql)).rows[0];

test('node-postgres through the gateway: SCRAM login, startup parameters, a transaction', cluster.explained(async () => {
  await gw('postgres', async (c) => {
    assert.deepEqual(await one(c, 'SELECT pg_is_in_recovery() AS r, current_setting(\'application_name\') AS app'), { r: false, app: 'gw-test' });
    await c.query('CREATE TABLE IF NOT EXISTS gw_items (id int PRIMARY KEY, name text)');
    await c.query('BEGIN');
    await c.query("INSERT INTO gw_items VALUES (1, 'one') ON CONFLICT DO NOTHING");
    await c.query('COMMIT');
    assert.equal((await one(c, 'SELECT name FROM gw_items WHERE id = 1')).name, 'one');
  });
}));

test('wrong password is 28P01, unknown database is 3D000, as Postgres says them', cluster.explained(async () => {
  await assert.rejects(gw('postgres', async () => undefined, 'wrong'), (e: any) => e.code === '28P01' && /password authentication failed for user "postgres"/.test(e.message));
  await assert.rejects(gw('nosuchdb', async () => undefined), (e: any) => e.code === '3D000' && /database "nosuchdb" does not exist/.test(e.message));
}));

test('db@replica reads from a streaming replica; SET mg.target switches the next transaction', cluster.explained(async () => {
  await until('replicas in routing', 10_000, async () => gw('postgres@replica', async (c) => (await one(c, 'SELECT pg_is_in_recovery() AS r')).r === true).catch(() => false));
  await gw('postgres@replica', async (c) => {
    const port = (await one(c, "SELECT current_setting('port') AS p")).p;
    assert.ok([String(replica1.port), String(replica2.port)].includes(port));
    await assert.rejects(c.query('CREATE TABLE nope (a int)'), (e: any) => e.code === '25006'); // read-only transaction
  });
  await gw('postgres', async (c) => {
    assert.equal((await one(c, 'SELECT pg_is_in_recovery() AS r')).r, false);
    await c.query("SET mg.target = 'replica'");
    assert.equal((await one(c, 'SELECT pg_is_in_recovery() AS r')).r, true);
    await c.query("SET mg.target = 'primary'");
    assert.equal((await one(c, 'SELECT pg_is_in_recovery() AS r')).r, false);
  });
}));

test('committed SETs follow the session when the gateway moves it to a replica and back; rolled-back ones do not', cluster.explained(async () => {
  await gw('postgres', async (c) => {
    await c.query("SET statement_timeout = '4321ms'");
    await c.query('SET search_path = gw_schema, public');
    await c.query("BEGIN; SET work_mem = '7MB'; ROLLBACK");
    const settings = "current_setting('statement_timeout') AS st, current_setting('search_path') AS sp, current_setting('work_mem') AS wm";
    await c.query("SET mg.target = 'replica'");
    assert.deepEqual(await one(c, `SELECT pg_is_in_recovery() AS r, ${settings}`), { r: true, st: '4321ms', sp: 'gw_schema, public', wm: '4MB' });
    await c.query('RESET statement_timeout');
    await c.query("SET mg.target = 'primary'");
    assert.deepEqual(await one(c, `SELECT pg_is_in_recovery() AS r, ${settings}`), { r: false, st: '0', sp: 'gw_schema, public', wm: '4MB' });
  });
}));

test('with read-only routing on, transactions that begin READ ONLY run on a replica, with the session\'s settings', cluster.explained(async () => {
  await gw('postgres', async (c) => {
    const where = async () => (await one(c, "SELECT pg_is_in_recovery() AS r, current_setting('lock_timeout') AS lt")) as { r: boolean; lt: string };
    await c.query("SET lock_timeout = '1234ms'");
    await c.query('BEGIN READ ONLY');
    assert.deepEqual(await where(), { r: true, lt: '1234ms' });
    await c.query('COMMIT');
    assert.deepEqual(await where(), { r: false, lt: '1234ms' });
    await c.query('START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY');
    assert.equal((await where()).r, true);
    await c.query('ROLLBACK');
    await c.query('BEGIN READ WRITE');
    assert.equal((await where()).r, false);
    await c.query('INSERT INTO gw_items VALUES (3, $1) ON CONFLICT DO NOTHING', ['three']);
    await c.query('COMMIT');
    assert.equal((await c.query('SELECT name FROM gw_items WHERE id = $1', [3])).rows[0].name, 'three');
  });
  const text = await (await fetch(`http://127.0.0.1:${spec.gateway.metricsPort}/metrics`)).text();
  assert.match(text, /^mg_gateway_read_only_transactions_routed_total\{outcome="replica"\} [2-9]/m);
}));

test('an idle session gives back its pooler connection and gets a new one, with its settings; a pinned one keeps it', cluster.explained(async () => {
  const released = async () => Number(/^mg_gateway_idle_links_released_total (\d+)/m.exec(await (await fetch(`http://127.0.0.1:${spec.gateway.metricsPort}/metrics`)).text())?.[1] ?? 0);
  await gw('postgres', async (plain) => {
    await gw('postgres', async (pinned) => {
      await plain.query("SET idle_in_transaction_session_timeout = '54321ms'");
      await pinned.query('CREATE TEMP TABLE gw_scratch (v int)');
      await pinned.query('INSERT INTO gw_scratch VALUES (7)');
      const before = await released();
      await sleep(RELEASE_MS * 2.5);
      assert.ok(await released() > before, 'no pooler connection was released');
      assert.equal((await one(plain, "SELECT current_setting('idle_in_transaction_session_timeout') AS v")).v, '54321ms');
      assert.equal((await one(pinned, 'SELECT v FROM gw_scratch')).v, 7);
    });
  });
}));

test('clients cannot weaken synchronous_commit through the gateway (42501); a transaction that tries is aborted', cluster.explained(async () => {
  await gw('postgres', async (c) => {
    await assert.rejects(c.query('SET synchronous_commit = off'), (e: any) => e.code === '42501' && /"synchronous_commit"/.test(e.message));
    await assert.rejects(c.query("SELECT set_config('synchronous_commit', 'local', false)"), (e: any) => e.code === '42501');
    await assert.rejects(c.query('ALTER ROLE postgres SET synchronous_commit = off'), (e: any) => e.code === '42501');
    await c.query('BEGIN');
    await assert.rejects(c.query('SET LOCAL synchronous_commit = off'), (e: any) => e.code === '42501');
    await assert.rejects(c.query('SELECT 1'), (e: any) => e.code === '25P02');
    await c.query('ROLLBACK');
    await c.query('SET synchronous_commit = remote_apply');
    assert.equal((await one(c, "SELECT current_setting('synchronous_commit') AS v")).v, 'remote_apply');
  });
  const weak = new pg.Client({ host: '127.0.0.1', port: gatewayPort, user: 'postgres', password: 'postgres', database: 'postgres', options: '-c synchronous_commit=off' });
  await assert.rejects(weak.connect(), (e: any) => e.code === '42501');
}));

/** The WAL receiver processes of the replicas (children of their postmasters). */
function walReceivers(): number[] {
  return [replica1, replica2].flatMap((r) => {
    const postmaster = Number(fs.readFileSync(path.join(r.dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
    const children = fs.readFileSync(`/proc/${postmaster}/task/${postmaster}/children`, 'utf8').trim().split(/\s+/).map(Number);
    return children.filter((pid) => {
      try {
        return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('walreceiver');
      } catch {
        return false;
      }
    });
  });
}

test('a commit whose wait for the synchronous standbys is canceled is reported as 08007, not as a success', cluster.explained(async () => {
  await until('the durability policy is applied', 30_000, async () =>
    gw('postgres', async (c) => (await one(c, "SELECT current_setting('synchronous_standby_names') AS s")).s !== ''));
  const receivers = walReceivers();
  assert.equal(receivers.length, 2, 'both replicas stream');
  await gw('postgres', async (c) => {
    for (const pid of receivers) process.kill(pid, 'SIGSTOP');
    try {
      const insert = c.query("INSERT INTO gw_items VALUES (42, 'unconfirmed') ON CONFLICT DO NOTHING");
      await sleep(500);
      const { processID, secretKey } = c as unknown as { processID: number; secretKey: number };
      const s = net.connect({ host: '127.0.0.1', port: gatewayPort }, () => s.end(encodeCancel(processID, secretKey)));
      s.on('error', () => undefined);
      await assert.rejects(insert, (e: any) => e.code === '08007' && /not confirmed/.test(e.message));
    } finally {
      for (const pid of receivers) process.kill(pid, 'SIGCONT');
    }
    // What stock Postgres does and the error says: the row is there, committed on the primary.
    assert.equal((await one(c, 'SELECT name FROM gw_items WHERE id = 42')).name, 'unconfirmed');
  });
}));

test('psql through the gateway, with and without TLS', cluster.explained(async () => {
  for (const sslmode of ['require', 'disable']) {
    const { stdout } = await run(`${bin}/psql`, ['-d', `dbname=postgres sslmode=${sslmode}`, '-Atc', 'SELECT 40 + 2'], { env });
    assert.equal(stdout.trim(), '42');
  }
}));

test('pgbench through the gateway in simple, extended and prepared modes', cluster.explained(async () => {
  await run(`${bin}/pgbench`, ['-i', '-s', '1', '-q', 'postgres'], { env });
  for (const mode of ['simple', 'extended', 'prepared']) {
    const { stdout } = await run(`${bin}/pgbench`, ['-M', mode, '-c', '8', '-j', '2', '-T', '3', '-n', 'postgres'], { env });
    assert.match(stdout, /number of failed transactions: 0 /);
    const tps = Number(/tps = ([\d.]+)/.exec(stdout)?.[1]);
    assert.ok(tps > 50, `${mode}: ${tps} tps`);
  }
}));

test('postgres.js through the gateway: prepared statements, a transaction, a cancel', cluster.explained(async () => {
  const sql = postgres({ host: '127.0.0.1', port: gatewayPort, user: 'postgres', password: 'postgres', database: 'postgres', max: 4, prepare: true });
  try {
    const rows = await Promise.all(Array.from({ length: 20 }, (_, i) => sql`SELECT ${i}::int AS n, ${`v${i}`}::text AS v`));
    assert.deepEqual(rows.map((r) => r[0].n), Array.from({ length: 20 }, (_, i) => i));
    await sql.begin(async (tx) => {
      await tx`INSERT INTO gw_items VALUES (2, 'two') ON CONFLICT DO NOTHING`;
    });
    assert.equal((await sql`SELECT name FROM gw_items WHERE id = 2`)[0].name, 'two');
    const slow = sql`SELECT pg_sleep(10)`;
    setTimeout(() => slow.cancel(), 300);
    await assert.rejects(slow, (e: any) => e.code === '57014');
  } finally {
    await sql.end();
  }
}));

test('as with Postgres directly: a terminated backend closes the client with 57P01; a statement prepared after DDL sees the new columns', cluster.explained(async () => {
  // pg_terminate_backend of the backend serving a transaction: the FATAL, then the connection closes.
  const victim = new pg.Client({ host: '127.0.0.1', port: gatewayPort, user: 'postgres', password: 'postgres', database: 'postgres' });
  const errors: string[] = [];
  victim.on('error', (e: Error & { code?: string }) => errors.push(e.code ?? e.message));
  await victim.connect();
  const ended = new Promise<void>((resolve) => victim.once('end', () => resolve()));
  await victim.query('BEGIN');
  const pid = (await one(victim, 'SELECT pg_backend_pid() AS pid')).pid;
  await gw('postgres', (c) => c.query('SELECT pg_terminate_backend($1)', [pid]));
  await ended;
  // node-postgres reports the FATAL, then the close (with Postgres directly too).
  assert.deepEqual(errors, ['57P01', 'Connection terminated unexpectedly']);
  // A table re-created with another column type; a new client prepares the same text (postgres.js and node-postgres).
  const text = 'SELECT v FROM gw_flip';
  await gw('postgres', (c) => c.query('DROP TABLE IF EXISTS gw_flip; CREATE TABLE gw_flip (v int); INSERT INTO gw_flip VALUES (1)'));
  const before = postgres({ host: '127.0.0.1', port: gatewayPort, user: 'postgres', password: 'postgres', database: 'postgres', max: 4, prepare: true });
  try {
    for (let i = 0; i < 8; i++) assert.deepEqual([...(await before.unsafe(text, [], { prepare: true }))], [{ v: 1 }]);
  } finally {
    await before.end();
  }
  await gw('postgres', (c) => c.query(`DROP TABLE gw_flip; CREATE TABLE gw_flip (v text); INSERT INTO gw_flip VALUES ('one')`));
  const after = postgres({ host: '127.0.0.1', port: gatewayPort, user: 'postgres', password: 'postgres', database: 'postgres', max: 4, prepare: true });
  try {
    for (let i = 0; i < 8; i++) assert.deepEqual([...(await after.unsafe(text, [], { prepare: true }))], [{ v: 'one' }]);
  } finally {
    await after.end();
  }
  await gw('postgres', async (c) => assert.deepEqual((await c.query({ name: 'flip', text })).rows, [{ v: 'one' }]));
}));

test('a cancel sent to a second gateway reaches the query running through the first', cluster.explained(async () => {
  const port = spec.postgres.basePort + 480;
  const configFile = path.join(cluster.dataDir, 'gateway-2.json');
  fs.writeFileSync(configFile, JSON.stringify({
    port, metricsPort: spec.postgres.basePort + 481, brokers: spec.kafka.bootstrap!.split(','), registryUrl: spec.registry.url, topicPrefix: cluster.prefix,
  }));
  const second = spawn(process.execPath, [...nodeArgs('router/gateway/main.ts'), '--config', configFile], { stdio: 'ignore' });
  try {
    await until('the second gateway listens', 30_000, async () => portAnswers(port));
    await gw('postgres', async (c) => {
      const { processID, secretKey } = c as unknown as { processID: number; secretKey: number };
      const slow = c.query('SELECT pg_sleep(20)');
      await sleep(300);
      const t0 = Date.now();
      const s = net.connect({ host: '127.0.0.1', port }, () => s.end(encodeCancel(processID, secretKey)));
      s.on('error', () => undefined);
      await assert.rejects(slow, (e: any) => e.code === '57014');
      assert.ok(Date.now() - t0 < 5_000, `the cancel took ${Date.now() - t0} ms`);
    });
  } finally {
    second.kill('SIGTERM');
  }
  const text = await (await fetch(`http://127.0.0.1:${spec.gateway.metricsPort}/metrics`)).text();
  assert.match(text, /^mg_gateway_cancel_requests_total\{where="from_peer"\} 1$/m);
}));

test('a replica that goes down leaves read routing within about a second', cluster.explained(async () => {
  const victim = replica1;
  await run(`${bin}/pg_ctl`, ['-D', path.join(cluster.dataDir, 'postgres', victim.instanceId), 'status']).catch(() => undefined);
  const pid = Number(fs.readFileSync(path.join(cluster.dataDir, 'postgres', victim.instanceId, 'postmaster.pid'), 'utf8').split('\n')[0]);
  process.kill(pid, 'SIGSTOP'); // hung: the agent reports it unreachable and leaves it alone
  const stoppedAt = Date.now();
  try {
    // New read sessions must all land on the other replica once health says so (< 2 s detection + 1 s routing).
    await until('reads avoiding the hung replica', 4_000, async () => {
      const ports = await Promise.all(Array.from({ length: 4 }, () => gw('postgres@replica', async (c) => (await one(c, "SELECT current_setting('port') AS p")).p)));
      return ports.every((p) => p === String(replica2.port));
    });
    assert.ok(Date.now() - stoppedAt < 4_000);
  } finally {
    process.kill(pid, 'SIGCONT');
  }
}));

test('while the primary is down, queries wait at the gateway and go on when it is back', cluster.explained(async () => {
  const dir = path.join(cluster.dataDir, 'postgres', primary.instanceId);
  await gw('postgres', async (c) => {
    assert.equal((await one(c, 'SELECT 1 AS x')).x, 1);
    // Stop the primary for ~2 s; its agent restarts it (it died without being asked to stop).
    const pid = Number(fs.readFileSync(path.join(dir, 'postmaster.pid'), 'utf8').split('\n')[0]);
    process.kill(pid, 'SIGKILL');
    await until('the gateway noticing', 3_000, async () => {
      const res = await fetch(`http://127.0.0.1:${spec.gateway.metricsPort}/metrics`);
      return /^mg_gateway_healthy_primaries 0/m.test(await res.text());
    });
    const t0 = Date.now();
    const row = await one(c, 'SELECT 2 AS x, pg_is_in_recovery() AS r');
    assert.deepEqual(row, { x: 2, r: false });
    assert.ok(Date.now() - t0 < spec.gateway.bufferWindowMs);
  });
}));

test('clients beyond gateway.maxClients get 53300 and the gateway keeps serving', cluster.explained(async () => {
  const open: pg.Client[] = [];
  let refusal: any;
  try {
    for (let i = 0; i <= MAX_CLIENTS && !refusal; i++) {
      const c = new pg.Client({ host: '127.0.0.1', port: gatewayPort, user: 'postgres', password: 'postgres', database: 'postgres' });
      await c.connect().then(() => open.push(c), (err) => (refusal = err));
    }
    assert.ok(refusal, `client ${MAX_CLIENTS + 1} was accepted`);
    assert.equal(refusal.code, '53300');
    assert.match(refusal.message, /sorry, too many clients already/);
    assert.equal(open.length, MAX_CLIENTS);
    assert.equal((await one(open[0], 'SELECT 1 AS x')).x, 1);
    await open.pop()!.end();
    await until('a slot frees up', 5_000, async () => gw('postgres', async (c) => (await one(c, 'SELECT 2 AS x')).x === 2).catch(() => false));
  } finally {
    await Promise.all(open.map((c) => c.end()));
  }
}));

test('the gateway serves Prometheus metrics', cluster.explained(async () => {
  const text = await (await fetch(`http://127.0.0.1:${spec.gateway.metricsPort}/metrics`)).text();
  assert.match(text, /^mg_gateway_connections_total\{outcome="ok"\} \d+/m);
  assert.match(text, /^mg_gateway_buffered_queries_total \d+/m);
  assert.match(text, /^mg_gateway_connections_refused_limit_total [1-9]\d*/m);
  assert.match(text, /^mg_gateway_healthy_primaries 1$/m);
}));

test('a result larger than memory to a client that reads nothing: the rows wait in Postgres, not in the gateway, and all arrive', cluster.explained(async () => {
  const ROWS = 20_000;
  const PAD = 10_000; // 200 MB in all
  const statement = `SELECT g, repeat('x', ${PAD}) AS pad FROM generate_series(1, ${ROWS}) g`;
  const { primary: serving } = await cluster.roles(); // the tests before may have moved the primary
  await gw('postgres', async (c) => {
    const before = await residentBytes(spec.gateway.metricsPort);
    const q = pausedQuery(c, statement, 'pad');
    await heldWritingFor([serving.port], statement, 2_000, 60_000);
    const held = await residentBytes(spec.gateway.metricsPort);
    q.resume();
    assert.deepEqual(await q.done, { rows: ROWS, bytes: ROWS * PAD });
    console.log(`a ${ROWS * PAD / 1e6} MB result with the client paused: gateway RSS ${(before / 1e6).toFixed(0)} MB before, ${(held / 1e6).toFixed(0)} MB while held`);
    assert.ok(held - before < 100e6, `the gateway grew by ${((held - before) / 1e6).toFixed(0)} MB while the client read nothing`);
  });
}));
