/**
 * Pooler scaling across cores (issue 15 part 2, decision 0057): PgBouncer and our
 * MultiPooler at 1 and 2 worker processes, in front of one Postgres 15, with
 * pgbench and Postgres pinned to one set of cores (`taskset`) and the proxy to
 * another, so the proxy's own cores are what limits it.
 *
 *   node --import tsx bench/pooler-cores.ts [--base-port 21000] [--seconds 10] [--clients 50]
 *        [--workers 1,2] [--db-cpus 0] [--proxy-cpus 1] [--mode simple] [--jobs 2] [--rate tps]
 *
 * pgbench -S (select-only) at --clients clients, -M --mode. Reported per target: TPS,
 * the proxy's CPU (utime+stime of its whole process tree, from /proc) per
 * transaction, and both as ratios to PgBouncer. CPU per transaction does not
 * depend on the machine; from it the script prints what the proxy could carry on
 * more cores. For our pooler also the server connections it opened and gave back to
 * another worker per second of the run (its summed /metrics): how much connections
 * move between workers. Ports: base..base+9. Everything it starts is stopped at the end.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { createLogger } from '../common/log.ts';
import { PostgresInstance } from '../ingest/postgres/instance.ts';
import { PGBENCH } from './proxy/pgbench.ts';
import { cpuMs, processTree } from './proxy/processes.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const { values: args } = parseArgs({
  options: {
    'base-port': { type: 'string', default: '21000' },
    seconds: { type: 'string', default: '10' },
    clients: { type: 'string', default: '50' },
    workers: { type: 'string', default: '1,2' },
    'db-cpus': { type: 'string', default: '0' },
    'proxy-cpus': { type: 'string', default: '1' },
    mode: { type: 'string', default: 'simple' },
    jobs: { type: 'string', default: '2' },
    /** pgbench -R: a fixed transaction rate, so that A/B runs of the proxy batch alike whatever the load on the host. */
    rate: { type: 'string' },
  },
});
const BASE = Number(args['base-port']);
const SECONDS = Number(args.seconds);
const CLIENTS = Number(args.clients);
const WORKERS = args.workers!.split(',').map(Number);
const DB_CPUS = args['db-cpus']!;
const PROXY_CPUS = args['proxy-cpus']!;
const POOL_SIZE = 20;
const ports = { postgres: BASE, pgbouncer: BASE + 1, pooler: (i: number) => BASE + 2 + i, metrics: (i: number) => BASE + 6 + i };
const log = createLogger('bench-pooler-cores');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-bench-cores-'));
fs.chmodSync(work, 0o755);
const stops: Array<() => Promise<void> | void> = [];

/** utime + stime of a process tree, in ms (a process that exited meanwhile counts 0). */
function treeCpuMs(pid: number): number {
  return processTree(pid).reduce((a, p) => a + (cpuMs(p) || 0), 0);
}

function pin(pid: number, cpus: string): void {
  for (const p of processTree(pid)) execFileSync('taskset', ['-a', '-cp', cpus, String(p)], { stdio: 'ignore' });
}

async function answers(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port }, () => { s.destroy(); resolve(true); }).on('error', () => resolve(false));
  });
}

async function waitFor(port: number, what: string): Promise<void> {
  for (let i = 0; i < 1200; i++) { // a loaded machine takes long to start Node processes
    if (await answers(port)) return;
    await sleep(100);
  }
  throw new Error(`${what} does not answer on ${port}`);
}

function pgbench(port: number, seconds: number): { tps: number; transactions: number } {
  const out = execFileSync('taskset', ['-c', DB_CPUS, PGBENCH, '-n', '-S', '-M', args.mode!, '-c', String(CLIENTS), '-j', args.jobs!, '-T', String(seconds), ...(args.rate ? ['-R', args.rate] : []),
    '-h', '127.0.0.1', '-p', String(port), '-U', 'postgres', 'postgres'], { encoding: 'utf8', env: { ...process.env, PGPASSWORD: 'unused' } });
  const tps = Number(/tps = ([\d.]+)/.exec(out)?.[1]);
  const transactions = Number(/number of transactions actually processed: (\d+)/.exec(out)?.[1]);
  if (!tps) throw new Error(`pgbench printed no tps:\n${out}`);
  return { tps, transactions };
}

