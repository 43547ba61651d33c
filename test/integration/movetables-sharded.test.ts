/**
 * The materializer reading a sharded source (decision 0051): database `src`
 * has 2 shards (CDC on), with table orders and table items sharded by a hash
 * of id. A writer inserts, updates and deletes rows of both through the
 * gateway all along. Two workflows run at once: `split` moves orders into
 * `quad` (4 shards: each source shard's rows spread over two target shards),
 * `merge` moves items into `one` (1 shard: both source shards' streams
 * interleave in one target). A row planted on a source shard outside its key
 * range is left out by the keyspace-id filter (copy and catch-up). Both
 * copies run from a snapshot per source shard; VDiff is clean; writes switch
 * (every source shard frozen) with no client error; every acknowledged row is
 * on the target exactly once, on the shard its keyspace id names. Then
 * `split` switches its writes back (reverse replication into both source
 * shards) and `merge` completes (the table retired on both source shards).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import fs from 'node:fs';
import path from 'node:path';
import { shardRanges } from '../../compose/spec.ts';
import { hashKeyspaceId, shardFor } from '../../schemas/index.ts';
import { sleep, testCluster, until } from '../support/cluster.ts';
import { textSessions } from '../support/movetables.ts';

const cdc = { enabled: true, heartbeatMs: 1000 };
const cluster = testCluster('mtsharded', 1, { spec: {
  cells: ['zone1'],
  databases: [
    { name: 'src', sharded: true, shards: 2, instancesPerShard: 1, durability: 'ANY_1', cdc },
    { name: 'quad', sharded: true, shards: 4, instancesPerShard: 1, durability: 'ANY_1', cdc },
    { name: 'one', sharded: true, shards: 1, instancesPerShard: 1, durability: 'ANY_1', cdc },
  ],
} });
const { spec, mg, dataDir } = cluster;
const mgOk = (...args: string[]) => cluster.mgOk(...args);
const SHARDS = { src: shardRanges(2), quad: shardRanges(4), one: shardRanges(1) };
const homeOf = (db: keyof typeof SHARDS, id: number | string) => shardFor(hashKeyspaceId(String(id)), SHARDS[db]);
const { portOf, direct, gateway } = textSessions(cluster);
const INITIAL_ROWS = 3_000;
const TABLES = { orders: { target: 'quad', workflow: 'split' }, items: { target: 'one', workflow: 'merge' } } as const;
type Table = keyof typeof TABLES;

const api = async (p: string) => (await fetch(`http://127.0.0.1:${spec.materializer.port}${p}`)).json() as Promise<any>;

/** Per table: each id's last acknowledged note, or null once its delete was acknowledged. */
const acknowledged: Record<Table, Map<number, string | null>> = { orders: new Map(), items: new Map() };
let writing = true;
const writerErrors: unknown[] = [];
let writes = 0;

/** Inserts, updates and deletes rows of both tables through the gateway, one statement at a time, until told to stop. */
async function writer(): Promise<void> {
  const c = await gateway('src');
  const live: Record<Table, number[]> = { orders: [], items: [] };
  let next = 100_001;
  try {
    while (writing) {
      const table: Table = writes % 2 ? 'items' : 'orders';
      const r = writes++ % 10;
      if (r < 6 || live[table].length === 0) {
        const id = next++;
        await c.query(`INSERT INTO ${table} (id, note) VALUES ($1, $2)`, [id, `i${id}`]);
        acknowledged[table].set(id, `i${id}`);
        live[table].push(id);
      } else if (r < 9) {
        const id = live[table][Math.floor(Math.random() * live[table].length)];
        const note = `u${writes}`;
        const res = await c.query(`UPDATE ${table} SET note = $2 WHERE id = $1`, [id, note]);
        assert.equal(res.rowCount, 1, `update of ${table} ${id}`);
        acknowledged[table].set(id, note);
      } else {
        const id = live[table].splice(Math.floor(Math.random() * live[table].length), 1)[0];
        await c.query(`DELETE FROM ${table} WHERE id = $1`, [id]);
        acknowledged[table].set(id, null);
      }
    }
  } catch (err) {
    writerErrors.push(err);
  } finally {
    await c.end();
  }
}

