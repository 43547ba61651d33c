/**
 * The SELECT that defines a Materialize's target table (decision 0058),
 * parsed with libpg-query: one source table; a projection of its columns
 * (`*`, or columns with optional aliases) or count(*)/sum(column) grouped by
 * columns; a WHERE on the row's own columns. Everything else is refused with
 * a message naming it. The WHERE is kept as the statement's own text (the
 * FROM item to the end of the WHERE), so Postgres evaluates it with its own
 * semantics, over the source table in the copy and over the changed rows in
 * catch-up (see materialize.ts).
 */
import { loadModule, parseSync } from 'libpg-query';
import { INTERNAL_SCHEMAS } from '../schemas/index.ts';

export const queryParserReady: Promise<void> = loadModule();

/** One column of the target table: a source column as is, the group's row count, or the sum of a source column. */
export type OutputColumn =
  | { name: string; kind: 'column'; source: string }
  | { name: string; kind: 'count' }
  | { name: string; kind: 'sum'; source: string };

export interface MaterializeQuery {
  source: { schema: string; table: string };
  /** `*` expands to every source column (the caller knows them); otherwise the columns in order. */
  star: boolean;
  columns: OutputColumn[];
  /** Source columns of GROUP BY; null: a projection (one target row per source row). */
  groupBy: string[] | null;
  /** Names of the functions the WHERE calls (the caller checks they are immutable on the source). */
  functions: string[];
  /**
   * The text from just after the table's name to the end of the WHERE (alias and WHERE included; empty when
   * neither): `FROM <relation><filter>` reads the source table, or any row set put in its place, filtered.
   */
  filter: string;
  /** Whether there is a WHERE (else every row is in). */
  where: boolean;
  /** The name the WHERE may qualify columns with: the alias, else the table's name (added when there is no alias). */
  alias: string;
  hasAlias: boolean;
}

export class QueryError extends Error {}

const refuse = (what: string): never => {
  throw new QueryError(`Materialize does not support ${what}`);
};

const SELECT_CLAUSES: Record<string, string> = {
  distinctClause: 'DISTINCT', havingClause: 'HAVING', sortClause: 'ORDER BY', limitCount: 'LIMIT', limitOffset: 'OFFSET',
  windowClause: 'WINDOW', withClause: 'WITH', lockingClause: 'FOR UPDATE/SHARE', valuesLists: 'VALUES', intoClause: 'INTO',
};

/** Functions whose value is not a function of the row: refused by name whatever the source's catalog says. */
const VOLATILE_FORMS = new Set(['SQLValueFunction', 'SubLink', 'ParamRef', 'GroupingFunc', 'CurrentOfExpr']);

