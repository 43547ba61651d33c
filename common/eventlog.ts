/**
 * The one module that owns the Kafka client (kafkajs is unmaintained, so it
 * stays behind this small surface). Typed publish and subscribe over the topic
 * catalog, a caught-up signal, and dead-lettering of undecodable messages.
 */
import { randomUUID } from 'node:crypto';
import { createRequire } from 'node:module';
import './kafkajs-fixes.ts'; // kafkajs's defects mended before it loads
import { Kafka, logLevel, Partitioners, type Admin, type Consumer, type Producer, type IHeaders } from 'kafkajs';
import {
  codecFor, DecodeError, SchemaRegistryClient, topics, type AvroCodec, type TopicName, type TopicSpec, type TopicValues,
} from '../schemas/index.ts';
import type { Logger } from './log.ts';
import { counter } from './metrics.ts';

/**
 * How long the broker holds a consumer's fetch when it has nothing new. It answers as soon
 * as a message arrives, so this bounds idle polling, not delivery: at 100 ms the idle
 * consumers cost each process of a cluster 1.5-4% of a core more (decision 0083).
 */
const FETCH_WAIT_MS = 1_000;

export interface EventLogOptions {
  brokers: string[];
  registryUrl: string;
  clientId: string;
  log: Logger;
  /** Prefixed to every catalog topic name, so several clusters can share one Kafka. */
  topicPrefix?: string;
}

export interface EventMeta {
  topic: string;
  partition: number;
  offset: string;
  key: string | null;
  timestamp: Date;
}

export interface RawMessage extends EventMeta {
  value: Buffer | null;
  headers: IHeaders;
}

/** Messages for one topic in a bulk send (see bulkSender). */
export interface RawBatch {
  topic: string;
  messages: Array<{ key: Buffer | string | null; value: Buffer | null; partition?: number }>;
}

/** A producer of its own for bulk streams (CDC), so their large sends never delay other events. */
export interface BulkSender {
  /** Sends every message of every batch; resolves only once Kafka has acknowledged all of them (acks=all). */
  send(batches: RawBatch[]): Promise<void>;
  close(): Promise<void>;
}

export interface Subscription {
  /** Resolves once every partition has been read up to its high-water mark at subscribe time. */
  caughtUp: Promise<void>;
  stop(): Promise<void>;
}

/** A reader of one topic from chosen offsets that stops, rather than skips, when its handler fails. */
export interface Tail {
  /** Resolves with the handler's error once it failed (the tail has stopped then), or undefined after stop(). */
  ended: Promise<Error | undefined>;
  stop(): Promise<void>;
}

/** A range of one partition's offsets, [from, to). */
export interface OffsetRange {
  topic: string;
  partition: number;
  from: bigint;
  to: bigint;
}

const murmur2 = createRequire(import.meta.url)('kafkajs/src/producer/partitioners/default/murmur2') as (key: Buffer) => number;

/** The partition kafkajs's default partitioner (Java's) gives a keyed message, so a sender can tell where a message went. */
export function partitionOfKey(key: Buffer, partitions: number): number {
  return (murmur2(key) & 0x7fffffff) % partitions;
}

export interface SubscribeOptions {
  /** A durable consumer group; without it the subscription reads the whole log and commits nothing. */
  groupId?: string;
  fromBeginning?: boolean;
  /** Start at the first message at or after this time instead (e.g. recent heartbeats only). */
  since?: Date;
}

const produced = counter('mg_events_produced_total', 'Events written to Kafka', ['topic']);
const consumed = counter('mg_events_consumed_total', 'Events read from Kafka and handled', ['topic']);
const deadLettered = counter('mg_events_dead_lettered_total', 'Messages moved to the dead-letter topic', ['topic']);
const handlerErrors = counter('mg_event_handler_errors_total', 'Events whose handler threw', ['topic']);

