/**
 * The stream's one rule, with the replication session, Kafka and the catalog
 * faked: the slot is confirmed only up to what Kafka acknowledged, keep-alives
 * are answered with that position, and a malformed message stops the stream
 * without confirming past it.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { EventLog, RawBatch } from '../../common/eventlog.ts';
import { createLogger } from '../../common/log.ts';
import { CdcStream } from '../../ingest/cdc/stream.ts';
import { cdcConfigSchema } from '../../ingest/config.ts';
import type { SchemaRegistryClient } from '../../schemas/index.ts';

const log = createLogger('test');
log.level = 'silent';

const u64 = (n: bigint) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(n); return b; };
const u32 = (n: number) => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; };
const i16 = (n: number) => { const b = Buffer.alloc(2); b.writeInt16BE(n); return b; };
const str = (s: string) => Buffer.concat([Buffer.from(s), Buffer.from([0])]);
const text = (s: string) => Buffer.concat([Buffer.from('t'), u32(Buffer.byteLength(s)), Buffer.from(s)]);
const xlog = (lsn: bigint, body: Buffer) => Buffer.concat([Buffer.from('w'), u64(lsn), u64(lsn), u64(0n), body]);
const keepalive = (walEnd: bigint) => Buffer.concat([Buffer.from('k'), u64(walEnd), u64(0n), Buffer.from([1])]);
const begin = (lsn: bigint) => xlog(lsn, Buffer.concat([Buffer.from('B'), u64(lsn + 8n), u64(0n), u32(700)]));
const commit = (lsn: bigint, end: bigint) => xlog(lsn, Buffer.concat([Buffer.from('C'), Buffer.from([0]), u64(lsn), u64(end), u64(0n)]));
const relation = (lsn: bigint) => xlog(lsn, Buffer.concat([
  Buffer.from('R'), u32(1), str('public'), str('t'), Buffer.from('d'), i16(2),
  Buffer.from([1]), str('id'), u32(23), u32(0xffffffff), Buffer.from([0]), str('v'), u32(25), u32(0xffffffff),
]));
const insert = (lsn: bigint, id: number) => xlog(lsn, Buffer.concat([Buffer.from('I'), u32(1), Buffer.from('N'), i16(2), text(String(id)), text('x')]));

function harness() {
  const confirmed: bigint[] = [];
  const sent: RawBatch[][] = [];
  let release: (() => void) | undefined;
  const registry = { register: async () => 1 } as unknown as SchemaRegistryClient;
  const eventLog = { registry, ensureTopic: async () => 1 } as unknown as EventLog;
  const stream = new CdcStream({
    ...cdcConfigSchema.parse({}), database: 'db', shard: '-', instanceId: 'i', host: '127.0.0.1', port: 1, dataDir: '/nonexistent', topicPrefix: 'p',
  }, eventLog, log);
  const s = stream as any;
  s.session = { confirm: (lsn: bigint) => confirmed.push(lsn) };
  s.catalog = { type: async (oid: number) => ({ oid, name: oid === 23 ? 'int4' : 'text', category: 'N' }), forgetType() {} };
  // Kafka acknowledges a send only when the test says so.
  s.sender = { send: (b: RawBatch[]) => { sent.push(b); return new Promise<void>((r) => (release = r)); } };
  const feed = async (chunk: Buffer) => {
    const p = s.handle(chunk);
    if (p) await p;
  };
  const ack = async () => {
    release!();
    await new Promise((r) => setImmediate(r));
  };
  return { stream: s, confirmed, sent, feed, ack, send: () => s.send() };
}

test('the slot is confirmed only after Kafka acknowledged the transaction; keep-alives get the acknowledged position', async () => {
  const h = harness();
  await h.feed(begin(100n));
  await h.feed(relation(101n));
  await h.feed(insert(102n, 1));
  await h.feed(commit(108n, 120n));
  await h.feed(keepalive(500n));
  assert.deepEqual(h.confirmed, [0n], 'a keep-alive before any acknowledgement confirms nothing new');
  h.send();
  assert.equal(h.sent.length, 1);
  assert.equal(h.sent[0][0].messages.length, 1);
  await h.feed(keepalive(600n));
  assert.deepEqual(h.confirmed, [0n, 0n], 'received is not acknowledged');
  await h.ack();
  assert.deepEqual(h.confirmed, [0n, 0n, 120n], 'the end of the acknowledged transaction');
  await h.feed(keepalive(700n));
  assert.deepEqual(h.confirmed.at(-1), 120n, 'never the keep-alive position');
});

test('a malformed message stops the stream; nothing after the last acknowledged transaction is confirmed', async () => {
  const h = harness();
  await h.feed(begin(100n));
  await h.feed(relation(101n));
  await h.feed(insert(102n, 1));
  await h.feed(commit(108n, 120n));
  h.send();
  await h.ack();
  await h.feed(begin(200n));
  await h.feed(insert(202n, 2));
  await h.feed(xlog(203n, Buffer.from([0x49, 0, 0]))); // a truncated insert
  assert.match(h.stream.failure.message, /truncated.*message 'I', at WAL 0\/CB/);
  await h.feed(keepalive(900n));
  assert.equal(h.confirmed.at(-1), 120n);
  assert.ok(h.confirmed.every((l) => l <= 120n));
  // A change for a relation never described is unexpected, too.
  const h2 = harness();
  await h2.feed(begin(100n));
  await h2.feed(insert(102n, 1));
  assert.match(h2.stream.failure.message, /relation 1 before its Relation message/);
});
