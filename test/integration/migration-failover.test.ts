/**
 * An online schema migration across two failovers of its shard's primary (issue 12,
 * decision 0079): an unsharded database of two instances (CDC on, ANY_1), table orders
 * under a writer inserting and updating through the gateway the whole time. The
 * migration (`ADD COLUMN ... DEFAULT`, `ALTER COLUMN qty TYPE bigint`, cut-over
 * postponed) is copied in small pages; kill -9 of the primary's Postgres in the copy,
 * then again in catch-up. Each time the orchestrator promotes the standby and the
 * migration reopens its sessions there and goes on by itself (the copy from its last
 * page, the apply from the positions the shard holds), saying in its message what it
 * waits for. Then it cuts over under the writer: the table has the new schema, and
 * every acknowledged write is in it, once. MG_MIGFAIL_SKIP_COPY_KILL=1 kills in catch-up only.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import type { ShardStatus } from '../../compose/orchestrators.ts';
import { fullStrength, postgresPids, shardStatus, signalAll, type ShardRef } from '../fault/support/faults.ts';
import { CdcWatch } from '../support/cdc-watch.ts';
import { sleep, testCluster, until } from '../support/cluster.ts';
import { statusHistory } from '../support/movetables.ts';

const PAGE_ROWS = 25;
const cluster = testCluster('migfailover', 2, { settings: { 'materializer.pageRows': PAGE_ROWS }, spec: {
  cells: ['zone1'],
  databases: [{ name: 'app', instancesPerShard: 2, durability: 'ANY_1', cdc: { enabled: true } }],
} });
const { spec, mg, dataDir, prefix } = cluster;
const SHARD: ShardRef = { database: 'app', shard: '-' };
const INITIAL_ROWS = 20_000;
const asText = { getTypeParser: () => (v: string) => v };

const api = async (p: string, method = 'GET', body?: unknown) => {
  const res = await fetch(`http://127.0.0.1:${spec.materializer.port}${p}`, {
    method, headers: body === undefined ? {} : { 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() as any };
};
const connect = async (port: number) => {
  const c = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', password: 'postgres', database: 'app', types: asText });
  c.on('error', () => undefined);
  await c.connect();
  return c;
};
const gateway = () => connect(spec.gateway.port);
/** A session on the shard's primary now (after a failover it is the other instance). */
async function onPrimary(): Promise<pg.Client> {
  const s = await shardStatus(cluster, SHARD);
  return connect(s.instances.find((i) => i.instanceId === s.primary)!.port);
}

let watch: CdcWatch;

/**
 * What the writer was told: each id's last acknowledged note. A write whose outcome the client never
 * learnt (its session died under it) leaves its id with either value possible, until a later write is acknowledged.
 */
const acknowledged = new Map<number, string>();
const possible = new Map<number, Set<string | undefined>>();
let writing = true;
let writes = 0;
let failedWrites = 0;
let next = INITIAL_ROWS + 1;

async function writer(): Promise<void> {
  let c: pg.Client | undefined;
  while (writing) {
    const r = writes++ % 3;
    const id = r < 2 ? next++ : 1 + Math.floor(Math.random() * (next - 1));
    const note = r < 2 ? `i${id}` : `u${writes}`;
    try {
      c ??= await gateway();
      if (r < 2) await c.query('INSERT INTO orders (id, qty, note) VALUES ($1, $2, $3)', [id, id % 1000, note]);
      else if ((await c.query('UPDATE orders SET note = $2, qty = qty + 1 WHERE id = $1', [id, note])).rowCount !== 1) continue;
      acknowledged.set(id, note);
      possible.delete(id);
    } catch {
      failedWrites++;
      const was = possible.get(id) ?? new Set([acknowledged.get(id)]);
      possible.set(id, was.add(note));
      await c?.end().catch(() => undefined);
      c = undefined;
      await sleep(100);
    }
  }
  await c?.end().catch(() => undefined);
}

/** The migration's phase, rows copied, reported lag and message, sampled from its REST API until stopped. */
const samples: { at: number; phase: string; rowsCopied: number; lag: number; message: string | null }[] = [];
let sampling = true;
let migration = '';
async function sampler(): Promise<void> {
  while (sampling) {
    const w = migration ? await api(`/v1/migrations/${migration}`).catch(() => undefined) : undefined;
    if (w?.body?.progress) samples.push({ at: Date.now(), phase: w.body.phase, rowsCopied: Number(w.body.progress.rowsCopied), lag: Number(w.body.progress.lagSeconds ?? 0), message: w.body.message });
    await sleep(100);
  }
}

const lastSeen = (err: Error): never => {
  const last = samples.at(-1);
  throw new Error(`${err.message}; the migration is ${last?.phase} at ${last?.rowsCopied} rows: ${last?.message}`);
};

