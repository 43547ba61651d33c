/**
 * Reshard within one database (decision 0056): database `shop` (2 shards, one
 * instance each, CDC on, table orders sharded by a hash of id) is split into 4
 * shards under a writer that inserts, updates and deletes through the gateway,
 * connected to `shop` all along. `mg workflow create --type reshard` brings up
 * the new shard set beside the old one (its own instances, poolers and elected
 * primaries, in run-time port slots: no old instance's port moves) while the
 * gateway keeps routing by the old set (the serving set is pinned to it before
 * the new shards are defined); the copy and catch-up fill the new shards,
 * VDiff is clean, switch-traffic flips the serving set with no client error,
 * every acknowledged row is then exactly once on the new shard its keyspace id
 * names; reverse-traffic flips it back with the same exactness on the old
 * shards; a second switch and `complete` retire the old set (decision 0061):
 * its processes stopped, data directories deleted, shards dropped and
 * instances deregistered on the topology log, the saved spec recording it,
 * while the gateway serves every row from the new set.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { agentName, runDir, savedSpec } from '../../compose/cluster.ts';
import { orchestratorStatus } from '../../compose/orchestrators.ts';
import { poolerName } from '../../compose/proxy.ts';
import { instancesOf, shardRanges, shardSetsOf } from '../../compose/spec.ts';
import { isAlive, readPid } from '../../compose/supervise.ts';
import { applyTopologyEvent, emptyTopology, hashKeyspaceId, shardFor, shardsOf } from '../../schemas/index.ts';
import { sleep, testCluster, until } from '../support/cluster.ts';
import { testEventLog } from '../support/env.ts';

const asText = { getTypeParser: () => (v: string) => v };
const cluster = testCluster('reshard', 2, { spec: {
  cells: ['zone1'],
  databases: [{ name: 'shop', sharded: true, shards: 2, instancesPerShard: 1, durability: 'ANY_1', cdc: { enabled: true, heartbeatMs: 1000 } }],
} });
const { spec, mg, dataDir } = cluster;
const OLD = shardRanges(2);
const NEW = shardRanges(4);
const INITIAL_ROWS = 2_000;
const homeIn = (set: typeof OLD, id: number | string) => shardFor(hashKeyspaceId(String(id)), set);
const api = async (p: string) => (await fetch(`http://127.0.0.1:${spec.materializer.port}${p}`)).json() as Promise<any>;
/** Postgres port of a shard's one instance (the new set's are known once it is in the saved spec). */
const portOf = (shard: string) => instancesOf(savedSpec(dataDir)!).find((i) => i.database === 'shop' && i.shard === shard)!.port;

async function connect(port: number, password?: string): Promise<pg.Client> {
  const c = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', password, database: 'shop', types: asText });
  await c.connect();
  return c;
}
const gateway = () => connect(spec.gateway.port, 'postgres');

/** Whether something accepts TCP connections on the port. */
const listening = (port: number) => new Promise<boolean>((resolve) => {
  const socket = net.connect(port, '127.0.0.1', () => { socket.destroy(); resolve(true); }).on('error', () => resolve(false));
});

/** The topology as a consumer reading the log from the start folds it now. */
async function freshTopology() {
  const eventLog = await testEventLog(cluster.prefix, 'reshard-test');
  const state = emptyTopology();
  const sub = await eventLog.subscribe('topology', (e) => void applyTopologyEvent(state, e));
  await sub.caughtUp;
  await sub.stop();
  await eventLog.close();
  return state;
}

/** The processes (agent, Postgres, pooler), ports and data directory of each instance of a shard set, as they are now. */
function processesOf(shards: string[]) {
  return instancesOf(savedSpec(dataDir)!).filter((i) => i.database === 'shop' && shards.includes(i.shard)).map((i) => ({
    ...i,
    pids: [readPid(runDir(spec), agentName(i.instanceId)), readPid(runDir(spec), poolerName(i.instanceId)), Number(fs.readFileSync(path.join(i.dataDir, 'postmaster.pid'), 'utf8').split('\n')[0])],
  }));
}

/** Each id's last acknowledged note, or null once its delete was acknowledged. */
const acknowledged = new Map<number, string | null>();
/** The Postgres port that answered each acknowledged insert, and when (to check which shard set served it). */
const inserts: Array<{ id: number; port: number; at: number }> = [];
const writerErrors: unknown[] = [];
let writes = 0;
let nextId = 100_001;

