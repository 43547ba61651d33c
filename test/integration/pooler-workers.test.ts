// A MultiPooler of 2 worker processes (router/pooler/main.ts with workers: 2) in
// front of a real Postgres 15, with real clients. Which worker serves a client is
// read from the kernel (`ss -p`: the process that owns the accepted socket), so
// every claim below is checked on clients of both workers.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { createLogger } from '../../common/log.ts';
import { PostgresInstance } from '../../ingest/postgres/instance.ts';
import { queryInstance } from '../support/postgres.ts';
import { freePort, sleep, until } from '../support/wait.ts';
import { nodeArgs } from '../../compose/launch.ts';

process.env.MG_LOG_LEVEL ??= 'warn';
const log = createLogger('pooler-workers-test');
const run = promisify(execFile);
const POOL_SIZE = 4;

let dir: string;
let pgInst: PostgresInstance;
let primary: ChildProcess;
let port: number;
let metricsPort: number;
const open = new Set<pg.Client>();
let stopping = false;

async function client(): Promise<pg.Client> {
  const c = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', database: 'postgres' });
  c.on('error', () => undefined);
  await c.connect();
  open.add(c);
  return c;
}

async function end(...cs: pg.Client[]): Promise<void> {
  await Promise.all(cs.map((c) => c.end().catch(() => undefined)));
  for (const c of cs) open.delete(c);
}

/** Straight to Postgres, to look at what the pooler did. */
const direct = <R extends pg.QueryResultRow = pg.QueryResultRow>(sql: string, values: unknown[] = []) => queryInstance<R>(pgInst.port, sql, values);
/** The admin console (database pgbouncer) through any worker. */
const admin = (sql: string) => queryInstance(port, sql, [], 'pgbouncer');

/** The pooler's worker processes: the primary's node children (tsx's esbuild is a child too). */
async function workerPids(): Promise<number[]> {
  // ps exits 1 when it finds none (before the first fork).
  const { stdout } = await run('ps', ['-o', 'pid=,comm=', '--ppid', String(primary.pid)]).catch(() => ({ stdout: '' }));
  return stdout.split('\n').map((l) => l.trim().split(/\s+/)).filter(([, comm]) => comm === 'node').map(([pid]) => Number(pid)).sort();
}

/** The pooler process that owns the server side of the connection from this local port. */
async function workerOfPort(localPort: number): Promise<number> {
  return until(`the worker of port ${localPort}`, 3000, async () => {
    const { stdout } = await run('ss', ['-Htnp', 'state', 'established', `( sport = :${port} and dport = :${localPort} )`]);
    const m = /pid=(\d+)/.exec(stdout);
    return m ? Number(m[1]) : undefined;
  });
}

const localPort = (c: pg.Client) => (c as unknown as { connection: { stream: net.Socket } }).connection.stream.localPort!;
const workerOf = (c: pg.Client) => workerOfPort(localPort(c));

/** At least `perWorker` clients on each worker, grouped by worker pid. */
async function clientsOnEveryWorker(perWorker: number): Promise<Map<number, pg.Client[]>> {
  const pids = await workerPids();
  const by = new Map<number, pg.Client[]>(pids.map((p) => [p, []]));
  for (let i = 0; i < 40 && [...by.values()].some((cs) => cs.length < perWorker); i++) {
    const c = await client();
    const w = await workerOf(c);
    const list = by.get(w);
    assert.ok(list, `client served by ${w}, not one of the workers ${pids.join(',')}`);
    if (list.length < perWorker) list.push(c);
    else await end(c);
  }
  for (const [w, cs] of by) assert.equal(cs.length, perWorker, `clients on worker ${w}`);
  return by;
}

/** A counter of the primary's /metrics, summed over the workers. */
async function counter(name: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
  const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text);
  assert.ok(m, `${name} on /metrics`);
  return Number(m[1]);
}

