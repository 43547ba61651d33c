/**
 * A test driver for two-phase commit (test/integration/twopc*.test.ts): moves
 * money between accounts on two shards through their poolers, one
 * transaction per transfer committed by the real coordinator, and writes a
 * ledger row per transfer on both shards so a checker can tell whether each
 * transaction landed on both or on neither. MG_DRIVER_PAUSE stops the last
 * transfer at one point of the protocol (and prints `paused`) so the test
 * can kill -9 the process there (the gateway's own kill tests use its
 * MG_TWOPC_FAULT_POINT instead):
 *   after-decision          the second shard prepared, the first committed with the COMMIT decision
 *   slow-decision           waits MG_DRIVER_SLOW_MS before the decision, then goes on
 * Output: one JSON line per event on stdout.
 */
import pg from 'pg';
import { destination, pino } from 'pino';
import { TwoPhaseCoordinator, type Participant } from '../../router/twopc/coordinator.ts';

interface Shard { shard: string; port: number; accounts: number[] }

const shards = JSON.parse(process.env.MG_DRIVER_SHARDS ?? '[]') as Shard[];
const transfers = Number(process.env.MG_DRIVER_TRANSFERS ?? 10);
const pause = process.env.MG_DRIVER_PAUSE ?? 'none';
const slowMs = Number(process.env.MG_DRIVER_SLOW_MS ?? 0);
const out = (event: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(event)}\n`);
const forever = () => new Promise<never>(() => {});

const coordinator = new TwoPhaseCoordinator({ id: `driver-${process.pid}`, log: pino({ level: 'warn' }, destination(2)) });
const clients = await Promise.all(shards.map(async (s) => {
  const c = new pg.Client({ host: '127.0.0.1', port: s.port, user: 'postgres', database: 'postgres', application_name: 'twopc-driver' });
  await c.connect();
  return c;
}));

/** The participant of shard i; in the paused transfer it stops where MG_DRIVER_PAUSE says. */
function participant(i: number, paused: boolean, gid: { value?: string }): Participant {
  return {
    shard: shards[i].shard,
    async query(sql: string) {
      const step = sql.startsWith('PREPARE') ? 'prepare' : sql.includes('INSERT INTO mg_twopc') ? 'decision' : 'other';
      if (step === 'prepare') gid.value = /'([^']+)'/.exec(sql)![1];
      if (paused && pause === 'slow-decision' && step === 'decision') await new Promise((r) => setTimeout(r, slowMs));
      await clients[i].query(sql);
      if (paused && pause === 'after-decision' && step === 'decision') {
        out({ event: 'paused', at: pause, gid: gid.value });
        return forever();
      }
    },
  };
}

for (let n = 1; n <= transfers; n++) {
  const paused = n === transfers && pause !== 'none';
  const txn = `${process.pid}-${n}`;
  const amount = 1 + (n % 50);
  const [from, to] = [shards[0].accounts[n % shards[0].accounts.length], shards[1].accounts[(n * 7) % shards[1].accounts.length]];
  const gid: { value?: string } = {};
  try {
    await Promise.all(clients.map(async (c, i) => {
      await c.query('BEGIN');
      await c.query('UPDATE accounts SET balance = balance + $1 WHERE id = $2', [i === 0 ? -amount : amount, i === 0 ? from : to]);
      await c.query('INSERT INTO ledger (txn, delta) VALUES ($1, $2)', [txn, i === 0 ? -amount : amount]);
    }));
    await coordinator.commit('bank', shards.map((_, i) => participant(i, paused, gid)));
    out({ event: 'committed', txn, gid: gid.value });
  } catch (err) {
    const e = err as { code?: string; message: string };
    out({ event: 'failed', txn, gid: gid.value, code: e.code, message: e.message });
    await Promise.all(clients.map((c) => c.query('ROLLBACK').catch(() => {})));
  }
}
out({ event: 'done' });
await Promise.all(clients.map((c) => c.end()));
