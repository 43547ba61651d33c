import assert from 'node:assert/strict';
import { test } from 'node:test';
import type pg from 'pg';
import type { RawMessage } from '../../common/eventlog.ts';
import { shardRanges } from '../../compose/spec.ts';
import { converterFor } from '../../ingest/cdc/values.ts';
import { Barrier, TableApplier } from '../../materializer/apply.ts';
import { tiling } from '../../materializer/service.ts';
import { ChangeDecoder, type Change } from '../../materializer/changes.ts';
import { copyTextValue } from '../../materializer/copy.ts';
import { copyInSql, copyOutSql, deleteSql, pageSql, upsertSql, type MovedTable } from '../../materializer/tables.ts';
import { valueSchema, type ColumnDescription, type PgType, type TableDescription } from '../../schemas/cdc.ts';
import { foldWorkflows, hashKeyspaceId, parseAvro, shardFor, workflowKey, workflowPayload, type SchemaRegistryClient, type WorkflowEvent } from '../../schemas/index.ts';

const T = (name: string, extra: Partial<PgType> = {}): PgType => ({ oid: 0, name, category: 'X', ...extra });
const col = (name: string, type: PgType, typmod = -1, key = false): ColumnDescription => ({ name, type, typmod, key });

/** Each column: Postgres's text in, what the materializer writes back (the same value, in a text Postgres reads as it). */
const CASES: Array<[ColumnDescription, string, string]> = [
  [col('id', T('int8'), -1, true), '9007199254740993', '9007199254740993'],
  [col('n', T('int4')), '-42', '-42'],
  [col('ok', T('bool')), 't', 't'],
  [col('x', T('float8')), '0.1', '0.1'],
  [col('nan', T('float8')), 'NaN', 'NaN'],
  [col('inf', T('float4')), '-Infinity', '-Infinity'],
  [col('price', T('numeric'), ((10 << 16) | 2) + 4), '-12.50', '-12.50'],
  [col('ratio', T('numeric')), '3.14159265358979323846', '3.14159265358979323846'],
  [col('ratio2', T('numeric')), '-0.001', '-0.001'],
  [col('name', T('text')), 'a "quoted" \\ name', 'a "quoted" \\ name'],
  [col('blob', T('bytea')), '\\x00ff10', '\\x00ff10'],
  [col('day', T('date')), '2024-02-29', '2024-02-29'],
  [col('never', T('date')), 'infinity', 'infinity'],
  [col('old', T('date')), '0044-03-15 BC', '0044-03-15 BC'],
  [col('local', T('timestamp')), '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05.123456'],
  [col('before1970', T('timestamp')), '1969-12-31 23:59:59.5', '1969-12-31 23:59:59.500000'],
  [col('t', T('time')), '23:59:59.5', '23:59:59.500000'],
  [col('at', T('timestamptz')), '2024-01-02 03:04:05.5+00', '2024-01-02T03:04:05.5Z'],
  [col('u', T('uuid')), 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'],
  [col('doc', T('jsonb')), '{"a": [1, 2]}', '{"a": [1, 2]}'],
  [col('ints', T('_int4', { category: 'A', element: T('int4') })), '{1,NULL,3}', '{"1",NULL,"3"}'],
  [col('tags', T('_text', { category: 'A', element: T('text') })), '{"a b","c\\"d"}', '{"a b","c\\"d"}'],
  [col('mood', T('mood', { category: 'E', enumLabels: ['happy'] })), 'happy', 'happy'],
  [col('span', T('interval')), '1 day 02:00:00', '1 day 02:00:00'],
];

test('change events decode back to Postgres text of the same values, for every mapped type', async () => {
  const desc: TableDescription = { schema: 'public', table: 'all_types', columns: CASES.map(([c]) => c) };
  const schema = valueSchema({ topicPrefix: 'mg', database: 'shop' }, desc, 'decimal');
  const row = Object.fromEntries(CASES.map(([c, text]) => [c.name, converterFor(c, 'decimal')(text)]));
  const envelope = {
    before: null, after: row, op: 'u', ts_ms: 1n, transaction: null, unavailable: [],
    source: {
      version: '1', connector: 'multigres', name: 'mg', ts_ms: 1_700_000_000_000n, snapshot: 'false', db: 'shop', shard: '-', schema: 'public',
      table: 'all_types', instance: 'i', txId: 7n, lsn: 100n, commit_lsn: 120n, position: 3n, epoch: 2n,
    },
  };
  const body = parseAvro(JSON.stringify(schema)).toBuffer(envelope);
  const header = Buffer.alloc(5);
  header.writeUInt32BE(41, 1);
  const registry = { schemaById: async (id: number) => (id === 41 ? JSON.stringify(schema) : Promise.reject(new Error('unknown id'))) } as unknown as SchemaRegistryClient;
  const change = await new ChangeDecoder(registry).decode(Buffer.concat([header, body]));
  assert.equal(change.op, 'u');
  assert.deepEqual([change.epoch, change.commitLsn, change.position, change.txId, change.sourceShard], [2n, 120n, 3n, 7n, '-']);
  assert.equal(change.before, null);
  for (const [c, , expected] of CASES) assert.equal(change.after![c.name], expected, c.name);
});

test('a value not in the Confluent wire format is refused with a clear error', async () => {
  const decoder = new ChangeDecoder({ schemaById: async () => '{}' } as unknown as SchemaRegistryClient);
  await assert.rejects(decoder.decode(Buffer.from('not avro')), /not in Confluent wire format/);
});

const orders: MovedTable = {
  schema: 'public', table: 'orders', sql: '"public"."orders"',
  columns: [{ name: 'tenant', type: 'bigint', notNull: true }, { name: 'id', type: 'bigint', notNull: true }, { name: 'note', type: 'text', notNull: false }],
  key: ['tenant', 'id'], vindex: { column: 'tenant', type: 'hash' },
};

test('keyset pages, upserts and deletes: one statement per batch, values as text cast to the column types', () => {
  const first = pageSql(orders, null, 100);
  assert.equal(first.text, 'SELECT "tenant", "id", "note" FROM "public"."orders" ORDER BY "tenant", "id" LIMIT 100');
  const range = pageSql(orders, ['1', '5'], 0, ['2', '0']);
  assert.equal(range.text, 'SELECT "tenant", "id", "note" FROM "public"."orders" WHERE ("tenant", "id") > ($1::bigint, $2::bigint) AND ("tenant", "id") <= ($3::bigint, $4::bigint) ORDER BY "tenant", "id"');
  assert.deepEqual(range.values, ['1', '5', '2', '0']);
  const up = upsertSql(orders, [{ tenant: '1', id: '2', note: null }, { tenant: '3', id: '4', note: 'x' }]);
  assert.match(up.text, /^INSERT INTO "public"\."orders" \("tenant", "id", "note"\) SELECT c0::bigint, c1::bigint, c2::text FROM unnest\(\$1::text\[\], \$2::text\[\], \$3::text\[\]\)/);
  assert.match(up.text, /ON CONFLICT \("tenant", "id"\) DO UPDATE SET "note" = EXCLUDED\."note"$/);
  assert.deepEqual(up.values, [['1', '3'], ['2', '4'], [null, 'x']]);
  // A row from before a DDL added a column lacks it: the upsert leaves the target's value alone rather than null it.
  const older = upsertSql(orders, [{ tenant: '1', id: '2' }]);
  assert.match(older.text, /^INSERT INTO "public"\."orders" \("tenant", "id"\) SELECT c0::bigint, c1::bigint FROM/);
  assert.match(older.text, /ON CONFLICT \("tenant", "id"\) DO NOTHING$/);
  const del = deleteSql(orders, [{ tenant: '1', id: '2' }]);
  assert.deepEqual(del.values, [['1'], ['2']]);
  assert.match(del.text, /WHERE "public"\."orders"\."tenant" = d\.k0::bigint AND "public"\."orders"\."id" = d\.k1::bigint$/);
});

test('copy pages as COPY both ways: key values inlined as quoted literals, the written columns named', () => {
  assert.equal(copyOutSql(orders, ['id', 'tenant', 'note'], null, 50), 'COPY (SELECT "id", "tenant", "note" FROM "public"."orders" ORDER BY "tenant", "id" LIMIT 50) TO STDOUT');
  assert.equal(copyOutSql(orders, ['tenant'], ["1'", 'a\\b'], 5),
    'COPY (SELECT "tenant" FROM "public"."orders" WHERE ("tenant", "id") > (\'1\'\'\'::bigint,  E\'a\\\\b\'::bigint) ORDER BY "tenant", "id" LIMIT 5) TO STDOUT');
  assert.equal(copyInSql(orders), 'COPY "public"."orders" ("tenant", "id", "note") FROM STDIN');
});

test('COPY text values: \\N is NULL, the escapes COPY TO writes are decoded, everything else is literal', () => {
  assert.equal(copyTextValue('\\N'), null);
  assert.equal(copyTextValue('N'), 'N');
  assert.equal(copyTextValue(''), '');
  assert.equal(copyTextValue('a\\tb\\nc\\\\N\\rd\\be\\ff\\vg'), 'a\tb\nc\\N\rd\be\ff\vg');
  assert.equal(copyTextValue('é€ 😀 x'), 'é€ 😀 x');
});

const ev = (workflow: string, ms: number, payload: WorkflowEvent['payload']): WorkflowEvent => ({ eventId: `${ms}`, ts: new Date(ms), source: 'test', workflow, payload });
const status = (phase: 'COPYING' | 'RUNNING' | 'CANCELLED') => workflowPayload('WorkflowStatus', {
  phase, message: null, startOffsets: [], tables: [], rowsCopied: 5n, copyRowsPerSecond: 0, etaSeconds: null, eventsApplied: 0n, lagSeconds: null, reverseOffsets: [], switchedAt: null,
});
const created = workflowPayload('WorkflowCreated', { type: 'MOVE_TABLES', sourceDatabase: 'a', targetDatabase: 'b', tables: ['public.t'], sourceShards: null, targetShards: null, ddl: null, revertSeconds: null, postponeCutOver: false, query: null });

test('the workflow fold: one key per aspect, any order after compaction, a re-created workflow starts afresh', () => {
  assert.equal(workflowKey(ev('w', 1, created)), 'workflow/w');
  assert.equal(workflowKey(ev('w', 1, status('RUNNING'))), 'workflow/w/status');
  assert.equal(workflowKey(ev('w', 1, workflowPayload('VDiffRequested', { id: 'v' }))), 'workflow/w/vdiff');
  // Compaction may leave the status before the definition: the status still counts.
  const early = foldWorkflows([ev('w', 2, status('RUNNING')), ev('w', 3, workflowPayload('WorkflowCommanded', { action: 'STOP' })), ev('w', 1, created)]);
  assert.equal(early.get('w')?.status?.phase, 'RUNNING');
  assert.equal(early.get('w')?.action, 'STOP');
  const again = foldWorkflows([ev('w', 1, created), ev('w', 2, status('CANCELLED')), ev('w', 3, created)]);
  assert.equal(again.get('w')?.status, undefined);
  assert.equal(again.get('w')?.action, 'START');
});

/** A session that records each statement and answers a SELECT with `rows`. */
function fakeSession(rows: Array<Record<string, string>>) {
  const statements: Array<{ text: string; values?: unknown[] }> = [];
  const query = async (q: string | { text: string; values: unknown[] }, values?: unknown[]) => {
    const s = typeof q === 'string' ? { text: q, values } : q;
    statements.push(s);
    return { rows: s.text.startsWith('SELECT') ? rows : [], rowCount: 0 };
  };
  return { statements, client: { query } as unknown as pg.Client };
}

test('reverse replication: the target shards\' changes applied to the one source shard past its trigger, deduplicated per target shard, a truncate removing only its shard\'s rows', async () => {
  const ranges = shardRanges(2);
  const tenants = ['1', '2', '3', '4', '5', '6'];
  const homes = new Map(tenants.map((t) => [t, shardFor(hashKeyspaceId(t), ranges)]));
  const truncated = ranges[1].shard;
  assert.ok([...homes.values()].includes(ranges[0].shard) && [...homes.values()].includes(truncated), 'the tenants span both shards');
  const source = fakeSession(tenants.map((t) => ({ tenant: t, id: '1' })));
  const change = (shard: string, lsn: bigint, op: 'c' | 't', tenant = '0'): Change => ({
    op, before: null, after: op === 't' ? null : { tenant, id: '1', note: `from ${shard}` }, unavailable: [],
    sourceShard: shard, epoch: 1n, commitLsn: lsn, position: 0n, txId: null, commitMs: 0,
  });
  const homeOn = (shard: string) => tenants.find((t) => homes.get(t) === shard)!;
  const stream = [change(ranges[0].shard, 100n, 'c', homeOn(ranges[0].shard)), change(truncated, 100n, 'c', homeOn(truncated)), change(truncated, 200n, 't')];
  const decoder = { decode: async (v: Buffer) => stream[Number(v.toString())] } as unknown as ChangeDecoder;
  const applier = new TableApplier('mt', orders, 'mg.dst.public.orders', new Map([['-', source.client]]), [{ shard: '-', start: '', end: '' }], decoder, { ranges, vindex: orders.vindex });
  const message = (i: number): RawMessage => ({ topic: 'mg.dst.public.orders', partition: 0, offset: String(10 + i), key: null, timestamp: new Date(0), value: Buffer.from(String(i)), headers: {} });
  assert.equal(applier.appliedOffset(0), -1n);

  const r = await applier.applyBatch(0, [0, 1, 2].map(message));
  assert.equal(r.applied, 3, 'the same LSN from two target shards is two changes');
  assert.equal(source.statements[0].text, 'BEGIN; SET LOCAL session_replication_role = replica');
  const deleted = source.statements.find((s) => s.text.startsWith('DELETE'))!;
  assert.deepEqual(deleted.values![0], tenants.filter((t) => homes.get(t) === truncated), 'only the rows the truncating shard held');
  assert.equal(applier.appliedLsn.get(ranges[0].shard), 100n);
  assert.equal(applier.appliedLsn.get(truncated), 200n);
  assert.equal(applier.appliedOffset(0), 12n);

  // Redelivered: nothing is applied again.
  const again = await applier.applyBatch(0, [0, 1].map(message));
  assert.equal(again.applied, 0);
});

/** Tenants placed on each of two shards by the hash vindex. */
function tenantsByShard(ranges: ReturnType<typeof shardRanges>) {
  const byShard = new Map<string, string[]>(ranges.map((r) => [r.shard, []]));
  for (let t = 1; t <= 40; t++) byShard.get(shardFor(hashKeyspaceId(String(t)), ranges))!.push(String(t));
  return byShard;
}

test('a sharded source: each shard\'s changes applied by its own position, and a change of a row outside its shard\'s key range left out', async () => {
  const ranges = shardRanges(2);
  const [a, b] = ranges.map((r) => r.shard);
  const byShard = tenantsByShard(ranges);
  const target = fakeSession([]);
  const change = (shard: string, lsn: bigint, tenant: string): Change => ({
    op: 'c', before: null, after: { tenant, id: '1', note: `${shard}@${lsn}` }, unavailable: [],
    sourceShard: shard, epoch: 1n, commitLsn: lsn, position: 0n, txId: null, commitMs: 0,
  });
  // The two shards' LSNs are unrelated: b's 50 comes after a's 100 and is still new.
  const stream = [change(a, 100n, byShard.get(a)![0]), change(b, 50n, byShard.get(b)![0]), change(a, 120n, byShard.get(b)![1])];
  const decoder = { decode: async (v: Buffer) => stream[Number(v.toString())] } as unknown as ChangeDecoder;
  const applier = new TableApplier('rs', orders, 'mg.src.public.orders', new Map([['-', target.client]]), [{ shard: '-', start: '', end: '' }], decoder, { ranges, vindex: orders.vindex });
  const message = (i: number): RawMessage => ({ topic: 'mg.src.public.orders', partition: 0, offset: String(i), key: null, timestamp: new Date(0), value: Buffer.from(String(i)), headers: {} });
  const r = await applier.applyBatch(0, [0, 1, 2].map(message));
  assert.equal(r.applied, 2, 'the row shard a streamed from outside its range is not applied');
  const upsert = target.statements.find((s) => s.text.startsWith('INSERT INTO "public"."orders"'))!;
  assert.deepEqual(upsert.values![0], [byShard.get(a)![0], byShard.get(b)![0]]);
  const position = target.statements.find((s) => s.text.includes('mg_materializer.positions'))!;
  assert.deepEqual(JSON.parse(position.values![4] as string), { [a]: ['1', '120', '0'], [b]: ['1', '50', '0'] }, 'a position per source shard');
});

test('a reshard: both shard sets stream into one topic; catch-up applies the old set\'s changes, reverse replication the new set\'s, each ignoring the other\'s', async () => {
  const [old, next] = [shardRanges(2), shardRanges(4)];
  const tenant = tenantsByShard(next).get('40-80')![0]; // on old shard -80 and new shard 40-80
  const change = (shard: string, lsn: bigint, note: string): Change => ({
    op: 'c', before: null, after: { tenant, id: '1', note }, unavailable: [],
    sourceShard: shard, epoch: 1n, commitLsn: lsn, position: 0n, txId: null, commitMs: 0,
  });
  // A client's write on the old shard, then its echo: the apply's write of it on the new shard, streamed by that shard.
  const stream = [change('-80', 100n, 'client'), change('40-80', 7n, 'echo')];
  const decoder = { decode: async (v: Buffer) => stream[Number(v.toString())] } as unknown as ChangeDecoder;
  const message = (i: number): RawMessage => ({ topic: 'mg.shop.public.orders', partition: 0, offset: String(i), key: null, timestamp: new Date(0), value: Buffer.from(String(i)), headers: {} });
  const applyTo = async (targets: typeof old, streaming: typeof old) => {
    const sessions = new Map(targets.map((r) => [r.shard, fakeSession([])]));
    const applier = new TableApplier('split', orders, 'mg.shop.public.orders', new Map([...sessions].map(([k, v]) => [k, v.client])), targets, decoder, { ranges: streaming, vindex: orders.vindex });
    const r = await applier.applyBatch(0, [0, 1].map(message));
    const upserts = [...sessions].flatMap(([shard, f]) => f.statements.filter((x) => x.text.startsWith('INSERT INTO "public"."orders"')).map((x) => [shard, x.values![2]]));
    return { applied: r.applied, upserts };
  };
  assert.deepEqual(await applyTo(next, old), { applied: 1, upserts: [['40-80', ['client']]] }, 'catch-up: the old shard\'s change, on the new shard its keyspace id names; the echo left out');
  assert.deepEqual(await applyTo(old, next), { applied: 1, upserts: [['-80', ['echo']]] }, 'reverse replication: the new shard\'s change, on the old shard; the old set\'s own change left out');
});

/** A shard's table with the columns it has now: its catalog answers describeColumns, an upsert naming another column is a 42703. */
function shardTable(columns: string[]) {
  const upserts: string[][] = [];
  const query = async (q: string | { text: string; values: unknown[] }) => {
    const text = typeof q === 'string' ? q : q.text;
    if (text.includes('pg_attribute')) {
      return { rows: columns.map((name) => ({ name, type: name === 'extra' || name === 'note' ? 'text' : 'bigint', not_null: 'false', key_pos: name === 'tenant' ? '1' : name === 'id' ? '2' : null })) };
    }
    const insert = /^INSERT INTO "public"\."orders" \(([^)]*)\)/.exec(text);
    if (insert) {
      const named = insert[1].split(', ').map((c) => c.slice(1, -1));
      const unknown = named.find((c) => !columns.includes(c));
      if (unknown) throw Object.assign(new Error(`column "${unknown}" of relation "orders" does not exist`), { code: '42703' });
      upserts.push(named);
    }
    return { rows: [], rowCount: 0 };
  };
  return { columns, upserts, client: { query } as unknown as pg.Client };
}

