/**
 * N processes of one router service sharing one port (node:cluster), used by
 * the gateway and the pooler alike: the primary only hands out connections,
 * restarts a worker that dies, serves the workers' metrics summed, drains them
 * all on SIGTERM, and relays `everyWorker` questions so that any worker can ask
 * all of them (a cancel key, an admin SHOW) and gather the answers.
 */
import cluster, { type Worker } from 'node:cluster';
import { AggregatorRegistry } from 'prom-client';
import { onShutdown } from '../../common/lifecycle.ts';
import type { Logger } from '../../common/log.ts';
import { metrics, serveMetrics } from '../../common/metrics.ts';

/** What a worker answers for an `everyWorker` operation. */
export type WorkerHandler = (args: unknown) => unknown;

interface Ask { mg: 'ask'; id: number; op: string; args: unknown }
interface Do { mg: 'do'; id: number; op: string; args: unknown }
interface Done { mg: 'done'; id: number; result?: unknown; error?: string }
interface Answer { mg: 'answer'; id: number; results: unknown[] }
/** Any message on the channel, as read before its kind is known. */
type Incoming = { mg?: string; id: number; op: string; args: unknown; from: number; result?: unknown; error?: string; results?: unknown[] };

/** A worker that does not answer within this is left out of the gathered answers. */
const ASK_TIMEOUT_MS = 5_000;

export interface WorkersOptions {
  /** Names the service in logs ('gateway', 'pooler'). */
  service: string;
  count: number;
  /** Where the summed /metrics is served; none when undefined. */
  metricsPort?: number;
  /** Where that port listens (default loopback; a pod's address in a pod). */
  metricsHost?: string;
  log: Logger;
  /** Messages from workers other than the relay's own (e.g. the pooler's connection leases). */
  onMessage?(worker: Worker, msg: unknown): void;
  /** A worker is gone (killed, crashed, or stopped). */
  onExit?(worker: Worker): void;
  /** How long SIGTERM waits for the workers to drain before the primary exits anyway. */
  graceMs?: number;
}

export async function runWorkers(opts: WorkersOptions): Promise<void> {
  const { service, count, log } = opts;
  let stopping = false;
  const relay = new AskRelay();
  cluster.on('message', (worker, msg: unknown) => {
    if (relay.handle(worker, msg)) return;
    opts.onMessage?.(worker, msg);
  });
  cluster.on('exit', (worker, code, signal) => {
    relay.forget(worker);
    opts.onExit?.(worker);
    if (stopping) return;
    log.error({ worker: worker.process.pid, code, signal }, `${service} worker died; starting another`);
    cluster.fork();
  });
  const workers = Array.from({ length: count }, () => cluster.fork());
  await Promise.all(workers.map((w) => new Promise<void>((resolve, reject) => {
    w.once('listening', () => resolve());
    w.once('exit', (code) => reject(new Error(`${service} worker exited with code ${code} before listening`)));
  })));
  const aggregate = new AggregatorRegistry();
  const metricsServer = opts.metricsPort === undefined ? undefined
    : await serveMetrics(opts.metricsPort, () => true, () => aggregate.clusterMetrics(), opts.metricsHost);
  log.info({ workers: count }, `${service} workers listening`);
  onShutdown(log, async () => {
    stopping = true;
    await Promise.all(liveWorkers().map((w) => new Promise<void>((resolve) => {
      if (w.isDead()) return resolve();
      w.once('exit', () => resolve());
      w.process.kill('SIGTERM');
    })));
    await metricsServer?.close();
  }, opts.graceMs);
}

export function liveWorkers(): Worker[] {
  return Object.values(cluster.workers ?? {}).filter((w): w is Worker => w !== undefined && !w.isDead());
}

/** In the primary: fans a worker's question out to every worker and sends back what they answered. */
class AskRelay {
  private readonly pending = new Map<string, { from: Worker; waiting: Set<number>; results: unknown[]; timer: NodeJS.Timeout }>();

