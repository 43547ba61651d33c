/**
 * What the materializer knows of a moved table (columns, key, the vindex that
 * places its rows) and the SQL it runs on it: keyset-paged reads (as SELECT, or
 * as COPY for the copy phase), COPY into a table, and bulk upserts and deletes
 * through unnest() so one statement carries a whole batch whatever its size.
 * Values travel as Postgres text and are cast to each column's type on the server.
 */
import { escapeLiteral } from 'pg';
import type pg from 'pg';
import { FUNCTIONAL_VINDEXES, keyspaceId, shardFor, type FunctionalVindex, type KeyRange, type VSchema } from '../schemas/index.ts';
import type { Row } from './changes.ts';

export interface Column { name: string; type: string; notNull: boolean }

export interface MovedTable {
  schema: string;
  table: string;
  /** "schema"."table", quoted. */
  sql: string;
  columns: Column[];
  /** Primary-key column names, in key order. */
  key: string[];
  /** The target's primary vindex: which target shard holds a row. */
  vindex: Vindex;
  /** A sharded source's primary vindex for the table: which source shard holds a row (its keyspace-id filter). */
  sourceVindex?: Vindex;
}

export interface Vindex { column: string; type: FunctionalVindex }

export class WorkflowError extends Error {}

export const quoteIdent = (s: string) => `"${s.replace(/"/g, '""')}"`;

/** `schema.table` (public when unqualified). */
export function splitName(name: string): { schema: string; table: string } {
  const dot = name.indexOf('.');
  return dot < 0 ? { schema: 'public', table: name } : { schema: name.slice(0, dot), table: name.slice(dot + 1) };
}

/**
 * Reads a table's columns and primary key from the source, its primary vindex
 * from the target's VSchema, and (for a sharded source) from the source's.
 */
export async function describeTable(
  source: pg.Client, name: string, target: { database: string; vschema: VSchema | undefined }, shardedSource?: { database: string; vschema: VSchema | undefined },
): Promise<MovedTable> {
  const t = keyed(await describeColumns(source, name));
  return { ...t, vindex: vindexOf(t, target), ...(shardedSource ? { sourceVindex: vindexOf(t, shardedSource) } : {}) };
}

/** `t`, refused when it has no primary key: the materializer copies and applies by key. */
export function keyed<T extends { schema: string; table: string; key: string[] }>(t: T): T {
  if (t.key.length === 0) throw new WorkflowError(`table ${t.schema}.${t.table} has no primary key (the materializer copies and applies by key)`);
  return t;
}

/** A table's primary vindex in one side's VSchema, which must name one of its columns. */
export function vindexOf(t: Pick<MovedTable, 'table' | 'columns'>, side: { database: string; vschema: VSchema | undefined }): Vindex {
  const v = primaryVindex(side.vschema, t.table);
  if (!v) throw new WorkflowError(`table ${t.table} needs a primary vindex of type ${FUNCTIONAL_VINDEXES.join(', ')} in the VSchema of ${side.database} (mg vschema apply)`);
  if (!t.columns.some((c) => c.name === v.column)) throw new WorkflowError(`table ${t.table} has no column ${v.column} (its vindex column in ${side.database})`);
  return v;
}

/**
 * A table's columns and primary key (empty when it has none), read from a shard's catalog.
 * NOT NULL is read as text: the materializer's clients take every value as text, and a bool's 'f' is truthy.
 */
export async function describeColumns(source: pg.Client, name: string): Promise<Omit<MovedTable, 'vindex'>> {
  const { schema, table } = splitName(name);
  const { rows } = await source.query<{ name: string; type: string; not_null: string; key_pos: string | null }>(`
    SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull::text AS not_null,
           array_position(i.indkey::int2[], a.attnum) AS key_pos
      FROM pg_attribute a
      JOIN pg_class c ON c.oid = a.attrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
      LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
     WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
     ORDER BY a.attnum`, [schema, table]);
  if (rows.length === 0) throw new WorkflowError(`table ${schema}.${table} does not exist on the source`);
  const key = rows.filter((r) => r.key_pos !== null).sort((a, b) => Number(a.key_pos) - Number(b.key_pos)).map((r) => r.name);
  return {
    schema, table, sql: `${quoteIdent(schema)}.${quoteIdent(table)}`,
    columns: rows.map((r) => ({ name: r.name, type: r.type, notNull: r.not_null === 'true' })), key,
  };
}

/** A sharded table's primary vindex in a VSchema, when it is functional (hash, xxhash, identity); undefined otherwise. */
export function primaryVindex(vschema: VSchema | undefined, table: string): Vindex | undefined {
  const spec = vschema?.tables[table];
  const cv = spec && spec.type !== 'reference' ? spec.column_vindexes[0] : undefined;
  const type = cv && vschema!.vindexes[cv.name]?.type;
  return cv && (FUNCTIONAL_VINDEXES as readonly string[]).includes(type!) ? { column: cv.column, type: type as FunctionalVindex } : undefined;
}

/** The target shard of a row (by its vindex column's text), or with `vindex` the shard of another database that holds it. */
export function shardOfRow(t: MovedTable, row: Row, ranges: readonly KeyRange[], vindex: Vindex = t.vindex): string {
  const v = row[vindex.column];
  if (v === null || v === undefined) throw new WorkflowError(`a row of ${t.table} has no value in its vindex column ${vindex.column}`);
  return shardFor(keyspaceId(vindex.type, v), ranges);
}