/**
 * After a kill at `killedAt`: the message naming the lost session, then the one saying it was reopened (never FAILED).
 * A wait shorter than the sampling period leaves only the second: `waiting` is then that one.
 */
async function reopened(what: string, killedAt: number) {
  const waiting = await until(`${what}: the message saying what the migration waits for`, 150_000, () => {
    const failed = samples.find((s) => s.at > killedAt && s.phase === 'FAILED');
    if (failed) throw new Error(`${what}: the migration failed: ${failed.message}`);
    return samples.find((s) => s.at > killedAt && s.message?.includes('app/-') && s.message.includes('waiting for the primary'))
      ?? samples.find((s) => s.at > killedAt && s.message?.includes('app/-') && s.message.includes('reopened'));
  }).catch(lastSeen);
  const back = await until(`${what}: the session on app/- reopened`, 150_000, () => {
    const failed = samples.find((s) => s.at > killedAt && s.phase === 'FAILED');
    if (failed) throw new Error(`${what}: the migration failed: ${failed.message}`);
    return samples.find((s) => s.at >= waiting.at && s.message?.includes('app/-') && s.message.includes('reopened'));
  }).catch(lastSeen);
  return { waiting, back };
}

/** Waits until the standby holds a ready copy of the CDC slot (decision 0052): a failover then keeps the stream's epoch. */
async function slotCopied(): Promise<ShardStatus> {
  const s = await fullStrength(cluster, 120_000, 1_500, SHARD);
  const standby = s.instances.find((i) => i.instanceId !== s.primary)!.instanceId;
  await until(`${standby}'s copy of the slot ready`, 90_000, async () =>
    JSON.parse((await watch.command(standby, 'CDC_STATUS')).message).standbySlot?.ready === true);
  await sleep(1_000);
  return s;
}

const columns = async (c: pg.Client, schema: string, table: string) =>
  Object.fromEntries((await c.query('SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2', [schema, table])).rows.map((r) => [r.column_name, r.data_type]));

