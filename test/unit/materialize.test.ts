import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import type pg from 'pg';
import type { RawMessage } from '../../common/eventlog.ts';
import { TableApplier, type Op } from '../../materializer/apply.ts';
import type { Change, ChangeDecoder, Row } from '../../materializer/changes.ts';
import { inSnapshot, MaterializeShape, snapshotPoint, type Materialization } from '../../materializer/materialize.ts';
import { parseMaterializeQuery, queryParserReady } from '../../materializer/query.ts';

before(() => queryParserReady);

test('the SELECT of a Materialize: projections, filters and count/sum per group are understood', () => {
  const p = parseMaterializeQuery("SELECT id, customer_id AS cust, amount FROM orders WHERE status <> 'cancelled';");
  assert.deepEqual(p.columns, [
    { name: 'id', kind: 'column', source: 'id' }, { name: 'cust', kind: 'column', source: 'customer_id' }, { name: 'amount', kind: 'column', source: 'amount' },
  ]);
  assert.deepEqual([p.source, p.groupBy, p.where, p.filter, p.alias, p.hasAlias], [{ schema: 'public', table: 'orders' }, null, true, " WHERE status <> 'cancelled'", 'orders', false]);

  const g = parseMaterializeQuery('SELECT o.customer_id, count(*) AS n, sum(o.amount) AS total FROM shop.orders AS o WHERE lower(o.note) = \'x\' GROUP BY o.customer_id');
  assert.deepEqual(g.columns, [
    { name: 'customer_id', kind: 'column', source: 'customer_id' }, { name: 'n', kind: 'count' }, { name: 'total', kind: 'sum', source: 'amount' },
  ]);
  assert.deepEqual([g.source, g.groupBy, g.functions, g.filter, g.alias], [{ schema: 'shop', table: 'orders' }, ['customer_id'], ['lower'], " AS o WHERE lower(o.note) = 'x'", 'o']);

  const star = parseMaterializeQuery('SELECT * FROM "Orders"');
  assert.deepEqual([star.star, star.where, star.filter, star.source.table], [true, false, '', 'Orders']);
});

test('the SELECT of a Materialize: what it cannot keep up to date is refused, naming it', () => {
  const refusals: Array<[string, RegExp]> = [
    ['SELECT o.id FROM orders o JOIN items i ON i.order_id = o.id', /does not support joins/],
    ['SELECT id FROM orders, items', /more than one table/],
    ['SELECT id FROM (SELECT id FROM orders) s', /subqueries in FROM/],
    ['SELECT id FROM orders WHERE id IN (SELECT order_id FROM items)', /does not support subqueries/],
    ['SELECT id FROM orders WHERE day = current_date', /non-deterministic functions \(CURRENT_DATE\)/],
    ['SELECT id FROM orders WHERE id = $1', /parameters/],
    ['SELECT id FROM orders ORDER BY id', /ORDER BY/],
    ['SELECT id FROM orders LIMIT 5', /LIMIT/],
    ['SELECT DISTINCT id FROM orders', /DISTINCT/],
    ['SELECT id FROM orders UNION SELECT id FROM items', /UNION/],
    ['SELECT customer_id, max(amount) FROM orders GROUP BY customer_id', /max\(\) in the select list/],
    ['SELECT customer_id, avg(amount) FROM orders GROUP BY customer_id', /avg\(\)/],
    ['SELECT customer_id, count(amount) FROM orders GROUP BY customer_id', /count\(expression\)/],
    ['SELECT customer_id, count(DISTINCT amount) FROM orders GROUP BY customer_id', /DISTINCT, FILTER/],
    ['SELECT customer_id, count(*), sum(amount * 2) FROM orders GROUP BY customer_id', /sum\(\) of anything other than a column/],
    ['SELECT id, row_number() OVER () FROM orders', /window functions/],
    ['SELECT id + 1 FROM orders', /an expression in the select list/],
    ['SELECT customer_id, count(*) FROM orders GROUP BY customer_id HAVING count(*) > 1', /HAVING/],
    ['SELECT customer_id, status, count(*) FROM orders GROUP BY customer_id', /column status must appear in GROUP BY/],
    ['SELECT count(*) FROM orders GROUP BY customer_id', /GROUP BY column customer_id must be in the select list/],
    ['SELECT count(*) FROM orders', /aggregates without GROUP BY/],
    ['SELECT customer_id, sum(amount) FROM orders GROUP BY customer_id', /needs count\(\*\)/],
    ['SELECT id, customer_id AS id FROM orders', /names id twice/],
    ['SELECT x.id FROM orders o', /column reference x.id/],
    ['SELECT id FROM mg_materializer.positions', /internal/],
    ['UPDATE orders SET id = 1', /must be a SELECT/],
    ['SELECT id FROM orders; SELECT 1', /one SELECT statement/],
    ['SELECT FROM WHERE', /does not parse/],
  ];
  for (const [sql, message] of refusals) assert.throws(() => parseMaterializeQuery(sql), message, sql);
  // Functions are looked up in the source's catalog at create time (immutable ones only): the parse names them.
  assert.deepEqual(parseMaterializeQuery("SELECT id FROM orders WHERE at > now() - interval '1 day'").functions, ['now']);
});

