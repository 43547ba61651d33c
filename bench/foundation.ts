/**
 * Foundation figures (issue 2), in one run on this machine:
 *  - `mg cluster up` from empty caches (Kafka jars downloaded by Maven) and warm;
 *  - the Kafka broker's start time (from up's own progress lines);
 *  - RSS of the ingest agents;
 *  - baseline: the same 3 Postgres instances brought up by hand with initdb,
 *    pg_ctl and pg_basebackup (no Kafka, no agents), to show what `up` adds.
 * Run: npm run bench:foundation   (takes 1-2 minutes; uses ports 22081-22535)
 */
import { execFile, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const mg = path.join(root, 'compose', 'bin', 'mg');
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-bench-'));
fs.chmodSync(work, 0o755);
// Below Linux's ephemeral range (32768+), so no outgoing connection holds them.
const ports = Object.entries({
  'kafka.port': 22092, 'kafka.controllerPort': 22093, 'registry.port': 22081, 'postgres.basePort': 22432,
  'agent.metricsBasePort': 22100, 'pooler.basePort': 22200, 'pooler.metricsBasePort': 22300, 'gateway.port': 22400, 'gateway.metricsPort': 22401,
}).flatMap(([k, v]) => ['--set', `${k}=${v}`]);

async function up(label: string, dataDir: string, env: NodeJS.ProcessEnv = process.env) {
  const t0 = performance.now();
  const { stdout } = await run(mg, ['cluster', 'up', '--data-dir', dataDir, ...ports, '--set', `cacheDir=${env.MG_BENCH_CACHE ?? path.join(os.homedir(), '.cache', 'mg')}`], { env, timeout: 600_000 });
  const ms = performance.now() - t0;
  const broker = /\[\s*2\/\d+\] Kafka broker.*: done in ([\d.]+)s/.exec(stdout)?.[1];
  return { label, ms, brokerMs: broker ? Number(broker) * 1000 : NaN };
}

async function down(dataDir: string) {
  await run(mg, ['cluster', 'down', '--clean', '--data-dir', dataDir], { timeout: 120_000 });
}

function agentRssMiB(dataDir: string): number[] {
  const runDir = path.join(dataDir, 'run');
  return fs.readdirSync(runDir).filter((f) => f.startsWith('agent-')).map((f) => {
    const pid = fs.readFileSync(path.join(runDir, f), 'utf8').split(' ')[0];
    return Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) / 1024;
  });
}

/** What a person would do by hand for the same 3 instances: the floor that `up` builds on. */
function baselineByHand(): number {
  const dir = path.join(work, 'by-hand');
  fs.mkdirSync(dir, { mode: 0o755 });
  execFileSync('chown', ['postgres:postgres', dir]);
  const bin = '/usr/lib/postgresql/15/bin';
  const asPg = (cmd: string) => execFileSync('runuser', ['-u', 'postgres', '--', 'bash', '-c', cmd], { stdio: 'ignore' });
  const opts = (port: number) => `-c port=${port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=${dir} -c wal_level=logical -c max_prepared_transactions=50 -c wal_log_hints=on`;
  const t0 = performance.now();
  asPg(`${bin}/initdb -D ${dir}/p0 -A trust -U postgres >/dev/null`);
  asPg(`${bin}/pg_ctl -D ${dir}/p0 -w -l ${dir}/p0.log -o "${opts(22532)}" start`);
  for (const i of [1, 2]) {
    asPg(`${bin}/pg_basebackup -h 127.0.0.1 -p 22532 -U postgres -D ${dir}/p${i} -X stream -R -c fast`);
    asPg(`${bin}/pg_ctl -D ${dir}/p${i} -w -l ${dir}/p${i}.log -o "${opts(22532 + i)}" start`);
  }
  const ms = performance.now() - t0;
  for (const i of [0, 1, 2]) asPg(`${bin}/pg_ctl -D ${dir}/p${i} -m fast stop`);
  return ms;
}

const s = (ms: number) => `${(ms / 1000).toFixed(1)} s`;
try {
  const coldEnv = { ...process.env, MAVEN_OPTS: `-Dmaven.repo.local=${path.join(work, 'm2')}`, MG_BENCH_CACHE: path.join(work, 'cache') };
  const cold = await up('cold (empty Maven repo and jar cache)', path.join(work, 'cold'), coldEnv);
  await down(path.join(work, 'cold'));
  const fresh = await up('warm caches, fresh data', path.join(work, 'warm'));
  const rss = agentRssMiB(path.join(work, 'warm'));
  const again = await up('already running (second up)', path.join(work, 'warm'));
  await down(path.join(work, 'warm'));
  const hand = baselineByHand();

  console.log('\nmg cluster up (1 shard, 3 instances: Kafka, registry, 3 agents, 3 poolers, a gateway)');
  console.log('case                                     total      broker start   vs by-hand Postgres');
  for (const r of [cold, fresh, again]) {
    console.log(`${r.label.padEnd(40)} ${s(r.ms).padEnd(10)} ${s(r.brokerMs).padEnd(14)} ${(r.ms / hand).toFixed(2)}x`);
  }
  console.log(`${'baseline: initdb + 2 pg_basebackup by hand'.padEnd(40)} ${s(hand)}`);
  console.log(`\ningest agent RSS: ${rss.map((m) => `${m.toFixed(0)} MiB`).join(', ')} (max ${Math.max(...rss).toFixed(0)} MiB)`);
} finally {
  fs.rmSync(work, { recursive: true, force: true });
}
