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
import { testCluster, type TestCluster } from './cluster.ts';

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
