/** Naming shared by whoever runs pgBackRest for a shard (the agents) and whoever reads its repository or asks for a restore (the CLI, MultiOrch). */

/**
 * The pgBackRest stanza of a shard: `<database>-<shard>`, with the shard's
 * key range spelt as in instance ids ('-' is '0', '-80' is '_80', '80-' is '80_').
 */
export function stanzaOf(database: string, shard: string): string {
  return `${database}-${shard === '-' ? '0' : shard.replace('-', '_')}`;
}

export const BACKUP_TYPES = ['full', 'diff', 'incr'] as const;
export type BackupKind = (typeof BACKUP_TYPES)[number];

/** Where a point-in-time restore stops: a time, an LSN, or the end of the archive. */
export type RecoveryTarget = { type: 'time' | 'lsn'; value: string } | { type: 'default' };

/** The recovery target of `--time` (ISO 8601) or `--lsn` (or neither); an Error naming the flag when it is malformed. */
export function recoveryTargetOf(opts: { time?: string; lsn?: string }): RecoveryTarget {
  if (opts.time && opts.lsn) throw new Error('give --time or --lsn, not both');
  if (opts.time) {
    const t = new Date(opts.time);
    if (Number.isNaN(t.getTime())) throw new Error(`--time must be a date and time (ISO 8601, e.g. 2026-12-04T16:05:00Z), not ${opts.time}`);
    return { type: 'time', value: t.toISOString().replace('T', ' ').replace('Z', '+00') };
  }
  if (opts.lsn) {
    if (!/^[0-9A-Fa-f]{1,8}\/[0-9A-Fa-f]{1,8}$/.test(opts.lsn)) throw new Error(`--lsn must look like 0/16B3748, not ${opts.lsn}`);
    return { type: 'lsn', value: opts.lsn };
  }
  return { type: 'default' };
}

/** What a restore needs of one backup in a repository's listing (`pgbackrest info`, as the agents report it). */
export interface ListedBackup {
  label: string;
  /** When it ended (pgBackRest keeps whole seconds). */
  stoppedAt: string | Date;
  stopLsn: string;
  error?: boolean;
}

/**
 * The latest backup a point-in-time restore to `target` can start from (pgBackRest's
 * `--set`): one that ended before the target, since recovery cannot stop inside a backup.
 * Undefined when there is none.
 */
export function backupBefore<B extends ListedBackup>(backups: B[], target: { time?: Date; lsn?: string }): B | undefined {
  const lsnKey = (lsn: string) => lsn.split('/').map((half) => half.toUpperCase().padStart(8, '0')).join('');
  return backups.filter((b) => {
    if (b.error || !b.stopLsn) return false;
    // The listing's stop time is truncated to the second: one more second keeps the choice on the safe side.
    if (target.time) return new Date(b.stoppedAt).getTime() + 1_000 <= target.time.getTime();
    return target.lsn !== undefined && lsnKey(b.stopLsn) <= lsnKey(target.lsn);
  }).at(-1);
}
