/**
 * Materializer benchmark (issue 12), on a local cluster brought up with `mg cluster up`:
 * `src` (unsharded, CDC on) and `dst` (2 shards), one instance each, one cell.
 *
 *   npm run bench:materializer -- [--rows 200000] [--rate 200] [--seconds 20] [--base-port 25000]
 *
 *  1. Copy phase: MoveTables of a table of --rows rows, rows/s from `create` until the
 *     workflow runs, against the same rows moved by `pg_dump -t | psql` and by
 *     Postgres's own initial sync (CREATE SUBSCRIPTION ... copy_data) into a database of
 *     the target's first Postgres.
 *  2. Catch-up lag: a writer commits --rate rows/s on the source for --seconds; each row's
 *     lag is from its COMMIT to the first time its target shard has it (each shard's
 *     max(id), polled every 20 ms: a shard applies its rows in source order, and ids rise).
 *     p50/p99/max, beside the lag the materializer reports itself.
 *  3. VDiff rows/s on the table.
 *  4. With --switches N (N > 0): N write switches, alternately switch-traffic and
 *     reverse-traffic (decision 0046), while two clients write through the gateway into
 *     `src` without pause: each switch's write gap (as the materializer measured it, and
 *     the slowest client statement around it) and the clients' errors. The target then
 *     has CDC on from the start (reverse replication reads it), which also loads the copy.
 * Ports: base .. base+99. Everything started is stopped at the end (mg cluster down --clean).
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs, promisify } from 'node:util';
import pg from 'pg';
import { shardRanges } from '../compose/spec.ts';
import { hashKeyspaceId, shardFor } from '../schemas/index.ts';
import { materializerApi, sleep, timed, until } from './workflow-api.ts';

const run = promisify(execFile);
const mgBin = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'compose', 'bin', 'mg');
const PG_BIN = '/usr/lib/postgresql/15/bin';
const { values: args } = parseArgs({
  options: {
    rows: { type: 'string', default: '200000' },
    rate: { type: 'string', default: '200' },
    seconds: { type: 'string', default: '20' },
    'base-port': { type: 'string', default: '25000' },
    switches: { type: 'string', default: '0' },
  },
});
const ROWS = Number(args.rows);
const RATE = Number(args.rate);
const SECONDS = Number(args.seconds);
const base = Number(args['base-port']);
const SWITCHES = Number(args.switches);
const port = { src: base + 10, dstFirst: base + 11, gateway: base + 50, materializer: base + 70 };
/** The target's shards in layout order (compose/spec.ts instancesOf): -80 on base+11, 80- on base+12. */
const TARGET_SHARDS = shardRanges(2).map((r, i) => ({ ...r, port: base + 11 + i }));
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-bench-materializer-'));
fs.chmodSync(work, 0o755);
const dataDir = path.join(work, 'cluster');
const TABLE = 'CREATE TABLE items (id bigint PRIMARY KEY, owner bigint NOT NULL, note text NOT NULL, amount numeric(12,2) NOT NULL)';

const mg = (...a: string[]) => run(mgBin, [...a, '--data-dir', dataDir], { timeout: 900_000, maxBuffer: 16 << 20 });
const percentile = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];

async function sql(portNo: number, database: string, text: string, params: unknown[] = []): Promise<any[]> {
  const c = new pg.Client({ host: '127.0.0.1', port: portNo, user: 'postgres', password: 'postgres', database });
  await c.connect();
  try {
    return (await c.query(text, params)).rows;
  } finally {
    await c.end();
  }
}

const api = materializerApi(port.materializer);

