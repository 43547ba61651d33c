/**
 * VDiff's comparison: the source table and its target shards, each read from
 * a snapshot the caller holds open, walked together in primary-key ranges:
 * one keyset page of the source, then every shard's rows in the same key
 * range (one ordered range scan each), matched by key in memory. A row is
 * missing (not on the shard its vindex names), extra (on the target only, or
 * on a shard its vindex does not name) or different (other values).
 * A sharded source is walked one shard at a time, each with its keyspace-id
 * filter (`keep`) applied to its rows and to the target's: every target row
 * is compared in the walk of the source shard whose key range holds it.
 * A Materialize's projection walks `relation` (its query's rows on the
 * source) against the target table (decision 0058).
 */
import type pg from 'pg';
import type { KeyRange, VDiffTable } from '../schemas/index.ts';
import type { Row } from './changes.ts';
import { keyText, pageSql, rowText, shardOfRow, type MovedTable } from './tables.ts';

const EXAMPLES = 5;

/** A source shard's snapshot, and its keyspace-id filter on source rows (`keep`) and on target rows (`keepTarget`, when their columns differ). */
export interface SourceSnapshot { client: pg.Client; keep: (row: Row) => boolean; keepTarget?: (row: Row) => boolean }

export async function diffTable(
  sources: SourceSnapshot[], targets: Map<string, pg.Client>, ranges: KeyRange[], t: MovedTable, pageRows: number,
  onPage: (rows: number) => void = () => {}, relation: MovedTable = t,
): Promise<VDiffTable> {
  const out: VDiffTable = { table: `${t.schema}.${t.table}`, sourceRows: 0n, targetRows: 0n, missing: 0n, extra: 0n, different: 0n, examples: [] };
  for (const source of sources) await walk(source, targets, ranges, t, pageRows, onPage, out, relation);
  return out;
}

async function walk(
  { client: source, keep, keepTarget = keep }: SourceSnapshot, targets: Map<string, pg.Client>, ranges: KeyRange[], t: MovedTable, pageRows: number,
  onPage: (rows: number) => void, out: VDiffTable, relation: MovedTable,
): Promise<void> {
  const example = (text: string) => void (out.examples.length < EXAMPLES && out.examples.push(text));
  let last: string[] | null = null;
  for (;;) {
    const page: Row[] = (await source.query<Row>(pageSql(relation, last, pageRows))).rows;
    const src = page.filter(keep);
    // The range this page covers: up to its last key, or (after the source's end) everything left on the target.
    const upTo: string[] | null = page.length ? t.key.map((k) => page[page.length - 1][k]!) : null;
    const found = new Map<string, Array<{ shard: string; row: Row }>>();
    await Promise.all([...targets].map(async ([shard, client]) => {
      const rows = (await client.query<Row>(pageSql(t, last, 0, upTo))).rows.filter(keepTarget);
      for (const row of rows) {
        const k = keyText(t, row);
        found.set(k, [...(found.get(k) ?? []), { shard, row }]);
      }
      out.targetRows += BigInt(rows.length);
    }));
    out.sourceRows += BigInt(src.length);
    for (const row of src) {
      const k = keyText(t, row);
      const copies = found.get(k) ?? [];
      found.delete(k);
      const home = shardOfRow(t, row, ranges);
      const mine = copies.find((c) => c.shard === home);
      if (!mine) {
        out.missing++;
        example(`missing on ${home}: key ${k}`);
      } else if (rowText(t, mine.row) !== rowText(t, row)) {
        out.different++;
        example(`different on ${home}: key ${k}: source ${rowText(t, row)}, target ${rowText(t, mine.row)}`);
      }
      for (const c of copies) {
        if (c === mine) continue;
        out.extra++;
        example(`extra on ${c.shard} (its vindex names ${home}): key ${k}`);
      }
    }
    for (const [k, copies] of found) {
      for (const c of copies) {
        out.extra++;
        example(`extra on ${c.shard}: key ${k}`);
      }
    }
    onPage(src.length);
    if (!upTo) return;
    last = upTo;
  }
}
