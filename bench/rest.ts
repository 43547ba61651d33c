/**
 * REST benchmark (`npm run bench:rest`): `GET /bench_items?id=eq.N` (N random)
 * at 1 and 50 concurrent connections (autocannon, keep-alive), req/s and
 * p50/p99 latency, for PostgREST 12.0.2 and for router/rest, against the same
 * Postgres 15 in the same run. Our server talks to Postgres directly here (as
 * PostgREST does), so the figures compare the REST layers, not the gateway's
 * pooler hop. Ports REST_BENCH_PORT_BASE (default 4400) to +2; set
 * REST_BENCH_SECONDS (default 10) per target.
 */
import autocannon from 'autocannon';
import pg from 'pg';
import { createLogger } from '../common/log.ts';
import { RestDatabase } from '../router/rest/database.ts';
import { startRestServer } from '../router/rest/server.ts';
import { removePostgres, restSchemaSql, startPostgres, startPostgrest } from '../test/support/postgrest.ts';

const PG_PORT = Number(process.env.REST_BENCH_PORT_BASE ?? 4400);
const POSTGREST_PORT = PG_PORT + 1;
const OURS_PORT = PG_PORT + 2;
const ROWS = 10_000;
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
  grant select on bench_items to web_anon; analyze bench_items`);
const reference = await startPostgrest({ port: POSTGREST_PORT, dbUri: `postgres://postgres@127.0.0.1:${PG_PORT}/postgres`, pool: POOL });
const db = new RestDatabase({ name: 'postgres', user: 'postgres', schemas: ['public'], endpoint: async () => ({ host: '127.0.0.1', port: PG_PORT }), log, poolSize: POOL });
const ours = await startRestServer({ port: OURS_PORT, config: { schemas: ['public'], anonRole: 'web_anon' }, database: () => db, single: 'postgres', log });

async function load(port: number, connections: number) {
  const result = await autocannon({
    url: `http://127.0.0.1:${port}`, connections, duration: SECONDS,
    requests: [{ setupRequest: (req) => ({ ...req, path: `/bench_items?id=eq.${1 + Math.floor(Math.random() * ROWS)}` }) }],
  });
  if (result.non2xx || result.errors) throw new Error(`port ${port}: ${result.non2xx} non-2xx, ${result.errors} errors`);
  return { rps: Math.round(result.requests.average), p50: result.latency.p50, p99: result.latency.p99 };
}

try {
  console.log(`GET /bench_items?id=eq.N, ${SECONDS} s per target, pool ${POOL} each, ${new Date().toISOString()}`);
  console.log('target       conns   req/s   p50 ms   p99 ms');
  for (const connections of [1, 50]) {
    for (const [name, port] of [['postgrest', POSTGREST_PORT], ['router/rest', OURS_PORT]] as const) {
      await load(port, connections); // warm-up: pools, schema cache, plans
      const r = await load(port, connections);
      console.log(`${name.padEnd(12)} ${String(connections).padStart(5)} ${String(r.rps).padStart(7)} ${String(r.p50).padStart(8)} ${String(r.p99).padStart(8)}`);
    }
  }
} finally {
  await ours.close();
  await db.close();
  await reference.stop();
  await admin.end();
  await removePostgres(postgres);
}