const serverBackends = async () => Number((await direct(
  `SELECT count(*) AS n FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND query NOT LIKE 'LISTEN%'`,
))[0].n);

async function startPooler(): Promise<void> {
  port = await freePort();
  metricsPort = await freePort();
  const configFile = path.join(dir, 'pooler.json');
  fs.writeFileSync(configFile, JSON.stringify({
    instanceId: 'pooler-workers-test', listenPort: port, postgres: { host: '127.0.0.1', port: pgInst.port },
    poolSize: POOL_SIZE, queueTimeoutMs: 5000, workers: 2, metricsPort,
  }));
  const logFile = path.join(dir, 'pooler.log');
  const out = fs.openSync(logFile, 'a');
  // Not a test process itself: without the runner's NODE_TEST_CONTEXT, and its output kept apart from the runner's stream.
  primary = spawn(process.execPath, [...nodeArgs('router/pooler/main.ts'), '--config', configFile],
    { stdio: ['ignore', out, out], env: { ...process.env, NODE_TEST_CONTEXT: undefined } });
  primary.once('exit', (code, signal) => {
    if (!stopping) console.error(`pooler primary exited (${code ?? signal}):\n${fs.readFileSync(logFile, 'utf8').slice(-4000)}`);
  });
  // Three Node processes compiling TypeScript: on a loaded machine this takes a minute or more.
  await until('the pooler workers to listen', 120_000, async () => {
    if (primary.exitCode !== null) throw new Error(`pooler exited with ${primary.exitCode}`);
    return (await workerPids()).length === 2 && await new Promise<boolean>((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port }, () => { s.destroy(); resolve(true); }).on('error', () => resolve(false));
    });
  });
}

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-pooler-workers-'));
  fs.chmodSync(dir, 0o755);
  pgInst = new PostgresInstance({ name: 'pooler-workers-pg', dataDir: path.join(dir, 'data'), port: await freePort(), log });
  await pgInst.initPrimary();
  await pgInst.start();
  await direct('CREATE TABLE items (id serial primary key, client int, n int)');
  await startPooler();
});

