/**
 * Sharded query serving benchmark (issue 11):
 *
 *   npm run bench:sharding -- [--shards 4] [--rows 100000] [--seconds 10] [--clients 8] [--base-port 20000] [--out file]
 *
 *  1. Planner cost per statement, in process: a cached plan (lookup, and
 *     lookup + keyspace id + shard), and a cold parse (every text new).
 *  2. One cluster, one gateway, three databases each holding the same `kv`
 *     table of --rows rows: `plain` (unsharded), `one` (sharded, one shard:
 *     the same processes as `plain`, so the difference is the gateway's
 *     sharded path alone) and `sharded` (--shards shards; on this machine their
 *     Postgres and poolers share the same cores as everything else).
 *  3. Single-shard point SELECT TPS (pgbench, custom script, simple and
 *     extended protocol) through the gateway into each database.
 *  4. Scatter `ORDER BY ... LIMIT 10` latency (p50/p99 over 300 runs) into
 *     `sharded` vs the same query into `plain`.
 *  5. A merged scatter read of every row (`ORDER BY` without LIMIT, ~500 B a row): rows/s
 *     into `sharded` and `plain`, and the gateway's resident memory during it.
 *
 * Everything started is stopped at the end (mg cluster down --clean), also on failure.
 * Ports: base .. base+499.
 */
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs, promisify } from 'node:util';
import pg from 'pg';
import { pinnedShards, type Plan } from '../router/planner/plan.ts';
import { Planner, plannerReady } from '../router/planner/planner.ts';
import { parseVSchema } from '../schemas/index.ts';
import { PGBENCH } from './proxy/pgbench.ts';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const mgBin = path.join(root, 'compose', 'bin', 'mg');

const { values: args } = parseArgs({
  options: {
    shards: { type: 'string', default: '4' },
    rows: { type: 'string', default: '100000' },
    seconds: { type: 'string', default: '10' },
    clients: { type: 'string', default: '8' },
    'base-port': { type: 'string', default: '20000' },
    out: { type: 'string' },
  },
});
const SHARDS = Number(args.shards);
const ROWS = Number(args.rows);
const SECONDS = Number(args.seconds);
const CLIENTS = Number(args.clients);
const BASE = Number(args['base-port']);
const VSCHEMA = { vindexes: { hash: { type: 'hash' } }, tables: { kv: { column_vindexes: [{ column: 'k', name: 'hash' }] } } };
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-bench-sharding-'));
fs.chmodSync(work, 0o755);
const lines: string[] = [];
const say = (s: string) => {
  console.log(s);
  lines.push(s);
};

