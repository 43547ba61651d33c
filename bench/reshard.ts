/**
 * A sharded source against an unsharded one (decision 0051), on a local cluster brought
 * up with `mg cluster up`: `flat` (unsharded), `two` (2 shards), both with CDC on and the
 * same --rows rows (table a on flat, table b on two), and `dst` (2 shards), one instance
 * each, one cell. MoveTables a: flat -> dst, then b: two -> dst (one at a time, same
 * target shards): copy rows/s from `create` until the workflow runs, and VDiff rows/s,
 * the sharded source as a ratio of the unsharded one.
 *
 *   npm run bench:reshard -- [--rows 100000] [--base-port 25100]
 *
 * Ports: base .. base+99. Everything started is stopped at the end (mg cluster down --clean).
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs, promisify } from 'node:util';
import pg from 'pg';
import { instancesOf, parseSpec, shardRanges } from '../compose/spec.ts';
import { hashKeyspaceId, shardFor } from '../schemas/index.ts';
import { materializerApi, sleep, timed, until } from './workflow-api.ts';

const run = promisify(execFile);
const mgBin = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'compose', 'bin', 'mg');
const { values: args } = parseArgs({ options: { rows: { type: 'string', default: '100000' }, 'base-port': { type: 'string', default: '25100' } } });
const ROWS = Number(args.rows);
const base = Number(args['base-port']);
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-bench-reshard-'));
fs.chmodSync(work, 0o755);
const dataDir = path.join(work, 'cluster');
const columns = (t: string) => `CREATE TABLE ${t} (id bigint PRIMARY KEY, owner bigint NOT NULL, note text NOT NULL, amount numeric(12,2) NOT NULL)`;
const FILL = "SELECT g, g % 1000, md5(g::text) || md5((g * 7)::text), (g % 100000) / 100.0 FROM unnest($1::bigint[]) g";
const spec = {
  name: 'benchreshard', dataDir, cells: ['zone1'],
  databases: [
    { name: 'flat', instancesPerShard: 1, durability: 'ANY_1', cdc: { enabled: true } },
    { name: 'two', sharded: true, shards: 2, instancesPerShard: 1, durability: 'ANY_1', cdc: { enabled: true } },
    { name: 'dst', sharded: true, shards: 2, instancesPerShard: 1, durability: 'ANY_1' },
  ],
  kafka: { port: base, controllerPort: base + 1 }, registry: { port: base + 2 }, postgres: { basePort: base + 10 },
  pooler: { basePort: base + 20, metricsBasePort: base + 30 }, agent: { metricsBasePort: base + 40 },
  gateway: { port: base + 50, metricsPort: base + 51 }, orchestrator: { basePort: base + 60 }, materializer: { port: base + 70 },
};
const portOf = (db: string, shard: string) => instancesOf(parseSpec(spec)).find((i) => i.database === db && i.shard === shard)!.port;

const mg = (...a: string[]) => run(mgBin, [...a, '--data-dir', dataDir], { timeout: 900_000, maxBuffer: 16 << 20 });

async function sql(portNo: number, database: string, text: string, params: unknown[] = []): Promise<any[]> {
  const c = new pg.Client({ host: '127.0.0.1', port: portNo, user: 'postgres', password: 'postgres', database });
  await c.connect();
  try {
    return (await c.query(text, params)).rows;
  } finally {
    await c.end();
  }
}

const api = materializerApi(spec.materializer.port);

/** Copy (create until RUNNING) and VDiff seconds of a MoveTables of `table` from `source` into dst. */
async function move(name: string, source: string, table: string): Promise<{ copy: number; vdiff: number }> {
  const copy = await timed(async () => {
    await api('POST', '/v1/workflows', { name, source, target: 'dst', tables: [table] });
    await until(`${name}'s copy phase to end`, 1_800_000, async () => {
      const w = await api('GET', `/v1/workflows/${name}`);
      if (w.phase === 'FAILED') throw new Error(`workflow ${name} failed: ${w.message}`);
      return w.phase === 'RUNNING';
    });
  });
  const copied = (await sql(spec.gateway.port, 'dst', `SELECT count(*)::int AS n FROM ${table}`))[0].n;
  if (copied !== ROWS) throw new Error(`dst has ${copied} rows of ${table} after the copy, not ${ROWS}`);
  const vdiff = await timed(async () => {
    const { id } = await api('POST', `/v1/workflows/${name}/vdiff`);
    await until(`${name}'s VDiff report`, 600_000, async () => {
      const v = (await api('GET', `/v1/workflows/${name}`)).vdiff;
      if (v?.id === id && v.state === 'FAILED') throw new Error('VDiff failed');
      if (v?.id === id && v.state === 'COMPLETED' && v.tables.some((t: any) => t.missing !== '0' || t.extra !== '0' || t.different !== '0')) throw new Error(`VDiff of ${name} found differences`);
      return v?.id === id && v.state === 'COMPLETED';
    });
  });
  return { copy, vdiff };
}

