/**
 * The streaming merge's pure part (router/planner/merge.ts): the order of
 * ORDER BY over text and binary values, and the heap of sorted streams that the gateway
 * merges a scatter read with, compared with sorting all rows at once.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { havingTest, HeadHeap, mergeRows, rowOrder, rowWindow, type Field, type Row } from '../../router/planner/merge.ts';
import type { Merge } from '../../router/planner/plan.ts';
import { binaryNumeric, numericText } from '../../router/planner/binary-values.ts';
import { decodeDataRow, decodeRowDescription, encodeDataRow, withoutLastColumns } from '../../router/gateway/shard-link.ts';
import { dataRow, rowDescription } from '../../router/protocol/messages.ts';

const fields: Field[] = [{ name: 'n', typeOid: 20 }, { name: 'amount', typeOid: 1700 }, { name: 'name', typeOid: 25 }];
const text = (rows: Row[]) => rows.map((r) => r.map((v) => (v === null ? null : v.toString())));

/** A deterministic pseudo-random generator, so a failure can be run again. */
function generator(seed: number): () => number {
  let x = seed;
  return () => {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    return x / 2 ** 31;
  };
}

function randomRow(rnd: () => number): Row {
  const maybeNull = (v: string) => (rnd() < 0.1 ? null : Buffer.from(v));
  return [
    maybeNull(String(Math.floor(rnd() * 41) - 20)),
    maybeNull((rnd() * 200 - 100).toFixed(Math.floor(rnd() * 3))),
    maybeNull(['a', 'B', 'ab', 'é', 'z', ''][Math.floor(rnd() * 6)]),
  ];
}

/** What the gateway does with streams: each sorted, merged through the heap as long as every stream has a head. */
function heapMerge(streams: Row[][], order: (a: Row, b: Row) => number): Row[] {
  const heap = new HeadHeap(order);
  const at = streams.map(() => 0);
  streams.forEach((s, i) => s.length && heap.push(i, s[0]));
  const out: Row[] = [];
  for (let i = heap.pop(); i !== undefined; i = heap.pop()) {
    out.push(streams[i][at[i]++]);
    if (at[i] < streams[i].length) heap.push(i, streams[i][at[i]]);
  }
  return out;
}

test('a heap of sorted streams gives the rows in the order one sort of them all gives (ties by stream)', () => {
  const orders: Array<Merge['orderBy']> = [
    [{ column: 1, desc: false, nullsFirst: false }],
    [{ column: 'amount', desc: true, nullsFirst: true }],
    [{ column: 3, desc: false, nullsFirst: true }, { column: 1, desc: true, nullsFirst: false }],
    [{ column: 2, desc: false, nullsFirst: false }, { column: 3, desc: true, nullsFirst: false }, { column: 1, desc: false, nullsFirst: true }],
  ];
  const rnd = generator(42);
  for (const orderBy of orders) {
    for (const k of [1, 2, 3, 4, 7, 16]) {
      const order = rowOrder(fields, orderBy);
      const streams = Array.from({ length: k }, () => Array.from({ length: Math.floor(rnd() * 40) }, () => randomRow(rnd)).sort(order));
      // Array.prototype.sort is stable: rows in stream order, then sorted, tie as the heap breaks ties.
      const expected = mergeRows(streams.flat(), fields, { orderBy, distinct: false });
      assert.deepEqual(text(heapMerge(streams, order)), text(expected), `${k} streams, ${JSON.stringify(orderBy)}`);
    }
  }
});

test('the heap: empty, one stream, and streams that run out at different times', () => {
  const order = rowOrder(fields, [{ column: 1, desc: false, nullsFirst: false }]);
  const heap = new HeadHeap(order);
  assert.equal(heap.pop(), undefined);
  assert.equal(heap.size, 0);
  const row = (n: string): Row => [Buffer.from(n), null, null];
  assert.deepEqual(text(heapMerge([[row('1'), row('5'), row('9')], [], [row('2')], [row('3'), row('4'), row('10'), row('11')]], order)).map((r) => r[0]),
    ['1', '2', '3', '4', '5', '9', '10', '11']);
});

