import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { ADDED_SLOT_TOP, instancesOf, loadSpec, parseSpec, shardRanges, shardSetsOf, shardsOfSpec, SpecError, stanzaOfSpec, withAddedInstance, withAddedShardSet, withoutDatabase, withoutInstance, withoutShardSet, withRuntimeChanges } from '../../compose/spec.ts';

test('the default spec is database postgres, 1 shard, 3 instances in zone1..zone3', () => {
  const spec = parseSpec({});
  const inst = instancesOf(spec);
  assert.deepEqual(inst.map((i) => [i.database, i.shard, i.cell]), [
    ['postgres', '-', 'zone1'], ['postgres', '-', 'zone2'], ['postgres', '-', 'zone3'],
  ]);
  assert.equal(new Set(inst.map((i) => i.port)).size, 3);
});

test('shard ranges follow Vitess naming', () => {
  assert.deepEqual(shardRanges(1).map((r) => r.shard), ['-']);
  assert.deepEqual(shardRanges(2).map((r) => r.shard), ['-80', '80-']);
  assert.deepEqual(shardRanges(4).map((r) => [r.start, r.end]), [['', '40'], ['40', '80'], ['80', 'c0'], ['c0', '']]);
});

test('a bad spec gets an error naming the field', () => {
  const bad = (raw: unknown, field: RegExp) => assert.throws(() => parseSpec(raw), (e: Error) => e instanceof SpecError && field.test(e.message));
  bad({ kafka: { port: 80 } }, /kafka\.port: .*1024/);
  bad({ databases: [{ name: 'db', shards: 3 }] }, /databases\.0\.shards: must be a power of two/);
  bad({ databases: [{ name: 'Bad-Name' }] }, /databases\.0\.name: must be lower-case/);
  bad({ cells: ['zone1', 'zone1'] }, /cells: cells must be unique/);
  bad({ agent: { healthIntervalMs: 'fast' } }, /agent\.healthIntervalMs: Expected number/);
  bad({ kafka: { prot: 1 } }, /kafka: Unrecognized key.*prot/);
  bad({ postgres: { basePort: 19092 } }, /port 19092 is used by both kafka\.port and postgres port/);
  bad({ databases: [{ name: 'shop', shards: 2 }] }, /databases.0.shards: more than one shard needs sharded: true/);
});

test('YAML spec files and --set overrides are validated together', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-spec-'));
  const file = path.join(dir, 'c.yaml');
  fs.writeFileSync(file, 'name: demo\ndatabases:\n  - name: shop\n    sharded: true\n    shards: 2\n    instancesPerShard: 2\n');
  const spec = loadSpec(file, { 'postgres.basePort': 25000 });
  assert.equal(spec.name, 'demo');
  assert.deepEqual(instancesOf(spec).map((i) => `${i.instanceId}:${i.port}`), [
    'shop-_80-zone1-0:25000', 'shop-_80-zone2-1:25001', 'shop-80_-zone1-0:25002', 'shop-80_-zone2-1:25003',
  ]);
  fs.writeFileSync(file, 'kafka: [1, 2');
  assert.throws(() => loadSpec(file), /not valid YAML/);
  assert.throws(() => loadSpec(path.join(dir, 'missing.yaml')), /cannot read spec file/);
  fs.rmSync(dir, { recursive: true });
});

