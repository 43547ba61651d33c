/**
 * MoveTables end to end: an unsharded source database with CDC on, a table
 * under a continuous writer through the gateway, moved into a 2-shard
 * database with `mg workflow create`; copy, then catch-up; the materializer
 * killed with SIGKILL during the copy and again during catch-up, and started
 * again by `mg cluster up` each time.
 * Afterwards every acknowledged write is on the shard its vindex names, no
 * row is lost, doubled or misplaced, and the target equals the source.
 * VDiff reports clean, then finds a row changed on a target shard behind the
 * materializer's back.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { readPid } from '../../compose/supervise.ts';
import { hashKeyspaceId, shardFor } from '../../schemas/index.ts';
import { sleep, until } from '../support/cluster.ts';
import { moveTablesCluster, statusHistory, targetHoldsSource } from '../support/movetables.ts';

const PAGE_ROWS = 500;
const mt = moveTablesCluster('materializer', 1, { 'materializer.pageRows': PAGE_ROWS });
const { cluster, ranges: RANGES, direct, gateway } = mt;
const { spec, flags, mg, dataDir } = cluster;
const INITIAL_ROWS = 20_000;

const api = async (p: string) => (await fetch(`http://127.0.0.1:${spec.materializer.port}${p}`)).json() as Promise<any>;
const phaseOf = async (name: string) => (await api(`/v1/workflows/${name}`)).phase as string;

/** kill -9 of the materializer; `whileDown` runs before it is started again. */
async function killAndRestartMaterializer(whileDown: () => Promise<unknown> = async () => {}): Promise<void> {
  const pid = readPid(path.join(dataDir, 'run'), 'materializer');
  assert.ok(pid, 'the materializer runs');
  process.kill(pid!, 'SIGKILL');
  await whileDown();
  await sleep(1_000); // the writer goes on meanwhile
  const again = await mg('cluster', 'up', ...flags);
  assert.equal(again.code, 0, again.stderr + again.stdout);
}

/** What the writer was told: each id's last acknowledged note, or null once its delete was acknowledged. */
const acknowledged = new Map<number, string | null>();
let writing = true;
let writerError: unknown;
let writes = 0;

async function writer(): Promise<void> {
  const c = await gateway('src');
  let next = INITIAL_ROWS + 1;
  try {
    while (writing) {
      const r = writes++ % 10;
      if (r < 6) {
        const id = next++;
        await c.query('INSERT INTO orders (id, customer, amount, note, updated_at) VALUES ($1, $2, $3, $4, now())', [id, `c${id % 97}`, (id % 1000) / 4, `i${id}`]);
        acknowledged.set(id, `i${id}`);
      } else if (r < 9) {
        const id = 1 + Math.floor(Math.random() * (next - 1));
        const note = `u${writes}`;
        const res = await c.query('UPDATE orders SET note = $2, amount = amount + 1, updated_at = now() WHERE id = $1', [id, note]);
        if (res.rowCount === 1) acknowledged.set(id, note);
      } else {
        const id = 1 + Math.floor(Math.random() * (next - 1));
        await c.query('DELETE FROM orders WHERE id = $1', [id]);
        acknowledged.set(id, null);
      }
    }
  } catch (err) {
    writerError = err;
  } finally {
    await c.end();
  }
}

before(async () => {
  await mt.up();
  const c = await gateway('src');
  await c.query('CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(10,2) NOT NULL, note text, updated_at timestamp)');
  await c.query(`INSERT INTO orders SELECT g, 'c' || (g % 97), (g % 1000) / 4.0, 'i' || g, now() FROM generate_series(1, ${INITIAL_ROWS}) g`);
  await c.end();
  for (let id = 1; id <= INITIAL_ROWS; id++) acknowledged.set(id, `i${id}`);
});

after(async () => {
  writing = false;
  await mg('cluster', 'down', '--data-dir', dataDir, '--clean');
});

test('a bad workflow request is refused with a message naming the fault', cluster.explained(async () => {
  const noVindex = await mg('workflow', 'create', 'bad', '--source', 'src', '--target', 'dst', '--tables', 'customers', '--data-dir', dataDir);
  assert.equal(noVindex.code, 1);
  assert.match(noVindex.stderr, /VSchema of dst must name table customers/);
  const noDb = await mg('workflow', 'create', 'bad', '--source', 'nope', '--target', 'dst', '--tables', 'orders', '--data-dir', dataDir);
  assert.equal(noDb.code, 1);
  assert.match(noDb.stderr, /database nope does not exist/);
  const unknown = await mg('workflow', 'show', 'nope', '--data-dir', dataDir);
  assert.equal(unknown.code, 1);
  assert.match(unknown.stderr, /workflow nope does not exist/);
}));