// ---------------------------------------------------------------- 1. the planner
async function plannerCost(): Promise<void> {
  await plannerReady;
  const planner = new Planner(parseVSchema(VSCHEMA));
  const ranges = Array.from({ length: SHARDS }, (_, i) => {
    const b = (x: number) => (x === 0 || x === SHARDS ? '' : (x * (256 / SHARDS)).toString(16).padStart(2, '0'));
    return { shard: `${b(i)}-${b(i + 1)}`, start: b(i), end: b(i + 1) };
  });
  const sql = 'SELECT v FROM kv WHERE k = $1';
  const param = [{ value: Buffer.from('42'), binary: false, typeOid: 0 }];
  const time = (n: number, fn: (i: number) => void) => {
    for (let i = 0; i < Math.min(n, 10_000); i++) fn(i); // warm up
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < n; i++) fn(i);
    return Number(process.hrtime.bigint() - t0) / n / 1000;
  };
  const lookup = time(1_000_000, () => planner.plan(sql));
  const routed = time(200_000, () => pinnedShards((planner.plan(sql)[0] as Extract<Plan, { kind: 'select' | 'write' }>).pin!, ranges, param));
  const xx = new Planner(parseVSchema({ vindexes: { xx: { type: 'xxhash' } }, tables: { kv: { column_vindexes: [{ column: 'k', name: 'xx' }] } } }));
  const routedXx = time(200_000, () => pinnedShards((xx.plan(sql)[0] as Extract<Plan, { kind: 'select' | 'write' }>).pin!, ranges, param));
  const shaped = time(200_000, (i) => planner.plan(`SELECT v FROM kv WHERE k = ${i + 1}`));
  const shapedSemicolon = time(200_000, (i) => planner.plan(`SELECT v FROM kv WHERE k = ${i + 1};`));
  const cold = time(20_000, (i) => planner.plan(`SELECT v FROM kv WHERE k = ${i + 1_000_000} AND n > ${i}.5`));
  const coldScatter = time(20_000, (i) => planner.plan(`SELECT k, n FROM kv WHERE n > ${i} ORDER BY n DESC, k LIMIT 10`));
  say('## Planner cost per statement (in process, one core)');
  say('');
  say('| what | us per statement |');
  say('|---|---|');
  say(`| cached plan: lookup by text | ${lookup.toFixed(3)} |`);
  say(`| cached plan + keyspace id (hash: 3DES) + shard of a $1 bind | ${routed.toFixed(3)} |`);
  say(`| cached plan + keyspace id (xxhash) + shard of a $1 bind | ${routedXx.toFixed(3)} |`);
  say(`| new text, known shape (simple protocol, literals differ): lexing + plan from the shape | ${shaped.toFixed(3)} |`);
  say(`| the same, the text ending in \`;\` (as pgbench and psql send it) | ${shapedSemicolon.toFixed(3)} |`);
  say(`| cold: parse + plan, point SELECT | ${cold.toFixed(1)} |`);
  say(`| cold: parse + plan, scatter ORDER BY ... LIMIT | ${coldScatter.toFixed(1)} |`);
  say('');
}

// ---------------------------------------------------------------- 2. one cluster, three databases
interface Bench { name: string; dataDir: string; gatewayPort: number }
let cluster: Bench | undefined;
const DATABASES = ['plain', 'one', 'sharded'] as const;
type Database = (typeof DATABASES)[number];

