import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import { fillSequence, idsNeeded, type InsertPlan } from '../../router/planner/plan.ts';
import { Planner, plannerReady } from '../../router/planner/planner.ts';
import { SequenceBlocks, takeBlockSql } from '../../router/gateway/sequences.ts';
import { renumberParams } from '../../router/planner/sqltext.ts';
import { parseVSchema } from '../../schemas/index.ts';

const vschema = parseVSchema({
  vindexes: { hash: { type: 'hash' } },
  tables: {
    orders: { column_vindexes: [{ column: 'tenant_id', name: 'hash' }], auto_increment: { column: 'id', sequence: 'order_seq' } },
    tenants: { column_vindexes: [{ column: 'id', name: 'hash' }], auto_increment: { column: 'id', sequence: 'tenant_seq' } },
  },
  sequences: { order_seq: { cache: 10 }, tenant_seq: {} },
});
let planner: Planner;
before(async () => {
  await plannerReady;
  planner = new Planner(vschema);
});
const insert = (sql: string) => planner.plan(sql)[0] as InsertPlan;
const whole = (p: InsertPlan) => Buffer.concat([p.prefix, ...p.rows.flatMap((r, i) => (i ? [Buffer.from(', '), r] : [r])), p.suffix]).toString();

test('an INSERT without its auto-increment column gets the column and one id per row', () => {
  const p = insert('INSERT INTO orders (tenant_id, "total") VALUES (1, 5), ($1, 6) RETURNING id');
  assert.equal(idsNeeded(p.sequence!, p.rows.length), 2);
  const filled = fillSequence(p, ['101', '102']);
  assert.equal(whole(filled), 'INSERT INTO orders (tenant_id, "total", id) VALUES (1, 5, 101), ($1, 6, 102) RETURNING id');
  assert.equal(filled.sequence, undefined);
  assert.deepEqual(filled.pin.values, p.pin.values, 'the sequence column does not place orders rows');
});

test('DEFAULT in the auto-increment column is replaced row by row; explicit ids stay', () => {
  const p = insert('INSERT INTO orders (tenant_id, id) VALUES (1, DEFAULT), (2, 77), (3, default)');
  assert.equal(idsNeeded(p.sequence!, p.rows.length), 2);
  assert.equal(whole(fillSequence(p, ['5', '6'])), 'INSERT INTO orders (tenant_id, id) VALUES (1, 5), (2, 77), (3, 6)');
  assert.equal(insert('INSERT INTO orders (tenant_id, id) VALUES (1, 2)').sequence, undefined);
});

test('when the sequence column is the primary vindex column, the filled id places the row', () => {
  const p = insert("INSERT INTO tenants (name) VALUES ('a'), ('b')");
  const filled = fillSequence(p, ['1', '2']);
  assert.deepEqual(filled.pin.values, [{ literal: '1' }, { literal: '2' }]);
  assert.equal(whole(filled), "INSERT INTO tenants (name, id) VALUES ('a', 1), ('b', 2)");
  const mixed = fillSequence(insert('INSERT INTO tenants (id, name) VALUES (DEFAULT, $1), (9, $2)'), ['3']);
  assert.deepEqual(mixed.pin.values, [{ literal: '3' }, { literal: '9' }]);
});

test('blocks: one fetch serves `cache` ids; concurrent takers share a fetch; ids never repeat', async () => {
  let next = 1;
  const fetched: string[] = [];
  const blocks = new SequenceBlocks();
  const query = async (sql: string) => {
    fetched.push(sql);
    await new Promise((r) => setTimeout(r, 5));
    const start = next;
    next += 10;
    return String(start);
  };
  const got = await Promise.all([blocks.take('db', 's', 10, 4, query), blocks.take('db', 's', 10, 4, query), blocks.take('db', 's', 10, 4, query)]);
  const all = got.flat().map(Number);
  assert.equal(new Set(all).size, 12);
  assert.deepEqual([...all].sort((a, b) => a - b), Array.from({ length: 12 }, (_, i) => i + 1));
  assert.equal(fetched.length, 2);
  assert.equal(fetched[0], takeBlockSql('s', 10));
});

test('the first use creates the sequence table, then takes the block', async () => {
  const seen: string[] = [];
  let created = false;
  const blocks = new SequenceBlocks();
  const ids = await blocks.take('db', 's', 3, 2, async (sql) => {
    seen.push(sql.slice(0, 11));
    if (sql.startsWith('CREATE')) created = true;
    else if (!created) throw Object.assign(new Error('relation does not exist'), { code: '42P01' });
    return '1';
  });
  assert.deepEqual(ids, ['1', '2']);
  assert.deepEqual(seen, ['INSERT INTO', 'CREATE SCHE', 'INSERT INTO']);
});

test('a shard given some rows of a multi-row INSERT gets their parameters renumbered from $1', () => {
  const r = renumberParams(Buffer.from("INSERT INTO t (a, b) VALUES ($3, '$1'), ($4, $3) RETURNING $9 -- $2"));
  assert.equal(r.text.toString(), "INSERT INTO t (a, b) VALUES ($1, '$1'), ($2, $1) RETURNING $3 -- $2");
  assert.deepEqual(r.used, [3, 4, 9]);
});
