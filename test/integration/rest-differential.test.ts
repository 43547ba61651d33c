/**
 * router/rest against the reference: the same generated requests go to
 * PostgREST 12.0.2 and to our REST server on one Postgres, and the answers
 * (status, Content-Range, Content-Location, Location, Content-Type,
 * Preference-Applied, body byte for byte) must be the same. Writes run on
 * freshly reset data on each side, and the tables they touched must end the
 * same too. Then hostile input: always a clear 4xx, never a crash or SQL.
 */
import assert from 'node:assert/strict';
import { createHmac, generateKeyPairSync, sign as cryptoSign, type KeyObject } from 'node:crypto';
import { after, before, test } from 'node:test';
import pg from 'pg';
import type { FastifyInstance } from 'fastify';
import { createLogger } from '../../common/log.ts';
import type { PostgresInstance } from '../../ingest/postgres/instance.ts';
import { RestDatabase } from '../../router/rest/database.ts';
import { startRestServer } from '../../router/rest/server.ts';
import { jwtSecret, removePostgres, restPorts, restSchemaSql, startPostgres, startPostgrest, type Postgrest } from '../support/postgrest.ts';
import { readRequests, userToken, writeRequests, type TestRequest } from '../support/rest-requests.ts';

const ports = restPorts(0);
const log = createLogger('rest-test');
log.level = process.env.MG_LOG_LEVEL ?? 'warn';
let postgres: PostgresInstance;
let reference: Postgrest;
let db: RestDatabase;
let ours: FastifyInstance;
let admin: pg.Client;
const oursUrl = `http://127.0.0.1:${ports.ours}`;

before(async () => {
  postgres = await startPostgres(ports.postgres);
  admin = new pg.Client({ host: '127.0.0.1', port: ports.postgres, user: 'postgres', database: 'postgres' });
  await admin.connect();
  await admin.query(restSchemaSql);
  reference = await startPostgrest({ port: ports.postgrest, dbUri: `postgres://postgres@127.0.0.1:${ports.postgres}/postgres`, preRequest: 'public.check_request' });
  db = new RestDatabase({ name: 'postgres', user: 'postgres', schemas: ['public'], endpoint: async () => ({ host: '127.0.0.1', port: ports.postgres }), log });
  ours = await startRestServer({ port: ports.ours, config: { schemas: ['public'], anonRole: 'web_anon', jwtSecret, preRequest: 'public.check_request' }, database: () => db, single: 'postgres', log });
});

after(async () => {
  await ours?.close();
  await db?.close();
  await reference?.stop();
  await admin?.end();
  if (postgres) await removePostgres(postgres);
});

interface Answer { status: number; headers: Record<string, string | null>; body: string }

const COMPARED_HEADERS = ['content-range', 'content-location', 'location', 'content-type', 'preference-applied', 'x-custom', 'cache-control'];

async function send(base: string, r: TestRequest): Promise<Answer> {
  const res = await fetch(base + r.path, { method: r.method, headers: r.headers, body: r.body });
  const headers: Record<string, string | null> = {};
  // PostgREST repeats Content-Type on a PGRST116 (its last one is what a client sees as the type)
  for (const h of COMPARED_HEADERS) headers[h] = h === 'content-type' ? res.headers.get(h)?.split(', ').pop() ?? null : res.headers.get(h);
  // bytes (a media type handler's bytea) are compared as they are
  const body = headers['content-type'] === 'application/octet-stream' ? Buffer.from(await res.arrayBuffer()).toString('base64') : await res.text();
  return { status: res.status, headers, body };
}

async function tablesState(): Promise<string> {
  const { rows } = await admin.query(`select (select json_agg(t order by id) from clients t) c, (select json_agg(t order by id) from tasks t) t,
    (select json_agg(t order by id) from notes t) n, (select json_agg(t order by name) from users t) u,
    (select json_agg(t order by user_id, project_id) from users_projects t) up`);
  return JSON.stringify(rows[0]);
}

const describe = (r: TestRequest) => `${r.method} ${r.path} ${JSON.stringify(r.headers ?? {})} ${r.body ?? ''}`;

test('reads: the same answers as PostgREST 12.0.2', async () => {
  const requests = readRequests();
  assert.ok(requests.length >= 250, `only ${requests.length} requests`);
  const diffs: string[] = [];
  for (const r of requests) {
    const [theirs, mine] = [await send(reference.url, r), await send(oursUrl, r)];
    try {
      assert.deepEqual(mine, theirs);
    } catch {
      diffs.push(`${describe(r)}\n  postgrest: ${JSON.stringify(theirs)}\n  ours:      ${JSON.stringify(mine)}`);
    }
  }
  assert.equal(diffs.length, 0, `${diffs.length} of ${requests.length} differ:\n${diffs.join('\n')}`);
});

