/**
 * The server-connection bound of a pooler with several worker processes: it
 * stays poolSize per (user, database) for the whole Postgres, not per worker.
 * A worker opens a server connection only under a lease from the primary; a
 * closed connection gives its lease back. When leases run out, the primary
 * queues the request (served first to the waiting worker holding the fewest,
 * then in order of arrival) and asks a worker above its fair share to close one
 * connection as soon as one is free, or the others to close one they leave idle:
 * a client never waits long while another worker sits on idle connections, and
 * busy workers keep their share instead of trading connections (decision 0057).
 */
import cluster from 'node:cluster';

/** What a pool asks before opening a server connection, and tells after one closed. */
export interface ConnectionLeases {
  /** `granted` is called once this process may open one more connection for `key`. */
  request(key: string, poolSize: number, granted: () => void): void;
  release(key: string): void;
  /** Set by the primary: another worker waits for a lease on `key`, so give one back (how: GiveBack). */
  onWanted(handler: (key: string, only: GiveBack) => void): void;
}

/**
 * `wanted`: another worker waits for a lease on `key`. `only: 'next'` (this worker
 * holds more than its fair share): close an idle connection now, or the next one
 * freed even if a client of this worker waits for it. `only: 'idle'`: close a
 * connection only once it has sat idle for a while (this worker has more than it uses).
 */
export type GiveBack = 'next' | 'idle';

export type LeaseMessage =
  | { mg: 'lease'; key: string; poolSize: number }
  | { mg: 'unlease'; key: string }
  | { mg: 'granted'; key: string }
  | { mg: 'wanted'; key: string; only: GiveBack };

/** One process: the pool's own bound is the whole bound, so every request is granted at once. */
class LocalLeases implements ConnectionLeases {
  request(_key: string, _poolSize: number, granted: () => void): void {
    granted();
  }

  release(): void {}

  onWanted(): void {}
}

/** In a worker: leases come from the primary, granted in order per key. */
class WorkerLeases implements ConnectionLeases {
  private readonly pending = new Map<string, Array<() => void>>();
  private wanted: (key: string, only: GiveBack) => void = () => undefined;

  constructor() {
    process.on('message', (msg: LeaseMessage) => {
      if (msg?.mg === 'granted') this.pending.get(msg.key)?.shift()?.();
      else if (msg?.mg === 'wanted') this.wanted(msg.key, msg.only);
    });
  }

  request(key: string, poolSize: number, granted: () => void): void {
    let q = this.pending.get(key);
    if (!q) this.pending.set(key, (q = []));
    q.push(granted);
    this.send({ mg: 'lease', key, poolSize });
  }

  release(key: string): void {
    this.send({ mg: 'unlease', key });
  }

  /** Without its primary (it died) a worker is on its way out: node:cluster ends it on disconnect. */
  private send(msg: LeaseMessage): void {
    if (process.connected) process.send!(msg);
  }

  onWanted(handler: (key: string, only: GiveBack) => void): void {
    this.wanted = handler;
  }
}

export function connectionLeases(): ConnectionLeases {
  return cluster.isWorker ? new WorkerLeases() : new LocalLeases();
}

/** How the arbiter reaches a worker; false when that worker is gone. */
export type SendToWorker = (worker: number, msg: LeaseMessage) => boolean;

/**
 * In the primary: counts the leases each worker holds per key and hands out the
 * rest in order. Pure bookkeeping (workers are ids, messages go through `send`),
 * so it is unit-tested without processes.
 */
export class LeaseArbiter {
  private readonly held = new Map<string, Map<number, number>>();
  private readonly queue = new Map<string, Array<{ worker: number; poolSize: number }>>();
  /**
   * Give-backs asked and not yet answered, per key and worker: a burst of lease
   * requests must not ask one worker many times (it would give back all of them,
   * then ask for them back). Cleared by that worker's next release.
   */
  private readonly asked = new Map<string, Map<number, GiveBack>>();

  constructor(private readonly send: SendToWorker) {}

  /** True when the message was a lease message. */
  handle(worker: number, msg: unknown): boolean {
    const m = msg as LeaseMessage;
    if (m?.mg === 'lease') {
      let q = this.queue.get(m.key);
      if (!q) this.queue.set(m.key, (q = []));
      q.push({ worker, poolSize: m.poolSize });
      this.grant(m.key);
      return true;
    }
    if (m?.mg === 'unlease') {
      this.asked.get(m.key)?.delete(worker);
      this.add(m.key, worker, -1);
      this.grant(m.key);
      return true;
    }
    return false;
  }

