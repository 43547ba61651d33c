/**
 * REST benchmark (`npm run bench:rest`), issue 14's figures: PostgREST 12.0.2 and
 * router/rest against the same Postgres 15 in the same run, each with a pool of 10.
 *
 *  1. At 1 and 50 concurrent connections (autocannon, keep-alive), req/s and p50/p99:
 *     - `GET /bench_items?id=eq.N` (N random over 10,000 rows);
 *     - an embedded one-to-many `GET /bench_parents?id=eq.N&select=id,name,bench_children(id,qty)`
 *       (10 children each);
 *     - a `POST` of one row (`Prefer: return=minimal`).
 *  2. A bulk `POST` of 10,000 rows in one JSON array: rows/s, against `COPY ... FROM STDIN`
 *     of the same rows (pg-copy-streams), best of 3 each.
 *
 * Three targets on the same Postgres: PostgREST and router/rest in this process, each talking to
 * Postgres directly (the REST layers alone), and the MultiGateway's HTTP port of a real cluster
 * (`mg cluster up`, one instance), whose requests go through its MultiPooler as in production.
 * That Postgres is the cluster's primary; REST_BENCH_GATEWAY=0 leaves the cluster out and
 * starts a bare Postgres instead.
 * Ports REST_BENCH_PORT_BASE (default 4400) to +99; REST_BENCH_SECONDS (default 10) per run.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { promisify } from 'node:util';
import autocannon from 'autocannon';
import pg from 'pg';
import { from as copyFrom } from 'pg-copy-streams';
import { createLogger } from '../common/log.ts';
import { RestDatabase } from '../router/rest/database.ts';
import { startRestServer } from '../router/rest/server.ts';
import { removePostgres, restSchemaSql, startPostgres, startPostgrest } from '../test/support/postgrest.ts';

const BASE = Number(process.env.REST_BENCH_PORT_BASE ?? 4400);
const POSTGREST_PORT = BASE + 1;
const OURS_PORT = BASE + 2;
const GATEWAY = process.env.REST_BENCH_GATEWAY !== '0';
const ROWS = 10_000;
const PARENTS = 1_000;
const BULK_ROWS = 10_000;
const SECONDS = Number(process.env.REST_BENCH_SECONDS ?? 10);
const POOL = 10; // PostgREST's db-pool default

const log = createLogger('bench-rest');
log.level = 'warn';

const mgBin = path.join(import.meta.dirname, '..', 'compose', 'bin', 'mg');
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-bench-rest-'));
fs.chmodSync(work, 0o755); // the postgres OS user must enter it
const dataDir = path.join(work, 'cluster');
const GATEWAY_HTTP_PORT = BASE + 52;

/** One database, one instance; the cluster's ports from BASE + 10 up. Returns its Postgres port. */
async function clusterUp(): Promise<number> {
  const spec = path.join(work, 'cluster.yaml');
  fs.writeFileSync(spec, [
    'name: restbench',
    'cells: [zone1]',
    'databases: [{ name: postgres, shards: 1, instancesPerShard: 1, durability: ANY_1 }]',
    `postgres: { basePort: ${BASE + 10} }`,
    `pooler: { basePort: ${BASE + 20}, metricsBasePort: ${BASE + 30} }`,
    `agent: { metricsBasePort: ${BASE + 40} }`,
    `gateway: { port: ${BASE + 50}, metricsPort: ${BASE + 51}, httpPort: ${GATEWAY_HTTP_PORT}, restSchemas: [public], restAnonRole: web_anon }`,
    `orchestrator: { basePort: ${BASE + 60} }`,
    `registry: { port: ${BASE + 70} }`,
    `kafka: { port: ${BASE + 80}, controllerPort: ${BASE + 81} }`,
    // The first full backup, taken as the cluster comes up, would run beside the first measurements.
    'backup: { enabled: false }',
    '',
  ].join('\n'));
  const t0 = performance.now();
  await promisify(execFile)(mgBin, ['cluster', 'up', '--spec', spec, '--data-dir', dataDir], { timeout: 900_000, maxBuffer: 16 << 20 });
  console.log(`cluster up in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  return BASE + 10;
}

const postgres = GATEWAY ? undefined : await startPostgres(BASE);
const PG_PORT = GATEWAY ? await clusterUp() : BASE;
const admin = new pg.Client({ host: '127.0.0.1', port: PG_PORT, user: 'postgres', database: 'postgres' });
await admin.connect();
await admin.query(restSchemaSql);
await admin.query(`create table bench_items (id int primary key, name text not null, price numeric, tags text[]);
  insert into bench_items select i, 'item ' || i, i * 1.5, array['a', 'b'] from generate_series(1, ${ROWS}) i;
  create table bench_parents (id int primary key, name text not null);
  create table bench_children (id int primary key, parent_id int not null references bench_parents, qty int not null);
  create index on bench_children (parent_id);
  insert into bench_parents select i, 'parent ' || i from generate_series(1, ${PARENTS}) i;
  insert into bench_children select i, 1 + (i - 1) / 10, i % 7 from generate_series(1, ${PARENTS * 10}) i;
  create table bench_posts (id bigint generated always as identity primary key, name text not null, qty int not null);
  create table bench_bulk (id int primary key, name text not null, qty int not null);
  grant select on bench_items, bench_parents, bench_children to web_anon;
  grant insert on bench_posts, bench_bulk to web_anon;
  analyze;
  notify pgrst, 'reload schema'`);
const reference = await startPostgrest({ port: POSTGREST_PORT, dbUri: `postgres://postgres@127.0.0.1:${PG_PORT}/postgres`, pool: POOL });
const db = new RestDatabase({ name: 'postgres', user: 'postgres', schemas: ['public'], endpoint: async () => ({ host: '127.0.0.1', port: PG_PORT }), log, poolSize: POOL });
const ours = await startRestServer({ port: OURS_PORT, config: { schemas: ['public'], anonRole: 'web_anon' }, database: () => db, single: 'postgres', log });
/** Where each target answers: its port, and the path before `/table` (the gateway's names the database). */
const targets: Array<{ name: string; port: number; prefix: string }> = [
  { name: 'PostgREST', port: POSTGREST_PORT, prefix: '' },
  { name: 'router/rest', port: OURS_PORT, prefix: '' },
  ...(GATEWAY ? [{ name: 'gateway', port: GATEWAY_HTTP_PORT, prefix: '/postgres' }] : []),
];
type Target = (typeof targets)[number];

const random = (n: number) => 1 + Math.floor(Math.random() * n);
const json = { 'content-type': 'application/json', prefer: 'return=minimal' };
const scenarios: { name: string; request: () => { method: 'GET' | 'POST'; path: string; headers?: Record<string, string>; body?: string } }[] = [
  { name: 'GET one row', request: () => ({ method: 'GET', path: `/bench_items?id=eq.${random(ROWS)}` }) },
  { name: 'GET embedded 1:10', request: () => ({ method: 'GET', path: `/bench_parents?id=eq.${random(PARENTS)}&select=id,name,bench_children(id,qty)` }) },
  { name: 'POST one row', request: () => ({ method: 'POST', path: '/bench_posts', headers: json, body: `{"name":"n${random(ROWS)}","qty":${random(100)}}` }) },
];

async function load(target: Target, connections: number, request: (typeof scenarios)[number]['request']) {
  const result = await autocannon({
    url: `http://127.0.0.1:${target.port}`, connections, duration: SECONDS,
    requests: [{ setupRequest: (req) => { const r = request(); return { ...req, ...r, path: target.prefix + r.path }; } }],
  });
  if (result.non2xx || result.errors) throw new Error(`${target.name}: ${result.non2xx} non-2xx, ${result.errors} errors`);
  return { rps: Math.round(result.requests.average), p50: result.latency.p50, p99: result.latency.p99 };
}

const bulkRows = Array.from({ length: BULK_ROWS }, (_, i) => ({ id: i + 1, name: `bulk ${i + 1}`, qty: i % 100 }));
const bulkBody = JSON.stringify(bulkRows);

/** Seconds for one bulk load into an empty bench_bulk. */
async function timed(fill: () => Promise<void>): Promise<number> {
  await admin.query('truncate bench_bulk');
  const t0 = performance.now();
  await fill();
  const seconds = (performance.now() - t0) / 1000;
  const { rows: [{ n }] } = await admin.query('select count(*)::int as n from bench_bulk');
  if (n !== BULK_ROWS) throw new Error(`bulk load left ${n} rows, not ${BULK_ROWS}`);
  return seconds;
}

/** On a connection of its own: a kept-alive one the server has just timed out would fail the request. */
const bulkPost = (target: Target) => () => new Promise<void>((resolve, reject) => {
  const headers = { ...json, 'content-length': Buffer.byteLength(bulkBody) };
  const req = http.request({ port: target.port, host: '127.0.0.1', path: `${target.prefix}/bench_bulk`, method: 'POST', headers, agent: false }, (res) => {
    let body = '';
    res.setEncoding('utf8').on('data', (d: string) => (body += d)).on('end', () =>
      (res.statusCode === 201 ? resolve() : reject(new Error(`${target.name}: bulk POST ${res.statusCode} ${body}`))));
  });
  req.on('error', reject).end(bulkBody);
});

/** COPY FROM STDIN of the bulk rows on `client`: straight to Postgres, or through the gateway's wire port. */
const copy = (client: pg.Client) => async () => {
  const text = bulkRows.map((r) => `${r.id}\t${r.name}\t${r.qty}\n`).join('');
  await pipeline(Readable.from([text]), client.query(copyFrom('COPY bench_bulk (id, name, qty) FROM STDIN')));
};

try {
  console.log(`${SECONDS} s per run, pool ${POOL} each, ${new Date().toISOString()}`);
  const others = targets.slice(1).map((t) => t.name);
  console.log(`| request | conns | ${targets.map((t) => `${t.name} req/s | p50 / p99 ms`).join(' | ')} | ${others.map((n) => `${n} / PostgREST`).join(' | ')} |`);
  console.log(`|---|---|${targets.map(() => '---|---|').join('')}${others.map(() => '---|').join('')}`);
  for (const scenario of scenarios) {
    for (const connections of [1, 50]) {
      const cells: string[] = [];
      const rps: number[] = [];
      for (const target of targets) {
        await load(target, connections, scenario.request); // warm-up: pools, schema cache, plans
        const r = await load(target, connections, scenario.request);
        cells.push(String(r.rps), `${r.p50} / ${r.p99}`);
        rps.push(r.rps);
      }
      console.log(`| ${scenario.name} | ${connections} | ${cells.join(' | ')} | ${rps.slice(1).map((x) => `${(x / rps[0]).toFixed(2)}x`).join(' | ')} |`);
    }
  }

  const best = async (fill: () => Promise<void>) => Math.min(...[await timed(fill), await timed(fill), await timed(fill)]);
  const copies: Array<[string, pg.Client]> = [['COPY FROM STDIN, straight to Postgres', admin]];
  if (GATEWAY) {
    const wire = new pg.Client({ host: '127.0.0.1', port: BASE + 50, user: 'postgres', password: 'postgres', database: 'postgres' });
    await wire.connect();
    copies.push(['COPY FROM STDIN through the gateway', wire]);
  }
  const copied: Array<[string, number]> = [];
  for (const [how, client] of copies) copied.push([how, await best(copy(client))]);
  await copies[1]?.[1].end();
  const copySeconds = copied[copied.length - 1][1]; // the issue's yardstick: COPY through the gateway
  console.log(`\nBulk load of ${BULK_ROWS} rows, best of 3, against ${copied[copied.length - 1][0]}:`);
  console.log('| how | s | rows/s | vs COPY |');
  console.log('|---|---|---|---|');
  for (const [how, seconds] of copied) console.log(`| ${how} | ${seconds.toFixed(3)} | ${Math.round(BULK_ROWS / seconds)} | ${(copySeconds / seconds).toFixed(2)}x |`);
  for (const target of targets) {
    await timed(bulkPost(target)); // warm-up
    const seconds = await best(bulkPost(target));
    console.log(`| ${target.name} POST | ${seconds.toFixed(3)} | ${Math.round(BULK_ROWS / seconds)} | ${(copySeconds / seconds).toFixed(2)}x |`);
  }
} finally {
  await ours.close();
  await db.close();
  await reference.stop();
  await admin.end();
  if (postgres) await removePostgres(postgres);
  else await promisify(execFile)(mgBin, ['cluster', 'down', '--clean', '--data-dir', dataDir], { timeout: 300_000 }).catch((err) => console.error(`cluster down failed: ${err.message}`));
  fs.rmSync(work, { recursive: true, force: true });
}
