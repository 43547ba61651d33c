import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  decodeCopyData, decodePgOutput, pgTimeToMs, ProtocolError, standbyStatus, UNCHANGED_TOAST,
} from '../../ingest/cdc/pgoutput.ts';

/** Builds pgoutput messages byte by byte, as the walsender writes them. */
class W {
  private parts: Buffer[] = [];
  u8(n: number) { this.parts.push(Buffer.from([n])); return this; }
  ch(c: string) { return this.u8(c.charCodeAt(0)); }
  i16(n: number) { const b = Buffer.alloc(2); b.writeInt16BE(n); this.parts.push(b); return this; }
  i32(n: number) { const b = Buffer.alloc(4); b.writeInt32BE(n); this.parts.push(b); return this; }
  u32(n: number) { const b = Buffer.alloc(4); b.writeUInt32BE(n); this.parts.push(b); return this; }
  u64(n: bigint) { const b = Buffer.alloc(8); b.writeBigUInt64BE(n); this.parts.push(b); return this; }
  str(s: string) { this.parts.push(Buffer.from(s), Buffer.from([0])); return this; }
  text(s: string) { const v = Buffer.from(s); return this.ch('t').i32(v.length).raw(v); }
  raw(b: Buffer) { this.parts.push(b); return this; }
  get buf() { return Buffer.concat(this.parts); }
}

const PG_2024 = (Date.UTC(2024, 0, 1) - Date.UTC(2000, 0, 1)) * 1000;

test('begin, commit, relation, insert, update, delete, truncate and message decode', () => {
  assert.deepEqual(decodePgOutput(new W().ch('B').u64(0x1_0000_0010n).u64(BigInt(PG_2024)).u32(4_000_000_000).buf),
    { tag: 'begin', finalLsn: 0x1_0000_0010n, commitTimeMs: Date.UTC(2024, 0, 1), xid: 4_000_000_000 });
  assert.deepEqual(decodePgOutput(new W().ch('C').u8(0).u64(16n).u64(48n).u64(BigInt(PG_2024)).buf),
    { tag: 'commit', commitLsn: 16n, endLsn: 48n, commitTimeMs: Date.UTC(2024, 0, 1) });
  const rel = new W().ch('R').u32(16384).str('public').str('items').ch('d').i16(2)
    .u8(1).str('id').u32(20).i32(-1)
    .u8(0).str('price').u32(1700).i32(((10 << 16) | 2) + 4).buf;
  assert.deepEqual(decodePgOutput(rel), {
    tag: 'relation', relationId: 16384, schema: 'public', table: 'items', replicaIdentity: 'd',
    columns: [{ key: true, name: 'id', typeOid: 20, typmod: -1 }, { key: false, name: 'price', typeOid: 1700, typmod: 655366 }],
  });
  assert.deepEqual(decodePgOutput(new W().ch('I').u32(16384).ch('N').i16(3).text('1').ch('n').ch('u').buf),
    { tag: 'insert', relationId: 16384, after: ['1', null, UNCHANGED_TOAST] });
  assert.deepEqual(decodePgOutput(new W().ch('U').u32(7).ch('K').i16(1).text('1').ch('N').i16(1).text('2').buf),
    { tag: 'update', relationId: 7, before: ['1'], beforeIsKeyOnly: true, after: ['2'] });
  assert.deepEqual(decodePgOutput(new W().ch('U').u32(7).ch('N').i16(1).text('é').buf),
    { tag: 'update', relationId: 7, before: null, beforeIsKeyOnly: false, after: ['é'] });
  assert.deepEqual(decodePgOutput(new W().ch('D').u32(7).ch('O').i16(1).text('x').buf),
    { tag: 'delete', relationId: 7, before: ['x'], beforeIsKeyOnly: false });
  assert.deepEqual(decodePgOutput(new W().ch('T').i32(2).u8(3).u32(7).u32(8).buf),
    { tag: 'truncate', relationIds: [7, 8], cascade: true, restartIdentity: true });
  assert.deepEqual(decodePgOutput(new W().ch('M').u8(0).u64(99n).str('mg.cdc.heartbeat').i32(2).raw(Buffer.from('hi')).buf),
    { tag: 'message', transactional: false, lsn: 99n, prefix: 'mg.cdc.heartbeat', content: Buffer.from('hi') });
  assert.deepEqual(decodePgOutput(new W().ch('Y').u32(16400).str('public').str('mood').buf), { tag: 'type', typeOid: 16400, schema: 'public', name: 'mood' });
});

test('malformed messages throw a ProtocolError with the message type, WAL position and offset', () => {
  const cases: Array<[Buffer, RegExp]> = [
    [new W().ch('B').u64(1n).buf, /truncated.*message 'B', at WAL 0\/ABC, offset 9/],
    [new W().ch('I').u32(1).ch('N').i16(1).ch('t').i32(10).raw(Buffer.from('short')).buf, /truncated: needs 10 more bytes/],
    [new W().ch('I').u32(1).ch('N').i16(1).ch('x').buf, /unknown tuple value kind 'x'/],
    [new W().ch('I').u32(1).ch('X').buf, /insert without its 'N' tuple/],
    [new W().ch('D').u32(1).ch('N').buf, /delete tuple marker 'N'/],
    [new W().ch('R').u32(1).str('public').buf, /unterminated string|truncated/],
    [new W().ch('C').u8(0).u64(1n).u64(2n).u64(3n).u8(7).buf, /1 unexpected trailing bytes/],
    [new W().ch('Z').buf, /unknown pgoutput message type 0x5a/],
    [new W().ch('I').u32(1).ch('N').i16(-1).buf, /negative column count/],
    [Buffer.alloc(0), /truncated: needs 1 more bytes/],
  ];
  for (const [buf, re] of cases) {
    assert.throws(() => decodePgOutput(buf, 0xabcn), (err: unknown) => err instanceof ProtocolError && re.test((err as Error).message), re.source);
  }
});

test('CopyData framing: XLogData and keepalive, malformed ones rejected; standby status carries only the given LSN', () => {
  const x = new W().ch('w').u64(100n).u64(200n).u64(5n).ch('B').buf;
  const d = decodeCopyData(x);
  assert.equal(d.kind, 'xlog');
  assert.equal(d.kind === 'xlog' && d.walStart, 100n);
  assert.deepEqual(d.kind === 'xlog' && [...d.data], [0x42]);
  assert.deepEqual(decodeCopyData(new W().ch('k').u64(300n).u64(0n).u8(1).buf), { kind: 'keepalive', walEnd: 300n, serverTimeUs: 0n, replyRequested: true });
  assert.throws(() => decodeCopyData(new W().ch('w').u64(1n).buf), ProtocolError);
  assert.throws(() => decodeCopyData(new W().ch('k').u64(1n).buf), ProtocolError);
  assert.throws(() => decodeCopyData(new W().ch('q').buf), /unknown replication message type 0x71/);

  const s = standbyStatus(0x1234_5678_9abcn, Date.UTC(2000, 0, 1) + 1);
  assert.equal(s.length, 34);
  assert.equal(String.fromCharCode(s[0]), 'r');
  for (const at of [1, 9, 17]) assert.equal(s.readBigUInt64BE(at), 0x1234_5678_9abcn);
  assert.equal(s.readBigInt64BE(25), 1000n);
  assert.equal(pgTimeToMs(1000n), Date.UTC(2000, 0, 1) + 1);
});
