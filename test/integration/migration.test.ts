/**
 * Online schema migrations end to end (decision 0060): an unsharded database
 * with CDC on, table orders under a continuous writer through the gateway.
 * `ALTER TABLE orders ADD COLUMN status ... DEFAULT, ALTER COLUMN qty TYPE
 * bigint` is submitted with its cut-over postponed, copied and followed into
 * the shadow table, then cut over while the writer goes on: the table has the
 * new schema with every acknowledged write, the writer saw no error, and the
 * old table follows the new one. Then revert, again under the writer: the old
 * schema with every acknowledged write. The API's refusals; cancel drops a
 * shadow; complete drops an old table.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { sleep, testCluster, until } from '../support/cluster.ts';

const cluster = testCluster('migration', 0, { spec: {
  cells: ['zone1'],
  databases: [{ name: 'app', instancesPerShard: 1, durability: 'ANY_1', cdc: { enabled: true } }],
} });
const { spec, mg, dataDir } = cluster;
const INITIAL_ROWS = 20_000;
const asText = { getTypeParser: () => (v: string) => v };

const api = async (p: string, method = 'GET', body?: unknown) => {
  const res = await fetch(`http://127.0.0.1:${spec.materializer.port}${p}`, {
    method, headers: body === undefined ? {} : { 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() as any };
};
const connect = async (port: number) => {
  const c = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', password: 'postgres', database: 'app', types: asText });
  await c.connect();
  return c;
};
const gateway = () => connect(spec.gateway.port);
const direct = () => connect(cluster.instances.find((i) => i.database === 'app')!.port);

/** Each id's last acknowledged (qty, note), or null once its delete was acknowledged. */
const acknowledged = new Map<number, { qty: string; note: string } | null>();
let writing = false;
const writerErrors: unknown[] = [];
/** The slowest write since `since` was last reset, in ms. */
let slowest = 0;

/** Inserts, updates and deletes its own ids through the gateway until told to stop. */
async function writer(first: number): Promise<number> {
  const c = await gateway();
  const mine: number[] = [];
  let next = first;
  let writes = 0;
  try {
    while (writing) {
      const began = performance.now();
      const r = writes++ % 10;
      if (r < 6) {
        const id = next++;
        await c.query('INSERT INTO orders (id, qty, note) VALUES ($1, $2, $3)', [id, id % 1000, `i${id}`]);
        acknowledged.set(id, { qty: String(id % 1000), note: `i${id}` });
        mine.push(id);
      } else if (r < 9 && mine.length) {
        const id = mine[Math.floor(Math.random() * mine.length)];
        const res = await c.query('UPDATE orders SET qty = qty + 1, note = $2 WHERE id = $1 RETURNING qty', [id, `u${writes}`]);
        acknowledged.set(id, { qty: res.rows[0].qty, note: `u${writes}` });
      } else if (mine.length) {
        const id = mine.splice(Math.floor(Math.random() * mine.length), 1)[0];
        await c.query('DELETE FROM orders WHERE id = $1', [id]);
        acknowledged.set(id, null);
      }
      slowest = Math.max(slowest, performance.now() - began);
    }
  } catch (err) {
    writerErrors.push(err);
  } finally {
    await c.end();
  }
  return writes;
}

/** The table (or another name of it) holds exactly the acknowledged rows. */
async function assertExactly(c: pg.Client, table: string, where: string): Promise<void> {
  const rows = new Map((await c.query(`SELECT id, qty, note FROM ${table}`)).rows.map((r) => [Number(r.id), { qty: r.qty, note: r.note }]));
  for (const [id, want] of acknowledged) {
    if (want === null) assert.ok(!rows.has(id), `row ${id}: its delete was acknowledged but it is in ${where}`);
    else assert.deepEqual(rows.get(id), want, `row ${id}: the acknowledged write is not in ${where}`);
  }
  assert.equal(rows.size, [...acknowledged.values()].filter((v) => v !== null).length, `${where} has rows nobody acknowledged`);
}

const columns = async (c: pg.Client, schema: string, table: string) =>
  Object.fromEntries((await c.query('SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2', [schema, table])).rows.map((r) => [r.column_name, r.data_type]));

