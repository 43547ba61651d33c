/**
 * The REST API on a sharded database: one cluster with an unsharded database
 * (`flat`) and a 2-shard one (`shop`, one instance per shard) with the same
 * schema and rows. The same requests must get the same status, Content-Range
 * and body from both; where a request ran is checked with a view that answers
 * inet_server_port() (the shard's Postgres) and with the gateway's routing
 * metric; requests the sharded planner cannot answer get its 0A000 (501).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { shardRanges } from '../../compose/spec.ts';
import { hashKeyspaceId, shardFor, xxhashKeyspaceId } from '../../schemas/index.ts';
import { testCluster, until } from '../support/cluster.ts';

const SLOT = 4;
const httpPort = Number(process.env.MG_TEST_PORT_BASE ?? 30_000) + SLOT * 500 + 402;
const cluster = testCluster('restsharded', SLOT, {
  settings: { 'gateway.httpPort': httpPort, 'gateway.restAnonRole': 'web_anon' },
  spec: {
    cells: ['zone1'],
    databases: [
      { name: 'flat', shards: 1, instancesPerShard: 1, durability: 'ANY_1' },
      { name: 'shop', sharded: true, shards: 2, instancesPerShard: 1, durability: 'ANY_1', transactionMode: 'twopc' },
    ],
  },
});
const RANGES = shardRanges(2);
const portOfShard = (shard: string) => cluster.instances.find((i) => i.database === 'shop' && i.shard === shard)!.port;
const portOfId = (id: number) => portOfShard(shardFor(hashKeyspaceId(id), RANGES));

const VSCHEMA = `
vindexes:
  hash: { type: hash }
  text_hash: { type: xxhash }
  member_email: { type: consistent_lookup_unique, params: { table: members_email_idx, from: email, to: keyspace_id }, owner: members }
tables:
  customers: { column_vindexes: [{ column: id, name: hash }] }
  customer_ports: { column_vindexes: [{ column: id, name: hash }] }
  orders: { column_vindexes: [{ column: customer_id, name: hash }] }
  notes: { column_vindexes: [{ column: id, name: hash }] }
  countries: { type: reference }
  tags: { column_vindexes: [{ column: id, name: hash }] }
  members: { column_vindexes: [{ column: id, name: hash }, { column: email, name: member_email }] }
  members_email_idx: { column_vindexes: [{ column: email, name: text_hash }] }
`;
const SCHEMA = [
  'create role web_anon nologin',
  'grant web_anon to postgres',
  'create table countries (code text primary key, name text not null)',
  'create table customers (id bigint primary key, name text not null, country text references countries(code), score numeric(6,2))',
  'create table orders (customer_id bigint not null references customers(id), id bigint not null, status text not null, total numeric(10,2), primary key (customer_id, id))',
  // joined to customers on customer_id, but sharded by its own id: an embed of it cannot be answered per shard
  'create table notes (id bigint primary key, customer_id bigint references customers(id), body text)',
  'create view customer_ports as select id, inet_server_port() as port from customers',
  // checked at COMMIT: a duplicate fails one shard's PREPARE after the other shard's statement succeeded
  'create table tags (id bigint primary key, code text not null, constraint tags_code unique (code) deferrable initially deferred)',
  // a lookup vindex on email: its lookup table is the gateway's (no grant to the request's role)
  'create table members (id bigint primary key, email text unique, name text)',
  'create table members_email_idx (email text primary key, keyspace_id bytea not null)',
  'grant select, insert, update, delete on countries, customers, orders, notes, customer_ports, tags, members to web_anon',
  "insert into countries values ('no', 'Norway'), ('pt', 'Portugal'), ('jp', 'Japan')",
  // a computed relationship: embeddable as customers?select=open_orders(id)
  "create function open_orders(c customers) returns setof orders language sql stable as $$ select * from orders where customer_id = c.id and status <> 'sent' $$",
  // RPC runs on one shard: CSV, nulls=stripped and a media type handler's output are its answer as it is
  'create domain "text/html" as text',
  `create function badge(name text) returns "text/html" language sql immutable as $$ select ('<b>' || name || '</b>')::"text/html" $$`,
  `create function card(name text) returns json language sql immutable as $$ select json_build_object('name', name, 'note', null) $$`,
];

const CUSTOMERS = Array.from({ length: 12 }, (_, i) => ({
  id: i + 1, name: `Customer ${String(i + 1).padStart(2, '0')}`, country: ['no', 'pt', 'jp', null][i % 4], score: i % 5 === 0 ? null : (i * 7.5) % 100,
}));
const ORDERS = CUSTOMERS.flatMap((c) => Array.from({ length: c.id % 4 }, (_, k) => ({
  customer_id: c.id, id: k + 1, status: ['new', 'paid', 'sent'][k % 3], total: k === 1 ? null : (c.id * 13 + k * 5) % 200,
})));

const url = (db: string, p: string) => `http://127.0.0.1:${httpPort}/${db}${p}`;
interface Answer { status: number; range: string | null; type: string | null; body: string }
async function ask(db: string, p: string, init: RequestInit = {}): Promise<Answer> {
  const res = await fetch(url(db, p), init);
  return { status: res.status, range: res.headers.get('content-range'), type: res.headers.get('content-type'), body: await res.text() };
}
/** The same request on both databases: the same status, Content-Range, Content-Type and body, byte for byte. */
async function same(p: string, init: RequestInit = {}): Promise<Answer> {
  const flat = await ask('flat', p, init);
  const shop = await ask('shop', p, init);
  assert.deepEqual(shop, flat, `${init.method ?? 'GET'} ${p}`);
  return shop;
}
const json = (body: unknown, prefer = 'return=representation'): RequestInit => ({
  method: 'POST', headers: { 'Content-Type': 'application/json', Prefer: prefer }, body: JSON.stringify(body),
});
async function routed(route: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${cluster.spec.gateway.metricsPort}/metrics`)).text();
  const m = new RegExp(`^mg_rest_sharded_requests_total\\{route="${route}"\\} (\\d+)`, 'm').exec(text);
  return m ? Number(m[1]) : 0;
}

before(async () => {
  const up = await cluster.mg('cluster', 'up', ...cluster.flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  await cluster.applyVSchema('shop', VSCHEMA);
  for (const db of ['flat', 'shop']) {
    const c = new pg.Client({ host: '127.0.0.1', port: cluster.spec.gateway.port, user: 'postgres', password: 'postgres', database: db });
    await c.connect();
    for (const sql of SCHEMA) await c.query(sql);
    await c.end();
  }
  // the gateway folds the VSchema from Kafka; until then the sharded planner refuses customers
  await until('the gateway to route customers', 20_000, async () => (await ask('shop', '/customers?limit=1')).status === 200);
});

after(async () => {
  await cluster.mg('cluster', 'down', '--clean', ...cluster.flags);
  fs.rmSync(cluster.dataDir, { recursive: true, force: true });
});

test('a bulk POST is split by the primary vindex: every row lands on its shard, the body keeps the payload order', cluster.explained(async () => {
  const created = await same('/customers', json([...CUSTOMERS].reverse()));
  assert.equal(created.status, 201);
  assert.equal(JSON.parse(created.body)[0].id, 12);
  assert.equal((await same('/orders', json(ORDERS, 'return=minimal'))).status, 201);
  const ports = JSON.parse((await ask('shop', '/customer_ports?order=id')).body) as Array<{ id: number; port: number }>;
  assert.deepEqual(ports, CUSTOMERS.map((c) => ({ id: c.id, port: portOfId(c.id) })));
  assert.equal(new Set(ports.map((p) => p.port)).size, 2, 'the rows are spread over both shards');
}));

test('reads: the same bodies as unsharded, scattered and merged (order, limit/offset, count, ranges, embeds)', cluster.explained(async () => {
  await same('/customers?select=id,name,score&order=id');
  await same('/customers?select=name,score&order=score.desc.nullslast,name&limit=5&offset=2', { headers: { Prefer: 'count=exact' } });
  await same('/customers?order=score.asc.nullsfirst,id&score=lt.60');
  await same('/customers?select=name,orders(id,total)&order=name.desc&limit=3&offset=2', { headers: { Prefer: 'count=exact' } });
  await same('/orders?select=id,status,total,customers(name,countries(name))&order=total.desc.nullslast,customer_id,id&limit=6');
  await same('/customers?select=id,country&order=id', { headers: { Range: '3-6', Prefer: 'count=exact' } });
  await same('/customers?order=id', { method: 'HEAD', headers: { Range: '0-3', Prefer: 'count=exact' } });
  await same('/customers?order=id&offset=50', { headers: { Prefer: 'count=exact' } });
  await same('/customers?select=name,orders!inner(id)&orders.status=eq.sent&order=id');
  await same('/customers?name=eq.Customer%2004', { headers: { Accept: 'application/vnd.pgrst.object+json' } });
  await same('/customers?id=gt.3', { headers: { Accept: 'application/vnd.pgrst.object+json' } });
  await same('/countries?order=name.desc');
  // CSV and nulls=stripped: each shard writes its rows as Postgres writes them for the media type, the gateway merges
  const csv = await same('/customers?select=id,name,country&order=country.nullsfirst,id&limit=7', { headers: { Accept: 'text/csv' } });
  assert.match(csv.body, /^id,name,country\n,?\d+,"?Customer/);
  await same('/customers?id=gt.100', { headers: { Accept: 'text/csv' } });
  const stripped = 'application/vnd.pgrst.array+json;nulls=stripped';
  const bare = await same('/customers?select=id,score,orders(id,total)&order=id', { headers: { Accept: stripped } });
  assert.ok(!bare.body.includes('null'), bare.body);
  await same('/customers?id=eq.1&select=id,country,score', { headers: { Accept: 'application/vnd.pgrst.object+json;nulls=stripped' } });
}));

test('a filter that pins the primary vindex runs on the shards it names', cluster.explained(async () => {
  const single = await routed('single');
  const multi = await routed('multi');
  const scatter = await routed('scatter');
  const five = JSON.parse((await ask('shop', '/customer_ports?id=eq.5')).body);
  assert.deepEqual(five, [{ id: 5, port: portOfId(5) }]);
  const a = CUSTOMERS.find((c) => portOfId(c.id) === portOfShard(RANGES[0].shard))!.id;
  const b = CUSTOMERS.find((c) => portOfId(c.id) === portOfShard(RANGES[1].shard))!.id;
  const both = JSON.parse((await ask('shop', `/customer_ports?id=in.(${a},${b})&order=id`)).body);
  assert.deepEqual(both, [{ id: a, port: portOfId(a) }, { id: b, port: portOfId(b) }].sort((x, y) => x.id - y.id));
  await same('/customers?id=eq.7&select=name,orders(id,status)');
  await same(`/orders?customer_id=in.(${a},${b})&order=customer_id,id`);
  assert.equal(await routed('single'), single + 2);
  assert.equal(await routed('multi'), multi + 2);
  assert.equal(await routed('scatter'), scatter);
}));

test('writes: PATCH and DELETE routed by their filters or scattered, upserts split, reference writes, rollback', cluster.explained(async () => {
  await same('/customers?id=eq.3', { method: 'PATCH', headers: { 'Content-Type': 'application/json', Prefer: 'return=representation' }, body: '{"score": 99.5}' });
  await same('/customers?score=is.null&select=id', { method: 'PATCH', headers: { 'Content-Type': 'application/json', Prefer: 'count=exact' }, body: '{"score": 1}' });
  await same('/customers?select=id,score&order=id');
  await same('/orders?customer_id=eq.7&id=eq.3', { method: 'DELETE', headers: { Prefer: 'return=representation' } });
  await same('/orders?status=eq.new', { method: 'DELETE', headers: { Prefer: 'count=exact' } });
  await same('/orders?order=customer_id,id');
  await same('/customers?on_conflict=id', json([{ id: 2, name: 'Two' }, { id: 40, name: 'Forty' }, { id: 41, name: 'Forty-one' }], 'resolution=merge-duplicates,return=representation'));
  await same('/customers?id=eq.40', { method: 'PUT', headers: { 'Content-Type': 'application/json', Prefer: 'return=representation' }, body: '{"id": 40, "name": "Forty!"}' });
  await same('/customers', json({ id: 1, name: 'dup' }));
  await same('/customers', json([{ id: 60, name: 'kept?' }, { id: 61, name: 'kept?' }], 'tx=rollback,return=representation'));
  await same('/customers?id=in.(60,61)');
  await same('/countries', json({ code: 'fr', name: 'France' }));
  await same('/countries?order=code');
  await same('/customers', { ...json([{ id: 70, name: 'Seventy' }, { id: 71, name: 'Seventy-one', score: 5 }, { id: 72, name: 'Seventy-two' }]), headers: {
    'Content-Type': 'application/json', Prefer: 'return=representation', Accept: 'application/vnd.pgrst.array+json;nulls=stripped',
  } });
}));

test('a write over several shards commits with two-phase commit (transactionMode twopc): a shard failing at commit leaves nothing anywhere', cluster.explained(async () => {
  const onShard = (shard: string, from: number) => {
    for (let id = from; ; id++) if (shardFor(hashKeyspaceId(id), RANGES) === shard) return id;
  };
  const [a, b, a2] = [onShard(RANGES[0].shard, 100), onShard(RANGES[1].shard, 100), onShard(RANGES[0].shard, 200)];
  assert.equal((await same('/tags', json({ id: a, code: 'taken' }, 'return=minimal'))).status, 201);
  const before = await routed('insert');
  // b's row is fine on its shard; a2's duplicates a code on the other shard, found only when that shard commits
  const refused = await ask('shop', '/tags', json([{ id: b, code: 'fresh' }, { id: a2, code: 'taken' }]));
  assert.equal(refused.status, 409, refused.body);
  assert.equal(JSON.parse(refused.body).code, '23505');
  assert.equal(await routed('insert'), before + 1, 'the request ran on both shards');
  assert.equal((await ask('flat', '/tags', json([{ id: b, code: 'fresh' }, { id: a2, code: 'taken' }]))).status, 409);
  await same('/tags?order=id');
  const shardB = new pg.Client({ host: '127.0.0.1', port: portOfShard(RANGES[1].shard), user: 'postgres', database: 'shop' });
  await shardB.connect();
  try {
    assert.deepEqual((await shardB.query('SELECT id FROM tags WHERE id = $1', [b])).rows, [], 'nothing committed on the shard whose part succeeded');
    assert.deepEqual((await shardB.query('SELECT gid FROM pg_prepared_xacts')).rows, [], 'no prepared transaction left');
  } finally {
    await shardB.end();
  }
}));

/** Every lookup row of members_email_idx, read on each shard's Postgres: email -> where it is and what it points at. */
async function memberLookups(): Promise<Record<string, { shard: string; ksid: string }>> {
  const perShard = await Promise.all(RANGES.map(async ({ shard }) => {
    const c = new pg.Client({ host: '127.0.0.1', port: portOfShard(shard), user: 'postgres', database: 'shop' });
    await c.connect();
    const { rows } = await c.query(`SELECT email, encode(keyspace_id, 'hex') AS ksid FROM members_email_idx`).finally(() => c.end());
    return rows.map((r) => [r.email, { shard, ksid: r.ksid }] as const);
  }));
  return Object.fromEntries(perShard.flat());
}
/** The lookup rows the members the gateway returns call for: each email on the shard its value hashes to, pointing at its row. */
async function expectedMemberLookups(): Promise<Record<string, { shard: string; ksid: string }>> {
  const members = JSON.parse((await ask('shop', '/members?select=id,email&email=not.is.null')).body) as Array<{ id: number; email: string }>;
  return Object.fromEntries(members.map((m) => [m.email, { shard: shardFor(xxhashKeyspaceId(m.email), RANGES), ksid: hashKeyspaceId(m.id).toString('hex') }]));
}

test('a lookup vindex: POST, PATCH and DELETE keep its lookup rows in the request\'s transaction; a filter on it reads the one shard it names', cluster.explained(async () => {
  const members = Array.from({ length: 8 }, (_, i) => ({ id: 300 + i, email: `m${i}@example.org`, name: `Member ${i}` }));
  await same('/members', json(members));
  assert.equal(Object.keys(await memberLookups()).length, members.length);
  assert.deepEqual(await memberLookups(), await expectedMemberLookups());
  const pinned = async () => (await routed('single')) + (await routed('multi'));
  const [pinnedBefore, scatter] = [await pinned(), await routed('scatter')];
  const one = JSON.parse((await same('/members?email=eq.m3@example.org&select=id,name')).body);
  assert.deepEqual(one, [{ id: 303, name: 'Member 3' }]);
  await same('/members?email=in.(m1@example.org,m6@example.org,nobody@example.org)&order=id');
  assert.equal(await routed('scatter'), scatter, 'no read by the lookup column scattered');
  assert.equal(await pinned(), pinnedBefore + 2);
  // a duplicate email is the lookup's 23505 and writes nothing, on any shard
  const clash = [{ id: 400, email: 'new@example.org', name: 'n' }, { id: 401, email: 'm0@example.org', name: 'dup' }];
  const dup = await ask('shop', '/members', json(clash));
  assert.equal(dup.status, 409, dup.body);
  assert.match(JSON.parse(dup.body).message, /unique lookup vindex member_email/);
  assert.equal((await ask('flat', '/members', json(clash))).status, 409);
  await same('/members?order=id');
  assert.deepEqual(await memberLookups(), await expectedMemberLookups());
  // PATCH of other columns leaves the lookups; of the lookup column (by the vindex, by the lookup, scattered) moves them
  const patch = (body: unknown): RequestInit => ({ method: 'PATCH', headers: { 'Content-Type': 'application/json', Prefer: 'return=representation' }, body: JSON.stringify(body) });
  await same('/members?email=eq.m2@example.org', patch({ name: 'Renamed' }));
  await same('/members?id=eq.300', patch({ email: 'moved@example.org' }));
  await same('/members?email=eq.m4@example.org', patch({ email: 'm4@elsewhere.org', name: 'Four' }));
  await same('/members?name=like.Member%207', patch({ email: null }));
  assert.deepEqual(await memberLookups(), await expectedMemberLookups());
  assert.equal((await memberLookups())['m0@example.org'], undefined, 'the old value\'s row is gone');
  // DELETE by the lookup column, and scattered by another filter
  await same('/members?email=eq.m5@example.org', { method: 'DELETE', headers: { Prefer: 'return=representation' } });
  await same('/members?name=in.(Member%201,Four)', { method: 'DELETE' });
  await same('/members?order=id');
  assert.deepEqual(await memberLookups(), await expectedMemberLookups());
  assert.equal(Object.keys(await memberLookups()).length, 4);
}));

test('what the sharded planner refuses gets its 0A000 as a PostgREST error (501)', cluster.explained(async () => {
  const embed = await ask('shop', '/customers?select=name,notes(body)');
  assert.equal(embed.status, 501);
  assert.match(JSON.parse(embed.body).message, /join of sharded tables customers and notes/);
  assert.equal((await ask('flat', '/customers?select=name,notes(body)')).status, 200);
  const move = await ask('shop', '/customers?id=eq.1', { method: 'PATCH', headers: { 'Content-Type': 'application/json' }, body: '{"id": 100}' });
  assert.equal(move.status, 501);
  assert.equal(JSON.parse(move.body).code, '0A000');
  const underReference = await ask('shop', '/countries?select=code,customers(id)');
  assert.equal(underReference.status, 501);
  assert.match(JSON.parse(underReference.body).message, /sharded table under reference table countries/);
  // a limited DELETE would take its limit on each shard
  const limited = await ask('shop', '/orders?limit=1&order=customer_id,id', { method: 'DELETE' });
  assert.equal(limited.status, 501);
  assert.equal(JSON.parse(limited.body).code, '0A000');
  // a computed relationship runs its function on whichever shard it is on; CSV written back by several shards is not merged
  const csvWrite = { method: 'PATCH', headers: { Accept: 'text/csv', 'Content-Type': 'application/json', Prefer: 'tx=rollback,return=representation' }, body: '{"score": 2}' };
  for (const [p, init] of [['/customers?select=id,open_orders(id)&order=id', {}], ['/customers?id=eq.1', csvWrite]] as const) {
    assert.equal((await ask('flat', p, init)).status, 200, p);
    const refused = await ask('shop', p, init);
    assert.equal(refused.status, 501, p);
    assert.equal(JSON.parse(refused.body).code, '0A000');
  }
}));

test('DDL through the gateway reloads both databases\' REST schema caches; spread embeds and the OpenAPI document as unsharded', cluster.explained(async () => {
  for (const db of ['flat', 'shop']) assert.equal((await ask(db, '/customers?select=tier&limit=1')).status, 400); // not a column yet
  for (const db of ['flat', 'shop']) {
    const c = new pg.Client({ host: '127.0.0.1', port: cluster.spec.gateway.port, user: 'postgres', password: 'postgres', database: db });
    await c.connect();
    await c.query(`alter table customers add column tier text not null default 'basic'`); // no NOTIFY: the gateway sends it
    await c.end();
  }
  await until('both REST schema caches to have customers.tier', 10_000, async () =>
    (await ask('flat', '/customers?select=tier&limit=1')).status === 200 && (await ask('shop', '/customers?select=tier&limit=1')).status === 200);
  await same('/customers?select=id,tier&order=id&limit=3');
  await same('/orders?select=id,...customers(name,tier)&order=customer_id,id&limit=5');
  const [flat, shop] = await Promise.all(['flat', 'shop'].map(async (db) => (await fetch(url(db, '/'))).json() as Promise<any>));
  assert.equal(shop.basePath, '/shop');
  assert.deepEqual(shop.definitions.customers.properties.tier, { default: 'basic', format: 'text', type: 'string' });
  assert.deepEqual({ ...shop, basePath: flat.basePath }, flat);
  await same('/customers?select=id,tier&order=id&limit=2', { headers: { Accept: 'text/csv' } });
  for (const accept of ['text/html', 'text/csv', 'application/vnd.pgrst.array+json;nulls=stripped']) {
    for (const fn of ['badge', 'card']) await same(`/rpc/${fn}?name=Ann`, { headers: { Accept: accept } });
  }
  assert.equal((await ask('shop', '/rpc/badge?name=Ann', { headers: { Accept: 'text/html' } })).body, '<b>Ann</b>');
}));
