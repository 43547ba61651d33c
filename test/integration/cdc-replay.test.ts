/**
 * The replay test: under a continuous mixed write load (inserts, updates,
 * deletes, key changes, multi-statement transactions, a TRUNCATE, an ALTER
 * TABLE, a re-snapshot), with the agent and then Postgres killed with -9
 * mid-stream, a sink that applies the change stream (deduplicating by
 * (epoch, commit LSN, position)) to a fresh Postgres ends with exactly the
 * source's table contents.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { PostgresInstance } from '../../ingest/postgres/instance.ts';
import type { AgentAction } from '../../schemas/index.ts';
import { ChangeConsumer, decimalText, type ChangeMessage } from '../support/cdc-consumer.ts';
import { CdcWatch } from '../support/cdc-watch.ts';
import { sleep, testCluster, until } from '../support/cluster.ts';
import { bootstrap, registryUrl, testLog } from '../support/env.ts';

const cluster = testCluster('cdcreplay', 3, { spec: {
  databases: [{ name: 'postgres', shards: 1, instancesPerShard: 1, cdc: { enabled: true, heartbeatMs: 500 } }],
} });
const { dataDir, prefix, flags, mg } = cluster;
const [source] = cluster.instances;
const topic = (table: string) => `${prefix}mg.postgres.public.${table}`;
const TABLES = ['accounts', 'ledger'];

let watch: CdcWatch;
let sinkPg: PostgresInstance;
let sink: pg.Client;

const connect = async (port: number) => {
  const c = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', database: 'postgres' });
  c.on('error', () => undefined);
  await c.connect();
  return c;
};
async function sql(port: number, text: string): Promise<any[]> {
  const c = await connect(port);
  try {
    return (await c.query(text)).rows;
  } finally {
    await c.end();
  }
}

const DDL = `
  CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance numeric(12,2) NOT NULL, note text);
  CREATE TABLE ledger (id bigserial PRIMARY KEY, account bigint NOT NULL, amount numeric(12,2), memo jsonb);`;

before(async () => {
  watch = await CdcWatch.open(prefix);
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  // The sink: a fresh Postgres with the same tables (plus the column the ALTER adds).
  const sinkDir = path.join(dataDir, 'sink');
  fs.mkdirSync(sinkDir, { mode: 0o755 });
  sinkPg = new PostgresInstance({ name: 'sink', dataDir: path.join(sinkDir, 'data'), port: cluster.spec.postgres.basePort + 490, log: testLog });
  await sinkPg.initPrimary();
  await sinkPg.start();
  sink = await connect(sinkPg.port);
  await sink.query(`${DDL} ALTER TABLE accounts ADD COLUMN tier int;`);
});

after(async () => {
  await sink?.end().catch(() => undefined);
  await sinkPg?.stop('immediate').catch(() => undefined);
  await watch?.close();
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

/** A mixed write load on the source until `stop`; failed statements (Postgres killed) reconnect and go on. */
function writeLoad(workers: number, state: { stop: boolean; altered: boolean; committed: number }): Promise<void[]> {
  let nextId = 100_000;
  const worker = async (w: number) => {
    let c: pg.Client | undefined;
    while (!state.stop) {
      try {
        c ??= await connect(source.port);
        const id = Math.floor(Math.random() * 600) + 1;
        const r = Math.random();
        if (r < 0.35) {
          await c.query('BEGIN');
          await c.query('INSERT INTO ledger (account, amount, memo) VALUES ($1, $2, $3)', [id, (Math.random() * 100).toFixed(2), JSON.stringify({ w, at: Date.now() })]);
          await c.query('UPDATE accounts SET balance = balance + $2 WHERE id = $1', [id, (Math.random() * 10).toFixed(2)]);
          await c.query('COMMIT');
        } else if (r < 0.55) {
          await c.query('INSERT INTO accounts VALUES ($1, $2, $3, NULL) ON CONFLICT DO NOTHING', [nextId++, `owner-${w}`, '0.00']);
        } else if (r < 0.7) {
          await c.query(state.altered ? 'UPDATE accounts SET note = md5(random()::text), tier = $2 WHERE id = $1' : 'UPDATE accounts SET note = md5(random()::text) WHERE id = $1 AND $2 > 0', [id, w + 1]);
        } else if (r < 0.8) {
          await c.query('DELETE FROM accounts WHERE id = $1', [id]);
        } else if (r < 0.9) {
          await c.query('DELETE FROM ledger WHERE id IN (SELECT id FROM ledger ORDER BY random() LIMIT 3)');
        } else if (r < 0.95) {
          await c.query('UPDATE accounts SET id = id + 1000000 WHERE id = $1', [id]); // a key change
        } else {
          await c.query('BEGIN');
          await c.query("INSERT INTO accounts VALUES ($1, 'batch', 1.00, 'multi')", [nextId++]);
          await c.query("UPDATE accounts SET note = 'touched' WHERE id = $1", [id]);
          await c.query('DELETE FROM ledger WHERE account = $1', [id]);
          await c.query('COMMIT');
        }
        state.committed++;
      } catch {
        await c?.end().catch(() => undefined);
        c = undefined;
        await sleep(100);
      }
    }
    await c?.end().catch(() => undefined);
  };
  return Promise.all(Array.from({ length: workers }, (_, w) => worker(w)));
}

