/**
 * The copy phase: each table read from one REPEATABLE READ snapshot of the
 * source in primary-key pages, each page's rows written on the shards their
 * vindex names; after every page the caller records the last key (an event),
 * so a restart resumes after it, on a new snapshot. That is exact because
 * catch-up replays every change from before the first snapshot: whatever
 * snapshot a page came from, the replay brings each row to its latest state.
 * A sharded source is copied shard by shard, each from its own snapshot, and
 * `keep` (the keyspace-id filter) leaves out rows outside the shard's range.
 * A Materialize's projection reads `read` (its query's rows) instead of the
 * table itself (decision 0058).
 *
 * Pages travel as COPY text both ways (decision 0066): a page is read with
 * `COPY (SELECT ...) TO STDOUT`, each line decoded only to route it (key,
 * vindex, filter), and the same lines are written with `COPY ... FROM STDIN`.
 * COPY cannot upsert: a part of a page that meets a row already there (23505:
 * a restart redoing the page it was writing) is written again as an upsert.
 *
 * Across a failover (decision 0073) the copy reads and writes nothing that the
 * elected primary may lack: a snapshot is used, and a page counted as written,
 * only once a standby holds it (`heldByStandby`).
 */
import { finished } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import type pg from 'pg';
import { from as copyFrom, to as copyTo } from 'pg-copy-streams';
import { counter } from '../common/metrics.ts';
import type { KeyRange } from '../schemas/index.ts';
import type { Row } from './changes.ts';
import { copyInSql, copyOutSql, shardOfRow, upsertSql, WorkflowError, type MovedTable } from './tables.ts';

const upsertedParts = counter('mg_materializer_copy_parts_upserted_total', 'Parts of copy pages (a page on one target shard) that met rows already there and were upserted', ['table']);

export interface CopyPosition { lastKey: string[] | null; rowsCopied: number }

/** A page read as COPY text: each row's line as the source wrote it, and its values decoded. */
interface Page { lines: string[]; rows: Row[] }

/** A page split by target shard (the rows `keep` leaves), with how many rows were read and the last one's key. */
interface RoutedPage { read: number; lastKey: string[] | null; kept: number; parts: Map<string, Page> }

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
  // The columns `into` takes come first on each line, so a line is written as it was read (cut before the rest).
  const written = into.columns.map((c) => c.name);
  const missing = written.filter((name) => !relation.columns.some((c) => c.name === name));
  if (missing.length) throw new WorkflowError(`the copy of ${t.table} reads no column ${missing.join(', ')} for ${into.table}`);
  const columns = [...written, ...relation.columns.map((c) => c.name).filter((name) => !written.includes(name))];
  const cut = columns.length > written.length ? (line: string) => line.slice(0, nthTab(line, written.length)) : (line: string) => line;

  let pos = from;
  // A page is read and routed while the one before it is written: the source, this process and the targets work at the same time.
  const read = async (after: string[] | null): Promise<RoutedPage> => {
    const { lines, rows } = await readPage(source, copyOutSql(relation, columns, after, pageRows), columns);
    const parts = new Map<string, Page>();
    let kept = 0;
    rows.forEach((row, i) => {
      if (!keep(row)) return;
      kept++;
      const shard = shardOfRow(t, row, ranges);
      const part = parts.get(shard) ?? { lines: [], rows: [] };
      part.lines.push(cut(lines[i]));
      part.rows.push(row);
      parts.set(shard, part);
    });
    return { read: rows.length, lastKey: rows.length ? t.key.map((k) => rows[rows.length - 1][k]!) : null, kept, parts };
  };
  // A page read ahead fails where it is awaited; one not awaited (the copy stopped, or a write failed) is dropped,
  // and the copy resumes after the last page written.
  const readAhead = (after: string[] | null) => {
    const p = read(after);
    p.catch(() => undefined);
    return p;
  };
  let reading: Promise<RoutedPage> | undefined = readAhead(pos.lastKey);
  while (reading) {
    const page: RoutedPage = await reading;
    if (page.read === 0) return pos;
    reading = page.read < pageRows ? undefined : readAhead(page.lastKey);
    await Promise.all([...page.parts].map(async ([shard, part]) => {
      await writePart(targets.get(shard)!, into, part);
      await heldByStandby(targets.get(shard)!);
    }));
    pos = { lastKey: page.lastKey, rowsCopied: pos.rowsCopied + page.kept };
    if (!(await onPage(pos, page.kept))) return pos;
  }
  return pos;
}

