/**
 * CDC benchmark (`npm run bench:cdc`), one run on one machine:
 *  1. throughput: a write-heavy pgbench load (8-row INSERT + UPDATE + DELETE per
 *     transaction) run flat out on one shard; change events per second into
 *     Kafka (acks=all), counted from the load's start until the last one is
 *     acknowledged;
 *  2. end-to-end lag (commit time to the moment a consumer has the event), with
 *     the same shape of transaction but 18 inserted rows (20 changes), at
 *     half that rate (at most 25,000 events/s), p50/p99;
 *  3. the baseline: Postgres's own logical replication (CREATE SUBSCRIPTION
 *     into another instance) on the same load, rows per second until the
 *     subscriber has applied everything.
 * With `--failover` it measures instead what a source failover costs a running
 * stream (decision 0052): a table of FAILOVER_ROWS rows streamed from a primary
 * with a writer inserting rows, the primary killed with -9, its standby
 * promoted and a stream started there; once as before (no copy of the slot: a
 * new epoch and a re-snapshot), once with the standby keeping a copy of the
 * slot. Printed side by side: events sent twice (events in the topic minus
 * distinct rows) and seconds from the kill until the new stream is live.
 * Everything runs on ports 26000-26999 in a temporary directory.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import type avro from 'avsc';
import pg from 'pg';
import { EventLog } from '../common/eventlog.ts';
import { parseAvro } from '../schemas/index.ts';
import { StandbySlotSync } from '../ingest/cdc/standby-slot.ts';
import { createLogger } from '../common/log.ts';
import { startKafka, stopKafka } from '../compose/infra/kafka.ts';
import { startRegistry, stopRegistry } from '../compose/infra/registry.ts';
import { CdcStream } from '../ingest/cdc/stream.ts';
import { cdcConfigSchema } from '../ingest/config.ts';
import { parseLsn } from '../ingest/postgres/lsn.ts';
import { PostgresInstance } from '../ingest/postgres/instance.ts';

const PGBENCH = '/usr/lib/postgresql/15/bin/pgbench';
const KAFKA_PORT = 26092;
const REGISTRY_PORT = 26081;
const SOURCE_PORT = 26432;
const SINK_PORT = 26433;
const STANDBY_PORT = 26434;
const FAILOVER_ROWS = Number(process.env.CDC_BENCH_FAILOVER_ROWS ?? 100_000);
const CLIENTS = 4;
const TX_PER_CLIENT = Number(process.env.CDC_BENCH_TX ?? 5_000);
const EVENTS_PER_TX = 10; // 8 inserts, 1 update, 1 delete
const LAG_SECONDS = Number(process.env.CDC_BENCH_LAG_SECONDS ?? 20);
const SEED_ROWS = 200_000;

const log = createLogger('bench-cdc');
log.level = process.env.MG_LOG_LEVEL ?? 'warn';
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-bench-cdc-'));
fs.chmodSync(work, 0o755);
const runDir = path.join(work, 'run');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A transaction of `inserts` inserted rows, one update and one delete. */
const script = (inserts: number) => `\\set a random(1, ${SEED_ROWS})
BEGIN;
INSERT INTO bench_events (account, amount, note) SELECT :a, g, 'note ' || g FROM generate_series(1, ${inserts}) g;
UPDATE bench_events SET amount = amount + 1 WHERE id = :a;
DELETE FROM bench_events WHERE id = (SELECT id FROM bench_events WHERE id > :a ORDER BY id LIMIT 1);
COMMIT;
`;
/** The lag phase uses bigger transactions, so that a loaded machine can still offer the rate (commits/s is what runs out). */
const LAG_EVENTS_PER_TX = 20;

async function query(port: number, text: string): Promise<any[]> {
  const c = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', database: 'postgres' });
  c.on('error', () => undefined); // a server killed on purpose (--failover): the query's own error says it
  await c.connect();
  try {
    return (await c.query(text)).rows;
  } finally {
    await c.end();
  }
}