/**
 * Retries an admin request while Kafka calls its error retriable: right after
 * topics are created, leadership may not have reached every broker's metadata
 * yet (NOT_LEADER_FOR_PARTITION), and kafkajs's admin does not retry that.
 */
async function whileRetriable<T>(request: () => Promise<T>, attempts = 30): Promise<T> {
  for (let i = 1; ; i++) {
    try {
      return await request();
    } catch (err) {
      if (!(err as { retriable?: boolean }).retriable || i >= attempts) throw err;
      await new Promise((r) => setTimeout(r, Math.min(1_000, 50 * i)));
    }
  }
}

/**
 * Waits until every partition of the topics has a leader. kafkajs's own wait
 * gives up on UNKNOWN_TOPIC_OR_PARTITION, which a loaded KRaft broker answers
 * for a moment after it created the topic.
 */
async function waitForLeaders(admin: Admin, names: string[]): Promise<void> {
  await whileRetriable(async () => {
    const { topics: described } = await admin.fetchTopicMetadata({ topics: names });
    const leaderless = described.filter((t) => t.partitions.some((p) => p.leader < 0)).map((t) => t.name);
    if (leaderless.length) throw Object.assign(new Error(`no leader yet for ${leaderless.join(', ')}`), { retriable: true });
  }, 60);
}

/** One quick look at a broker (no retries): its cluster id and how many brokers it knows. Throws when it does not answer. */
export async function describeBroker(bootstrap: string): Promise<{ clusterId: string; brokers: number }> {
  const admin = new Kafka({
    clientId: 'mg-probe', brokers: [bootstrap], connectionTimeout: 1_000, requestTimeout: 2_000,
    retry: { retries: 0 }, logLevel: logLevel.NOTHING,
  }).admin();
  try {
    await admin.connect();
    const cluster = await admin.describeCluster();
    return { clusterId: cluster.clusterId, brokers: cluster.brokers.length };
  } finally {
    await admin.disconnect();
  }
}

export class EventLog {
  readonly kafka: Kafka;
  readonly registry: SchemaRegistryClient;
  private producer: Promise<Producer> | undefined;
  private consumers = new Set<Consumer>();

  constructor(private readonly opts: EventLogOptions) {
    const log = opts.log.child({ component: 'kafkajs' });
    this.kafka = new Kafka({
      clientId: opts.clientId,
      brokers: opts.brokers,
      retry: { retries: 8, initialRetryTime: 100, maxRetryTime: 2000 },
      logLevel: logLevel.WARN,
      logCreator: () => ({ level, log: entry }) => {
        const { message, ...rest } = entry;
        (level <= logLevel.ERROR ? log.error : log.warn).call(log, rest, message);
      },
    });
    this.registry = new SchemaRegistryClient(opts.registryUrl);
  }

  /** The Kafka name of a catalog topic (with this log's prefix). */
  topic(name: TopicName): string {
    return (this.opts.topicPrefix ?? '') + topics[name].name;
  }

  /** Creates the catalog's topics that do not exist yet; returns the names created. */
  async ensureTopics(): Promise<string[]> {
    const specs: TopicSpec[] = (Object.keys(topics) as TopicName[]).map((k) => ({ ...topics[k], name: this.topic(k) }));
    const admin = this.kafka.admin();
    await admin.connect();
    try {
      const existing = new Set(await admin.listTopics());
      const missing = specs.filter((s) => !existing.has(s.name));
      if (missing.length === 0) return [];
      await admin.createTopics({
        waitForLeaders: false,
        topics: missing.map((s) => ({
          topic: s.name,
          numPartitions: s.partitions,
          replicationFactor: -1, // the broker's default.replication.factor
          configEntries: [
            { name: 'cleanup.policy', value: s.cleanupPolicy },
            { name: 'retention.ms', value: String(s.retentionMs) },
          ],
        })),
      });
      await waitForLeaders(admin, missing.map((s) => s.name));
      return missing.map((s) => s.name);
    } finally {
      await admin.disconnect();
    }
  }

