/**
 * Resuming a stream without sending anything twice. When a stream starts on an
 * existing slot, Postgres resends every transaction after the slot's confirmed
 * position, and some of them may already be in Kafka (a send acknowledged by
 * Kafka just before a crash, before the slot was confirmed; or a standby's copy
 * of the slot a little behind the primary's). Kafka itself says what it holds:
 * in each partition, one shard's events are in (epoch, commit_lsn, position)
 * order (one send in flight at a time, idempotent producer), so the last event
 * of this shard in a partition marks exactly what that partition already has.
 */
import { partitionOfKey, type EventLog } from '../../common/eventlog.ts';
import { parseAvro, type SchemaRegistryClient } from '../../schemas/index.ts';
import type avro from 'avsc';

/** The place in the stream of the last event of this shard in one partition. */
export interface Delivered {
  epoch: bigint;
  snapshot: boolean;
  commitLsn: bigint;
  position: bigint;
  instance: string;
}

const FIRST_WINDOW = 500n;

/**
 * For every partition of the database's table topics (`<prefix>.<database>.*`,
 * not the transaction topic), the last event this shard delivered there. Reads
 * backwards from each partition's end in growing windows until it finds one
 * (partitions shared with other shards of the database may need more).
 */
export async function lastDelivered(eventLog: EventLog, topicPrefix: string, databasePart: string, shard: string): Promise<Map<string, Delivered>> {
  const prefix = `${topicPrefix}.${databasePart}.`;
  const topics = (await eventLog.listTopics()).filter((t) => t.startsWith(prefix) && t !== `${prefix}transaction`);
  const types = new Map<number, Promise<avro.Type>>();
  const found = new Map<string, Delivered>();
  let open: Array<{ topic: string; partition: number; low: bigint; to: bigint }> = [];
  for (const topic of topics) {
    for (const o of await eventLog.partitionOffsets(topic)) if (o.high > o.low) open.push({ topic, partition: o.partition, low: o.low, to: o.high });
  }
  for (let window = FIRST_WINDOW; open.length; window *= 8n) {
    const ranges = open.map((p) => ({ ...p, from: p.to - window > p.low ? p.to - window : p.low }));
    for (const m of await eventLog.readRanges(ranges)) {
      if (!m.value || m.value.length < 5 || m.value[0] !== 0) continue; // tombstones follow their delete in the same partition
      const id = m.value.readUInt32BE(1);
      let type = types.get(id);
      if (!type) types.set(id, (type = eventLog.registry.schemaById(id).then((text) => parseAvro(text))));
      const source = ((await type).fromBuffer(m.value.subarray(5)) as { source: Record<string, unknown> }).source;
      if (source.shard !== shard) continue;
      const d: Delivered = {
        epoch: BigInt(source.epoch as bigint), snapshot: source.snapshot === 'true', commitLsn: BigInt(source.commit_lsn as bigint),
        position: BigInt(source.position as bigint), instance: String(source.instance),
      };
      const key = `${m.topic}/${m.partition}`;
      const before = found.get(key);
      if (!before || compare(d, before) > 0) found.set(key, d);
    }
    // Further back only where this shard has no event yet in what was read.
    open = ranges.filter((r) => !found.has(`${r.topic}/${r.partition}`) && r.from > r.low).map((r) => ({ ...r, to: r.from }));
  }
  return found;
}

function compare(a: Delivered, b: Delivered): number {
  const pairs: Array<[bigint, bigint]> = [[a.epoch, b.epoch], [a.snapshot ? 0n : 1n, b.snapshot ? 0n : 1n], [a.commitLsn, b.commitLsn], [a.position, b.position]];
  for (const [x, y] of pairs) if (x !== y) return x < y ? -1 : 1;
  return 0;
}

/**
 * Drops the resent events Kafka already holds. Exact per partition; an event
 * without a key on a topic of several partitions (the partitioner picked one
 * at random) is dropped only when every partition has passed it, so it may be
 * sent twice but is never lost.
 */
export class ResendFilter {
  private readonly last: bigint;
  private active: boolean;

  constructor(private readonly delivered: Map<string, Delivered>, private readonly epoch: bigint) {
    let last = -1n;
    for (const d of delivered.values()) if (d.epoch === epoch && !d.snapshot && d.commitLsn > last) last = d.commitLsn;
    this.last = last;
    this.active = last >= 0n;
  }

  /** Whether the streamed event at (commitLsn, position) is already in `topic`'s partition for `key`. */
  has(topic: string, partitions: number, key: Buffer | null, commitLsn: bigint, position: number): boolean {
    if (!this.active) return false;
    if (commitLsn > this.last) {
      this.active = false; // past everything delivered: nothing later can be a resend
      return false;
    }
    if (key || partitions === 1) return this.hasIn(topic, key ? partitionOfKey(key, partitions) : 0, commitLsn, position);
    for (let p = 0; p < partitions; p++) if (!this.hasIn(topic, p, commitLsn, position)) return false;
    return true;
  }

  hasIn(topic: string, partition: number, commitLsn: bigint, position: number): boolean {
    if (!this.active) return false;
    const d = this.delivered.get(`${topic}/${partition}`);
    if (!d || d.epoch !== this.epoch || d.snapshot) return false;
    return commitLsn < d.commitLsn || (commitLsn === d.commitLsn && BigInt(position) <= d.position);
  }
}
