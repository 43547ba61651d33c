/**
 * A workflow's sessions on shard primaries, kept across a primary failover
 * (decisions 0069, 0073, 0079): whether any was lost with its primary, and
 * opening the lost ones again on the primary the topology names once MultiOrch
 * has elected it. Shared by the MoveTables/Reshard/Materialize runner and the
 * online migrations' runner; what each goes on from afterwards (the positions
 * the shards hold, the last page recorded) is the runner's.
 */
import type pg from 'pg';
import type { Logger } from '../common/log.ts';
import type { ShardMap } from './shards.ts';
import { WorkflowError } from './tables.ts';

/** How long a session lost with its shard's primary (a failover, a restart) is tried again before the workflow fails (decision 0069). */
export const RECONNECT_MS = 90_000;
/** How long a session may take to answer whether it is still on a primary. */
const PROBE_MS = 5_000;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Sessions of one kind, one per shard of a database (the maps keep their identity: appliers hold them). */
export interface SessionGroup {
  database: string;
  clients: Map<string, pg.Client>;
  /** The application_name a reopened session gets. */
  application: string;
}

/** What the shared handling needs of a runner. */
export interface Reconnecting {
  workflow: string;
  log: Logger;
  shards: ShardMap;
  groups(): SessionGroup[];
  stopping(): boolean;
  /** The workflow's phase now (logged). */
  phase(): string;
  /** Publishes a status message (what the workflow waits for). */
  say(message: string): Promise<void>;
}

/** Whether a session still answers, on a primary (a failover or restart of its Postgres ends it; a demotion leaves it on a standby). */
export async function onPrimary(client: pg.Client): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const answer = client.query<{ role: string }>("SELECT CASE WHEN pg_is_in_recovery() THEN 'standby' ELSE 'primary' END AS role").then((r) => r.rows[0].role === 'primary', () => false);
  const late = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), PROBE_MS)));
  try {
    return await Promise.race([answer, late]);
  } finally {
    clearTimeout(timer);
  }
}

/** The shards (`<database>/<shard>`, each once) with a session no longer on a primary: dropped, or on an instance now in recovery. */
export async function lostSessions(groups: SessionGroup[]): Promise<string[]> {
  const lost = new Set<string>();
  for (const { database, clients } of groups) {
    for (const [shard, client] of clients) if (!(await onPrimary(client))) lost.add(`${database}/${shard}`);
  }
  return [...lost];
}

/**
 * Opens every lost session again on its shard's primary, trying every 0.5 s until `withinMs` has passed
 * (the topology names the new primary once MultiOrch has elected it; the old one's port refuses, or
 * answers as a standby, until then). Returns early, leaving sessions lost, once the runner is stopping.
 */
export async function reopenLost(r: Pick<Reconnecting, 'shards' | 'groups' | 'stopping'>, withinMs: number): Promise<void> {
  const deadline = Date.now() + withinMs;
  for (const { database, clients, application } of r.groups()) {
    for (const [shard, client] of clients) {
      if (await onPrimary(client)) continue;
      void client.end().catch(() => {});
      for (;;) {
        const next = await r.shards.connect(database, shard, application).catch((e: Error) => e);
        if (!(next instanceof Error) && !r.stopping() && await onPrimary(next)) {
          clients.set(shard, next);
          break;
        }
        if (!(next instanceof Error)) void next.end().catch(() => {});
        if (r.stopping()) return;
        if (Date.now() > deadline) {
          throw new WorkflowError(`shard ${database}/${shard} has had no reachable primary for ${withinMs / 1000} s${next instanceof Error ? ` (${next.message})` : ''}; mg workflow start resumes from the positions held`);
        }
        await sleep(500);
      }
    }
  }
}

/**
 * Whether `err` came with sessions lost with their primary. If so, `pause` runs, the status message says
 * what the workflow waits for, the lost sessions are opened again on the primaries the topology names
 * (up to RECONNECT_MS, then this throws), and the message says after how long; the caller then goes on
 * from what the shards hold. If not, the error is the workflow's own (false). The caller decides
 * beforehand whether a lost session may be handled at all (not during a switch or cut-over).
 */
export async function reopenAfter(r: Reconnecting, err: Error, pause: () => Promise<void> = async () => {}): Promise<boolean> {
  const lost = await lostSessions(r.groups());
  if (lost.length === 0) return false;
  const began = Date.now();
  const what = `the session${lost.length > 1 ? 's' : ''} on ${lost.join(', ')}`;
  r.log.warn({ err, workflow: r.workflow, lost, phase: r.phase() }, 'lost sessions with a primary: reconnecting, then going on from what the shards hold');
  await pause();
  await r.say(`${what} lost (${err.message}): waiting for the primary`).catch(() => {});
  await reopenLost(r, RECONNECT_MS);
  if (!r.stopping()) await r.say(`${what} lost (${err.message}); reopened on the primary after ${((Date.now() - began) / 1000).toFixed(1)} s`);
  return true;
}
