/** The gateway's discovery says when a shard's primary moves to another instance, and only then. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { EventLog } from '../../common/eventlog.ts';
import { Discovery, type PrimaryMove } from '../../router/gateway/discovery.ts';
import { payload, type TopologyEvent } from '../../schemas/index.ts';

let n = 0;
const ev = (p: TopologyEvent['payload']): TopologyEvent => ({ eventId: `e${++n}`, ts: new Date(), source: 'test', payload: p });
const primaryChanged = (primaryInstanceId: string, term: bigint, ruleNumber = term) =>
  ev(payload('PrimaryChanged', { database: 'app', shard: '-', primaryInstanceId, term, ruleNumber, reason: `failover: test term ${term}` }));

/** A discovery fed by hand: `history` is what the topic held at start; the returned function delivers more. */
async function discovery(history: TopologyEvent[]) {
  const handlers = new Map<string, (e: unknown) => void>();
  const eventLog = {
    subscribe: async (topic: string, handler: (e: unknown) => void) => {
      handlers.set(topic, handler);
      if (topic === 'topology') for (const e of history) handler(e);
      return { caughtUp: Promise.resolve(), stop: async () => undefined };
    },
  } as unknown as EventLog;
  const d = new Discovery(eventLog);
  const moves: PrimaryMove[] = [];
  d.onPrimaryMoved((m) => moves.push(m));
  await d.start();
  return { d, moves, deliver: (e: TopologyEvent) => handlers.get('topology')!(e), stop: () => d.stop() };
}

test('a newer term on another instance is a move; the same instance re-elected, an older term and the history read at start are not', async () => {
  const d = await discovery([primaryChanged('a', 1n), primaryChanged('b', 2n)]);
  assert.deepEqual(d.moves, [], 'the history is not news');

  d.deliver(primaryChanged('b', 3n)); // re-election of the same instance
  d.deliver(primaryChanged('b', 3n, 4n)); // a newer rule in the same term
  d.deliver(primaryChanged('c', 2n)); // an older term, ignored by the fold
  assert.deepEqual(d.moves, []);

  d.deliver(primaryChanged('c', 4n));
  assert.deepEqual(d.moves, [{ database: 'app', shard: '-', from: 'b', to: 'c', term: 4n, reason: 'failover: test term 4' }]);
  await d.stop();
});

test('key ranges come in keyspace order, the same array until the topology changes, and the new shards after', async () => {
  const shard = (database: string, name: string, keyRangeStart: string, keyRangeEnd: string) => ev(payload('ShardDefined', { database, shard: name, keyRangeStart, keyRangeEnd }));
  const created = (database: string) => ev(payload('DatabaseCreated', { database, durabilityPolicy: null, hostedOn: null, sharded: true, transactionMode: null }));
  const { d, deliver, stop } = await discovery([created('app'), shard('app', '80-', '80', ''), shard('app', '-80', '', '80'), created('other'), shard('other', '-', '', '')]);
  const first = d.keyRanges('app');
  assert.deepEqual(first, [{ shard: '-80', start: '', end: '80' }, { shard: '80-', start: '80', end: '' }]);
  assert.equal(d.keyRanges('app'), first, 'cached');
  assert.deepEqual(d.keyRanges('other'), [{ shard: '-', start: '', end: '' }]);
  deliver(shard('app', 'c0-', 'c0', ''));
  assert.deepEqual(d.keyRanges('app').map((r) => r.shard), ['-80', '80-', 'c0-']);
  assert.deepEqual(d.keyRanges('nosuch'), []);
  await stop();
});

test('during a reshard the gateway routes by the serving shard set only, and one event moves it to the other set', async () => {
  const shard = (name: string, keyRangeStart: string, keyRangeEnd: string) => ev(payload('ShardDefined', { database: 'app', shard: name, keyRangeStart, keyRangeEnd }));
  const servingSet = (version: bigint, shards: string[]) => ev(payload('ServingShardsChanged', { database: 'app', version, shards }));
  const { d, deliver, stop } = await discovery([
    ev(payload('DatabaseCreated', { database: 'app', durabilityPolicy: null, hostedOn: null, sharded: true, transactionMode: null })),
    shard('-80', '', '80'), shard('80-', '80', ''), servingSet(1n, ['-80', '80-']), shard('-40', '', '40'), shard('40-80', '40', '80'),
  ]);
  assert.deepEqual(d.keyRanges('app').map((r) => r.shard), ['-80', '80-']);
  assert.deepEqual(d.shards('app').map((s) => s.shard).sort(), ['-80', '80-']);
  deliver(shard('80-c0', '80', 'c0'));
  deliver(shard('c0-', 'c0', ''));
  assert.deepEqual(d.keyRanges('app').map((r) => r.shard), ['-80', '80-'], 'new shards defined: still the old set');
  deliver(servingSet(2n, ['-40', '40-80', '80-c0', 'c0-']));
  assert.deepEqual(d.keyRanges('app').map((r) => r.shard), ['-40', '40-80', '80-c0', 'c0-']);
  await stop();
});