test('DDL committed a moment apart on each shard: a column dropped on one target shard first leaves the write; one added there last is waited for, and its values written', async () => {
  const [old, next] = [shardRanges(2), shardRanges(4)];
  const byShard = tenantsByShard(next);
  const message = (i: number): RawMessage => ({ topic: 'mg.shop.public.orders', partition: 0, offset: String(i), key: null, timestamp: new Date(0), value: Buffer.from(String(i)), headers: {} });
  const run = async (streamSide: string[], targets: Map<string, ReturnType<typeof shardTable>>, row: Record<string, string>, tenants: string[]) => {
    const stream: Change[] = tenants.map((tenant, i) => ({
      op: 'c', before: null, after: { ...row, tenant }, unavailable: [],
      sourceShard: '-80', epoch: 1n, commitLsn: BigInt(100 + i), position: 0n, txId: null, commitMs: 0,
    }));
    const decoder = { decode: async (v: Buffer) => stream[Number(v.toString())] } as unknown as ChangeDecoder;
    const table: MovedTable = { ...orders, columns: orders.columns.concat(row.scratch ? [{ name: 'scratch', type: 'bigint', notNull: false }] : []) };
    const applier = new TableApplier('split', table, 'mg.shop.public.orders', new Map([...targets].map(([k, v]) => [k, v.client])), next, decoder,
      { ranges: old, vindex: orders.vindex }, undefined, new Map([['-80', shardTable(streamSide).client]]));
    return applier.applyBatch(0, tenants.map((_, i) => message(i)));
  };
  const tenants = [byShard.get('-40')![0], byShard.get('40-80')![0]];
  const base = ['tenant', 'id', 'note'];

  // DROP COLUMN scratch: done on the source and on 40-80, not yet on -40 (the first target shard).
  const dropped = new Map(next.map((r) => [r.shard, shardTable(r.shard === '40-80' ? base : [...base, 'scratch'])]));
  const r1 = await run(base, dropped, { id: '1', note: 'n', scratch: '7' }, tenants);
  assert.equal(r1.applied, 2);
  assert.deepEqual(dropped.get('40-80')!.upserts, [base], 'the shard without the column gets the row without it');
  assert.equal(dropped.get('-40')!.upserts.length, 1, 'the other shard its row');

  // ADD COLUMN extra: done on the source and on -40, committed on 40-80 a moment later.
  const added = new Map(next.map((r) => [r.shard, shardTable(r.shard === '40-80' ? [...base] : [...base, 'extra'])]));
  setTimeout(() => added.get('40-80')!.columns.push('extra'), 400);
  const r2 = await run([...base, 'extra'], added, { id: '1', note: 'n', extra: 'x' }, tenants);
  assert.equal(r2.applied, 2);
  assert.deepEqual(added.get('40-80')!.upserts, [[...base, 'extra']], 'the value in the added column is written once the shard has it, not left out');
});

