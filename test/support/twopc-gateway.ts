/**
 * The bank of the two-phase-commit tests as a user of the gateway has it: a
 * sharded database `bank` (accounts and their ledger, both sharded by account
 * id with the hash vindex), transfers that move money from an account on one
 * shard to accounts on other shards in `twopc` mode with node-postgres, and the
 * user's checks: the total never changes, every transfer has all its ledger
 * legs or none, and nothing stays prepared on any shard.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import pg from 'pg';
import { shardRanges } from '../../compose/spec.ts';
import { hashKeyspaceId, shardFor } from '../../schemas/index.ts';
import { isAlive, readPid } from '../../compose/supervise.ts';
import { restartService } from '../fault/support/faults.ts';
import type { TestCluster } from './cluster.ts';
import { until } from './wait.ts';

export const BANK_ACCOUNTS = 40;
export const BANK_START = 1_000;

const VSCHEMA = `
vindexes:
  hash: { type: hash }
tables:
  accounts: { column_vindexes: [{ column: id, name: hash }] }
  ledger: { column_vindexes: [{ column: account_id, name: hash }] }
`;

export const gatewayClient = (c: TestCluster, database = 'bank') => {
  const client = new pg.Client({ host: '127.0.0.1', port: c.spec.gateway.port, user: 'postgres', password: 'postgres', database });
  client.on('error', () => {}); // a killed gateway ends the connection outside any query
  return client;
};

export async function viaGateway<T>(c: TestCluster, fn: (client: pg.Client) => Promise<T>, database = 'bank'): Promise<T> {
  const client = gatewayClient(c, database);
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end().catch(() => {});
  }
}

/** Applies the VSchema and creates and fills the tables through the gateway. */
export async function createBank(c: TestCluster): Promise<void> {
  await c.applyVSchema('bank', VSCHEMA);
  await until('the gateway to serve the bank', 30_000, () => viaGateway(c, async (g) => {
    await g.query('CREATE TABLE IF NOT EXISTS accounts (id int PRIMARY KEY, balance bigint NOT NULL)');
    await g.query('CREATE TABLE IF NOT EXISTS ledger (account_id int NOT NULL, txn text NOT NULL, delta bigint NOT NULL, PRIMARY KEY (account_id, txn))');
    return true;
  }).catch(() => false));
  // Refused (0A000) until the gateway has folded the VSchema.
  const rows = Array.from({ length: BANK_ACCOUNTS }, (_, i) => `(${i + 1}, ${BANK_START})`).join(', ');
  await until('the gateway to know the VSchema', 30_000, () => viaGateway(c, (g) => g.query(`INSERT INTO accounts (id, balance) VALUES ${rows}`)).then(() => true, () => false));
}

/** One account on each of `count` different shards, varying with `n`: the first (touched first, so the decision shard) pays the others. */
export function accountsOnShards(shards: number, n: number, count: number): { from: number; to: number[]; shards: string[] } {
  const ranges = shardRanges(shards);
  const shardOf = (id: number) => shardFor(hashKeyspaceId(id), ranges);
  const ids = Array.from({ length: BANK_ACCOUNTS }, (_, i) => ((i + n) % BANK_ACCOUNTS) + 1);
  const picked: number[] = [];
  for (const id of ids) if (picked.length < count && !picked.some((p) => shardOf(p) === shardOf(id))) picked.push(id);
  const [from, ...to] = picked;
  return { from, to, shards: picked.map(shardOf) };
}

/**
 * One transfer in twopc mode: `from` pays 1 + n % 5 to each of `to`, with a
 * ledger leg per account. Resolves when COMMIT answers; rejects as the client
 * sees a failure (including the gateway dying under it).
 */
export async function transfer(client: pg.Client, txn: string, from: number, to: number[], n: number): Promise<void> {
  const amount = 1 + (n % 5);
  await client.query('BEGIN');
  await client.query('UPDATE accounts SET balance = balance - $1 WHERE id = $2', [amount * to.length, from]);
  await client.query('INSERT INTO ledger (account_id, txn, delta) VALUES ($1, $2, $3)', [from, txn, -amount * to.length]);
  for (const id of to) {
    await client.query('UPDATE accounts SET balance = balance + $1 WHERE id = $2', [amount, id]);
    await client.query('INSERT INTO ledger (account_id, txn, delta) VALUES ($1, $2, $3)', [id, txn, amount]);
  }
  await client.query('COMMIT');
}

/** Gids prepared on a shard's instance (any database; `database` is the one to connect to). */
export async function preparedAt(port: number, database = 'bank'): Promise<string[]> {
  const c = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', database });
  await c.connect();
  try {
    return (await c.query<{ gid: string }>('SELECT gid FROM pg_prepared_xacts')).rows.map((r) => r.gid);
  } finally {
    await c.end();
  }
}

/**
 * The user's checks through the gateway: the balances sum to the start, each
 * transfer has all its `legs` ledger legs (summing to zero) or none; and no shard
 * holds a prepared transaction. Returns the transfers that landed.
 */
export async function checkBank(c: TestCluster, ports: number[], legsPerTransfer: number, database = 'bank'): Promise<Set<string>> {
  const { total, legs } = await viaGateway(c, async (g) => ({
    total: Number((await g.query('SELECT sum(balance) AS s FROM accounts')).rows[0].s),
    legs: (await g.query<{ txn: string; n: string; s: string }>('SELECT txn, count(*) AS n, sum(delta) AS s FROM ledger GROUP BY txn')).rows,
  }), database);
  assert.equal(total, BANK_ACCOUNTS * BANK_START, 'the balances still sum to the start');
  for (const l of legs) assert.deepEqual([Number(l.n), Number(l.s)], [legsPerTransfer, 0], `transfer ${l.txn} landed on all its shards or on none`);
  assert.deepEqual((await Promise.all(ports.map((p) => preparedAt(p, database)))).flat(), [], 'nothing stays prepared');
  return new Set(legs.map((l) => l.txn));
}

/**
 * Restarts the gateway with the coordinator's test hook MG_TWOPC_FAULT_POINT=`step`
 * (or without it), after kill -9 of the running one if there is one. Returns a function that
 * waits until a two-phase commit has stopped at the step and gives its gid
 * (from the gateway's log).
 */
export async function restartGateway(c: TestCluster, step?: string): Promise<() => Promise<string>> {
  const logFile = path.join(c.dataDir, 'logs', 'gateway.log');
  const logFrom = fs.statSync(logFile).size;
  const running = readPid(path.join(c.dataDir, 'run'), 'gateway');
  if (running !== undefined && isAlive(running)) process.kill(running, 'SIGKILL');
  await restartService(c, 'gateway', step ? { MG_TWOPC_FAULT_POINT: step } : {});
  return async () => {
    let gid: string | undefined;
    await until(`the gateway to stop at ${step}`, 30_000, () => {
      gid = /"gid":"([^"]+)"[^\n]*stopped at a fault point/.exec(fs.readFileSync(logFile, 'utf8').slice(logFrom))?.[1];
      return gid !== undefined;
    });
    return gid!;
  };
}
