/**
 * The "never two writable primaries" monitor: samples every instance
 * continuously. An instance is writable when it is not in recovery and has as
 * many streaming synchronous standbys as its synchronous_standby_names needs
 * (a primary without its quorum cannot acknowledge a commit).
 */
import { queryAt } from '../../../common/postgres.ts';

export interface Violation { at: number; writable: string[] }

export class PrimaryMonitor {
  readonly violations: Violation[] = [];
  samples = 0;
  private running = false;
  private loop: Promise<void> | undefined;

  constructor(private readonly instances: Array<{ instanceId: string; port: number }>, private readonly intervalMs = 100) {}

  start(): void {
    this.running = true;
    this.loop = (async () => {
      while (this.running) {
        const writable = (await Promise.all(this.instances.map(async (i) => ((await this.writable(i.port)) ? i.instanceId : undefined))))
          .filter((x): x is string => x !== undefined);
        this.samples++;
        if (writable.length > 1) this.violations.push({ at: Date.now(), writable });
        await new Promise((r) => setTimeout(r, this.intervalMs));
      }
    })();
  }

  async stop(): Promise<void> {
    this.running = false;
    await this.loop;
  }

  private async writable(port: number): Promise<boolean> {
    try {
      const [r] = await queryAt<{ rec: boolean; names: string; sync: number }>({ host: '127.0.0.1', port }, `SELECT pg_is_in_recovery() AS rec,
        current_setting('synchronous_standby_names') AS names,
        (SELECT count(*)::int FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum') AND state = 'streaming') AS sync`, [], 500);
      if (r.rec) return false;
      const k = /^\s*ANY\s+(\d+)/i.exec(r.names)?.[1];
      return r.names.trim() === '' || r.sync >= Number(k ?? 1);
    } catch {
      return false; // down or frozen: it acknowledges nothing
    }
  }
}
