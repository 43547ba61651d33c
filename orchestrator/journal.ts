/**
 * The orchestrators' shared journal (mg.orch.events.v1): every observation,
 * decision and action as an event, and the per-shard recovery lease folded
 * from it. The topic has one partition, so every orchestrator folds claims in
 * the same order and agrees on who holds a shard.
 */
import { randomUUID } from 'node:crypto';
import type { EventLog, Subscription } from '../common/eventlog.ts';
import type { Logger } from '../common/log.ts';
import { shardKey, type OrchEvent, type OrchEventKind } from '../schemas/index.ts';

export interface Lease {
  orchestrator: string;
  eventId: string;
  term: bigint | null;
  until: number;
}

const HISTORY_PER_SHARD = 500;
const RELEASE_SETTLE_MS = 1_000;

export class Journal {
  private readonly leases = new Map<string, Lease>();
  /** When another orchestrator last released each shard: its announcements may still be on their way. */
  private readonly releasedByOthers = new Map<string, number>();
  private readonly history = new Map<string, OrchEvent[]>();
  private readonly seen = new Map<string, () => void>();
  /** The highest term any orchestrator claimed per shard: a new election must go above it. */
  private readonly claimedTerms = new Map<string, bigint>();
  /** The highest term any orchestrator completed something under, per shard (the topology may not show it yet). */
  private readonly completedTerms = new Map<string, bigint>();
  private readonly publish;
  private sub: Subscription | undefined;

  constructor(private readonly eventLog: EventLog, readonly orchestrator: string, private readonly log: Logger) {
    this.publish = eventLog.publisher('orchEvents');
  }

  async start(): Promise<void> {
    this.sub = await this.eventLog.subscribe('orchEvents', (e) => this.apply(e));
    await this.sub.caughtUp;
  }

  async stop(): Promise<void> {
    await this.sub?.stop();
  }

  /** Records one event; resolves once Kafka has it. */
  async record(database: string, shard: string, kind: OrchEventKind, operation: string, summary: string,
    extra: { term?: bigint | null; details?: Record<string, string>; durationMs?: number; leaseUntil?: Date; eventId?: string } = {}): Promise<OrchEvent> {
    const event: OrchEvent = {
      eventId: extra.eventId ?? randomUUID(), ts: new Date(), orchestrator: this.orchestrator, database, shard, kind, operation, summary,
      term: extra.term ?? null, details: extra.details ?? {},
      durationMs: extra.durationMs === undefined ? null : BigInt(Math.round(extra.durationMs)),
      leaseUntil: extra.leaseUntil ?? null,
    };
    this.log.info({ database, shard, kind, operation, term: event.term?.toString(), summary, details: event.details }, 'orchestrator event');
    await this.publish([{ key: shardKey(database, shard), value: event }]);
    return event;
  }

  /**
   * Claims the shard's recovery lease: publishes a claim and waits to read it
   * back; it holds only if no other orchestrator's unexpired claim came first.
   */
  async claim(database: string, shard: string, operation: string, term: bigint | null, leaseMs: number): Promise<boolean> {
    const key = shardKey(database, shard);
    if (this.heldElsewhere(key)) return false;
    const eventId = randomUUID();
    const applied = new Promise<void>((resolve) => this.seen.set(eventId, resolve));
    try {
      await this.record(database, shard, 'CLAIMED', operation, `${this.orchestrator} claims the shard`, {
        term, leaseUntil: new Date(Date.now() + leaseMs), eventId,
      });
      await Promise.race([applied, new Promise((r) => setTimeout(r, 5_000))]);
    } finally {
      this.seen.delete(eventId);
    }
    return this.leases.get(key)?.eventId === eventId;
  }

  async release(database: string, shard: string, operation: string): Promise<void> {
    if (this.lease(shardKey(database, shard))?.orchestrator !== this.orchestrator) return;
    await this.record(database, shard, 'RELEASED', operation, `${this.orchestrator} releases the shard`);
  }

  /** The unexpired lease of a shard, if any. */
  lease(key: string, now = Date.now()): Lease | undefined {
    const l = this.leases.get(key);
    return l && l.until > now ? l : undefined;
  }

  /** Whether another orchestrator holds the shard, or released it so recently that its results may not have arrived yet. */
  heldElsewhere(key: string, now = Date.now()): boolean {
    const l = this.lease(key, now);
    if (l) return l.orchestrator !== this.orchestrator;
    return now - (this.releasedByOthers.get(key) ?? 0) < RELEASE_SETTLE_MS;
  }

  claimedTerm(key: string): bigint {
    return this.claimedTerms.get(key) ?? 0n;
  }

  completedTerm(key: string): bigint {
    return this.completedTerms.get(key) ?? 0n;
  }

  /** Newest last. */
  historyOf(key: string): OrchEvent[] {
    return this.history.get(key) ?? [];
  }

  private apply(e: OrchEvent): void {
    const key = shardKey(e.database, e.shard);
    const h = this.history.get(key) ?? [];
    h.push(e);
    if (h.length > HISTORY_PER_SHARD) h.shift();
    this.history.set(key, h);
    if (e.term !== null && e.term > (this.claimedTerms.get(key) ?? 0n)) this.claimedTerms.set(key, e.term);
    if (e.kind === 'COMPLETED' && e.term !== null && e.term > (this.completedTerms.get(key) ?? 0n)) this.completedTerms.set(key, e.term);
    if (e.kind === 'CLAIMED' && e.leaseUntil) {
      const held = this.leases.get(key);
      // A claim made while another orchestrator's lease was running is void.
      if (!held || held.orchestrator === e.orchestrator || held.until <= e.ts.getTime()) {
        this.leases.set(key, { orchestrator: e.orchestrator, eventId: e.eventId, term: e.term, until: e.leaseUntil.getTime() });
      }
    } else if (e.kind === 'RELEASED' && this.leases.get(key)?.orchestrator === e.orchestrator) {
      this.leases.delete(key);
      if (e.orchestrator !== this.orchestrator) this.releasedByOthers.set(key, Date.now());
    }
    this.seen.get(e.eventId)?.();
  }
}
