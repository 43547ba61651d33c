/** `mg cluster status`: topology and health built only from the Kafka event log. */
import type { EventLog } from '../common/eventlog.ts';
import { applyTopologyEvent, emptyTopology, instancesOf, type HealthEvent, type InstanceView, type TopologyState } from '../schemas/index.ts';

export interface ClusterView {
  topology: TopologyState;
  /** Latest heartbeat per instance within the health window. */
  health: Map<string, HealthEvent>;
}

/** Reads the topology log from the beginning and heartbeats of the last `healthWindowMs`, until caught up. */
export async function readClusterView(eventLog: EventLog, healthWindowMs = 5_000): Promise<ClusterView> {
  const topology = emptyTopology();
  const health = new Map<string, HealthEvent>();
  const subs = await Promise.all([
    eventLog.subscribe('topology', (e) => void applyTopologyEvent(topology, e)),
    eventLog.subscribe('health', (h) => {
      const held = health.get(h.instanceId);
      if (!held || held.ts <= h.ts) health.set(h.instanceId, h);
    }, { since: new Date(Date.now() - healthWindowMs) }),
  ]);
  try {
    await Promise.all(subs.map((s) => s.caughtUp));
  } finally {
    await Promise.all(subs.map((s) => s.stop()));
  }
  return { topology, health };
}

export type HealthVerdict = 'healthy' | 'unreachable' | 'stale' | 'no heartbeat' | 'not streaming';

/** What a user would call the instance's health, from its latest heartbeat. */
export function verdict(inst: InstanceView, h: HealthEvent | undefined, now = Date.now(), staleMs = 3_000): HealthVerdict {
  if (!h) return 'no heartbeat';
  if (now - h.ts.getTime() > staleMs) return 'stale';
  if (!h.reachable) return 'unreachable';
  if (inst.currentType !== 'PRIMARY' && h.walReceiverStatus !== 'streaming') return 'not streaming';
  return 'healthy';
}

export function renderStatus(view: ClusterView, now = Date.now()): string {
  const header = ['INSTANCE', 'DATABASE', 'SHARD', 'CELL', 'TYPE', 'ROLE', 'PORT', 'SERVING', 'HEALTH', 'LAG', 'TERM', 'SEEN'];
  const rows = instancesOf(view.topology).map((inst) => {
    const h = view.health.get(inst.instanceId);
    const term = view.topology.primaries.get(`${inst.database}/${inst.shard}`)?.term;
    const lag = h?.replayLagBytes != null ? `${h.replayLagBytes}B/${(h.replayLagSeconds ?? 0).toFixed(1)}s` : '-';
    return [
      inst.instanceId, inst.database, inst.shard, inst.cell, inst.currentType, h?.role ?? '-', String(inst.port),
      inst.serving, verdict(inst, h, now), lag, inst.currentType === 'PRIMARY' ? String(term ?? '-') : '',
      h ? `${((now - h.ts.getTime()) / 1000).toFixed(1)}s ago` : '-',
    ];
  });
  const widths = header.map((_, i) => Math.max(header[i].length, ...rows.map((r) => r[i].length)));
  const line = (r: string[]) => r.map((c, i) => c.padEnd(widths[i])).join('  ').trimEnd();
  const cells = [...view.topology.cells.keys()].join(', ') || '-';
  const dbs = [...view.topology.databases].filter(([, d]) => !d.dropped).map(([n]) => n).join(', ') || '-';
  return [`cells: ${cells}    databases: ${dbs}`, line(header), ...rows.map(line)].join('\n');
}