/** Inserts, updates and deletes rows through the gateway, one statement at a time, until `stop()` says so. */
function writer(): { stop: () => Promise<void> } {
  let writing = true;
  const done = (async () => {
    const c = await gateway();
    const live = [...acknowledged].filter(([, note]) => note !== null).map(([id]) => id);
    try {
      while (writing) {
        const r = writes++ % 10;
        if (r < 6 || live.length === 0) {
          const id = nextId++;
          const { rows } = await c.query("INSERT INTO orders (id, note) VALUES ($1, 'i') RETURNING inet_server_port() AS port", [id]);
          acknowledged.set(id, 'i');
          inserts.push({ id, port: Number(rows[0].port), at: Date.now() });
          live.push(id);
        } else if (r < 9) {
          const id = live[Math.floor(Math.random() * live.length)];
          const note = `u${writes}`;
          const res = await c.query('UPDATE orders SET note = $2 WHERE id = $1', [id, note]);
          assert.equal(res.rowCount, 1, `update of ${id}`);
          acknowledged.set(id, note);
        } else {
          const id = live.splice(Math.floor(Math.random() * live.length), 1)[0];
          await c.query('DELETE FROM orders WHERE id = $1', [id]);
          acknowledged.set(id, null);
        }
      }
    } catch (err) {
      writerErrors.push(err);
    } finally {
      await c.end();
    }
  })();
  return { stop: async () => { writing = false; await done; } };
}

/** The rows of orders on a set's shards: each exactly once, on the shard of the set its keyspace id names, and exactly the acknowledged ones. */
async function assertExactlyOn(set: typeof OLD, label: string): Promise<void> {
  const rows = new Map<number, string>();
  for (const { shard } of set) {
    const c = await connect(portOf(shard));
    for (const row of (await c.query('SELECT id, note FROM orders')).rows) {
      assert.ok(!rows.has(Number(row.id)), `${row.id} is on more than one ${label} shard`);
      assert.equal(shard, homeIn(set, row.id), `${row.id} is on ${label} shard ${shard}, its keyspace id names ${homeIn(set, row.id)}`);
      rows.set(Number(row.id), row.note);
    }
    await c.end();
  }
  for (const [id, note] of acknowledged) {
    if (note === null) assert.ok(!rows.has(id), `${id}: its delete was acknowledged but it is on the ${label} shards`);
    else assert.equal(rows.get(id), note, `${id}: the acknowledged note ${note} is not on the ${label} shards`);
  }
  assert.equal(rows.size, [...acknowledged.values()].filter((n) => n !== null).length, `the ${label} shards have rows nobody acknowledged`);
}

/** Waits for a workflow's copy and catch-up; a timeout shows where the workflow stands. */
async function untilRunning(name: string, what: string): Promise<void> {
  let view: { phase?: string } = {};
  await until(what, 120_000, async () => (view = await api(`/v1/workflows/${name}`)).phase === 'RUNNING')
    .catch((err: Error) => { throw new Error(`${err.message}; the workflow: ${JSON.stringify(view)}`); });
}

/** Rows given a value in the column added during the reshard. */
const TAGGED = Array.from({ length: 20 }, (_, i) => i + 1);

/** Each tagged row still there carries its value in the added column on the set's shard that holds it. */
async function assertTaggedOn(set: typeof OLD): Promise<void> {
  for (const id of TAGGED) {
    if (acknowledged.get(id) === null) continue; // deleted by the writer
    const c = await connect(portOf(homeIn(set, id)));
    const { rows } = await c.query('SELECT extra FROM orders WHERE id = $1', [id]);
    await c.end();
    assert.equal(rows[0]?.extra, `x${id}`, `row ${id}: the value written in the added column after the DDL`);
  }
}

