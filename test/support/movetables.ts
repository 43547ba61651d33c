/**
 * The cluster of the MoveTables tests: `src` (unsharded, CDC on; `sourceInstances` instances, default 1) and
 * `dst` (2 shards of 1 instance; CDC on with `targetCdc`, which switching writes needs), and clients that read
 * every value as text.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import pg from 'pg';
import { shardRanges } from '../../compose/spec.ts';
import { hashKeyspaceId, shardFor, workflowKind, type KeyRange, type WorkflowEvent, type WorkflowStatus } from '../../schemas/index.ts';
import { testCluster, until, type TestCluster } from './cluster.ts';
import { testEventLog } from './env.ts';

const asText = { getTypeParser: () => (v: string) => v };
const TEXT_SETTINGS = "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; SET extra_float_digits = 3";

/** Sessions of a test cluster that read every value as text: on one instance (bypassing the gateway), or through the gateway. */
export function textSessions(cluster: TestCluster) {
  const portOf = (db: string, shard: string) => cluster.instances.find((i) => i.database === db && i.shard === shard)!.port;
  const connect = async (port: number, database: string) => {
    const c = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', password: 'postgres', database, types: asText });
    await c.connect();
    return c;
  };
  return {
    portOf,
    connect,
    direct: (db: string, shard: string) => connect(portOf(db, shard), db),
    gateway: (db: string) => connect(cluster.spec.gateway.port, db),
  };
}

export function moveTablesCluster(label: string, slot: number, settings: Record<string, string | number | boolean> = {}, opts: { targetCdc?: boolean; sourceInstances?: number } = {}) {
  const cluster = testCluster(label, slot, { settings, spec: {
    cells: ['zone1'],
    databases: [
      { name: 'src', instancesPerShard: opts.sourceInstances ?? 1, durability: 'ANY_1', cdc: { enabled: true } },
      { name: 'dst', sharded: true, shards: 2, instancesPerShard: 1, durability: 'ANY_1', ...(opts.targetCdc ? { cdc: { enabled: true } } : {}) },
    ],
  } });
  const sessions = textSessions(cluster);
  return {
    cluster,
    ranges: shardRanges(2),
    portOf: sessions.portOf,
    /** `mg cluster up`, and dst's VSchema: table orders sharded by hash of id. */
    async up(): Promise<void> {
      const up = await cluster.mg('cluster', 'up', ...cluster.flags);
      assert.equal(up.code, 0, up.stderr + up.stdout);
      const file = path.join(cluster.dataDir, 'vschema.yaml');
      fs.writeFileSync(file, 'vindexes:\n  hash: { type: hash }\ntables:\n  orders: { column_vindexes: [{ column: id, name: hash }] }\n');
      const applied = await cluster.mg('vschema', 'apply', 'dst', file, '--data-dir', cluster.dataDir);
      assert.equal(applied.code, 0, applied.stderr);
    },
    /** A session on the Postgres of a shard (its first planned instance, or the one on `port`), bypassing the gateway, with dates, times and floats in fixed forms. */
    async direct(db: string, shard: string, port = sessions.portOf(db, shard)): Promise<pg.Client> {
      const c = await sessions.connect(port, db);
      await c.query(TEXT_SETTINGS);
      return c;
    },
    /** A session through the gateway. */
    gateway: sessions.gateway,
  };
}

/** A workflow's status events as the workflows topic holds them, in order. */
export async function statusHistory(topicPrefix: string, name: string): Promise<WorkflowStatus[]> {
  const log = await testEventLog(topicPrefix);
  const out: WorkflowStatus[] = [];
  try {
    const sub = await log.subscribe('workflows', (e: WorkflowEvent) => {
      const { kind, body } = workflowKind(e);
      if (e.workflow === name && kind === 'WorkflowStatus') out.push(body as WorkflowStatus);
    });
    await sub.caughtUp;
  } finally {
    await log.close();
  }
  return out;
}

/**
 * Waits until the target shards hold exactly the source's rows of table orders (`columns`, the first one `id`),
 * then checks that each row is there once, on the shard its keyspace id (hash of id) names. Returns the source's
 * rows and the target's by id.
 */
export async function targetHoldsSource(source: pg.Client, targets: Map<string, pg.Client>, ranges: KeyRange[], columns: string, timeoutMs = 60_000) {
  const rowsOf = async (c: pg.Client) => (await c.query<Record<string, string>>(`SELECT ${columns} FROM orders ORDER BY id`)).rows;
  let sourceRows: Record<string, string>[] = [];
  let placed = new Map<string, { shard: string; row: Record<string, string> }[]>();
  await until('the target shards to hold exactly the source rows', timeoutMs, async () => {
    sourceRows = await rowsOf(source);
    placed = new Map();
    for (const [shard, c] of targets) for (const row of await rowsOf(c)) placed.set(row.id, [...(placed.get(row.id) ?? []), { shard, row }]);
    return placed.size === sourceRows.length && sourceRows.every((r) => JSON.stringify(placed.get(r.id)?.[0]?.row) === JSON.stringify(r));
  }).catch((err) => {
    const missing = sourceRows.filter((r) => !placed.has(r.id)).slice(0, 5).map((r) => r.id);
    throw new Error(`${(err as Error).message}: source ${sourceRows.length} rows, target ${placed.size}; missing e.g. ${missing.join(', ')}`);
  });
  for (const [id, copies] of placed) {
    assert.equal(copies.length, 1, `row ${id} is on ${copies.length} shards`);
    assert.equal(copies[0].shard, shardFor(hashKeyspaceId(id), ranges), `row ${id} is on the wrong shard`);
  }
  return { sourceRows, targetRows: new Map([...placed].map(([id, [{ row }]]) => [id, row])) };
}
