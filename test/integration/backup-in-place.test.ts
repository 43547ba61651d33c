/**
 * In-place point-in-time restore (`mg backup restore <db> --in-place`), as an
 * operator runs it on a real cluster with pgBackRest (1 shard, 2 instances in
 * 2 cells, so two orchestrators): rows written, a time noted, more written, a
 * table dropped by mistake; the restore brings the same database name back to
 * the noted time through the gateway, while a client connected all along
 * gets answers of before or after and clear errors in between, never anything
 * else. Then the replica streams from the new primary, a new write is
 * archived, and backups go on. Change data capture runs throughout: a consumer
 * that applies the stream and deduplicates by (epoch, commit LSN, position), as
 * docs/cdc.md says a consumer may, ends with exactly the restored rows.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import pg from 'pg';
import type { EventLog, Subscription } from '../../common/eventlog.ts';
import { callOrchestrator, orchestratorStatus } from '../../compose/orchestrators.ts';
import type { BackupEvent, OrchEvent } from '../../schemas/index.ts';
import { ChangeConsumer, type ChangeMessage } from '../support/cdc-consumer.ts';
import { CdcWatch } from '../support/cdc-watch.ts';
import { sleep, testCluster, until } from '../support/cluster.ts';
import { bootstrap, registryUrl, testEventLog } from '../support/env.ts';
import { queryInstance as query } from '../support/postgres.ts';

const cluster = testCluster('inplace', 1, { spec: { cells: ['zone1', 'zone2'], databases: [
  { name: 'postgres', instancesPerShard: 2, cdc: { enabled: true } },
  // A whole sharded database goes to one time: two shards of one instance each, written directly.
  { name: 'shop', sharded: true, shards: 2, instancesPerShard: 1 },
] } });
const shopShards = cluster.instances.filter((i) => i.database === 'shop');
const { dataDir, prefix, flags, mg } = cluster;
const latestPort = cluster.spec.postgres.basePort + 480;
const latestDir = path.join(dataDir, 'restored', 'latest');

let eventLog: EventLog;
let cdc: CdcWatch;
/** The marks table as a consumer of its change topic has it. */
const consumed = new Set<number>();
let consumer: ChangeConsumer;
const subs: Subscription[] = [];
const orchEvents: OrchEvent[] = [];
const backupEvents: BackupEvent[] = [];

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  eventLog = await testEventLog(prefix);
  subs.push(await eventLog.subscribe('orchEvents', (e) => void orchEvents.push(e)));
  subs.push(await eventLog.subscribe('backups', (e) => void backupEvents.push(e)));
  cdc = await CdcWatch.open(prefix);
  await ok('backup', 'create', 'postgres/-', '--type', 'full');
  await ok('backup', 'create', 'shop', '--type', 'full');
});