async function clusterUp(base: number): Promise<Bench> {
  const dataDir = path.join(work, 'cluster');
  const spec = path.join(work, 'cluster.yaml');
  const db = (name: Database, shards: number, sharded: boolean) => `{ name: ${name}, sharded: ${sharded}, shards: ${shards}, instancesPerShard: 1, durability: ANY_1 }`;
  fs.writeFileSync(spec, [
    'name: shardbench',
    'cells: [zone1]',
    `databases: [${db('plain', 1, false)}, ${db('one', 1, true)}, ${db('sharded', SHARDS, true)}]`,
    `kafka: { port: ${base + 490}, controllerPort: ${base + 491} }`,
    `registry: { port: ${base + 481} }`,
    `postgres: { basePort: ${base} }`,
    `pooler: { basePort: ${base + 200}, metricsBasePort: ${base + 300} }`,
    `gateway: { port: ${base + 400}, metricsPort: ${base + 401} }`,
    `agent: { metricsBasePort: ${base + 100} }`,
    `orchestrator: { basePort: ${base + 450} }`,
    '',
  ].join('\n'));
  cluster = { name: 'shardbench', dataDir, gatewayPort: base + 400 };
  const t0 = performance.now();
  await run(mgBin, ['cluster', 'up', '--spec', spec, '--data-dir', dataDir], { timeout: 600_000, maxBuffer: 16 << 20 });
  console.log(`cluster up in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  return cluster;
}

const client = async (database: Database) => {
  const c = new pg.Client({ host: '127.0.0.1', port: cluster!.gatewayPort, user: 'postgres', password: 'postgres', database });
  await c.connect();
  return c;
};

async function load(database: Database): Promise<void> {
  const c = await client(database);
  try {
    await c.query('CREATE TABLE kv (k bigint PRIMARY KEY, v text NOT NULL, n int NOT NULL)');
    for (let from = 1; from <= ROWS; from += 1000) {
      const values = Array.from({ length: Math.min(1000, ROWS - from + 1) }, (_, i) => `(${from + i}, 'value ${from + i}', ${((from + i) * 7919) % 100_003})`);
      await c.query(`INSERT INTO kv (k, v, n) VALUES ${values.join(', ')}`);
    }
    await c.query('ANALYZE kv');
  } finally {
    await c.end();
  }
}

// ---------------------------------------------------------------- 3. point SELECT TPS
async function pgbench(database: Database, mode: 'simple' | 'extended'): Promise<number> {
  const script = path.join(work, 'point.sql');
  fs.writeFileSync(script, `\\set k random(1, ${ROWS})\nSELECT v FROM kv WHERE k = :k;\n`);
  const out = await new Promise<string>((resolve, reject) => {
    const p = spawn(PGBENCH, ['-n', '-f', script, '-M', mode, '-c', String(CLIENTS), '-j', '2', '-T', String(SECONDS), '-h', '127.0.0.1', '-p', String(cluster!.gatewayPort), '-U', 'postgres', database], {
      env: { ...process.env, PGPASSWORD: 'postgres', PGSSLMODE: 'disable' },
    });
    let text = '';
    p.stdout.on('data', (d) => (text += d));
    p.stderr.on('data', (d) => (text += d));
    p.on('error', reject);
    p.on('close', () => resolve(text));
  });
  const tps = /tps = ([\d.]+) \(without initial connection time\)/.exec(out);
  if (!tps) throw new Error(`pgbench into ${database} printed no TPS:\n${out}`);
  return Number(tps[1]);
}

// ---------------------------------------------------------------- 4. scatter ORDER BY LIMIT
async function latency(database: Database, sql: string, runs = 300): Promise<{ p50: number; p99: number }> {
  const c = await client(database);
  try {
    for (let i = 0; i < 20; i++) await c.query(sql);
    const ms: number[] = [];
    for (let i = 0; i < runs; i++) {
      const t0 = performance.now();
      await c.query(sql);
      ms.push(performance.now() - t0);
    }
    ms.sort((x, y) => x - y);
    return { p50: ms[Math.floor(runs * 0.5)], p99: ms[Math.floor(runs * 0.99)] };
  } finally {
    await c.end();
  }
}

// ---------------------------------------------------------------- 5. merged scatter read of every row
/** The gateway's resident memory, from its /metrics. */
async function gatewayRss(): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${cluster!.gatewayPort + 1}/metrics`)).text();
  return Number(/^mg_process_resident_memory_bytes (\d+)/m.exec(text)![1]);
}

/** Rows/s of `sql` (best of `runs`), and the gateway's RSS before and at its highest during the runs (sampled every 20 ms). */
async function wholeRead(database: Database, sql: string, runs = 5): Promise<{ rowsPerSecond: number; before: number; peak: number }> {
  const c = await client(database);
  try {
    await c.query(sql);
    const before = await gatewayRss();
    let peak = before;
    let best = 0;
    for (let i = 0; i < runs; i++) {
      let sampling = true;
      const sampler = (async () => {
        while (sampling) {
          peak = Math.max(peak, await gatewayRss());
          await new Promise((r) => setTimeout(r, 20));
        }
      })();
      const t0 = performance.now();
      const { rowCount } = await c.query(sql);
      const seconds = (performance.now() - t0) / 1000;
      sampling = false;
      await sampler;
      best = Math.max(best, (rowCount ?? 0) / seconds);
    }
    return { rowsPerSecond: best, before, peak };
  } finally {
    await c.end();
  }
}