/** orders(id, customer_id, amount, status) materialized as count(*)/sum(amount) per customer of the orders not cancelled. */
function totals(where = true): Materialization {
  const sql = `SELECT customer_id, count(*) AS n, sum(amount) AS total FROM orders${where ? " WHERE status <> 'cancelled'" : ''} GROUP BY customer_id`;
  const column = (name: string, type: string) => ({ name, type, notNull: true });
  return {
    query: parseMaterializeQuery(sql), aggregate: true,
    columns: [{ name: 'customer_id', kind: 'column', source: 'customer_id' }, { name: 'n', kind: 'count' }, { name: 'total', kind: 'sum', source: 'amount' }],
    source: { schema: 'public', table: 'orders', sql: '"public"."orders"', key: ['id'], columns: [column('id', 'bigint'), column('customer_id', 'integer'), column('amount', 'numeric(10,2)'), column('status', 'text')] },
    target: {
      schema: 'public', table: 'customer_totals', sql: '"public"."customer_totals"', key: ['customer_id'], vindex: { column: 'customer_id', type: 'hash' },
      columns: [column('customer_id', 'integer'), column('n', 'bigint'), column('total', 'numeric')],
    },
  };
}

/** A source session that evaluates the test's WHERE (status <> 'cancelled') over the row set it is sent, as Postgres would. */
function evaluator() {
  let queries = 0;
  const query = async (q: { text: string; values: unknown[][] }) => {
    queries++;
    assert.match(q.text, /^SELECT _mg_ord FROM \(SELECT u\._mg_ord, u\.c0::bigint AS "id", .* FROM unnest\(\$1::int\[\], \$2::text\[\].*\) AS "orders" WHERE status <> 'cancelled'$/s);
    const [ords, , , , status] = q.values;
    return { rows: (ords as number[]).filter((_, i) => status[i] !== 'cancelled').map((o) => ({ _mg_ord: String(o) })) };
  };
  return { client: { query } as unknown as pg.Client, queries: () => queries };
}

let lsn = 100n;
const change = (op: Change['op'], before: Row | null, after: Row | null, txId: bigint | null = null): Change => ({
  op, before, after, unavailable: [], sourceShard: '-80', epoch: 1n, commitLsn: lsn++, position: 0n, txId, commitMs: 0,
});
const order = (id: number, customer: number, amount: string, status = 'open'): Row => ({ id: String(id), customer_id: String(customer), amount, status });

test('aggregate arithmetic: each change adds its new row and takes back its old one, filtered by the WHERE; the totals equal the query on the final rows', async () => {
  const ev = evaluator();
  const shape = new MaterializeShape(totals(), ev.client);
  const changes = [
    change('c', null, order(1, 7, '10.00')),
    change('c', null, order(2, 7, '2.50')),
    change('r', null, order(3, 8, '4.00')),
    change('u', order(1, 7, '10.00'), order(1, 7, '11.25')), // amount changed
    change('u', order(2, 7, '2.50'), order(2, 8, '2.50')), // the group key changed: the contribution moves
    change('u', order(3, 8, '4.00'), order(3, 8, '4.00', 'cancelled')), // leaves the filter
    change('c', null, order(4, 9, '1.00', 'cancelled')), // never in
    change('u', order(4, 9, '1.00', 'cancelled'), order(4, 9, '1.00')), // enters the filter
    change('d', order(1, 7, '11.25'), null),
  ];
  const ops = await shape.opsOf(changes);
  assert.equal(ev.queries(), 1, 'one query evaluates the WHERE for the whole batch');
  assert.deepEqual(ops[4], [
    { kind: 'delta', row: { customer_id: '7', n: '1', total: '2.50' }, sign: -1 },
    { kind: 'delta', row: { customer_id: '8', n: '1', total: '2.50' }, sign: 1 },
  ]);
  assert.deepEqual(ops[6], [], 'a row the WHERE leaves out contributes nothing');
  // Folding the deltas (what the INSERT ... ON CONFLICT adds up) gives the GROUP BY of the final rows.
  const groups = new Map<string, { n: number; cents: number }>();
  for (const op of ops.flat() as Array<Extract<Op, { kind: 'delta' }>>) {
    const g = groups.get(op.row.customer_id!) ?? { n: 0, cents: 0 };
    g.n += op.sign * Number(op.row.n);
    g.cents += op.sign * Math.round(Number(op.row.total) * 100);
    groups.set(op.row.customer_id!, g);
  }
  const final = [order(2, 8, '2.50'), order(3, 8, '4.00', 'cancelled'), order(4, 9, '1.00')].filter((o) => o.status !== 'cancelled');
  const expected = new Map<string, { n: number; cents: number }>([['7', { n: 0, cents: 0 }]]);
  for (const o of final) {
    const g = expected.get(o.customer_id!) ?? { n: 0, cents: 0 };
    g.n++;
    g.cents += Math.round(Number(o.amount) * 100);
    expected.set(o.customer_id!, g);
  }
  assert.deepEqual(groups, expected, 'customer 7 reaches count 0 (its row is deleted)');

  await assert.rejects(shape.opsOf([change('t', null, null)]), /TRUNCATE .* cannot be subtracted/);
  await assert.rejects(shape.opsOf([change('d', null, null)]), /REPLICA IDENTITY FULL/);
});

test('projection: an update that moves a row out of the WHERE deletes it at the target, into it upserts it', async () => {
  const m = totals();
  const projection: Materialization = {
    ...m, aggregate: false, query: parseMaterializeQuery("SELECT id, customer_id AS cust FROM orders WHERE status <> 'cancelled'"),
    columns: [{ name: 'id', kind: 'column', source: 'id' }, { name: 'cust', kind: 'column', source: 'customer_id' }],
  };
  const shape = new MaterializeShape(projection, evaluator().client);
  const ops = await shape.opsOf([
    change('u', null, order(1, 7, '1.00', 'cancelled')),
    change('u', null, order(1, 7, '1.00')),
    change('d', { id: '1', customer_id: null, amount: null, status: null }, null),
  ]);
  assert.deepEqual(ops, [
    [{ kind: 'delete', key: { id: '1', cust: '7' } }],
    [{ kind: 'upsert', row: { id: '1', cust: '7' } }],
    [{ kind: 'delete', key: { id: '1', cust: null } }],
  ]);
});

test('an aggregate\'s copy snapshot: a change it holds is not added again on that target shard; one committed after it is', () => {
  const point = snapshotPoint('100:105:101,103', 5000n);
  const at = (txId: bigint, commitLsn: bigint) => ({ ...change('c', null, order(1, 1, '1.00'), txId), commitLsn });
  assert.equal(inSnapshot(point, at(99n, 4000n)), true, 'committed before the snapshot');
  assert.equal(inSnapshot(point, at(102n, 4900n)), true);
  assert.equal(inSnapshot(point, at(101n, 4900n)), false, 'in progress when the snapshot was taken');
  assert.equal(inSnapshot(point, at(105n, 4950n)), false, 'started after the snapshot');
  assert.equal(inSnapshot(point, at(99n, 5000n)), false, 'committed at or after the snapshot\'s WAL position');
});

test('aggregate apply: deltas added in the target transaction with the position; a redelivered batch adds nothing', async () => {
  const statements: Array<{ text: string; values?: unknown[] }> = [];
  const target = { query: async (q: string | { text: string; values: unknown[] }) => {
    statements.push(typeof q === 'string' ? { text: q } : q);
    return { rows: [], rowCount: 0 };
  } } as unknown as pg.Client;
  const m = totals(false);
  const stream = [change('c', null, order(1, 7, '10.00')), change('u', order(1, 7, '10.00'), order(1, 8, '10.00'))];
  const decoder = { decode: async (v: Buffer) => stream[Number(v.toString())] } as unknown as ChangeDecoder;
  const applier = new TableApplier('totals', m.target, 'mg.src.public.orders', new Map([['-', target]]), [{ shard: '-', start: '', end: '' }], decoder, undefined,
    new MaterializeShape(m, {} as pg.Client));
  const message = (i: number): RawMessage => ({ topic: 'mg.src.public.orders', partition: 0, offset: String(i), key: null, timestamp: new Date(0), value: Buffer.from(String(i)), headers: {} });
  assert.equal((await applier.applyBatch(0, [0, 1].map(message))).applied, 2);
  const texts = statements.map((s) => s.text.replace(/\s+/g, ' '));
  const insert = statements[texts.findIndex((t) => t.startsWith('INSERT INTO "public"."customer_totals"'))];
  assert.match(insert.text.replace(/\s+/g, ' '), /c0::integer AS "customer_id", sum\(s \* c1::bigint\)::bigint AS "n", sum\(s \* c2::numeric\)::numeric AS "total" .* GROUP BY 1 ON CONFLICT \("customer_id"\) DO UPDATE SET "n" = "public"."customer_totals"."n" \+ EXCLUDED."n", "total" = "public"."customer_totals"."total" \+ EXCLUDED."total"/);
  assert.deepEqual(insert.values, [['7', '7', '8'], ['1', '1', '1'], ['10.00', '10.00', '10.00'], [1, -1, 1]]);
  assert.ok(texts.some((t) => /^DELETE FROM "public"."customer_totals" USING .* AND "public"."customer_totals"."n" = 0$/.test(t)), 'empty groups deleted');
  assert.ok(texts.indexOf('COMMIT') > texts.findIndex((t) => t.startsWith('INSERT INTO mg_materializer.positions')), 'the position in the same transaction');
  statements.length = 0;
  assert.equal((await applier.applyBatch(0, [0, 1].map(message))).applied, 0);
  assert.ok(!statements.some((s) => s.text.includes('customer_totals')), 'a replay adds nothing');
});
