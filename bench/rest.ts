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
 * Our server talks to Postgres directly here, as PostgREST does: the figures compare the
 * REST layers, not the gateway's pooler hop (docs/bench/proxy.md measures that hop).
 * Ports REST_BENCH_PORT_BASE (default 4400) to +2; REST_BENCH_SECONDS (default 10) per run.
 */
import http from 'node:http';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import autocannon from 'autocannon';
import pg from 'pg';
import { from as copyFrom } from 'pg-copy-streams';
import { createLogger } from '../common/log.ts';
import { RestDatabase } from '../router/rest/database.ts';
import { startRestServer } from '../router/rest/server.ts';
import { removePostgres, restSchemaSql, startPostgres, startPostgrest } from '../test/support/postgrest.ts';

const PG_PORT = Number(process.env.REST_BENCH_PORT_BASE ?? 4400);
const POSTGREST_PORT = PG_PORT + 1;
const OURS_PORT = PG_PORT + 2;
const ROWS = 10_000;
const PARENTS = 1_000;
const BULK_ROWS = 10_000;
const SECONDS = Number(process.env.REST_BENCH_SECONDS ?? 10);
const POOL = 10; // PostgREST's db-pool default

const log = createLogger('bench-rest');
log.level = 'warn';

const postgres = await startPostgres(PG_PORT);
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
  analyze`);
const reference = await startPostgrest({ port: POSTGREST_PORT, dbUri: `postgres://postgres@127.0.0.1:${PG_PORT}/postgres`, pool: POOL });
const db = new RestDatabase({ name: 'postgres', user: 'postgres', schemas: ['public'], endpoint: async () => ({ host: '127.0.0.1', port: PG_PORT }), log, poolSize: POOL });
const ours = await startRestServer({ port: OURS_PORT, config: { schemas: ['public'], anonRole: 'web_anon' }, database: () => db, single: 'postgres', log });
const targets = [['postgrest', POSTGREST_PORT], ['router/rest', OURS_PORT]] as const;

const random = (n: number) => 1 + Math.floor(Math.random() * n);
const json = { 'content-type': 'application/json', prefer: 'return=minimal' };
const scenarios: { name: string; request: () => { method: 'GET' | 'POST'; path: string; headers?: Record<string, string>; body?: string } }[] = [
  { name: 'GET one row', request: () => ({ method: 'GET', path: `/bench_items?id=eq.${random(ROWS)}` }) },
  { name: 'GET embedded 1:10', request: () => ({ method: 'GET', path: `/bench_parents?id=eq.${random(PARENTS)}&select=id,name,bench_children(id,qty)` }) },
  { name: 'POST one row', request: () => ({ method: 'POST', path: '/bench_posts', headers: json, body: `{"name":"n${random(ROWS)}","qty":${random(100)}}` }) },
];

async function load(port: number, connections: number, request: (typeof scenarios)[number]['request']) {
  const result = await autocannon({
    url: `http://127.0.0.1:${port}`, connections, duration: SECONDS,
    requests: [{ setupRequest: (req) => ({ ...req, ...request() }) }],
  });
  if (result.non2xx || result.errors) throw new Error(`port ${port}: ${result.non2xx} non-2xx, ${result.errors} errors`);
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
const bulkPost = (port: number) => () => new Promise<void>((resolve, reject) => {
  const headers = { ...json, 'content-length': Buffer.byteLength(bulkBody) };
  const req = http.request({ port, host: '127.0.0.1', path: '/bench_bulk', method: 'POST', headers, agent: false }, (res) => {
    let body = '';
    res.setEncoding('utf8').on('data', (d: string) => (body += d)).on('end', () =>
      (res.statusCode === 201 ? resolve() : reject(new Error(`port ${port}: bulk POST ${res.statusCode} ${body}`))));
  });
  req.on('error', reject).end(bulkBody);
});

async function copy(): Promise<void> {
  const text = bulkRows.map((r) => `${r.id}\t${r.name}\t${r.qty}\n`).join('');
  await pipeline(Readable.from([text]), admin.query(copyFrom('COPY bench_bulk (id, name, qty) FROM STDIN')));
}

try {
  console.log(`${SECONDS} s per run, pool ${POOL} each, ${new Date().toISOString()}`);
  console.log('| request | conns | PostgREST req/s | p50 / p99 ms | router/rest req/s | p50 / p99 ms | ratio |');
  console.log('|---|---|---|---|---|---|---|');
  for (const scenario of scenarios) {
    for (const connections of [1, 50]) {
      const cells: string[] = [];
      const rps: number[] = [];
      for (const [, port] of targets) {
        await load(port, connections, scenario.request); // warm-up: pools, schema cache, plans
        const r = await load(port, connections, scenario.request);
        cells.push(String(r.rps), `${r.p50} / ${r.p99}`);
        rps.push(r.rps);
      }
      console.log(`| ${scenario.name} | ${connections} | ${cells.join(' | ')} | ${(rps[1] / rps[0]).toFixed(2)}x |`);
    }
  }

  const best = async (fill: () => Promise<void>) => Math.min(...[await timed(fill), await timed(fill), await timed(fill)]);
  const copySeconds = await best(copy);
  console.log(`\nBulk load of ${BULK_ROWS} rows, best of 3:`);
  console.log('| how | s | rows/s | vs COPY |');
  console.log('|---|---|---|---|');
  console.log(`| COPY FROM STDIN | ${copySeconds.toFixed(3)} | ${Math.round(BULK_ROWS / copySeconds)} | 1.00x |`);
  for (const [name, port] of targets) {
    await timed(bulkPost(port)); // warm-up
    const seconds = await best(bulkPost(port));
    console.log(`| ${name} POST | ${seconds.toFixed(3)} | ${Math.round(BULK_ROWS / seconds)} | ${(copySeconds / seconds).toFixed(2)}x |`);
  }
} finally {
  await ours.close();
  await db.close();
  await reference.stop();
  await admin.end();
  await removePostgres(postgres);
}