/** A row on src's first shard whose keyspace id the second shard's range holds: left behind, not the first shard's to move. */
const ORPHAN = (() => {
  for (let id = 900_000_000; ; id++) if (homeOf('src', id) === SHARDS.src[1].shard) return id;
})();

before(async () => {
  const began = Date.now();
  let up = await mg('cluster', 'up', ...cluster.flags);
  // Seven shards bootstrap one election each: on a loaded machine that can outlast up's 180 s wait; up again resumes it.
  if (up.code !== 0 && /bootstrap every shard/.test(up.stderr)) up = await mg('cluster', 'up', ...cluster.flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  process.stderr.write(`mg cluster up: ${Date.now() - began} ms\n`);
  const vschema = (tables: Table[]) => {
    const file = path.join(dataDir, `vschema-${tables.join('-')}.yaml`);
    fs.writeFileSync(file, `vindexes:\n  hash: { type: hash }\ntables:\n${tables.map((t) => `  ${t}: { column_vindexes: [{ column: id, name: hash }] }\n`).join('')}`);
    return file;
  };
  await mgOk('vschema', 'apply', 'src', vschema(['orders', 'items']));
  await mgOk('vschema', 'apply', 'quad', vschema(['orders']));
  await mgOk('vschema', 'apply', 'one', vschema(['items']));
  const c = await gateway('src');
  for (const table of Object.keys(TABLES) as Table[]) {
    await c.query(`CREATE TABLE ${table} (id bigint PRIMARY KEY, note text)`);
    for (let first = 1; first <= INITIAL_ROWS; first += 500) {
      const ids = Array.from({ length: 500 }, (_, i) => first + i);
      await c.query(`INSERT INTO ${table} (id, note) VALUES ${ids.map((id) => `(${id}, 'i${id}')`).join(', ')}`);
      for (const id of ids) acknowledged[table].set(id, `i${id}`);
    }
  }
  await c.end();
  const stray = await direct('src', SHARDS.src[0].shard);
  for (const table of Object.keys(TABLES)) await stray.query(`INSERT INTO ${table} (id, note) VALUES ($1, 'left behind')`, [ORPHAN]);
  await stray.end();
});

after(async () => {
  writing = false;
  await mg('cluster', 'down', '--data-dir', dataDir, '--clean');
});

/** Every row of `table` on the target's shards: each acknowledged row exactly once, on the shard its keyspace id names, and nothing else. */
async function assertOnTarget(table: Table): Promise<void> {
  const db = TABLES[table].target;
  const placed = new Map<number, string>();
  for (const { shard } of SHARDS[db]) {
    const c = await direct(db, shard);
    for (const row of (await c.query(`SELECT id, note FROM ${table}`)).rows) {
      assert.ok(!placed.has(Number(row.id)), `${table} ${row.id} is on more than one shard of ${db}`);
      assert.equal(shard, homeOf(db, row.id), `${table} ${row.id} is on ${db}/${shard}, its keyspace id names ${homeOf(db, row.id)}`);
      placed.set(Number(row.id), row.note);
    }
    await c.end();
  }
  assertExactly(table, placed, db);
}

function assertExactly(table: Table, rows: Map<number, string>, where: string): void {
  for (const [id, note] of acknowledged[table]) {
    if (note === null) assert.ok(!rows.has(id), `${table} ${id}: its delete was acknowledged but it is on ${where}`);
    else assert.equal(rows.get(id), note, `${table} ${id}: the acknowledged note ${note} is not on ${where}`);
  }
  assert.equal(rows.size, [...acknowledged[table].values()].filter((n) => n !== null).length, `${where} has rows of ${table} nobody acknowledged`);
}

test('split (2 -> 4 shards) and merge (2 -> 1) from a sharded source under a writer: copy per source shard, VDiff clean, switch with no client error, every row exactly once where its keyspace id names', cluster.explained(async (t) => {
  const writing$ = writer();
  await sleep(1_000);
  for (const [table, { target, workflow }] of Object.entries(TABLES)) {
    await mgOk('workflow', 'create', workflow, '--source', 'src', '--target', target, '--tables', table);
  }
  for (const { workflow } of Object.values(TABLES)) {
    await until(`${workflow} to catch up`, 120_000, async () => (await api(`/v1/workflows/${workflow}`)).phase === 'RUNNING');
    const w = await api(`/v1/workflows/${workflow}`);
    // One copy entry per source shard, each from its own snapshot.
    assert.deepEqual(w.progress.tables.map((e: any) => [e.shard, e.done]), SHARDS.src.map((r) => [r.shard, true]));
    t.diagnostic(`${workflow}: copied ${w.progress.rowsCopied} rows (${w.progress.tables.map((e: any) => `${e.rowsCopied} from ${e.shard}`).join(', ')})`);
  }
  await until('catch-up to apply the writer\'s changes', 30_000, async () =>
    (await Promise.all(Object.values(TABLES).map(async ({ workflow }) => Number((await api(`/v1/workflows/${workflow}`)).progress.eventsApplied)))).every((n) => n > 50));

  for (const { workflow } of Object.values(TABLES)) {
    const vdiff = await mg('workflow', 'vdiff', workflow, '--data-dir', dataDir);
    assert.equal(vdiff.code, 0, vdiff.stdout + vdiff.stderr);
    assert.match(vdiff.stdout, /: clean .*\n.*missing 0, extra 0, different 0/);
    t.diagnostic(`${workflow}: ${vdiff.stdout.trim().split('\n').join(' | ')}`);
  }

  for (const { workflow } of Object.values(TABLES)) {
    const sw = await mg('workflow', 'switch-traffic', workflow, '--data-dir', dataDir);
    assert.equal(sw.code, 0, sw.stderr + sw.stdout);
    assert.match(sw.stdout, /phase SWITCHED, routing TARGET/);
    t.diagnostic(`${workflow}: switch-traffic held the writes ${/held (\d+) ms/.exec(sw.stdout)?.[1]} ms`);
  }
  // Writes on the switched tables run on the target shard their keyspace id names.
  const client = await gateway('src');
  const probe = 950_000_001;
  const onQuad = await client.query("INSERT INTO orders (id, note) VALUES ($1, 'on quad') RETURNING inet_server_port() AS port", [probe]);
  assert.equal(Number(onQuad.rows[0].port), portOf('quad', homeOf('quad', probe)));
  acknowledged.orders.set(probe, 'on quad');
  await sleep(1_500);
  writing = false;
  await writing$;
  assert.deepEqual(writerErrors, [], `the writer saw errors: ${writerErrors.map(String).join('; ')}`);
  t.diagnostic(`the writer made ${writes} writes`);
  for (const table of Object.keys(TABLES) as Table[]) await assertOnTarget(table);

  // split switches back: reverse replication kept both source shards in step, each row on the source shard its keyspace id names.
  const rev = await mg('workflow', 'reverse-traffic', 'split', '--data-dir', dataDir);
  assert.equal(rev.code, 0, rev.stderr + rev.stdout);
  assert.match(rev.stdout, /phase RUNNING, routing SOURCE/);
  const onSource = new Map<number, string>();
  for (const { shard } of SHARDS.src) {
    const c = await direct('src', shard);
    for (const row of (await c.query('SELECT id, note FROM orders WHERE id <> $1', [ORPHAN])).rows) {
      assert.equal(shard, homeOf('src', row.id), `orders ${row.id} came back to src/${shard}`);
      onSource.set(Number(row.id), row.note);
    }
    await c.end();
  }
  assertExactly('orders', onSource, 'src');
  const back = await client.query("UPDATE orders SET note = 'back on src' WHERE id = $1 RETURNING inet_server_port() AS port", [probe]);
  assert.equal(Number(back.rows[0].port), portOf('src', homeOf('src', probe)));

  // merge completes: the table leaves both source shards for mg_moved_merge; clients of src keep reaching items on one.
  const complete = await mg('workflow', 'complete', 'merge', '--data-dir', dataDir);
  assert.equal(complete.code, 0, complete.stderr + complete.stdout);
  for (const { shard } of SHARDS.src) {
    const c = await direct('src', shard);
    const moved = await c.query("SELECT to_regclass('public.items') AS here, to_regclass('mg_moved_merge.items') AS away");
    assert.deepEqual(moved.rows[0], { here: null, away: 'mg_moved_merge.items' }, `src/${shard}`);
    await c.end();
  }
  const { rows: [count] } = await client.query('SELECT count(*) AS n FROM items');
  assert.equal(Number(count.n), [...acknowledged.items.values()].filter((n) => n !== null).length);
  await client.end();
}));
