/**
 * MoveTables switch-traffic and reverse-traffic end to end: an unsharded
 * source database with CDC on, table orders moved into a 2-shard database
 * (CDC on too: reverse replication reads it) while three clients write to it
 * through the gateway (one with bind parameters, one with plain SQL, one with
 * the REST API, which follows the routing rules too). Reads
 * switch first; a statement mixing the moved table with one that stays is
 * refused with 0A000. Then, with the writers going on all along: writes switch
 * to the target (the rows written there are served by the target shards and
 * reach the source by reverse replication, while the source still refuses
 * clients); a reverse-traffic that cannot freeze a target shard rolls back;
 * then writes switch back to the source; neither writer sees an error, the
 * source holds exactly the acknowledged rows, and the target follows the
 * source again (VDiff clean). Writes switch once more, the target holds
 * exactly the acknowledged rows on the shards their vindex names; a
 * truncate on one target shard removes only that shard's rows from the
 * source; complete retires the source table.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { hashKeyspaceId, shardFor } from '../../schemas/index.ts';
import { sleep, until } from '../support/cluster.ts';
import { moveTablesCluster } from '../support/movetables.ts';

const httpPort = Number(process.env.MG_TEST_PORT_BASE ?? 30_000) + 2 * 500 + 402;
const mt = moveTablesCluster('switch', 2, { 'gateway.httpPort': httpPort, 'gateway.restAnonRole': 'web_anon' }, { targetCdc: true });
const { cluster, ranges: RANGES, portOf, direct, gateway } = mt;
const { spec, mg, dataDir } = cluster;
const INITIAL_ROWS = 5_000;

const api = async (p: string, method = 'GET', body?: unknown) => {
  const res = await fetch(`http://127.0.0.1:${spec.materializer.port}${p}`, {
    method, headers: body === undefined ? {} : { 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() as any };
};
const homeOf = (id: number | string) => shardFor(hashKeyspaceId(String(id)), RANGES);

/** Each id's last acknowledged note, or null once its delete was acknowledged; shared by the writers (disjoint ids). */
const acknowledged = new Map<number, string | null>();
/** The Postgres port that answered each acknowledged insert (INSERT ... RETURNING inet_server_port()), with when it was acknowledged. */
const insertedOn = new Map<number, { port: number; at: number }>();
let writing = false;
const writerErrors: unknown[] = [];
let slowest = 0;

/** A writer's three writes; `insert` answers the Postgres port that ran it when the client can see it. */
interface Writes {
  insert(id: number, note: string): Promise<number | undefined>;
  update(id: number, note: string): Promise<boolean>;
  remove(id: number): Promise<void>;
  close(): Promise<void>;
}

/** Writes through the wire protocol, with bind parameters or as plain SQL. */
async function wireWrites(withParams: boolean): Promise<Writes> {
  const c = await gateway('src');
  const q = (text: string, values: unknown[]) => (withParams ? c.query(text, values) : c.query(inline(text, values)));
  return {
    insert: async (id, note) => Number((await q('INSERT INTO orders (id, customer, note) VALUES ($1, $2, $3) RETURNING inet_server_port() AS port', [id, `c${id % 7}`, note])).rows[0].port),
    update: async (id, note) => (await q('UPDATE orders SET note = $2 WHERE id = $1', [id, note])).rowCount === 1,
    remove: async (id) => void await q('DELETE FROM orders WHERE id = $1', [id]),
    close: () => c.end(),
  };
}

