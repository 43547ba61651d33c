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
/**
 * After another orchestrator releases a shard, its announcements (topology,
 * on another topic) may still be on their way: hold back this long. Not tied
 * to the lease: a holder that died announced nothing, and its lease lapsing
 * is the only wait then.
 */
const RELEASE_SETTLE_MS = 1_000;
/** The holder treats its lease as over this much before its `until`: the allowance for clock skew and for the time the stamp took to arrive. */
const leaseMargin = (leaseMs: number) => leaseMs / 4;
/** How long what an operator asks for waits for another orchestrator's hold on the shard (`awaitFree`). */
export const REQUEST_WAIT_MS = 10_000;

interface Renewal {
  leaseMs: number;
  timer: NodeJS.Timeout;
  /** The renewal being published, if any. */
  pending?: Promise<void>;
  /** Why the lease was lost, once it was. */
  lost?: string;
}

type RecordExtra = { term?: bigint | null; details?: Record<string, string>; durationMs?: number; leaseUntil?: Date; eventId?: string };

/** The holder no longer holds the shard's lease: it must stop before its next step. */
export class LeaseLost extends Error {}

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
  /** Leases this orchestrator holds, renewed in the background until released. */
  private readonly renewals = new Map<string, Renewal>();
  private readonly publish;
  private sending: Promise<unknown> = Promise.resolve();
  private sub: Subscription | undefined;

  constructor(private readonly eventLog: EventLog, readonly orchestrator: string, private readonly log: Logger) {
    this.publish = eventLog.publisher('orchEvents');
  }

  async start(): Promise<void> {
    this.sub = await this.eventLog.subscribe('orchEvents', (e) => this.apply(e));
    await this.sub.caughtUp;
  }

  async stop(): Promise<void> {
    for (const key of [...this.renewals.keys()]) this.stopRenewing(key);
    await this.sub?.stop();
  }

  /** Records one event; resolves once Kafka has it. */
  async record(database: string, shard: string, kind: OrchEventKind, operation: string, summary: string, extra: RecordExtra = {}): Promise<OrchEvent> {
    const event: OrchEvent = {
      eventId: extra.eventId ?? randomUUID(), ts: new Date(), orchestrator: this.orchestrator, database, shard, kind, operation, summary,
      term: extra.term ?? null, details: extra.details ?? {},
      durationMs: extra.durationMs === undefined ? null : BigInt(Math.round(extra.durationMs)),
      leaseUntil: extra.leaseUntil ?? null,
    };
    this.log.info({ database, shard, kind, operation, term: event.term?.toString(), summary, details: event.details, durationMs: extra.durationMs }, 'orchestrator event');
    // One send at a time, so the journal keeps this orchestrator's order even when callers do not wait (`note`).
    const sent = this.sending.then(() => this.publish([{ key: shardKey(database, shard), value: event }]));
    this.sending = sent.catch(() => undefined);
    await sent;
    return event;
  }

  /**
   * Records a progress event without waiting for Kafka (an election's steps:
   * the client's write gap should not pay a broker round trip per line of
   * history). It still goes out in order; a failure is logged.
   */
  note(database: string, shard: string, kind: OrchEventKind, operation: string, summary: string, extra: RecordExtra = {}): void {
    this.record(database, shard, kind, operation, summary, extra)
      .catch((err: Error) => this.log.warn({ err: err.message, database, shard, kind, summary }, 'could not journal an event'));
  }

  /**
   * Claims the shard's recovery lease: publishes a claim and waits to read it
   * back; it holds only if no other orchestrator's unexpired claim came first.
   * A lease claimed here is renewed in the background (every leaseMs/3) until
   * `release`, so a live orchestrator keeps it through slow steps while a dead
   * one's lapses within leaseMs. Between its steps, the holder calls
   * `assertHeld`: a renewal that failed stops the operation there.
   */
  async claim(database: string, shard: string, operation: string, term: bigint | null, leaseMs: number): Promise<boolean> {
    const key = shardKey(database, shard);
    if (this.heldElsewhere(key)) return false;
    this.stopRenewing(key);
    if (!(await this.publishClaim(database, shard, operation, term, leaseMs, `${this.orchestrator} claims the shard`))) return false;
    const renewal: Renewal = { leaseMs, timer: setInterval(() => this.renew(database, shard, operation, term, renewal), leaseMs / 3) };
    this.renewals.set(key, renewal);
    return true;
  }

  /** Throws unless this orchestrator still holds the shard's lease, with the safety margin for clock skew to spare. */
  assertHeld(database: string, shard: string): void {
    const key = shardKey(database, shard);
    const renewal = this.renewals.get(key);
    if (!renewal) throw new LeaseLost(`${key} is not leased by ${this.orchestrator}`);
    if (renewal.lost) throw new LeaseLost(`lost the lease of ${key}: ${renewal.lost}`);
    if (!this.ownLease(key, renewal.leaseMs)) throw new LeaseLost(`lost the lease of ${key}: not renewed in time`);
  }

  async release(database: string, shard: string, operation: string): Promise<void> {
    const key = shardKey(database, shard);
    // No renewal after this one; one already sent goes out before the release (`record` sends one at a time).
    this.stopRenewing(key);
    if (this.lease(key)?.orchestrator !== this.orchestrator) return;
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

  /**
   * Waits, up to waitMs, until no other orchestrator holds the shard: what an
   * operator asks for (a switchover, a removal, a restore) outwaits another
   * orchestrator's short repair instead of failing on it. Whether it is free.
   */
  async awaitFree(key: string, waitMs: number): Promise<boolean> {
    for (const deadline = Date.now() + waitMs; this.heldElsewhere(key); await new Promise((r) => setTimeout(r, 50))) {
      if (Date.now() >= deadline) return false;
    }
    return true;
  }

  /** Why a claim of the shard did not hold, for the operator. */
  whyNotClaimed(key: string): string {
    const l = this.lease(key);
    if (l && l.orchestrator !== this.orchestrator) return `another orchestrator (${l.orchestrator}) holds ${key}`;
    if (this.heldElsewhere(key)) return `another orchestrator released ${key} a moment ago`;
    return `the claim of ${key} was not read back from the journal in time`;
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

  /** Publishes a claim (or a renewal) and waits to read it back; whether it holds the lease with the margin to spare. */
  private async publishClaim(database: string, shard: string, operation: string, term: bigint | null, leaseMs: number, summary: string): Promise<boolean> {
    const key = shardKey(database, shard);
    const eventId = randomUUID();
    const applied = new Promise<void>((resolve) => this.seen.set(eventId, resolve));
    try {
      await this.record(database, shard, 'CLAIMED', operation, summary, { term, leaseUntil: new Date(Date.now() + leaseMs), eventId });
      // A claim read back later than this would be (nearly) lapsed already.
      await Promise.race([applied, new Promise((r) => setTimeout(r, leaseMs - leaseMargin(leaseMs)))]);
    } finally {
      this.seen.delete(eventId);
    }
    return this.leases.get(key)?.eventId === eventId && this.ownLease(key, leaseMs);
  }

  private renew(database: string, shard: string, operation: string, term: bigint | null, renewal: Renewal): void {
    if (renewal.pending || renewal.lost) return;
    const key = shardKey(database, shard);
    renewal.pending = this.publishClaim(database, shard, operation, term, renewal.leaseMs, `${this.orchestrator} renews its lease`)
      .then((held) => {
        // Not read back yet (a slow broker or a busy machine) is not lost: `assertHeld` goes by the lease folded so far.
        if (!held && this.leases.get(key)?.orchestrator !== this.orchestrator) renewal.lost = 'another orchestrator holds it';
      }, (err: Error) => {
        renewal.lost = `the renewal failed: ${err.message}`;
      })
      .finally(() => {
        renewal.pending = undefined;
        if (!renewal.lost || this.renewals.get(key) !== renewal) return;
        clearInterval(renewal.timer);
        this.log.warn({ database, shard, reason: renewal.lost }, 'lease lost');
      });
  }

  private stopRenewing(key: string): void {
    clearInterval(this.renewals.get(key)?.timer);
    this.renewals.delete(key);
  }

  /**
   * Whether the folded lease is ours with more than the margin left. `until`
   * is stamped by the claimer's clock and compared by everyone on their own:
   * the holder gives up `leaseMargin` early, so clocks may disagree by that
   * much before two orchestrators could both think they hold the shard (and
   * even then terms keep them apart).
   */
  private ownLease(key: string, leaseMs: number): boolean {
    const l = this.leases.get(key);
    return !!l && l.orchestrator === this.orchestrator && l.until - Date.now() > leaseMargin(leaseMs);
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
