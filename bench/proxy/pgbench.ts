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
  script: 'select-only' | 'tpcb' | 'oltp';
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

/**
 * The OLTP mix (issue 15): an order-like read-write transaction that locks the rows it
 * changes (SELECT ... FOR UPDATE) and rolls back one time in ten, and an equal share of
 * point reads outside a transaction. With -M prepared every statement is a named prepared
 * statement kept across transactions, as application drivers keep theirs.
 */
const OLTP_SCRIPTS: Record<string, string> = {
  'oltp-order': `\\set aid random(1, 100000 * :scale)
\\set tid random(1, 10 * :scale)
\\set bid random(1, :scale)
\\set delta random(-5000, 5000)
\\set outcome random(1, 10)
BEGIN;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid FOR UPDATE;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT tbalance FROM pgbench_tellers WHERE tid = :tid FOR UPDATE;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
SELECT bbalance FROM pgbench_branches WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
\\if :outcome = 1
ROLLBACK;
\\else
COMMIT;
\\endif
`,
  'oltp-lookup': `\\set aid1 random(1, 100000 * :scale)
\\set aid2 random(1, 100000 * :scale)
SELECT aid, abalance FROM pgbench_accounts WHERE aid = :aid1;
SELECT aid, abalance FROM pgbench_accounts WHERE aid = :aid2;
`,
};

/** Statements one transaction of each script sends on average (for per-query figures; oltp: 8 and 2, half each). */
export const statementsPerTxn = { 'select-only': 1, tpcb: 7, oltp: 5 } as const;

/** pgbench arguments that select the script. */
function scriptArgs(script: PgbenchRun['script'], workDir: string): string[] {
  if (script === 'select-only') return ['-S'];
  if (script === 'tpcb') return [];
  return Object.entries(OLTP_SCRIPTS).flatMap(([name, text]) => {
    const file = path.join(workDir, `${name}.sql`);
    fs.writeFileSync(file, text);
    return ['-f', `${file}@1`];
  });
}

export async function runPgbench(target: Target, run: PgbenchRun, workDir: string, label: string): Promise<PgbenchResult> {
  const dir = fs.mkdtempSync(path.join(workDir, `log-${label}-`));
  const prefix = path.join(dir, 'tx');
  const args = [
    '-h', target.host, '-p', String(target.port), '-U', target.user,
    '-n', // the harness vacuums directly between runs, the same for every target
    '-M', run.mode, '-c', String(run.clients), '-j', String(Math.min(2, run.clients)), '-T', String(run.seconds),
    '--log', `--log-prefix=${prefix}`,
    ...scriptArgs(run.script, workDir),
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
