/**
 * The streaming merge's pure part (router/planner/merge.ts): the order of
 * ORDER BY over text values, and the heap of sorted streams that the gateway
 * merges a scatter read with, compared with sorting all rows at once.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { HeadHeap, mergeRows, rowOrder, rowWindow, type Field, type Row } from '../../router/planner/merge.ts';
import type { Merge } from '../../router/planner/plan.ts';

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
