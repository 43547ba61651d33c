/**
 * Materialize (decision 0058): a target table defined by a SELECT over one
 * source table (query.ts), filled from a snapshot per source shard and kept
 * up to date from the source's change stream by the MoveTables machinery.
 * The query's WHERE is evaluated by Postgres itself: over the source table in
 * the copy, and in catch-up over each batch's changed rows, put in the
 * table's place as a row set of the source's column types (one query per
 * batch). A projection maps each source row to one target row (keyed by the
 * source's primary key); an aggregate adds each row's signed contribution to
 * its group (count(*), sum(column)), in the same target transaction as the
 * stream position, so a replay never counts twice.
 */
import type pg from 'pg';
import type { KeyRange, VDiffTable, VSchema } from '../schemas/index.ts';
import type { ChangeShape, Op } from './apply.ts';
import type { Change, Row } from './changes.ts';
import { parseMaterializeQuery, QueryError, queryParserReady, type MaterializeQuery, type OutputColumn } from './query.ts';
import { deleteSql, describeColumns, keyText, pageSql, quoteIdent, rowText, shardOfRow, splitName, vindexOf, WorkflowError, type Column, type MovedTable } from './tables.ts';

type Side = { database: string; vschema: VSchema | undefined };
type Delta = Extract<Op, { kind: 'delta' }>;

export interface Materialization {
  query: MaterializeQuery;
  /** The source table (with a sharded source's vindex as sourceVindex: its keyspace-id filter). */
  source: Omit<MovedTable, 'vindex'>;
  /** The target table: the query's columns with Postgres's types for them, its key, its vindex in the target's VSchema. */
  target: MovedTable;
  /** The select list, `*` expanded. */
  columns: OutputColumn[];
  aggregate: boolean;
}

/** A copy snapshot of a source shard: which changes it holds (those committed before it). */
export interface SnapshotPoint { xmax: bigint; inProgress: Set<bigint>; lsn: bigint }

const HIDDEN_VINDEX = '_mg_source_vindex';
const low32 = (x: bigint | string) => BigInt(x) & 0xffffffffn;

/**
 * Parses and checks the query against the source (columns, key, immutable functions, replica identity for
 * aggregates) and derives the target table. Every refusal names what is wrong (a WorkflowError).
 */
export async function describeMaterialization(source: pg.Client, sql: string, targetTable: string, target: Side, shardedSource?: Side): Promise<Materialization> {
  let query: MaterializeQuery;
  await queryParserReady;
  try {
    query = parseMaterializeQuery(sql);
  } catch (err) {
    if (err instanceof QueryError) throw new WorkflowError(err.message);
    throw err;
  }
  const src = await describeColumns(source, `${query.source.schema}.${query.source.table}`);
  const sourceName = `${src.schema}.${src.table}`;
  if (src.key.length === 0) throw new WorkflowError(`table ${sourceName} has no primary key (Materialize follows its rows by key)`);
  const columns: OutputColumn[] = query.star ? src.columns.map((c) => ({ name: c.name, kind: 'column', source: c.name })) : query.columns;
  for (const name of [...columns.flatMap((c) => (c.kind === 'count' ? [] : [c.source])), ...(query.groupBy ?? [])]) {
    if (!src.columns.some((c) => c.name === name)) throw new WorkflowError(`table ${sourceName} has no column ${name}`);
  }
  if (query.functions.length) {
    const { rows } = await source.query<{ name: string }>(
      "SELECT proname AS name FROM pg_proc WHERE proname = ANY($1::text[]) GROUP BY proname HAVING bool_and(provolatile = 'i')",
      [query.functions.map((f) => f.split('.').pop())]);
    const bad = query.functions.filter((f) => !rows.some((r) => r.name === f.split('.').pop()));
    if (bad.length) throw new WorkflowError(`Materialize does not support non-deterministic functions (${bad.join(', ')}): the WHERE must give the same answer for a row whenever it is evaluated (immutable functions only)`);
  }
  const aggregate = query.groupBy !== null;
  const outputOf = (sourceColumn: string) => columns.find((c) => c.kind === 'column' && c.source === sourceColumn)?.name;
  let key: string[];
  if (aggregate) {
    key = query.groupBy!.map((g) => outputOf(g)!);
    for (const c of columns) {
      if (c.kind === 'sum' && !src.columns.find((x) => x.name === c.source)!.notNull) {
        throw new WorkflowError(`sum(${c.source}): column ${c.source} of ${sourceName} may be NULL; Materialize sums NOT NULL columns only (sum ignores NULLs, which a running total cannot tell apart)`);
      }
    }
    const { rows: [ident] } = await source.query<{ r: string }>('SELECT relreplident AS r FROM pg_class WHERE oid = $1::regclass', [src.sql]);
    if (ident.r !== 'f') {
      throw new WorkflowError(`an aggregate Materialize needs the old row of every update and delete: run ALTER TABLE ${sourceName} REPLICA IDENTITY FULL on the source first`);
    }
  } else {
    const missing = src.key.filter((k) => !outputOf(k));
    if (missing.length) throw new WorkflowError(`the select list must include the primary key of ${sourceName} (${missing.join(', ')}): it is the target table's key`);
    key = src.key.map((k) => outputOf(k)!);
  }
  const m = { query, source: src, columns, aggregate } as Materialization;
  const described = await source.query(`${selectSql(m)} LIMIT 0`).catch((err: Error) => {
    throw new WorkflowError(`the query fails on the source: ${err.message}`);
  });
  const { rows: types } = await source.query<{ type: string }>(
    'SELECT format_type(t, NULLIF(m, -1)) AS type FROM unnest($1::oid[], $2::int[]) WITH ORDINALITY AS u(t, m, o) ORDER BY o',
    [described.fields.map((f) => f.dataTypeID), described.fields.map((f) => f.dataTypeModifier)]);
  const { schema, table } = splitName(targetTable);
  const targetColumns: Column[] = columns.map((c, i) => ({ name: c.name, type: types[i].type, notNull: key.includes(c.name) || c.kind === 'count' }));
  const t = { schema, table, sql: `${quoteIdent(schema)}.${quoteIdent(table)}`, columns: targetColumns, key };
  const vindex = vindexOf(t, target);
  if (aggregate && !key.includes(vindex.column)) {
    throw new WorkflowError(`the vindex column ${vindex.column} of ${table} in the VSchema of ${target.database} must be a GROUP BY column: a group lives on one shard`);
  }
  m.target = { ...t, vindex };
  if (shardedSource) m.source = { ...src, sourceVindex: vindexOf(src, shardedSource) };
  return m;
}

