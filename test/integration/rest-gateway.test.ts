/**
 * The REST API on the gateway, as applications use it: postgrest-js (the
 * official client) and plain fetch against `http://gateway:httpPort/<db>`,
 * over a cluster brought up by `mg` (one instance: this is not about HA):
 * reads with embedding, counts and ranges, writes and upserts, RPC, JWT role
 * switching with RLS, error bodies, read-only GETs, and /metrics.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, test } from 'node:test';
import { PostgrestClient } from '@supabase/postgrest-js';
import pg from 'pg';
import { testCluster, until } from '../support/cluster.ts';
import { jwtSecret, restSchemaSql } from '../support/postgrest.ts';
import { userToken } from '../support/rest-requests.ts';

const base = Number(process.env.MG_TEST_PORT_BASE ?? 30_000) + 1 * 500;
const httpPort = base + 402;
const cluster = testCluster('restgw', 1, {
  settings: { 'gateway.httpPort': httpPort, 'gateway.restAnonRole': 'web_anon', 'gateway.restJwtSecret': jwtSecret },
  spec: { databases: [{ name: 'postgres', shards: 1, instancesPerShard: 1 }] },
});
const url = `http://127.0.0.1:${httpPort}/postgres`;
const anon = new PostgrestClient(url);
const ann = new PostgrestClient(url, { headers: { Authorization: userToken('ann') } });

before(async () => {
  const up = await cluster.mg('cluster', 'up', ...cluster.flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  const client = new pg.Client({ host: '127.0.0.1', port: cluster.spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres' });
  await client.connect();
  await client.query(restSchemaSql);
  await client.end();
});

after(async () => {
  await cluster.mg('cluster', 'down', '--clean', ...cluster.flags);
  fs.rmSync(cluster.dataDir, { recursive: true, force: true });
});

test('postgrest-js reads: filters, embedding, order, count and range', cluster.explained(async () => {
  const { data, error, count, status } = await anon.from('clients')
    .select('name, projects(name, tasks(title))', { count: 'exact' })
    .eq('id', 1).order('name');
  assert.equal(error, null);
  assert.equal(status, 200);
  assert.equal(count, 1);
  assert.deepEqual(data, [{ name: 'Acme', projects: [
    { name: 'Rocket', tasks: [{ title: 'design' }, { title: 'build' }, { title: 'launch' }] }, { name: 'Anvil', tasks: [{ title: 'forge' }] },
  ] }]);
  const page = await anon.from('projects').select('id', { count: 'exact' }).order('id', { ascending: false }).range(1, 2);
  assert.equal(page.status, 206);
  assert.equal(page.count, 4);
  assert.deepEqual(page.data, [{ id: 3 }, { id: 2 }]);
  const m2m = await anon.from('projects').select('name, users(name)').in('id', [1, 2]).order('id');
  assert.deepEqual(m2m.data, [{ name: 'Rocket', users: [{ name: 'ann' }, { name: 'bob' }] }, { name: 'Anvil', users: [{ name: 'bob' }] }]);
  const single = await anon.from('clients').select('id, city').eq('name', 'Globex').single();
  assert.deepEqual(single.data, { id: 2, city: null });
  const or = await anon.from('projects').select('id').or('budget.is.null,name.ilike.*stap*').order('id');
  assert.deepEqual(or.data, [{ id: 2 }, { id: 3 }]);
}));

test('postgrest-js writes: insert, upsert, update, delete; RLS and the JWT role decide', cluster.explained(async () => {
  const denied = await anon.from('clients').insert({ id: 50, name: 'anon' });
  assert.equal(denied.status, 401);
  assert.equal(denied.error?.code, '42501');
  const ins = await ann.from('clients').insert([{ id: 50, name: 'Fifty' }, { id: 51, name: 'Fifty-one' }]).select();
  assert.equal(ins.status, 201);
  assert.deepEqual(ins.data, [{ id: 50, name: 'Fifty', city: null }, { id: 51, name: 'Fifty-one', city: null }]);
  const dup = await ann.from('clients').insert({ id: 50, name: 'again' });
  assert.equal(dup.status, 409);
  assert.equal(dup.error?.code, '23505');
  assert.match(dup.error?.details ?? '', /Key \(id\)=\(50\) already exists/);
  const up = await ann.from('clients').upsert({ id: 50, name: 'Fifty!' }).select('name');
  assert.deepEqual(up.data, [{ name: 'Fifty!' }]);
  const upd = await ann.from('clients').update({ city: 'Oslo' }).gte('id', 50).select('id, city');
  assert.deepEqual(upd.data, [{ id: 50, city: 'Oslo' }, { id: 51, city: 'Oslo' }]);
  const del = await ann.from('clients').delete().gte('id', 50).select('id');
  assert.deepEqual(del.data, [{ id: 50 }, { id: 51 }]);
  // RLS: each user sees only their notes; a new note is owned by the token's subject
  assert.deepEqual((await ann.from('notes').select('owner, body')).data, [{ owner: 'ann', body: "ann's note" }]);
  const bob = new PostgrestClient(url, { headers: { Authorization: userToken('bob') } });
  const note = await bob.from('notes').insert({ body: 'from bob' }).select('owner, body').single();
  assert.deepEqual(note.data, { owner: 'bob', body: 'from bob' });
  assert.equal((await ann.from('notes').select('id')).data?.length, 1);
}));

test('RPC, its errors, and read-only GETs (a volatile function that writes is refused on GET, runs on POST)', cluster.explained(async () => {
  assert.equal((await anon.rpc('add', { a: 2, b: 3 })).data, 5);
  const rows = await anon.rpc('projects_of', { cid: 1 }, { get: true }).select('id').gt('id', 1);
  assert.deepEqual(rows.data, [{ id: 2 }]);
  const who = await ann.rpc('whoami');
  assert.deepEqual(who.data, { role: 'app_user', sub: 'ann' });
  const fail = await anon.rpc('fail', { msg: 'boom' });
  assert.equal(fail.status, 400);
  assert.deepEqual(fail.error, { code: 'P0001', details: 'from fail()', hint: 'try again', message: 'boom' });
  const missing = await anon.rpc('nothing_here');
  assert.equal(missing.status, 404);
  assert.equal(missing.error?.code, 'PGRST202');
  const onGet = await ann.rpc('touch_client', { cid: 1 }, { get: true });
  assert.equal(onGet.status, 405);
  assert.equal(onGet.error?.code, '25006');
  assert.equal((await ann.rpc('touch_client', { cid: 1 })).data, 1);
}));

test('plain HTTP: bad requests get PostgREST error bodies; unknown databases 404; /metrics counts requests', cluster.explained(async () => {
  const bad = await fetch(`${url}/clients?id=xx.1`);
  assert.equal(bad.status, 400);
  assert.equal((await bad.json()).code, 'PGRST100');
  const expired = await fetch(`${url}/clients`, { headers: { Authorization: 'Bearer not.a.jwt' } });
  assert.equal(expired.status, 401);
  assert.equal((await expired.json()).code, 'PGRST301');
  const nodb = await fetch(`http://127.0.0.1:${httpPort}/nodb/clients`);
  assert.equal(nodb.status, 404);
  const created = await fetch(`${url}/clients`, {
    method: 'POST', headers: { 'Content-Type': 'application/json', Authorization: userToken(), Prefer: 'return=headers-only' }, body: '{"id": 60, "name": "Sixty"}',
  });
  assert.equal(created.status, 201);
  assert.equal(created.headers.get('location'), '/postgres/clients?id=eq.60');
  const metrics = await (await fetch(`http://127.0.0.1:${cluster.spec.gateway.metricsPort}/metrics`)).text();
  assert.match(metrics, /mg_rest_requests_total\{method="GET",route="table",status="200"\} [1-9]/);
  assert.match(metrics, /mg_rest_requests_total\{method="GET",route="table",status="400"\} [1-9]/);
}));

test('DDL through the gateway reloads the REST schema cache; the OpenAPI document at /<database>/', cluster.explained(async () => {
  assert.equal((await fetch(`${url}/gadgets`)).status, 404);
  const client = new pg.Client({ host: '127.0.0.1', port: cluster.spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres' });
  await client.connect();
  // in a transaction: the REST caches reload once it commits
  await client.query(`begin; create table gadgets (id int primary key, name text); grant select on gadgets to web_anon;
    insert into gadgets values (1, 'spanner'); commit`);
  await client.end();
  await until('the REST schema cache to have gadgets', 10_000, async () => (await fetch(`${url}/gadgets`)).status === 200);
  assert.deepEqual(await (await fetch(`${url}/gadgets`)).json(), [{ id: 1, name: 'spanner' }]);
  const res = await fetch(`${url}/`);
  assert.equal(res.headers.get('content-type'), 'application/openapi+json; charset=utf-8');
  const doc = await res.json() as any;
  assert.equal(doc.basePath, '/postgres');
  assert.equal(doc.host, `127.0.0.1:${httpPort}`);
  assert.deepEqual(doc.definitions.gadgets.properties.id, { description: 'Note:\nThis is a Primary Key.<pk/>', format: 'integer', type: 'integer' });
  assert.deepEqual(Object.keys(doc.paths['/gadgets']), ['get', 'post', 'delete', 'patch']);
  assert.ok(!doc.paths['/notes'], 'the anonymous role may not read notes, so they are not listed');
  const metrics = await (await fetch(`http://127.0.0.1:${cluster.spec.gateway.metricsPort}/metrics`)).text();
  assert.match(metrics, /mg_rest_schema_announcements_total\{outcome="sent"\} [1-9]/);
}));
