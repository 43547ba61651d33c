/**
 * The 10,000-databases part of bench/proxy.ts: publishes the topology of
 * many single-shard databases (DatabaseCreated, ShardDefined, one
 * InstanceRegistered, PrimaryChanged each) and measures how fast a fresh
 * Discovery (the gateway's view of the cluster) catches up with that log.
 */
import { randomUUID } from 'node:crypto';
import { EventLog } from '../../common/eventlog.ts';
import type { Logger } from '../../common/log.ts';
import { Discovery } from '../../router/gateway/discovery.ts';
import { payload, topologyKey, type TopologyEvent } from '../../schemas/index.ts';

export interface LogTarget { brokers: string[]; registryUrl: string; topicPrefix: string; log: Logger }

export const benchDbName = (i: number) => `bench_db_${String(i).padStart(5, '0')}`;

export function eventLogOf(t: LogTarget, clientId: string): EventLog {
  return new EventLog({ brokers: t.brokers, registryUrl: t.registryUrl, clientId, log: t.log, topicPrefix: t.topicPrefix });
}

/**
 * Publishes 4 events per database, in batches; the instances point at a real
 * Postgres/pooler port so that they are routable in shape (the databases do
 * not exist in Postgres). Returns the publish time in ms.
 */
export async function publishDatabases(t: LogTarget, count: number, ports: { postgres: number; pooler: number }): Promise<number> {
  const eventLog = eventLogOf(t, 'mg-bench-publisher');
  const publish = eventLog.publisher('topology');
  const t0 = performance.now();
  try {
    const batch: TopologyEvent[] = [];
    const flush = async () => {
      if (!batch.length) return;
      await publish(batch.map((e) => ({ key: topologyKey(e), value: e })));
      batch.length = 0;
    };
    const add = (p: TopologyEvent['payload']) => batch.push({ eventId: randomUUID(), ts: new Date(), source: 'mg-bench', payload: p });
    for (let i = 1; i <= count; i++) {
      const database = benchDbName(i);
      const instanceId = `${database}-0-zone1-0`;
      add(payload('DatabaseCreated', { database, durabilityPolicy: null, sharded: false, transactionMode: null, hostedOn: null }));
      add(payload('ShardDefined', { database, shard: '-', keyRangeStart: '', keyRangeEnd: '' }));
      add(payload('InstanceRegistered', {
        instanceId, database, shard: '-', cell: 'zone1', host: '127.0.0.1', port: ports.postgres,
        type: 'PRIMARY', agentMetricsPort: null, poolerPort: ports.pooler,
      }));
      add(payload('PrimaryChanged', { database, shard: '-', primaryInstanceId: instanceId, term: 1n, ruleNumber: 1n, reason: 'mg-bench' }));
      if (batch.length >= 2000) await flush();
    }
    await flush();
  } finally {
    await eventLog.close();
  }
  return performance.now() - t0;
}

export interface DiscoveryFigure { ms: number; databases: number; primaries: number; instances: number }

/** A fresh Discovery on its own event-log client: time from start() to caught up, and what it then holds. */
export async function freshDiscovery(t: LogTarget): Promise<DiscoveryFigure> {
  const eventLog = eventLogOf(t, `mg-bench-discovery-${randomUUID().slice(0, 8)}`);
  const d = new Discovery(eventLog);
  try {
    const t0 = performance.now();
    await d.start();
    const ms = performance.now() - t0;
    return { ms, databases: d.topology.databases.size, primaries: d.topology.primaries.size, instances: d.topology.instances.size };
  } finally {
    await d.stop().catch(() => undefined);
    await eventLog.close().catch(() => undefined);
  }
}
