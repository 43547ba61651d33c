import assert from 'node:assert/strict';
import { test } from 'node:test';
import { CopyRowSplitter, type CopyRow } from '../../router/planner/copy-rows.ts';
import type { CopyInPlan } from '../../router/planner/plan.ts';

const plan = (over: Partial<CopyInPlan>): CopyInPlan => ({
  kind: 'copy_in', table: 't', sql: Buffer.from(''), format: 'text', delimiter: '\t', header: false, quote: '"', escape: '"', null: '\\N',
  place: { column: 1, pin: { vindex: 'hash', type: 'hash', column: 't.id' } }, ...over,
});

/** Every row the splitter gives for `data` cut into chunks at `cuts`. */
function split(p: CopyInPlan, data: string, cuts: number[]): CopyRow[] {
  const s = new CopyRowSplitter(p);
  const bytes = Buffer.from(data);
  const rows: CopyRow[] = [];
  let at = 0;
  for (const cut of [...cuts, bytes.length]) {
    rows.push(...s.push(bytes.subarray(at, cut)));
    at = cut;
  }
  return [...rows, ...s.finish()];
}

/** The same rows whichever way the data is cut in two. */
function everyCut(p: CopyInPlan, data: string): Array<{ text: string; value?: string | null }> {
  const whole = split(p, data, []).map((r) => ({ text: r.bytes.toString(), value: r.value }));
  for (let i = 1; i < Buffer.byteLength(data); i++) {
    assert.deepEqual(split(p, data, [i]).map((r) => ({ text: r.bytes.toString(), value: r.value })), whole, `cut at ${i}`);
  }
  return whole;
}

test('text COPY data splits into rows wherever CopyData cuts it; the placing column is decoded', () => {
  const rows = everyCut(plan({}), 'a\t1\tx\nb\\tc\t22\ty\n\\N\t\\063\\x34\tz\nd\t\\N\n');
  assert.deepEqual(rows.map((r) => r.value), ['1', '22', '34', null]);
  assert.equal(rows[1].text, 'b\\tc\t22\ty\n', 'rows pass on unchanged');
  // An escaped delimiter is not a field boundary; a last row without a newline still counts; \. ends the data.
  assert.deepEqual(everyCut(plan({}), 'a\\\tb\t5\nc\t6').map((r) => r.value), ['5', '6']);
  assert.deepEqual(everyCut(plan({}), 'a\t7\n\\.\nb\t8\n').map((r) => r.value), ['7']);
  assert.deepEqual(everyCut(plan({ delimiter: '|', null: '' }), 'x|9\r\ny|\n').map((r) => r.value), ['9', null]);
});

test('CSV COPY data: quotes hold delimiters, newlines and doubled quotes; HEADER skips the first row', () => {
  const csv = plan({ format: 'csv', delimiter: ',', null: '', header: true });
  const rows = everyCut(csv, 'name,id\n"a, b",1\n"multi\nline","2"\n"say ""hi""","3,4"\nlast,\n,""\n');
  assert.deepEqual(rows.map((r) => r.value), [undefined, '1', '2', '3,4', null, '']);
  assert.equal(rows[0].text, 'name,id\n', 'the header goes to every shard, whose COPY skips it too');
  assert.equal(rows[2].text, '"multi\nline","2"\n');
  const escaped = plan({ format: 'csv', delimiter: ';', null: 'NULL', escape: '\\', place: { column: 0, pin: { vindex: 'x', type: 'xxhash', column: 't.k' } } });
  assert.deepEqual(everyCut(escaped, '"a\\"b";1\nNULL;2\n"NULL";3\n').map((r) => r.value), ['a"b', null, 'NULL']);
});

test('a reference table places nothing: every row, no value', () => {
  const rows = everyCut(plan({ place: undefined }), 'a\t1\nb\t2\n');
  assert.deepEqual(rows, [{ text: 'a\t1\n', value: undefined }, { text: 'b\t2\n', value: undefined }]);
});