async function main(): Promise<void> {
  say(`# Sharding benchmark, ${new Date().toISOString()}`);
  say('');
  say(`Load average at start: ${os.loadavg().map((l) => l.toFixed(1)).join(', ')} (other work on the machine skews every figure).`);
  say('');
  say(`Machine: ${os.cpus().length} cores (${os.cpus()[0]?.model ?? '?'}), ${Math.round(os.totalmem() / 2 ** 30)} GiB, Node ${process.version}; ${SHARDS} shards, ${ROWS} rows, pgbench -c ${CLIENTS} -j 2 -T ${SECONDS}.`);
  say('');
  await plannerCost();

  const { dataDir } = await clusterUp(BASE);
  const vschema = path.join(work, 'vschema.yaml');
  fs.writeFileSync(vschema, JSON.stringify(VSCHEMA));
  for (const database of ['one', 'sharded']) await run(mgBin, ['vschema', 'apply', database, vschema, '--data-dir', dataDir]);
  await new Promise((r) => setTimeout(r, 2_000)); // the gateway folds the VSchemas from Kafka
  for (const database of DATABASES) await load(database);

  say('## Single-shard point SELECT through the gateway');
  say('');
  say('Runs alternate between the databases, twice, so load that comes and goes on the machine falls on each alike; the TPS is the better of the two.');
  say('');
  say(`| protocol | plain (unsharded) TPS | one (1 shard) TPS | sharded (${SHARDS} shards) TPS | one / plain | sharded / plain |`);
  say('|---|---|---|---|---|---|');
  for (const mode of ['simple', 'extended'] as const) {
    const best: Record<Database, number> = { plain: 0, one: 0, sharded: 0 };
    for (let round = 0; round < 2; round++) {
      for (const database of DATABASES) best[database] = Math.max(best[database], await pgbench(database, mode));
    }
    say(`| ${mode} | ${best.plain.toFixed(0)} | ${best.one.toFixed(0)} | ${best.sharded.toFixed(0)} | ${(best.one / best.plain).toFixed(2)}x | ${(best.sharded / best.plain).toFixed(2)}x |`);
  }
  say('');

  const scatter = 'SELECT k, n FROM kv ORDER BY n DESC, k LIMIT 10';
  const u = await latency('plain', scatter);
  const s = await latency('sharded', scatter);
  say(`## Scatter \`${scatter}\` (300 runs, one client)`);
  say('');
  say('| target | p50 ms | p99 ms |');
  say('|---|---|---|');
  say(`| one unsharded Postgres, all ${ROWS} rows | ${u.p50.toFixed(2)} | ${u.p99.toFixed(2)} |`);
  say(`| ${SHARDS} shards, merged at the gateway | ${s.p50.toFixed(2)} | ${s.p99.toFixed(2)} |`);
  say('');

  const whole = 'SELECT k, n, repeat(v, 40) AS pad FROM kv ORDER BY n, k'; // about 500 bytes a row
  say(`## Merged scatter read of every row: \`${whole}\` (best of 5 runs, one client, node-postgres)`);
  say('');
  say('| target | rows/s | gateway RSS before (MB) | gateway RSS peak during (MB) |');
  say('|---|---|---|---|');
  for (const [database, label] of [['plain', `one unsharded Postgres, all ${ROWS} rows`], ['sharded', `${SHARDS} shards, merged at the gateway`]] as const) {
    const r = await wholeRead(database, whole);
    say(`| ${label} | ${r.rowsPerSecond.toFixed(0)} | ${(r.before / 1e6).toFixed(0)} | ${(r.peak / 1e6).toFixed(0)} |`);
  }
  say('');
  if (args.out) fs.writeFileSync(args.out, `${lines.join('\n')}\n`);
}

async function teardown(): Promise<void> {
  if (cluster) await run(mgBin, ['cluster', 'down', '--clean', '--data-dir', cluster.dataDir], { timeout: 300_000 }).catch((err) => console.error(`cluster down failed: ${err.message}`));
  fs.rmSync(work, { recursive: true, force: true });
}

process.on('SIGINT', () => void teardown().then(() => process.exit(130)));
main().then(
  () => teardown(),
  async (err) => {
    console.error(err);
    await teardown();
    process.exitCode = 1;
  },
);
