import assert from 'node:assert/strict';
import { createCipheriv, randomBytes } from 'node:crypto';
import test from 'node:test';
import {
  applyTopologyEvent, emptyTopology, hashKeyspaceId, identityKeyspaceId, ownedLookups, parseVSchema, payload, shardFor, topologyKey, xxhashKeyspaceId,
  type TopologyEvent,
} from '../../schemas/index.ts';

const TWO = [{ shard: '-80', start: '', end: '80' }, { shard: '80-', start: '80', end: '' }];

test('hash gives Vitess keyspace ids (3DES of the uint64 under a null key)', () => {
  assert.equal(hashKeyspaceId(1).toString('hex'), '166b40b44aba4bd6');
  assert.equal(hashKeyspaceId('1').toString('hex'), '166b40b44aba4bd6');
  assert.equal(hashKeyspaceId(1n).toString('hex'), '166b40b44aba4bd6');
  assert.equal(hashKeyspaceId(-1).toString('hex'), hashKeyspaceId(2n ** 64n - 1n).toString('hex'));
  assert.throws(() => hashKeyspaceId('abc'), /vindex hash needs an integer, not "abc"/);
  assert.throws(() => hashKeyspaceId(2n ** 64n), /outside 64 bits/);
});

test('hash computed in JavaScript gives what OpenSSL\'s 3DES (EDE, ECB, null key) gives', () => {
  const des = createCipheriv('des-ede3-ecb', Buffer.alloc(24), null);
  des.setAutoPadding(false);
  const edges = [0n, 1n, 2n ** 32n - 1n, 2n ** 32n, 2n ** 63n - 1n, 2n ** 63n, 2n ** 64n - 1n];
  const values = [...edges, ...Array.from({ length: 20_000 }, (_, i) => (i < 10_000 ? BigInt(i) : randomBytes(8).readBigUInt64BE()))];
  for (const v of values) {
    const block = Buffer.alloc(8);
    block.writeBigUInt64BE(v);
    assert.equal(hashKeyspaceId(v).toString('hex'), des.update(block).toString('hex'), `hash of ${v}`);
  }
});

test('hash reads integers written in decimal without BigInt and gets the same keyspace ids', () => {
  const values = [0, 1, -1, 42, -42, 999_999_999_999_999, -999_999_999_999_999, 2 ** 32, -(2 ** 32), 2 ** 32 - 1, Number.MAX_SAFE_INTEGER, Number.MIN_SAFE_INTEGER,
    ...Array.from({ length: 2000 }, () => Math.floor((Math.random() - 0.5) * 2 * Number.MAX_SAFE_INTEGER))];
  for (const n of values) {
    const want = hashKeyspaceId(BigInt(n)).toString('hex');
    assert.equal(hashKeyspaceId(n).toString('hex'), want, `number ${n}`);
    assert.equal(hashKeyspaceId(String(n)).toString('hex'), want, `text ${n}`);
    assert.equal(hashKeyspaceId(Buffer.from(String(n))).toString('hex'), want, `bytes ${n}`);
    assert.equal(hashKeyspaceId(` ${n} `).toString('hex'), want, `text with spaces ${n}`);
  }
  assert.equal(hashKeyspaceId('1234567890123456').toString('hex'), hashKeyspaceId(1234567890123456n).toString('hex'));
  assert.equal(hashKeyspaceId('-0').toString('hex'), hashKeyspaceId(0n).toString('hex'));
  assert.equal(hashKeyspaceId('0x10').toString('hex'), hashKeyspaceId(16n).toString('hex'));
  for (const bad of ['-', '1.5', '1e3', '--1', 'abc']) assert.throws(() => hashKeyspaceId(bad), /vindex hash needs an integer/, JSON.stringify(bad));
  assert.throws(() => hashKeyspaceId(1.5), /vindex hash needs an integer/);
});

test('xxhash is xxHash64 of the bytes; identity is the integer itself', () => {
  assert.equal(xxhashKeyspaceId('test').toString('hex'), '4fdcca5ddb678139');
  assert.equal(xxhashKeyspaceId(Buffer.from('test')).toString('hex'), '4fdcca5ddb678139');
  assert.equal(identityKeyspaceId(0x80n << 56n).toString('hex'), '8000000000000000');
});