function pgbench(port: number, args: string[], eventsPerTx = EVENTS_PER_TX): Promise<{ tps: number; out: string }> {
  const file = path.join(work, `write-heavy-${eventsPerTx}.sql`);
  fs.writeFileSync(file, script(eventsPerTx - 2));
  return new Promise((resolve, reject) => {
    const child = spawn(PGBENCH, ['-h', '127.0.0.1', '-p', String(port), '-U', 'postgres', '-n', '-f', file, '-c', String(CLIENTS), '-j', '2', ...args, 'postgres'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    child.on('close', (code) => {
      const tps = Number(/tps = ([\d.]+)/.exec(out)?.[1] ?? NaN);
      if (code !== 0) reject(new Error(`pgbench exited ${code}: ${out.slice(-500)}`));
      else resolve({ tps, out });
    });
  });
}

/** Waits until the stream has confirmed a heartbeat written now: every event before it is in Kafka. */
async function streamPast(stream: CdcStream): Promise<void> {
  const marker = parseLsn((await query(SOURCE_PORT, "SELECT pg_logical_emit_message(false, 'mg.cdc.heartbeat', '')::text AS l"))[0].l);
  while ((stream.status().confirmedLsn ?? 0n) < marker) await sleep(10);
}

/** The subscriber's table matches the source's (its reported replay position lags by a status interval). */
async function subscriberCaughtUp(): Promise<void> {
  const fingerprint = "SELECT count(*)::text || '/' || coalesce(max(id), 0)::text || '/' || coalesce(sum(amount), 0)::text AS f FROM bench_events";
  const expected = (await query(SOURCE_PORT, fingerprint))[0].f;
  while ((await query(SINK_PORT, fingerprint))[0].f !== expected) await sleep(100);
}


async function newInstance(name: string, port: number): Promise<PostgresInstance> {
  const dir = path.join(work, name);
  fs.mkdirSync(dir, { mode: 0o755 });
  const inst = new PostgresInstance({
    name, dataDir: path.join(dir, 'data'), port, log,
    settings: { shared_buffers: '256MB', synchronous_commit: 'on', max_wal_size: '2GB', checkpoint_timeout: '15min' },
  });
  await inst.initPrimary();
  await inst.start();
  return inst;
}

const TABLE = 'CREATE TABLE bench_events (id bigserial PRIMARY KEY, account int NOT NULL, amount numeric(12,2), note text, created timestamptz DEFAULT now())';

async function main(): Promise<void> {
  console.log(`CDC benchmark in ${work} (${os.cpus().length} cores, load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')})`);
  await startKafka({ cacheDir: path.join(os.homedir(), '.cache', 'mg'), dataDir: path.join(work, 'kafka'), runDir, port: KAFKA_PORT, controllerPort: KAFKA_PORT + 1, heapMb: 1024, log });
  const registry = await startRegistry({ runDir, logDir: path.join(work, 'logs'), bootstrap: `127.0.0.1:${KAFKA_PORT}`, port: REGISTRY_PORT, topicPrefix: '' });
  const source = await newInstance('source', SOURCE_PORT);
  const sink = await newInstance('sink', SINK_PORT);
  const eventLog = new EventLog({ brokers: [`127.0.0.1:${KAFKA_PORT}`], registryUrl: registry.url, clientId: 'bench-cdc', log });
  try {
    await query(SOURCE_PORT, `${TABLE}; INSERT INTO bench_events (account, amount, note) SELECT g, g, 'seed' FROM generate_series(1, ${SEED_ROWS}) g`);
    const stream = new CdcStream({
      ...cdcConfigSchema.parse({}), database: 'postgres', shard: '-', instanceId: 'bench', host: '127.0.0.1', port: SOURCE_PORT, dataDir: path.join(work, 'source'), topicPrefix: 'bench',
    }, eventLog, log);
    const running = stream.run();
    running.catch((err) => {
      console.error('stream failed:', err);
      process.exit(1);
    });
    const snapStart = Date.now();
    while (stream.status().state !== 'STREAMING') await sleep(50);
    const snap = stream.status().snapshot!;
    console.log(`\nsnapshot: ${snap.rows} rows in ${((Date.now() - snapStart) / 1000).toFixed(1)}s (${Math.round(snap.rows / ((Date.now() - snapStart) / 1000))} rows/s, including slot creation)`);

    // 1a. Live: the load flat out with the stream running; events/s until Kafka acknowledged the last one.
    const events = CLIENTS * TX_PER_CLIENT * EVENTS_PER_TX;
    let lagP99 = Infinity;
    let before = stream.status().eventsTotal;
    const t0 = Date.now();
    const load = await pgbench(SOURCE_PORT, ['-t', String(TX_PER_CLIENT)]);
    const loadDone = Date.now();
    await streamPast(stream);
    const liveSeconds = (Date.now() - t0) / 1000;
    const liveEvents = Number(stream.status().eventsTotal - before);
    console.log(`\n1. throughput, ${CLIENTS} pgbench clients x ${TX_PER_CLIENT} transactions of ${EVENTS_PER_TX} changes (${events} changes)`);
    console.log(`   live: load generated in ${((loadDone - t0) / 1000).toFixed(1)}s (${Math.round(load.tps)} tps = ${Math.round(load.tps * EVENTS_PER_TX)} changes/s);` +
      ` ${liveEvents} events in Kafka ${((Date.now() - loadDone) / 1000).toFixed(2)}s after the load ended = ${Math.round(liveEvents / liveSeconds)} events/s (bounded by the load)`);

    // 1b. Backlog: the same load written while the stream is stopped, then drained: the stream's own capacity.
    await stream.stop();
    await running;
    await pgbench(SOURCE_PORT, ['-t', String(TX_PER_CLIENT)]);
    const resumed = stream.run();
    before = stream.status().eventsTotal;
    const d0 = Date.now();
    await streamPast(stream);
    const cdcSeconds = (Date.now() - d0) / 1000;
    const cdcEvents = Number(stream.status().eventsTotal - before);
    const cdcRate = cdcEvents / cdcSeconds;
    console.log(`   backlog: ${cdcEvents} events read from the slot and acknowledged by Kafka in ${cdcSeconds.toFixed(1)}s = ${Math.round(cdcRate)} events/s`);

    // 2. Lag at half that rate (at most 25,000 events/s, the figure), then at a rate a shared
    //    2-core machine sustains beside its own load generator (5,000 events/s).
    const targetEvents = Math.min(25_000, cdcRate / 2);
    console.log(`\n2. end-to-end lag, commit to consumer (another process), transactions of ${LAG_EVENTS_PER_TX} changes, ${LAG_SECONDS}s each`);
    for (const rate of [targetEvents, 5_000]) {
      const tps = Math.max(1, Math.round(rate / LAG_EVENTS_PER_TX));
      const lagger = spawn(process.execPath, ['--import', 'tsx', path.join(path.dirname(new URL(import.meta.url).pathname), 'cdc-lag-consumer.ts'),
        `127.0.0.1:${KAFKA_PORT}`, registry.url, 'bench.postgres.public.bench_events'], { stdio: ['pipe', 'pipe', 'inherit'] });
      const lines = readline.createInterface({ input: lagger.stdout! })[Symbol.asyncIterator]();
      const nextLine = async () => (await lines.next()).value as string;
      while ((await nextLine()) !== 'ready');
      // The stream's own view, to tell its lag from the consumer's: the age of the oldest commit Kafka has not acknowledged.
      const streamLags: number[] = [];
      const sampler = setInterval(() => streamLags.push(stream.status().slotLagSeconds ?? 0), 50);
      const lagLoad = await pgbench(SOURCE_PORT, ['-R', String(tps), '-T', String(LAG_SECONDS)], LAG_EVENTS_PER_TX);
      clearInterval(sampler);
      streamLags.sort((a, b) => a - b);
      await sleep(1_000);
      lagger.stdin!.write('stop\n');
      const lag = JSON.parse(await nextLine()) as { count: number; p50: number; p99: number; max: number };
      const at = (p: number) => Math.round(1000 * streamLags[Math.min(streamLags.length - 1, Math.floor((p / 100) * streamLags.length))]);
      console.log(`   ${tps * LAG_EVENTS_PER_TX} events/s offered (${Math.round(lagLoad.tps * LAG_EVENTS_PER_TX)} achieved), ${lag.count} sampled events: ` +
        `p50 ${lag.p50} ms, p99 ${lag.p99} ms, max ${lag.max} ms; the stream's side alone (oldest commit not yet acknowledged by Kafka): p50 ${at(50)} ms, p99 ${at(99)} ms`);
      if (rate === targetEvents) lagP99 = lag.p99;
      await streamPast(stream); // a backlog drains before the next rate
    }
    await stream.stop();
    await resumed;

    // 3. Baseline: CREATE SUBSCRIPTION into the sink on the same load, live and as a backlog.
    await query(SOURCE_PORT, 'CREATE PUBLICATION bench_pub FOR TABLE bench_events');
    await query(SINK_PORT, TABLE);
    await query(SINK_PORT, `CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port=${SOURCE_PORT} user=postgres dbname=postgres' PUBLICATION bench_pub`);
    while ((await query(SINK_PORT, "SELECT count(*)::int AS n FROM pg_subscription_rel WHERE srsubstate <> 'r'"))[0].n > 0) await sleep(200);
    const b0 = Date.now();
    const baseLoad = await pgbench(SOURCE_PORT, ['-t', String(TX_PER_CLIENT)]);
    await subscriberCaughtUp();
    const baseLiveSeconds = (Date.now() - b0) / 1000;
    await query(SINK_PORT, 'ALTER SUBSCRIPTION bench_sub DISABLE');
    await sleep(500);
    await pgbench(SOURCE_PORT, ['-t', String(TX_PER_CLIENT)]);
    const e0 = Date.now();
    await query(SINK_PORT, 'ALTER SUBSCRIPTION bench_sub ENABLE');
    await subscriberCaughtUp();
    const baseSeconds = (Date.now() - e0) / 1000;
    const baseRate = events / baseSeconds;
    console.log(`\n3. baseline: CREATE SUBSCRIPTION into another Postgres, same load`);
    console.log(`   live: ${Math.round(baseLoad.tps)} tps generated; ${events} changes applied in ${baseLiveSeconds.toFixed(1)}s = ${Math.round(events / baseLiveSeconds)} changes/s (bounded by the load)`);
    console.log(`   backlog: ${events} changes applied in ${baseSeconds.toFixed(1)}s = ${Math.round(baseRate)} changes/s`);
    console.log(`\nbacklog rate, CDC into Kafka / CREATE SUBSCRIPTION: ${(cdcRate / baseRate).toFixed(2)}x`);
    console.log(`targets: >= 50,000 events/s per shard: ${cdcRate >= 50_000 ? 'met' : 'NOT met'}; lag p99 < 200 ms at half rate: ${lagP99 < 200 ? 'met' : 'NOT met'}`);
  } finally {
    await eventLog.close();
    await source.stop('immediate').catch(() => undefined);
    await sink.stop('immediate').catch(() => undefined);
    await stopRegistry(runDir);
    await stopKafka(runDir);
    fs.rmSync(work, { recursive: true, force: true });
  }
}

interface FailoverCost { resent: number; events: number; rows: number; liveAfterKillS: number; liveAfterPromoteS: number; resumedFrom: string | null }

/** One failover of a running stream: kill -9 of the primary under a writer, promotion of its standby, a stream started there. */
async function failoverRun(eventLog: EventLog, tag: string, keepCopy: boolean): Promise<FailoverCost> {
  const primary = await newInstance(`${tag}-primary`, SOURCE_PORT);
  fs.mkdirSync(path.join(work, `${tag}-standby`), { mode: 0o755 });
  const standby = new PostgresInstance({ name: `${tag}-standby`, dataDir: path.join(work, `${tag}-standby`, 'data'), port: STANDBY_PORT, log });
  const topicPrefix = `bench${tag}`;
  const settings = (inst: PostgresInstance, instanceId: string) => ({
    ...cdcConfigSchema.parse({}), database: 'postgres', shard: '-', instanceId, host: '127.0.0.1', port: inst.port, dataDir: inst.dataDir, topicPrefix,
  });
  let writing = true;
  let writer: Promise<void> | undefined;
  try {
    await query(SOURCE_PORT, `${TABLE}; INSERT INTO bench_events (account, amount, note) SELECT g, g, 'seed' FROM generate_series(1, ${FAILOVER_ROWS}) g`);
    await standby.initReplica({ host: '127.0.0.1', port: SOURCE_PORT });
    await standby.start();
    const first = new CdcStream(settings(primary, `${tag}-primary`), eventLog, log);
    const firstRun = first.run().catch(() => undefined);
    while (first.status().state !== 'STREAMING') await sleep(50);
    // A writer through the failover: one row per statement, on whichever instance takes writes.
    writer = (async () => {
      let port = SOURCE_PORT;
      while (writing) {
        await query(port, "INSERT INTO bench_events (account, amount, note) VALUES (0, 1, 'writer')").catch(async () => {
          port = port === SOURCE_PORT ? STANDBY_PORT : SOURCE_PORT;
          await sleep(20);
        });
      }
    })();
    const sync = keepCopy ? new StandbySlotSync({
      database: 'postgres', shard: '-', instanceId: `${tag}-standby`, host: '127.0.0.1', port: STANDBY_PORT, dataDir: standby.dataDir,
      slot: first.slot, physicalSlot: standby.slotName,
      whileStopped: async (install) => {
        await standby.stop('fast');
        install();
        await standby.start();
      },
    }, log) : undefined;
    while (sync && !sync.status()?.ready) {
      await sync.sync({ host: '127.0.0.1', port: SOURCE_PORT, instanceId: `${tag}-primary` }).catch((err) => log.warn({ err }, 'sync'));
      await sleep(500);
    }
    await sleep(2_000); // the writer's rows stream for a while
    const killedAt = Date.now();
    process.kill(primary.postmasterPid()!, 'SIGKILL');
    await first.stop();
    await firstRun;
    await standby.promote();
    const promotedAt = Date.now();
    const second = new CdcStream(settings(standby, `${tag}-standby`), eventLog, log);
    const secondRun = second.run().catch((err) => console.error('stream on the new primary failed:', err));
    while (second.status().state !== 'STREAMING') await sleep(20);
    const liveAt = Date.now();
    await sleep(2_000);
    writing = false;
    await writer;
    const marker = parseLsn((await query(STANDBY_PORT, "SELECT pg_logical_emit_message(false, 'mg.cdc.heartbeat', '')::text AS l"))[0].l);
    while ((second.status().confirmedLsn ?? 0n) < marker) await sleep(10);
    await second.stop();
    await secondRun;
    const counted = await countTopic(eventLog, `${topicPrefix}.postgres.public.bench_events`);
    return { ...counted, resent: counted.events - counted.rows, liveAfterKillS: (liveAt - killedAt) / 1000, liveAfterPromoteS: (liveAt - promotedAt) / 1000, resumedFrom: second.status().resumedFrom };
  } finally {
    writing = false;
    await writer;
    await primary.stop('immediate').catch(() => undefined);
    await standby.stop('immediate').catch(() => undefined);
  }
}

/** Row events in a topic (truncates and tombstones aside) and how many distinct rows they are about. */
async function countTopic(eventLog: EventLog, topic: string): Promise<{ events: number; rows: number }> {
  const offsets = await eventLog.partitionOffsets(topic);
  const messages = await eventLog.readRanges(offsets.map((o) => ({ topic, partition: o.partition, from: o.low, to: o.high })), 300_000);
  const types = new Map<number, avro.Type>();
  const ids = new Set<string>();
  let events = 0;
  for (const m of messages) {
    if (!m.value) continue;
    const id = m.value.readUInt32BE(1);
    if (!types.has(id)) types.set(id, parseAvro(await eventLog.registry.schemaById(id)));
    const e = types.get(id)!.fromBuffer(m.value.subarray(5)) as { op: string; after: { id: bigint } | null; before: { id: bigint } | null };
    if (e.op === 't') continue;
    events++;
    ids.add(String((e.after ?? e.before)!.id));
  }
  return { events, rows: ids.size };
}

async function failoverMain(): Promise<void> {
  console.log(`CDC failover benchmark in ${work} (${os.cpus().length} cores, load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}), ${FAILOVER_ROWS} rows`);
  await startKafka({ cacheDir: path.join(os.homedir(), '.cache', 'mg'), dataDir: path.join(work, 'kafka'), runDir, port: KAFKA_PORT, controllerPort: KAFKA_PORT + 1, heapMb: 1024, log });
  const registry = await startRegistry({ runDir, logDir: path.join(work, 'logs'), bootstrap: `127.0.0.1:${KAFKA_PORT}`, port: REGISTRY_PORT, topicPrefix: '' });
  const eventLog = new EventLog({ brokers: [`127.0.0.1:${KAFKA_PORT}`], registryUrl: registry.url, clientId: 'bench-cdc', log });
  try {
    const before = await failoverRun(eventLog, 'before', false);
    const after = await failoverRun(eventLog, 'after', true);
    const row = (label: string, f: (c: FailoverCost) => string) => console.log(`${label.padEnd(44)}${f(before).padStart(14)}${f(after).padStart(14)}`);
    console.log(`\n${''.padEnd(44)}${'before'.padStart(14)}${'after'.padStart(14)}`);
    row('row events in the topic', (c) => String(c.events));
    row('distinct rows', (c) => String(c.rows));
    row('events sent twice (re-sent by the failover)', (c) => String(c.resent));
    row('seconds from kill -9 to the stream live', (c) => c.liveAfterKillS.toFixed(2));
    row('seconds from promotion to the stream live', (c) => c.liveAfterPromoteS.toFixed(2));
    console.log(`how it resumed: before "${before.resumedFrom}", after "${after.resumedFrom}"`);
    console.log(`ratios after/before: events re-sent ${(after.resent / Math.max(1, before.resent)).toFixed(4)}x, seconds to live (from promotion) ${(after.liveAfterPromoteS / before.liveAfterPromoteS).toFixed(2)}x`);
  } finally {
    await eventLog.close();
    await stopRegistry(runDir);
    await stopKafka(runDir);
    fs.rmSync(work, { recursive: true, force: true });
  }
}

(process.argv.includes('--failover') ? failoverMain() : main()).then(() => process.exit(0), (err) => {
  console.error(err);
  process.exit(1);
});