/** The query as it runs on the source table (optionally with the source vindex column, hidden, for the keyspace-id filter). */
function selectSql(m: Materialization, withSourceVindex = false): string {
  const list = m.columns.map((c) => {
    if (c.kind === 'column') return `${quoteIdent(c.source)} AS ${quoteIdent(c.name)}`;
    return c.kind === 'count' ? `count(*) AS ${quoteIdent(c.name)}` : `sum(${quoteIdent(c.source)}) AS ${quoteIdent(c.name)}`;
  });
  if (withSourceVindex && m.source.sourceVindex) list.push(`${quoteIdent(m.source.sourceVindex.column)} AS ${HIDDEN_VINDEX}`);
  const group = m.query.groupBy ? ` GROUP BY ${m.query.groupBy.map(quoteIdent).join(', ')}` : '';
  return `SELECT ${list.join(', ')} FROM ${m.source.sql}${m.query.filter}${group}`;
}

/**
 * A projection's rows as a relation pageSql pages by the target key (the copy and VDiff read it on the
 * source): the target's columns, plus a sharded source's vindex column (hidden) for the keyspace-id filter.
 */
export function projectionRelation(m: Materialization): MovedTable {
  const v = m.source.sourceVindex;
  const vindexType = v && m.source.columns.find((c) => c.name === v.column)!.type;
  return {
    ...m.target, sql: `(${selectSql(m, true)}) AS _mg_query`,
    columns: [...m.target.columns, ...(v ? [{ name: HIDDEN_VINDEX, type: vindexType!, notNull: false }] : [])],
    ...(v ? { sourceVindex: { column: HIDDEN_VINDEX, type: v.type } } : {}),
  };
}

/** An aggregate's grouped rows on a source shard (what its copy adds to the target). */
export const groupedSql = (m: Materialization) => selectSql(m);

/** Where a source shard's copy was taken, and whether a change is in it: committed before the snapshot (the test VDiff makes too). */
export function inSnapshot(p: SnapshotPoint, change: Change): boolean {
  if (change.commitLsn >= p.lsn) return false;
  return change.txId === null || (low32(change.txId) < low32(p.xmax) && !p.inProgress.has(low32(change.txId)));
}

export function snapshotPoint(snapshot: string, lsn: bigint): SnapshotPoint {
  const [, xmax, xip] = snapshot.split(':');
  return { xmax: BigInt(xmax), inProgress: new Set((xip ? xip.split(',') : []).map(low32)), lsn };
}

/** The positions-table topic that marks a source shard's aggregate copy on a target shard (decision 0058). */
export const copyMarkerTopic = (sourceShard: string) => `copy/${sourceShard}`;

