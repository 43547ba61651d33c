import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { Kafka, logLevel } from 'kafkajs';
import { createLogger } from '../../common/log.ts';
import { startKafka, stopKafka } from '../../compose/infra/kafka.ts';
import { isAlive, pidFilePath } from '../../compose/supervise.ts';
import { freePorts } from '../support/wait.ts';

// The `mg` default (compose/spec.ts), so the jars are fetched once per machine, not per test run.
const cacheDir = join(homedir(), '.cache', 'mg');
const dir = mkdtempSync(join(tmpdir(), 'mg-kafka-'));
const runDir = join(dir, 'run');
const log = createLogger('kafka-launcher-test');
log.level = process.env.MG_LOG_LEVEL ?? 'warn';

after(async () => {
  await stopKafka(runDir); // no-op when the test got that far
  rmSync(dir, { recursive: true, force: true });
});

test('starts a KRaft broker, survives kill -9, stops cleanly', { timeout: 120_000 }, async () => {
  const [port, controllerPort] = await freePorts(2);
  const opts = { cacheDir, dataDir: join(dir, 'data'), runDir, port: port!, controllerPort: controllerPort!, heapMb: 256, log };

  const first = await startKafka(opts);
  assert.equal(first.alreadyRunning, false);
  const again = await startKafka(opts);
  assert.deepEqual(again, { ...first, alreadyRunning: true });

  const kafka = new Kafka({ clientId: 'kafka-launcher-test', brokers: [first.bootstrap], logLevel: logLevel.NOTHING });
  const admin = kafka.admin();
  await admin.connect();
  await admin.createTopics({ topics: [{ topic: 'greetings', numPartitions: 1 }], waitForLeaders: true });
  const producer = kafka.producer();
  await producer.connect();
  await producer.send({ topic: 'greetings', acks: -1, messages: [{ key: 'k', value: 'hello' }] });
  await producer.disconnect();

  const consumer = kafka.consumer({ groupId: 'kafka-launcher-test' });
  await consumer.connect();
  await consumer.subscribe({ topic: 'greetings', fromBeginning: true });
  const received = await new Promise<string>((resolve) => {
    void consumer.run({ eachMessage: async ({ message }) => resolve(message.value!.toString()) });
  });
  await consumer.disconnect();
  await admin.disconnect();
  assert.equal(received, 'hello');

  process.kill(first.pid, 'SIGKILL');
  while (isAlive(first.pid)) await new Promise((r) => setTimeout(r, 20));
  assert.ok(existsSync(pidFilePath(runDir, 'kafka')), 'kill -9 leaves a stale pid file behind');

  const second = await startKafka(opts);
  assert.equal(second.alreadyRunning, false);
  assert.notEqual(second.pid, first.pid);
  // The acknowledged message survived the crash.
  const admin2 = kafka.admin();
  await admin2.connect();
  const offsets = await admin2.fetchTopicOffsets('greetings');
  await admin2.disconnect();
  assert.equal(offsets[0]!.high, '1');

  // A second broker on a taken port fails fast instead of mistaking the first one for itself.
  const other = { ...opts, dataDir: join(dir, 'other-data'), runDir: join(dir, 'other-run') };
  await assert.rejects(startKafka(other), /exited during startup[\s\S]*Address already in use/);
  assert.ok(!existsSync(pidFilePath(other.runDir, 'kafka')));

  assert.equal(await stopKafka(runDir), 'stopped');
  assert.ok(!existsSync(pidFilePath(runDir, 'kafka')));
  assert.ok(!isAlive(second.pid));
});
