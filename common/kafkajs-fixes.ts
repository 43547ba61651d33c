/**
 * Two defects of kafkajs 2.2.4, its last release (kafkajs is unmaintained), mended
 * before any Kafka client is made. Imported by common/eventlog.ts ahead of kafkajs.
 */
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

/**
 * A send's messages are grouped per partition by copying the partition's array
 * for every message (`[...current, message]`), which is quadratic: a CDC batch of
 * 5,000 messages spent most of its CPU there (measured with --cpu-prof in
 * bench/cdc.ts). The module is replaced, before kafkajs loads it, by the same
 * grouping done in linear time.
 */
type Partitioner = (args: { topic: string; partitionMetadata: unknown[]; message: unknown }) => number;
const groupingFile = require.resolve('kafkajs/src/producer/groupMessagesPerPartition.js');
const grouping = ({ topic, partitionMetadata, messages, partitioner }: { topic: string; partitionMetadata: unknown[]; messages: unknown[]; partitioner: Partitioner }) => {
  const result: Record<number, unknown[]> = {};
  if (partitionMetadata.length === 0) return result;
  for (const message of messages) (result[partitioner({ topic, partitionMetadata, message })] ??= []).push(message);
  return result;
};
const cached = require.cache[groupingFile];
if (cached) cached.exports = grouping;
else {
  const Module = require('node:module') as { Module: new (id: string) => NodeJS.Module };
  const m = new Module.Module(groupingFile);
  m.filename = groupingFile;
  m.loaded = true;
  m.exports = grouping;
  require.cache[groupingFile] = m;
}

/**
 * Each broker connection's request queue re-arms a timer after every check of its
 * pending requests, and when nothing is pending and nothing throttled the delay is
 * negative, so the timer fires again within 1 ms, forever (tulios/kafkajs#1556; the
 * fix proposed upstream, #1667, was never released). An idle agent or orchestrator
 * woke about 1,000 times a second and spent 6-8% of a core on it. With nothing
 * pending and no throttle there is nothing to check: a request pushed later is sent
 * at once or queued with a check of its own, and a fulfilled request checks the queue.
 */
interface RequestQueue { pending: unknown[]; throttledUntil: number; scheduleCheckPendingRequests(): void }
const queue = (require('kafkajs/src/network/requestQueue/index.js') as { prototype: RequestQueue }).prototype;
const schedule = queue.scheduleCheckPendingRequests;
queue.scheduleCheckPendingRequests = function (this: RequestQueue) {
  if (this.pending.length > 0 || this.throttledUntil > Date.now()) schedule.call(this);
};