test('rowWindow: OFFSET and LIMIT as numbers, from literals or parameters; a bad one is refused', () => {
  assert.deepEqual(rowWindow({ orderBy: [], distinct: false }), { offset: 0, limit: undefined });
  assert.deepEqual(rowWindow({ orderBy: [], distinct: false, limit: { literal: '5' }, offset: { literal: '2' } }), { offset: 2, limit: 5 });
  const params = [{ value: Buffer.from('7'), binary: false, typeOid: 20 }];
  assert.deepEqual(rowWindow({ orderBy: [], distinct: false, limit: { param: 1 } }, params), { offset: 0, limit: 7 });
  assert.throws(() => rowWindow({ orderBy: [], distinct: false, limit: { literal: '-1' } }), /non-negative integer/);
});

test('HAVING on merged groups: after the partial aggregates combine, before OFFSET/LIMIT; NULL compares unknown', () => {
  const groups: Field[] = [{ name: 'g', typeOid: 25 }, { name: 'count', typeOid: 20 }, { name: 'sum', typeOid: 1700 }];
  const merge: Merge = { orderBy: [{ column: 1, desc: false, nullsFirst: false }], distinct: false, groupBy: [1], aggregates: [{ column: 2, fn: 'count' }, { column: 3, fn: 'sum' }] };
  // Each group has a partial row from two shards: only the combined count passes `count > 2`.
  const rows = [['a', '2', '1.5'], ['b', '1', null], ['c', '2', '-4'], [null, '3', '2'], ['a', '1', '1'], ['b', '1', null], ['c', '1', '0.5']].map((v) => v.map((x) => (x === null ? null : Buffer.from(x))));
  const having = (h: Merge['having'], params?: Parameters<typeof mergeRows>[3]) => text(mergeRows(rows, groups, { ...merge, having: h }, params)).map((r) => r[0]);
  assert.deepEqual(having({ op: '>', column: 2, value: { literal: '2' } }), ['a', 'c', null]);
  assert.deepEqual(text(mergeRows(rows, groups, { ...merge, having: { op: '>', column: 2, value: { literal: '2' } }, offset: { literal: '1' }, limit: { literal: '1' } })), [['c', '3', '-3.5']]);
  // sum of b is NULL: unknown, which neither `>` nor its NOT keeps; OR with a true side keeps it.
  assert.deepEqual(having({ op: '>', column: 3, value: { literal: '0' } }), ['a', null]);
  assert.deepEqual(having({ op: 'not', arg: { op: '>', column: 3, value: { literal: '0' } } }), ['c']);
  assert.deepEqual(having({ op: 'or', args: [{ op: '>', column: 3, value: { literal: '0' } }, { op: '=', column: 1, value: { literal: 'b' } }] }), ['a', 'b', null]);
  assert.deepEqual(having({ op: 'and', args: [{ op: '<>', column: 1, value: { literal: 'a' } }, { op: 'is not null', column: 3 }] }), ['c']);
  assert.deepEqual(having({ op: 'is null', column: 1 }), [null]);
  assert.deepEqual(having({ op: '=', column: 1, value: { literal: null } }), []);
  // Numbers by value: an integer against a fraction as numeric; numeric against an integer.
  assert.deepEqual(having({ op: '<=', column: 2, value: { literal: '2.5' } }), ['b']);
  assert.deepEqual(having({ op: '<', column: 3, value: { literal: '-3' } }), ['c']);
  assert.deepEqual(having({ op: '>=', column: 1, value: { literal: 'b' } }), ['b', 'c']);
  // $n from the Bind: text, or a binary integer.
  const int8 = Buffer.alloc(8);
  int8.writeBigInt64BE(2n);
  assert.deepEqual(having({ op: '=', column: 2, value: { param: 1 } }, [{ value: Buffer.from('2'), binary: false, typeOid: 0 }]), ['b']);
  assert.deepEqual(having({ op: '<', column: 3, value: { param: 1 } }, [{ value: Buffer.from(' 1.5 '), binary: false, typeOid: 0 }]), ['c']);
  assert.deepEqual(having({ op: '>', column: 2, value: { param: 1 } }, [{ value: int8, binary: true, typeOid: 20 }]), ['a', 'c', null]);
  // Binary numbers (pgx sends a Go float64 or a decimal so) and text are read too; other binary types are refused.
  const float8 = Buffer.alloc(8);
  float8.writeDoubleBE(-3);
  assert.deepEqual(having({ op: '<', column: 3, value: { param: 1 } }, [{ value: float8, binary: true, typeOid: 701 }]), ['c']);
  assert.deepEqual(having({ op: '=', column: 3, value: { param: 1 } }, [{ value: binaryNumeric('-3.50'), binary: true, typeOid: 1700 }]), ['c']);
  assert.deepEqual(having({ op: '=', column: 1, value: { param: 1 } }, [{ value: Buffer.from('b'), binary: true, typeOid: 25 }]), ['b']);
  assert.throws(() => having({ op: '>', column: 3, value: { param: 1 } }, [{ value: Buffer.alloc(4), binary: true, typeOid: 1082 }]), /binary parameter \(\$1, type oid 1082\) in HAVING/);
  assert.throws(() => having({ op: '>', column: 3, value: { literal: '1e3' } }), /does not read as a number/);
  // Types whose comparison with a constant the gateway does not follow are refused.
  assert.throws(() => havingTest({ ...merge, having: { op: '>', column: 1, value: { literal: '2020-01-01' } } }, [{ name: 'd', typeOid: 1082 }]), /HAVING comparing d, of a type/);
  assert.throws(() => havingTest({ ...merge, having: { op: '>', column: 1, value: { literal: '0.1' } } }, [{ name: 'r', typeOid: 700 }]), /type OID 700/);
  assert.equal(havingTest({ ...merge, having: { op: 'is null', column: 1 } }, [{ name: 'd', typeOid: 1082 }])!([null]), true);
  assert.equal(havingTest(merge, groups), undefined);
});

