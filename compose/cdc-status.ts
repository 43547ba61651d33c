/** `mg cdc status`: the change streams, read only from the compacted status topic in Kafka. */
import type { EventLog } from '../common/eventlog.ts';
import { formatLsn } from '../ingest/postgres/lsn.ts';
import type { CdcStreamStatus } from '../schemas/index.ts';

/** The latest status of every stream (keyed by database/shard). */
export async function readCdcStatus(eventLog: EventLog): Promise<Map<string, CdcStreamStatus>> {
  const latest = new Map<string, CdcStreamStatus>();
  const sub = await eventLog.subscribe('cdcStatus', (s) => {
    const key = `${s.database}/${s.shard}`;
    const held = latest.get(key);
    // Terms decide between an old and a new primary's reports, then time.
    if (!held || s.term > held.term || (s.term === held.term && s.ts >= held.ts)) latest.set(key, s);
  });
  try {
    await sub.caughtUp;
  } finally {
    await sub.stop();
  }
  return latest;
}

const bytes = (n: bigint) => (n < 1024n ? `${n}B` : n < 1024n ** 2n ? `${Number(n) / 1024 | 0}kB` : `${(Number(n) / 1024 ** 2).toFixed(1)}MB`);

export function renderCdcStatus(streams: Map<string, CdcStreamStatus>, now = Date.now()): string {
  if (streams.size === 0) return 'no change streams have reported (is databases[].cdc.enabled set, or was CDC_START sent?)';
  const header = ['DATABASE', 'SHARD', 'INSTANCE', 'STATE', 'TERM', 'EPOCH', 'CONFIRMED', 'LAG', 'EVENTS/S', 'EVENTS', 'SNAPSHOT', 'SEEN', 'NOTE'];
  const rows = [...streams.values()].map((s) => {
    const snap = s.snapshot
      ? `${s.snapshot.tablesDone}/${s.snapshot.tablesTotal} tables, ${s.snapshot.rows} rows${s.snapshot.finishedAt ? '' : ` (${Math.round(s.snapshot.rowsPerSecond)}/s)`}`
      : '-';
    const lag = s.slotLagBytes === null ? '-' : `${bytes(s.slotLagBytes)}/${(s.slotLagSeconds ?? 0).toFixed(1)}s`;
    return [
      s.database, s.shard, s.instanceId, s.state, String(s.term), String(s.epoch), s.confirmedLsn === null ? '-' : formatLsn(s.confirmedLsn),
      lag, s.eventsPerSecond.toFixed(0), String(s.eventsTotal), snap, `${((now - s.ts.getTime()) / 1000).toFixed(1)}s ago`, s.alert ?? s.error ?? s.resumedFrom ?? '',
    ];
  });
  const widths = header.map((_, i) => Math.max(header[i].length, ...rows.map((r) => r[i].length)));
  const line = (r: string[]) => r.map((c, i) => c.padEnd(widths[i])).join('  ').trimEnd();
  return [line(header), ...rows.map(line)].join('\n');
}