/** The sink: applies each event once, in order per partition, skipping redelivered ones. */
function applier() {
  const last = new Map<string, bigint[]>();
  let duplicates = 0;
  const toParam = (v: unknown) => (typeof v === 'bigint' ? v.toString() : Buffer.isBuffer(v) ? decimalText(v, 2) : v);
  const later = (a: bigint[], b: bigint[]) => {
    for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] > b[i];
    return false;
  };
  const apply = async (m: ChangeMessage) => {
    if (!m.value) return; // tombstone
    const v = m.value;
    const s = v.source;
    // Snapshot events of an epoch come before its streamed ones.
    const order = [s.epoch, s.snapshot === 'false' ? 1n : 0n, s.commit_lsn, s.position];
    const at = `${m.topic}/${m.partition}`;
    const held = last.get(at);
    if (held && !later(order, held)) {
      duplicates++;
      return;
    }
    last.set(at, order);
    const table = s.table;
    if (v.op === 't') await sink.query(`TRUNCATE ${table}`);
    else if (v.op === 'd') await sink.query(`DELETE FROM ${table} WHERE id = $1`, [toParam(v.before.id)]);
    else {
      const cols = Object.keys(v.after).filter((c) => !v.unavailable.includes(c));
      const params = cols.map((c) => toParam(v.after[c]));
      const sets = cols.filter((c) => c !== 'id').map((c) => `${c} = EXCLUDED.${c}`);
      await sink.query(
        `INSERT INTO ${table} (${cols.join(', ')}) VALUES (${cols.map((_, i) => `$${i + 1}`).join(', ')})
         ON CONFLICT (id) DO ${sets.length ? `UPDATE SET ${sets.join(', ')}` : 'NOTHING'}`, params);
    }
  };
  return { apply, duplicates: () => duplicates };
}

const command = (action: AgentAction, args: Record<string, string> = {}) => watch.command(source.instanceId, action, args);

const contents = async (c: pg.Client | number) => {
  const q = async (text: string) => (typeof c === 'number' ? sql(c, text) : (await c.query(text)).rows);
  return {
    accounts: await q('SELECT id::text, owner, balance::text, note, tier FROM accounts ORDER BY id'),
    ledger: await q('SELECT id::text, account::text, amount::text, memo::text FROM ledger ORDER BY id'),
  };
};

test('a sink applying the stream ends identical to the source, through kill -9 of the agent and of Postgres', cluster.explained(async () => {
  await sql(source.port, `${DDL}
    INSERT INTO accounts SELECT g, 'seed', g, NULL FROM generate_series(1, 500) g;
    INSERT INTO ledger (account, amount, memo) SELECT g % 500 + 1, g, '{"seed": true}' FROM generate_series(1, 2000) g;`);
  const { apply, duplicates } = applier();
  const consumer = new ChangeConsumer(bootstrap(), registryUrl(), apply);
  await consumer.follow(TABLES.map(topic));
  const state = { stop: false, altered: false, committed: 0 };
  const load = writeLoad(3, state);
  try {
    await sleep(1_500);
    // A new snapshot while writes go on: it must line up exactly with where streaming resumes.
    const resnap = await command('CDC_START', { resnapshot: 'true' });
    assert.equal(resnap.status, 'SUCCEEDED', resnap.message);
    await until('the new epoch streaming', 60_000, () => watch.statuses.some((s) => s.epoch >= 2n && s.state === 'STREAMING'));
    await sql(source.port, 'ALTER TABLE accounts ADD COLUMN tier int');
    state.altered = true;
    await sleep(1_000);
    await sql(source.port, "BEGIN; TRUNCATE ledger; INSERT INTO ledger (account, amount, memo) VALUES (1, 1, '{\"after\": \"truncate\"}'); COMMIT;");
    await sleep(1_000);

    // kill -9 the agent mid-stream; `mg cluster up` starts a new one, which resumes from the slot.
    const agentPid = Number(fs.readFileSync(path.join(dataDir, 'run', `agent-${source.instanceId}.pid`), 'utf8').split(' ')[0]);
    process.kill(agentPid, 'SIGKILL');
    await sleep(1_500);
    const up = await mg('cluster', 'up', ...flags);
    assert.equal(up.code, 0, up.stderr + up.stdout);
    await sleep(2_000);

    // kill -9 Postgres mid-stream; the agent restarts it and the stream resumes.
    const postmaster = Number(fs.readFileSync(path.join(source.dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
    process.kill(postmaster, 'SIGKILL');
    await until('Postgres back', 60_000, async () => sql(source.port, 'SELECT 1').then(() => true, () => false));
    await sleep(3_000);
  } finally {
    state.stop = true;
    await load;
  }
  assert.ok(state.committed > 500, `the load committed ${state.committed} statements`);

  const expected = await contents(source.port);
  try {
    await until('the sink equal to the source', 90_000, async () => JSON.stringify(await contents(sink)) === JSON.stringify(expected));
  } catch (err) {
    const got = await contents(sink);
    assert.deepEqual(got, expected, (err as Error).message);
  } finally {
    await consumer.stop();
  }
  testLog.info({ committed: state.committed, events: consumer.messages.length, duplicates: duplicates() }, 'replay done');
  // A stream restarted on its slot drops what Kafka already holds (decision 0052): the sink's deduplication found nothing to skip.
  assert.equal(duplicates(), 0, 'no event delivered twice');
  assert.ok(expected.accounts.length > 100 && expected.ledger.length > 0);
  assert.ok(expected.accounts.some((a: any) => a.tier !== null), 'rows written after the ALTER carry the new column');

  // Afterwards the slot catches up: nothing is left unconfirmed.
  const st = await until('slot lag back to small', 30_000, () => {
    const s = watch.statuses.at(-1);
    return s?.state === 'STREAMING' && s.slotLagBytes !== null && s.slotLagBytes < 1_000_000n ? s : undefined;
  });
  assert.equal(st.slotLagSeconds, 0);
  assert.equal(st.epoch, 2n, 'after both kills the stream resumed from its slot (no new snapshot)');
}));