  /** A dead worker's connections died with it: its leases and requests go. */
  forget(worker: number): void {
    for (const key of new Set([...this.held.keys(), ...this.queue.keys()])) {
      this.held.get(key)?.delete(worker);
      this.asked.get(key)?.delete(worker);
      const q = this.queue.get(key);
      if (q) this.queue.set(key, q.filter((r) => r.worker !== worker));
      this.grant(key);
    }
  }

  /** Leases held per key (for tests and logs). */
  total(key: string): number {
    let n = 0;
    for (const c of this.held.get(key)?.values() ?? []) n += c;
    return n;
  }

  /** Leases one worker holds for key. */
  holds(key: string, worker: number): number {
    return this.held.get(key)?.get(worker) ?? 0;
  }

  private add(key: string, worker: number, delta: number): void {
    let byWorker = this.held.get(key);
    if (!byWorker) this.held.set(key, (byWorker = new Map()));
    const n = Math.max(0, (byWorker.get(worker) ?? 0) + delta);
    if (n === 0) byWorker.delete(worker);
    else byWorker.set(worker, n);
    if (byWorker.size === 0 && !this.queue.get(key)?.length) this.held.delete(key);
  }

  /** The request served next: the earliest of the waiting worker that holds the fewest leases (so one worker's burst does not starve another). */
  private next(key: string, q: Array<{ worker: number; poolSize: number }>): number {
    let best = 0;
    for (let i = 1; i < q.length; i++) if (this.holds(key, q[i].worker) < this.holds(key, q[best].worker)) best = i;
    return best;
  }

  private grant(key: string): void {
    const q = this.queue.get(key);
    let i = q?.length ? this.next(key, q) : -1;
    while (q && i >= 0 && this.total(key) < q[i].poolSize) {
      const { worker } = q.splice(i, 1)[0];
      this.add(key, worker, 1);
      if (!this.send(worker, { mg: 'granted', key })) this.add(key, worker, -1);
      i = q.length ? this.next(key, q) : -1;
    }
    if (!q?.length) {
      this.queue.delete(key);
      this.asked.delete(key);
      if (!this.held.get(key)?.size) this.held.delete(key);
      return;
    }
    this.askGiveBack(key, q[i].worker, q[i].poolSize, new Set(q.map((r) => r.worker)));
  }

  /**
   * Still short for `waiting`: the fair share is poolSize split among the workers
   * that want the pool (hold leases or wait for one). The richest other worker
   * above its share gives one back as soon as one is free; if none is above, every
   * holder gives back only a connection idle for a while (it has more than it
   * uses), so a worker at or below its share keeps what it has and connections
   * settle instead of moving back and forth under load. While requests queue,
   * every holder stays asked (a worker asks again only after a release), so no
   * connection sits idle long while another worker waits.
   */
  private askGiveBack(key: string, waiting: number, poolSize: number, queued: Set<number>): void {
    const byWorker = this.held.get(key) ?? new Map<number, number>();
    const wanting = new Set([...byWorker.keys(), ...queued]).size;
    const mine = byWorker.get(waiting) ?? 0;
    let richest: number | undefined;
    let most = 0;
    for (const [w, n] of byWorker) if (w !== waiting && n > most) [richest, most] = [w, n];
    if (richest === undefined) return;
    let asked = this.asked.get(key);
    if (!asked) this.asked.set(key, (asked = new Map()));
    if (aboveFairShare(most, mine, poolSize, wanting)) {
      if (asked.get(richest) !== 'next' && this.send(richest, { mg: 'wanted', key, only: 'next' })) asked.set(richest, 'next');
      return;
    }
    // The waiting worker too: a queued request may be stale (its clients left), and then its idle connections are the ones to move.
    for (const w of byWorker.keys()) {
      if (!asked.has(w) && this.send(w, { mg: 'wanted', key, only: 'idle' })) asked.set(w, 'idle');
    }
  }
}

/**
 * Whether a worker holding `held` leases should give one to a waiting worker
 * holding `waiterHolds`, with `poolSize` split among `wanting` workers: only
 * above the even share, and only when the move narrows the gap (a difference of
 * one is the remainder of an uneven split: moving it would only move it back).
 */
export function aboveFairShare(held: number, waiterHolds: number, poolSize: number, wanting: number): boolean {
  return held > Math.floor(poolSize / Math.max(1, wanting)) && held >= waiterHolds + 2;
}
