/**
 * What the gateway knows about the cluster, built only from Kafka: the
 * topology fold plus the latest heartbeat of each instance. It answers "where
 * is the serving primary of this shard" and "which replicas may serve reads",
 * lets callers wait for a primary (the buffering primitive), and tells them
 * when a shard's primary moves to another instance.
 */
import type { EventLog, Subscription } from '../../common/eventlog.ts';
import { gauge } from '../../common/metrics.ts';
import {
  applyTopologyEvent, emptyTopology, kindOf, servingShardsOf, shardGroupOf, shardsOf, shardKey, type HealthEvent, type InstanceRegistered, type KeyRange, type PrimaryChanged, type TopologyEvent, type TopologyState,
} from '../../schemas/index.ts';

export interface Endpoint {
  instanceId: string;
  cell: string;
  host: string;
  /** The pooler's port: gateways never connect to Postgres directly. */
  port: number;
}

export interface ReplicaEndpoint extends Endpoint {
  lagBytes: bigint;
  lagSeconds: number;
}

/** A shard's primary moved to another instance under a newer term. */
export interface PrimaryMove {
  database: string;
  shard: string;
  /** The instance that was primary (under an older term). */
  from: string;
  to: string;
  term: bigint;
  /** The orchestrator's words: `failover: ...` or `switchover: ...`. */
  reason: string;
}

/** A database that sessions must leave: dropped, or (a shard group) scaled to zero. */
export interface DatabaseGone {
  database: string;
  why: 'dropped' | 'deactivated';
}

export interface DiscoveryOptions {
  /** A heartbeat older than this means the instance is not known to be healthy. */
  staleMs?: number;
  /** Replicas lagging more than this are not used for reads. */
  maxReplicaLagSeconds?: number;
}

/** The discoveries whose figures /metrics reports (a process normally has one). */
const reported = new Set<Discovery>();
gauge('mg_gateway_databases', 'Databases in topology', [], function () {
  let n = 0;
  for (const d of reported) n += d.databases().length;
  this.set(n);
});
gauge('mg_gateway_healthy_primaries', 'Shards with a healthy serving primary', [], function () {
  let n = 0;
  for (const d of reported) n += d.healthyPrimaryCount();
  this.set(n);
});

interface Seen { health: HealthEvent; at: number }

export class Discovery {
  readonly topology: TopologyState = emptyTopology();
  private readonly seen = new Map<string, Seen>();
  private subs: Subscription[] = [];
  private readonly staleMs: number;
  private readonly maxLagSeconds: number;
  /** Counts folded topology events: what keyRanges' cache is valid for. */
  private topologyVersion = 0;
  private readonly ranges = new Map<string, readonly KeyRange[]>();
  private rangesAt = -1;
  /**
   * Buffered queries waiting for a shard's primary, by shard key (and waitUntil's conditions). A primary
   * only appears through an event (topology or heartbeat), so waiters are
   * checked after events, once per batch, and only for the shards waited on:
   * an idle gateway with 10,000 databases does no work per database.
   */
  private readonly waiters = new Map<string, Set<() => void>>();
  private checkScheduled = false;
  private untilSeq = 0;
  private readonly moveListeners: ((move: PrimaryMove) => void)[] = [];
  private readonly goneListeners: ((gone: DatabaseGone) => void)[] = [];
  /** Caught up: moves seen from here on are news (the history read at start is not). */
  private live = false;

  constructor(private readonly eventLog: EventLog, opts: DiscoveryOptions = {}) {
    this.staleMs = opts.staleMs ?? 1_500;
    this.maxLagSeconds = opts.maxReplicaLagSeconds ?? 10;
  }

  /** Subscribes and resolves once the view is complete (caught up with topology and recent health). */
  async start(): Promise<void> {
    this.subs = await Promise.all([
      this.eventLog.subscribe('topology', (e) => {
        const { kind, body } = kindOf(e);
        this.topologyVersion++;
        if (kind !== 'PrimaryChanged') applyTopologyEvent(this.topology, e);
        else this.applyPrimaryChanged(e, body as PrimaryChanged);
        if (this.live && (kind === 'DatabaseDropped' || (kind === 'DatabaseActivationChanged' && !(body as { active: boolean }).active))) {
          const gone: DatabaseGone = { database: (body as { database: string }).database, why: kind === 'DatabaseDropped' ? 'dropped' : 'deactivated' };
          for (const listener of this.goneListeners) listener(gone);
        }
        this.scheduleWaiterCheck();
      }),
      this.eventLog.subscribe('health', (h) => {
        const held = this.seen.get(h.instanceId);
        if (held && held.health.ts > h.ts) return; // partitions may deliver an older heartbeat late
        this.seen.set(h.instanceId, { health: h, at: Date.now() });
        this.scheduleWaiterCheck();
      }, { since: new Date(Date.now() - this.staleMs) }),
    ]);
    await Promise.all(this.subs.map((s) => s.caughtUp));
    this.live = true;
    reported.add(this);
  }

