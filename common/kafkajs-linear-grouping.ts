/**
 * kafkajs 2.2.4 groups a send's messages per partition by copying the
 * partition's array for every message (`[...current, message]`), which is
 * quadratic: a CDC batch of 5,000 messages spent most of its CPU there
 * (measured with --cpu-prof in bench/cdc.ts). kafkajs is unmaintained, so the
 * module is replaced, before kafkajs loads it, by the same grouping done in
 * linear time. Imported by common/eventlog.ts ahead of kafkajs.
 */
import { createRequire } from 'node:module';

type Partitioner = (args: { topic: string; partitionMetadata: unknown[]; message: unknown }) => number;

const require = createRequire(import.meta.url);
const file = require.resolve('kafkajs/src/producer/groupMessagesPerPartition.js');
const grouping = ({ topic, partitionMetadata, messages, partitioner }: { topic: string; partitionMetadata: unknown[]; messages: unknown[]; partitioner: Partitioner }) => {
  const result: Record<number, unknown[]> = {};
  if (partitionMetadata.length === 0) return result;
  for (const message of messages) (result[partitioner({ topic, partitionMetadata, message })] ??= []).push(message);
  return result;
};
const cached = require.cache[file];
if (cached) cached.exports = grouping;
else {
  const Module = require('node:module') as { Module: new (id: string) => NodeJS.Module };
  const m = new Module.Module(file);
  m.filename = file;
  m.loaded = true;
  m.exports = grouping;
  require.cache[file] = m;
}
