/**
 * Databases at run time, as a user sees them through the gateway and the
 * admin API: CREATE / DROP DATABASE register and deregister the database in
 * the topology, hosted on the instances that ran it; `mg database create --on`
 * and `drop` do the same through the API while another database serves a
 * continuous client; a database scaled to zero wakes for the client that
 * connects; the API names each bad field.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { testCluster, until } from '../support/cluster.ts';

const TOKEN = 'test-token-0123456789';
const cluster = testCluster('databases', 2, {
  settings: { 'gateway.releaseIdleLinksAfterMs': 0, 'orchestrator.apiToken': TOKEN },
  spec: {
    cells: ['zone1'],
    databases: [{ name: 'postgres', instancesPerShard: 1, durability: 'ANY_1' }, { name: 'sleepy', instancesPerShard: 1, durability: 'ANY_1' }],
  },
});
const { spec, flags, mg } = cluster;
const dataDirFlag = ['--data-dir', cluster.dataDir];
const api = `http://127.0.0.1:${spec.orchestrator.basePort}`;
const auth = { authorization: `Bearer ${TOKEN}` };
const restoreDir = path.join(cluster.dataDir, 'restored', 'extra');
const restorePort = spec.postgres.basePort + 480;

async function call(method: string, url: string, body?: unknown, headers: Record<string, string> = auth): Promise<{ status: number; body: any }> {
  const res = await fetch(api + url, {
    method, headers: body === undefined ? headers : { ...headers, 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() };
}

/** A client on `postgres` writing and reading in a loop through the gateway, counting errors, until stopped (after() stops it too). */
function continuousClient() {
  let stop = false;
  let ok = 0;
  const errors: string[] = [];
  const done = (async () => {
    const c = new pg.Client({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres' });
    await c.connect();
    await c.query('CREATE TABLE IF NOT EXISTS ticks (n int)');
    while (!stop) {
      try {
        await c.query('INSERT INTO ticks VALUES ($1)', [ok]);
        await c.query('SELECT count(*) FROM ticks');
        ok++;
      } catch (err) {
        errors.push((err as Error).message);
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    await c.end();
  })();
  const stopIt = async () => {
    stop = true;
    await done;
    return { ok, errors };
  };
  running.add(stopIt);
  return { stop: stopIt };
}
const running = new Set<() => Promise<unknown>>();
after(async () => {
  for (const stopIt of running) await stopIt().catch(() => undefined);
});

/** Whether the database's (first) instance's Postgres runs (its postmaster.pid names a live process). */
function postgresRuns(database: string, dataDir = cluster.instances.find((i) => i.database === database)!.dataDir): boolean {
  try {
    const pid = Number(fs.readFileSync(path.join(dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
});
after(async () => {
  if (fs.existsSync(path.join(restoreDir, 'postmaster.pid'))) {
    execFileSync('su', ['postgres', '-c', `${path.join(spec.postgres.binDir, 'pg_ctl')} stop -m immediate -D ${restoreDir}`]);
  }
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(cluster.dataDir, { recursive: true, force: true });
});

async function gw<T>(database: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end().catch(() => undefined);
  }
}

test('CREATE DATABASE through the gateway: connect right after, write, read; DROP DATABASE: 3D000 after', cluster.explained(async () => {
  await assert.rejects(gw('shop', async () => undefined), (e: any) => e.code === '3D000');
  await gw('postgres', (c) => c.query('CREATE DATABASE shop'));
  await gw('shop', async (c) => {
    assert.equal((await c.query('SELECT current_database() AS d')).rows[0].d, 'shop');
    await c.query('CREATE TABLE items (id int PRIMARY KEY, name text)');
    await c.query("INSERT INTO items VALUES (1, 'one'), (2, 'two')");
    assert.deepEqual((await c.query('SELECT name FROM items ORDER BY id')).rows.map((r) => r.name), ['one', 'two']);
  });
  // A database made from inside a hosted one is hosted on the same instances.
  await gw('shop', (c) => c.query('CREATE DATABASE "Shop_Archive"'));
  await gw('Shop_Archive', async (c) => assert.equal((await c.query('SELECT current_database() AS d')).rows[0].d, 'Shop_Archive'));
  await gw('postgres', async (c) => {
    // The pooler's idle connections to the database do not stand in the way of the drop.
    await c.query('DROP DATABASE shop');
    await c.query('DROP DATABASE "Shop_Archive"');
  });
  await assert.rejects(gw('shop', async () => undefined), (e: any) => e.code === '3D000' && /database "shop" does not exist/.test(e.message));
  const status = await mg('cluster', 'status', ...flags);
  assert.doesNotMatch(status.stdout, /\bshop\b/);
}));

test('the gateway refuses what would split the worlds: a known name again, a database with instances of its own', cluster.explained(async () => {
  await gw('postgres', async (c) => {
    await c.query('CREATE DATABASE twice');
    await assert.rejects(c.query('CREATE DATABASE twice'), (e: any) => e.code === '42P04');
    await assert.rejects(c.query('DROP DATABASE postgres'), (e: any) => e.code === '55006' && /instances of its own/.test(e.message));
    await c.query('DROP DATABASE twice');
    // The session goes on normally after the refusals.
    assert.equal((await c.query('SELECT 1 AS one')).rows[0].one, 1);
  });
}));

test('mg database create --on and drop, through the admin API, while another database serves a continuous client', cluster.explained(async () => {
  const client = continuousClient();
  const created = await mg('database', 'create', 'tenant_a', '--on', 'postgres', ...dataDirFlag);
  assert.equal(created.code, 0, created.stderr + created.stdout);
  assert.match(created.stdout, /CREATE DATABASE on postgres-0-zone1-0/);
  await gw('tenant_a', async (c) => {
    await c.query('CREATE TABLE t (v text)');
    await c.query("INSERT INTO t VALUES ('hello')");
    assert.equal((await c.query('SELECT v FROM t')).rows[0].v, 'hello');
  });
  const listed = await mg('database', 'list', ...dataDirFlag);
  assert.match(listed.stdout, /tenant_a\s+active\s+on postgres/);
  // A session left open on it is drained by the drop (57P01), not left to fail the DROP.
  const held = new pg.Client({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'tenant_a' });
  held.on('error', () => undefined);
  await held.connect();
  const refused = await mg('database', 'drop', 'tenant_a', ...dataDirFlag);
  assert.equal(refused.code, 2);
  assert.match(refused.stderr, /confirm with --yes/);
  const dropped = await mg('database', 'drop', 'tenant_a', '--yes', ...dataDirFlag);
  assert.equal(dropped.code, 0, dropped.stderr + dropped.stdout);
  await assert.rejects(held.query('SELECT 1'));
  await assert.rejects(gw('tenant_a', async () => undefined), (e: any) => e.code === '3D000');
  await gw('postgres', async (c) => assert.equal((await c.query("SELECT count(*)::int AS n FROM pg_database WHERE datname = 'tenant_a'")).rows[0].n, 0));
  const { ok, errors } = await client.stop();
  assert.deepEqual(errors, []);
  assert.ok(ok > 10, `the continuous client made progress (${ok})`);
}));

test('mg database create with instances of its own: started, elected and served with no restart, while another database serves a continuous client', cluster.explained(async () => {
  const client = continuousClient();
  const bad = await mg('database', 'create', 'extra', '--shards', '3', ...dataDirFlag);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /shards: must be a power of two/);
  const created = await mg('database', 'create', 'extra', '--replicas', '0', '--durability', 'ANY_1', ...dataDirFlag);
  assert.equal(created.code, 0, created.stderr + created.stdout);
  await gw('extra', async (c) => {
    assert.equal((await c.query('SELECT current_database() AS d, pg_is_in_recovery() AS r')).rows[0].d, 'extra');
    await c.query('CREATE TABLE t (v int); INSERT INTO t VALUES (7)');
    assert.equal((await c.query('SELECT v FROM t')).rows[0].v, 7);
  });
  const listed = await call('GET', '/v1/databases/extra');
  assert.equal(listed.body.hostedOn, null);
  assert.equal(listed.body.shards[0].instances.length, 1);
  const [instance] = listed.body.shards[0].instances;
  const instanceDir = path.join(cluster.dataDir, 'postgres', instance);
  assert.equal(postgresRuns('extra', instanceDir), true);

  // A backup of this first 'extra' (the next test restores it after the name is used again).
  const backedUp = await mg('backup', 'create', 'extra', '--type', 'full', ...dataDirFlag);
  assert.equal(backedUp.code, 0, backedUp.stderr + backedUp.stdout);

  // Dropped: its processes stop, its data goes, the gateway answers 3D000, the saved spec forgets it.
  const dropped = await mg('database', 'drop', 'extra', '--yes', ...dataDirFlag);
  assert.equal(dropped.code, 0, dropped.stderr + dropped.stdout);
  assert.match(dropped.stdout, new RegExp(`${instance}: data directory .* removed`));
  assert.match(dropped.stdout, /its backups stay in the repository/);
  assert.equal(postgresRuns('extra', instanceDir), false);
  assert.equal(fs.existsSync(instanceDir), false);
  await assert.rejects(gw('extra', (c) => c.query('SELECT 1')), (err: { code?: string }) => err.code === '3D000');
  assert.equal((await call('GET', '/v1/databases/extra')).status, 404);
  const saved = JSON.parse(fs.readFileSync(path.join(cluster.dataDir, 'cluster.json'), 'utf8'));
  assert.deepEqual(saved.databases.map((d: { name: string }) => d.name).sort(), ['postgres', 'sleepy']);
  assert.deepEqual(saved.droppedDatabases.map((d: { name: string }) => d.name), ['extra']);
  const { errors } = await client.stop();
  assert.deepEqual(errors, []);
}));

test('a database created again under a dropped one\'s name archives and backs up into a stanza of its own; the dropped one stays restorable', cluster.explained(async () => {
  const created = await mg('database', 'create', 'extra', '--replicas', '0', '--durability', 'ANY_1', ...dataDirFlag);
  assert.equal(created.code, 0, created.stderr + created.stdout);
  await gw('extra', (c) => c.query('CREATE TABLE t (v int); INSERT INTO t VALUES (8)'));

  const backedUp = await mg('backup', 'create', 'extra', '--type', 'full', ...dataDirFlag);
  assert.equal(backedUp.code, 0, backedUp.stderr + backedUp.stdout);
  assert.match(backedUp.stdout, /extra\/-: full backup \S+ completed/);
  const checked = await mg('backup', 'check', 'extra', ...dataDirFlag);
  assert.equal(checked.code, 0, checked.stderr + checked.stdout);
  assert.match(checked.stdout, /archiving works/);

  // Both systems' backups are listed: the current one's stanza, and the dropped one's as an earlier system of extra/-.
  const listed = await mg('backup', 'list', 'extra', ...dataDirFlag);
  assert.equal(listed.code, 0, listed.stderr + listed.stdout);
  assert.match(listed.stdout, /extra\/-  stanza extra-0-g2  ok/);
  assert.match(listed.stdout, /extra\/-  earlier system: stanza extra-0  ok/);
  assert.equal(listed.stdout.match(/ full /g)?.length, 2, listed.stdout);

  // The dropped database's backup, restored by its stanza's name, holds its row.
  const restored = await mg('backup', 'restore', 'extra/-', '--stanza', 'extra-0', '--to-dir', restoreDir, '--port', String(restorePort), ...dataDirFlag);
  assert.equal(restored.code, 0, restored.stderr + restored.stdout);
  const old = new pg.Client({ host: '127.0.0.1', port: restorePort, user: 'postgres', database: 'extra' });
  await old.connect();
  try {
    assert.deepEqual((await old.query('SELECT v FROM t')).rows, [{ v: 7 }]);
  } finally {
    await old.end();
  }
  const wrong = await mg('backup', 'restore', 'extra/-', '--stanza', 'sleepy-0', '--to-dir', `${restoreDir}-x`, '--port', String(restorePort + 1), ...dataDirFlag);
  assert.equal(wrong.code, 2);
  assert.match(wrong.stderr, /sleepy-0 is not a stanza of extra\/-/);
}));

test('scale to zero: deactivate stops the instances, a waiting client wakes them, other databases never notice; a held one refuses clients until activated', cluster.explained(async () => {
  const client = continuousClient();
  await gw('sleepy', (c) => c.query('CREATE TABLE IF NOT EXISTS naps (n int); INSERT INTO naps VALUES (1)'));
  await gw('sleepy', (c) => c.query('CREATE DATABASE sleepy_tenant'));
  const off = await mg('database', 'deactivate', 'sleepy', ...dataDirFlag);
  assert.equal(off.code, 0, off.stderr + off.stdout);
  assert.match(off.stdout, /every instance stopped/);
  assert.equal(postgresRuns('sleepy'), false);
  assert.equal(postgresRuns('postgres'), true);
  const status = await call('GET', '/v1/databases/sleepy');
  assert.equal(status.body.active, false);
  // A hosted database follows its host: asking to deactivate it alone is refused with the reason.
  const hosted = await call('POST', '/v1/databases/sleepy_tenant/deactivate');
  assert.equal(hosted.status, 409);
  assert.match(hosted.body.error, /hosted on "sleepy"/);

  // The first client of the hosted database wakes the shard group, waiting in the gateway meanwhile.
  const started = Date.now();
  await gw('sleepy_tenant', async (c) => assert.equal((await c.query('SELECT 1 AS one')).rows[0].one, 1));
  const wakeMs = Date.now() - started;
  assert.equal(postgresRuns('sleepy'), true);
  await gw('sleepy', async (c) => assert.equal((await c.query('SELECT count(*)::int AS n FROM naps')).rows[0].n, 1));
  assert.ok(wakeMs < 10_000, `woke in ${wakeMs} ms`);

  // Deactivate --hold with a session open: it is drained (57P01); new clients, of the database or one hosted on it,
  // are refused at once (57P03) and wake nothing; an activation runs it again (decision 0084).
  const open = new pg.Client({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'sleepy' });
  let ended: (pg.DatabaseError & Error) | undefined;
  open.on('error', (err) => (ended ??= err as pg.DatabaseError & Error)); // the FATAL, then "Connection terminated unexpectedly"
  await open.connect();
  const held = await mg('database', 'deactivate', 'sleepy', '--hold', ...dataDirFlag);
  assert.equal(held.code, 0, held.stderr + held.stdout);
  assert.match(held.stdout, /refuse new ones until it is activated/);
  await assert.rejects(open.query('SELECT 1'));
  await until('the drained session told why', 5_000, () => ended);
  assert.equal(ended!.code, '57P01');
  // The gateway's drain and the agent's stop act on the same event: the session ends by whichever comes first.
  if (/was deactivated/.test(ended!.message)) assert.match(ended!.hint ?? '', /runs again once activated/);
  for (const database of ['sleepy', 'sleepy_tenant']) {
    const started = Date.now();
    await assert.rejects(gw(database, (c) => c.query('SELECT 1')), (err: pg.DatabaseError) => {
      assert.equal(err.code, '57P03');
      assert.match(err.message, new RegExp(`database "${database}" is deactivated and held stopped: mg database deactivate --hold \\(admin API\\)$`));
      return true;
    });
    assert.ok(Date.now() - started < 2_000, `refused in ${Date.now() - started} ms, not after a wait`);
  }
  await new Promise((r) => setTimeout(r, 2_000));
  assert.equal(postgresRuns('sleepy'), false, 'a refused client woke nothing');
  assert.match((await mg('database', 'list', ...dataDirFlag)).stdout, /sleepy\s+inactive, held \(mg database deactivate --hold/);
  assert.equal((await call('GET', '/v1/databases/sleepy')).body.held, true);
  const on = await mg('database', 'activate', 'sleepy', ...dataDirFlag);
  assert.equal(on.code, 0, on.stderr + on.stdout);
  assert.match(on.stdout, /every shard has a serving primary/);
  await gw('sleepy', async (c) => assert.equal((await c.query('SELECT count(*)::int AS n FROM naps')).rows[0].n, 1));
  const { errors } = await client.stop();
  assert.deepEqual(errors, []);
}));

test('admin API: bearer token, each bad field named with a 4xx, OpenAPI document, metrics', cluster.explained(async () => {
  const noToken = await call('GET', '/v1/databases', undefined, {});
  assert.equal(noToken.status, 401);
  assert.equal((await call('GET', '/healthz', undefined, {})).status, 200);

  const bad = await call('POST', '/v1/databases', { name: 'Bad Name', shards: 3, colour: 'blue' });
  assert.equal(bad.status, 400);
  for (const field of ['body.name', 'body.shards', 'body.colour']) assert.match(bad.body.error, new RegExp(field.replace('.', '\\.')));
  assert.deepEqual(bad.body.fields.map((f: any) => f.field).sort(), ['body.colour', 'body.name', 'body.shards']);
  const missing = await call('POST', '/v1/databases', {});
  assert.equal(missing.status, 400);
  assert.match(missing.body.error, /body\.name: is required/);
  const badQuery = await call('POST', '/v1/databases/sleepy/activate?wait=perhaps');
  assert.equal(badQuery.status, 400);
  assert.match(badQuery.body.error, /querystring\.wait/);
  const withOn = await call('POST', '/v1/databases', { name: 'x1', on: 'postgres', shards: 2 });
  assert.equal(withOn.status, 400);
  assert.match(withOn.body.error, /body\.shards: not with on/);
  assert.equal((await call('POST', '/v1/databases', { name: 'x2', on: 'nosuch' })).status, 404);
  assert.equal((await call('POST', '/v1/databases', { name: 'postgres', on: 'sleepy' })).status, 409);
  assert.equal((await call('DELETE', '/v1/databases/nosuch')).status, 404);
  const hostsOthers = await call('DELETE', '/v1/databases/sleepy');
  assert.equal(hostsOthers.status, 409);
  assert.match(hostsOthers.body.error, /sleepy_tenant are hosted on "sleepy": drop them first/);
  assert.equal((await call('GET', '/v1/operations/not-a-uuid')).status, 400);

  // One call that waits: the operation's steps come back with it.
  const create = await call('POST', '/v1/databases?wait=true', { name: 'waited', on: 'postgres' });
  assert.equal(create.status, 200, JSON.stringify(create.body));
  assert.equal(create.body.operation.state, 'succeeded');
  assert.ok(create.body.operation.steps.length >= 2);
  assert.equal((await call('DELETE', '/v1/databases/waited?wait=true')).status, 200);

  const doc = await call('GET', '/openapi.json');
  for (const p of ['/v1/status', '/v1/databases', '/v1/databases/{name}', '/v1/databases/{name}/activate', '/v1/databases/{name}/deactivate',
    '/v1/shards', '/v1/instances', '/v1/shards/{database}/{shard}/switchover', '/v1/operations/{id}']) assert.ok(doc.body.paths[p], p);
  assert.ok(doc.body.paths['/v1/databases'].post.requestBody);
  const metrics = await fetch(`${api}/metrics`, { headers: auth });
  assert.match(await metrics.text(), /mg_orch_operations_total\{kind="create",state="succeeded"\}/);
  const instances = await call('GET', '/v1/instances');
  // extra: created again by the stanza test above.
  assert.deepEqual([...new Set(instances.body.instances.map((i: any) => i.database))].sort(), ['extra', 'postgres', 'sleepy']);
}));
