/**
 * The server-connection bound of a pooler with several worker processes: it
 * stays poolSize per (user, database) for the whole Postgres, not per worker.
 * A worker opens a server connection only under a lease from the primary; a
 * closed connection gives its lease back. When leases run out, the primary
 * queues the request (first come, first served across workers) and asks the
 * worker holding the most leases to close one connection as soon as it is idle,
 * so a client never waits long while another worker sits on idle connections
 * (decision 0057).
 */
import cluster, { type Worker } from 'node:cluster';

/** What a pool asks before opening a server connection, and tells after one closed. */
export interface ConnectionLeases {
  /** `granted` is called once this process may open one more connection for `key`. */
  request(key: string, poolSize: number, granted: () => void): void;
  release(key: string): void;
  /** Set by the primary: another worker waits for a lease on `key`, so give one back when it is idle. */
  onWanted(handler: (key: string) => void): void;
}

type LeaseMessage =
  | { mg: 'lease'; key: string; poolSize: number }
  | { mg: 'unlease'; key: string }
  | { mg: 'granted'; key: string }
  | { mg: 'wanted'; key: string };

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
  private wanted: (key: string) => void = () => undefined;

  constructor() {
    process.on('message', (msg: LeaseMessage) => {
      if (msg?.mg === 'granted') this.pending.get(msg.key)?.shift()?.();
      else if (msg?.mg === 'wanted') this.wanted(msg.key);
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

  onWanted(handler: (key: string) => void): void {
    this.wanted = handler;
  }
}

export function connectionLeases(): ConnectionLeases {
  return cluster.isWorker ? new WorkerLeases() : new LocalLeases();
}

/** In the primary: counts the leases each worker holds per key and hands out the rest in order. */
export class LeaseArbiter {
  private readonly held = new Map<string, Map<number, number>>();
  private readonly queue = new Map<string, Array<{ worker: Worker; poolSize: number }>>();

  /** True when the message was a lease message. */
  handle(worker: Worker, msg: unknown): boolean {
    const m = msg as LeaseMessage;
    if (m?.mg === 'lease') {
      let q = this.queue.get(m.key);
      if (!q) this.queue.set(m.key, (q = []));
      q.push({ worker, poolSize: m.poolSize });
      this.grant(m.key);
      return true;
    }
    if (m?.mg === 'unlease') {
      this.add(m.key, worker.id, -1);
      this.grant(m.key);
      return true;
    }
    return false;
  }

  /** A dead worker's connections died with it: its leases and requests go. */
  forget(worker: Worker): void {
    for (const [key, byWorker] of this.held) {
      byWorker.delete(worker.id);
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

  private add(key: string, worker: number, delta: number): void {
    let byWorker = this.held.get(key);
    if (!byWorker) this.held.set(key, (byWorker = new Map()));
    const n = Math.max(0, (byWorker.get(worker) ?? 0) + delta);
    if (n === 0) byWorker.delete(worker);
    else byWorker.set(worker, n);
    if (byWorker.size === 0 && !this.queue.get(key)?.length) this.held.delete(key);
  }

  private grant(key: string): void {
    const q = this.queue.get(key);
    while (q?.length && this.total(key) < q[0].poolSize) {
      const { worker } = q.shift()!;
      if (worker.isDead()) continue;
      this.add(key, worker.id, 1);
      worker.send({ mg: 'granted', key } satisfies LeaseMessage);
    }
    if (!q?.length) {
      this.queue.delete(key);
      return;
    }
    // Still short: the worker with the most leases (other than the one waiting) gives one back once idle.
    const waiting = q[0].worker.id;
    let richest: number | undefined;
    let most = 0;
    for (const [w, n] of this.held.get(key) ?? []) if (w !== waiting && n > most) [richest, most] = [w, n];
    if (richest !== undefined) cluster.workers?.[richest]?.send({ mg: 'wanted', key } satisfies LeaseMessage);
  }
}