before(async () => {
  watch = await CdcWatch.open(prefix);
  const up = await mg('cluster', 'up', ...cluster.flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  const c = await gateway();
  await c.query('CREATE TABLE orders (id int PRIMARY KEY, qty int NOT NULL, note text)');
  await c.query(`INSERT INTO orders SELECT g, g % 1000, 'i' || g FROM generate_series(1, ${INITIAL_ROWS}) g`);
  await c.end();
  for (let id = 1; id <= INITIAL_ROWS; id++) acknowledged.set(id, `i${id}`);
});

after(async () => {
  writing = false;
  sampling = false;
  await watch?.close();
  await mg('cluster', 'down', '--data-dir', dataDir, '--clean');
});

test('an online ALTER TABLE under a writer: kill -9 of the primary in the copy and again in catch-up; the migration goes on, cuts over, every acknowledged write in the new table once', cluster.explained(async (t) => {
  const writing$ = writer();
  const sampling$ = sampler();
  await slotCopied();
  const ddl = "ALTER TABLE orders ADD COLUMN status text NOT NULL DEFAULT 'new', ALTER COLUMN qty TYPE bigint";
  const submitted = await api('/v1/migrations', 'POST', { database: 'app', ddl, postponeCutOver: true });
  assert.equal(submitted.status, 201, JSON.stringify(submitted.body));
  migration = submitted.body.name;

  // In the copy, once some pages are copied.
  if (process.env.MG_MIGFAIL_SKIP_COPY_KILL !== '1') {
    const copying = await until('some pages copied', 120_000, () => samples.at(-1)?.phase === 'COPYING' && samples.at(-1)!.rowsCopied >= 100 * PAGE_ROWS && samples.at(-1)).catch(lastSeen);
    const inCopy = await shardStatus(cluster, SHARD);
    const killedAt = Date.now();
    signalAll(postgresPids(cluster, inCopy.primary!), 'SIGKILL');
    const { waiting, back } = await reopened('kill in the copy', killedAt);
    const on = await until('the copy to go on', 120_000, () => samples.find((s) => s.at >= back.at && (s.rowsCopied > back.rowsCopied || s.phase === 'RUNNING'))).catch(lastSeen);
    assert.ok(samples.filter((s) => s.at > killedAt && s.at <= on.at).every((s) => s.phase === 'COPYING'), 'the migration left the copy phase');
    t.diagnostic(`copy: ${inCopy.primary} killed at ${copying.rowsCopied} rows; first message "${waiting.message}" after ${((waiting.at - killedAt) / 1000).toFixed(1)} s; `
      + `"${back.message}"; the copy went on ${((on.at - killedAt) / 1000).toFixed(1)} s after the kill`);
  }

  // In catch-up, once the changes made during the copy are applied.
  const running = await until('catch-up to begin', 300_000, () => {
    const failed = samples.find((s) => s.phase === 'FAILED');
    if (failed) throw new Error(`the migration failed before catch-up: ${failed.message}`);
    return samples.find((s) => s.phase === 'RUNNING');
  }).catch(lastSeen);
  await until('catch-up to apply the changes made during the copy', 120_000, () => {
    const recent = samples.filter((s) => s.at > Date.now() - 2_000);
    return running.at < Date.now() - 3_000 && recent.length > 0 && recent.every((s) => s.phase === 'RUNNING' && s.lag < 1);
  }).catch(lastSeen);
  const inCatchUp = await slotCopied();
  const killedAt = Date.now();
  signalAll(postgresPids(cluster, inCatchUp.primary!), 'SIGKILL');
  const { waiting, back } = await reopened('kill in catch-up', killedAt);
  const caughtUp = await until('catch-up to go on, lag under 1 s', 120_000, () => {
    const recent = samples.filter((s) => s.at > back.at && s.at > Date.now() - 2_000);
    return back.at < Date.now() - 2_000 && recent.length > 0 && recent.every((s) => s.phase === 'RUNNING' && s.lag < 1) && recent.at(-1);
  }).catch(lastSeen);
  const newPrimary = await shardStatus(cluster, SHARD);
  const lagPeak = Math.max(0, ...samples.filter((s) => s.at >= killedAt).map((s) => s.lag));
  t.diagnostic(`catch-up: ${inCatchUp.primary} killed, primary now ${newPrimary.primary} (term ${inCatchUp.term} -> ${newPrimary.term}); first message "${waiting.message}" after ${((waiting.at - killedAt) / 1000).toFixed(1)} s; `
    + `"${back.message}"; lag peaked at ${lagPeak.toFixed(1)} s, back under 1 s ${((caughtUp.at - killedAt) / 1000).toFixed(1)} s after the kill`);
  const stream = watch.statuses.find((s) => s.database === 'app' && s.ts.getTime() > killedAt && BigInt(s.term) > BigInt(inCatchUp.term!) && s.state === 'STREAMING');
  if (stream) t.diagnostic(`stream on ${stream.instanceId} (epoch ${stream.epoch}, ${stream.resumedFrom})`);

  // The cut-over, under the writer.
  await fullStrength(cluster, 120_000, 1_000, SHARD).catch(() => undefined); // not needed; lets the cut-over meet a settled shard
  const cut = await mg('migration', 'cutover', migration, '--data-dir', dataDir);
  assert.equal(cut.code, 0, cut.stderr + cut.stdout);
  t.diagnostic(`cut-over: ${cut.stdout.trim().split('\n').at(-1)}`);
  await until('the migration cut over', 60_000, () => samples.at(-1)?.phase === 'SWITCHED' && samples.at(-1)).catch(lastSeen);
  await sleep(1_500);
  writing = false;
  await writing$;
  t.diagnostic(`writer: ${writes} writes, ${failedWrites} failed (their outcome unknown to the client)`);
  assert.ok(writes > 300, `the writer made ${writes} writes`);

  // The new schema, with the default on every old row, and every acknowledged write once.
  const c = await onPrimary();
  assert.deepEqual(await columns(c, 'public', 'orders'), { id: 'integer', qty: 'bigint', note: 'text', status: 'text' });
  const rows = (await c.query('SELECT id, note, status FROM orders')).rows;
  const byId = new Map(rows.map((r) => [Number(r.id), r]));
  assert.equal(byId.size, rows.length, 'a row is in the table twice');
  assert.deepEqual(rows.filter((r) => r.status !== 'new').map((r) => r.id), [], 'rows without the new column\'s default');
  for (const [id, note] of acknowledged) {
    const either = possible.get(id);
    const row = byId.get(id);
    if (either) assert.ok(either.has(row?.note), `row ${id}: ${row?.note} in the table, neither of ${[...either].join(', ')}`);
    else assert.equal(row?.note, note, `row ${id}: the acknowledged note ${note} is not in the new table`);
  }
  const strays = rows.filter((r) => !acknowledged.has(Number(r.id)) && !possible.get(Number(r.id))?.size);
  assert.deepEqual(strays.map((r) => r.id), [], 'rows in the table that no write could have made');
  await c.end();

  // The migration went on by itself: never FAILED, the copy phase never started over.
  sampling = false;
  await sampling$;
  const history = await statusHistory(prefix, migration);
  assert.deepEqual(history.filter((s) => s.phase === 'FAILED').map((s) => s.message), [], 'the migration failed on the way');
  const firstRunning = history.findIndex((s) => s.phase === 'RUNNING');
  assert.deepEqual([...new Set(history.slice(firstRunning).map((s) => s.phase))].filter((p) => p !== 'RUNNING' && p !== 'SWITCHED'), [], 'the migration left catch-up before its cut-over');
  t.diagnostic(`rows copied: ${history[firstRunning].rowsCopied} (table of ${INITIAL_ROWS} rows plus the writer's inserts during the copy)`);
}));