/** The contributions summed per group, as the target table's columns (the SELECT both applyDeltas and VDiff run). */
function summedSql(t: MovedTable, columns: OutputColumn[], deltas: Delta[]): { text: string; values: unknown[] } {
  const values: unknown[] = t.columns.map((c) => deltas.map((d) => d.row[c.name] ?? null));
  values.push(deltas.map((d) => d.sign));
  const parts = t.columns.map((c, i) => {
    const kind = columns[i].kind;
    const value = kind === 'column' ? `c${i}::${c.type}` : `sum(s * c${i}::${kind === 'count' ? 'bigint' : c.type})::${c.type}`;
    return `${value} AS ${quoteIdent(c.name)}`;
  });
  const groups = t.columns.flatMap((c, i) => (t.key.includes(c.name) ? [String(i + 1)] : []));
  return {
    text: `SELECT ${parts.join(', ')} FROM unnest(${t.columns.map((_, i) => `$${i + 1}::text[]`).join(', ')}, $${values.length}::int[]) AS u(${t.columns.map((_, i) => `c${i}`).join(', ')}, s)
      GROUP BY ${groups.join(', ')}`,
    values,
  };
}

/**
 * Adds signed contributions to their groups: one INSERT ... ON CONFLICT DO UPDATE adding to count and sums
 * (the batch summed per group first), then the groups whose count reached 0 are deleted.
 */
export async function applyDeltas(client: pg.Client, t: MovedTable, columns: OutputColumn[], deltas: Delta[]): Promise<void> {
  const summed = summedSql(t, columns, deltas);
  const adds = t.columns.filter((c) => !t.key.includes(c.name)).map((c) => `${quoteIdent(c.name)} = ${t.sql}.${quoteIdent(c.name)} + EXCLUDED.${quoteIdent(c.name)}`);
  await client.query({
    text: `INSERT INTO ${t.sql} (${t.columns.map((c) => quoteIdent(c.name)).join(', ')})
      ${summed.text} ON CONFLICT (${t.key.map(quoteIdent).join(', ')}) DO UPDATE SET ${adds.join(', ')}`,
    values: summed.values,
  });
  const count = columns.find((c) => c.kind === 'count')!.name;
  const empty = deleteSql(t, deltas.map((d) => d.row));
  await client.query({ text: `${empty.text} AND ${t.sql}.${quoteIdent(count)} = 0`, values: empty.values });
}

/**
 * VDiff of an aggregate: each source shard's groups read from its snapshot, merged per group (counts and sums
 * added, by Postgres on the first source session), against the target shards' rows; a group is missing,
 * extra (also: on a shard its vindex does not name) or different. The grouped results are held in memory.
 */
export async function diffGroups(m: Materialization, sources: pg.Client[], targets: Map<string, pg.Client>, ranges: KeyRange[]): Promise<VDiffTable> {
  const t = m.target;
  const out: VDiffTable = { table: `${t.schema}.${t.table}`, sourceRows: 0n, targetRows: 0n, missing: 0n, extra: 0n, different: 0n, examples: [] };
  const example = (text: string) => void (out.examples.length < 5 && out.examples.push(text));
  const partial: Delta[] = [];
  for (const source of sources) for (const row of (await source.query<Row>(groupedSql(m))).rows) partial.push({ kind: 'delta', row, sign: 1 });
  const merged = partial.length ? (await sources[0].query<Row>(summedSql(t, m.columns, partial))).rows : [];
  const want = new Map(merged.map((row) => [keyText(t, row), row]));
  out.sourceRows = BigInt(want.size);
  for (const [shard, client] of targets) {
    for (const row of (await client.query<Row>(pageSql(t, null, 0))).rows) {
      out.targetRows++;
      const k = keyText(t, row);
      const home = shardOfRow(t, row, ranges);
      const source = want.get(k);
      if (shard !== home || !source) {
        out.extra++;
        example(`extra on ${shard}${source ? ` (its vindex names ${home})` : ''}: key ${k}`);
      } else {
        want.delete(k);
        if (rowText(t, row) !== rowText(t, source)) {
          out.different++;
          example(`different on ${home}: key ${k}: source ${rowText(t, source)}, target ${rowText(t, row)}`);
        }
      }
    }
  }
  for (const [k, row] of want) {
    out.missing++;
    example(`missing on ${shardOfRow(t, row, ranges)}: key ${k}`);
  }
  return out;
}

/**
 * The catch-up side of a Materialize: a batch's changes become target ops,
 * the WHERE evaluated by Postgres (on `evaluator`, a source session) over
 * the batch's rows in one query.
 */
