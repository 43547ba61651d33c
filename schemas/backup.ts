/** Naming shared by whoever runs pgBackRest for a shard (the agents) and whoever reads its repository (the CLI). */

/**
 * The pgBackRest stanza of a shard: `<database>-<shard>`, with the shard's
 * key range spelt as in instance ids ('-' is '0', '-80' is '_80', '80-' is '80_').
 */
export function stanzaOf(database: string, shard: string): string {
  return `${database}-${shard === '-' ? '0' : shard.replace('-', '_')}`;
}

export const BACKUP_TYPES = ['full', 'diff', 'incr'] as const;
export type BackupKind = (typeof BACKUP_TYPES)[number];