/** Writes through the gateway's REST API on src, as PostgREST clients make them. */
function restWrites(): Writes {
  const call = async (method: string, query: string, body?: unknown, prefer?: string) => {
    const r = await fetch(`http://127.0.0.1:${httpPort}/src/orders${query}`, {
      method, headers: { 'content-type': 'application/json', ...(prefer ? { prefer } : {}) }, body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!r.ok) throw new Error(`REST ${method} /src/orders${query}: ${r.status} ${await r.text()}`);
    return r;
  };
  return {
    insert: async (id, note) => void await call('POST', '', { id, customer: `c${id % 7}`, note }),
    update: async (id, note) => (await (await call('PATCH', `?id=eq.${id}`, { note }, 'return=representation')).json() as unknown[]).length === 1,
    remove: async (id) => void await call('DELETE', `?id=eq.${id}`),
    close: async () => undefined,
  };
}

const WRITERS = 3;

/** Inserts, updates and deletes its own ids (`first`, first + WRITERS, ...) until told to stop; records what was acknowledged and how long each write took. */
async function writer(first: number, writes$: Promise<Writes> | Writes): Promise<number> {
  const w = await writes$;
  const mine: number[] = [];
  let next = first;
  let writes = 0;
  try {
    while (writing) {
      const began = performance.now();
      const r = writes++ % 10;
      if (r < 6) {
        const id = next;
        next += WRITERS;
        const port = await w.insert(id, `i${id}`);
        acknowledged.set(id, `i${id}`);
        if (port !== undefined) insertedOn.set(id, { port, at: Date.now() });
        mine.push(id);
      } else if (r < 9 && mine.length) {
        const id = mine[Math.floor(Math.random() * mine.length)];
        const note = `u${first}-${writes}`;
        if (await w.update(id, note)) acknowledged.set(id, note);
      } else if (mine.length) {
        const id = mine.splice(Math.floor(Math.random() * mine.length), 1)[0];
        await w.remove(id);
        acknowledged.set(id, null);
      }
      slowest = Math.max(slowest, performance.now() - began);
    }
  } catch (err) {
    writerErrors.push(err);
  } finally {
    await w.close();
  }
  return writes;
}

/** The statement with its $n replaced by SQL literals (the simple-protocol writer). */
const inline = (text: string, values: unknown[]) => text.replace(/\$(\d+)/g, (_m, n) => {
  const v = values[Number(n) - 1];
  return typeof v === 'number' ? String(v) : `'${String(v).replace(/'/g, "''")}'`;
});

before(async () => {
  await mt.up();
  const c = await gateway('src');
  await c.query('CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, note text)');
  await c.query('CREATE TABLE customers (name text PRIMARY KEY, city text)');
  await c.query(`INSERT INTO orders SELECT g, 'c' || (g % 7), 'i' || g FROM generate_series(1, ${INITIAL_ROWS}) g`);
  await c.query("INSERT INTO customers SELECT 'c' || g, 'city' || g FROM generate_series(0, 6) g");
  await c.query('CREATE ROLE web_anon NOLOGIN');
  await c.query('GRANT ALL ON orders TO web_anon');
  await c.end();
  const d = await gateway('dst');
  await d.query('CREATE ROLE web_anon NOLOGIN'); // the workflow creates dst's orders; the grant follows it below
  await d.end();
  for (let id = 1; id <= INITIAL_ROWS; id++) acknowledged.set(id, `i${id}`);
});

after(async () => {
  writing = false;
  await mg('cluster', 'down', '--data-dir', dataDir, '--clean');
});

test('switch-traffic and reverse-traffic under three writers (two wire-protocol, one REST): no client error, no lost row either way; switch again and complete', cluster.explained(async (t) => {
  const created = await mg('workflow', 'create', 'mt', '--source', 'src', '--target', 'dst', '--tables', 'orders', '--data-dir', dataDir);
  assert.equal(created.code, 0, created.stderr);
  await until('catch-up to begin', 120_000, async () => (await api('/v1/workflows/mt')).body.phase === 'RUNNING');
  assert.equal((await api('/v1/workflows/mt')).body.routing, 'SOURCE');
  const d = await gateway('dst');
  await d.query('GRANT ALL ON orders TO web_anon');
  await d.end();

  const switchedEarly = await api('/v1/workflows/mt/complete', 'POST');
  assert.equal(switchedEarly.status, 409);
  assert.match(switchedEarly.body.error, /complete needs its writes switched/);

  writing = true;
  const writers = [writer(INITIAL_ROWS + 1, wireWrites(true)), writer(INITIAL_ROWS + 2, wireWrites(false)), writer(INITIAL_ROWS + 3, restWrites())];
  await sleep(1_500);

  // Reads first: a read of the moved table is answered by the target shard its vindex names; writes still go to the source.
  const reads = await mg('workflow', 'switch-traffic', 'mt', '--reads-only', '--data-dir', dataDir);
  assert.equal(reads.code, 0, reads.stderr + reads.stdout);
  assert.match(reads.stdout, /routing READS_TARGET/);
  const client = await gateway('src');
  const probe = 17;
  const read = await client.query('SELECT inet_server_port() AS port, note FROM orders WHERE id = $1', [probe]);
  assert.equal(Number(read.rows[0].port), portOf('dst', homeOf(probe)), 'a read after switch-traffic --reads-only is answered by the target shard');
  const written = await client.query("UPDATE orders SET note = 'still on the source' WHERE id = $1 RETURNING inet_server_port() AS port", [probe]);
  assert.equal(Number(written.rows[0].port), portOf('src', '-'), 'writes stay on the source until they are switched');
  acknowledged.set(probe, 'still on the source');

  // A statement naming a moved table and one that stays cannot be answered by one database.
  await assert.rejects(client.query('SELECT count(*) FROM orders o JOIN customers c ON c.name = o.customer'),
    (err: any) => err.code === '0A000' && /public\.orders/.test(err.message) && /public\.customers/.test(err.message));
  const stays = await client.query('SELECT inet_server_port() AS port, count(*) AS n FROM customers GROUP BY 1');
  assert.equal(Number(stays.rows[0].port), portOf('src', '-'));
  assert.equal(stays.rows[0].n, '7');

  // Writes, while the writers go on.
  const sw = await mg('workflow', 'switch-traffic', 'mt', '--data-dir', dataDir);
  const switchedAt = Date.now(); // the command returns once the rule serves the target
  assert.equal(sw.code, 0, sw.stderr + sw.stdout);
  assert.match(sw.stdout, /phase SWITCHED, routing TARGET/);
  const heldMs = Number(/held (\d+) ms/.exec(sw.stdout)?.[1]);
  t.diagnostic(`switch-traffic: writes held ${heldMs} ms by the materializer; slowest client write ${Math.round(slowest)} ms`);
  assert.ok(heldMs < 3_000, `writes were held ${heldMs} ms`);

  // A write after the switch runs on the target, and reverse replication brings it to the source, which still refuses clients.
  const probeOnTarget = 900_000_001;
  const onTarget = await client.query("INSERT INTO orders (id, customer, note) VALUES ($1, 'c1', 'written on dst') RETURNING inet_server_port() AS port", [probeOnTarget]);
  assert.equal(Number(onTarget.rows[0].port), portOf('dst', homeOf(probeOnTarget)));
  acknowledged.set(probeOnTarget, 'written on dst');
  const source = await direct('src', '-');
  await until('the row written on the target to reach the source', 30_000, async () =>
    (await source.query('SELECT note FROM orders WHERE id = $1', [probeOnTarget])).rows[0]?.note === 'written on dst');
  await assert.rejects(source.query("INSERT INTO orders (id, customer) VALUES (999999999, 'x')"),
    (err: any) => err.code === '55MG1' && /moved to database dst/.test(err.message));
  const reversing = (await api('/v1/workflows/mt')).body;
  assert.equal(reversing.phase, 'SWITCHED');
  assert.ok(Number(reversing.progress.eventsApplied) > 0, `reverse replication applied ${reversing.progress.eventsApplied} changes`);
  t.diagnostic(`reverse replication: ${reversing.progress.eventsApplied} changes applied, lag ${reversing.progress.lagSeconds} s`);
  const shown = await mg('workflow', 'show', 'mt', '--data-dir', dataDir);
  assert.match(shown.stdout, /reverse replication \(target to source\): [1-9]\d* changes applied/);
  await sleep(1_500);

  // A reverse-traffic that cannot freeze a target shard (a transaction holds its table past the lock timeout) rolls back:
  // traffic stays on the target and reverse replication goes on; the writers see no error.
  const blocker = await direct('dst', RANGES[0].shard);
  await blocker.query('BEGIN');
  await blocker.query('LOCK TABLE orders IN ROW EXCLUSIVE MODE');
  const blocked = await mg('workflow', 'reverse-traffic', 'mt', '--data-dir', dataDir);
  await blocker.query('ROLLBACK');
  await blocker.end();
  assert.equal(blocked.code, 1, blocked.stdout + blocked.stderr);
  assert.match(blocked.stderr, /reverse-traffic failed, traffic stays on dst: .*lock timeout/);
  const rolledBack = (await api('/v1/workflows/mt')).body;
  assert.equal(rolledBack.phase, 'SWITCHED');
  assert.equal(rolledBack.routing, 'TARGET');
  const stillOnTarget = await client.query("UPDATE orders SET note = 'after a failed reverse' WHERE id = $1 RETURNING inet_server_port() AS port", [probeOnTarget]);
  assert.equal(Number(stillOnTarget.rows[0].port), portOf('dst', homeOf(probeOnTarget)));
  acknowledged.set(probeOnTarget, 'after a failed reverse');
  await until('reverse replication to go on after the failed reverse-traffic', 30_000, async () =>
    (await source.query('SELECT note FROM orders WHERE id = $1', [probeOnTarget])).rows[0]?.note === 'after a failed reverse');

  // Writes switch back to the source while the writers go on.
  const reverseAskedAt = Date.now();
  const rev = await mg('workflow', 'reverse-traffic', 'mt', '--data-dir', dataDir);
  const reversedAt = Date.now();
  assert.equal(rev.code, 0, rev.stderr + rev.stdout);
  assert.match(rev.stdout, /phase RUNNING, routing SOURCE/);
  const reverseHeldMs = Number(/held (\d+) ms/.exec(rev.stdout)?.[1]);
  t.diagnostic(`reverse-traffic: writes held ${reverseHeldMs} ms by the materializer`);
  assert.ok(reverseHeldMs < 3_000, `writes were held ${reverseHeldMs} ms`);
  await sleep(2_000);
  writing = false;
  const writes = await Promise.all(writers);
  assert.deepEqual(writerErrors, [], `the writers saw errors: ${writerErrors.map(String).join('; ')}`);
  assert.ok(writes.every((n) => n > 100), `writes: ${writes.join(', ')}`);
  t.diagnostic(`writers made ${writes.join(' + ')} writes; the slowest took ${Math.round(slowest)} ms`);

  // Inserts between the two switches ran on the target shards, those after the switch back on the source.
  const between = [...insertedOn].filter(([, v]) => v.at > switchedAt && v.at < reverseAskedAt);
  const afterBack = [...insertedOn].filter(([, v]) => v.at > reversedAt);
  assert.ok(between.length > 10 && afterBack.length > 10, `${between.length} inserts on the target, ${afterBack.length} after the switch back`);
  for (const [id, { port }] of between) assert.equal(port, portOf('dst', homeOf(id)), `insert ${id} after the switch ran on port ${port}`);
  for (const [id, { port }] of afterBack) assert.equal(port, portOf('src', '-'), `insert ${id} after the switch back ran on port ${port}`);

  // The source holds exactly the acknowledged rows: nothing written on the target was lost by switching back.
  const onSource = new Map((await source.query('SELECT id, note FROM orders')).rows.map((r) => [Number(r.id), r.note]));
  assertExactly(onSource, 'the source');

  // The target follows the source again.
  const vdiff = await mg('workflow', 'vdiff', 'mt', '--data-dir', dataDir);
  assert.equal(vdiff.code, 0, vdiff.stdout + vdiff.stderr);
  assert.match(vdiff.stdout, /: clean .*\n.*missing 0, extra 0, different 0/);

  // Switch once more (idle now): the target holds exactly the acknowledged rows, each on the shard its vindex names.
  const again = await mg('workflow', 'switch-traffic', 'mt', '--data-dir', dataDir);
  assert.equal(again.code, 0, again.stderr + again.stdout);
  assert.match(again.stdout, /phase SWITCHED, routing TARGET/);
  const targets = new Map(await Promise.all(RANGES.map(async (r) => [r.shard, await direct('dst', r.shard)] as const)));
  const placed = new Map<number, string>();
  for (const [shard, c] of targets) {
    for (const row of (await c.query('SELECT id, note FROM orders')).rows) {
      assert.ok(!placed.has(Number(row.id)), `row ${row.id} is on more than one target shard`);
      assert.equal(shard, homeOf(row.id), `row ${row.id} is on the wrong shard`);
      placed.set(Number(row.id), row.note);
    }
  }
  assertExactly(placed, 'the target');

  // A truncate on one target shard (as a target failover's re-snapshot begins) removes only that shard's rows from the source.
  const [emptied, kept] = RANGES.map((r) => r.shard);
  await targets.get(emptied)!.query('TRUNCATE orders');
  const keptIds = [...placed.keys()].filter((id) => homeOf(id) === kept).sort((a, b) => a - b);
  await until(`the source to lose the rows of ${emptied}`, 30_000, async () =>
    (await source.query('SELECT count(*) AS n FROM orders')).rows[0].n === String(keptIds.length));
  const left = (await source.query('SELECT id FROM orders ORDER BY id')).rows.map((r) => Number(r.id));
  assert.deepEqual(left, keptIds, `the source keeps exactly the rows of ${kept}`);

  // complete: the source table leaves for mg_moved_mt; clients of src keep reaching orders on dst; no positions are left.
  const complete = await mg('workflow', 'complete', 'mt', '--data-dir', dataDir);
  assert.equal(complete.code, 0, complete.stderr + complete.stdout);
  assert.match(complete.stdout, /phase COMPLETED/);
  const moved = await source.query("SELECT to_regclass('public.orders') AS here, to_regclass('mg_moved_mt.orders') AS away");
  assert.equal(moved.rows[0].here, null);
  assert.equal(moved.rows[0].away, 'mg_moved_mt.orders');
  const { rows: [count] } = await client.query('SELECT count(*) AS n FROM orders');
  assert.equal(Number(count.n), keptIds.length);
  const viaRest = await fetch(`http://127.0.0.1:${httpPort}/src/orders?id=eq.${keptIds[0]}&select=id`);
  assert.equal(viaRest.status, 200, 'a REST read of src.orders is answered by dst once the table left src');
  assert.deepEqual(await viaRest.json(), [{ id: keptIds[0] }]);
  for (const c of [source, ...targets.values()]) {
    const positions = await c.query("SELECT count(*) AS n FROM mg_materializer.positions WHERE workflow = 'mt'");
    assert.equal(positions.rows[0].n, '0');
  }
  await client.end();
  await source.end();
  await Promise.all([...targets.values()].map((c) => c.end()));
}));

/** `rows` (id -> note) is exactly the acknowledged rows: every acknowledged note, no row whose delete was acknowledged, nothing else. */
function assertExactly(rows: Map<number, string>, where: string): void {
  for (const [id, note] of acknowledged) {
    if (note === null) assert.ok(!rows.has(id), `row ${id}: its delete was acknowledged but it is on ${where}`);
    else assert.equal(rows.get(id), note, `row ${id}: the acknowledged note ${note} is not on ${where}`);
  }
  assert.equal(rows.size, [...acknowledged.values()].filter((n) => n !== null).length, `${where} has rows nobody acknowledged`);
}