export class MaterializeShape implements ChangeShape {
  /** Per target shard, per source shard: where an aggregate's copy was taken there (changes it holds are not added again). */
  private copied = new Map<string, Map<string, SnapshotPoint>>();

  constructor(readonly m: Materialization, private readonly evaluator: pg.Client) {}

  /** Reads the aggregate copy's markers on the target shards. */
  async loadCopied(workflow: string, targets: Map<string, pg.Client>): Promise<void> {
    if (!this.m.aggregate) return;
    for (const [shard, client] of targets) {
      const { rows } = await client.query<{ topic: string; applied: string }>(
        "SELECT topic, applied::text FROM mg_materializer.positions WHERE workflow = $1 AND topic LIKE 'copy/%'", [workflow]);
      this.copied.set(shard, new Map(rows.map((r) => {
        const a = JSON.parse(r.applied) as { snapshot: string; lsn: string };
        return [r.topic.slice('copy/'.length), snapshotPoint(a.snapshot, BigInt(a.lsn))];
      })));
    }
  }

  appliesOn(shard: string, change: Change): boolean {
    const point = this.copied.get(shard)?.get(change.sourceShard);
    return !point || !inSnapshot(point, change);
  }

  applyDeltas(client: pg.Client, deltas: Delta[]): Promise<void> {
    return applyDeltas(client, this.m.target, this.m.columns, deltas);
  }

  async opsOf(changes: Change[]): Promise<Array<Array<Op | 'truncate'>>> {
    const aggregate = this.m.aggregate;
    const rows: Row[] = [];
    const at = changes.map((c) => {
      if (c.op === 't') {
        if (aggregate) throw new WorkflowError(`${this.m.source.table}: a TRUNCATE on the source (or a re-snapshot of its change stream after a failover) cannot be subtracted from an aggregate Materialize: cancel it, empty the target table and create it again`);
        return {};
      }
      if (aggregate && c.op !== 'c' && c.op !== 'r' && c.before === null) {
        throw new WorkflowError(`${this.m.source.table}: an ${c.op === 'u' ? 'update' : 'delete'} without the old row: an aggregate Materialize needs REPLICA IDENTITY FULL on the source table`);
      }
      const before = aggregate && c.before && c.op !== 'c' && c.op !== 'r' ? rows.push(c.before) - 1 : undefined;
      const after = c.after ? rows.push(c.after) - 1 : undefined;
      return { before, after };
    });
    const passing = await this.passing(rows);
    // A target row, or an aggregate's contribution (the row counts 1, and its summed columns' values).
    const project = (row: Row) => Object.fromEntries(this.m.columns.map((c) => [c.name, c.kind === 'count' ? '1' : row[c.source]]));
    return changes.map((c, i): Array<Op | 'truncate'> => {
      const { before, after } = at[i];
      if (c.op === 't') return ['truncate'];
      if (aggregate) {
        const ops: Op[] = [];
        if (before !== undefined && passing.has(before)) ops.push({ kind: 'delta', row: project(rows[before]), sign: -1 });
        if (after !== undefined && passing.has(after)) ops.push({ kind: 'delta', row: project(rows[after]), sign: 1 });
        return ops;
      }
      // A row the WHERE leaves out (an update moved it out, or it never was in) is deleted by key: a no-op when absent.
      if (after !== undefined && passing.has(after)) return [{ kind: 'upsert', row: project(rows[after]) }];
      return [{ kind: 'delete', key: project(after !== undefined ? rows[after] : c.before!) }];
    });
  }

  /** The indexes of the rows the WHERE keeps: the rows put in the source table's place, as its column types. */
  private async passing(rows: Row[]): Promise<Set<number>> {
    if (!this.m.query.where || rows.length === 0) return new Set(rows.map((_, i) => i));
    const cols = this.m.source.columns;
    const q = this.m.query;
    const values: unknown[] = [rows.map((_, i) => i), ...cols.map((c) => rows.map((r) => r[c.name] ?? null))];
    const rowset = `(SELECT u._mg_ord, ${cols.map((c, i) => `u.c${i}::${c.type} AS ${quoteIdent(c.name)}`).join(', ')}
      FROM unnest($1::int[], ${cols.map((_, i) => `$${i + 2}::text[]`).join(', ')}) AS u(_mg_ord, ${cols.map((_, i) => `c${i}`).join(', ')}))`;
    const { rows: kept } = await this.evaluator.query<{ _mg_ord: string }>({
      text: `SELECT _mg_ord FROM ${rowset}${q.hasAlias ? '' : ` AS ${quoteIdent(q.alias)}`}${q.filter}`, values,
    });
    return new Set(kept.map((r) => Number(r._mg_ord)));
  }
}