async function startPgbouncer(): Promise<number> {
  const dir = path.join(work, 'pgbouncer');
  fs.mkdirSync(dir);
  fs.writeFileSync(path.join(dir, 'userlist.txt'), '"postgres" ""\n');
  fs.writeFileSync(path.join(dir, 'pgbouncer.ini'), [
    '[databases]', `postgres = host=127.0.0.1 port=${ports.postgres} dbname=postgres`,
    '[pgbouncer]', 'listen_addr = 127.0.0.1', `listen_port = ${ports.pgbouncer}`, 'unix_socket_dir =', 'auth_type = trust',
    `auth_file = ${dir}/userlist.txt`, 'pool_mode = transaction', `default_pool_size = ${POOL_SIZE}`, 'max_client_conn = 1000',
    `logfile = ${dir}/pgbouncer.log`, 'log_connections = 0', 'log_disconnections = 0', '',
  ].join('\n'));
  execFileSync('chown', ['-R', 'postgres:postgres', dir]);
  const p = spawn('taskset', ['-c', PROXY_CPUS, 'runuser', '-u', 'postgres', '--', '/usr/sbin/pgbouncer', `${dir}/pgbouncer.ini`], { stdio: 'ignore' });
  stops.push(() => stop(p));
  await waitFor(ports.pgbouncer, 'pgbouncer');
  // runuser forks pgbouncer: measure the tree.
  return p.pid!;
}

/** Our pooler's connection churn counters, summed over its workers by the primary's /metrics. */
async function churn(i: number): Promise<{ connects: number; giveBacks: number }> {
  const text = await (await fetch(`http://127.0.0.1:${ports.metrics(i)}/metrics`)).text();
  const value = (name: string) => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1] ?? NaN);
  return { connects: value('mg_pooler_server_connects_total'), giveBacks: value('mg_pooler_give_backs_total') };
}

async function startPooler(workers: number, i: number): Promise<number> {
  const config = path.join(work, `pooler-${workers}.json`);
  fs.writeFileSync(config, JSON.stringify({
    instanceId: `bench-${workers}`, listenPort: ports.pooler(i), postgres: { host: '127.0.0.1', port: ports.postgres }, poolSize: POOL_SIZE, workers,
    metricsPort: ports.metrics(i),
  }));
  const p = spawn('taskset', ['-c', PROXY_CPUS, process.execPath, '--import', 'tsx', path.join(root, 'router/pooler/main.ts'), '--config', config],
    { stdio: ['ignore', 'ignore', 'inherit'], cwd: root, env: { ...process.env, MG_LOG_LEVEL: 'warn' } });
  stops.push(() => stop(p));
  await waitFor(ports.pooler(i), `pooler with ${workers} workers`);
  await settle(p.pid!);
  return p.pid!;
}

/** Waits until a process tree is quiet (every worker started and compiled), so startup is not counted. */
async function settle(pid: number): Promise<void> {
  for (let i = 0; i < 60; i++) {
    const before = treeCpuMs(pid);
    await sleep(1000);
    if (treeCpuMs(pid) - before <= 30) return;
  }
  throw new Error(`process ${pid} did not settle`);
}

async function stop(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return;
  const exited = new Promise((r) => p.once('exit', r));
  // taskset and runuser stand between us and the proxy: signal the whole tree.
  for (const pid of processTree(p.pid!).reverse()) {
    try { process.kill(pid, 'SIGTERM'); } catch { /* already gone */ }
  }
  await Promise.race([exited, sleep(15_000)]);
}

interface Row { name: string; tps: number; cpuUsPerTxn: number; proxyCpuPct: number; connectsPerS?: number; giveBacksPerS?: number }