  /**
   * Creates a topic outside the catalog (e.g. a CDC table topic) unless it
   * exists; returns its partition count either way.
   */
  async ensureTopic(name: string, spec: { partitions: number; cleanupPolicy: 'compact' | 'delete'; retentionMs: number }): Promise<number> {
    const admin = this.kafka.admin();
    await admin.connect();
    try {
      if (!(await admin.listTopics()).includes(name)) {
        await admin.createTopics({
          waitForLeaders: true,
          topics: [{
            topic: name, numPartitions: spec.partitions, replicationFactor: -1,
            configEntries: [{ name: 'cleanup.policy', value: spec.cleanupPolicy }, { name: 'retention.ms', value: String(spec.retentionMs) }],
          }],
        });
      }
      const meta = await whileRetriable(() => admin.fetchTopicMetadata({ topics: [name] }));
      return meta.topics[0].partitions.length;
    } finally {
      await admin.disconnect();
    }
  }

  /** A dedicated idempotent producer for large batched sends (acks=all, per-key partitioning like Kafka's Java client). */
  async bulkSender(): Promise<BulkSender> {
    const producer = this.kafka.producer({
      idempotent: true, maxInFlightRequests: 1, createPartitioner: Partitioners.DefaultPartitioner,
      retry: { retries: Number.MAX_SAFE_INTEGER, maxRetryTime: 2_000 },
    });
    await producer.connect();
    return {
      send: async (batches) => {
        await producer.sendBatch({ acks: -1, topicMessages: batches });
        for (const b of batches) produced.inc({ topic: b.topic }, b.messages.length);
      },
      close: () => producer.disconnect(),
    };
  }

  /** Typed publishing to one catalog topic; resolves once Kafka has acknowledged (acks=all). */
  publisher<K extends keyof TopicValues>(topic: K): (events: Array<{ key: string; value: TopicValues[K] }>) => Promise<void> {
    const name = this.topic(topic);
    const codec = codecFor(this.registry, topic, name);
    return async (events) => {
      const messages = await Promise.all(events.map(async (e) => ({ key: e.key, value: await codec.encode(e.value) })));
      await this.sendRaw(name, messages);
    };
  }

  async sendRaw(topic: string, messages: Array<{ key: string | null; value: Buffer | null; headers?: IHeaders }>): Promise<void> {
    const producer = await this.getProducer();
    await producer.send({ topic, acks: -1, messages });
    produced.inc({ topic }, messages.length);
  }

  /**
   * Typed consumption of one catalog topic. Messages that do not decode go to
   * the dead-letter topic (logged with topic/partition/offset) and consumption
   * goes on; a handler that throws is logged and counted, never fatal.
   */
  subscribe<K extends keyof TopicValues>(
    topic: K,
    onEvent: (value: TopicValues[K], meta: EventMeta) => void | Promise<void>,
    opts: SubscribeOptions = {},
  ): Promise<Subscription> {
    const name = this.topic(topic);
    const codec: AvroCodec<TopicValues[K]> = codecFor(this.registry, topic, name);
    return this.subscribeRaw(name, async (msg) => {
      if (msg.value === null) return; // a tombstone: nothing to apply
      let value: TopicValues[K];
      try {
        value = await codec.decode(msg.value);
      } catch (err) {
        if (!(err instanceof DecodeError)) throw err;
        await this.deadLetter(msg, err.message);
        return;
      }
      await onEvent(value, msg);
    }, opts);
  }