async function main(): Promise<void> {
  const spec = path.join(work, 'cluster.yaml');
  fs.writeFileSync(spec, [
    'name: benchmat',
    'cells: [zone1]',
    'databases:',
    '  - { name: src, instancesPerShard: 1, durability: ANY_1, cdc: { enabled: true } }',
    `  - { name: dst, sharded: true, shards: 2, instancesPerShard: 1, durability: ANY_1${SWITCHES > 0 ? ', cdc: { enabled: true }' : ''} }`,
    `kafka: { port: ${base}, controllerPort: ${base + 1} }`,
    `registry: { port: ${base + 2} }`,
    `postgres: { basePort: ${base + 10} }`,
    `pooler: { basePort: ${base + 20}, metricsBasePort: ${base + 30} }`,
    `agent: { metricsBasePort: ${base + 40} }`,
    `gateway: { port: ${port.gateway}, metricsPort: ${base + 51} }`,
    `orchestrator: { basePort: ${base + 60} }`,
    `materializer: { port: ${port.materializer} }`,
    '',
  ].join('\n'));
  console.log(`mg cluster up (src unsharded, dst 2 shards; ports ${base}..${base + 99}) ...`);
  await run(mgBin, ['cluster', 'up', '--spec', spec, '--data-dir', dataDir], { timeout: 900_000, maxBuffer: 16 << 20 });
  const vschema = path.join(work, 'vschema.yaml');
  fs.writeFileSync(vschema, 'vindexes: { hash: { type: hash } }\ntables: { items: { column_vindexes: [{ column: id, name: hash }] } }\n');
  await mg('vschema', 'apply', 'dst', vschema);
  await until('the gateway to know the VSchema', 30_000, () => sql(port.gateway, 'dst', TABLE).then(() => true));

  await sql(port.src, 'src', TABLE);
  const fill = await timed(() => sql(port.src, 'src', `INSERT INTO items SELECT g, g % 1000, md5(g::text) || md5((g * 7)::text), (g % 100000) / 100.0
    FROM generate_series(1, ${ROWS}) g`));
  console.log(`source filled: ${ROWS} rows in ${fill.toFixed(1)} s`);
  // The fill is also ROWS change events on the CDC topic: let them reach Kafka first, or catch-up below would wade through them.
  const filledAt = (await sql(port.src, 'src', 'SELECT pg_current_wal_lsn()::text AS l'))[0].l;
  const streamed = await timed(() => until('the CDC stream past the fill', 600_000, async () => (await sql(port.src, 'src',
    "SELECT bool_and(confirmed_flush_lsn >= $1::pg_lsn) AS done FROM pg_replication_slots WHERE slot_type = 'logical'", [filledAt]))[0].done));
  console.log(`CDC streamed the fill's ${ROWS} change events in ${streamed.toFixed(1)} s (${Math.round(ROWS / streamed)} events/s)`);

  // Baselines into databases of the target's first Postgres (not served by the gateway).
  await sql(port.dstFirst, 'postgres', 'CREATE DATABASE dumped');
  await sql(port.dstFirst, 'dumped', TABLE);
  const dump = await timed(() => run('bash', ['-o', 'pipefail', '-c',
    `${PG_BIN}/pg_dump -h 127.0.0.1 -p ${port.src} -U postgres --data-only -t items src | ${PG_BIN}/psql -q -h 127.0.0.1 -p ${port.dstFirst} -U postgres -d dumped`],
  { maxBuffer: 64 << 20 }));
  await sql(port.dstFirst, 'postgres', 'CREATE DATABASE subscribed');
  await sql(port.dstFirst, 'subscribed', TABLE);
  await sql(port.src, 'src', 'CREATE PUBLICATION bench_items FOR TABLE items');
  const subscribe = await timed(async () => {
    await sql(port.dstFirst, 'subscribed', `CREATE SUBSCRIPTION bench_items CONNECTION 'host=127.0.0.1 port=${port.src} user=postgres dbname=src' PUBLICATION bench_items`);
    await until('the subscription\'s initial sync', 600_000, async () => (await sql(port.dstFirst, 'subscribed',
      "SELECT count(*)::int AS n FROM pg_subscription_rel WHERE srsubstate <> 'r'"))[0].n === 0);
  });
  await sql(port.dstFirst, 'subscribed', 'DROP SUBSCRIPTION bench_items');
  await sql(port.src, 'src', 'DROP PUBLICATION bench_items');

  const copy = await timed(async () => {
    await api('POST', '/v1/workflows', { name: 'bench', source: 'src', target: 'dst', tables: ['items'] });
    await until('the copy phase to end', 1_800_000, async () => {
      const w = await api('GET', '/v1/workflows/bench');
      if (w.phase === 'FAILED') throw new Error(`workflow failed: ${w.message}`);
      return w.phase === 'RUNNING';
    });
  });
  const copied = (await sql(port.gateway, 'dst', 'SELECT count(*)::int AS n FROM items'))[0].n;
  if (copied !== ROWS) throw new Error(`the target has ${copied} rows after the copy, not ${ROWS}`);

  // Catch-up: each committed row's lag until its target shard has it.
  const writer = new pg.Client({ host: '127.0.0.1', port: port.src, user: 'postgres', database: 'src' });
  const probers = TARGET_SHARDS.map((t) => new pg.Client({ host: '127.0.0.1', port: t.port, user: 'postgres', database: 'dst' }));
  for (const c of [writer, ...probers]) c.on('error', (err) => console.error(`bench client: ${err.message}`));
  await Promise.all([writer, ...probers].map((c) => c.connect()));
  const pending = new Map<number, { at: number; shard: number }>();
  const lags: number[] = [];
  const reported: number[] = [];
  let writing = true;
  const write = (async () => {
    const start = performance.now();
    for (let i = 1; performance.now() - start < SECONDS * 1000; i++) {
      const id = ROWS + i;
      await writer.query("INSERT INTO items VALUES ($1::bigint, $1::bigint % 1000, 'catch-up', 1.00)", [id]);
      const shard = TARGET_SHARDS.findIndex((t) => t.shard === shardFor(hashKeyspaceId(id), TARGET_SHARDS));
      pending.set(id, { at: performance.now(), shard });
      const due = start + (i * 1000) / RATE;
      if (due > performance.now()) await sleep(due - performance.now());
    }
    writing = false;
  })();
  const probe = (async () => {
    while (writing || pending.size) {
      const maxima = await Promise.all(probers.map(async (c) => Number((await c.query('SELECT coalesce(max(id), 0) AS m FROM items')).rows[0].m)));
      const now = performance.now();
      for (const [id, w] of pending) {
        if (maxima[w.shard] < id) continue;
        lags.push(now - w.at);
        pending.delete(id);
      }
      const lag = (await api('GET', '/v1/workflows/bench')).progress.lagSeconds;
      if (lag !== null) reported.push(lag * 1000);
      await sleep(20);
    }
  })();
  await Promise.all([write, probe]);
  await Promise.all([writer, ...probers].map((c) => c.end()));
  reported.sort((x, y) => x - y);
  lags.sort((x, y) => x - y);

  const vdiff = await timed(async () => {
    const { id } = await api('POST', '/v1/workflows/bench/vdiff');
    await until('the VDiff report', 600_000, async () => {
      const v = (await api('GET', '/v1/workflows/bench')).vdiff;
      if (v?.id === id && v.state === 'FAILED') throw new Error('VDiff failed');
      return v?.id === id && v.state === 'COMPLETED';
    });
  });
  const total = ROWS + lags.length;

  const rate = (s: number) => Math.round(ROWS / s);
  const faster = Math.max(rate(dump), rate(subscribe));
  console.log(`\n${ROWS} rows (~${Math.round(((await sql(port.src, 'src', "SELECT pg_table_size('items') AS b"))[0].b) / 1e6)} MB), ${os.cpus().length} cores, load ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}, ${new Date().toISOString()}`);
  console.log('| copy of the table | seconds | rows/s | vs the faster baseline |');
  console.log('|---|---|---|---|');
  console.log(`| pg_dump -t items \\| psql (one Postgres) | ${dump.toFixed(1)} | ${rate(dump)} | ${(rate(dump) / faster).toFixed(2)}x |`);
  console.log(`| CREATE SUBSCRIPTION initial sync (one Postgres) | ${subscribe.toFixed(1)} | ${rate(subscribe)} | ${(rate(subscribe) / faster).toFixed(2)}x |`);
  console.log(`| MoveTables copy phase (2 target shards) | ${copy.toFixed(1)} | ${rate(copy)} | ${(rate(copy) / faster).toFixed(2)}x |`);
  console.log(`target (copy at least 0.5x of the faster baseline and 50,000 rows/s): ${rate(copy) >= 0.5 * faster && rate(copy) >= 50_000 ? 'met' : 'NOT met'}`);
  console.log(`\ncatch-up lag, ${lags.length} rows at ${RATE} rows/s for ${SECONDS} s (commit on the source to visible on the target, 20 ms polls):`);
  console.log(`p50 ${percentile(lags, 50).toFixed(0)} ms, p99 ${percentile(lags, 99).toFixed(0)} ms, max ${lags.at(-1)!.toFixed(0)} ms; target p99 < 1 s: ${percentile(lags, 99) < 1000 ? 'met' : 'NOT met'}`);
  console.log(`the materializer's own lagSeconds over the same time (${reported.length} samples): p50 ${percentile(reported, 50).toFixed(0)} ms, p99 ${percentile(reported, 99).toFixed(0)} ms`);
  console.log(`\nVDiff of ${total} rows: ${vdiff.toFixed(1)} s, ${Math.round(total / vdiff)} rows/s`);
  if (SWITCHES > 0) await switches(ROWS + lags.length + 1);
}

