import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import { insertLookupRows, moveLookupRows, shardsByLookup, type LookupAccess } from '../../router/gateway/lookups.ts';
import { Planner, plannerReady } from '../../router/planner/planner.ts';
import { PgError } from '../../router/protocol/errors.ts';
import { hashKeyspaceId, parseVSchema, shardFor, xxhashKeyspaceId } from '../../schemas/index.ts';
import { LOOKUP_VSCHEMA } from '../support/lookup-vschema.ts';

const RANGES = [{ shard: '-80', start: '', end: '80' }, { shard: '80-', start: '80', end: '' }];
const planner = new Planner(parseVSchema(LOOKUP_VSCHEMA));

before(() => plannerReady);
const plan = (sql: string): any => planner.plan(sql)[0];
const ksid = (t: number) => `\\x${hashKeyspaceId(t).toString('hex')}`;

/** Records each statement; answers reads from `rows`, and a duplicate when an INSERT's parameters include `dup`. */
function fakeShards(rows: Buffer[][] = [], dup?: string) {
  const calls: Array<{ shard: string; sql: string; params: Array<string | null>; write: boolean }> = [];
  const access: LookupAccess = {
    ranges: RANGES,
    run: async (shard, sql, params, write) => {
      calls.push({ shard, sql, params, write });
      if (dup && sql.startsWith('INSERT') && params.includes(dup)) throw new PgError('ERROR', '23505', 'duplicate key value violates unique constraint "users_email_idx_pkey"', `Key (email)=(${dup}) already exists.`);
      return sql.startsWith('SELECT') ? rows.map((r) => [...r]) : sql.startsWith('DELETE') ? [[Buffer.from('1')]] : [];
    },
  };
  return { calls, access };
}

test('an INSERT writes one lookup row per row and vindex (none for NULL), grouped per lookup table and shard, in the transaction', async () => {
  const { calls, access } = fakeShards();
  const p = plan("INSERT INTO users (tenant_id, id, email, nick) VALUES (1, 1, 'a@x', 'kim'), ($1, 2, $2, NULL), (3, 3, NULL, 'kim')");
  await insertLookupRows(p, [[{ value: Buffer.from('2'), binary: false, typeOid: 0 }, { value: Buffer.from('b@x'), binary: false, typeOid: 0 }]], access);
  const emails = calls.filter((c) => c.sql.includes('users_email_idx'));
  assert.deepEqual(emails.flatMap((c) => c.params).filter((_, i) => i % 2 === 0).sort(), ['a@x', 'b@x']);
  for (const c of emails) {
    assert.equal(c.shard, shardFor(xxhashKeyspaceId(String(c.params[0])), RANGES), 'on the shard of the value');
    assert.ok(c.write);
  }
  const pairs = Object.fromEntries(emails.flatMap((c) => c.params.flatMap((v, i) => (i % 2 ? [] : [[v, c.params[i + 1]]]))));
  assert.deepEqual(pairs, { 'a@x': ksid(1), 'b@x': ksid(2) }, 'each value points at its row\'s keyspace id');
  const nicks = calls.filter((c) => c.sql.includes('users_nick_idx'));
  assert.deepEqual(nicks, [{ shard: '-80', sql: 'INSERT INTO "users_nick_idx" ("nick", "tenant_id") VALUES ($1, $2), ($3, $4)', params: ['kim', '1', 'kim', '3'], write: true }]);
});

test('a duplicate on a unique lookup is 23505 naming the vindex, the owner column and the lookup table', async () => {
  const { access } = fakeShards([], 'a@x');
  const err = await insertLookupRows(plan("INSERT INTO users (tenant_id, id, email, nick) VALUES (1, 1, 'a@x', NULL)"), [undefined], access).catch((e) => e);
  assert.equal(err.code, '23505');
  assert.equal(err.message, 'duplicate key value violates unique lookup vindex email of users.email');
  assert.match(err.detail, /^Key \(email\)=\(a@x\) already exists in lookup table users_email_idx \(shard (-80|80-)\)\.$/);
});

test('UPDATE moves the lookup rows of the rows it changes; DELETE removes one lookup row per owner row', async () => {
  // The rows as the statement's SELECT reads them: the primary vindex column, then each changed lookup's column.
  const u = fakeShards();
  await moveLookupRows(plan("UPDATE users SET nick = 'lee' WHERE tenant_id = 1").owned, [[Buffer.from('1'), Buffer.from('kim')], [Buffer.from('1'), Buffer.from('kim')]], undefined, u.access);
  assert.deepEqual(u.calls.map((c) => [c.sql.split(' ')[0], c.params]), [['DELETE', ['kim', '1']], ['DELETE', ['kim', '1']], ['INSERT', ['lee', '1', 'lee', '1']]]);
  assert.match(u.calls[0].sql, /^DELETE FROM "users_nick_idx" WHERE ctid = \(SELECT ctid FROM "users_nick_idx" WHERE "nick" = \$1 AND "tenant_id" = \$2 LIMIT 1 FOR UPDATE SKIP LOCKED\)/);
  const same = fakeShards();
  await moveLookupRows(plan("UPDATE users SET email = 'a@x' WHERE tenant_id = 1 AND id = 1").owned, [[Buffer.from('1'), Buffer.from('a@x')]], undefined, same.access);
  assert.deepEqual(same.calls, [], 'an unchanged value moves nothing');
  const d = fakeShards();
  await moveLookupRows(plan('DELETE FROM users WHERE tenant_id = 1').owned, [[Buffer.from('1'), null, Buffer.from('kim')]], undefined, d.access);
  assert.deepEqual(d.calls.map((c) => [c.shard, c.params]), [['-80', ['kim', '1']]], 'a NULL value has no lookup row');
});

test('a lookup pin becomes the shards of the owner rows its lookup table names; none found: the first shard', async () => {
  const two = [1, 2, 3, 4, 5, 6, 7, 8].find((t) => shardFor(hashKeyspaceId(t), RANGES) === '80-')!;
  const email = fakeShards([[Buffer.from(hashKeyspaceId(two).toString('hex'))]]);
  assert.deepEqual(await shardsByLookup(plan("SELECT * FROM users WHERE email IN ('a@x', 'a@x')").pin, undefined, email.access), ['80-']);
  assert.deepEqual(email.calls.map((c) => [c.sql, c.params, c.write]), [['SELECT encode("keyspace_id", \'hex\') FROM "users_email_idx" WHERE "email" IN ($1)', ['a@x'], false]]);
  const nick = fakeShards([[Buffer.from('1')], [Buffer.from(String(two))]]);
  assert.deepEqual(await shardsByLookup(plan('SELECT * FROM users WHERE nick = $1').pin, [{ value: Buffer.from('kim'), binary: false, typeOid: 0 }], nick.access),
    [shardFor(hashKeyspaceId(1), RANGES), '80-'].filter((s, i, a) => a.indexOf(s) === i).sort());
  assert.equal(nick.calls[0].shard, '-80', 'an undeclared lookup table lives on the first shard');
  assert.deepEqual(await shardsByLookup(plan("SELECT * FROM users WHERE email = 'none'").pin, undefined, fakeShards().access), ['-80']);
});
