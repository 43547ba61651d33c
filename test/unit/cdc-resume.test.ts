/** The resend filter: what a stream resuming on an existing slot drops because Kafka already holds it. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Partitioners } from 'kafkajs';
import { partitionOfKey } from '../../common/eventlog.ts';
import { ResendFilter, type Delivered } from '../../ingest/cdc/resume.ts';

const at = (epoch: bigint, commitLsn: bigint, position: bigint, snapshot = false): Delivered => ({ epoch, snapshot, commitLsn, position, instance: 'a' });

test('per partition: up to and including the last delivered (commit_lsn, position), not after', () => {
  const f = new ResendFilter(new Map([['t/0', at(3n, 100n, 2n)]]), 3n);
  assert.equal(f.has('t', 1, null, 90n, 7), true);
  assert.equal(f.has('t', 1, null, 100n, 2), true);
  assert.equal(f.has('t', 1, null, 100n, 3), false);
  assert.equal(f.has('t', 1, null, 101n, 0), false);
  // Past everything delivered the filter switches off for good.
  assert.equal(f.has('t', 1, null, 90n, 0), false);
});

test('a partition that has not seen the transaction keeps it, one that has drops it', () => {
  const key = Buffer.from('k1');
  const other = [Buffer.from('k2'), Buffer.from('k3'), Buffer.from('k4'), Buffer.from('k5')].find((k) => partitionOfKey(k, 2) !== partitionOfKey(key, 2))!;
  const p = partitionOfKey(key, 2);
  const f = new ResendFilter(new Map([[`t/${p}`, at(1n, 200n, 5n)], [`t/${1 - p}`, at(1n, 150n, 0n)]]), 1n);
  assert.equal(f.has('t', 2, key, 180n, 0), true);
  assert.equal(f.has('t', 2, other, 180n, 1), false);
  // Without a key the partitioner chose at random: dropped only when every partition has it.
  assert.equal(f.has('t', 2, null, 140n, 0), true);
  assert.equal(f.has('t', 2, null, 160n, 0), false);
});

test('events of an older epoch or a snapshot in a partition drop nothing of the streamed epoch', () => {
  const f = new ResendFilter(new Map([['t/0', at(2n, 500n, 0n)], ['u/0', at(3n, 400n, 9n, true)], ['v/0', at(3n, 450n, 1n)]]), 3n);
  assert.equal(f.has('t', 1, null, 300n, 0), false);
  assert.equal(f.has('u', 1, null, 420n, 0), false);
  assert.equal(f.has('v', 1, null, 420n, 0), true);
});

test('nothing delivered: nothing dropped', () => {
  assert.equal(new ResendFilter(new Map(), 1n).has('t', 1, null, 1n, 0), false);
});

test('partitionOfKey agrees with the producer\'s default partitioner', () => {
  const partitioner = Partitioners.DefaultPartitioner();
  const partitionMetadata = [0, 1, 2, 3, 4].map((partitionId) => ({ partitionId, leader: 1, replicas: [1], isr: [1], partitionErrorCode: 0 }));
  for (let i = 0; i < 200; i++) {
    const key = Buffer.from(`key-${i}`);
    assert.equal(partitionOfKey(key, 5), partitioner({ topic: 't', partitionMetadata, message: { key, value: null } }));
  }
});
