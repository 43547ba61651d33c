/** The event log client against the run's real broker and registry. */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Kafka, logLevel } from 'kafkajs';
import type { EventLog } from '../../common/eventlog.ts';
import { AvroCodec, SchemaRegistryClient, valueSubject, type HealthEvent } from '../../schemas/index.ts';
import { bootstrap, registryUrl, testEventLog, uniquePrefix } from '../support/env.ts';

const logs: EventLog[] = [];
after(async () => Promise.all(logs.map((l) => l.close())));
async function eventLog(prefix: string): Promise<EventLog> {
  const l = await testEventLog(prefix);
  logs.push(l);
  return l;
}

const heartbeat = (sequence: bigint, instanceId = 'i1'): HealthEvent => ({
  instanceId, database: 'db', shard: '-', cell: 'zone1', ts: new Date(), sequence, reachable: true, role: 'PRIMARY',
  currentLsn: 0x16_B374_D848n + sequence, flushLsn: null, replayLsn: null, replayLagBytes: null, replayLagSeconds: null,
  upstream: null, connections: 1, maxConnections: 100, postgresPid: 1, agentVersion: 'test', error: null, walReceiverStatus: null, cdcSlotLagBytes: null, cdcSlotLagSeconds: null,
});

test('caughtUp resolves once everything published before the subscription has been handled', async () => {
  const prefix = uniquePrefix('caughtup');
  const log = await eventLog(prefix);
  const publish = log.publisher('health');
  await publish(Array.from({ length: 120 }, (_, i) => ({ key: `i${i % 3}`, value: heartbeat(BigInt(i), `i${i % 3}`) })));
  const seen: bigint[] = [];
  const sub = await log.subscribe('health', (h) => void seen.push(h.sequence));
  await sub.caughtUp;
  assert.equal(seen.length, 120);
  assert.deepEqual([...seen].sort((a, b) => Number(a - b)), Array.from({ length: 120 }, (_, i) => BigInt(i)));
  // Later events still arrive after caught-up.
  await publish([{ key: 'i0', value: heartbeat(999n) }]);
  for (let i = 0; i < 100 && !seen.includes(999n); i++) await new Promise((r) => setTimeout(r, 50));
  assert.ok(seen.includes(999n));
  await sub.stop();

  // An empty topic is caught up at once.
  const empty = await (await eventLog(uniquePrefix('empty'))).subscribe('topology', () => undefined);
  await empty.caughtUp;
  await empty.stop();
});

test('a corrupt message goes to the dead-letter topic with its origin, and the consumer goes on', async () => {
  const prefix = uniquePrefix('dlq');
  const log = await eventLog(prefix);
  await log.publisher('health')([{ key: 'i1', value: heartbeat(1n) }]);
  await log.sendRaw(log.topic('health'), [
    { key: 'i1', value: Buffer.from('definitely not avro') },
    { key: 'i1', value: Buffer.from([0, 0, 0, 0x7f, 0xff, 1, 2, 3]) }, // wire format, but an unknown schema id
  ]);
  await log.publisher('health')([{ key: 'i1', value: heartbeat(2n) }]);

  const seen: bigint[] = [];
  const sub = await log.subscribe('health', (h) => void seen.push(h.sequence));
  await sub.caughtUp;
  await sub.stop();
  assert.deepEqual(seen, [1n, 2n]);

  // Read the dead letters as an operator would, with a plain Kafka client.
  const kafka = new Kafka({ brokers: [bootstrap()], logLevel: logLevel.NOTHING });
  const consumer = kafka.consumer({ groupId: `${prefix}inspect` });
  const letters: Array<{ value: string; headers: Record<string, string> }> = [];
  await consumer.connect();
  await consumer.subscribe({ topic: log.topic('deadLetter'), fromBeginning: true });
  await consumer.run({
    eachMessage: async ({ message }) => {
      const headers = Object.fromEntries(Object.entries(message.headers ?? {}).map(([k, v]) => [k, String(v)]));
      letters.push({ value: message.value!.toString('latin1'), headers });
    },
  });
  for (let i = 0; i < 200 && letters.length < 2; i++) await new Promise((r) => setTimeout(r, 50));
  await consumer.disconnect();
  assert.equal(letters.length, 2);
  assert.equal(letters[0].value, 'definitely not avro');
  assert.equal(letters[0].headers['mg.source.topic'], log.topic('health'));
  assert.equal(letters[0].headers['mg.source.offset'], '1');
  assert.match(letters[0].headers['mg.error'], /magic byte/);
  assert.match(letters[1].headers['mg.error'], /unknown schema id 32767/);
});

test('an event written with the old health schema is read by a consumer of the current one', async () => {
  const prefix = uniquePrefix('evolve');
  const log = await eventLog(prefix);
  const fixtures = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'fixtures');
  const v1 = new AvroCodec<Omit<HealthEvent, 'walReceiverStatus'>>(
    new SchemaRegistryClient(registryUrl()), valueSubject(log.topic('health')), fs.readFileSync(path.join(fixtures, 'health-v1.avsc'), 'utf8'),
  );
  const { walReceiverStatus: _, ...old } = heartbeat(5n);
  await log.sendRaw(log.topic('health'), [{ key: 'i1', value: await v1.encode(old) }]);
  await log.publisher('health')([{ key: 'i1', value: { ...heartbeat(6n), walReceiverStatus: 'streaming' } }]);

  const seen: HealthEvent[] = [];
  const sub = await log.subscribe('health', (h) => void seen.push(h));
  await sub.caughtUp;
  await sub.stop();
  assert.deepEqual(seen.map((h) => [h.sequence, h.walReceiverStatus]), [[5n, null], [6n, 'streaming']]);
  assert.equal(seen[0].currentLsn, old.currentLsn);
});

test('a tail whose handler outlasts the group session keeps its place: no error, nothing skipped, nothing handed over twice', async () => {
  const log = await eventLog(uniquePrefix('slowtail'));
  const topic = log.topic('health');
  const send = (from: number) => log.sendRaw(topic, Array.from({ length: 5 }, (_, i) => ({ key: 'k', value: Buffer.from(String(from + i)) })));
  const seen: number[] = [];
  let batches = 0;
  let ended: Error | undefined | 'no' = 'no';
  const until = async (what: () => boolean) => {
    for (let i = 0; i < 600 && !what(); i++) await new Promise((r) => setTimeout(r, 100));
    assert.ok(what(), `handed over: ${seen.join(', ')}; the tail ended: ${ended}`);
  };
  await send(0);
  // The group's session timeout: 6 s, the broker's minimum (the default, 10 s, would only make the waits below longer).
  const SESSION_MS = 6_000;
  const tail = await log.tail(topic, new Map(), async (messages) => {
    batches++;
    if (batches === 1) await new Promise((r) => setTimeout(r, SESSION_MS + 2_000)); // awaiting: the member must heartbeat meanwhile
    if (batches === 2) for (const end = Date.now() + SESSION_MS + 4_000; Date.now() < end;); // the event loop blocked: Kafka drops the member
    seen.push(...messages.map((m) => Number(m.value!.toString())));
  }, { sessionTimeoutMs: SESSION_MS });
  void tail.ended.then((err) => (ended = err));
  await until(() => batches === 1);
  await send(5);
  await until(() => seen.length >= 10);
  await send(10);
  await until(() => seen.length >= 15);
  await new Promise((r) => setTimeout(r, 500));
  await tail.stop();
  assert.equal(ended, undefined, 'the tail ended only when stopped');
  assert.deepEqual(seen, Array.from({ length: 15 }, (_, i) => i));
});