  async stop(): Promise<void> {
    reported.delete(this);
    await Promise.all(this.subs.map((s) => s.stop()));
  }

  /** Calls `listener` whenever a shard's primary moves to another instance under a newer term (not for a re-election of the same one). */
  onPrimaryMoved(listener: (move: PrimaryMove) => void): void {
    this.moveListeners.push(listener);
  }

  /** Calls `listener` when a database is dropped or deactivated (not for the history read at start). */
  onDatabaseGone(listener: (gone: DatabaseGone) => void): void {
    this.goneListeners.push(listener);
  }

  /** Whether the database's shard group is scaled to zero (its instances stopped until a wake). */
  inactive(database: string): boolean {
    const group = this.group(database);
    return group !== undefined && this.topology.inactive.has(group);
  }

  /** Why the database's shard group is held stopped (a deactivation no client wakes, decision 0084), if it is. */
  holdReason(database: string): string | undefined {
    const group = this.group(database);
    const inactive = group === undefined ? undefined : this.topology.inactive.get(group);
    return inactive?.held ? inactive.reason : undefined;
  }

  hasDatabase(database: string): boolean {
    return this.group(database) !== undefined;
  }

  /**
   * The database whose shards and instances serve `database` (itself, or the
   * one it is hosted on). Every lookup below takes a database's own name and
   * goes through this, so a hosted database is routed like its host.
   */
  group(database: string): string | undefined {
    return shardGroupOf(this.topology, database);
  }

  /** Names of the databases that exist, oldest first. */
  databases(): string[] {
    return [...this.topology.databases.keys()].filter((name) => this.hasDatabase(name));
  }

  /** The shards that serve a database (name and key range): during a reshard, only the serving set (decision 0056). */
  shards(database: string) {
    const group = this.group(database);
    return group === undefined ? [] : servingShardsOf(this.topology, group);
  }

  /**
   * Every shard a database has, serving or not: during a reshard both sets (DDL runs on all of them,
   * so the set that is not serving keeps the schema the change streams it follows carry).
   */
  everyShard(database: string): string[] {
    const group = this.group(database);
    return group === undefined ? [] : shardsOf(this.topology, group).map((s) => s.shard).sort();
  }

  /**
   * The database's shards as key ranges in keyspace order. Read on every statement of a sharded
   * database, so computed once per topology change rather than by scanning every shard of the cluster.
   */
  keyRanges(database: string): readonly KeyRange[] {
    if (this.rangesAt !== this.topologyVersion) {
      this.ranges.clear();
      this.rangesAt = this.topologyVersion;
    }
    let ranges = this.ranges.get(database);
    if (!ranges) {
      ranges = this.shards(database).map((s) => ({ shard: s.shard, start: s.keyRangeStart, end: s.keyRangeEnd }))
        .sort((a, b) => a.start.localeCompare(b.start));
      this.ranges.set(database, ranges);
    }
    return ranges;
  }

  /** The shard's primary if it is serving and its latest heartbeat says healthy primary. */
  primary(database: string, shard: string): Endpoint | undefined {
    const group = this.group(database);
    if (group === undefined) return undefined;
    const rec = this.topology.primaries.get(shardKey(group, shard));
    if (!rec) return undefined;
    const inst = this.topology.instances.get(rec.instanceId);
    if (!inst || !this.serving(inst) || !this.healthy(inst.instanceId, 'PRIMARY')) return undefined;
    return endpoint(inst);
  }

  /** Healthy, serving replicas within the lag threshold, least lagged first. */
  replicas(database: string, shard: string): ReplicaEndpoint[] {
    const group = this.group(database);
    if (group === undefined) return [];
    const primaryId = this.topology.primaries.get(shardKey(group, shard))?.instanceId;
    const out: ReplicaEndpoint[] = [];
    for (const inst of this.topology.instances.values()) {
      if (inst.database !== group || inst.shard !== shard || inst.instanceId === primaryId) continue;
      if (!this.serving(inst) || !this.healthy(inst.instanceId, 'REPLICA')) continue;
      const h = this.seen.get(inst.instanceId)!.health;
      const lagSeconds = h.replayLagSeconds ?? 0;
      if (lagSeconds > this.maxLagSeconds) continue;
      const ep = endpoint(inst);
      if (ep) out.push({ ...ep, lagBytes: h.replayLagBytes ?? 0n, lagSeconds });
    }
    return out.sort((a, b) => a.lagSeconds - b.lagSeconds);
  }

