// PostgREST's request language (router/rest/parse.ts) and JWTs (router/rest/jwt.ts), without a database.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { RestError } from '../../router/rest/errors.ts';
import { authenticate } from '../../router/rest/jwt.ts';
import { parsePrefer, parseQuery, parseRange, parseSelect } from '../../router/rest/parse.ts';
import { signJwt } from '../support/rest-requests.ts';

const secret = 'a-test-secret-of-at-least-32-characters!';

test('select: columns, renames, casts, JSON paths, embeds with hints and !inner', () => {
  assert.deepEqual(parseSelect('id,nm:name,budget::text,meta->lead->>name,c:clients!fk_c!inner(name,projects(*)),...users!inner(n:name)'), [
    { kind: 'field', field: { column: 'id', json: [] }, alias: undefined, cast: undefined },
    { kind: 'field', field: { column: 'name', json: [] }, alias: 'nm', cast: undefined },
    { kind: 'field', field: { column: 'budget', json: [] }, alias: undefined, cast: 'text' },
    { kind: 'field', field: { column: 'meta', json: [{ arrow: '->', key: 'lead' }, { arrow: '->>', key: 'name' }] }, alias: undefined, cast: undefined },
    { kind: 'embed', name: 'clients', alias: 'c', hint: 'fk_c', inner: true, spread: false, select: [
      { kind: 'field', field: { column: 'name', json: [] }, alias: undefined, cast: undefined },
      { kind: 'embed', name: 'projects', alias: undefined, hint: undefined, inner: false, spread: false, select: [{ kind: 'star' }] },
    ] },
    { kind: 'embed', name: 'users', alias: undefined, hint: undefined, inner: true, spread: true, select: [
      { kind: 'field', field: { column: 'name', json: [] }, alias: 'n', cast: undefined },
    ] },
  ]);
  assert.throws(() => parseSelect('id::text;drop'), (e: RestError) => e.code === 'PGRST100');
});

test('filters: operators, not, in-lists with quotes, nested and/or, embedded paths', () => {
  const q = parseQuery([['id', 'not.in.(1,"a,b")'], ['or', '(a.eq.1,not.and(b.is.null,c.fts(english).cat))'], ['projects.id', 'gte.3'], ['projects.order', 'id.desc.nullslast']]);
  const top = q.nodes.get('')!;
  assert.deepEqual(top.where[0], { kind: 'filter', field: { column: 'id', json: [] }, negate: true, op: 'in', value: ['1', 'a,b'] });
  assert.equal(top.where[1].kind, 'logic');
  const logic = top.where[1] as Extract<typeof top.where[1], { kind: 'logic' }>;
  assert.equal(logic.op, 'or');
  assert.deepEqual(logic.children[1], { kind: 'logic', op: 'and', negate: true, children: [
    { kind: 'filter', field: { column: 'b', json: [] }, negate: false, op: 'is', config: undefined, value: 'null' },
    { kind: 'filter', field: { column: 'c', json: [] }, negate: false, op: 'fts', config: 'english', value: 'cat' },
  ] });
  assert.deepEqual(q.nodes.get('projects')!.order, [{ field: { column: 'id', json: [] }, dir: 'desc', nulls: 'last' }]);
  for (const bad of ['xx.1', 'in.1,2', 'is.maybe', 'eq']) {
    assert.throws(() => parseQuery([['id', bad]]), (e: RestError) => e.code === 'PGRST100' && e.status === 400, bad);
  }
});

test('Prefer and Range headers', () => {
  assert.deepEqual(parsePrefer('return=representation, count=exact,resolution=merge-duplicates, bogus=1'),
    { return: 'representation', count: 'exact', resolution: 'merge-duplicates' });
  assert.deepEqual(parseRange('2-5'), { offset: 2, limit: 4 });
  assert.deepEqual(parseRange('3-'), { offset: 3 });
  assert.throws(() => parseRange('5-2'), (e: RestError) => e.status === 416);
});

test('JWT: HS256 signature, expiry, role claim, anonymous role', () => {
  const now = Date.now();
  assert.deepEqual(authenticate(undefined, { secret, anonRole: 'anon' }), { role: 'anon', claims: { role: 'anon' }, authenticated: false });
  const ok = authenticate(`Bearer ${signJwt({ role: 'app', sub: 'x' })}`, { secret, anonRole: 'anon' });
  assert.deepEqual(ok, { role: 'app', claims: { role: 'app', sub: 'x' }, authenticated: true });
  const expired = signJwt({ role: 'app', exp: Math.floor(now / 1000) - 3600 });
  assert.throws(() => authenticate(`Bearer ${expired}`, { secret }, now), (e: RestError) => e.code === 'PGRST301' && e.message === 'JWT expired');
  const forged = signJwt({ role: 'postgres' }, 'another-secret-of-at-least-32-characters');
  assert.throws(() => authenticate(`Bearer ${forged}`, { secret }), (e: RestError) => e.status === 401 && e.message === 'JWSError JWSInvalidSignature');
  assert.throws(() => authenticate(undefined, { secret }), (e: RestError) => e.code === 'PGRST302');
});
