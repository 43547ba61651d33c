/**
 * The fault suite's client: a continuous writer through the gateway that
 * records every ACKNOWLEDGED insert (and every error), and a checker that
 * reads them all back at the end.
 */
import pg from 'pg';

export interface WriterOptions {
  port: number;
  database?: string;
  password?: string;
  /** A write with no answer within this long counts as failed (its outcome unknown, so not acknowledged). */
  timeoutMs?: number;
}

export interface ClientError { at: number; message: string }

export class Writer {
  /** id -> when it was acknowledged. */
  readonly acked = new Map<number, number>();
  readonly errors: ClientError[] = [];
  private next = 1;
  private running = false;
  private loop: Promise<void> | undefined;

  constructor(private readonly opts: WriterOptions) {}

  private connect(): pg.Client {
    const c = new pg.Client({
      host: '127.0.0.1', port: this.opts.port, user: 'postgres', password: this.opts.password ?? 'postgres',
      database: this.opts.database ?? 'postgres', query_timeout: this.opts.timeoutMs ?? 4_000, connectionTimeoutMillis: this.opts.timeoutMs ?? 4_000,
    });
    c.on('error', () => {});
    return c;
  }

  async setup(): Promise<void> {
    const c = this.connect();
    await c.connect();
    await c.query('CREATE TABLE IF NOT EXISTS fault_writes (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())');
    await c.end();
  }

  start(): void {
    this.running = true;
    this.loop = (async () => {
      let client: pg.Client | undefined;
      while (this.running) {
        try {
          if (!client) {
            client = this.connect();
            await client.connect();
          }
          const id = this.next++;
          await client.query('INSERT INTO fault_writes (id) VALUES ($1)', [id]);
          this.acked.set(id, Date.now());
        } catch (err) {
          this.errors.push({ at: Date.now(), message: (err as Error).message });
          client?.end().catch(() => {});
          client = undefined;
          await new Promise((r) => setTimeout(r, 50));
        }
      }
      await client?.end().catch(() => {});
    })();
  }

  async stop(): Promise<void> {
    this.running = false;
    await this.loop;
  }

  /** The longest time between two acknowledgements within [from, to] (the client-visible write gap). */
  maxGap(from: number, to: number): number {
    const times = [...this.acked.values()].filter((t) => t >= from && t <= to).sort((a, b) => a - b);
    let gap = 0;
    let prev = from;
    for (const t of times) {
      gap = Math.max(gap, t - prev);
      prev = t;
    }
    return Math.max(gap, to - prev);
  }

  /** The first gap longer than `minMs` after `from` (a failover as the client saw it), or the longest one. */
  outageAfter(from: number, minMs = 300): number {
    const times = [...this.acked.values()].filter((t) => t >= from).sort((a, b) => a - b);
    let prev = from;
    let longest = 0;
    for (const t of times) {
      if (t - prev > minMs) return t - prev + (prev - from);
      longest = Math.max(longest, t - prev);
      prev = t;
    }
    return longest;
  }

  errorsBetween(from: number, to: number): ClientError[] {
    return this.errors.filter((e) => e.at >= from && e.at <= to);
  }
}

/** Acknowledged ids missing from the table (read from the given Postgres). */
export async function lostWrites(acked: Iterable<number>, postgresPort: number): Promise<number[]> {
  const c = new pg.Client({ host: '127.0.0.1', port: postgresPort, user: 'postgres', database: 'postgres' });
  await c.connect();
  try {
    const { rows } = await c.query<{ id: string }>('SELECT id::text FROM fault_writes');
    const present = new Set(rows.map((r) => Number(r.id)));
    return [...acked].filter((id) => !present.has(id));
  } finally {
    await c.end();
  }
}