test('hidden items: sort keys counted from the row end, aggregates merged, and stripped from what the client gets (decision 0074)', () => {
  // `SELECT * ... ORDER BY lower(name) DESC`: the hidden key is the last column, whatever `*` made.
  const rows: Row[] = [['1', 'B', 'b'], ['2', 'a', 'a'], ['3', 'C', 'c']].map((r) => r.map((v) => Buffer.from(v)));
  const f: Field[] = [{ name: 'id', typeOid: 23 }, { name: 'name', typeOid: 25 }, { name: 'mg_hidden_1', typeOid: 25 }];
  assert.deepEqual(text(mergeRows(rows, f, { orderBy: [{ column: -1, desc: true, nullsFirst: true }], distinct: false, hidden: 1 })).map((r) => r[0]), ['3', '1', '2']);
  // `SELECT g FROM t GROUP BY g HAVING count(*) > 2 ORDER BY sum(x)`: both aggregates hidden, combined per group.
  const g: Field[] = [{ name: 'g', typeOid: 25 }, { name: 'mg_hidden_1', typeOid: 20 }, { name: 'mg_hidden_2', typeOid: 1700 }];
  const partial: Row[] = [['a', '2', '5'], ['b', '1', '1'], ['a', '1', '-7'], ['c', '3', '2'], ['b', '2', '0']].map((r) => r.map((v) => Buffer.from(v)));
  const merge: Merge = {
    orderBy: [{ column: 3, desc: false, nullsFirst: false }], groupBy: [1], distinct: false, hidden: 2,
    aggregates: [{ column: 2, fn: 'count' }, { column: 3, fn: 'sum' }], having: { op: '>', column: 2, value: { literal: '2' } },
  };
  assert.deepEqual(text(mergeRows(partial, g, merge)), [['a', '3', '-2'], ['b', '3', '1'], ['c', '3', '2']]);
  // What the client sees: the RowDescription and each DataRow without the last `hidden` columns.
  const described = withoutLastColumns(rowDescription([{ name: 'g' }, { name: 'mg_hidden_1', oid: 20 }, { name: 'mg_hidden_2', oid: 1700 }]), 2);
  assert.deepEqual(described, rowDescription([{ name: 'g' }]));
  assert.deepEqual(decodeRowDescription(described), [{ name: 'g', typeOid: 25, binary: false }]);
  assert.deepEqual(withoutLastColumns(dataRow([null, 'é', '3', null]), 1), dataRow([null, 'é', '3']));
  assert.deepEqual(decodeDataRow(withoutLastColumns(encodeDataRow([Buffer.from('x'), null, Buffer.from('12')]), 2)), [Buffer.from('x')]);
});