/** Write switches back and forth under two writers through the gateway; prints each switch's gap and the writers' errors. */
async function switches(firstId: number): Promise<void> {
  let nextId = firstId;
  let writing = true;
  const errors: string[] = [];
  /** [end time, duration] of every client statement, to find the slowest one around each switch. */
  const statements: Array<[number, number]> = [];
  const writers = [0, 1].map(async () => {
    const c = new pg.Client({ host: '127.0.0.1', port: port.gateway, user: 'postgres', password: 'postgres', database: 'src' });
    c.on('error', (err) => errors.push(err.message));
    await c.connect();
    while (writing) {
      const id = nextId++;
      const t0 = performance.now();
      try {
        await c.query("INSERT INTO items (id, owner, note, amount) VALUES ($1::bigint, $1::bigint % 1000, 'switching', 1.00)", [id]);
        await c.query('UPDATE items SET amount = amount + 1 WHERE id = $1', [id]);
      } catch (err) {
        errors.push(`${id}: ${(err as Error).message}`);
      }
      statements.push([performance.now(), performance.now() - t0]);
    }
    await c.end();
  });
  const rows: string[] = [];
  for (let i = 0; i < SWITCHES; i++) {
    await sleep(1_000);
    const toTarget = i % 2 === 0;
    const t0 = performance.now();
    await api('POST', `/v1/workflows/bench/${toTarget ? 'switch-traffic' : 'reverse-traffic'}`, toTarget ? {} : undefined);
    const w = await until(`switch ${i + 1}`, 120_000, async () => {
      const v = await api('GET', '/v1/workflows/bench');
      if (v.phase === 'FAILED') throw new Error(`workflow failed: ${v.message}`);
      return (toTarget ? v.phase === 'SWITCHED' : v.phase === 'RUNNING' && v.routing === 'SOURCE') ? v : undefined;
    });
    const t1 = performance.now();
    const slowest = Math.max(0, ...statements.filter(([end, ms]) => end >= t0 && end - ms <= t1).map(([, ms]) => ms));
    rows.push(`| ${i + 1} | ${toTarget ? 'to dst' : 'back to src'} | ${/held (\d+) ms/.exec(w.message)?.[1] ?? '?'} | ${slowest.toFixed(0)} | ${((t1 - t0) / 1000).toFixed(1)} |`);
  }
  writing = false;
  await Promise.all(writers);
  const gaps = rows.map((r) => Number(r.split('|')[3])).filter((g) => !Number.isNaN(g)).sort((x, y) => x - y);
  console.log(`\n${SWITCHES} write switches under two writers through the gateway (${statements.length} INSERT+UPDATE pairs):`);
  console.log('| # | direction | writes held (ms, materializer) | slowest client pair around it (ms) | command to done (s) |');
  console.log('|---|---|---|---|---|');
  for (const r of rows) console.log(r);
  console.log(`held: p50 ${percentile(gaps, 50)} ms, max ${gaps.at(-1)} ms; client errors: ${errors.length}${errors.length ? ` (first: ${errors[0]})` : ''}; target (< 1 s, 0 errors): ${gaps.at(-1)! < 1000 && !errors.length ? 'met' : 'NOT met'}`);
}

try {
  await main();
} catch (err) {
  console.error(`bench failed: ${(err as Error).stack ?? err}`);
  process.exitCode = 1;
} finally {
  console.log('\nmg cluster down --clean ...');
  await mg('cluster', 'down', '--clean').catch((err) => console.error(err.message));
  fs.rmSync(work, { recursive: true, force: true });
}
