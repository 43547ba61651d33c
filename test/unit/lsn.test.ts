import { test } from 'node:test';
import assert from 'node:assert/strict';
import { formatLsn, parseLsn } from '../../ingest/postgres/lsn.ts';

test('parseLsn reads Postgres text exactly', () => {
  assert.equal(parseLsn('0/0'), 0n);
  assert.equal(parseLsn('0/16B3748'), 0x16b3748n);
  assert.equal(parseLsn('16/B374D848'), 0x16b374d848n);
  assert.equal(parseLsn('1/0'), 1n << 32n);
  assert.equal(parseLsn('ffffffff/ffffffff'), (1n << 64n) - 1n);
  // Above 2^53: a Number would round here.
  assert.equal(parseLsn('200000/1'), (0x200000n << 32n) + 1n);
});

test('parseLsn rejects malformed text', () => {
  for (const bad of ['', '0', '/0', '0/', '1/2/3', 'x/1', '1/-1', ' 1/1', '1/1 ', '100000000/0', '0/100000000', '0x1/1']) {
    assert.throws(() => parseLsn(bad), /invalid LSN/, bad);
  }
});

test('formatLsn prints like Postgres and round-trips', () => {
  assert.equal(formatLsn(0n), '0/0');
  assert.equal(formatLsn(0x16b374d848n), '16/B374D848');
  assert.equal(formatLsn((1n << 64n) - 1n), 'FFFFFFFF/FFFFFFFF');
  for (const text of ['0/1', 'A/0', '16/B374D848', '7FFFFFFF/80000000']) {
    assert.equal(formatLsn(parseLsn(text)), text);
  }
});

test('formatLsn rejects values outside 64 unsigned bits', () => {
  assert.throws(() => formatLsn(-1n), RangeError);
  assert.throws(() => formatLsn(1n << 64n), RangeError);
});
