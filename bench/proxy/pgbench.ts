/**
 * Runs Debian's pgbench against one target and reads its per-transaction
 * logs (--log), so percentiles are computed here from every transaction
 * rather than taken from pgbench's averages.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export const PGBENCH = '/usr/lib/postgresql/15/bin/pgbench';

export interface PgbenchRun {
  script: 'select-only' | 'tpcb';
  mode: 'simple' | 'extended' | 'prepared';
  clients: number;
  seconds: number;
}

export interface PgbenchResult {
  tps: number;
  transactions: number;
  failedTransactions: number;
  p50us: number;
  p99us: number;
  meanUs: number;
  /** pgbench's exit code (0 ok, 2 when clients aborted) or null when killed by the timeout. */
  exitCode: number | null;
  /** First error pgbench printed, when any. */
  error: string | null;
  aborted: boolean;
}

export interface Target { host: string; port: number; user: string; password: string; database: string }

/** Statements one transaction of each built-in script sends (for per-query figures). */
export const statementsPerTxn = { 'select-only': 1, tpcb: 7 } as const;

export async function runPgbench(target: Target, run: PgbenchRun, workDir: string, label: string): Promise<PgbenchResult> {
  const dir = fs.mkdtempSync(path.join(workDir, `log-${label}-`));
  const prefix = path.join(dir, 'tx');
  const args = [
    '-h', target.host, '-p', String(target.port), '-U', target.user,
    '-n', // the harness vacuums directly between runs, the same for every target
    '-M', run.mode, '-c', String(run.clients), '-j', String(Math.min(2, run.clients)), '-T', String(run.seconds),
    '--log', `--log-prefix=${prefix}`,
    ...(run.script === 'select-only' ? ['-S'] : []),
    target.database,
  ];
  const { code, stdout, stderr } = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    // No TLS for any target: direct Postgres has none here, nor PgBouncer, and the gateway would otherwise negotiate it.
    const env = { ...process.env, PGPASSWORD: target.password, PGCONNECT_TIMEOUT: '30', PGSSLMODE: 'disable' };
    const child = spawn(PGBENCH, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err.length < 200_000 ? (err += d) : undefined));
    const timer = setTimeout(() => child.kill('SIGKILL'), (run.seconds + 90) * 1000);
    child.on('close', (c) => {
      clearTimeout(timer);
      resolve({ code: c, stdout: out, stderr: err });
    });
  });
  const lat = readLatencies(dir);
  fs.rmSync(dir, { recursive: true, force: true });
  const num = (re: RegExp) => Number(re.exec(stdout)?.[1] ?? NaN);
  let errorLine = /pgbench: error: (.*)/.exec(stderr)?.[1] ?? (code === 0 ? null : (stderr.trim().split('\n').pop() ?? `exit ${code}`));
  if (!errorLine && !/tps = [\d.]+/.test(stdout)) {
    const conn = /initial connection time = ([\d.]+) ms/.exec(stdout)?.[1];
    errorLine = `no tps reported${conn ? ` (initial connection time ${conn} ms of a ${run.seconds} s run)` : ''}: ${stdout.trim().split('\n').slice(-2).join(' / ')}`;
  }
  return {
    tps: num(/tps = ([\d.]+)/),
    transactions: num(/number of transactions actually processed: (\d+)/),
    failedTransactions: num(/number of failed transactions: (\d+)/),
    ...lat,
    exitCode: code,
    error: errorLine ?? null,
    aborted: code !== 0 || /aborted/.test(stderr),
  };
}

/** p50/p99/mean latency (us) over every transaction in pgbench's per-transaction logs. */
function readLatencies(dir: string): { p50us: number; p99us: number; meanUs: number } {
  const chunks: Float64Array[] = [];
  let n = 0;
  for (const f of fs.readdirSync(dir)) {
    const text = fs.readFileSync(path.join(dir, f), 'latin1');
    const arr = new Float64Array(text.length / 20 + 16);
    let k = 0;
    // Line: client_id transaction_no time script_no time_epoch time_us  (time = latency in us, or "failed"/"skipped")
    for (let start = 0; start < text.length;) {
      let end = text.indexOf('\n', start);
      if (end < 0) end = text.length;
      const s1 = text.indexOf(' ', start);
      const s2 = text.indexOf(' ', s1 + 1);
      const s3 = text.indexOf(' ', s2 + 1);
      if (s1 > 0 && s3 > 0 && s3 < end) {
        const v = Number(text.slice(s2 + 1, s3));
        if (Number.isFinite(v)) {
          if (k === arr.length) break;
          arr[k++] = v;
        }
      }
      start = end + 1;
    }
    chunks.push(arr.subarray(0, k));
    n += k;
  }
  if (n === 0) return { p50us: NaN, p99us: NaN, meanUs: NaN };
  const all = new Float64Array(n);
  let o = 0;
  for (const c of chunks) {
    all.set(c, o);
    o += c.length;
  }
  all.sort();
  let sum = 0;
  for (let i = 0; i < n; i++) sum += all[i];
  const pct = (p: number) => all[Math.min(n - 1, Math.floor(p * n))];
  return { p50us: pct(0.5), p99us: pct(0.99), meanUs: sum / n };
}
