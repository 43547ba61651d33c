import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  applyTopologyEvent, emptyTopology, foldTopology, instancesOf, payload, servingShardsOf, shardsOf, topologyKey, type TopologyEvent,
} from '../../schemas/index.ts';

let n = 0;
const ev = (p: TopologyEvent['payload']): TopologyEvent => ({ eventId: `e${++n}`, ts: new Date(1_700_000_000_000 + n), source: 'test', payload: p });
const inst = (id: string, cell: string, type: 'PRIMARY' | 'REPLICA' = 'REPLICA') =>
  ev(payload('InstanceRegistered', { instanceId: id, database: 'db', shard: '-', cell, host: '127.0.0.1', port: 5000 + n, type, agentMetricsPort: null, poolerPort: null }));
const primary = (id: string, term: bigint, ruleNumber = 1n) =>
  ev(payload('PrimaryChanged', { database: 'db', shard: '-', primaryInstanceId: id, term, ruleNumber, reason: 'test' }));

const serving = (id: string, state: 'SERVING' | 'NOT_SERVING' | 'DRAINED', term: bigint | null = null) =>
  ev(payload('ServingStateChanged', { instanceId: id, state, term }));

const base = () => [
  ev(payload('CellRegistered', { cell: 'zone1', region: null })),
  ev(payload('DatabaseCreated', { database: 'db', durabilityPolicy: null, sharded: false, transactionMode: null, hostedOn: null })),
  ev(payload('ShardDefined', { database: 'db', shard: '-', keyRangeStart: '', keyRangeEnd: '' })),
  inst('a', 'zone1', 'PRIMARY'), inst('b', 'zone2'), inst('c', 'zone3'),
  primary('a', 1n),
];

test('fold builds instances with their current type from the latest term', () => {
  const state = foldTopology([...base(), primary('b', 2n)]);
  const view = instancesOf(state);
  assert.deepEqual(view.map((i) => [i.instanceId, i.currentType]), [['a', 'REPLICA'], ['b', 'PRIMARY'], ['c', 'REPLICA']]);
  assert.equal(state.primaries.get('db/-')?.term, 2n);
});

test('a PrimaryChanged with an older term is ignored, whatever its position in the log', () => {
  const state = foldTopology([...base(), primary('c', 3n), primary('b', 2n)]);
  assert.equal(state.primaries.get('db/-')?.instanceId, 'c');
  assert.equal(state.applied, base().length + 2);
});

test('within one term the higher rule number wins', () => {
  const state = foldTopology([...base(), primary('b', 2n, 5n), primary('c', 2n, 4n)]);
  assert.equal(state.primaries.get('db/-')?.instanceId, 'b');
});

test('deregistering removes the instance and its serving state; dropping a database hides its instances', () => {
  const events = [...base(), serving('c', 'SERVING'), ev(payload('InstanceDeregistered', { instanceId: 'c', reason: 'gone' }))];
  const state = foldTopology(events);
  assert.equal(state.instances.has('c'), false);
  assert.equal(state.serving.has('c'), false);
  const dropped = applyTopologyEvent(applyTopologyEvent(state, primary('b', 3n)), ev(payload('DatabaseDropped', { database: 'db' })));
  assert.deepEqual(instancesOf(dropped), []);
  assert.equal(dropped.primaries.has('db/-'), false, 'its primaries go with it');
  assert.equal(dropped.retiredTerms.get('db/-'), 3n, 'what orchestrators completed up to its last term was the dropped system\'s');
  // Created again under the name: its first election's term 1 is not older than anything held.
  applyTopologyEvent(dropped, base()[1]);
  applyTopologyEvent(dropped, primary('a', 1n));
  assert.equal(dropped.primaries.get('db/-')?.instanceId, 'a');
});

test('the fold of the compacted log (latest event per key, in offset order) equals the fold of the full log', () => {
  const log = [...base(), serving('b', 'NOT_SERVING'), primary('b', 2n),
    serving('b', 'SERVING'), inst('c', 'zone9'), primary('c', 3n)];
  const latest = new Map<string, number>();
  log.forEach((e, i) => latest.set(topologyKey(e), i));
  const compacted = log.filter((e, i) => latest.get(topologyKey(e)) === i);
  assert.ok(compacted.length < log.length);
  const strip = (s: ReturnType<typeof foldTopology>) => ({ ...s, applied: 0 });
  assert.deepEqual(strip(foldTopology(compacted)), strip(foldTopology(log)));
});

test('a serving change with a term older than the shard\'s primary term is ignored; newer, current and term-less ones apply', () => {
  const state = foldTopology([...base(), primary('b', 3n), serving('a', 'NOT_SERVING', 3n)]);
  // A stale orchestrator (term 2) marking the old primary serving again, or the new one not serving: both ignored.
  applyTopologyEvent(state, serving('a', 'SERVING', 2n));
  applyTopologyEvent(state, serving('b', 'NOT_SERVING', 2n));
  assert.equal(state.serving.get('a'), 'NOT_SERVING');
  assert.equal(state.serving.get('b'), undefined);
  assert.equal(instancesOf(state).find((i) => i.instanceId === 'b')?.serving, 'NOT_SERVING'); // the view's default, untouched
  applyTopologyEvent(state, serving('b', 'SERVING', 3n));
  applyTopologyEvent(state, serving('c', 'SERVING', 4n)); // an election of term 4 runs ahead of its PrimaryChanged
  assert.equal(state.serving.get('b'), 'SERVING');
  assert.equal(state.serving.get('c'), 'SERVING');
  // An agent's change (no term) applies whatever the term, as before the field existed.
  applyTopologyEvent(state, serving('a', 'SERVING'));
  assert.equal(state.serving.get('a'), 'SERVING');
  // An instance the fold does not know yet (compaction order): nothing to compare with, so it applies.
  applyTopologyEvent(state, serving('z', 'NOT_SERVING', 1n));
  assert.equal(state.serving.get('z'), 'NOT_SERVING');
});

