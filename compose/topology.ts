/**
 * The cluster's topology as the spec plans it (cells, databases, each database's first serving shard set, its
 * shards), as the events the topology log does not hold yet. Pure, and one for both provisioners (decision
 * 0045's seam): `mg cluster up` publishes them (bootstrapTopology, compose/cluster.ts) and so does the operator
 * from the custom resources it maps to the same spec (operator/publish.ts, decision 0078). No primary is named:
 * MultiOrch elects each new shard's first one.
 */
import { shardKey, payload, type TopologyEvent, type TopologyState } from '../schemas/index.ts';
import { shardRanges, shardSetsOf, shardsOfSpec, type ClusterSpec } from './spec.ts';

/** The payloads of the spec's topology events that `held` (the log folded) lacks, in the order they are to be published. */
export function topologyToPublish(spec: ClusterSpec, held: TopologyState): Array<TopologyEvent['payload']> {
  const out: Array<TopologyEvent['payload']> = [];
  for (const cell of spec.cells) if (!held.cells.has(cell)) out.push(payload('CellRegistered', { cell, region: null }));
  for (const db of spec.databases) {
    // Absent, or dropped earlier: created (again).
    if (held.databases.get(db.name)?.dropped !== false) {
      out.push(payload('DatabaseCreated', { database: db.name, durabilityPolicy: db.durability ?? null, sharded: db.sharded, transactionMode: db.transactionMode, hostedOn: null }));
    }
    // A second shard set (a reshard, decision 0056) is defined only after the serving set names the first: routers never see a mix.
    if (db.shardSets.length && !held.servingShards.has(db.name)) {
      out.push(payload('ServingShardsChanged', { database: db.name, version: 1n, shards: shardRanges(shardSetsOf(db)[0]).map((r) => r.shard) }));
    }
    for (const r of shardsOfSpec(db)) {
      if (!held.shards.has(shardKey(db.name, r.shard))) {
        out.push(payload('ShardDefined', { database: db.name, shard: r.shard, keyRangeStart: r.start, keyRangeEnd: r.end }));
      }
    }
  }
  return out;
}