test('a replica added at run time takes the highest free port slot; removing instances moves no other port', () => {
  const spec = parseSpec({ databases: [{ name: 'postgres', instancesPerShard: 2 }] });
  const ports = (s: typeof spec) => new Map(instancesOf(s).map((i) => [i.instanceId, i.port]));
  const { spec: one, instance: a } = withAddedInstance(spec, 'postgres', '-', 'zone3');
  assert.deepEqual([a.instanceId, a.port, a.poolerPort], ['postgres-0-zone3-99', 15432 + ADDED_SLOT_TOP, 16432 + ADDED_SLOT_TOP]);
  const { spec: two, instance: b } = withAddedInstance(one, 'postgres', '-', 'zone1');
  assert.equal(b.instanceId, 'postgres-0-zone1-98');
  // A database created later fills slots from below and leaves the added replicas' alone.
  const later = parseSpec({ ...two, databases: [...two.databases, { name: 'shop', instancesPerShard: 2 }] });
  assert.deepEqual([...ports(later)].filter(([id]) => id.startsWith('shop')).map(([, p]) => p), [15434, 15435]);
  // Removing one of the layout keeps its slot; removing an added one frees its slot only.
  const removed = withoutInstance(withoutInstance(later, 'postgres-0-zone2-1'), 'postgres-0-zone3-99');
  assert.deepEqual(removed.databases[0].removedInstances, ['postgres-0-zone2-1']);
  assert.deepEqual(removed.databases[0].addedInstances, [{ shard: '-', cell: 'zone1', slot: 98 }]);
  for (const [id, port] of ports(removed)) assert.equal(port, ports(later).get(id), `${id} keeps its port`);
  assert.equal(ports(removed).size, ports(later).size - 2);
  assert.throws(() => withAddedInstance(spec, 'postgres', '-', 'zone9'), /no cell zone9 \(cells: zone1, zone2, zone3\)/);
  assert.throws(() => withAddedInstance(spec, 'postgres', '-80', 'zone1'), /database postgres has no shard -80/);
});