test('writes and RPC: the same answers and the same rows afterwards', async () => {
  const requests = writeRequests();
  const diffs: string[] = [];
  for (const r of requests) {
    await admin.query('select fixture.reset()');
    const theirs = await send(reference.url, r);
    const theirState = await tablesState();
    await admin.query('select fixture.reset()');
    const mine = await send(oursUrl, r);
    const myState = await tablesState();
    try {
      assert.deepEqual(mine, theirs);
      assert.equal(myState, theirState);
    } catch {
      diffs.push(`${describe(r)}\n  postgrest: ${JSON.stringify(theirs)}\n  ours:      ${JSON.stringify(mine)}${myState === theirState ? '' : `\n  rows differ: ${theirState} vs ${myState}`}`);
    }
  }
  await admin.query('select fixture.reset()');
  assert.equal(diffs.length, 0, `${diffs.length} of ${requests.length} differ:\n${diffs.join('\n')}`);
});

/** Objects the OpenAPI document describes: comments, an enum, a domain, defaults, lengths, arrays, a view, what a role may not use. */
const OPENAPI_SQL = `
  create type oa_mood as enum ('sad', 'ok', 'happy');
  create domain oa_posint as int check (value > 0);
  create table oa_kinds (id bigint generated always as identity primary key, code varchar(10) not null default 'abc', label char(3),
    mood oa_mood default 'ok', n smallint default 42, f real, d double precision default 1.5, j json, ts timestamptz default now(),
    u uuid, ints int[], moods oa_mood[], b bytea, quoted text default 'he said "hi"', p oa_posint default 5, t2 text[] default '{a}');
  comment on table oa_kinds is 'Kinds of things
second line of it';
  comment on column oa_kinds.code is 'the code';
  comment on column oa_kinds.id is 'the id';
  comment on table clients is 'Our clients';
  comment on schema public is 'The API
of the fixture';
  grant select on oa_kinds to web_anon;
  create table oa_hidden (id int);
  create function oa_fn(a text, b int default 3) returns setof oa_kinds language sql as $$ select * from oa_kinds $$;
  comment on function oa_fn(text, int) is 'A function
with details';
  create function oa_json(json) returns json language sql as $$ select $1 $$;
  create function oa_secret() returns int language sql as $$ select 1 $$;
  revoke execute on function oa_secret() from public;
  notify pgrst, 'reload schema'`;

const OPENAPI_DROP_SQL = `drop table oa_kinds, oa_hidden cascade; drop function oa_json(json), oa_secret();
  drop domain oa_posint; drop type oa_mood; comment on table clients is null; comment on schema public is 'standard public schema';
  notify pgrst, 'reload schema'`;

test('the OpenAPI document at /: the same as PostgREST 12.0.2 for each role', async () => {
  await admin.query(OPENAPI_SQL);
  const doc = async (base: string, headers: Record<string, string> = {}) => {
    const res = await fetch(`${base}/`, { headers });
    return { status: res.status, type: res.headers.get('content-type'), doc: await res.json() as any };
  };
  try {
    // both have reloaded their schema cache when both list oa_kinds
    const deadline = Date.now() + 10_000;
    while (!((await doc(reference.url)).doc.paths['/oa_kinds'] && (await doc(oursUrl)).doc.paths['/oa_kinds'])) {
      assert.ok(Date.now() < deadline, 'the schema caches did not reload');
      await new Promise((r) => setTimeout(r, 100));
    }
    for (const headers of [{}, { Authorization: userToken() }, { 'Accept-Profile': 'public', Accept: 'application/json' }] as Record<string, string>[]) {
      const [theirs, mine] = [await doc(reference.url, headers), await doc(oursUrl, headers)];
      // where each server listens differs
      assert.equal(mine.doc.host, `127.0.0.1:${ports.ours}`);
      theirs.doc.host = mine.doc.host;
      // definition by definition first, so that a failure names the one that differs
      for (const name of new Set([...Object.keys(theirs.doc.definitions), ...Object.keys(mine.doc.definitions)])) {
        assert.deepEqual(mine.doc.definitions[name], theirs.doc.definitions[name], `definition ${name}, headers ${JSON.stringify(headers)}`);
      }
      assert.deepEqual(mine, theirs, `headers ${JSON.stringify(headers)}`);
    }
    // what a role may not use is not listed: anon cannot read notes, app_user can; nobody may run oa_secret
    const [{ type, doc: anon }, user] = [await doc(oursUrl), (await doc(oursUrl, { Authorization: userToken() })).doc];
    assert.equal(type, 'application/openapi+json; charset=utf-8');
    assert.ok(!anon.paths['/notes'] && user.paths['/notes'] && !anon.paths['/oa_hidden'] && !anon.paths['/rpc/oa_secret']);
    assert.equal(anon.info.title, 'The API');
    assert.deepEqual(anon.definitions.oa_kinds.properties.code, { default: 'abc', description: 'the code', format: 'character varying', maxLength: 10, type: 'string' });
  } finally {
    await admin.query(OPENAPI_DROP_SQL);
  }
});

