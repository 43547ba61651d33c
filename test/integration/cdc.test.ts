/**
 * Change data capture end to end on a real cluster: what a user's own
 * consumer (plain kafkajs + confluent-schema-registry) decodes, every type,
 * TOAST, schema evolution, transaction events, commands, `mg cdc status`,
 * and failover to a promoted replica.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { Kafka, logLevel } from 'kafkajs';
import { INTERNAL_SCHEMAS, type AgentAction } from '../../schemas/index.ts';
import { ChangeConsumer, decimalText, type ChangeMessage } from '../support/cdc-consumer.ts';
import { CdcWatch } from '../support/cdc-watch.ts';
import type { PlannedInstance } from '../../compose/spec.ts';
import { testCluster, until } from '../support/cluster.ts';
import { bootstrap, registryUrl } from '../support/env.ts';

// The lag-alert test kills the primary's agent on purpose: the orchestrators must not fail over meanwhile.
// failoverSlots off: the standby keeps no copy of the slot, so the failover test checks the fallback (a re-snapshot);
// cdc-failover.test.ts checks the takeover from a copy.
const cluster = testCluster('cdc', 3, { settings: { 'orchestrator.agentDownMs': 120_000 }, spec: {
  databases: [{ name: 'postgres', shards: 1, instancesPerShard: 2, cdc: { enabled: true, transactionEvents: true, heartbeatMs: 500, maxSlotLagBytes: 4_000_000, failoverSlots: false } }],
} });
const { dataDir, prefix, flags, mg } = cluster;
// MultiOrch elects the primary during `up`.
let primary: PlannedInstance, replica: PlannedInstance;
const topic = (table: string) => `${prefix}mg.postgres.public.${table}`;

let watch: CdcWatch;
let consumer: ChangeConsumer;

async function sql(port: number, text: string, params: unknown[] = []): Promise<any[]> {
  const client = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', database: 'postgres' });
  await client.connect();
  try {
    return (await client.query(text, params)).rows;
  } finally {
    await client.end();
  }
}

const command = (instanceId: string, action: AgentAction, args: Record<string, string> = {}) => watch.command(instanceId, action, args);

const latestStatus = () => watch.statuses.at(-1);
const eventsOf = (table: string, from = 0) => consumer.messages.slice(from).filter((m) => m.topic === topic(table));

before(async () => {
  watch = await CdcWatch.open(prefix);
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  ({ primary, replicas: [replica] } = await cluster.roles());
  consumer = new ChangeConsumer(bootstrap(), registryUrl());
});

after(async () => {
  await consumer?.stop();
  await watch?.close();
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

test('the primary streams; status reaches Kafka and mg cdc status shows it', cluster.explained(async () => {
  const st = await until('a STREAMING status', 60_000, () => {
    const s = latestStatus();
    return s?.state === 'STREAMING' && s.confirmedLsn !== null ? s : undefined;
  });
  assert.equal(st.instanceId, primary.instanceId);
  assert.equal(st.epoch, 1n);
  // Nothing is written, yet heartbeats through the WAL move the confirmed position on.
  await until('the idle slot moving on', 15_000, () => (latestStatus()?.confirmedLsn ?? 0n) > st.confirmedLsn!);
  const out = await mg('cdc', 'status', '--data-dir', dataDir);
  assert.equal(out.code, 0, out.stderr);
  assert.match(out.stdout, /postgres\s+-\s+\S*postgres-0-zone1-0\s+STREAMING/);
  const reply = await command(primary.instanceId, 'CDC_STATUS');
  assert.equal(reply.status, 'SUCCEEDED');
  assert.equal(JSON.parse(reply.message).state, 'STREAMING');
  // The replica is not the primary: it refuses to stream.
  const refused = await command(replica.instanceId, 'CDC_START');
  assert.equal(refused.status, 'FAILED');
  assert.match(refused.message, /not the primary/);
}));

test('every type arrives exactly, decoded by a plain kafkajs + schema-registry consumer', cluster.explained(async () => {
  await sql(primary.port, `
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'very happy');
    CREATE TABLE every_type (
      id bigint PRIMARY KEY, i2 int2, i4 int4, f4 float4, f8 float8, price numeric(20,4), amount numeric,
      ok bool, data bytea, u uuid, j json, jb jsonb, ts timestamp, tstz timestamptz, d date, t time,
      tags text[], nums int8[], m mood, vc varchar(10), ch char(3), iv interval, "Odd Name" text)`);
  await sql(primary.port, `INSERT INTO every_type VALUES
    (9223372036854775807, -32768, 2147483647, 1.5, -2.25e-300, 12345678901234.5678, -0.000123456789012345678901234567890,
     true, '\\xdeadbeef00', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2]}', '{"b": null}',
     '2024-02-29 23:59:59.999999', '2024-01-02 03:04:05.123456+02', '1999-12-31', '13:14:15.5',
     '{a,"b, c",NULL}', '{9007199254740993,-1}', 'very happy', 'short', 'ab', '1 day 02:00:00', 'x'),
    (-9223372036854775808, NULL, NULL, NULL, 'NaN', NULL, 'NaN', NULL, NULL, NULL, NULL, NULL, 'infinity', NULL, '0044-03-15 BC', '24:00:00',
     '{}', NULL, NULL, NULL, NULL, NULL, NULL)`);
  await consumer.follow([topic('every_type'), `${prefix}mg.postgres.transaction`]);
  const [c1, c2] = await until('two create events', 30_000, () => {
    const e = eventsOf('every_type').filter((m) => m.value?.op === 'c');
    return e.length >= 2 ? e : undefined;
  });
  assert.deepEqual(c1.key, { id: 9223372036854775807n });
  const a = c1.value.after;
  assert.equal(a.id, 9223372036854775807n);
  assert.equal(a.i2, -32768);
  assert.equal(a.i4, 2147483647);
  assert.equal(a.f4, 1.5);
  assert.equal(a.f8, -2.25e-300);
  assert.equal(decimalText(a.price, 4), '12345678901234.5678');
  assert.equal(decimalText(a.amount.value, a.amount.scale), '-0.000123456789012345678901234567890');
  assert.equal(a.ok, true);
  assert.equal(a.data.toString('hex'), 'deadbeef00');
  assert.equal(a.u, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11');
  assert.deepEqual(JSON.parse(a.j), { a: [1, 2] });
  assert.deepEqual(JSON.parse(a.jb), { b: null });
  assert.equal(a.ts, BigInt(Date.UTC(2024, 1, 29, 23, 59, 59)) * 1000n + 999_999n);
  assert.equal(a.tstz, '2024-01-02T01:04:05.123456Z');
  assert.equal(a.d, Date.UTC(1999, 11, 31) / 86_400_000);
  assert.equal(a.t, ((13n * 60n + 14n) * 60n + 15n) * 1_000_000n + 500_000n);
  assert.deepEqual(a.tags, ['a', 'b, c', null]);
  assert.deepEqual(a.nums, [9007199254740993n, -1n]);
  assert.equal(a.m, 'very happy');
  assert.equal(a.vc, 'short');
  assert.equal(a.ch, 'ab ');
  assert.equal(a.iv, '1 day 02:00:00');
  assert.equal(a.Odd_Name, 'x');
  assert.equal(c1.value.before, null);
  const s = c1.value.source;
  assert.equal(s.connector, 'multigres');
  assert.equal(s.db, 'postgres');
  assert.equal(s.shard, '-');
  assert.equal(s.schema, 'public');
  assert.equal(s.table, 'every_type');
  assert.equal(s.snapshot, 'false');
  assert.equal(s.instance, primary.instanceId);
  assert.equal(typeof s.txId, 'bigint');
  assert.ok(s.lsn > 0n && s.commit_lsn >= s.lsn);
  assert.equal(c1.value.transaction.total_order, 1n);

  const b = c2.value.after;
  assert.equal(b.id, -9223372036854775808n);
  assert.ok(Number.isNaN(b.f8));
  assert.equal(b.amount, null, 'NaN has no decimal form');
  assert.equal(b.ts, 9223372036854775807n, 'infinity is the largest long');
  assert.equal(b.d, Date.UTC(-43, 2, 15) / 86_400_000, '44 BC is astronomical year -43');
  assert.equal(b.t, 86_400_000_000n);
  assert.deepEqual(b.tags, []);
  assert.equal(b.i2, null);
  assert.equal(c2.value.source.position, 1n, 'second event of the same transaction');
  assert.equal(c2.value.source.commit_lsn, s.commit_lsn);

  // The transaction topic has BEGIN and END (with counts) around it.
  const txId = c1.value.transaction.id;
  const tx = await until('END of the transaction', 10_000, () => {
    const m = consumer.messages.filter((x) => x.topic.endsWith('.transaction') && x.value?.id === txId);
    return m.length === 2 ? m : undefined;
  });
  assert.deepEqual(tx.map((m) => m.value.status), ['BEGIN', 'END']);
  assert.equal(tx[1].value.event_count, 2n);
  assert.deepEqual(tx[1].value.data_collections, [{ data_collection: topic('every_type'), event_count: 2n }]);

  // Update and delete: op u, then op d followed by a tombstone with the same key.
  const from = consumer.messages.length;
  await sql(primary.port, 'UPDATE every_type SET i2 = 1 WHERE id = -9223372036854775808');
  await sql(primary.port, 'DELETE FROM every_type WHERE id = -9223372036854775808');
  const [u, d, tomb] = await until('update, delete and tombstone', 20_000, () => {
    const e = eventsOf('every_type', from);
    return e.length >= 3 ? e : undefined;
  });
  assert.equal(u.value.op, 'u');
  assert.equal(u.value.after.i2, 1);
  assert.equal(u.value.before, null, 'REPLICA IDENTITY DEFAULT sends no old row');
  assert.equal(d.value.op, 'd');
  assert.equal(d.value.before.id, -9223372036854775808n);
  assert.equal(d.value.after, null);
  assert.deepEqual(tomb.key, { id: -9223372036854775808n });
  assert.equal(tomb.value, null);
  assert.ok(d.value.source.commit_lsn > u.value.source.commit_lsn);
}));

test('unchanged TOASTed values are marked unavailable, unless REPLICA IDENTITY FULL', cluster.explained(async () => {
  const big = randomBytes(40_000).toString('base64'); // incompressible: stored out of line
  await sql(primary.port, 'CREATE TABLE toasty (id int PRIMARY KEY, n int, big text, blob bytea)');
  await sql(primary.port, 'INSERT INTO toasty VALUES (1, 0, $1, $2)', [big, randomBytes(40_000)]);
  await consumer.stop();
  consumer = new ChangeConsumer(bootstrap(), registryUrl());
  await consumer.follow([topic('toasty')]);
  await sql(primary.port, 'UPDATE toasty SET n = 1');
  const u = await until('update of toasty', 20_000, () => eventsOf('toasty').find((m) => m.value?.op === 'u'));
  assert.equal(u.value.after.big, '__debezium_unavailable_value');
  assert.equal(u.value.after.blob.toString(), '__debezium_unavailable_value');
  assert.deepEqual(u.value.unavailable, ['big', 'blob']);

  await sql(primary.port, 'ALTER TABLE toasty REPLICA IDENTITY FULL');
  await sql(primary.port, 'UPDATE toasty SET n = 2');
  const full = await until('update under FULL', 20_000, () => eventsOf('toasty').find((m) => m.value?.op === 'u' && m.value.after.n === 2));
  assert.equal(full.value.after.big, big);
  assert.deepEqual(full.value.unavailable, []);
  assert.equal(full.value.before.n, 1, 'FULL sends the old row');
  assert.deepEqual(full.key, { id: 1 }, 'the key stays the primary key');
}));

test('ALTER TABLE registers a new BACKWARD compatible schema version; old and new events decode', cluster.explained(async () => {
  await sql(primary.port, 'CREATE TABLE evolving (id int PRIMARY KEY, a int4, gone text)');
  await sql(primary.port, "INSERT INTO evolving VALUES (1, 1, 'x')");
  await sql(primary.port, 'ALTER TABLE evolving ADD COLUMN added text, DROP COLUMN gone');
  await sql(primary.port, "INSERT INTO evolving VALUES (2, 2, 'new')");
  await sql(primary.port, 'ALTER TABLE evolving ALTER COLUMN a TYPE int8');
  await sql(primary.port, "INSERT INTO evolving VALUES (3, 9007199254740993, 'wide')");
  await consumer.stop();
  consumer = new ChangeConsumer(bootstrap(), registryUrl());
  await consumer.follow([topic('evolving')]);
  const ev = await until('three inserts', 20_000, () => {
    const e = eventsOf('evolving');
    return e.length >= 3 ? e : undefined;
  });
  assert.deepEqual(ev[0].value.after, { id: 1, a: 1, gone: 'x' });
  assert.deepEqual(ev[1].value.after, { id: 2, a: 2, added: 'new' });
  assert.deepEqual(ev[2].value.after, { id: 3, a: 9007199254740993n, added: 'wide' });
  const versions = await (await fetch(`${registryUrl()}/subjects/${topic('evolving')}-value/versions`)).json();
  assert.deepEqual(versions, [1, 2, 3]);
  const config = await (await fetch(`${registryUrl()}/config`)).json();
  assert.match(config.compatibilityLevel, /BACKWARD/);
}));

test('CDC_START with resnapshot reads every table again in a new epoch: a truncate, then the rows', cluster.explained(async () => {
  const from = consumer.messages.length;
  const r = await command(primary.instanceId, 'CDC_START', { resnapshot: 'true' });
  assert.equal(r.status, 'SUCCEEDED', r.message);
  const st = await until('epoch 2 streaming', 60_000, () => {
    const s = latestStatus();
    return s?.epoch === 2n && s.state === 'STREAMING' ? s : undefined;
  });
  assert.ok(st.snapshot && st.snapshot.tablesDone === st.snapshot.tablesTotal && st.snapshot.tablesTotal >= 3);
  const snap = await until('snapshot of evolving', 20_000, () => {
    const e = eventsOf('evolving', from);
    return e.length >= 4 ? e : undefined;
  });
  assert.equal(snap[0].value.op, 't');
  assert.equal(snap[0].value.source.snapshot, 'true');
  assert.deepEqual(snap.slice(1).map((m) => [m.value.op, m.value.after.id, m.value.source.epoch]), [['r', 1, 2n], ['r', 2, 2n], ['r', 3, 2n]]);
}));

test('a stopped stream whose slot holds WAL back raises the lag alert; streaming again clears it', cluster.explained(async () => {
  const stop = await command(primary.instanceId, 'CDC_STOP');
  assert.equal(stop.status, 'SUCCEEDED', stop.message);
  await sql(primary.port, `CREATE TABLE filler (t text);
    INSERT INTO filler SELECT (SELECT string_agg(md5(random()::text || i || g), '') FROM generate_series(1, 100) i) FROM generate_series(1, 4000) g`);
  const alerted = await until('the lag alert', 30_000, () => {
    const st = latestStatus();
    return st?.state === 'STOPPED' && st.alert ? st : undefined;
  });
  assert.match(alerted.alert!, /more than maxSlotLagBytes 4000000/);
  assert.ok(alerted.slotLagBytes! > 4_000_000n);
  // The stop survives an agent crash: the new agent keeps the stream stopped, and still watches the slot.
  process.kill(Number(fs.readFileSync(path.join(dataDir, 'run', `agent-${primary.instanceId}.pid`), 'utf8').split(' ')[0]), 'SIGKILL');
  const restarted = new Date();
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  assert.equal(JSON.parse((await command(primary.instanceId, 'CDC_STATUS')).message).state, 'STOPPED');
  await until('the alert from the new agent', 30_000, () => {
    const st = latestStatus();
    return st && st.ts > restarted && st.state === 'STOPPED' && st.alert ? st : undefined;
  });
  const start = await command(primary.instanceId, 'CDC_START');
  assert.equal(start.status, 'SUCCEEDED', start.message);
  await until('the alert cleared', 60_000, () => {
    const st = latestStatus();
    return st?.state === 'STREAMING' && st.alert === null && st.slotLagBytes !== null && st.slotLagBytes < 4_000_000n ? st : undefined;
  });
}));

test('failover without a copy of the slot: the replica made primary streams on with a new slot and a consistent snapshot, and says why; applying the topic gives its exact contents', cluster.explained(async () => {
  await sql(primary.port, 'CREATE TABLE accounts (id int PRIMARY KEY, balance int)');
  await sql(primary.port, 'INSERT INTO accounts SELECT g, g * 10 FROM generate_series(1, 50) g');
  await until('replica caught up', 20_000, async () => (await sql(replica.port, 'SELECT count(*)::int AS n FROM accounts'))[0]?.n === 50);
  await sql(primary.port, 'UPDATE accounts SET balance = balance + 1 WHERE id <= 10');

  // The orchestrator hands the shard over to the replica (a new term); the stream follows the topology.
  const switched = await mg('shard', 'switchover', 'postgres/-', '--to', replica.instanceId, '--data-dir', dataDir);
  assert.equal(switched.code, 0, switched.stderr + switched.stdout);
  const took = await until('the new primary streaming', 90_000, () => {
    const s = latestStatus();
    return s?.instanceId === replica.instanceId && s.state === 'STREAMING' ? s : undefined;
  });
  assert.equal(took.resumedFrom, `re-snapshot: this instance has no copy of slot mg_cdc_postgres`);
  const out = await mg('cdc', 'status', '--data-dir', dataDir);
  assert.match(out.stdout, /re-snapshot: this instance has no copy of slot mg_cdc_postgres/);
  const metrics = await (await fetch(`http://127.0.0.1:${replica.metricsPort}/metrics`)).text();
  assert.match(metrics, /mg_cdc_takeovers_total\{database="postgres",shard="-",how="resnapshot"\} 1/);
  await sql(replica.port, 'DELETE FROM accounts WHERE id > 45');
  await sql(replica.port, 'INSERT INTO accounts VALUES (100, 1000)');
  await sql(replica.port, 'UPDATE accounts SET balance = -1 WHERE id = 1');

  // A consumer applies the whole topic: truncates, upserts and deletes, in order.
  const reader = new ChangeConsumer(bootstrap(), registryUrl());
  const table = new Map<number, number>();
  const apply = (m: ChangeMessage) => {
    if (!m.value) return;
    const v = m.value;
    if (v.op === 't') table.clear();
    else if (v.op === 'd') table.delete(v.before.id);
    else table.set(v.after.id, v.after.balance);
  };
  await reader.follow([topic('accounts')]);
  try {
    const expected = await sql(replica.port, 'SELECT id, balance FROM accounts ORDER BY id');
    await until('the applied topic equal to the new primary', 30_000, () => {
      table.clear();
      reader.messages.forEach(apply);
      const got = [...table].sort((x, y) => x[0] - y[0]).map(([id, balance]) => ({ id, balance }));
      return JSON.stringify(got) === JSON.stringify(expected);
    });
    const last = reader.messages.filter((m) => m.value).at(-1)!;
    assert.equal(last.value.source.instance, replica.instanceId);
    assert.ok(last.value.source.epoch > 2n, 'a new epoch after failover');
  } finally {
    await reader.stop();
  }
  // The election wrote the consensus rule on the new primary, and its snapshot read every published table: user tables only reach Kafka.
  const admin = new Kafka({ brokers: [bootstrap()], logLevel: logLevel.NOTHING }).admin();
  await admin.connect();
  try {
    const streamed = (await admin.listTopics()).filter((t) => t.startsWith(`${prefix}mg.postgres.`)).map((t) => t.slice(`${prefix}mg.postgres.`.length).split('.')[0]);
    assert.ok(streamed.includes('public'));
    assert.deepEqual(streamed.filter((schema) => INTERNAL_SCHEMAS.has(schema)), []);
  } finally {
    await admin.disconnect();
  }
}));
