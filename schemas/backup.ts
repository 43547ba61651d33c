/** Naming shared by whoever runs pgBackRest for a shard (the agents) and whoever reads its repository or asks for a restore (the CLI, MultiOrch). */

/**
 * The pgBackRest stanza of a shard: `<database>-<shard>`, with the shard's
 * key range spelt as in instance ids ('-' is '0', '-80' is '_80', '80-' is '80_').
 * A later Postgres system defined under a name whose stanza the repository
 * still holds (a database created again after a drop, a reshard back to a set
 * retired before) gets generation 2, 3, ...: `<database>-<shard>-g<n>`, since
 * pgBackRest ties a stanza to one system (decision 0064).
 */
export function stanzaOf(database: string, shard: string, generation = 1): string {
  const base = `${database}-${shard === '-' ? '0' : shard.replace('-', '_')}`;
  return generation === 1 ? base : `${base}-g${generation}`;
}

/** The shard and generation of `stanza` when it is one of `database`'s (stanzaOf's names), else undefined. */
export function stanzaPartsOf(stanza: string, database: string): { shard: string; generation: number } | undefined {
  if (!stanza.startsWith(`${database}-`)) return undefined;
  const m = /^(0|[0-9a-f]*_[0-9a-f]*)(?:-g([1-9][0-9]*))?$/.exec(stanza.slice(database.length + 1));
  if (!m) return undefined;
  return { shard: m[1] === '0' ? '-' : m[1].replace('_', '-'), generation: m[2] ? Number(m[2]) : 1 };
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