/** Whether the vindex column is part of the key: then a row never changes shard without a key change (a delete and an insert). */
export const vindexInKey = (t: MovedTable) => t.key.includes(t.vindex.column);

/** CREATE TABLE for a target shard: columns, types, NOT NULL and the primary key (other indexes and constraints are not copied). */
export function createTableSql(t: MovedTable): string {
  const cols = t.columns.map((c) => `${quoteIdent(c.name)} ${c.type}${c.notNull ? ' NOT NULL' : ''}`);
  return `CREATE SCHEMA IF NOT EXISTS ${quoteIdent(t.schema)}; CREATE TABLE IF NOT EXISTS ${t.sql} (${cols.join(', ')}, PRIMARY KEY (${t.key.map(quoteIdent).join(', ')}))`;
}

const keyList = (t: MovedTable) => t.key.map(quoteIdent).join(', ');

/** One keyset page: rows after `after` (key values, or none for the first page) in key order. */
export function pageSql(t: MovedTable, after: string[] | null, limit: number, upTo: string[] | null = null): { text: string; values: unknown[] } {
  const values: unknown[] = [];
  const text = keysetSelect(t, t.columns.map((c) => c.name), after, limit, upTo, (v) => `$${values.push(v)}`);
  return { text, values };
}

/**
 * One keyset page as `COPY ... TO STDOUT` (text format) of the named columns, in that order. COPY takes no
 * parameters, so the key values are inlined as quoted literals, cast to the key columns' types.
 */
export function copyOutSql(t: MovedTable, columns: string[], after: string[] | null, limit: number): string {
  return `COPY (${keysetSelect(t, columns, after, limit, null, escapeLiteral)}) TO STDOUT`;
}

/** `COPY ... FROM STDIN` (text format) into the table's columns, in its column order. */
export const copyInSql = (t: MovedTable) => `COPY ${t.sql} (${t.columns.map((c) => quoteIdent(c.name)).join(', ')}) FROM STDIN`;

function keysetSelect(t: MovedTable, columns: string[], after: string[] | null, limit: number, upTo: string[] | null, value: (v: string) => string): string {
  const cond: string[] = [];
  const tuple = (vals: string[]) => `(${t.key.map((k, i) => `${value(vals[i])}::${typeOf(t, k)}`).join(', ')})`;
  if (after) cond.push(`(${keyList(t)}) > ${tuple(after)}`);
  if (upTo) cond.push(`(${keyList(t)}) <= ${tuple(upTo)}`);
  const cols = columns.map(quoteIdent).join(', ');
  return `SELECT ${cols} FROM ${t.sql}${cond.length ? ` WHERE ${cond.join(' AND ')}` : ''} ORDER BY ${keyList(t)}${limit > 0 ? ` LIMIT ${limit}` : ''}`;
}

const typeOf = (t: MovedTable, column: string) => t.columns.find((c) => c.name === column)!.type;

/** INSERT ... ON CONFLICT (key) DO UPDATE of whole rows, one text[] parameter per column. */
export function upsertSql(t: MovedTable, rows: Row[]): { text: string; values: unknown[] } {
  // The table's columns the rows carry (all rows carry the same ones): one a row lacks is neither written nor nulled.
  const columns = t.columns.filter((c) => c.name in rows[0]);
  const values = columns.map((c) => rows.map((r) => r[c.name] ?? null));
  const cols = columns.map((c) => quoteIdent(c.name)).join(', ');
  const unnest = columns.map((c, i) => `$${i + 1}::text[]`).join(', ');
  const casts = columns.map((c, i) => `c${i}::${c.type}`).join(', ');
  const aliases = columns.map((_, i) => `c${i}`).join(', ');
  const others = columns.filter((c) => !t.key.includes(c.name));
  const action = others.length
    ? `DO UPDATE SET ${others.map((c) => `${quoteIdent(c.name)} = EXCLUDED.${quoteIdent(c.name)}`).join(', ')}`
    : 'DO NOTHING';
  return {
    text: `INSERT INTO ${t.sql} (${cols}) SELECT ${casts} FROM unnest(${unnest}) AS u(${aliases}) ON CONFLICT (${keyList(t)}) ${action}`,
    values,
  };
}

/** DELETE of the rows with these keys. */
export function deleteSql(t: MovedTable, keys: Row[]): { text: string; values: unknown[] } {
  const values = t.key.map((k) => keys.map((r) => r[k]));
  const unnest = t.key.map((_, i) => `$${i + 1}::text[]`).join(', ');
  const match = t.key.map((k, i) => `${t.sql}.${quoteIdent(k)} = d.k${i}::${typeOf(t, k)}`).join(' AND ');
  return { text: `DELETE FROM ${t.sql} USING unnest(${unnest}) AS d(${t.key.map((_, i) => `k${i}`).join(', ')}) WHERE ${match}`, values };
}

/** The text that identifies a row's key (for maps). */
export const keyText = (t: MovedTable, row: Row) => JSON.stringify(t.key.map((k) => row[k]));

/** The whole row as one comparable text. */
export const rowText = (t: MovedTable, row: Row) => JSON.stringify(t.columns.map((c) => row[c.name]));

/** Sessions on both sides read and write values as text in one fixed format, so values round-trip exactly. */
export const TEXT_SETTINGS = "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; SET bytea_output = 'hex'";