test('MoveTables under writes, with kill -9 in the copy and in catch-up: every acknowledged row on its shard, VDiff clean, then a tampered row found', cluster.explained(async (t) => {
  // The copy outruns any poll, so it is held in the middle: a transaction on the target shard of the middle
  // row inserts that row and stays open; the copy's write of the page holding it waits for that transaction.
  const middle = INITIAL_ROWS / 2;
  const middleShard = shardFor(hashKeyspaceId(middle), RANGES);
  const holder = await direct('dst', middleShard);
  const watcher = await direct('dst', middleShard);
  await holder.query('CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(10,2) NOT NULL, note text, updated_at timestamp)');
  await holder.query('BEGIN');
  await holder.query("INSERT INTO orders (id, customer, amount) VALUES ($1, 'holder', 0)", [middle]);

  const writing$ = writer();
  await sleep(1_000);
  const created = await mg('workflow', 'create', 'mt', '--source', 'src', '--target', 'dst', '--tables', 'orders', '--data-dir', dataDir);
  assert.equal(created.code, 0, created.stderr);

  // kill -9 in the copy phase, pages in: the copy resumes after the last page it recorded.
  await until('the copy to wait at the middle row', 60_000, async () => {
    const w = await api('/v1/workflows/mt');
    const { rows: [{ n }] } = await watcher.query<{ n: number }>(
      "SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = 'mg-materializer-mt' AND wait_event_type = 'Lock'");
    return w.phase === 'COPYING' && Number(w.progress.rowsCopied) >= 2 * PAGE_ROWS && n > 0;
  });
  const beforeKill = Number((await api('/v1/workflows/mt')).progress.rowsCopied);
  assert.ok(beforeKill < INITIAL_ROWS, `the copy was at ${beforeKill} rows when killed`);
  // The killed process's write then ends (COPY rolls back unless it was all sent); the restarted copy may meet its rows.
  await killAndRestartMaterializer(() => holder.query('ROLLBACK'));
  await Promise.all([holder.end(), watcher.end()]);
  t.diagnostic(`killed in the copy at ${beforeKill} of ${INITIAL_ROWS} rows`);
  await until('the copy to finish and catch-up to begin', 120_000, async () => (await phaseOf('mt')) === 'RUNNING');
  const copyKeys = (await statusHistory(cluster.prefix, 'mt')).filter((s) => s.phase === 'COPYING' && s.tables[0]?.lastKey).map((s) => Number(JSON.parse(s.tables[0].lastKey!)[0]));
  assert.ok(copyKeys.length >= INITIAL_ROWS / PAGE_ROWS, `${copyKeys.length} copy pages recorded`);
  copyKeys.forEach((k, i) => assert.ok(i === 0 || k >= copyKeys[i - 1], `the copy went back from key ${copyKeys[i - 1]} to ${k}: it restarted instead of resuming`));
  const afterCopy = await api('/v1/workflows/mt');
  assert.ok(Number(afterCopy.progress.rowsCopied) >= INITIAL_ROWS, `rows copied: ${afterCopy.progress.rowsCopied}`);
  assert.equal(afterCopy.progress.tables[0].done, true);
  // The page the killed process was writing is on the target (its other shard's part, and this one once the holder let go): the restarted copy met those rows and upserted them.
  const copyMetrics = await (await fetch(`http://127.0.0.1:${spec.materializer.port}/metrics`)).text();
  assert.match(copyMetrics, /mg_materializer_copy_parts_upserted_total\{table="public.orders"\} [1-9]/);
  t.diagnostic(`copy: ${afterCopy.progress.rowsCopied} rows at ${Math.round(afterCopy.progress.rowsPerSecond)} rows/s`);

  // Catch-up applies the writer's changes; then the materializer dies mid-stream.
  await until('changes applied in catch-up', 30_000, async () => Number((await api('/v1/workflows/mt')).progress.eventsApplied) > 200);
  await killAndRestartMaterializer();
  await until('the workflow to run again after the restart', 60_000, async () => (await phaseOf('mt')) === 'RUNNING');
  await sleep(2_000);

  writing = false;
  await writing$;
  assert.equal(writerError, undefined, `the writer failed: ${writerError}`);
  assert.ok(writes > 500, `the writer made ${writes} writes`);

  // The target converges to the source: the same rows, each on the shard its vindex names.
  const source = await direct('src', '-');
  const targets = new Map(await Promise.all(RANGES.map(async (r) => [r.shard, await direct('dst', r.shard)] as const)));
  const { sourceRows, targetRows } = await targetHoldsSource(source, targets, RANGES, 'id, customer, amount, note, updated_at');
  for (const [id, note] of acknowledged) {
    const copy = targetRows.get(String(id));
    if (note === null) assert.equal(copy, undefined, `row ${id} was deleted (acknowledged) but is on the target`);
    else assert.equal(copy?.note, note, `row ${id}: the acknowledged note ${note} is not on the target`);
  }

  // Progress is visible in the CLI, REST and /metrics.
  const list = await mg('workflow', 'list', '--data-dir', dataDir);
  assert.equal(list.code, 0, list.stderr);
  assert.match(list.stdout, /^mt\s+MOVE_TABLES\s+src\s+dst\s+RUNNING/m);
  const metrics = await (await fetch(`http://127.0.0.1:${spec.materializer.port}/metrics`)).text();
  assert.match(metrics, /mg_materializer_events_applied_total\{workflow="mt"\} [1-9]/);
  assert.match(metrics, /mg_materializer_lag_seconds\{workflow="mt"\} /);

  // VDiff: clean now.
  const clean = await mg('workflow', 'vdiff', 'mt', '--data-dir', dataDir);
  assert.equal(clean.code, 0, clean.stdout + clean.stderr);
  assert.match(clean.stdout, /clean/);
  t.diagnostic(clean.stdout.trim());
  assert.match(clean.stdout, new RegExp(`source ${sourceRows.length} rows, target ${sourceRows.length}; missing 0, extra 0, different 0`));

  // A row changed on a target shard behind the materializer's back is reported, with its key.
  const victim = sourceRows[Math.floor(sourceRows.length / 2)].id;
  const home = shardFor(hashKeyspaceId(victim), RANGES);
  await targets.get(home)!.query("UPDATE orders SET note = 'tampered' WHERE id = $1", [victim]);
  const dirty = await mg('workflow', 'vdiff', 'mt', '--data-dir', dataDir);
  assert.equal(dirty.code, 1, dirty.stdout + dirty.stderr);
  assert.match(dirty.stdout, /DIFFERENCES/);
  assert.match(dirty.stdout, /missing 0, extra 0, different 1/);
  assert.match(dirty.stdout, new RegExp(`different on ${home}: key \\["${victim}"\\]`));
  const shown = await api('/v1/workflows/mt');
  assert.equal(shown.vdiff.tables[0].different, '1');

  // Writes cannot switch without the target's change stream (reverse replication reads it); dst has none here.
  const noStream = await mg('workflow', 'switch-traffic', 'mt', '--data-dir', dataDir);
  assert.equal(noStream.code, 1);
  assert.match(noStream.stderr, /switch-traffic needs the change stream \(CDC\) of dst on every shard/);
  assert.equal(shown.routing, 'SOURCE');

  await source.end();
  await Promise.all([...targets.values()].map((c) => c.end()));
}));

test('stop and cancel are events the materializer acts on', cluster.explained(async () => {
  const stopped = await mg('workflow', 'stop', 'mt', '--data-dir', dataDir);
  assert.equal(stopped.code, 0, stopped.stderr);
  await until('the workflow to stop', 20_000, async () => (await phaseOf('mt')) === 'STOPPED');
  const vdiff = await mg('workflow', 'vdiff', 'mt', '--data-dir', dataDir);
  assert.equal(vdiff.code, 1);
  assert.match(vdiff.stderr, /VDiff runs during catch-up/);
  const cancelled = await mg('workflow', 'cancel', 'mt', '--data-dir', dataDir);
  assert.equal(cancelled.code, 0, cancelled.stderr);
  await until('the workflow to be cancelled', 20_000, async () => (await phaseOf('mt')) === 'CANCELLED');
  const c = await direct('dst', RANGES[0].shard);
  const { rows } = await c.query("SELECT count(*) AS n FROM mg_materializer.positions WHERE workflow = 'mt'");
  await c.end();
  assert.equal(rows[0].n, '0', 'a cancelled workflow leaves no positions behind');
}));