test('a VDiff barrier over two source shards in one partition: a shard past its LSN waits while the other goes on; read again, nothing is lost or doubled', async () => {
  const ranges = shardRanges(2);
  const [a, b] = ranges.map((r) => r.shard);
  const byShard = tenantsByShard(ranges);
  const change = (shard: string, lsn: bigint, i: number): Change => ({
    op: 'c', before: null, after: { tenant: byShard.get(shard)![i], id: '1', note: `${shard}@${lsn}` }, unavailable: [],
    sourceShard: shard, epoch: 1n, commitLsn: lsn, position: 0n, txId: null, commitMs: 0,
  });
  // Barrier: a at 200, b at 500. Offsets 0..4: a@100, a@200 (held), b@300, a@300 (held), b@500 (held).
  const stream = [change(a, 100n, 0), change(a, 200n, 1), change(b, 300n, 0), change(a, 300n, 2), change(b, 500n, 1)];
  const decoder = { decode: async (v: Buffer) => stream[Number(v.toString())] } as unknown as ChangeDecoder;
  const target = fakeSession([]);
  const applier = new TableApplier('rs', orders, 'mg.src.public.orders', new Map([['-', target.client]]), [{ shard: '-', start: '', end: '' }], decoder, { ranges, vindex: orders.vindex });
  const message = (i: number): RawMessage => ({ topic: 'mg.src.public.orders', partition: 0, offset: String(i), key: null, timestamp: new Date(0), value: Buffer.from(String(i)), headers: {} });
  const upserted = () => target.statements.filter((s) => s.text.startsWith('INSERT INTO "public"."orders"')).flatMap((s) => s.values![2] as string[]);

  const barrier = new Barrier(new Map([[a, 200n], [b, 500n]]));
  const first = await applier.applyBatch(0, [0, 1, 2].map(message), barrier);
  assert.equal(first.reachedBarrier, false, 'b has not reached its barrier yet');
  const second = await applier.applyBatch(0, [3, 4].map(message), barrier);
  assert.equal(second.reachedBarrier, true);
  assert.deepEqual(upserted(), [`${a}@100`, `${b}@300`], 'exactly the changes before each shard\'s barrier');
  assert.equal(applier.appliedOffset(0), 0n, 'the recorded offset stays before the first held change');

  // Catch-up resumes from the recorded offset: what was applied past it is skipped, the held changes are applied once.
  const resume = await applier.applyBatch(0, [1, 2, 3, 4].map(message));
  assert.equal(resume.applied, 3);
  assert.deepEqual(upserted(), [`${a}@100`, `${b}@300`, `${a}@200`, `${a}@300`, `${b}@500`]);
  assert.equal(applier.appliedOffset(0), 4n);
});

test('a reshard\'s target set: the shards beside the serving ones that tile the keyspace in the count asked, also beside an earlier reshard\'s old set', () => {
  const named = (...sets: number[]) => sets.flatMap((n) => shardRanges(n));
  const shards = (ranges: ReturnType<typeof shardRanges> | undefined) => ranges?.map((r) => r.shard);
  assert.deepEqual(shards(tiling(named(4), 4)), ['-40', '40-80', '80-c0', 'c0-']);
  assert.deepEqual(shards(tiling(named(2, 1), 1)), ['-'], 'beside the old set of an earlier reshard');
  assert.deepEqual(shards(tiling(named(2, 1), 2)), ['-80', '80-']);
  assert.equal(tiling(named(2), 4), undefined);
  assert.equal(tiling(shardRanges(4).slice(0, 3), 3), undefined, 'a set with a gap at the end tiles nothing');
});
