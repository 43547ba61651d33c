/** Point-in-time restore into a new instance: the CLI's `restore --to-dir` and a restored database's first primary share it. */
import type { PostgresInstance } from '../postgres/instance.ts';
import type { PgBackRest, RecoveryTarget } from './pgbackrest.ts';

/** A restore replays the archive up to its target: hours of WAL for a large, busy database. */
export const RESTORE_PROMOTE_TIMEOUT_MS = 30 * 60_000;

/**
 * Restores `pgbackrest`'s stanza into the instance's (new, empty) data
 * directory up to `target`, starts it and resolves once recovery has ended
 * and it runs as a primary of its own.
 */
export async function restorePromoted(pgbackrest: PgBackRest, pg: PostgresInstance, target: RecoveryTarget): Promise<void> {
  pg.prepareEmpty();
  await pgbackrest.restore(pg.dataDir, target);
  pg.writeConfig();
  await pg.start(RESTORE_PROMOTE_TIMEOUT_MS / 1000);
  await pg.watch('recovery to end and promote', 'SELECT pg_is_in_recovery() AS rec', [], (rows) => !rows[0].rec, RESTORE_PROMOTE_TIMEOUT_MS, 200);
}
