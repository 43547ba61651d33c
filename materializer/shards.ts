/**
 * Where the data is: the topology log folded (databases, shards and their key
 * ranges, current primaries, VSchemas), and sessions on shard primaries that
 * return every value as text (see TEXT_SETTINGS).
 */
import pg from 'pg';
import type { EventLog, Subscription } from '../common/eventlog.ts';
import { applyTopologyEvent, emptyTopology, servingShardsOf, shardGroupOf, shardKey, type KeyRange, type TopologyState } from '../schemas/index.ts';
import { TEXT_SETTINGS, WorkflowError } from './tables.ts';

const asText = { getTypeParser: () => (v: string) => v };

export class ShardMap {
  readonly state: TopologyState = emptyTopology();
  private sub: Subscription | undefined;

  constructor(private readonly eventLog: EventLog) {}

  async start(): Promise<void> {
    this.sub = await this.eventLog.subscribe('topology', (e) => void applyTopologyEvent(this.state, e));
    await this.sub.caughtUp;
  }

  async stop(): Promise<void> {
    await this.sub?.stop();
  }

  /** The key ranges of the shards that serve a database (during a reshard, the serving set: decision 0056), in key order. */
  ranges(database: string): KeyRange[] {
    const group = shardGroupOf(this.state, database);
    if (!group) throw new WorkflowError(`database ${database} does not exist`);
    return servingShardsOf(this.state, group)
      .map((s) => ({ shard: s.shard, start: s.keyRangeStart, end: s.keyRangeEnd }))
      .sort((a, b) => a.start.localeCompare(b.start));
  }

  /**
   * The key ranges of a workflow side: the named shards of the database (a Reshard's two sets, decision 0056),
   * or with none named its serving shards.
   */
  rangesOf(database: string, shards: string[] | null): KeyRange[] {
    if (!shards) return this.ranges(database);
    const group = shardGroupOf(this.state, database);
    if (!group) throw new WorkflowError(`database ${database} does not exist`);
    return shards.map((shard) => {
      const s = this.state.shards.get(shardKey(group, shard));
      if (!s) throw new WorkflowError(`database ${database} has no shard ${shard}`);
      return { shard, start: s.keyRangeStart, end: s.keyRangeEnd };
    }).sort((a, b) => a.start.localeCompare(b.start));
  }

  /** A new session on the current primary of a shard, in the Postgres database named like the cluster database. */
  async connect(database: string, shard: string, applicationName: string): Promise<pg.Client> {
    const group = shardGroupOf(this.state, database) ?? database;
    const primary = this.state.primaries.get(shardKey(group, shard));
    const inst = primary && this.state.instances.get(primary.instanceId);
    if (!inst) throw new WorkflowError(`shard ${database}/${shard} has no primary`);
    const client = new pg.Client({
      host: inst.host, port: inst.port, user: 'postgres', database, application_name: applicationName, types: asText,
      password: process.env.MG_PASSWORD ?? 'postgres', connectionTimeoutMillis: 10_000,
    });
    client.on('error', () => {}); // a dropped session fails its next query, which the caller handles
    await client.connect();
    await client.query(TEXT_SETTINGS);
    return client;
  }
}
