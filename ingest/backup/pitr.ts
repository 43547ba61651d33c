/**
 * Point-in-time restore ending promoted: the CLI's `restore --to-dir` and a restored database's
 * first primary restore into a new instance; `restore --in-place` rewrites a shard primary's own.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { PostgresInstance } from '../postgres/instance.ts';
import type { RecoveryTarget } from '../../schemas/index.ts';
import type { PgBackRest } from './pgbackrest.ts';

/** A restore replays the archive up to its target: hours of WAL for a large, busy database. */
export const RESTORE_PROMOTE_TIMEOUT_MS = 30 * 60_000;

/**
 * Restores `pgbackrest`'s stanza into the instance's data directory up to
 * `target`, starts it and resolves once recovery has ended and it runs as a
 * primary of its own. The directory is new and empty, or with `inPlace` the
 * instance's own (stopped here; `delta` copies only what differs from the
 * backup `set`).
 */
export async function restorePromoted(pgbackrest: PgBackRest, pg: PostgresInstance, target: RecoveryTarget, inPlace?: { set?: string }): Promise<void> {
  if (inPlace) await pg.stop('fast');
  else pg.prepareEmpty();
  await pgbackrest.restore(pg.dataDir, target, { delta: inPlace !== undefined, set: inPlace?.set });
  // A fenced primary (standby of nobody) has standby.signal, which would win over the restore's recovery.signal: it would never promote.
  if (inPlace) fs.rmSync(path.join(pg.dataDir, 'standby.signal'), { force: true });
  pg.writeConfig();
  await pg.start(RESTORE_PROMOTE_TIMEOUT_MS / 1000);
  await pg.watch('recovery to end and promote', 'SELECT pg_is_in_recovery() AS rec', [], (rows) => !rows[0].rec, RESTORE_PROMOTE_TIMEOUT_MS, 200);
}