  async subscribeRaw(topic: string, onMessage: (msg: RawMessage) => Promise<void>, opts: SubscribeOptions = {}): Promise<Subscription> {
    const log = this.opts.log.child({ topic });
    const consumer = this.kafka.consumer({
      groupId: opts.groupId ?? `${this.opts.clientId}.reader.${randomUUID()}`,
      sessionTimeout: 10_000,
      heartbeatInterval: 1_000,
      maxWaitTimeInMs: FETCH_WAIT_MS,
    });
    this.consumers.add(consumer);

    const { pending, startAt } = await this.unreadPartitions(topic, opts.since);
    let markCaughtUp!: () => void;
    const caughtUp = new Promise<void>((resolve) => (markCaughtUp = resolve));
    const progressed = (partition: number, nextOffset: bigint) => {
      const hwm = pending.get(partition);
      if (hwm !== undefined && nextOffset >= hwm) pending.delete(partition);
      if (pending.size === 0) markCaughtUp();
    };
    // Even with nothing to read yet, the subscription is live only once it has joined its
    // group and holds its partitions: until then new events would not reach it.
    consumer.on(consumer.events.GROUP_JOIN, () => {
      if (pending.size === 0) markCaughtUp();
    });

    await consumer.connect();
    await consumer.subscribe({ topic, fromBeginning: opts.fromBeginning ?? true });
    // seek() takes effect once the consumer runs, so it is issued right after run().
    const seekAll = () => startAt.forEach((offset, partition) => consumer.seek({ topic, partition, offset: offset.toString() }));
    await consumer.run({
      autoCommit: opts.groupId !== undefined,
      eachBatchAutoResolve: true,
      eachBatch: async ({ batch, heartbeat }) => {
        for (const m of batch.messages) {
          const msg: RawMessage = {
            topic, partition: batch.partition, offset: m.offset, key: m.key?.toString() ?? null,
            value: m.value, headers: m.headers ?? {}, timestamp: new Date(Number(m.timestamp)),
          };
          try {
            await onMessage(msg);
            consumed.inc({ topic });
          } catch (err) {
            handlerErrors.inc({ topic });
            log.error({ err, partition: msg.partition, offset: msg.offset }, 'event handler failed; skipping the event');
          }
          await heartbeat();
        }
        progressed(batch.partition, BigInt(batch.lastOffset()) + 1n);
      },
    });
    seekAll();
    return {
      caughtUp,
      stop: async () => {
        this.consumers.delete(consumer);
        await consumer.disconnect();
      },
    };
  }

  /** The next offset of each partition of a topic (its high-water mark): where a reader starting now begins. */
  async endOffsets(topic: string): Promise<Map<number, bigint>> {
    const admin = this.kafka.admin();
    await admin.connect();
    try {
      return new Map((await whileRetriable(() => admin.fetchTopicOffsets(topic))).map((o) => [o.partition, BigInt(o.high)]));
    } finally {
      await admin.disconnect();
    }
  }

  /** Each partition's first and next offsets (low and high-water marks). */
  async partitionOffsets(topic: string): Promise<Array<{ partition: number; low: bigint; high: bigint }>> {
    const admin = this.kafka.admin();
    await admin.connect();
    try {
      return (await whileRetriable(() => admin.fetchTopicOffsets(topic))).map((o) => ({ partition: o.partition, low: BigInt(o.low), high: BigInt(o.high) }));
    } finally {
      await admin.disconnect();
    }
  }

  async listTopics(): Promise<string[]> {
    const admin = this.kafka.admin();
    await admin.connect();
    try {
      return await admin.listTopics();
    } finally {
      await admin.disconnect();
    }
  }

