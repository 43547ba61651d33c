/**
 * MultiOrch's picture of the cluster, from Kafka only: the topology fold and
 * the latest heartbeat of every instance (with when it arrived, since
 * freshness is judged by this process's clock).
 */
import type { EventLog, Subscription } from '../common/eventlog.ts';
import {
  applyTopologyEvent, defaultPolicy, emptyTopology, kindOf, parsePolicy, shardKey,
  type DurabilityPolicy, type HealthEvent, type InstanceRegistered, type PrimaryRecord, type TopologyState,
} from '../schemas/index.ts';

export interface Heard { health: HealthEvent; at: number }

export interface ShardView {
  database: string;
  shard: string;
  key: string;
  /** Every registered instance of the shard: the voters. */
  cohort: InstanceRegistered[];
  /**
   * The cohort without instances being removed (DRAINED): the standbys the durability policy counts, and the
   * replicas that are wired and put in service. A leaving instance still votes until it is deregistered.
   */
  members: InstanceRegistered[];
  primary: PrimaryRecord | undefined;
  /** The last term of an earlier system under this shard's name (a database created again, a shard set defined again); 0 when none. */
  retiredTerm: bigint;
  policyText: string;
  policy: DurabilityPolicy;
  /** Why the database's own policy could not be used, when it could not. */
  policyProblem?: string;
}

export class ClusterWatch {
  readonly topology: TopologyState = emptyTopology();
  private readonly heard = new Map<string, Heard>();
  private subs: Subscription[] = [];
  private startedAt = Date.now();
  /** When each database was last asked to wake (scale to zero), by this process's clock. */
  private readonly wokeAt = new Map<string, number>();
  /** Callers waiting until this process has folded an event it published (by eventId). */
  private readonly awaitingFold = new Map<string, () => void>();

  constructor(private readonly eventLog: EventLog, private readonly staleMs: number) {}

  async start(): Promise<void> {
    this.startedAt = Date.now();
    this.subs = await Promise.all([
      this.eventLog.subscribe('topology', (e) => {
        applyTopologyEvent(this.topology, e);
        this.awaitingFold.get(e.eventId)?.();
        const { kind, body } = kindOf(e);
        if (kind === 'DatabaseActivationChanged' && (body as { active: boolean }).active) this.wokeAt.set((body as { database: string }).database, Date.now());
      }),
      this.eventLog.subscribe('health', (h) => {
        const held = this.heard.get(h.instanceId);
        if (held && held.health.ts > h.ts) return;
        this.heard.set(h.instanceId, { health: h, at: Date.now() });
      }, { since: new Date(Date.now() - this.staleMs) }),
    ]);
    await Promise.all(this.subs.map((s) => s.caughtUp));
  }

  /**
   * Resolves once the topology fold has taken the event in, so a request that
   * follows the one that published it sees its effect (read your own writes).
   */
  folded(eventId: string, timeoutMs = 10_000): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.awaitingFold.delete(eventId);
        reject(new Error(`topology event ${eventId} not read back from Kafka within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      this.awaitingFold.set(eventId, () => {
        clearTimeout(timer);
        this.awaitingFold.delete(eventId);
        resolve();
      });
    });
  }

  async stop(): Promise<void> {
    await Promise.all(this.subs.map((s) => s.stop()));
  }

  shards(): ShardView[] {
    const out: ShardView[] = [];
    for (const def of this.topology.shards.values()) {
      const db = this.topology.databases.get(def.database);
      if (!db || db.dropped) continue;
      const key = shardKey(def.database, def.shard);
      const cohort = [...this.topology.instances.values()]
        .filter((i) => i.database === def.database && i.shard === def.shard && i.type !== 'RDONLY')
        .sort((a, b) => a.instanceId.localeCompare(b.instanceId));
      let policyText = db.durabilityPolicy ?? defaultPolicy(cohort.length);
      let policyProblem: string | undefined;
      let policy: DurabilityPolicy;
      try {
        policy = parsePolicy(policyText);
      } catch (err) {
        // An event from elsewhere may carry a bad policy: keep the shard safe under the default, and say so.
        policyProblem = (err as Error).message;
        policyText = defaultPolicy(cohort.length);
        policy = parsePolicy(policyText);
      }
      const members = cohort.filter((i) => this.topology.serving.get(i.instanceId) !== 'DRAINED');
      out.push({ database: def.database, shard: def.shard, key, cohort, members, primary: this.topology.primaries.get(key), retiredTerm: this.topology.retiredTerms.get(key) ?? 0n, policyText, policy, policyProblem });
    }
    return out;
  }

  shard(database: string, shard: string): ShardView | undefined {
    return this.shards().find((s) => s.database === database && s.shard === shard);
  }

  /**
   * A database scaled to zero, or waking (its agents starting Postgres, for up
   * to graceMs): its stopped instances are not failures to act on.
   */
  resting(database: string, graceMs: number, now = Date.now()): boolean {
    return this.topology.inactive.has(database) || now - (this.wokeAt.get(database) ?? -Infinity) < graceMs;
  }

  /** The latest heartbeat if it arrived within the staleness window. */
  fresh(instanceId: string, now = Date.now()): HealthEvent | undefined {
    const h = this.heard.get(instanceId);
    return h && now - h.at <= this.staleMs ? h.health : undefined;
  }

  /** When the latest heartbeat arrived; for one never heard, when this watch started (silence is judged from then). */
  lastHeard(instanceId: string): number {
    return this.heard.get(instanceId)?.at ?? this.startedAt;
  }

  latest(instanceId: string): HealthEvent | undefined {
    return this.heard.get(instanceId)?.health;
  }
}