async function main(): Promise<void> {
  const specFile = path.join(work, 'cluster.json');
  fs.writeFileSync(specFile, JSON.stringify(spec));
  console.log(`mg cluster up (flat unsharded, two and dst 2 shards; ports ${base}..${base + 99}) ...`);
  await run(mgBin, ['cluster', 'up', '--spec', specFile, '--data-dir', dataDir], { timeout: 900_000, maxBuffer: 16 << 20 });
  const vschema = path.join(work, 'vschema.yaml');
  fs.writeFileSync(vschema, 'vindexes: { hash: { type: hash } }\ntables:\n  a: { column_vindexes: [{ column: id, name: hash }] }\n  b: { column_vindexes: [{ column: id, name: hash }] }\n');
  for (const db of ['two', 'dst']) await mg('vschema', 'apply', db, vschema);

  const ids = Array.from({ length: ROWS }, (_, i) => i + 1);
  const sources = [{ port: portOf('flat', shardRanges(1)[0].shard), db: 'flat', table: 'a', ids }];
  for (const r of shardRanges(2)) sources.push({ port: portOf('two', r.shard), db: 'two', table: 'b', ids: ids.filter((id) => shardFor(hashKeyspaceId(String(id)), shardRanges(2)) === r.shard) });
  for (const s of sources) {
    await sql(s.port, s.db, columns(s.table));
    await sql(s.port, s.db, `INSERT INTO ${s.table} ${FILL}`, [s.ids]);
  }
  // The fill is also ROWS change events per source: let them reach Kafka first, or catch-up would wade through them.
  await until('the CDC streams past the fill', 600_000, async () => {
    for (const s of sources) {
      const [{ done }] = await sql(s.port, s.db, "SELECT bool_and(confirmed_flush_lsn >= pg_current_wal_lsn()) AS done FROM pg_replication_slots WHERE slot_type = 'logical'");
      if (!done) return false;
    }
    return true;
  });

  const flat = await move('from_flat', 'flat', 'a');
  const sharded = await move('from_two', 'two', 'b');
  const rate = (s: number) => Math.round(ROWS / s);
  console.log(`\n${ROWS} rows, ${os.cpus().length} cores, load ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}, ${new Date().toISOString()}`);
  console.log('| MoveTables into 2 shards | copy s | copy rows/s | VDiff s | VDiff rows/s |');
  console.log('|---|---|---|---|---|');
  console.log(`| from an unsharded source (baseline) | ${flat.copy.toFixed(1)} | ${rate(flat.copy)} | ${flat.vdiff.toFixed(1)} | ${rate(flat.vdiff)} |`);
  console.log(`| from a 2-shard source | ${sharded.copy.toFixed(1)} | ${rate(sharded.copy)} | ${sharded.vdiff.toFixed(1)} | ${rate(sharded.vdiff)} |`);
  console.log(`| ratio (2-shard / unsharded) | | ${(rate(sharded.copy) / rate(flat.copy)).toFixed(2)}x | | ${(rate(sharded.vdiff) / rate(flat.vdiff)).toFixed(2)}x |`);
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
