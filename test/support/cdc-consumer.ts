/**
 * A change-event consumer written the way a user would write one: plain
 * kafkajs and @kafkajs/confluent-schema-registry (with avsc, which that
 * library is built on, for exact 64-bit longs). Nothing from our code.
 */
import { SchemaRegistry, SchemaType } from '@kafkajs/confluent-schema-registry';
import avro from 'avsc';
import { Kafka, logLevel, type Consumer } from 'kafkajs';

/** Avro longs as BigInt, so keys and LSNs above 2^53 stay exact. */
const BigLong = avro.types.LongType.__with({
  fromBuffer: (buf: Buffer) => buf.readBigInt64LE(),
  toBuffer: (n: bigint) => {
    const buf = Buffer.alloc(8);
    buf.writeBigInt64LE(n);
    return buf;
  },
  fromJSON: (v: unknown) => BigInt(v as string),
  toJSON: (n: bigint) => n.toString(),
  isValid: (n: unknown) => typeof n === 'bigint',
  compare: (a: bigint, b: bigint) => (a === b ? 0 : a < b ? -1 : 1),
});

export interface ChangeMessage {
  topic: string;
  partition: number;
  offset: string;
  key: any;
  /** null for a tombstone. */
  value: any;
}

export class ChangeConsumer {
  readonly messages: ChangeMessage[] = [];
  readonly registry: SchemaRegistry;
  private readonly kafka: Kafka;
  private consumer: Consumer | undefined;
  private readonly onMessage: (m: ChangeMessage) => Promise<void> | void;

  constructor(bootstrap: string, registryUrl: string, onMessage: (m: ChangeMessage) => Promise<void> | void = () => undefined) {
    this.kafka = new Kafka({ clientId: 'cdc-user', brokers: [bootstrap], logLevel: logLevel.NOTHING });
    this.registry = new SchemaRegistry({ host: registryUrl }, {
      // A hook, not `registry: { long }`: avsc adds every named type to the registry object it is given, and this one would be shared.
      [SchemaType.AVRO]: { typeHook: (s: any) => (s === 'long' || s?.type === 'long' ? BigLong : undefined) } as any,
    });
    this.onMessage = onMessage;
  }

  /** Reads the topics from their beginning; waits until each exists. */
  async follow(topics: string[], timeoutMs = 60_000): Promise<void> {
    const admin = this.kafka.admin();
    await admin.connect();
    const deadline = Date.now() + timeoutMs;
    try {
      for (;;) {
        const existing = new Set(await admin.listTopics());
        if (topics.every((t) => existing.has(t))) break;
        if (Date.now() > deadline) throw new Error(`topics never appeared: ${topics.filter((t) => !existing.has(t)).join(', ')}`);
        await new Promise((r) => setTimeout(r, 200));
      }
    } finally {
      await admin.disconnect();
    }
    this.consumer = this.kafka.consumer({ groupId: `cdc-user-${Math.random().toString(36).slice(2)}`, maxWaitTimeInMs: 50 });
    await this.consumer.connect();
    await this.consumer.subscribe({ topics, fromBeginning: true });
    await this.consumer.run({
      eachMessage: async ({ topic, partition, message }) => {
        const m: ChangeMessage = {
          topic, partition, offset: message.offset,
          key: message.key ? plain(await this.registry.decode(message.key)) : null,
          value: message.value ? plain(await this.registry.decode(message.value)) : null,
        };
        this.messages.push(m);
        await this.onMessage(m);
      },
    });
  }

  async stop(): Promise<void> {
    await this.consumer?.disconnect();
  }
}

/** Decoded Avro records are class instances; plain objects compare and print simply. */
function plain(v: any): any {
  if (Array.isArray(v)) return v.map(plain);
  if (v && typeof v === 'object' && !Buffer.isBuffer(v)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
  return v;
}

/** Rendering decimals for assertions (compared with literal expected values) is the contract's own helper. */
export { decimalText } from '../../schemas/cdc.ts';
