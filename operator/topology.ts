/**
 * Who is primary of each shard, and in which term, as the cluster's topology log says, and
 * which VSchema each database serves: the operator folds that log (the same fold every gateway
 * uses) instead of guessing from pods. One subscription per event log (bootstrap, registry,
 * topic prefix), opened on the first reconcile of a cluster that names it; a primary change
 * wakes the cluster's reconcile. What the operator writes there: the cluster's topology as its resources plan
 * it (cells, databases, shards: operator/publish.ts, decision 0078), and an instance deregistered when its
 * cluster is deleted (decision 0055).
 */
import { randomUUID } from 'node:crypto';
import { EventLog, type Subscription } from '../common/eventlog.ts';
import type { Logger } from '../common/log.ts';
import { applyTopologyEvent, emptyTopology, kindOf, payload, shardKey, topologyKey, type TopologyEvent, type TopologyState, type VSchemaRecord } from '../schemas/index.ts';

export interface LogAddress { bootstrap: string; registryUrl: string; topicPrefix: string }

export interface ShardPrimary {
  shard: string;
  primary: string;
  term: number;
}

interface Reader {
  state: TopologyState;
  /** Events this operator published, waiting to be read back (by eventId): see publish(). */
  echoes: Map<string, () => void>;
  /** Read to the end it had when subscribed: before that the primaries may be older ones. */
  caughtUp: boolean;
  log: EventLog;
  subscription: Promise<Subscription>;
  clusters: Set<string>;
}

/** How long publish() waits for its events to come back on the subscription before it fails (and is retried). */
const ECHO_TIMEOUT_MS = 15_000;

export class TopologyReaders {
  private readonly readers = new Map<string, Reader>();
  /** Why the last reader of an event log failed (Kafka unreachable), until one reads it to its end. */
  private readonly failures = new Map<string, string>();

  constructor(private readonly log: Logger, private readonly onPrimaryChange: (clusterKey: string) => void) {}

  /**
   * The primaries of the database's shards known so far (none before the log is read, or when
   * Kafka cannot be reached: then the next reconcile tries again), and whether the log was read
   * to its end: only then may a pod be told from a primary's.
   */
  primaries(clusterKey: string, where: LogAddress, database: string, shards: string[]): { caughtUp: boolean; shards: ShardPrimary[] } {
    const reader = this.readerFor(clusterKey, where);
    return {
      caughtUp: reader.caughtUp,
      shards: shards.flatMap((shard) => {
        const p = reader.state.primaries.get(shardKey(database, shard));
        return p ? [{ shard, primary: p.instanceId, term: Number(p.term) }] : [];
      }),
    };
  }

  /** The VSchema the log serves for the database, once the log is read to its end (decision 0075). */
  vschema(clusterKey: string, where: LogAddress, database: string): { caughtUp: boolean; record?: VSchemaRecord } {
    const reader = this.readerFor(clusterKey, where);
    return { caughtUp: reader.caughtUp, record: reader.state.vschemas.get(database) };
  }

  /** Instances of the databases registered on the log; undefined until it is read to its end. */
  registered(clusterKey: string, where: LogAddress, databases: string[]): string[] | undefined {
    const reader = this.readerFor(clusterKey, where);
    if (!reader.caughtUp) return undefined;
    return [...reader.state.instances.values()].filter((i) => databases.includes(i.database)).map((i) => i.instanceId);
  }

  /**
   * The log's topology as folded so far, whether it was read to its end (only then does a missing event mean
   * one to publish), and why it could not be read the last time, if it could not.
   */
  held(clusterKey: string, where: LogAddress): { caughtUp: boolean; state: TopologyState; failure?: string } {
    const reader = this.readerFor(clusterKey, where);
    const failure = this.failures.get(logId(where));
    return { caughtUp: reader.caughtUp, state: reader.state, ...(failure ? { failure } : {}) };
  }