/** One page through `COPY (SELECT ...) TO STDOUT`: its lines, and each line's values by column name. */
async function readPage(source: pg.Client, sql: string, columns: string[]): Promise<Page> {
  const chunks: Buffer[] = [];
  for await (const chunk of source.query(copyTo(sql))) chunks.push(chunk as Buffer);
  const text = Buffer.concat(chunks).toString('utf8');
  const lines = text.length ? text.slice(0, -1).split('\n') : []; // every line ends with a newline
  const rows = lines.map((line) => {
    const row: Row = {};
    line.split('\t').forEach((field, i) => { row[columns[i]] = copyTextValue(field); });
    return row;
  });
  return { lines, rows };
}

/** A shard's part of a page by COPY; when a row of it is already there (a page written again), by upsert. */
async function writePart(target: pg.Client, into: MovedTable, part: Page): Promise<void> {
  const stream = target.query(copyFrom(copyInSql(into)));
  try {
    stream.end(`${part.lines.join('\n')}\n`);
    await finished(stream);
  } catch (err) {
    if ((err as { code?: string }).code !== '23505') throw err;
    await target.query(upsertSql(into, part.rows));
    upsertedParts.inc({ table: `${into.schema}.${into.table}` });
  }
}

/** How long the copy waits for a standby to hold what it read or wrote, then goes on without (a standby that far behind would lose every client's acknowledged writes in a failover too). */
const STANDBY_MS = 5_000;

/** The primary's WAL written so far (or `$1`), and whether a physical standby streaming from it has flushed that far, or none streams. */
const HELD_SQL = `SELECT w.lsn::text AS lsn, (count(r.pid) = 0 OR bool_or(r.flush_lsn >= w.lsn))::text AS held
  FROM (SELECT coalesce($1::pg_lsn, pg_current_wal_insert_lsn()) AS lsn) w
  LEFT JOIN pg_stat_replication r ON r.state = 'streaming'
    AND NOT EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.active_pid = r.pid AND s.slot_type = 'logical')
  GROUP BY w.lsn`;

/**
 * Waits until a standby streaming from the session's primary has flushed the
 * WAL written so far, up to STANDBY_MS (at once when none streams, or when the
 * durability policy made the commits wait for one already). The instance a
 * failover elects, the most advanced, then holds every commit that a snapshot
 * taken before saw, and every page written before, also where the policy does
 * not wait for standbys (ANY_1: a commit is visible and acknowledged before any
 * standby has it, and a failover can lose it). In a REPEATABLE READ
 * transaction, as its first statement, its first query also takes the snapshot.
 */
export async function heldByStandby(client: pg.Client): Promise<void> {
  const deadline = Date.now() + STANDBY_MS;
  let lsn: string | null = null;
  for (;;) {
    const { rows: [r] }: { rows: { lsn: string; held: string | null }[] } = await client.query(HELD_SQL, [lsn]);
    if (r.held === 'true' || Date.now() > deadline) return;
    lsn = r.lsn;
    await sleep(2);
  }
}

/** The escapes COPY TO writes in text format (backslash and the control characters below); all else is literal. */
const ESCAPED: Record<string, string> = { b: '\b', f: '\f', n: '\n', r: '\r', t: '\t', v: '\v', '\\': '\\' };

/** A COPY text field's value: `\N` is NULL, backslash escapes decoded. */
export function copyTextValue(field: string): string | null {
  if (field === '\\N') return null;
  return field.includes('\\') ? field.replace(/\\(.)/gs, (_, c: string) => ESCAPED[c] ?? c) : field;
}

/** Where the n-th field separator of a COPY text line is (the line's length when it has fewer). */
function nthTab(line: string, n: number): number {
  let at = -1;
  for (let i = 0; i < n; i++) {
    at = line.indexOf('\t', at + 1);
    if (at < 0) return line.length;
  }
  return at;
}