test('keyspace ids map to the shard whose range holds them, and spread evenly', () => {
  assert.equal(shardFor(Buffer.from('7fffffffffffffff', 'hex'), TWO), '-80');
  assert.equal(shardFor(Buffer.from('8000000000000000', 'hex'), TWO), '80-');
  assert.equal(shardFor(Buffer.alloc(8), [{ shard: '-', start: '', end: '' }]), '-');
  const counts = { '-80': 0, '80-': 0 } as Record<string, number>;
  for (let i = 1; i <= 10_000; i++) counts[shardFor(hashKeyspaceId(i), TWO)]++;
  assert.ok(counts['-80'] > 4_700 && counts['80-'] > 4_700, JSON.stringify(counts));
});

const good = {
  vindexes: { hash: { type: 'hash' }, email_lookup: { type: 'consistent_lookup_unique', params: { table: 'users_email_idx', from: 'email', to: 'keyspace_id' }, owner: 'users' } },
  tables: {
    users: { column_vindexes: [{ column: 'tenant_id', name: 'hash' }, { column: 'email', name: 'email_lookup' }] },
    products: { type: 'reference' },
  },
  routines: { add_order: { argument: 0, vindex: 'hash' } },
};

test('a valid VSchema parses with defaults', () => {
  const v = parseVSchema(good);
  assert.equal(v.tables.users.type, 'sharded');
  assert.equal(v.tables.products.type, 'reference');
  assert.deepEqual(v.sequences, {});
});

test('a bad VSchema gets errors naming the table, column or vindex', () => {
  const bad = (raw: unknown, re: RegExp) => assert.throws(() => parseVSchema(raw), re);
  bad({ tables: { orders: { column_vindexes: [{ column: 'tenant_id', name: 'nope' }] } } }, /table orders, column tenant_id: vindex nope is not defined/);
  bad({ tables: { orders: {} } }, /table orders: a sharded table needs a primary vindex/);
  bad({ vindexes: { h: { type: 'md5' } } }, /vindex h \(type\): Invalid enum value/);
  bad({ vindexes: { l: { type: 'lookup' } } }, /vindex l \(params\): a lookup vindex needs params/);
  bad({ ...good, tables: { users: { column_vindexes: [{ column: 'email', name: 'email_lookup' }] } } }, /table users, column email: the primary vindex email_lookup must be hash, xxhash or identity/);
  bad({ tables: { Users: {} } }, /tables.Users|must be a lower-case SQL identifier/);
  bad({ vindexes: { hash: { type: 'hash' } }, tables: { t: { column_vindexes: [{ column: 'id', name: 'hash' }], auto_increment: { column: 'id', sequence: 's' } } } }, /table t, column id: sequence s is not defined/);
  bad({ routines: { f: { argument: 0, vindex: 'x' } } }, /routine f: vindex x is not defined/);
  bad({ vindexes: { hash: { type: 'hash' } }, tables: { t: { column_vindexes: [{ column: 'id', name: 'hash' }], columns: ['name'] } } }, /table t: columns does not list id, a vindex column/);
  bad({ vindexes: { hash: { type: 'hash' } }, tables: { t: { column_vindexes: [{ column: 'id', name: 'hash' }], columns: ['id', 'id'] } } }, /table t: columns lists a column twice/);
});

test('VSchemaApplied folds by version, keyed vschema/<db>', () => {
  const ev = (version: bigint, vschema: unknown): TopologyEvent => ({
    eventId: String(version), ts: new Date(0), source: 't',
    payload: payload('VSchemaApplied', { database: 'shop', version, vschema: JSON.stringify(vschema) }),
  });
  const state = emptyTopology();
  applyTopologyEvent(state, ev(2n, good));
  applyTopologyEvent(state, ev(1n, {})); // older: ignored
  assert.equal(state.vschemas.get('shop')?.version, 2n);
  assert.ok(state.vschemas.get('shop')?.vschema.tables.users);
  applyTopologyEvent(state, ev(3n, { tables: { x: {} } })); // invalid: ignored
  assert.equal(state.vschemas.get('shop')?.version, 2n);
  assert.equal(topologyKey(ev(1n, {})), 'vschema/shop');
});