test('binary numeric: Postgres\'s base-10000 digits to decimal text and back, NaN and infinities (decision 0077)', () => {
  // numeric_send's bytes: ndigits, weight, sign, dscale, then the digits.
  const numeric = (weight: number, sign: number, dscale: number, digits: number[]) =>
    Buffer.concat([Buffer.from(Int16Array.of(digits.length, weight, sign - (sign > 0x7fff ? 0x10000 : 0), dscale, ...digits).buffer).swap16()]);
  const known: Array<[string, Buffer]> = [
    ['12345.678', numeric(1, 0, 3, [1, 2345, 6780])],
    ['-0.00012', numeric(-1, 0x4000, 5, [1, 2000])],
    ['0', numeric(0, 0, 0, [])],
    ['100000000', numeric(2, 0, 0, [1])],
    ['0.50', numeric(-1, 0, 2, [5000])],
    ['NaN', numeric(0, 0xc000, 0, [])],
    ['-Infinity', numeric(0, 0xf000, 0, [])],
  ];
  for (const [text, bytes] of known) {
    assert.equal(numericText(bytes), text);
    assert.deepEqual(binaryNumeric(text), bytes, text);
  }
});

test('rows in binary format merge as the same rows in text format do: ORDER BY, count and sum per group, min/max, HAVING (decision 0077)', () => {
  const rnd = generator(77);
  const int8 = (v: Buffer) => { const b = Buffer.alloc(8); b.writeBigInt64BE(BigInt(v.toString())); return b; };
  const float8 = (v: Buffer) => { const b = Buffer.alloc(8); b.writeDoubleBE(Number(v.toString())); return b; };
  const asBinary = (r: Row): Row => [r[0] && int8(r[0]), r[1] && binaryNumeric(r[1].toString()), r[2], r[3] && float8(r[3]), r[4] && int8(r[4])];
  const asText = (r: Row): Row => [
    r[0] && Buffer.from(String(r[0].readBigInt64BE())), r[1] && Buffer.from(numericText(r[1])), r[2],
    r[3] && Buffer.from(String(r[3].readDoubleBE())), r[4] && Buffer.from(String(r[4].readBigInt64BE())),
  ];
  const textFields: Field[] = [...fields, { name: 'f', typeOid: 701 }, { name: 'c', typeOid: 20 }];
  const binaryFields = textFields.map((f) => ({ ...f, binary: f.typeOid !== 25 }));
  const merges: Merge[] = [
    { orderBy: [{ column: 2, desc: true, nullsFirst: false }, { column: 4, desc: false, nullsFirst: false }, { column: 1, desc: false, nullsFirst: true }], distinct: false },
    {
      orderBy: [{ column: 3, desc: false, nullsFirst: false }], groupBy: [3], distinct: false,
      aggregates: [{ column: 5, fn: 'count' }, { column: 2, fn: 'sum' }, { column: 4, fn: 'sum' }, { column: 1, fn: 'max' }],
      having: { op: '>', column: 2, value: { literal: '-30.5' } },
    },
    { orderBy: [], groupBy: [3], distinct: false, aggregates: [{ column: 1, fn: 'min' }, { column: 2, fn: 'max' }, { column: 5, fn: 'sum' }] },
  ];
  for (let round = 0; round < 50; round++) {
    // In the text Postgres would send (no '-0' numeric): through binary and back.
    const rows = Array.from({ length: 40 }, () => asText(asBinary([...randomRow(rnd), Buffer.from(String(Math.round(rnd() * 64) / 8)), Buffer.from(String(Math.floor(rnd() * 5)))])));
    for (const merge of merges) {
      assert.deepEqual(mergeRows(rows.map(asBinary), binaryFields, merge).map(asText), mergeRows(rows, textFields, merge), JSON.stringify(merge));
    }
  }
});
