import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { test } from 'node:test';
import '../../common/kafkajs-fixes.ts';

const require = createRequire(import.meta.url);
const RequestQueue = require('kafkajs/src/network/requestQueue/index.js');
const groupMessagesPerPartition = require('kafkajs/src/producer/groupMessagesPerPartition.js');
const silent = { debug() {}, info() {}, warn() {}, error() {} };
const queue = () => new RequestQueue({ maxInFlightRequests: null, requestTimeout: 30_000, enforceRequestTimeout: true, clientId: 't', broker: 'b', logger: silent });

test('an idle request queue arms no timer: nothing pending, nothing throttled', () => {
  const q = queue();
  q.checkPendingRequests();
  assert.equal(q.throttleCheckTimeoutId, null);
});

test('a throttled request queue still checks again when the throttle ends', () => {
  const q = queue();
  q.throttledUntil = Date.now() + 60_000;
  q.pending.push({ correlationId: 1 });
  q.checkPendingRequests();
  assert.notEqual(q.throttleCheckTimeoutId, null);
  clearTimeout(q.throttleCheckTimeoutId);
});

test('messages are grouped per partition in order', () => {
  const messages = Array.from({ length: 6 }, (_, i) => ({ value: `m${i}` }));
  const grouped = groupMessagesPerPartition({
    topic: 't', partitionMetadata: [{}, {}], messages, partitioner: ({ message }: { message: { value: string } }) => Number(message.value.slice(1)) % 2,
  });
  assert.deepEqual(grouped, { 0: [messages[0], messages[2], messages[4]], 1: [messages[1], messages[3], messages[5]] });
});