/** `metrics`: the index of our pooler whose churn counters to read; PgBouncer has none. */
async function measure(name: string, port: number, pid: number, metrics?: number): Promise<Row> {
  pgbench(port, 2); // warm: connections opened, JIT warm
  const churn0 = metrics === undefined ? undefined : await churn(metrics);
  const cpu0 = treeCpuMs(pid);
  const t0 = Date.now();
  const r = pgbench(port, SECONDS);
  const elapsed = Date.now() - t0;
  const cpu = treeCpuMs(pid) - cpu0;
  const row: Row = { name, tps: r.tps, cpuUsPerTxn: (cpu * 1000) / r.transactions, proxyCpuPct: (cpu / elapsed) * 100 };
  if (churn0) {
    const churn1 = await churn(metrics!);
    row.connectsPerS = ((churn1.connects - churn0.connects) * 1000) / elapsed;
    row.giveBacksPerS = ((churn1.giveBacks - churn0.giveBacks) * 1000) / elapsed;
  }
  console.log(`  ${name.padEnd(20)} tps ${row.tps.toFixed(0).padStart(7)}  proxy cpu ${row.proxyCpuPct.toFixed(0).padStart(3)}%  ${row.cpuUsPerTxn.toFixed(1)} us/txn`
    + (churn0 ? `  server connects ${perS(row.connectsPerS)}/s, give-backs ${perS(row.giveBacksPerS)}/s` : ''));
  return row;
}

const perS = (n: number | undefined) => (n === undefined ? '-' : n.toFixed(1));

async function main(): Promise<void> {
  const loadBefore = fs.readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  console.log(`pooler cores bench: pgbench -S -M ${args.mode} -c ${CLIENTS} -j ${args.jobs}, ${SECONDS} s; Postgres and pgbench on cpus ${DB_CPUS}, proxy on cpus ${PROXY_CPUS}; load ${loadBefore}`);
  const pgInst = new PostgresInstance({ name: 'bench-cores', dataDir: path.join(work, 'data'), port: ports.postgres, log, settings: { max_connections: '200', shared_buffers: '128MB' } });
  await pgInst.initPrimary();
  await pgInst.start();
  stops.push(() => pgInst.stop('immediate'));
  const postmaster = Number(fs.readFileSync(path.join(work, 'data', 'postmaster.pid'), 'utf8').split('\n')[0]);
  pin(postmaster, DB_CPUS);
  execFileSync(PGBENCH, ['-i', '-q', '-s', '1', '-h', '127.0.0.1', '-p', String(ports.postgres), '-U', 'postgres', 'postgres'], { stdio: 'ignore' });
  const rows: Row[] = [];
  rows.push(await measure('PgBouncer', ports.pgbouncer, await startPgbouncer()));
  for (const [i, w] of WORKERS.entries()) {
    rows.push(await measure(`MultiPooler x${w}`, ports.pooler(i), await startPooler(w, i), i));
    await stops.pop()!();
  }
  const pgb = rows[0];
  const loadAfter = fs.readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  console.log(`\nload (1, 5, 15 min) before ${loadBefore}, after ${loadAfter}\n`);
  console.log('| target | TPS | TPS / PgBouncer | proxy CPU (% of one core) | CPU us per txn | CPU per txn / PgBouncer | server connects/s | give-backs/s |');
  console.log('|---|---:|---:|---:|---:|---:|---:|---:|');
  for (const r of rows) {
    console.log(`| ${r.name} | ${r.tps.toFixed(0)} | ${(r.tps / pgb.tps).toFixed(2)}x | ${r.proxyCpuPct.toFixed(0)}% | ${r.cpuUsPerTxn.toFixed(1)} | ${(r.cpuUsPerTxn / pgb.cpuUsPerTxn).toFixed(2)}x | ${perS(r.connectsPerS)} | ${perS(r.giveBacksPerS)} |`);
  }
  // PgBouncer is one thread: one core's worth whatever the machine. Ours: one core per worker.
  console.log('\nWhat the proxy alone could carry, from CPU per transaction (1 s of CPU / us per txn, per core):');
  const ours = rows.filter((r) => r !== pgb);
  const best = ours.reduce((a, b) => (a.cpuUsPerTxn <= b.cpuUsPerTxn ? a : b));
  for (const cores of [1, 2, 8, 16]) {
    console.log(`  ${String(cores).padStart(2)} proxy cores: PgBouncer ${(1e6 / pgb.cpuUsPerTxn).toFixed(0)} tps (one thread), MultiPooler x${cores} ${((cores * 1e6) / best.cpuUsPerTxn).toFixed(0)} tps`);
  }
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
}).finally(async () => {
  for (const s of stops.reverse()) await s();
  fs.rmSync(work, { recursive: true, force: true });
});
