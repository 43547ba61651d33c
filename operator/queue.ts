/**
 * A work queue of cluster keys (namespace/name): a key waiting is queued once however many
 * events name it, one key is reconciled at a time, and a failed key comes back after an
 * exponential backoff. Level-triggered: the key says what to look at, never what changed.
 */
export interface QueueOptions {
  baseDelayMs?: number;
  maxDelayMs?: number;
}

export class WorkQueue {
  private readonly pending = new Set<string>();
  private readonly failures = new Map<string, number>();
  private readonly timers = new Map<string, NodeJS.Timeout>();
  private wake: (() => void) | undefined;
  private stopped = false;

  constructor(private readonly opts: QueueOptions = {}) {}

  add(key: string): void {
    if (this.stopped) return;
    this.pending.add(key);
    this.wake?.();
  }

  /** Queues the key again after its backoff (doubling with each failure in a row). */
  retry(key: string): number {
    const n = (this.failures.get(key) ?? 0) + 1;
    this.failures.set(key, n);
    const delay = Math.min(this.opts.maxDelayMs ?? 30_000, (this.opts.baseDelayMs ?? 200) * 2 ** (n - 1));
    clearTimeout(this.timers.get(key));
    this.timers.set(key, setTimeout(() => {
      this.timers.delete(key);
      this.add(key);
    }, delay));
    return delay;
  }

  /** The key succeeded: its next failure starts the backoff from the beginning. */
  forget(key: string): void {
    this.failures.delete(key);
  }

  get size(): number {
    return this.pending.size;
  }

  /** Runs `work` for each key as it comes, one at a time, until stop(). */
  async run(work: (key: string) => Promise<void>): Promise<void> {
    while (!this.stopped) {
      const [key] = this.pending;
      if (key === undefined) {
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = undefined;
        continue;
      }
      this.pending.delete(key);
      await work(key);
    }
  }

  stop(): void {
    this.stopped = true;
    for (const t of this.timers.values()) clearTimeout(t);
    this.timers.clear();
    this.wake?.();
  }
}