  handle(worker: Worker, msg: unknown): boolean {
    const m = msg as Incoming;
    if (m?.mg === 'ask') {
      const key = `${worker.id}:${m.id}`;
      // A worker that is exiting may be alive with its channel closed: a send to it would be an 'error' event in the primary.
      const targets = liveWorkers().filter((w) => w.isConnected());
      const timer = setTimeout(() => this.finish(key), ASK_TIMEOUT_MS);
      timer.unref();
      this.pending.set(key, { from: worker, waiting: new Set(targets.map((w) => w.id)), results: [], timer });
      for (const w of targets) w.send({ mg: 'do', id: m.id, op: m.op, args: m.args, from: worker.id } satisfies Do & { from: number });
      return true;
    }
    if (m?.mg === 'done') {
      const key = `${m.from}:${m.id}`;
      const p = this.pending.get(key);
      if (!p) return true;
      if (m.error === undefined) p.results.push(m.result);
      p.waiting.delete(worker.id);
      if (p.waiting.size === 0) this.finish(key);
      return true;
    }
    return false;
  }

  /** A dead worker answers nothing: stop waiting for it, and drop its own questions. */
  forget(worker: Worker): void {
    for (const [key, p] of this.pending) {
      if (p.from === worker) {
        clearTimeout(p.timer);
        this.pending.delete(key);
      } else if (p.waiting.delete(worker.id) && p.waiting.size === 0) this.finish(key);
    }
  }

  private finish(key: string): void {
    const p = this.pending.get(key);
    if (!p) return;
    clearTimeout(p.timer);
    this.pending.delete(key);
    const id = Number(key.slice(key.indexOf(':') + 1));
    if (p.from.isConnected()) p.from.send({ mg: 'answer', id, results: p.results } satisfies Answer);
  }
}

/**
 * Operations every worker of this service can be asked. Outside a cluster the
 * "every worker" is this process alone, so callers need no second code path.
 */
export class EveryWorker {
  private readonly handlers = new Map<string, WorkerHandler>();
  private readonly waiting = new Map<number, (results: unknown[]) => void>();
  private nextId = 1;

  constructor() {
    if (!cluster.isWorker) return;
    process.on('message', (msg: unknown) => {
      const m = msg as Incoming;
      if (m?.mg === 'do') void this.answer(m as Do & { from: number });
      else if (m?.mg === 'answer') {
        const done = this.waiting.get(m.id);
        this.waiting.delete(m.id);
        done?.(m.results ?? []);
      }
    });
  }

  on(op: string, handler: WorkerHandler): void {
    this.handlers.set(op, handler);
  }

  /** Runs `op` in every worker (this one included) and gathers what each returned. */
  async ask<T>(op: string, args: unknown = null): Promise<T[]> {
    if (!cluster.isWorker) return [await this.run(op, args) as T];
    if (!process.connected) return []; // the primary is gone; node:cluster ends this worker
    const id = this.nextId++;
    return new Promise((resolve) => {
      this.waiting.set(id, resolve as (r: unknown[]) => void);
      process.send!({ mg: 'ask', id, op, args } satisfies Ask);
    });
  }

  private async run(op: string, args: unknown): Promise<unknown> {
    const h = this.handlers.get(op);
    if (!h) throw new Error(`no worker operation ${op}`);
    return h(args);
  }

  private async answer(m: Do & { from: number }): Promise<void> {
    let done: Done & { from: number };
    try {
      done = { mg: 'done', id: m.id, from: m.from, result: await this.run(m.op, m.args) };
    } catch (err) {
      done = { mg: 'done', id: m.id, from: m.from, error: (err as Error).message };
    }
    if (process.connected) process.send!(done);
  }
}

/** In a worker: lets the primary collect this process's registry. */
export function reportMetricsToPrimary(): void {
  AggregatorRegistry.setRegistries(metrics);
  // prom-client answers the primary's requests only once an AggregatorRegistry exists in the worker too.
  new AggregatorRegistry();
}