after(async () => {
  await end(...open);
  stopping = true;
  if (primary && primary.exitCode === null) {
    const exited = new Promise((r) => primary.once('exit', r));
    primary.kill('SIGTERM');
    await Promise.race([exited, sleep(20_000)]);
  }
  await pgInst?.stop('immediate').catch(() => undefined);
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

test('many clients on both workers: the server connections never exceed poolSize for the whole Postgres', async () => {
  const by = await clientsOnEveryWorker(10);
  const clients = [...by.values()].flat();
  let stop = false;
  let most = 0;
  const sampler = (async () => {
    while (!stop) {
      most = Math.max(most, await serverBackends());
      await sleep(10);
    }
  })();
  await Promise.all(clients.map(async (c, i) => {
    for (let j = 0; j < 10; j++) {
      await c.query('BEGIN');
      await c.query('INSERT INTO items (client, n) VALUES ($1, $2)', [i, j]);
      await c.query('SELECT pg_sleep(0.005)');
      await c.query('COMMIT');
    }
  }));
  stop = true;
  await sampler;
  assert.equal(Number((await direct('SELECT count(*) AS n FROM items'))[0].n), 200);
  assert.ok(most <= POOL_SIZE, `at most ${POOL_SIZE} server connections across both workers, saw ${most}`);
  assert.ok(most > POOL_SIZE / 2, `both workers' clients shared the pool (saw ${most} at most)`);
  await end(...clients);
});

test('under sustained load on both workers the server connections settle: none moves between workers once each has its share', async () => {
  // Twice as many clients on each worker as the whole pool: both workers always have clients queued.
  const by = await clientsOnEveryWorker(2 * POOL_SIZE);
  const clients = [...by.values()].flat();
  let stop = false;
  const load = Promise.all(clients.map(async (c) => {
    while (!stop) await c.query('SELECT 1');
  }));
  await sleep(2000); // both workers reach their share
  const [connects0, giveBacks0, xacts0] = await Promise.all(
    ['mg_pooler_server_connects_total', 'mg_pooler_give_backs_total', 'mg_pooler_transactions_total'].map(counter));
  const backends = await serverBackends();
  await sleep(4000);
  const [connects1, giveBacks1, xacts1] = await Promise.all(
    ['mg_pooler_server_connects_total', 'mg_pooler_give_backs_total', 'mg_pooler_transactions_total'].map(counter));
  stop = true;
  await load;
  await end(...clients);
  assert.ok(xacts1 - xacts0 > 200, `the load went on: ${xacts1 - xacts0} transactions in 4 s`);
  assert.ok(backends <= POOL_SIZE, `at most ${POOL_SIZE} server connections, saw ${backends}`);
  // A stall of this loaded machine can make one connection look idle for a moment; nothing more moves.
  assert.ok(giveBacks1 - giveBacks0 <= 2, `connections given back to the other worker in 4 s of load: ${giveBacks1 - giveBacks0}`);
  assert.ok(connects1 - connects0 <= 2, `server connections opened in 4 s of load: ${connects1 - connects0}`);
});

test('a client of one worker gets a connection another worker holds idle, without waiting for the idle timeout', async () => {
  const by = await clientsOnEveryWorker(POOL_SIZE);
  const [first, second] = [...by.values()];
  // The first worker takes every lease: POOL_SIZE transactions at once, then idle.
  await Promise.all(first.map((c) => c.query('BEGIN')));
  await Promise.all(first.map((c) => c.query('SELECT 1')));
  await Promise.all(first.map((c) => c.query('COMMIT')));
  // The second worker's clients now need all POOL_SIZE at once.
  const t0 = Date.now();
  await Promise.all(second.map((c) => c.query('BEGIN')));
  const pids = await Promise.all(second.map(async (c) => (await c.query('SELECT pg_backend_pid() AS p')).rows[0].p as number));
  const took = Date.now() - t0;
  await Promise.all(second.map((c) => c.query('COMMIT')));
  assert.equal(new Set(pids).size, POOL_SIZE);
  assert.ok(took < 2000, `the second worker got its connections in ${took} ms`);
  assert.ok(await serverBackends() <= POOL_SIZE);
  await end(...first, ...second);
});

test('LISTEN/NOTIFY: listeners on both workers get every notification, from a client of either worker', async () => {
  const by = await clientsOnEveryWorker(2);
  const [[a1, a2], [b1, b2]] = [...by.values()];
  const got = new Map<pg.Client, string[]>([[a1, []], [b1, []], [a2, []]]);
  for (const [c, list] of got) {
    c.on('notification', (n) => list.push(`${n.channel}:${n.payload}`));
    await c.query('LISTEN chan');
  }
  await a2.query('UNLISTEN chan'); // a worker's other client stops listening; its neighbour does not
  await b2.query(`NOTIFY chan, 'from b'`);
  await a2.query(`SELECT pg_notify('chan', 'from a')`);
  await until('notifications on both workers', 5000, async () => got.get(a1)!.length >= 2 && got.get(b1)!.length >= 2);
  await sleep(100);
  for (const c of [a1, b1]) assert.deepEqual(got.get(c), ['chan:from b', 'chan:from a']);
  assert.deepEqual(got.get(a2), []);
  await end(a1, a2, b1, b2);
});

/** A CancelRequest sent on a connection the kernel gave to a worker other than `not`. */
async function cancelFromOtherWorker(not: number, pid: number, secret: number): Promise<void> {
  for (let i = 0; i < 20; i++) {
    const s = net.connect({ host: '127.0.0.1', port });
    await new Promise((r) => s.once('connect', r));
    if (await workerOfPort(s.localPort!) === not) {
      s.destroy();
      continue;
    }
    const msg = Buffer.alloc(16);
    msg.writeInt32BE(16, 0);
    msg.writeInt32BE(80877102, 4);
    msg.writeInt32BE(pid, 8);
    msg.writeInt32BE(secret, 12);
    s.end(msg);
    return;
  }
  throw new Error('no connection landed on another worker');
}

test('a cancel key reaches its client on either worker, whichever worker receives it', async () => {
  const by = await clientsOnEveryWorker(1);
  for (const [worker, [c]] of by) {
    const key = c as unknown as { processID: number; secretKey: number };
    // pg's own cancel (a fresh connection, wherever it lands)...
    const running = c.query('SELECT pg_sleep(10)').then(() => null, (err: pg.DatabaseError) => err.code);
    await until('the query to run', 3000, async () => (await direct(`SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(10)' AND state = 'active'`)).length > 0);
    await cancelFromOtherWorker(worker, key.processID, key.secretKey);
    const t0 = Date.now();
    assert.equal(await running, '57014');
    assert.ok(Date.now() - t0 < 5000);
    assert.equal((await c.query('SELECT 1 AS x')).rows[0].x, 1);
  }
  await end(...[...by.values()].flat());
});

test('the admin console shows one view: SHOW POOLS sums both workers, SHOW CLIENTS lists them all', async () => {
  const by = await clientsOnEveryWorker(3);
  const clients = [...by.values()].flat();
  await Promise.all(clients.map((c) => c.query('SELECT 1')));
  const pools = await admin('SHOW POOLS');
  const row = pools.find((r) => r.database === 'postgres' && r.user === 'postgres');
  assert.equal(pools.filter((r) => r.database === 'postgres').length, 1);
  assert.equal(Number(row?.cl_active) + Number(row?.cl_waiting), 6);
  const servers = Number(row?.sv_active) + Number(row?.sv_idle) + Number(row?.sv_used) + Number(row?.sv_login);
  assert.ok(servers >= 1 && servers <= POOL_SIZE, `servers ${servers}`);
  assert.equal((await admin('SHOW CLIENTS')).length, 6);
  assert.ok((await admin('SHOW SERVERS')).length <= POOL_SIZE);
  assert.ok(Number((await admin('SHOW STATS')).find((r) => r.database === 'postgres')?.total_xact_count) >= 6);
  await end(...clients);
});

test('a worker killed -9 is replaced, its connection leases return, and new clients are served', async () => {
  const before = await workerPids();
  const by = await clientsOnEveryWorker(POOL_SIZE);
  const [victim, survivor] = [...by.keys()];
  // The victim holds every lease when it dies.
  await Promise.all(by.get(victim)!.map((c) => c.query('BEGIN')));
  const held = await Promise.all(by.get(victim)!.map(async (c) => (await c.query('SELECT pg_backend_pid() AS p')).rows[0].p as number));
  process.kill(victim, 'SIGKILL');
  const after = await until('a new worker', 30_000, async () => {
    const now = await workerPids();
    return now.length === 2 && !now.includes(victim) ? now : undefined;
  });
  assert.ok(after.includes(survivor) && after.some((p) => !before.includes(p)));
  await until('the dead worker\'s backends to go', 10_000, async () =>
    (await direct('SELECT 1 FROM pg_stat_activity WHERE pid = ANY($1)', [held])).length === 0);
  await end(...by.get(victim)!, ...by.get(survivor)!);
  // Every lease is usable again, by clients of both workers (the new one included).
  const fresh = await clientsOnEveryWorker(POOL_SIZE / 2);
  const all = [...fresh.values()].flat();
  await Promise.all(all.map((c) => c.query('BEGIN')));
  const pids = await Promise.all(all.map(async (c) => (await c.query('SELECT pg_backend_pid() AS p')).rows[0].p as number));
  await Promise.all(all.map((c) => c.query('COMMIT')));
  assert.equal(new Set(pids).size, POOL_SIZE);
  await end(...all);
});