after(async () => {
  for (const s of subs) await s.stop();
  await consumer?.stop();
  await cdc?.close();
  await eventLog?.close();
  if (fs.existsSync(path.join(latestDir, 'postmaster.pid'))) {
    execFileSync('su', ['postgres', '-c', `${path.join(cluster.spec.postgres.binDir, 'pg_ctl')} stop -m immediate -D ${latestDir}`]);
  }
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

const ok = (...args: string[]) => cluster.mgOk(...args);

/** postgres/- as MultiOrch has it now: term and primary. */
async function postgresShard() {
  return (await orchestratorStatus(cluster.spec)).shards.find((s) => s.database === 'postgres')!;
}

/** The epoch of postgres/-'s change stream once it streams in one above `above` (any epoch when not given). */
async function cdcStreaming(above = 0n): Promise<bigint> {
  const s = await until(`the CDC stream streaming in an epoch above ${above}`, 90_000, () =>
    [...cdc.statuses].reverse().find((st) => st.database === 'postgres' && st.state === 'STREAMING' && st.epoch > above));
  return s.epoch;
}

function gateway(): pg.Client {
  const client = new pg.Client({ host: '127.0.0.1', port: cluster.spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres' });
  client.on('error', () => undefined);
  return client;
}

async function viaGateway<T = any>(sql: string, params: unknown[] = []): Promise<T[]> {
  const client = gateway();
  await client.connect();
  try {
    return (await client.query(sql, params)).rows as T[];
  } finally {
    await client.end().catch(() => undefined);
  }
}

/**
 * Applies a change event the way docs/cdc.md allows a consumer to: it remembers the last
 * (epoch, snapshot first, commit LSN, position) applied per partition and shard, and skips
 * anything at or before it as a repeat.
 */
const applied = new Map<string, bigint[]>();
/** Every (epoch, n) a snapshot event carried, and those that came twice. */
const snapshotted = new Set<string>();
const snapshotRepeats: string[] = [];
function applyChange(m: ChangeMessage): void {
  if (!m.value) return; // a tombstone
  const { source, op } = m.value;
  if (source.snapshot === 'true' && m.value.after) {
    const row = `${source.epoch}/${m.value.after.n}`;
    if (snapshotted.has(row)) snapshotRepeats.push(row);
    snapshotted.add(row);
  }
  const at = [source.epoch, source.snapshot === 'true' ? 0n : 1n, source.commit_lsn, source.position];
  const key = `${m.partition}/${source.shard}`;
  const last = applied.get(key);
  if (last && compareTuples(at, last) <= 0) return;
  applied.set(key, at);
  if (op === 't') consumed.clear();
  else if (op === 'd') consumed.delete(m.value.before.n);
  else consumed.add(m.value.after.n);
}
function compareTuples(a: bigint[], b: bigint[]): number {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] < b[i] ? -1 : 1;
  return 0;
}
const consumedMarks = () => [...consumed].sort((x, y) => x - y);
const range = (lo: number, hi: number) => Array.from({ length: hi - lo + 1 }, (_, i) => lo + i);

/** What a client of the gateway saw while the restore ran: answers (the count of `marks`) and errors, in order. */
interface Seen { at: number; ms: number; count?: number; code?: string; message?: string }

/** Errors a client may get while its database is restored: held then refused (57P03), or its connection ended. */
const CLEAR = new Set(['57P03', '57P01', '08006', '08003', '08000', '08001']);
const CONNECTION_LOST = /Connection terminated|ECONNRESET|ECONNREFUSED|not queryable/;

/** Queries through the gateway until stopped, reconnecting when the connection ends. */
function watchClient(): { seen: Seen[]; stop: () => Promise<Seen[]> } {
  const seen: Seen[] = [];
  let running = true;
  const loop = (async () => {
    while (running) {
      const client = gateway();
      try {
        await client.connect();
        while (running) {
          const t0 = Date.now();
          try {
            const { rows } = await client.query('SELECT count(*)::int AS n FROM marks');
            seen.push({ at: t0, ms: Date.now() - t0, count: rows[0].n });
          } catch (err) {
            const e = err as { code?: string; message: string };
            seen.push({ at: t0, ms: Date.now() - t0, code: e.code, message: e.message });
            if (!e.code || e.code.startsWith('08') || e.code === '57P01') break; // the session is over: connect again
          }
          await sleep(100);
        }
      } catch (err) {
        seen.push({ at: Date.now(), ms: 0, code: (err as { code?: string }).code, message: (err as Error).message });
        await sleep(200);
      } finally {
        await client.end().catch(() => undefined);
      }
    }
  })();
  return { seen, stop: async () => { running = false; await loop; return seen; } };
}

test('REST: bad input is a 400 naming the field, an unknown database a 404, a time before every backup fails before anything changes', cluster.explained(async () => {
  const noFlag = await callOrchestrator(cluster.spec, 'POST', '/v1/backups/postgres/-/restore', { time: new Date().toISOString() });
  assert.equal(noFlag.status, 400);
  assert.match(noFlag.body.error, /body\.inPlace: is required/);
  const badTime = await callOrchestrator(cluster.spec, 'POST', '/v1/backups/postgres/-/restore', { inPlace: true, time: 'yesterday' });
  assert.equal(badTime.status, 400);
  assert.match(badTime.body.error, /body\.time: must match format "date-time"/);
  const noTarget = await callOrchestrator(cluster.spec, 'POST', '/v1/backups/postgres/restore', { inPlace: true });
  assert.equal(noTarget.status, 400);
  assert.match(noTarget.body.error, /give time or lsn/);
  const missing = await callOrchestrator(cluster.spec, 'POST', '/v1/backups/nodb/restore', { inPlace: true, time: new Date().toISOString() });
  assert.equal(missing.status, 404);
  const multiShardLsn = await callOrchestrator(cluster.spec, 'POST', '/v1/backups/shop/restore', { inPlace: true, lsn: '0/3000000' });
  assert.equal(multiShardLsn.status, 400);
  assert.match(multiShardLsn.body.error, /body\.lsn: shop has 2 shards/);
  const doc = await callOrchestrator(cluster.spec, 'GET', '/openapi.json');
  for (const route of ['/v1/backups/{database}/restore', '/v1/backups/{database}/{shard}/restore']) assert.ok(doc.body.paths[route]?.post?.requestBody, `${route} in the OpenAPI document`);

  const tooEarly = await callOrchestrator(cluster.spec, 'POST', '/v1/backups/postgres/-/restore?wait=true', { inPlace: true, time: '2020-01-01T00:00:00Z' });
  assert.equal(tooEarly.status, 503);
  assert.match(tooEarly.body.error, /postgres\/-: no backup ended before time 2020-01-01T00:00:00Z; the earliest ended at/);
  assert.deepEqual(await viaGateway('SELECT 1 AS one'), [{ one: 1 }], 'the database still serves');
}));

test('restore --in-place --time: the same database holds exactly the rows of the noted time; a client meanwhile waits or gets a clear error', cluster.explained(async () => {
  const termBefore = BigInt((await postgresShard()).term!);
  await viaGateway('CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)');
  await viaGateway('INSERT INTO accounts SELECT i, i * 10 FROM generate_series(1, 500) i');
  await viaGateway('UPDATE accounts SET balance = balance + 1 WHERE id <= 100');
  await viaGateway('CREATE TABLE marks (n int PRIMARY KEY)');
  await viaGateway('INSERT INTO marks SELECT generate_series(1, 100)');
  consumer = new ChangeConsumer(bootstrap(), registryUrl(), applyChange);
  await consumer.follow([`${prefix}mg.postgres.public.marks`]);
  await until('the consumer to hold marks 1-100', 30_000, () => consumed.size === 100);
  await sleep(1_100);
  const noted = new Date();
  await sleep(1_100);
  await viaGateway('INSERT INTO accounts SELECT i, 0 FROM generate_series(501, 700) i');
  await viaGateway('DELETE FROM accounts WHERE id BETWEEN 200 AND 300');
  await viaGateway('INSERT INTO marks SELECT generate_series(101, 150)');
  await viaGateway('DROP TABLE accounts');
  // The stream moves to a new epoch after the noted time (a re-snapshot), so the restored data's CDC state names an
  // epoch Kafka has already passed: the stream after the restore must not use an epoch number again.
  const epochBefore = await cdcStreaming();
  const resnap = await cdc.command((await postgresShard()).primary!, 'CDC_START', { resnapshot: 'true' });
  assert.equal(resnap.status, 'SUCCEEDED', resnap.message);
  const epochAfterNoted = await cdcStreaming(epochBefore);
  await until('the consumer to hold marks 1-150', 30_000, () => consumed.size === 150);

  const client = watchClient();
  await until('the watching client to see the table as it is now', 10_000, () => client.seen.some((s) => s.count !== undefined));
  const t0 = Date.now();
  let out: string;
  let restoreMs: number;
  try {
    out = await ok('backup', 'restore', 'postgres', '--in-place', '--time', noted.toISOString());
    restoreMs = Date.now() - t0;
    await sleep(1_000); // the watcher sees the database served again
  } finally {
    await client.stop();
  }
  const { seen } = client;

  for (const line of [/current WAL is archived; restoring from backup \S+F/, /drained: .* NOT_SERVING/, /restored in place from backup \S+ to time .* a primary on timeline \d+/,
    /full backup \S+F on the new timeline/, /rejoins/, /is primary of term \d+/, /pgbackrest check on the new primary: archiving works/, /restore in place postgres: done in/]) {
    assert.match(out, line);
  }

  // Exactly the rows of the noted time, under the same database name through the gateway.
  const [accounts] = await viaGateway('SELECT count(*)::int AS n, sum(balance)::int AS total, min(id) AS lo, max(id) AS hi FROM accounts');
  assert.deepEqual(accounts, { n: 500, total: 500 * 501 / 2 * 10 + 100, lo: 1, hi: 500 });
  assert.deepEqual(await viaGateway('SELECT count(*)::int AS n, max(n) AS hi FROM marks'), [{ n: 100, hi: 100 }]);

  // The client saw the database as it was (150 marks), then as restored (100), and clear errors in between; nothing else, and no way back.
  const answers = seen.filter((s) => s.count !== undefined);
  const errors = seen.filter((s) => s.count === undefined);
  assert.ok(answers.length > 0 && answers[0].count === 150, `answers before the restore: ${JSON.stringify(answers.slice(0, 3))}`);
  assert.equal(answers.at(-1)!.count, 100, 'the client sees the restored database at the end');
  const firstRestored = answers.findIndex((s) => s.count === 100);
  assert.ok(answers.every((s, i) => s.count === (i < firstRestored ? 150 : 100)), `answers: ${answers.map((s) => s.count).join(',')}`);
  for (const e of errors) assert.ok(e.code ? CLEAR.has(e.code) : CONNECTION_LOST.test(e.message ?? ''), `an unclear error during the restore: ${e.code} ${e.message}`);
  const refused = errors.filter((e) => e.code === '57P03');
  const held = answers.filter((s) => s.ms > 1_000);
  assert.ok(refused.length + held.length > 0, 'the client was held (and answered after) or refused with 57P03 while the shard was out of service');
  for (const e of refused) assert.match(e.message!, /no serving primary for postgres\/-/);
  console.log(out);
  console.log(`restore: ${restoreMs!} ms; the client saw ${answers.length} answers (${held.length} held > 1 s), ${refused.length} x 57P03, ${errors.length - refused.length} other clear errors`);

  // CDC streams the restored history in an epoch above every one before it, and a deduplicating consumer follows it.
  const epochRestored = await cdcStreaming(epochAfterNoted);
  // Each epoch's snapshot is one snapshot: an epoch number used again after the restore would show its rows twice,
  // and a consumer deduplicating by epoch would drop the restored history's snapshot as a repeat.
  assert.deepEqual(snapshotRepeats, [], 'rows snapshotted twice under one epoch (epoch/n): an epoch number was used again');
  await until('the consumer to hold exactly the restored marks', 30_000, () => consumed.size === 100 && consumedMarks().at(-1) === 100);
  assert.deepEqual(consumedMarks(), range(1, 100));
  console.log(`CDC epochs: ${epochBefore} before the noted time, ${epochAfterNoted} after it, ${epochRestored} after the restore`);

  // Every step was an event: the operation's, the full backup on the new timeline, the election under a new term.
  const ops = orchEvents.filter((e) => e.operation === 'restore' && e.shard === '-' && e.ts.getTime() >= t0);
  assert.ok(ops.some((e) => e.kind === 'DECIDED' && /restore in place to time/.test(e.summary)), 'the DECIDED event of the restore');
  assert.ok(ops.some((e) => e.kind === 'COMPLETED' && /^restored in place to time/.test(e.summary)), 'the COMPLETED event of the restore');
  assert.ok(ops.filter((e) => e.kind === 'ACTED').length >= 4, 'drained, restored, backed up, rejoined');
  const elected = orchEvents.find((e) => e.operation === 'restore' && e.kind === 'COMPLETED' && e.term !== null && e.term > termBefore && /is primary of term/.test(e.summary));
  assert.ok(elected, `an election under a new term (above ${termBefore}) ends the restore`);
  assert.ok(backupEvents.some((e) => e.state === 'COMPLETED' && e.type === 'FULL' && e.ts.getTime() > t0), 'the full backup on the new timeline has its COMPLETED event');
}));

test('after the restore: the replica streams from the new primary, a write is archived, and backups and restores go on', cluster.explained(async () => {
  const primaryId = (await postgresShard()).primary;
  const members = cluster.instances.filter((i) => i.database === 'postgres');
  const primary = members.find((i) => i.instanceId === primaryId)!;
  const replica = members.find((i) => i !== primary)!;
  // Asked straight after the restore: the primary's Postgres may still be starting (CI once met ECONNREFUSED here).
  await until('the replica to stream from the new primary', 60_000, async () =>
    (await query(primary.port, "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'", [replica.instanceId])
      .catch((err: { code?: string }) => (err.code === 'ECONNREFUSED' || err.code === '57P03' ? [] : Promise.reject(err)))).length > 0);
  const [{ tli }] = await query(primary.port, "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int AS tli");
  assert.ok(tli > 1, `the primary runs on a new timeline (${tli})`);

  await viaGateway('INSERT INTO marks VALUES (1000)');
  await until('the replica to hold the restored rows and the new write', 10_000, async () =>
    (await query(replica.port, 'SELECT count(*)::int AS n FROM marks'))[0].n === 101);
  await until('the CDC consumer to get the new write (its LSN may be below ones the old timeline streamed)', 30_000, () => consumed.has(1000));
  assert.deepEqual(consumedMarks(), [...range(1, 100), 1000]);
  assert.match(await ok('backup', 'check', 'postgres/-'), /ok: archiving works/);
  assert.match(await ok('backup', 'create', 'postgres/-', '--type', 'incr'), /incr backup \S+I completed/);
  // The archive holds the write: the latest backup restored to the end of the archive has it.
  await ok('backup', 'restore', 'postgres/-', '--to-dir', latestDir, '--port', String(latestPort));
  assert.deepEqual(await query(latestPort, 'SELECT count(*)::int AS n, max(n) AS hi FROM marks'), [{ n: 101, hi: 1000 }]);
}));

test('a sharded database: restore --in-place brings every shard back to the same time', cluster.explained(async () => {
  assert.equal(shopShards.length, 2);
  for (const i of shopShards) await query(i.port, 'CREATE TABLE orders (id int PRIMARY KEY, shard text NOT NULL)');
  for (const [n, i] of shopShards.entries()) await query(i.port, 'INSERT INTO orders SELECT g, $1 FROM generate_series($2::int, $2::int + 49) g', [i.shard, n * 1000]);
  await sleep(1_100);
  const noted = new Date();
  await sleep(1_100);
  for (const [n, i] of shopShards.entries()) await query(i.port, 'INSERT INTO orders SELECT g, $1 FROM generate_series($2::int + 50, $2::int + 79) g', [i.shard, n * 1000]);
  await query(shopShards[0].port, 'DROP TABLE orders');

  const out = await ok('backup', 'restore', 'shop', '--in-place', '--time', noted.toISOString());
  for (const i of shopShards) assert.match(out, new RegExp(`shop/${i.shard}: ${i.instanceId} is primary of term \\d+`));
  for (const [n, i] of shopShards.entries()) {
    assert.deepEqual(await query(i.port, 'SELECT count(*)::int AS n, min(id) AS lo, max(id) AS hi, min(shard) AS shard FROM orders'),
      [{ n: 50, lo: n * 1000, hi: n * 1000 + 49, shard: i.shard }], `shop/${i.shard} at the noted time`);
  }
  const checked = await ok('backup', 'check', 'shop');
  for (const i of shopShards) assert.match(checked, new RegExp(`shop/${i.shard}: ok: archiving works`));
}));
