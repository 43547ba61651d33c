/**
 * The lag consumer of bench/cdc.ts, in its own process so that it neither
 * slows the stream under test nor is slowed by it. Protocol on stdio: prints
 * "ready" once it reads the topic's end; on "stop" prints one JSON line
 * {count, p50, p99, max} (milliseconds) and exits.
 *   node --import tsx bench/cdc-lag-consumer.ts <bootstrap> <registry-url> <topic>
 */
import readline from 'node:readline';
import { SchemaRegistry } from '@kafkajs/confluent-schema-registry';
import avro from 'avsc';
import { Kafka, logLevel } from 'kafkajs';

const [bootstrap, registryUrl, topic] = process.argv.slice(2);

/** Only source.ts_ms is needed: longs as plain numbers are exact for milliseconds. */
const longAsNumber = avro.types.LongType.__with({
  fromBuffer: (b: Buffer) => Number(b.readBigInt64LE()),
  toBuffer: (n: number) => {
    const b = Buffer.alloc(8);
    b.writeBigInt64LE(BigInt(n));
    return b;
  },
  fromJSON: Number,
  toJSON: (n: number) => n,
  isValid: (n: unknown) => typeof n === 'number',
  compare: (a: number, b: number) => a - b,
});

const registry = new SchemaRegistry({ host: registryUrl }, { AVRO: { typeHook: (s: any) => (s === 'long' || s?.type === 'long' ? longAsNumber : undefined) } as any });
const consumer = new Kafka({ clientId: 'bench-lag', brokers: [bootstrap], logLevel: logLevel.NOTHING })
  .consumer({ groupId: `bench-lag-${process.pid}`, maxWaitTimeInMs: 10, minBytes: 1 });
const lags: number[] = [];
let n = 0;
await consumer.connect();
await consumer.subscribe({ topic, fromBeginning: false });
consumer.on(consumer.events.GROUP_JOIN, () => setTimeout(() => console.log('ready'), 1_000));
await consumer.run({
  eachBatch: async ({ batch }) => {
    const now = Date.now();
    for (const m of batch.messages) {
      // Every 5th event is decoded; all of the batch reached the consumer at `now`.
      if (!m.value || n++ % 5 !== 0) continue;
      const v: any = await registry.decode(m.value);
      lags.push(now - v.source.ts_ms);
    }
  },
});
for await (const line of readline.createInterface({ input: process.stdin })) {
  if (line.trim() !== 'stop') continue;
  await consumer.disconnect();
  lags.sort((a, b) => a - b);
  const at = (p: number) => lags[Math.min(lags.length - 1, Math.floor((p / 100) * lags.length))];
  console.log(JSON.stringify({ count: lags.length, p50: at(50), p99: at(99), max: lags.at(-1) }));
  process.exit(0);
}