test('an instance being removed (DRAINED by an orchestrator) stays drained when its agent stops; only an orchestrator undoes it', () => {
  const state = foldTopology([...base(), serving('c', 'SERVING'), serving('c', 'DRAINED', 1n)]);
  applyTopologyEvent(state, serving('c', 'NOT_SERVING')); // its agent, stopped by the removal
  assert.equal(state.serving.get('c'), 'DRAINED');
  applyTopologyEvent(state, serving('c', 'SERVING', 1n));
  assert.equal(state.serving.get('c'), 'SERVING');
  applyTopologyEvent(state, ev(payload('InstanceDeregistered', { instanceId: 'c', reason: 'removed' })));
  applyTopologyEvent(state, inst('c', 'zone3'));
  applyTopologyEvent(state, serving('c', 'NOT_SERVING')); // a new instance under the old id starts afresh
  assert.equal(state.serving.get('c'), 'NOT_SERVING');
});

test('every payload kind has a key naming its entity', () => {
  assert.equal(topologyKey(inst('x', 'zone1')), 'instance/x');
  assert.equal(topologyKey(primary('x', 1n)), 'shard/db/-/primary');
  assert.equal(topologyKey(serving('x', 'SERVING')), 'instance/x/serving');
  assert.equal(topologyKey(ev(payload('DatabaseDropped', { database: 'db' }))), 'database/db');
  assert.deepEqual(emptyTopology().applied, 0);
});

test('the serving shard set: absent means every shard, the highest version wins in any log order, a database made again is served by all', () => {
  const db = (name: string) => ev(payload('DatabaseCreated', { database: name, durabilityPolicy: null, sharded: true, transactionMode: null, hostedOn: null }));
  const shard = (name: string, start: string, end: string) => ev(payload('ShardDefined', { database: 'app', shard: name, keyRangeStart: start, keyRangeEnd: end }));
  const servingSet = (version: bigint, shards: string[]) => ev(payload('ServingShardsChanged', { database: 'app', version, shards }));
  const names = (s: ReturnType<typeof foldTopology>) => servingShardsOf(s, 'app').map((x) => x.shard).sort();
  const old = [db('app'), shard('-80', '', '80'), shard('80-', '80', '')];
  const split = [shard('-40', '', '40'), shard('40-80', '40', '80'), shard('80-c0', '80', 'c0'), shard('c0-', 'c0', '')];

  assert.deepEqual(names(foldTopology(old)), ['-80', '80-']);
  // The old set pinned before the new shards are defined: routers never see a mix.
  const pinned = foldTopology([...old, servingSet(1n, ['-80', '80-']), ...split]);
  assert.deepEqual(names(pinned), ['-80', '80-']);
  assert.equal(shardsOf(pinned, 'app').length, 6, 'what manages shards sees both sets');
  const flipped = foldTopology([...old, servingSet(1n, ['-80', '80-']), ...split, servingSet(2n, ['-40', '40-80', '80-c0', 'c0-'])]);
  assert.deepEqual(names(flipped), ['-40', '40-80', '80-c0', 'c0-']);
  // A stale event later in the log does not flip it back.
  assert.deepEqual(names(applyTopologyEvent(flipped, servingSet(1n, ['-80', '80-']))), ['-40', '40-80', '80-c0', 'c0-']);
  assert.equal(topologyKey(servingSet(1n, [])), 'database/app/serving-shards');
  // Dropped and made again: no serving set of the old database's survives.
  const again = applyTopologyEvent(applyTopologyEvent(flipped, ev(payload('DatabaseDropped', { database: 'app' }))), db('app'));
  assert.equal(again.servingShards.has('app'), false);
});

test('a retired shard (ShardDropped, decision 0061): keyed like its ShardDefined so compaction keeps only the drop; the fold forgets the shard and its primary; defined again, it starts from no term', () => {
  const dropped = ev(payload('ShardDropped', { database: 'db', shard: '-', reason: 'retired by reshard split' }));
  assert.equal(topologyKey(dropped), topologyKey(base()[2]), 'the same key as the ShardDefined it replaces');
  const state = foldTopology([...base(), primary('b', 3n), dropped]);
  assert.deepEqual(shardsOf(state, 'db'), []);
  assert.equal(state.primaries.has('db/-'), false, 'no primary of a retired shard is left to elect or repair');
  assert.equal(state.retiredTerms.get('db/-'), 3n);
  assert.equal(state.instances.size, 3, 'its instances stay until their processes stopped and they are deregistered');
  for (const id of ['a', 'b', 'c']) applyTopologyEvent(state, ev(payload('InstanceDeregistered', { instanceId: id, reason: 'retired' })));
  assert.deepEqual(instancesOf(state), []);
  // What compaction leaves of the log (the latest event of each key, in offset order) folds to the same state.
  const compacted = foldTopology([base()[0], base()[1], dropped]);
  assert.deepEqual([compacted.shards, compacted.primaries, compacted.instances], [state.shards, state.primaries, state.instances]);
  // A later set reusing the name (a reshard back to this count): a new shard whose first election's term 1 is not older than anything held.
  applyTopologyEvent(state, ev(payload('ShardDefined', { database: 'db', shard: '-', keyRangeStart: '', keyRangeEnd: '' })));
  applyTopologyEvent(state, primary('d', 1n));
  assert.equal(state.primaries.get('db/-')?.instanceId, 'd');
  assert.equal(shardsOf(state, 'db').length, 1);
});