before(async () => {
  const up = await mg('cluster', 'up', ...cluster.flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  await cluster.applyVSchema('shop', 'vindexes:\n  hash: { type: hash }\ntables:\n  orders: { column_vindexes: [{ column: id, name: hash }] }\n');
  const c = await gateway();
  await c.query('CREATE TABLE orders (id bigint PRIMARY KEY, note text)');
  for (let first = 1; first <= INITIAL_ROWS; first += 500) {
    const ids = Array.from({ length: 500 }, (_, i) => first + i);
    await c.query(`INSERT INTO orders (id, note) VALUES ${ids.map((id) => `(${id}, 'i')`).join(', ')}`);
    for (const id of ids) acknowledged.set(id, 'i');
  }
  await c.end();
});

after(async () => {
  await mg('cluster', 'down', '--data-dir', dataDir, '--clean');
});

test('split 2 -> 4 shards within one database under a writer: new set beside the old, VDiff clean, the serving set switched and switched back with no client error, every row exactly once', cluster.explained(async (t) => {
  const oldPorts = new Map(cluster.instances.map((i) => [i.instanceId, i.port]));
  let w = writer();
  await sleep(500);

  // Refused with the reason: no set of that count beside the serving one, a bad body.
  const post = async (body: unknown) => {
    const r = await fetch(`http://127.0.0.1:${spec.materializer.port}/v1/workflows`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    return { status: r.status, error: ((await r.json()) as { error: string }).error };
  };
  assert.deepEqual(await post({ name: 'early', type: 'reshard', database: 'shop', toShards: 4 }),
    { status: 409, error: 'database shop has no set of 4 shards beside its serving ones (-80, 80-): bring it up first with mg database add-shard-set shop --shards 4' });
  assert.equal((await post({ name: 'early', type: 'reshard', database: 'nosuch', toShards: 4 })).status, 404);
  assert.equal((await post({ name: 'early', type: 'reshard', database: 'shop', source: 'shop', toShards: 4 })).status, 400);

  // The new set comes up beside the old one while the writer goes on; the workflow starts on it.
  const began = Date.now();
  const created = await mg('workflow', 'create', 'split', '--type', 'reshard', '--database', 'shop', '--to-shards', '4', '--data-dir', dataDir);
  assert.equal(created.code, 0, created.stderr + created.stdout);
  assert.match(created.stdout, /Reshard shop: -80, 80- -> -40, 40-80, 80-c0, c0-; tables public\.orders/);
  t.diagnostic(`mg workflow create --type reshard (the new set brought up): ${Date.now() - began} ms`);
  const now = instancesOf(savedSpec(dataDir)!);
  for (const [id, port] of oldPorts) assert.equal(now.find((i) => i.instanceId === id)?.port, port, `${id} keeps its port`);
  assert.deepEqual(now.filter((i) => !oldPorts.has(i.instanceId)).map((i) => i.shard).sort(), NEW.map((r) => r.shard).sort());
  const status = await orchestratorStatus(spec);
  for (const { shard } of NEW) assert.ok(status.shards.find((s) => s.database === 'shop' && s.shard === shard)?.primary, `shop/${shard} has an elected primary`);

  assert.match((await post({ name: 'twice', type: 'reshard', database: 'shop', toShards: 4 })).error, /workflow split reshards shop already/);
  await untilRunning('split', 'the copy and catch-up');
  // DDL through the gateway during the reshard reaches both sets, and the new column's values follow.
  const ddl = await gateway();
  await ddl.query('ALTER TABLE orders ADD COLUMN extra text, ADD COLUMN scratch int');
  for (const { shard } of [...OLD, ...NEW]) {
    const c = await connect(portOf(shard));
    const { rows } = await c.query("SELECT 1 FROM information_schema.columns WHERE table_name = 'orders' AND column_name = 'extra'");
    assert.equal(rows.length, 1, `shard ${shard} has the column the DDL added`);
    await c.end();
  }
  await ddl.query(`UPDATE orders SET extra = 'x' || id WHERE id IN (${TAGGED.join(', ')})`);
  // A column dropped under the writer: the changes still in flight carry it, and the catch-up goes on without it.
  await ddl.query('ALTER TABLE orders DROP COLUMN scratch');
  // A rename is refused while both sets exist: changes in flight would carry a name neither set has.
  await assert.rejects(ddl.query('ALTER TABLE orders RENAME COLUMN extra TO label'), { code: '0A000', message: /RENAME COLUMN while database shop is resharded/ });
  await ddl.end();
  const readsOnly = await mg('workflow', 'switch-traffic', 'split', '--reads-only', '--data-dir', dataDir);
  assert.match(readsOnly.stderr, /a Reshard: it switches reads and writes together/);
  await until('catch-up to apply the writer\'s changes', 30_000, async () => Number((await api('/v1/workflows/split')).progress.eventsApplied) > 50);
  const vdiff = await mg('workflow', 'vdiff', 'split', '--data-dir', dataDir);
  assert.equal(vdiff.code, 0, vdiff.stdout + vdiff.stderr);
  t.diagnostic(`vdiff: ${vdiff.stdout.trim().split('\n').join(' | ')}`);

  // Until the switch, every insert ran on the old shard its keyspace id names.
  const switchAt = Date.now();
  for (const i of inserts) assert.equal(i.port, portOf(homeIn(OLD, i.id)), `insert ${i.id} before the switch ran on the old set`);
  const sw = await mg('workflow', 'switch-traffic', 'split', '--data-dir', dataDir);
  assert.equal(sw.code, 0, sw.stderr + sw.stdout);
  assert.match(sw.stdout, /phase SWITCHED, routing TARGET/);
  t.diagnostic(`switch-traffic held the writes ${/held (\d+) ms/.exec(sw.stdout)?.[1]} ms`);
  await sleep(1_500);
  await w.stop();
  assert.deepEqual(writerErrors, [], `the writer saw errors: ${writerErrors.map(String).join('; ')}`);
  const lately = inserts.filter((i) => i.at > Date.now() - 1_000);
  assert.ok(lately.length > 0, 'inserts after the switch');
  for (const i of lately) assert.equal(i.port, portOf(homeIn(NEW, i.id)), `insert ${i.id} after the switch ran on the new set`);
  await assertExactlyOn(NEW, 'new');
  await assertTaggedOn(NEW);
  t.diagnostic(`${writes} writes, ${inserts.filter((i) => i.at < switchAt).length} inserts before the switch`);

  // reverse-traffic under the writer: reverse replication kept the old shards in step; they serve again.
  w = writer();
  await sleep(1_000);
  const rev = await mg('workflow', 'reverse-traffic', 'split', '--data-dir', dataDir);
  assert.equal(rev.code, 0, rev.stderr + rev.stdout);
  assert.match(rev.stdout, /phase RUNNING, routing SOURCE/);
  t.diagnostic(`reverse-traffic held the writes ${/held (\d+) ms/.exec(rev.stdout)?.[1]} ms`);
  const reversedAt = Date.now();
  await sleep(1_500);
  await w.stop();
  assert.deepEqual(writerErrors, [], `the writer saw errors: ${writerErrors.map(String).join('; ')}`);
  for (const i of inserts.filter((x) => x.at > reversedAt)) assert.equal(i.port, portOf(homeIn(OLD, i.id)), `insert ${i.id} after reverse-traffic ran on the old set`);
  await assertExactlyOn(OLD, 'old');

  // Switched again and completed: the old set is retired; clients read every row from the new set.
  const again = await mg('workflow', 'switch-traffic', 'split', '--data-dir', dataDir);
  assert.equal(again.code, 0, again.stderr + again.stdout);
  const old = processesOf(OLD.map((r) => r.shard));
  assert.equal(old.length, 2);
  const newPorts = new Map(processesOf(NEW.map((r) => r.shard)).map((i) => [i.instanceId, i.port]));
  const completeBegan = Date.now();
  const complete = await mg('workflow', 'complete', 'split', '--data-dir', dataDir);
  assert.equal(complete.code, 0, complete.stderr + complete.stdout);
  t.diagnostic(`mg workflow complete: ${Date.now() - completeBegan} ms, of which retiring the old set ${/retire-shards shop: done in ([\d.]+ s)/.exec(complete.stdout)?.[1]}`);
  // Its progress, step by step: the shards dropped, each instance stopped and deleted, then deregistered.
  assert.match(complete.stdout, /ShardDropped shop\/-80, shop\/80-/);
  for (const i of old) assert.match(complete.stdout, new RegExp(`${i.instanceId}: data directory .* removed`));
  assert.match(complete.stdout, /their instances are deregistered/);
  for (const i of old) {
    for (const pid of i.pids) assert.equal(isAlive(pid!), false, `${i.instanceId}: process ${pid} is gone`);
    for (const port of [i.port, i.poolerPort]) assert.equal(await listening(port), false, `${i.instanceId}: nothing listens on ${port}`);
    assert.equal(fs.existsSync(i.dataDir), false, `${i.instanceId}: ${i.dataDir} is deleted`);
  }
  const topology = await freshTopology();
  assert.deepEqual(shardsOf(topology, 'shop').map((s) => s.shard).sort(), NEW.map((r) => r.shard).sort(), 'the log defines only the new shards');
  for (const i of old) assert.equal(topology.instances.has(i.instanceId), false, `${i.instanceId} is deregistered`);
  for (const { shard } of OLD) assert.equal(topology.primaries.has(`shop/${shard}`), false, `shop/${shard} has no primary left`);
  const managed = (await orchestratorStatus(spec)).shards.filter((s) => s.database === 'shop').map((s) => s.shard).sort();
  assert.deepEqual(managed, NEW.map((r) => r.shard).sort(), 'MultiOrch manages the new shards only');
  const saved = savedSpec(dataDir)!.databases[0];
  assert.deepEqual([saved.shardsRetired, shardSetsOf(saved)], [true, [4]], 'the saved spec records the retirement');
  for (const [id, port] of newPorts) assert.equal(processesOf(NEW.map((r) => r.shard)).find((i) => i.instanceId === id)?.port, port, `${id} keeps its port`);
  // Run again (as after a failure part way): nothing left to do, and it says so.
  const rerun = await mg('workflow', 'complete', 'split', '--data-dir', dataDir);
  assert.equal(rerun.code, 0, rerun.stderr + rerun.stdout);
  assert.match(rerun.stdout, /retired already/);
  const g = await gateway();
  assert.equal(Number((await g.query('SELECT count(*) AS n FROM orders')).rows[0].n), [...acknowledged.values()].filter((n) => n !== null).length);
  // Once the old set is retired, a rename runs as any DDL (and is undone for the merge below).
  await g.query('ALTER TABLE orders RENAME COLUMN extra TO label');
  const labelled = (await g.query("SELECT id FROM orders WHERE label = 'x' || id ORDER BY id")).rows.map((r) => Number(r.id));
  assert.deepEqual(labelled, TAGGED.filter((id) => acknowledged.get(id) !== null), 'the tagged rows, read under the new name on every shard');
  await g.query('ALTER TABLE orders RENAME COLUMN label TO extra');
  await g.end();
  await assertExactlyOn(NEW, 'new');
}));

test('merge the 4 shards into 1 under a writer: the serving set switches with no client error, every row exactly once on the one shard', cluster.explained(async (t) => {
  const ONE = shardRanges(1);
  const w = writer();
  const created = await mg('workflow', 'create', 'merge', '--type', 'reshard', '--database', 'shop', '--to-shards', '1', '--data-dir', dataDir);
  assert.equal(created.code, 0, created.stderr + created.stdout);
  assert.match(created.stdout, /Reshard shop: -40, 40-80, 80-c0, c0- -> -;/);
  await untilRunning('merge', 'the merge\'s copy and catch-up');
  const sw = await mg('workflow', 'switch-traffic', 'merge', '--data-dir', dataDir);
  assert.equal(sw.code, 0, sw.stderr + sw.stdout);
  t.diagnostic(`switch-traffic (4 -> 1) held the writes ${/held (\d+) ms/.exec(sw.stdout)?.[1]} ms`);
  const switchedAt = Date.now();
  await sleep(1_500);
  await w.stop();
  assert.deepEqual(writerErrors, [], `the writer saw errors: ${writerErrors.map(String).join('; ')}`);
  for (const i of inserts.filter((x) => x.at > switchedAt + 500)) assert.equal(i.port, portOf('-'), `insert ${i.id} after the merge ran on the one shard`);
  await assertExactlyOn(ONE, 'merged');
  const complete = await mg('workflow', 'complete', 'merge', '--data-dir', dataDir);
  assert.equal(complete.code, 0, complete.stderr + complete.stdout);
  t.diagnostic(`retiring the 4 shards: ${/retire-shards shop: done in ([\d.]+ s)/.exec(complete.stdout)?.[1]}`);
  // The 4 shards (an added set) are retired too: only the one shard is left, in the spec and on the log.
  assert.deepEqual(shardSetsOf(savedSpec(dataDir)!.databases[0]), [1]);
  assert.deepEqual(shardsOf(await freshTopology(), 'shop').map((s) => s.shard), ['-']);
  await assertExactlyOn(ONE, 'merged');
}));