test('lookup vindexes: owned by the table that lists them; the lookup table is sharded by its from column or left on the first shard', () => {
  const lookup = (extra: Record<string, unknown>) => ({
    vindexes: {
      hash: { type: 'hash' }, text_hash: { type: 'xxhash' },
      email: { type: 'consistent_lookup_unique', params: { table: 'users_email_idx', from: 'email', to: 'keyspace_id' }, owner: 'users' },
      ...(extra.vindexes as object ?? {}),
    },
    tables: { users: { column_vindexes: [{ column: 'tenant_id', name: 'hash' }, { column: 'email', name: 'email' }] }, ...(extra.tables as object ?? {}) },
  });
  const bad = (raw: unknown, re: RegExp) => assert.throws(() => parseVSchema(raw), re);
  bad(lookup({ vindexes: { email: { type: 'lookup', params: { table: 'x', from: 'a', to: 'b' } } } }), /vindex email: a lookup vindex needs an owner table/);
  bad(lookup({ vindexes: { nick: { type: 'lookup', params: { table: 'nick_idx', from: 'nick', to: 'keyspace_id' }, owner: 'users' } } }),
    /vindex nick: owner table users does not list it in its column_vindexes/);
  bad(lookup({ tables: { orders: { column_vindexes: [{ column: 'tenant_id', name: 'hash' }, { column: 'email', name: 'email' }] } } }),
    /table orders, column email: lookup vindex email is owned by table users/);
  bad(lookup({ tables: { users_email_idx: { column_vindexes: [{ column: 'keyspace_id', name: 'hash' }] } } }),
    /vindex email: lookup table users_email_idx must be sharded by its from column email with a hash or xxhash vindex/);
  bad(lookup({ tables: { users_email_idx: { type: 'reference' } } }), /vindex email: lookup table users_email_idx cannot be a reference table/);
  bad(lookup({ vindexes: { email: { type: 'consistent_lookup_unique', params: { table: 'users', from: 'email', to: 'email' }, owner: 'users' } } }),
    /vindex email \(params\): from and to must be different columns[\s\S]*vindex email \(params.table\): the lookup table cannot be its owner table users/);

  const onFirst = ownedLookups(parseVSchema(lookup({})), 'users');
  assert.deepEqual(onFirst.map((l) => [l.vindex, l.type, l.column, l.table, l.toIsPrimaryColumn, l.sharding]),
    [['email', 'consistent_lookup_unique', 'email', 'users_email_idx', false, undefined]]);
  const sharded = parseVSchema(lookup({
    vindexes: { email: { type: 'consistent_lookup_unique', params: { table: 'users_email_idx', from: 'email', to: 'tenant_id' }, owner: 'users' } },
    tables: { users_email_idx: { column_vindexes: [{ column: 'email', name: 'text_hash' }] } },
  }));
  const [l] = ownedLookups(sharded, 'users');
  assert.deepEqual([l.toIsPrimaryColumn, l.primary, l.sharding], [true, { column: 'tenant_id', type: 'hash' }, { vindex: 'text_hash', type: 'xxhash' }]);
  assert.deepEqual(ownedLookups(sharded, 'users_email_idx'), []);
  assert.equal(l.writeOnly, false);

  // write_only: kept by writes, not routed by (while a backfill fills the lookup table; decision 0059).
  const writeOnly = (value: unknown) => lookup({ vindexes: { email: { type: 'consistent_lookup_unique', params: { table: 'users_email_idx', from: 'email', to: 'keyspace_id', write_only: value }, owner: 'users' } } });
  assert.equal(ownedLookups(parseVSchema(writeOnly(true)), 'users')[0].writeOnly, true);
  assert.equal(ownedLookups(parseVSchema(writeOnly(false)), 'users')[0].writeOnly, false);
  bad(writeOnly('yes'), /vindex email \(params.write_only\): Expected boolean, received string/);
  bad(lookup({ vindexes: { hash: { type: 'hash', params: { table: 't', from: 'a', to: 'b', write_only: true } } } }), /vindex hash \(params\): a hash vindex takes no params/);
});
