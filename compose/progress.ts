/** Human progress for long CLI operations: each step with its time and the time so far. */
export class Progress {
  private readonly started = Date.now();
  private n = 0;

  constructor(private readonly total: number, private readonly out: NodeJS.WritableStream = process.stdout) {}

  async step<T>(title: string, fn: () => Promise<T>): Promise<T> {
    const label = `[${String(++this.n).padStart(String(this.total).length)}/${this.total}] ${title}`;
    this.out.write(`${label} ...\n`);
    const t0 = Date.now();
    try {
      const result = await fn();
      this.out.write(`${label}: done in ${secs(Date.now() - t0)} (elapsed ${secs(Date.now() - this.started)})\n`);
      return result;
    } catch (err) {
      this.out.write(`${label}: FAILED after ${secs(Date.now() - t0)}\n`);
      throw err;
    }
  }

  note(text: string): void {
    this.out.write(`      ${text}\n`);
  }

  elapsedMs(): number {
    return Date.now() - this.started;
  }
}

const secs = (ms: number) => `${(ms / 1000).toFixed(1)}s`;