  /** Reads the messages of the given offset ranges once (one consumer, nothing committed). */
  async readRanges(ranges: OffsetRange[], timeoutMs = 60_000): Promise<RawMessage[]> {
    const wanted = ranges.filter((r) => r.to > r.from);
    if (wanted.length === 0) return [];
    const id = (topic: string, partition: number) => `${topic}/${partition}`;
    const pending = new Map(wanted.map((r) => [id(r.topic, r.partition), r]));
    const out: RawMessage[] = [];
    const consumer = this.kafka.consumer({ groupId: `${this.opts.clientId}.ranges.${randomUUID()}`, maxWaitTimeInMs: FETCH_WAIT_MS });
    this.consumers.add(consumer);
    let done!: () => void;
    const finished = new Promise<void>((resolve) => (done = resolve));
    try {
      await consumer.connect();
      const topicNames = [...new Set(wanted.map((r) => r.topic))];
      await consumer.subscribe({ topics: topicNames, fromBeginning: true });
      await consumer.run({
        autoCommit: false,
        eachBatch: async ({ batch }) => {
          const r = pending.get(id(batch.topic, batch.partition));
          if (!r) return;
          for (const m of batch.messages) {
            const offset = BigInt(m.offset);
            if (offset < r.from || offset >= r.to) continue;
            out.push({ topic: batch.topic, partition: batch.partition, offset: m.offset, key: m.key?.toString() ?? null,
              value: m.value, headers: m.headers ?? {}, timestamp: new Date(Number(m.timestamp)) });
          }
          if (batch.messages.length && BigInt(batch.lastOffset()) + 1n >= r.to) {
            pending.delete(id(batch.topic, batch.partition));
            if (pending.size === 0) done();
          }
        },
      });
      // Partitions outside the ranges start at their end: nothing of theirs is read.
      for (const topic of topicNames) {
        for (const o of await this.partitionOffsets(topic)) {
          const r = pending.get(id(topic, o.partition));
          consumer.seek({ topic, partition: o.partition, offset: (r ? r.from : o.high).toString() });
        }
      }
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([finished, new Promise((_r, reject) => {
        timer = setTimeout(() => reject(new Error(`reading ${[...pending.keys()].join(', ')} took longer than ${timeoutMs} ms`)), timeoutMs);
      })]).finally(() => clearTimeout(timer));
      return out;
    } finally {
      this.consumers.delete(consumer);
      await consumer.disconnect().catch(() => undefined);
    }
  }

  async topicExists(topic: string): Promise<boolean> {
    const admin = this.kafka.admin();
    await admin.connect();
    try {
      return (await admin.listTopics()).includes(topic);
    } finally {
      await admin.disconnect();
    }
  }

  /**
   * Reads `topic` from `startAt` (per partition; others from their start),
   * one fetched batch at a time, committing nothing: the caller keeps its own
   * positions (e.g. with the data it writes). A handler that throws ends the
   * tail before any later message is handed over. A handler slower than the
   * group's session timeout does not end it: the member heartbeats while the
   * handler works, and should Kafka drop it anyway (an event loop blocked that
   * long), kafkajs joins again and the tail seeks back to where it stood.
   * `opts.sessionTimeoutMs`: the group's session timeout (default 10 s; the broker allows 6 s and up by default).
   */
  async tail(
    topic: string, startAt: ReadonlyMap<number, bigint>,
    onBatch: (messages: RawMessage[], info: { partition: number; highWatermark: bigint }) => Promise<void>,
    opts: { sessionTimeoutMs?: number } = {},
  ): Promise<Tail> {
    const consumer = this.kafka.consumer({
      groupId: `${this.opts.clientId}.tail.${randomUUID()}`, sessionTimeout: opts.sessionTimeoutMs ?? 10_000, heartbeatInterval: 1_000, maxWaitTimeInMs: FETCH_WAIT_MS,
    });
    this.consumers.add(consumer);
    let end!: (err: Error | undefined) => void;
    const ended = new Promise<Error | undefined>((resolve) => (end = resolve));
    let failed = false;
    // The next offset to hand over per partition: where a new group generation resumes (nothing is committed).
    const next = new Map(startAt);
    const seekAll = () => next.forEach((offset, partition) => consumer.seek({ topic, partition, offset: offset.toString() }));
    consumer.on(consumer.events.GROUP_JOIN, seekAll);
    const stop = async () => {
      this.consumers.delete(consumer);
      await consumer.disconnect();
      end(undefined);
    };
    await consumer.connect();
    await consumer.subscribe({ topic, fromBeginning: true });
    await consumer.run({
      autoCommit: false,
      eachBatch: async ({ batch, heartbeat }) => {
        if (failed || batch.messages.length === 0) return;
        const messages: RawMessage[] = batch.messages.map((m) => ({
          topic, partition: batch.partition, offset: m.offset, key: m.key?.toString() ?? null,
          value: m.value, headers: m.headers ?? {}, timestamp: new Date(Number(m.timestamp)),
        }));
        // Kafka drops a member silent for sessionTimeout; kafkajs heartbeats only between batches.
        const beating = setInterval(() => void heartbeat().catch(() => undefined), 1_000);
        try {
          await onBatch(messages, { partition: batch.partition, highWatermark: BigInt(batch.highWatermark) });
          consumed.inc({ topic }, messages.length);
          next.set(batch.partition, BigInt(batch.lastOffset()) + 1n);
        } catch (err) {
          failed = true;
          handlerErrors.inc({ topic });
          consumer.pause([{ topic }]);
          setImmediate(() => void stop().finally(() => end(err as Error)));
          end(err as Error);
          return;
        } finally {
          clearInterval(beating);
        }
        // A rebalance error is kafkajs's to handle (it joins again; GROUP_JOIN seeks back to `next`), not the handler's.
        await heartbeat();
      },
    });
    seekAll();
    return { ended, stop };
  }

