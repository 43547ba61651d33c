/**
 * Scale-to-zero benchmark (`npm run bench:wake`), one run on one machine:
 *  1. wake: a database scaled to zero (`deactivate`, waited for), then a
 *     client connects through the gateway and reads a row; connect-to-first-row
 *     time, WAKE_ROUNDS rounds (20), p50/p95;
 *  2. footprint: the processes and memory of that database while active and
 *     while deactivated (its Postgres and its children; its agent and pooler).
 * It brings up its own cluster (`mg cluster up`, Kafka included) on ports
 * MG_BENCH_PORT_BASE (27000) .. +499 in a temporary directory, and takes it down.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import pg from 'pg';
import { instancesOf, parseSpec } from '../compose/spec.ts';
import { readPid } from '../compose/supervise.ts';

const run = promisify(execFile);
const ROUNDS = Number(process.env.WAKE_ROUNDS ?? 20);
const BASE = Number(process.env.MG_BENCH_PORT_BASE ?? 27_000);
const TOKEN = 'bench-wake-token-0123456789';
const mgBin = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'compose', 'bin', 'mg');
const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-bench-wake-'));
fs.chmodSync(dataDir, 0o755);

const settings: Record<string, string | number> = {
  'postgres.basePort': BASE, 'agent.metricsBasePort': BASE + 100, 'pooler.basePort': BASE + 200, 'pooler.metricsBasePort': BASE + 300,
  'gateway.port': BASE + 400, 'gateway.metricsPort': BASE + 401, 'orchestrator.basePort': BASE + 450,
  'kafka.port': BASE + 480, 'kafka.controllerPort': BASE + 481, 'registry.port': BASE + 482, 'orchestrator.apiToken': TOKEN,
};
const specFile = path.join(dataDir, 'bench-spec.json');
const specFields = {
  cells: ['zone1'],
  databases: [{ name: 'postgres', instancesPerShard: 1, durability: 'ANY_1' }, { name: 'sleepy', instancesPerShard: 1, durability: 'ANY_1' }],
};
fs.writeFileSync(specFile, JSON.stringify(specFields));
const flags = ['--data-dir', dataDir, '--spec', specFile, ...Object.entries(settings).flatMap(([k, v]) => ['--set', `${k}=${v}`])];
const raw: Record<string, any> = { ...specFields, dataDir };
for (const [k, v] of Object.entries(settings)) (raw[k.split('.')[0]] ??= {})[k.split('.')[1]] = v;
const spec = parseSpec(raw);
const sleepy = instancesOf(spec).find((i) => i.database === 'sleepy')!;
const runDir = path.join(dataDir, 'run');

const mg = (...args: string[]) => run(mgBin, args, { timeout: 600_000 });

async function api(method: string, url: string): Promise<any> {
  const res = await fetch(`http://127.0.0.1:${spec.orchestrator.basePort}${url}`, { method, headers: { authorization: `Bearer ${TOKEN}` } });
  const body = await res.json();
  if (!res.ok) throw new Error(`${method} ${url}: HTTP ${res.status}: ${JSON.stringify(body)}`);
  return body;
}

/** RSS in MiB and the process count of a pid and its children. */
function footprint(pids: number[]): { processes: number; rssMiB: number } {
  const all = new Set<number>();
  const children = new Map<number, number[]>();
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const ppid = Number(/^PPid:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${entry}/status`, 'utf8'))![1]);
      children.set(ppid, [...(children.get(ppid) ?? []), Number(entry)]);
    } catch { /* gone meanwhile */ }
  }
  const visit = (pid: number) => {
    if (all.has(pid) || !fs.existsSync(`/proc/${pid}`)) return;
    all.add(pid);
    for (const c of children.get(pid) ?? []) visit(c);
  };
  for (const p of pids) visit(p);
  let kib = 0;
  for (const p of all) {
    try {
      kib += Number(/^VmRSS:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${p}/status`, 'utf8'))?.[1] ?? 0);
    } catch { /* gone meanwhile */ }
  }
  return { processes: all.size, rssMiB: Math.round(kib / 1024) };
}

function postmasterPid(): number[] {
  try {
    return [Number(fs.readFileSync(path.join(sleepy.dataDir, 'postmaster.pid'), 'utf8').split('\n')[0])];
  } catch {
    return [];
  }
}

function describe(when: string): string {
  const postgres = footprint(postmasterPid());
  const agent = footprint([readPid(runDir, `agent-${sleepy.instanceId}`) ?? -1]);
  const pooler = footprint([readPid(runDir, `pooler-${sleepy.instanceId}`) ?? -1]);
  return `${when.padEnd(12)} postgres: ${postgres.processes} processes, ${postgres.rssMiB} MiB;  agent: ${agent.processes}, ${agent.rssMiB} MiB;  pooler: ${pooler.processes}, ${pooler.rssMiB} MiB`;
}

const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.ceil((p / 100) * xs.length) - 1)];

async function main(): Promise<void> {
  console.log(`bench:wake: cluster in ${dataDir}, ports ${BASE}..${BASE + 499}, ${ROUNDS} rounds; load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`);
  await mg('cluster', 'up', ...flags);
  const client = () => new pg.Client({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'sleepy' });
  const setup = client();
  await setup.connect();
  await setup.query('CREATE TABLE IF NOT EXISTS naps (n int); INSERT INTO naps VALUES (1)');
  await setup.end();
  const lines = [describe('active')];

  const wakes: number[] = [];
  const connects: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    await api('POST', '/v1/databases/sleepy/deactivate?wait=true');
    if (i === 0) lines.push(describe('deactivated'));
    await new Promise((r) => setTimeout(r, 300));
    const started = performance.now();
    const c = client();
    await c.connect();
    connects.push(performance.now() - started);
    const { rows } = await c.query('SELECT n FROM naps');
    wakes.push(performance.now() - started);
    if (rows[0].n !== 1) throw new Error('wrong row after the wake');
    await c.end();
    process.stdout.write(`  wake ${i + 1}: ${wakes[i].toFixed(0)} ms (connected after ${connects[i].toFixed(0)} ms)\n`);
  }
  const f = (x: number) => `${x.toFixed(0)} ms`;
  console.log(`\nwake, connect to first row (${ROUNDS} wakes): p50 ${f(pct(wakes, 50))}, p95 ${f(pct(wakes, 95))}, min ${f(Math.min(...wakes))}, max ${f(Math.max(...wakes))}` +
    ` (connect alone: p50 ${f(pct(connects, 50))}, p95 ${f(pct(connects, 95))}); target < 1000 ms: ${pct(wakes, 95) < 1000 ? 'met' : pct(wakes, 50) < 1000 ? 'met at p50, missed at p95' : 'MISSED'}`);
  console.log('footprint of database sleepy (one instance):');
  for (const l of lines) console.log(`  ${l}`);
  console.log(`load average at the end: ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`);
}

main().then(
  async () => {
    await mg('cluster', 'down', '--clean', ...flags).catch(() => undefined);
    fs.rmSync(dataDir, { recursive: true, force: true });
  },
  async (err) => {
    console.error(err);
    await mg('cluster', 'down', '--clean', ...flags).catch(() => undefined);
    process.exitCode = 1;
  },
);