test('a dropped database keeps its port slots unused: no other instance moves, a new one goes after', () => {
  const spec = parseSpec({ databases: [{ name: 'a', instancesPerShard: 2 }, { name: 'b', instancesPerShard: 2 }, { name: 'c', instancesPerShard: 1 }] });
  const ports = (s: typeof spec) => new Map(instancesOf(s).map((i) => [i.instanceId, i.port]));
  const withoutB = withoutDatabase(spec, 'b');
  assert.deepEqual(withoutB.droppedDatabases, [{ name: 'b', firstSlot: 2, slots: 2 }]);
  assert.deepEqual([...ports(withoutB)], [...ports(spec)].filter(([id]) => !id.startsWith('b-')));
  const withoutAB = withoutDatabase(withoutB, 'a');
  assert.deepEqual([...ports(withoutAB)], [['c-0-zone1-0', 15436]]);
  // A database of the same name again is a new one after every slot ever used.
  const again = parseSpec({ ...withoutAB, databases: [...withoutAB.databases, { name: 'b', instancesPerShard: 1 }] });
  assert.deepEqual([...ports(again)], [['c-0-zone1-0', 15436], ['b-0-zone1-0', 15437]]);
  assert.throws(() => withoutDatabase(withoutAB, 'c'), /c is the cluster's only database/);
  assert.throws(() => withoutDatabase(spec, 'nosuch'), /the spec has no database nosuch/);
  // up with the default spec keeps the drop; a spec naming the database again brings it back where the file puts it.
  assert.deepEqual(withRuntimeChanges(withoutB, parseSpec({ databases: [{ name: 'a', instancesPerShard: 2 }, { name: 'c', instancesPerShard: 1 }] })).droppedDatabases, withoutB.droppedDatabases);
  assert.deepEqual(withRuntimeChanges(withoutB, spec).droppedDatabases, []);
});

test('up with a spec file keeps the run-time changes of the saved spec; a lowered instancesPerShard becomes removed instances', () => {
  const saved = withAddedInstance(parseSpec({ databases: [{ name: 'postgres', instancesPerShard: 3 }, { name: 'shop' }] }), 'postgres', '-', 'zone2').spec;
  const shopPorts = (s: typeof saved) => instancesOf(s).filter((i) => i.database === 'shop').map((i) => i.port);
  const next = withRuntimeChanges(saved, parseSpec({ databases: [{ name: 'postgres', instancesPerShard: 2 }, { name: 'shop' }] }));
  assert.deepEqual(next.databases[0].addedInstances, saved.databases[0].addedInstances);
  assert.deepEqual([next.databases[0].instancesPerShard, next.databases[0].removedInstances], [3, ['postgres-0-zone3-2']]);
  assert.deepEqual(instancesOf(next).filter((i) => i.database === 'postgres').map((i) => i.instanceId),
    ['postgres-0-zone1-0', 'postgres-0-zone2-1', 'postgres-0-zone2-99']);
  assert.deepEqual(shopPorts(next), shopPorts(saved));
  assert.equal(withRuntimeChanges(undefined, saved), saved);
  // A stanza chosen for a name used again (decision 0064) stays the shard's; the others are <db>-<shard>.
  saved.databases[1].stanzas = { '-': 'shop-0-g2' };
  const kept = withRuntimeChanges(saved, parseSpec({ databases: [{ name: 'postgres', instancesPerShard: 2 }, { name: 'shop' }] }));
  assert.deepEqual([stanzaOfSpec(kept.databases[0], '-'), stanzaOfSpec(kept.databases[1], '-')], ['postgres-0', 'shop-0-g2']);
});

test('a second shard set for a reshard: its instances take run-time slots (no other port moves), a replica can join it, up keeps it', () => {
  const spec = parseSpec({ cells: ['zone1', 'zone2'], databases: [{ name: 'shop', sharded: true, shards: 2, instancesPerShard: 2 }, { name: 'other', instancesPerShard: 1 }] });
  const ports = (s: typeof spec) => new Map(instancesOf(s).map((i) => [i.instanceId, i.port]));
  const { spec: next, instances } = withAddedShardSet(spec, 'shop', 4);
  assert.deepEqual(next.databases[0].shardSets, [4]);
  assert.deepEqual(instances.map((i) => [i.shard, i.cell, i.port]), [
    ['-40', 'zone1', 15432 + 99], ['-40', 'zone2', 15432 + 98], ['40-80', 'zone1', 15432 + 97], ['40-80', 'zone2', 15432 + 96],
    ['80-c0', 'zone1', 15432 + 95], ['80-c0', 'zone2', 15432 + 94], ['c0-', 'zone1', 15432 + 93], ['c0-', 'zone2', 15432 + 92],
  ]);
  for (const [id, port] of ports(spec)) assert.equal(ports(next).get(id), port, `${id} keeps its port`);
  assert.deepEqual(shardsOfSpec(next.databases[0]).map((r) => r.shard), ['-80', '80-', '-40', '40-80', '80-c0', 'c0-']);
  assert.equal(withAddedInstance(next, 'shop', '80-c0', 'zone1').instance.shard, '80-c0');
  // A merge (2 -> 1) is a set too; a count the database has already, a non-power of two or an unsharded database are refused.
  assert.deepEqual(withAddedShardSet(next, 'shop', 1).instances.map((i) => i.shard), ['-', '-']);
  assert.throws(() => withAddedShardSet(next, 'shop', 4), /a set of 4 shards beside shop's: each shard set needs a shard count of its own/);
  assert.throws(() => withAddedShardSet(spec, 'shop', 2), /each shard set needs a shard count of its own/);
  assert.throws(() => withAddedShardSet(spec, 'shop', 3), /must be a power of two/);
  assert.throws(() => withAddedShardSet(spec, 'other', 2), /another shard set needs sharded: true/);
  assert.throws(() => withAddedShardSet(spec, 'nosuch', 2), /the spec has no database nosuch/);
  // up with the spec file (which names no sets) keeps the set and its instances where they are.
  assert.deepEqual(ports(withRuntimeChanges(next, spec)), ports(next));
});

test('retiring a reshard\'s old set (decision 0061): the layout\'s set keeps its slots unused, an added set frees its run-time slots, no other port moves; a second reshard back to the old count; up keeps it retired', () => {
  const spec = parseSpec({ cells: ['zone1', 'zone2'], databases: [{ name: 'shop', sharded: true, shards: 2, instancesPerShard: 2 }, { name: 'other', instancesPerShard: 1 }] });
  const ports = (s: typeof spec) => new Map(instancesOf(s).map((i) => [i.instanceId, i.port]));
  const split = withAddedShardSet(withAddedInstance(spec, 'shop', '-80', 'zone1').spec, 'shop', 4).spec; // with a replica added to the old set too
  const OLD = ['-80', '80-'];
  const NEW = ['-40', '40-80', '80-c0', 'c0-'];
  // Serving sets are refused by the orchestrator; the spec refuses a mix of sets and the last one.
  assert.throws(() => withoutShardSet(split, 'shop', ['-80', '-40']), /-80, -40 are not one shard set of shop/);
  assert.throws(() => withoutShardSet(spec, 'shop', OLD), /are the only shard set of shop/);
  const { spec: retired, retired: changed } = withoutShardSet(split, 'shop', OLD);
  assert.equal(changed, true);
  assert.equal(retired.databases[0].shardsRetired, true);
  assert.deepEqual(shardSetsOf(retired.databases[0]), [4]);
  assert.deepEqual(shardsOfSpec(retired.databases[0]).map((r) => r.shard), NEW);
  assert.deepEqual([...new Set(instancesOf(retired).filter((i) => i.database === 'shop').map((i) => i.shard))], NEW, 'no instance of the old set (nor its added replica) is planned');
  for (const [id, port] of ports(retired)) assert.equal(ports(split).get(id), port, `${id} keeps its port`);
  assert.equal(instancesOf(retired).find((i) => i.database === 'other')!.port, 15432 + 4, 'the next database stays past the retired layout\'s slots');
  // Again (a complete run again after a failure part way): nothing left to change.
  assert.equal(withoutShardSet(retired, 'shop', OLD).retired, false);
  // up with the spec file (shards: 2, nothing retired) keeps it retired and every port where it is.
  assert.deepEqual(ports(withRuntimeChanges(retired, spec)), ports(retired));
  assert.equal(parseSpec(JSON.parse(JSON.stringify(retired))).databases[0].shardsRetired, true, 'the saved spec reads back');
  assert.throws(() => parseSpec({ ...JSON.parse(JSON.stringify(spec)), databases: [{ name: 'shop', sharded: true, shards: 2, shardsRetired: true }] }), /databases\.0\.shardsRetired: a database needs a shard set that is not retired/);

  // A second reshard, 4 -> 2 again: a new set of 2 in run-time slots beside the retired layout's; then the 4 retire.
  const back = withAddedShardSet(retired, 'shop', 2);
  assert.deepEqual(back.instances.map((i) => i.shard), ['-80', '-80', '80-', '80-']);
  assert.deepEqual(back.instances.map((i) => i.port - 15432), [99, 90, 89, 88], 'run-time slots (99: the retired set\'s added replica\'s, free again), not the retired layout\'s');
  for (const [id, port] of ports(retired)) assert.equal(ports(back.spec).get(id), port, `${id} keeps its port`);
  const merged = withoutShardSet(back.spec, 'shop', NEW).spec;
  assert.deepEqual(merged.databases[0].shardSets, [2]);
  assert.deepEqual(instancesOf(merged).filter((i) => i.database === 'shop').map((i) => i.instanceId).sort(), back.instances.map((i) => i.instanceId).sort());
  for (const [id, port] of ports(merged)) assert.equal(ports(back.spec).get(id), port, `${id} keeps its port`);
  // The 4 set's run-time slots are free again: a third reshard to 4 takes them.
  assert.deepEqual(withAddedShardSet(merged, 'shop', 4).instances.map((i) => i.port - 15432).slice(0, 2), [98, 97]);
});