  async close(): Promise<void> {
    await Promise.all([...this.consumers].map((c) => c.disconnect()));
    this.consumers.clear();
    if (this.producer) await (await this.producer).disconnect();
    this.producer = undefined;
  }

  /**
   * Partitions that hold records to read now, with the offset a reader must
   * reach (`pending`), and where to start when reading from a time (`startAt`).
   */
  private async unreadPartitions(topic: string, since?: Date): Promise<{ pending: Map<number, bigint>; startAt: Map<number, bigint> }> {
    const admin = this.kafka.admin();
    await admin.connect();
    try {
      const offsets = await whileRetriable(() => admin.fetchTopicOffsets(topic));
      const startAt = new Map<number, bigint>();
      if (since) {
        // -1 means no message at or after `since`: start at the end.
        for (const o of await whileRetriable(() => admin.fetchTopicOffsetsByTimestamp(topic, since.getTime()))) {
          const high = BigInt(offsets.find((x) => x.partition === o.partition)!.high);
          startAt.set(o.partition, o.offset === '-1' ? high : BigInt(o.offset));
        }
      }
      const pending = new Map<number, bigint>();
      for (const o of offsets) {
        const from = startAt.get(o.partition) ?? BigInt(o.low);
        if (BigInt(o.high) > from) pending.set(o.partition, BigInt(o.high));
      }
      return { pending, startAt };
    } finally {
      await admin.disconnect();
    }
  }

  private async deadLetter(msg: RawMessage, error: string): Promise<void> {
    this.opts.log.warn({ topic: msg.topic, partition: msg.partition, offset: msg.offset, error }, 'undecodable message moved to the dead-letter topic');
    await this.sendRaw(this.topic('deadLetter'), [{
      key: msg.key,
      value: msg.value,
      headers: {
        ...msg.headers,
        'mg.source.topic': msg.topic,
        'mg.source.partition': String(msg.partition),
        'mg.source.offset': msg.offset,
        'mg.error': error,
      },
    }]);
    deadLettered.inc({ topic: msg.topic });
  }

  private getProducer(): Promise<Producer> {
    this.producer ??= (async () => {
      // Idempotence needs unlimited retries (kafkajs); callers that must not block bound their own wait.
      const p = this.kafka.producer({
        idempotent: true, maxInFlightRequests: 1, createPartitioner: Partitioners.DefaultPartitioner,
        retry: { retries: Number.MAX_SAFE_INTEGER, maxRetryTime: 2_000 },
      });
      await p.connect();
      return p;
    })();
    this.producer.catch(() => (this.producer = undefined));
    return this.producer;
  }
}
