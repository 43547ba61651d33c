/**
 * The copy phase: each table read from one REPEATABLE READ snapshot of the
 * source in primary-key pages, each page's rows upserted on the shards their
 * vindex names; after every page the caller records the last key (an event),
 * so a restart resumes after it, on a new snapshot. That is exact because
 * catch-up replays every change from before the first snapshot: whatever
 * snapshot a page came from, the replay brings each row to its latest state.
 * A sharded source is copied shard by shard, each from its own snapshot, and
 * `keep` (the keyspace-id filter) leaves out rows outside the shard's range.
 * A Materialize's projection reads `read` (its query's rows) instead of the
 * table itself (decision 0058).
 */
import type pg from 'pg';
import type { KeyRange } from '../schemas/index.ts';
import type { Row } from './changes.ts';
import { pageSql, shardOfRow, upsertSql, type MovedTable } from './tables.ts';

export interface CopyPosition { lastKey: string[] | null; rowsCopied: number }

/**
 * Copies `t` from after `from.lastKey` to its end; `onPage` runs after each
 * page is on every target shard, and may stop the copy by returning false.
 * `read`: the relation read, when it is not `t` itself (a Materialize's query);
 * `into`: the table written, when it is not `t` itself (an online migration's
 * shadow table: the columns it takes, by name, with its types).
 */
export async function copyTable(
  source: pg.Client, targets: Map<string, pg.Client>, ranges: KeyRange[], t: MovedTable, from: CopyPosition, pageRows: number,
  onPage: (p: CopyPosition, rows: number) => Promise<boolean>, keep: (row: Row) => boolean = () => true,
  { read: relation = t, into = t }: { read?: MovedTable; into?: MovedTable } = {},
): Promise<CopyPosition> {
  let pos = from;
  const read = (after: string[] | null) => source.query<Row>(pageSql(relation, after, pageRows)).then((r) => r.rows);
  // The next page is read while this one is written: the source and the targets work at the same time.
  let reading: Promise<Row[]> | undefined = read(pos.lastKey);
  try {
    while (reading) {
      const rows: Row[] = await reading;
      if (rows.length === 0) return pos;
      const last = rows[rows.length - 1];
      const lastKey = t.key.map((k) => last[k]!);
      reading = rows.length < pageRows ? undefined : read(lastKey);
      const byShard = new Map<string, Row[]>();
      const kept = rows.filter(keep);
      for (const row of kept) {
        const shard = shardOfRow(t, row, ranges);
        const list = byShard.get(shard) ?? [];
        list.push(row);
        byShard.set(shard, list);
      }
      await Promise.all([...byShard].map(([shard, list]) => targets.get(shard)!.query(upsertSql(into, list))));
      pos = { lastKey, rowsCopied: pos.rowsCopied + kept.length };
      if (!(await onPage(pos, kept.length))) return pos;
    }
    return pos;
  } finally {
    reading?.catch(() => undefined); // a page read ahead and not written is dropped: the copy resumes after the last written one
  }
}