  /**
   * Publishes the events and returns once Kafka acknowledged them and the fold has read them back: a
   * reconcile right after this one then finds them held and publishes nothing again (a DatabaseCreated
   * twice would undo a deactivation and a serving set; decision 0078).
   */
  async publish(clusterKey: string, where: LogAddress, payloads: Array<TopologyEvent['payload']>): Promise<void> {
    const reader = this.readerFor(clusterKey, where);
    const events: TopologyEvent[] = payloads.map((p) => ({ eventId: randomUUID(), ts: new Date(), source: 'mg-operator', payload: p }));
    const echoed = events.map((e) => new Promise<void>((resolve) => reader.echoes.set(e.eventId, resolve)));
    let timer: NodeJS.Timeout | undefined;
    try {
      await reader.log.publisher('topology')(events.map((e) => ({ key: topologyKey(e), value: e })));
      await Promise.race([
        Promise.all(echoed),
        new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`published ${events.length} topology events, but the log did not serve them back within ${ECHO_TIMEOUT_MS / 1000}s`)), ECHO_TIMEOUT_MS))),
      ]);
    } finally {
      clearTimeout(timer);
      for (const e of events) reader.echoes.delete(e.eventId);
    }
  }

  /** Publishes InstanceDeregistered for each, and returns once the log acknowledged them. */
  async deregister(clusterKey: string, where: LogAddress, instanceIds: string[], reason: string): Promise<void> {
    const events: TopologyEvent[] = instanceIds.map((instanceId) => ({ eventId: randomUUID(), ts: new Date(), source: 'mg-operator', payload: payload('InstanceDeregistered', { instanceId, reason }) }));
    await this.readerFor(clusterKey, where).log.publisher('topology')(events.map((e) => ({ key: topologyKey(e), value: e })));
  }

  /** The cluster is gone: close readers no other cluster uses. */
  async forget(clusterKey: string): Promise<void> {
    for (const [id, reader] of this.readers) {
      reader.clusters.delete(clusterKey);
      if (reader.clusters.size > 0) continue;
      this.readers.delete(id);
      await reader.subscription.then((s) => s.stop(), () => undefined);
      await reader.log.close();
    }
  }

  async close(): Promise<void> {
    for (const key of [...new Set([...this.readers.values()].flatMap((r) => [...r.clusters]))]) await this.forget(key);
  }

  private readerFor(clusterKey: string, where: LogAddress): Reader {
    const id = logId(where);
    let reader = this.readers.get(id);
    if (!reader) {
      const log = new EventLog({ brokers: where.bootstrap.split(','), registryUrl: where.registryUrl, clientId: 'mg-operator', log: this.log, topicPrefix: where.topicPrefix });
      const state = emptyTopology();
      const clusters = new Set<string>();
      const echoes = new Map<string, () => void>();
      const subscription = log.subscribe('topology', (event) => {
        applyTopologyEvent(state, event);
        echoes.get(event.eventId)?.();
        if (kindOf(event).kind === 'PrimaryChanged') clusters.forEach((k) => this.onPrimaryChange(k));
      });
      subscription.then((s) => s.caughtUp).then(() => {
        reader!.caughtUp = true;
        this.failures.delete(id);
        clusters.forEach((k) => this.onPrimaryChange(k));
      }, () => undefined);
      subscription.catch((err) => {
        this.log.warn({ bootstrap: where.bootstrap, err: (err as Error).message }, 'cannot read the topology log; status shows no primaries');
        this.failures.set(id, (err as Error).message);
        this.readers.delete(id);
        void log.close().catch(() => undefined);
      });
      reader = { state, echoes, caughtUp: false, log, subscription, clusters };
      this.readers.set(id, reader);
    }
    reader.clusters.add(clusterKey);
    return reader;
  }
}

const logId = (where: LogAddress) => `${where.bootstrap}|${where.registryUrl}|${where.topicPrefix}`;