test('a JWKS as the JWT secret (RS256, ES256): the same answers as PostgREST 12.0.2', async () => {
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const jwks = JSON.stringify({ keys: [
    { ...rsa.publicKey.export({ format: 'jwk' }), kid: 'r1', alg: 'RS256' }, { ...ec.publicKey.export({ format: 'jwk' }), kid: 'e1', alg: 'ES256' },
  ] });
  // two more of this slot's extra ports (+488, +489), beside restPorts'
  const theirsPort = ports.ours + 1, oursPort = ports.ours + 2;
  const reference2 = await startPostgrest({ port: theirsPort, dbUri: `postgres://postgres@127.0.0.1:${ports.postgres}/postgres`, secret: jwks.replace(/"/g, '\\"') });
  const ours2 = await startRestServer({ port: oursPort, config: { schemas: ['public'], anonRole: 'web_anon', jwtSecret: jwks }, database: () => db, single: 'postgres', log });
  try {
    const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
    const sign = (alg: string, key: KeyObject, claims: object, kid?: string) => {
      const data = `${b64({ alg, typ: 'JWT', ...(kid ? { kid } : {}) })}.${b64(claims)}`;
      const sig = alg.startsWith('HS') ? createHmac('sha256', jwtSecret).update(data).digest()
        : cryptoSign(alg === 'ES256' ? 'sha256' : alg === 'RS384' ? 'sha384' : 'sha256', Buffer.from(data), alg === 'ES256' ? { key, dsaEncoding: 'ieee-p1363' } : key);
      return `Bearer ${data}.${sig.toString('base64url')}`;
    };
    const ann = { role: 'app_user', sub: 'ann' };
    const stranger = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
    const tokens = [
      sign('RS256', rsa.privateKey, ann, 'r1'), sign('RS256', rsa.privateKey, ann), sign('RS256', rsa.privateKey, ann, 'other-kid'),
      sign('ES256', ec.privateKey, { role: 'app_user', sub: 'bob' }, 'e1'), sign('RS256', stranger, ann, 'r1'), sign('RS384', rsa.privateKey, ann, 'r1'),
      sign('HS256', rsa.privateKey, ann), sign('RS256', rsa.privateKey, { ...ann, exp: 1000 }, 'r1'), sign('RS256', rsa.privateKey, { role: 'nobody_here' }, 'r1'),
    ];
    const diffs: string[] = [];
    for (const Authorization of tokens) {
      for (const path of ['/notes?select=owner,body', '/rpc/whoami']) {
        const r: TestRequest = { method: 'GET', path, headers: { Authorization } };
        const [theirs, mine] = [await send(`http://127.0.0.1:${theirsPort}`, r), await send(`http://127.0.0.1:${oursPort}`, r)];
        try {
          assert.deepEqual(mine, theirs);
        } catch {
          diffs.push(`${describe(r)}\n  postgrest: ${JSON.stringify(theirs)}\n  ours:      ${JSON.stringify(mine)}`);
        }
      }
    }
    assert.equal(diffs.length, 0, diffs.join('\n'));
    // and they did verify: ann and bob see their own notes
    assert.deepEqual(await (await fetch(`http://127.0.0.1:${oursPort}/notes?select=owner`, { headers: { Authorization: tokens[3] } })).json(), [{ owner: 'bob' }]);
  } finally {
    await ours2.close();
    await reference2.stop();
  }
});

test('schema cache reloads on NOTIFY pgrst, and prepared statements follow it', async () => {
  await fetch(`${oursUrl}/clients`); // the cache is loaded (when this test runs alone)
  await admin.query('create table late_table (id int primary key, v text)');
  await admin.query(`insert into late_table values (1, 'a'); grant select on late_table to web_anon`);
  assert.equal((await fetch(`${oursUrl}/late_table`)).status, 404); // not in the cache yet
  await admin.query(`notify pgrst, 'reload schema'`);
  const deadline = Date.now() + 5_000;
  let res: Response;
  do {
    res = await fetch(`${oursUrl}/late_table`);
  } while (res.status !== 200 && Date.now() < deadline && (await new Promise((r) => setTimeout(r, 50)), true));
  assert.equal(res.status, 200);
  assert.deepEqual(await res.json(), [{ id: 1, v: 'a' }]);
  // a column changing type: statements prepared for the old schema are not reused after the reload
  assert.deepEqual(await (await fetch(`${oursUrl}/late_table?id=eq.1`)).json(), [{ id: 1, v: 'a' }]);
  await admin.query(`alter table late_table alter column id type text; notify pgrst, 'reload schema'`);
  const after = Date.now() + 5_000;
  let body: unknown;
  do {
    body = await (await fetch(`${oursUrl}/late_table?id=eq.1`)).json();
  } while (JSON.stringify(body) !== '[{"id":"1","v":"a"}]' && Date.now() < after && (await new Promise((r) => setTimeout(r, 50)), true));
  assert.deepEqual(body, [{ id: '1', v: 'a' }]);
});

test('hostile filters, identifiers, JSON and headers: a clear 4xx, no crash, no SQL of theirs runs', async () => {
  await admin.query('create table if not exists fixture.canary (id int)');
  const evil = [`'; drop table fixture.canary; --`, `"; drop table fixture.canary; --`, `) or 1=1 --`, `\u0000`, `%00`, `\\`, `'`, `"`, `$1`, `$$`, '*/', '/*'];
  const requests: TestRequest[] = [];
  for (const e of evil) {
    const x = encodeURIComponent(e);
    requests.push(
      { method: 'GET', path: `/clients?id=eq.${x}` }, { method: 'GET', path: `/clients?name=eq.${x}` }, { method: 'GET', path: `/clients?${x}=eq.1` },
      { method: 'GET', path: `/clients?select=${x}` }, { method: 'GET', path: `/clients?select=id,${x}(name)` }, { method: 'GET', path: `/clients?order=${x}` },
      { method: 'GET', path: `/clients?select=id::${x}` }, { method: 'GET', path: `/clients?or=(${x})` }, { method: 'GET', path: `/clients?name=in.(${x},"${x}")` },
      { method: 'GET', path: `/${x}` }, { method: 'GET', path: `/rpc/${x}` }, { method: 'GET', path: `/rpc/add?${x}=1` },
      { method: 'GET', path: `/projects?select=meta->${x}` }, { method: 'GET', path: `/projects?meta->>${x}=eq.${x}` },
      { method: 'GET', path: `/clients?name=fts(${x}).${x}` }, { method: 'GET', path: '/clients', headers: { 'Accept-Profile': e.replace(/[^\x20-\x7e]/g, '') } },
      { method: 'POST', path: '/clients', headers: { 'Content-Type': 'application/json', Authorization: userToken() }, body: JSON.stringify({ [e]: 1 }) },
      { method: 'POST', path: `/clients?columns=${x}`, headers: { 'Content-Type': 'application/json', Authorization: userToken() }, body: '{"id": 1}' },
      { method: 'PATCH', path: `/clients?id=eq.${x}`, headers: { 'Content-Type': 'application/json', Authorization: userToken() }, body: JSON.stringify({ name: e }) },
      { method: 'GET', path: '/clients', headers: { Authorization: `Bearer ${x}` } },
    );
  }
  requests.push(
    { method: 'POST', path: '/clients', headers: { 'Content-Type': 'application/json', Authorization: userToken() }, body: '[1, 2, 3]' },
    { method: 'POST', path: '/clients', headers: { 'Content-Type': 'application/json', Authorization: userToken() }, body: '"text"' },
    { method: 'POST', path: '/clients', headers: { 'Content-Type': 'text/csv', Authorization: userToken() }, body: 'id,name\n1,a' },
    { method: 'GET', path: `/clients?select=${'a('.repeat(200)}${')'.repeat(200)}` }, { method: 'GET', path: `/clients?or=${'('.repeat(300)}` },
    { method: 'GET', path: `/clients?id=eq.${'9'.repeat(5000)}` }, { method: 'GET', path: '/clients?limit=99999999999999999999' },
    { method: 'GET', path: '/clients', headers: { Range: 'bytes=0-1' } }, { method: 'GET', path: '/clients', headers: { Prefer: 'count=everything, return=??' } },
  );
  for (const r of requests) {
    const res = await send(oursUrl, r);
    assert.ok(res.status < 500, `${describe(r)} -> ${res.status} ${res.body}`);
    if (res.status >= 400) {
      const body = JSON.parse(res.body);
      assert.equal(typeof body.code, 'string', `${describe(r)}: ${res.body}`);
      assert.equal(typeof body.message, 'string', `${describe(r)}: ${res.body}`);
    }
  }
  // the canary table is still there, and the server still answers
  await admin.query('select count(*) from fixture.canary');
  assert.equal((await send(oursUrl, { method: 'GET', path: '/clients?id=eq.1' })).status, 200);
});