  /** Whether a replica may still serve reads (O(1), for checks on every transaction). */
  replicaUsable(instanceId: string): boolean {
    const inst = this.topology.instances.get(instanceId);
    if (!inst || !this.serving(inst) || !this.healthy(instanceId, 'REPLICA')) return false;
    return (this.seen.get(instanceId)!.health.replayLagSeconds ?? 0) <= this.maxLagSeconds;
  }

  /** Resolves with the shard's primary as soon as there is one, or undefined after timeoutMs. */
  waitForPrimary(database: string, shard: string, timeoutMs: number): Promise<Endpoint | undefined> {
    const now = this.primary(database, shard);
    if (now || timeoutMs <= 0) return Promise.resolve(now);
    const key = shardKey(database, shard);
    return new Promise((resolve) => {
      const waiting = this.waiters.get(key) ?? new Set();
      this.waiters.set(key, waiting);
      const done = (ep: Endpoint | undefined) => {
        clearTimeout(timer);
        waiting.delete(check);
        if (waiting.size === 0) this.waiters.delete(key);
        resolve(ep);
      };
      const check = () => {
        const ep = this.primary(database, shard);
        if (ep) done(ep);
      };
      const timer = setTimeout(() => done(undefined), timeoutMs);
      waiting.add(check);
    });
  }

  /** Resolves true as soon as `cond()` holds after an event (checked like the primary waiters), false after timeoutMs. */
  waitUntil(cond: () => boolean, timeoutMs: number): Promise<boolean> {
    if (cond()) return Promise.resolve(true);
    const key = `until/${++this.untilSeq}`;
    return new Promise((resolve) => {
      const done = (ok: boolean) => {
        clearTimeout(timer);
        this.waiters.delete(key);
        resolve(ok);
      };
      const timer = setTimeout(() => done(false), timeoutMs);
      this.waiters.set(key, new Set([() => cond() && done(true)]));
    });
  }

  /** Shards whose primary would take a query now (computed on demand, for /metrics). */
  healthyPrimaryCount(): number {
    let n = 0;
    for (const key of this.topology.primaries.keys()) {
      const cut = key.lastIndexOf('/');
      if (this.primary(key.slice(0, cut), key.slice(cut + 1))) n++;
    }
    return n;
  }

  /** Folds a PrimaryChanged; when it hands the shard to another instance (the fold ignores older terms), says so. */
  private applyPrimaryChanged(e: TopologyEvent, p: PrimaryChanged): void {
    const key = shardKey(p.database, p.shard);
    const held = this.topology.primaries.get(key);
    applyTopologyEvent(this.topology, e);
    const now = this.topology.primaries.get(key)!;
    if (!this.live || !held || now.instanceId === held.instanceId || now.term <= held.term) return;
    const move: PrimaryMove = { database: p.database, shard: p.shard, from: held.instanceId, to: now.instanceId, term: now.term, reason: now.reason };
    for (const listener of this.moveListeners) listener(move);
  }

  private serving(inst: InstanceRegistered): boolean {
    return (this.topology.serving.get(inst.instanceId) ?? 'SERVING') === 'SERVING';
  }

  private healthy(instanceId: string, role: 'PRIMARY' | 'REPLICA'): boolean {
    const s = this.seen.get(instanceId);
    return !!s && s.health.reachable && s.health.role === role && Date.now() - s.at <= this.staleMs;
  }

  /** After a batch of events, wakes the waiters whose shard has a primary now. */
  private scheduleWaiterCheck(): void {
    if (this.waiters.size === 0 || this.checkScheduled) return;
    this.checkScheduled = true;
    setImmediate(() => {
      this.checkScheduled = false;
      for (const waiting of [...this.waiters.values()]) for (const check of [...waiting]) check();
    });
  }
}

function endpoint(inst: InstanceRegistered): Endpoint | undefined {
  return inst.poolerPort === null ? undefined : { instanceId: inst.instanceId, cell: inst.cell, host: inst.host, port: inst.poolerPort };
}