export function parseMaterializeQuery(sql: string): MaterializeQuery {
  let parsed: any;
  try {
    parsed = parseSync(sql);
  } catch (err) {
    throw new QueryError(`the query does not parse: ${(err as Error).message}`);
  }
  if (parsed.stmts?.length !== 1) throw new QueryError('the query must be one SELECT statement');
  const s = parsed.stmts[0].stmt.SelectStmt;
  if (!s) throw new QueryError('the query must be a SELECT');
  if (s.op && s.op !== 'SETOP_NONE') refuse('UNION, INTERSECT or EXCEPT');
  for (const [clause, what] of Object.entries(SELECT_CLAUSES)) if (s[clause]) refuse(what);
  const from = s.fromClause ?? [];
  if (from.length !== 1) refuse(from.length ? 'more than one table in FROM (joins)' : 'a SELECT without FROM');
  const rv = from[0].RangeVar;
  if (!rv) refuse(from[0].JoinExpr ? 'joins' : from[0].RangeSubselect ? 'subqueries in FROM' : from[0].RangeFunction ? 'functions in FROM' : 'this FROM item');
  const source = { schema: rv.schemaname ?? 'public', table: rv.relname as string };
  if (rv.catalogname) refuse('a database-qualified table name');
  if (INTERNAL_SCHEMAS.has(source.schema) || source.schema.startsWith('pg_') || source.schema === 'information_schema') {
    throw new QueryError(`table ${source.schema}.${source.table}: schema ${source.schema} is internal and never materialized`);
  }
  const alias: string = rv.alias?.aliasname ?? source.table;
  const qualifiers = new Set([alias, ...(rv.alias ? [] : [source.table])]);
  /** A plain column reference of the source table: its name. */
  const columnOf = (node: any, where: string): string => {
    const fields = node?.ColumnRef?.fields;
    if (!fields) refuse(`${where} other than a column of ${source.table}`);
    const names = fields.map((f: any) => f.String?.sval ?? (f.A_Star ? '*' : undefined));
    if (names.length > 2 || (names.length === 2 && !qualifiers.has(names[0]))) refuse(`the column reference ${names.join('.')} (one table: qualify with ${alias} or not at all)`);
    return names[names.length - 1];
  };

  const functions = new Set<string>();
  if (s.whereClause) walkWhere(s.whereClause, functions, columnOf);

  let star = false;
  const columns: OutputColumn[] = [];
  let aggregated = false;
  for (const item of s.targetList ?? []) {
    const rt = item.ResTarget;
    const val = rt.val;
    const fc = val.FuncCall;
    if (fc) {
      const name = fc.funcname.map((n: any) => n.String.sval).join('.');
      if (fc.over) refuse(`window functions (${name})`);
      if (name !== 'count' && name !== 'sum' && name !== 'pg_catalog.count' && name !== 'pg_catalog.sum') refuse(`${name}() in the select list (only columns, count(*) and sum(column))`);
      if (fc.agg_distinct || fc.agg_filter || fc.agg_order || fc.agg_within_group) refuse(`DISTINCT, FILTER, ORDER BY or WITHIN GROUP in ${name}()`);
      aggregated = true;
      const bare = name.replace(/^pg_catalog\./, '');
      if (bare === 'count') {
        if (!fc.agg_star) refuse('count(expression): use count(*)');
        columns.push({ name: rt.name ?? 'count', kind: 'count' });
      } else {
        if (fc.args?.length !== 1) refuse('sum() with other than one argument');
        columns.push({ name: rt.name ?? 'sum', kind: 'sum', source: columnOf(fc.args[0], 'sum() of anything') });
      }
      continue;
    }
    const column = columnOf(val, 'an expression in the select list');
    if (column === '*') {
      star = true;
      continue;
    }
    columns.push({ name: rt.name ?? column, kind: 'column', source: column });
  }
  if (star && columns.length) refuse('* together with other columns');
  const groupBy = s.groupClause ? (s.groupClause as any[]).map((g) => columnOf(g, 'a GROUP BY item')) : null;
  if (groupBy || aggregated) {
    if (star) refuse('* in an aggregate query');
    const grouped = groupBy ?? [];
    if (grouped.length === 0) refuse('aggregates without GROUP BY (the target key is the GROUP BY columns)');
    for (const c of columns) if (c.kind === 'column' && !grouped.includes(c.source)) throw new QueryError(`column ${c.source} must appear in GROUP BY or be inside count(*)/sum()`);
    for (const g of grouped) if (!columns.some((c) => c.kind === 'column' && c.source === g)) throw new QueryError(`GROUP BY column ${g} must be in the select list: the group columns are the target table's key`);
    if (!columns.some((c) => c.kind === 'count')) throw new QueryError('an aggregate Materialize needs count(*) in its select list: it tells when a group has no rows left (and is deleted)');
  }
  const names = columns.map((c) => c.name);
  const twice = names.find((n, i) => names.indexOf(n) !== i);
  if (twice) throw new QueryError(`the select list names ${twice} twice: give each target column its own name (AS ...)`);
  return { source, star, columns, groupBy, functions: [...functions], where: Boolean(s.whereClause), ...filterText(sql, rv.location, s.groupClause?.[0]), alias, hasAlias: Boolean(rv.alias) };
}

/** Walks the WHERE: no subqueries, parameters or aggregates; columns are the table's own; function names collected. */
function walkWhere(node: any, functions: Set<string>, columnOf: (n: any, where: string) => string): void {
  if (Array.isArray(node)) {
    for (const n of node) walkWhere(n, functions, columnOf);
    return;
  }
  if (!node || typeof node !== 'object') return;
  for (const [kind, body] of Object.entries<any>(node)) {
    if (VOLATILE_FORMS.has(kind)) {
      refuse(kind === 'SubLink' ? 'subqueries' : kind === 'ParamRef' ? 'parameters ($n)' : kind === 'SQLValueFunction' ? `non-deterministic functions (${(body.op ?? '').replace(/^SVFOP_/, '')})` : kind);
    }
    if (kind === 'ColumnRef') {
      columnOf(node, 'a column reference in WHERE');
      continue;
    }
    if (kind === 'FuncCall') {
      const name = body.funcname.map((n: any) => n.String.sval).join('.');
      if (body.over) refuse(`window functions (${name})`);
      functions.add(name);
    }
    if (body && typeof body === 'object') walkWhere(body, functions, columnOf);
  }
}

const NAME = /^\s*(?:"(?:[^"]|"")*"|[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*)(?:\s*\.\s*(?:"(?:[^"]|"")*"|[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*))*/;

/** The statement's text after the table's name up to GROUP BY (or its end). libpg-query's locations are UTF-8 byte offsets. */
function filterText(sql: string, tableAt: number, firstGroup: any): { filter: string } {
  const text = Buffer.from(sql.replace(/[\s;]+$/, ''), 'utf8');
  const name = NAME.exec(text.subarray(tableAt).toString('utf8'));
  if (!name) throw new QueryError('could not find the table name in the query');
  const start = tableAt + Buffer.byteLength(name[0], 'utf8');
  let end = text.length;
  if (firstGroup) {
    const at = Object.values<any>(firstGroup)[0].location as number;
    const before = text.subarray(start, at).toString('utf8');
    const m = /\bgroup\s+by\s*$/i.exec(before);
    if (!m) throw new QueryError('could not find GROUP BY in the query text');
    end = start + Buffer.byteLength(before.slice(0, m.index), 'utf8');
  }
  return { filter: text.subarray(start, end).toString('utf8').trimEnd() };
}
