/**
 * Two-phase commit benchmark (`npm run bench:twopc`): the latency of a
 * cross-shard commit with the coordinator (router/twopc) against a
 * single-shard commit, one client, through the shards' poolers, on a local
 * cluster of 2 shards x 1 instance brought up with `mg cluster up`.
 *
 *   node --import tsx bench/twopc.ts [--tx 2000] [--base-port 27000]
 *
 * Each iteration runs one transaction of each kind, interleaved so that both
 * see the same machine: single-shard (BEGIN; two UPDATEs; COMMIT on one
 * shard) and cross-shard (BEGIN and one UPDATE on each shard, in parallel,
 * then coordinator.commit). Printed: p50/p99 of the commit step alone and of
 * the whole transaction as the client sees it, and the ratios (target: 2PC
 * commit <= 2.5x a single-shard commit). Ports: base..base+99.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs, promisify } from 'node:util';
import pg from 'pg';
import { pino } from 'pino';
import { TwoPhaseCoordinator, type Participant } from '../router/twopc/coordinator.ts';

const execFileP = promisify(execFile);
const mgBin = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'compose', 'bin', 'mg');
const { values: args } = parseArgs({ options: { tx: { type: 'string', default: '2000' }, 'base-port': { type: 'string', default: '27000' } } });
const TX = Number(args.tx);
const WARMUP = Math.min(200, TX);
const base = Number(args['base-port']);
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-bench-twopc-'));
fs.chmodSync(work, 0o755);
const dataDir = path.join(work, 'cluster');

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}
const fmt = (ms: number) => `${ms.toFixed(2)} ms`;

async function main(): Promise<void> {
  const spec = path.join(work, 'cluster.yaml');
  fs.writeFileSync(spec, [
    'name: bench',
    'cells: [zone1]',
    'databases: [{ name: bank, sharded: true, shards: 2, instancesPerShard: 1 }]',
    `kafka: { port: ${base}, controllerPort: ${base + 1} }`,
    `registry: { port: ${base + 2} }`,
    `postgres: { basePort: ${base + 10} }`,
    `pooler: { basePort: ${base + 20}, metricsBasePort: ${base + 30} }`,
    `agent: { metricsBasePort: ${base + 40} }`,
    `gateway: { port: ${base + 50}, metricsPort: ${base + 51} }`,
    `orchestrator: { basePort: ${base + 60} }`,
    '',
  ].join('\n'));
  console.log(`mg cluster up (bank: 2 shards x 1 instance, ports ${base}..${base + 99}) ...`);
  await execFileP(mgBin, ['cluster', 'up', '--spec', spec, '--data-dir', dataDir], { timeout: 900_000, maxBuffer: 16 << 20 });

  // Shard -80 is instance 0, 80- instance 1 (compose/spec.ts instancesOf).
  const direct = [base + 10, base + 11];
  for (const port of direct) {
    const c = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', database: 'postgres' });
    await c.connect();
    await c.query('CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL); INSERT INTO accounts SELECT g, 1000000 FROM generate_series(1, 100) g');
    await c.end();
  }
  const clients = await Promise.all([base + 20, base + 21].map(async (port) => {
    const c = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', database: 'postgres', application_name: 'bench-twopc' });
    await c.connect();
    return c;
  }));
  // Each participant statement is timed by phase, to show where a 2PC commit's time goes: shard -80 (first) holds the decision and
  // commits one-phase with it; 80- prepares and then commits prepared (decision 0032).
  const phases = { 'prepare (80-)': [] as number[], 'decision row + COMMIT (-80)': [] as number[], 'commit prepared (80-)': [] as number[] };
  const phaseOf = (sql: string) => (sql.startsWith('PREPARE') ? 'prepare (80-)' : sql.includes('INSERT INTO mg_twopc') ? 'decision row + COMMIT (-80)'
    : sql.startsWith('COMMIT PREPARED') ? 'commit prepared (80-)' : undefined) as keyof typeof phases | undefined;
  let measuring = false;
  const participants: Participant[] = clients.map((c, i) => ({
    shard: ['-80', '80-'][i],
    query: async (sql) => {
      const t0 = performance.now();
      await c.query(sql);
      const phase = phaseOf(sql);
      if (measuring && phase) phases[phase].push(performance.now() - t0);
    },
  }));
  const coordinator = new TwoPhaseCoordinator({ id: 'bench', log: pino({ level: 'warn' }) });
  const [a] = clients;

  const single = { commit: [] as number[], whole: [] as number[] };
  const twopc = { commit: [] as number[], whole: [] as number[] };
  for (let i = 0; i < WARMUP + TX; i++) {
    const id = 1 + (i % 100);
    measuring = i >= WARMUP;
    let t0 = performance.now();
    await a.query('BEGIN');
    await a.query('UPDATE accounts SET balance = balance - 1 WHERE id = $1', [id]);
    await a.query('UPDATE accounts SET balance = balance + 1 WHERE id = $1', [1 + ((id + 50) % 100)]);
    let t1 = performance.now();
    await a.query('COMMIT');
    let t2 = performance.now();
    if (i >= WARMUP) {
      single.commit.push(t2 - t1);
      single.whole.push(t2 - t0);
    }

    t0 = performance.now();
    await Promise.all(clients.map(async (c, s) => {
      await c.query('BEGIN');
      await c.query('UPDATE accounts SET balance = balance + $1 WHERE id = $2', [s === 0 ? -1 : 1, id]);
    }));
    t1 = performance.now();
    await coordinator.commit('bank', participants);
    t2 = performance.now();
    if (i >= WARMUP) {
      twopc.commit.push(t2 - t1);
      twopc.whole.push(t2 - t0);
    }
  }
  await Promise.all(clients.map((c) => c.end()));

  for (const xs of [single.commit, single.whole, twopc.commit, twopc.whole]) xs.sort((x, y) => x - y);
  const row = (what: string, s: number[], t: number[]) => {
    const [s50, s99, t50, t99] = [percentile(s, 50), percentile(s, 99), percentile(t, 50), percentile(t, 99)];
    return `| ${what} | ${fmt(s50)} / ${fmt(s99)} | ${fmt(t50)} / ${fmt(t99)} | ${(t50 / s50).toFixed(2)}x / ${(t99 / s99).toFixed(2)}x |`;
  };
  console.log(`\n${TX} transactions of each kind (after ${WARMUP} warm-up), one client, through the poolers, ${os.cpus().length} cores, ${new Date().toISOString()}`);
  console.log('| step | single shard p50 / p99 | two shards, 2PC p50 / p99 | ratio p50 / p99 |');
  console.log('|---|---|---|---|');
  console.log(row('commit (COMMIT vs coordinator.commit)', single.commit, twopc.commit));
  console.log(row('whole transaction (BEGIN .. commit)', single.whole, twopc.whole));
  for (const [phase, xs] of Object.entries(phases)) {
    xs.sort((x, y) => x - y);
    console.log(`2PC round trip ${phase}: p50 ${fmt(percentile(xs, 50))}, p99 ${fmt(percentile(xs, 99))}`);
  }
  const ok = percentile(twopc.commit, 50) / percentile(single.commit, 50) <= 2.5 && percentile(twopc.commit, 99) / percentile(single.commit, 99) <= 2.5;
  console.log(`target (2PC commit <= 2.5x a single-shard commit, p50 and p99): ${ok ? 'met' : 'NOT met'}`);
}

try {
  await main();
} finally {
  console.log('\nmg cluster down --clean ...');
  await execFileP(mgBin, ['cluster', 'down', '--clean', '--data-dir', dataDir], { timeout: 180_000 }).catch((err) => console.error(err.message));
  fs.rmSync(work, { recursive: true, force: true });
}
