/**
 * What the two-phase-commit integration tests share: SQL on an instance, the
 * bank's accounts and ledger, the transfer driver (test/support/twopc-driver.ts)
 * as a child process, and the user's checks after recovery.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';

export const ACCOUNTS = 10;
export const START_BALANCE = 1_000;
const driverPath = path.join(path.dirname(fileURLToPath(import.meta.url)), 'twopc-driver.ts');

/** Where one shard of `bank` is served: its primary's Postgres and pooler ports. */
export interface ShardAt { shard: string; port: number; poolerPort: number }

export const accountsOf = (shardIndex: number) => Array.from({ length: ACCOUNTS }, (_, k) => shardIndex * 100 + k + 1);

export async function sql<T extends pg.QueryResultRow = any>(port: number, text: string, params: unknown[] = [], database = 'postgres'): Promise<T[]> {
  const c = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', database });
  await c.connect();
  try {
    return (await c.query<T>(text, params)).rows;
  } finally {
    await c.end();
  }
}

export async function createAccounts(shards: ShardAt[]): Promise<void> {
  for (const [i, s] of shards.entries()) {
    await sql(s.port, `CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
      CREATE TABLE ledger (txn text PRIMARY KEY, delta bigint NOT NULL);
      INSERT INTO accounts SELECT unnest(ARRAY[${accountsOf(i).join(',')}]), ${START_BALANCE}`);
  }
}

export interface DriverEvent { event: string; txn?: string; gid?: string; code?: string; message?: string; at?: string }

/** Starts the driver on the shards' poolers; `events` fills as it prints; `paused` resolves at its pause point. */
export function startDriver(shards: ShardAt[], transfers: number, pause: string, extraEnv: Record<string, string> = {}) {
  const child = spawn(process.execPath, ['--import', 'tsx', driverPath], {
    env: {
      ...process.env, ...extraEnv, MG_DRIVER_TRANSFERS: String(transfers), MG_DRIVER_PAUSE: pause,
      MG_DRIVER_SHARDS: JSON.stringify(shards.map((s, i) => ({ shard: s.shard, port: s.poolerPort, accounts: accountsOf(i) }))),
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const events: DriverEvent[] = [];
  let stderr = '';
  let buffered = '';
  child.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const paused = new Promise<DriverEvent>((resolve, reject) => {
    child.stdout.on('data', (d) => {
      buffered += d;
      const lines = buffered.split('\n');
      buffered = lines.pop()!;
      for (const line of lines) {
        const e = JSON.parse(line) as DriverEvent;
        events.push(e);
        if (e.event === 'paused') resolve(e);
      }
    });
    void exited.then((code) => reject(new Error(`driver exited (${code}) before pausing: ${stderr}`)));
  });
  paused.catch(() => {});
  return { child, events, paused, exited, stderr: () => stderr, txn: (n: number) => `${child.pid}-${n}` };
}

export const prepared = async (port: number) => (await sql<{ gid: string }>(port, 'SELECT gid FROM pg_prepared_xacts')).map((r) => r.gid);

/** The user's checks: each transfer on both shards or neither, balances summing to the start, nothing prepared. Returns the ledger of the first shard. */
export async function checkAllOrNothing(shards: ShardAt[]): Promise<Set<string>> {
  const [l, r] = await Promise.all(shards.map(async (s) => new Set((await sql<{ txn: string }>(s.port, 'SELECT txn FROM ledger')).map((x) => x.txn))));
  assert.deepEqual([...l].sort(), [...r].sort(), 'every transfer landed on both shards or on neither');
  const totals = await Promise.all(shards.map(async (s) => Number((await sql(s.port, 'SELECT sum(balance)::bigint AS s FROM accounts'))[0].s)));
  assert.equal(totals[0] + totals[1], shards.length * ACCOUNTS * START_BALANCE, `balances ${totals.join(' + ')} still sum to the start`);
  assert.deepEqual((await Promise.all(shards.map((s) => prepared(s.port)))).flat(), [], 'nothing stays prepared');
  return l;
}