before(async () => {
  const up = await mg('cluster', 'up', ...cluster.flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  const c = await gateway();
  await c.query('CREATE TABLE orders (id int PRIMARY KEY, qty int NOT NULL, note text)');
  await c.query(`INSERT INTO orders SELECT g, g % 1000, 'i' || g FROM generate_series(1, ${INITIAL_ROWS}) g`);
  await c.query('CREATE TABLE events (id int PRIMARY KEY, v text)');
  await c.query("INSERT INTO events SELECT g, 'e' || g FROM generate_series(1, 100) g");
  await c.end();
  for (let id = 1; id <= INITIAL_ROWS; id++) acknowledged.set(id, { qty: String(id % 1000), note: `i${id}` });
});

after(async () => {
  writing = false;
  await mg('cluster', 'down', '--data-dir', dataDir, '--clean');
});

test('an online ALTER TABLE under a writer: cut over with the new schema and every write, then reverted with every write', cluster.explained(async (t) => {
  // Refusals come at submit, with what cannot be done.
  const using = await api('/v1/migrations', 'POST', { database: 'app', ddl: 'ALTER TABLE orders ALTER COLUMN qty TYPE bigint USING qty * 2' });
  assert.equal(using.status, 400);
  assert.match(using.body.error, /ALTER COLUMN qty TYPE \.\.\. USING/);
  const noColumn = await api('/v1/migrations', 'POST', { database: 'app', ddl: 'ALTER TABLE orders DROP COLUMN nope' });
  assert.equal(noColumn.status, 400);
  assert.match(noColumn.body.error, /column "nope" of relation .* does not exist/);
  assert.equal((await api('/v1/migrations', 'POST', { database: 'nodb', ddl: 'ALTER TABLE orders ADD x int' })).status, 404);

  const ddl = "ALTER TABLE orders ADD COLUMN status text NOT NULL DEFAULT 'new', ALTER COLUMN qty TYPE bigint";
  const submitted = await mg('migration', 'submit', 'app', ddl, '--postpone-cutover', '--data-dir', dataDir);
  assert.equal(submitted.code, 0, submitted.stderr + submitted.stdout);
  const name = /migration (mig_[0-9a-f]+): submitted/.exec(submitted.stdout)![1];
  assert.match(submitted.stdout, /RUNNING/);
  const copied = (await api(`/v1/migrations/${name}`)).body;
  assert.equal(copied.progress.rowsCopied, String(INITIAL_ROWS));
  t.diagnostic(`copy: ${copied.progress.rowsCopied} rows at ${Math.round(copied.progress.rowsPerSecond)} rows/s`);

  writing = true;
  const running = writer(INITIAL_ROWS + 1);
  await sleep(1_500);
  slowest = 0;
  const cut = await mg('migration', 'cutover', name, '--data-dir', dataDir);
  assert.equal(cut.code, 0, cut.stderr + cut.stdout);
  const heldMs = Number(/writes held (\d+) ms/.exec(cut.stdout)?.[1]);
  await sleep(1_500);
  t.diagnostic(`cut-over: writes held ${heldMs} ms by the materializer; slowest client write around it ${Math.round(slowest)} ms`);
  assert.ok(heldMs < 3_000, `writes were held ${heldMs} ms`);
  assert.deepEqual(writerErrors, [], `the writer saw errors: ${writerErrors.map(String).join('; ')}`);

  // The new schema, with the default on every old row; the old table follows the new one (reverse replication).
  const pgc = await direct();
  assert.deepEqual(await columns(pgc, 'public', 'orders'), { id: 'integer', qty: 'bigint', note: 'text', status: 'text' });
  const { rows: [statuses] } = await pgc.query("SELECT count(*) FILTER (WHERE status = 'new') AS new, count(*) AS n FROM orders");
  assert.equal(statuses.new, statuses.n);
  const shown = (await api(`/v1/migrations/${name}`)).body;
  assert.equal(shown.phase, 'SWITCHED');
  const old = `mg_materializer._mg_orders_${name.slice(4)}_old`;
  assert.deepEqual(await columns(pgc, 'mg_materializer', old.split('.')[1]), { id: 'integer', qty: 'integer', note: 'text' });

  // Revert under the writer: the old schema again, nothing lost.
  slowest = 0;
  const reverted = await mg('migration', 'revert', name, '--data-dir', dataDir);
  assert.equal(reverted.code, 0, reverted.stderr + reverted.stdout);
  const revertHeldMs = Number(/writes held (\d+) ms/.exec(reverted.stdout)?.[1]);
  await sleep(1_500);
  writing = false;
  const writes = await running;
  t.diagnostic(`revert: writes held ${revertHeldMs} ms; slowest client write around it ${Math.round(slowest)} ms; ${writes} writes in all`);
  assert.ok(revertHeldMs < 3_000, `writes were held ${revertHeldMs} ms`);
  assert.deepEqual(writerErrors, [], `the writer saw errors: ${writerErrors.map(String).join('; ')}`);
  assert.ok(writes > 100, `${writes} writes`);
  assert.deepEqual(await columns(pgc, 'public', 'orders'), { id: 'integer', qty: 'integer', note: 'text' });
  await assertExactly(pgc, 'orders', 'the reverted table');
  const { rows: left } = await pgc.query("SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE nspname = 'mg_materializer' AND relname LIKE '\\_mg\\_%' AND relkind = 'r'");
  assert.deepEqual(left, [], 'no shadow or old table is left after a revert');
  assert.equal((await api(`/v1/migrations/${name}`)).body.phase, 'REVERTED');
  assert.equal((await api(`/v1/migrations/${name}/revert`, 'POST')).status, 409);
  await pgc.end();
}));

test('cancel before the cut-over drops the shadow; complete after it drops the old table', cluster.explained(async () => {
  const pgc = await direct();
  const tablesOf = async () => (await pgc.query("SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE nspname = 'mg_materializer' AND relname LIKE '\\_mg\\_events%' AND relkind = 'r' ORDER BY 1")).rows.map((r) => r.relname);
  const first = await api('/v1/migrations', 'POST', { database: 'app', ddl: 'ALTER TABLE events ADD COLUMN n int DEFAULT 7', postponeCutOver: true });
  assert.equal(first.status, 201, JSON.stringify(first.body));
  await until('the first migration to follow', 60_000, async () => (await api(`/v1/migrations/${first.body.name}`)).body.phase === 'RUNNING');
  assert.equal((await api('/v1/migrations', 'POST', { database: 'app', ddl: 'ALTER TABLE events DROP COLUMN v' })).status, 409, 'one migration of a table at a time');
  assert.deepEqual(await tablesOf(), [`_mg_events_${first.body.name.slice(4)}`]);
  const cancel = await mg('migration', 'cancel', first.body.name, '--data-dir', dataDir);
  assert.equal(cancel.code, 0, cancel.stderr + cancel.stdout);
  assert.deepEqual(await tablesOf(), []);

  const second = await mg('migration', 'submit', 'app', 'ALTER TABLE events DROP COLUMN v', '--data-dir', dataDir);
  assert.equal(second.code, 0, second.stderr + second.stdout);
  const name = /migration (mig_[0-9a-f]+): submitted/.exec(second.stdout)![1];
  assert.match(second.stdout, /SWITCHED/);
  assert.deepEqual(await columns(pgc, 'public', 'events'), { id: 'integer' });
  const c = await gateway();
  await c.query('INSERT INTO events (id) VALUES (101)');
  await until('the old table to follow the new one', 30_000, async () =>
    (await pgc.query(`SELECT v FROM mg_materializer."_mg_events_${name.slice(4)}_old" WHERE id = 101`)).rows.length === 1);
  const complete = await mg('migration', 'complete', name, '--data-dir', dataDir);
  assert.equal(complete.code, 0, complete.stderr + complete.stdout);
  assert.deepEqual(await tablesOf(), []);
  assert.equal((await c.query('SELECT count(*) AS n FROM events')).rows[0].n, '101');
  const listed = await mg('migration', 'list', '--data-dir', dataDir);
  assert.match(listed.stdout, new RegExp(`${name} +app +public.events +COMPLETED`));
  await c.end();
  await pgc.end();
}));
