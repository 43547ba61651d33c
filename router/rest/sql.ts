/**
 * Builds the one SQL statement of a request from its parsed tree and the
 * schema cache: every value a bind parameter, every identifier checked against
 * the cache and quoted. Postgres builds the JSON (json_agg, jsonb for embeds),
 * the way PostgREST 12 does, so bodies match it byte for byte.
 */
import type { Merge } from '../planner/plan.ts';
import { RestError } from './errors.ts';
import type { Condition, Field, NodeOptions, OrderTerm, ParsedQuery, SelectItem } from './parse.ts';
import { tableKey, type ForeignKey, type MediaAggregate, type RestFunction, type SchemaCache, type Table } from './schema-cache.ts';
import type { Probe } from './sharded.ts';

export const ident = (s: string) => `"${s.replace(/"/g, '""')}"`;
export const qualified = (t: { schema: string; name: string }) => `${ident(t.schema)}.${ident(t.name)}`;

export class Params {
  readonly values: unknown[] = [];
  add(v: unknown): string {
    this.values.push(v);
    return `$${this.values.length}`;
  }
}

const SIMPLE_OPS: Record<string, string> = {
  eq: '=', neq: '<>', gt: '>', gte: '>=', lt: '<', lte: '<=', like: 'LIKE', ilike: 'ILIKE', match: '~', imatch: '~*',
  isdistinct: 'IS DISTINCT FROM', cs: '@>', cd: '<@', ov: '&&', sl: '<<', sr: '>>', nxr: '&<', nxl: '&>', adj: '-|-',
};
const FTS_FUNCTIONS: Record<string, string> = { fts: 'to_tsquery', plfts: 'plainto_tsquery', phfts: 'phraseto_tsquery', wfts: 'websearch_to_tsquery' };
const IS_SQL: Record<string, string> = { null: 'IS NULL', not_null: 'IS NOT NULL', true: 'IS TRUE', false: 'IS FALSE', unknown: 'IS UNKNOWN' };

type Cardinality = 'one' | 'many';
/** PostgREST's words for a FK relationship in PGRST201 (`cons using parent(cols) and target(cols)`). */
function fkDescription(cardinality: string, name: string, parent: Table, columns: string[], target: Table, targetColumns: string[]): Relationship['describe'] {
  return { cardinality, hint: name, relationship: `${name} using ${parent.name}(${columns.join(', ')}) and ${target.name}(${targetColumns.join(', ')})` };
}

interface Relationship {
  target: Table;
  cardinality: Cardinality;
  /**
   * Join condition between the target (alias `t`) and the parent (alias `p`),
   * and the junction for many-to-many; `source` replaces the target table as
   * the FROM item (a computed relationship's function call).
   */
  join(t: string, p: string, j: string): { from?: string; on: string; source?: string };
  /** How PGRST201 names it: PostgREST's cardinality and relationship text, and the hint that picks it. */
  describe: { cardinality?: string; relationship?: string; hint?: string };
  /** A function of the parent's row (PostgREST's computed relationship), not a foreign key. */
  computed?: boolean;
}

/** One resource in the tree of a read: the top table (or function result) and each embedded one. */
interface Scope { table: Table; alias: string; path: string }

export interface BuiltQuery {
  sql: string;
  params: unknown[];
}

export class QueryBuilder {
  readonly params = new Params();
  private aliases = 0;

  constructor(private readonly cache: SchemaCache, private readonly query: ParsedQuery) {}

  nextAlias(prefix: string): string {
    return `pgrst_${prefix}${this.aliases++}`;
  }

  column(table: Table, name: string): string {
    if (!table.columns.has(name)) throw new RestError(400, '42703', `column ${table.name}.${name} does not exist`);
    return ident(name);
  }

  fieldSql(scope: Scope, f: Field): string {
    let sql = `${ident(scope.alias)}.${this.column(scope.table, f.column)}`;
    for (const step of f.json) {
      sql += /^-?\d+$/.test(step.key) ? `${step.arrow}${this.params.add(Number(step.key))}::int` : `${step.arrow}${this.params.add(step.key)}::text`;
    }
    return sql;
  }

  condition(scope: Scope, c: Condition): string {
    if (c.kind === 'logic') {
      const parts = c.children.map((ch) => this.condition(scope, ch));
      const sql = `(${parts.join(c.op === 'and' ? ' AND ' : ' OR ')})`;
      return c.negate ? `NOT ${sql}` : sql;
    }
    const lhs = this.fieldSql(scope, c.field);
    let sql: string;
    if (c.op === 'in') {
      const values = c.value as string[];
      sql = values.length ? `${lhs} IN (${values.map((v) => this.params.add(v)).join(', ')})` : `${lhs} = ANY('{}')`;
    } else if (c.op === 'is') sql = `${lhs} ${IS_SQL[c.value as string]}`;
    else if (c.op in FTS_FUNCTIONS) {
      const config = c.config !== undefined ? `${this.params.add(c.config)}::regconfig, ` : '';
      sql = `${lhs} @@ ${FTS_FUNCTIONS[c.op]}(${config}${this.params.add(c.value)})`;
    } else {
      const v = c.op === 'like' || c.op === 'ilike' ? (c.value as string).replace(/\*/g, '%') : c.value;
      sql = `${lhs} ${SIMPLE_OPS[c.op]} ${this.params.add(v)}`;
    }
    return c.negate ? `NOT ${sql}` : sql;
  }

  orderSql(scope: Scope, terms: OrderTerm[]): string {
    if (!terms.length) return '';
    return ' ORDER BY ' + terms.map((t) => {
      let s = this.fieldSql(scope, t.field);
      if (t.dir) s += t.dir === 'asc' ? ' ASC' : ' DESC';
      if (t.nulls) s += t.nulls === 'first' ? ' NULLS FIRST' : ' NULLS LAST';
      return s;
    }).join(', ');
  }

  static limitSql(limit: number | undefined, offset: number | undefined): string {
    return (limit !== undefined ? ` LIMIT ${limit}` : '') + (offset ? ` OFFSET ${offset}` : '');
  }

  nodeOptions(path: string): NodeOptions {
    return this.query.nodes.get(path) ?? { where: [], order: [] };
  }

  /** Paths of filters/order given for embeds the select does not have (PGRST108). */
  checkNodePaths(select: SelectItem[]): void {
    const known = new Set<string>(['']);
    const walk = (items: SelectItem[], prefix: string) => {
      for (const it of items) {
        if (it.kind !== 'embed') continue;
        for (const name of new Set([it.alias ?? it.name, it.name])) {
          const p = prefix ? `${prefix}.${name}` : name;
          known.add(p);
          walk(it.select, p);
        }
      }
    };
    walk(select, '');
    for (const path of this.query.nodes.keys()) {
      if (!known.has(path)) {
        const name = path.split('.').pop()!;
        throw new RestError(400, 'PGRST108', `'${name}' is not an embedded resource in this request`, null,
          `Verify that '${name}' is included in the 'select' query parameter.`);
      }
    }
  }

  /**
   * The select list of a scope and the lateral joins its embeds need, plus
   * conditions `!inner` embeds add to the scope's WHERE.
   */
  selectList(scope: Scope, items: SelectItem[]): { columns: string[]; names: string[]; joins: string[]; where: string[] } {
    const columns: string[] = [], names: string[] = [], joins: string[] = [], where: string[] = [];
    for (const it of items.length ? items : [{ kind: 'star' } as const]) {
      if (it.kind === 'star') {
        columns.push(`${ident(scope.alias)}.*`);
        names.push(...scope.table.columnOrder);
      }
      else if (it.kind === 'field' && scope.path !== '' && it.field.column === 'count' && !it.field.json.length && !scope.table.columns.has('count')) {
        // PostgREST's embedded count: `tasks(count)`
        columns.push(`pg_catalog.count(*) AS ${ident(it.alias ?? 'count')}`);
        names.push(it.alias ?? 'count');
      } else if (it.kind === 'field') {
        let sql = this.fieldSql(scope, it.field);
        if (it.cast !== undefined) {
          const cast = it.cast.toLowerCase();
          if (!this.cache.castTypes.has(cast)) throw new RestError(400, '42704', `type "${it.cast}" does not exist`);
          sql = `CAST(${sql} AS ${cast})`;
        }
        const key = it.alias ?? (it.field.json.length ? it.field.json[it.field.json.length - 1].key : it.field.column);
        columns.push(`${sql} AS ${ident(key)}`);
        names.push(key);
      } else {
        const rel = this.relationship(scope.table, it.name, it.hint);
        if (it.spread && rel.cardinality === 'many') {
          throw new RestError(400, 'PGRST119', `A spread operation on '${it.name}' is not possible`, `'${scope.table.name}' and '${it.name}' do not form a many-to-one or one-to-one relationship`);
        }
        const key = it.alias ?? it.name;
        const path = scope.path ? `${scope.path}.${key}` : key;
        const opts = this.query.nodes.has(path) ? this.nodeOptions(path)
          : this.nodeOptions(scope.path ? `${scope.path}.${it.name}` : it.name);
        const child: Scope = { table: rel.target, alias: this.nextAlias('t'), path };
        const lateral = this.nextAlias('l');
        const junction = this.nextAlias('j');
        const inner = this.selectList(child, it.select);
        const link = rel.join(child.alias, scope.alias, junction);
        const conds = [link.on, ...inner.where, ...opts.where.map((c) => this.condition(child, c))];
        const childSql = `SELECT ${inner.columns.join(', ')} FROM ${link.source ?? qualified(rel.target)} AS ${ident(child.alias)}`
          + (link.from ? ` ${link.from}` : '') + inner.joins.map((j) => ` ${j}`).join('')
          + ` WHERE ${conds.join(' AND ')}` + this.orderSql(child, opts.order) + QueryBuilder.limitSql(opts.limit, opts.offset);
        if (it.spread) {
          // the embedded row's columns become the parent's, in place
          joins.push(`${it.inner ? 'INNER' : 'LEFT'} JOIN LATERAL (${childSql}) AS ${ident(lateral)} ON TRUE`);
          columns.push(...inner.names.map((n) => `${ident(lateral)}.${ident(n)} AS ${ident(n)}`));
          names.push(...inner.names);
        } else if (rel.cardinality === 'many') {
          joins.push(`LEFT JOIN LATERAL (SELECT json_agg(${ident(lateral + '_r')})::jsonb AS body FROM (${childSql}) AS ${ident(lateral + '_r')}) AS ${ident(lateral)} ON TRUE`);
          columns.push(`COALESCE(${ident(lateral)}.body, '[]') AS ${ident(key)}`);
          if (it.inner) where.push(`${ident(lateral)}.body IS NOT NULL`);
        } else {
          joins.push(`${it.inner ? 'INNER' : 'LEFT'} JOIN LATERAL (${childSql}) AS ${ident(lateral)} ON TRUE`);
          columns.push(`row_to_json(${ident(lateral)}.*)::jsonb AS ${ident(key)}`);
        }
        if (!it.spread) names.push(key);
      }
    }
    return { columns, names, joins, where };
  }

  /** PostgREST's relationship detection through foreign keys, narrowed by a hint (FK name, column, or junction table). */
  relationship(parent: Table, name: string, hint: string | undefined): Relationship {
    const found: Relationship[] = [];
    const same = (t: { schema: string; name: string }, s: string, n: string) => t.schema === s && t.name === n;
    const eqs = (a: string, ac: string[], b: string, bc: string[]) => ac.map((c, i) => `${ident(a)}.${ident(c)} = ${ident(b)}.${ident(bc[i])}`).join(' AND ');
    const fkMatchesHint = (fk: ForeignKey) => hint === undefined || fk.name === hint || (fk.columns.length === 1 && fk.columns[0] === hint);
    const lookup = (schema: string, n: string) => this.cache.tables.get(tableKey(schema, n));
    for (const fk of this.cache.foreignKeys) {
      // many-to-one: the parent references the target (by table name, or by the FK column's name unless the target is a
      // view: PostgREST names views only by their name, postgrest#2277)
      if (same(parent, fk.schema, fk.table) && fkMatchesHint(fk)) {
        const target = lookup(fk.refSchema, fk.refTable);
        const byColumn = fk.columns.length === 1 && fk.columns[0] === name && hint === undefined && target?.kind === 'table';
        if (target && (fk.refTable === name || byColumn)) {
          found.push({ target, cardinality: 'one', describe: fkDescription(fk.oneToOne ? 'one-to-one' : 'many-to-one', fk.name, parent, fk.columns, target, fk.refColumns), join: (t, p) => ({ on: eqs(t, fk.refColumns, p, fk.columns) }) });
        }
      }
      // one-to-many (one-to-one when the FK columns are a key of their table)
      if (same(parent, fk.refSchema, fk.refTable) && fk.table === name && fk.schema === parent.schema && fkMatchesHint(fk)) {
        const target = lookup(fk.schema, fk.table);
        if (!target) continue;
        found.push({ target, cardinality: fk.oneToOne ? 'one' : 'many', describe: fkDescription(fk.oneToOne ? 'one-to-one' : 'one-to-many', fk.name, parent, fk.refColumns, target, fk.columns), join: (t, p) => ({ on: eqs(t, fk.columns, p, fk.refColumns) }) });
      }
    }
    // many-to-many through a junction with two FKs (to both sides) whose columns are all in its primary key
    const target = lookup(parent.schema, name);
    if (target) {
      for (const toParent of this.cache.foreignKeys) {
        if (!same(parent, toParent.refSchema, toParent.refTable)) continue;
        const junctionKey = lookup(toParent.schema, toParent.table)?.primaryKey ?? [];
        for (const toTarget of this.cache.foreignKeys) {
          if (toTarget.name === toParent.name || toTarget.schema !== toParent.schema || toTarget.table !== toParent.table || !same(target, toTarget.refSchema, toTarget.refTable)) continue;
          if (same(parent, toParent.schema, toParent.table) || same(target, toParent.schema, toParent.table)) continue;
          if (![...toParent.columns, ...toTarget.columns].every((c) => junctionKey.includes(c))) continue;
          if (hint !== undefined && hint !== toParent.table && hint !== toTarget.name) continue;
          const jt = { schema: toParent.schema, name: toParent.table };
          found.push({
            target, cardinality: 'many', describe: {
              cardinality: 'many-to-many', hint: toParent.table,
              relationship: `${toParent.table} using ${toParent.name}(${toParent.columns.join(', ')}) and ${toTarget.name}(${toTarget.columns.join(', ')})`,
            },
            join: (t, p, j) => ({ from: `JOIN ${qualified(jt)} AS ${ident(j)} ON ${eqs(j, toTarget.columns, t, toTarget.refColumns)}`, on: eqs(j, toParent.columns, p, toParent.refColumns) }),
          });
        }
      }
    }
    // computed relationships: a function named `name` of the parent's row returning the target's rows (to one with ROWS 1 or
    // without SETOF); as in PostgREST 12, a hint does not narrow them
    for (const fn of this.cache.functions) {
      if (fn.name !== name || fn.schema !== parent.schema || !fn.rowArgument || !same(parent, fn.rowArgument.schema, fn.rowArgument.name) || !fn.returnsTable) continue;
      const target = lookup(fn.returnsTable.schema, fn.returnsTable.name);
      if (!target) continue;
      found.push({
        target, cardinality: fn.returnsSet && !fn.returnsOneRow ? 'many' : 'one', describe: {}, computed: true,
        join: (_t, p) => ({ source: `${qualified(fn)}(${ident(p)}::${qualified(parent)})`, on: 'TRUE' }),
      });
    }
    if (found.length === 1) return found[0];
    if (!found.length) {
      throw new RestError(400, 'PGRST200', `Could not find a relationship between '${parent.name}' and '${name}' in the schema cache`,
        `Searched for a foreign key relationship between '${parent.name}' and '${name}'${hint ? ` using the hint '${hint}'` : ''} in the schema '${parent.schema}', but no matches were found.`);
    }
    throw new RestError(300, 'PGRST201', `Could not embed because more than one relationship was found for '${parent.name}' and '${name}'`,
      // a computed relationship is an empty object there, as in PostgREST
      found.map((r) => (r.computed ? {} : { cardinality: r.describe.cardinality, embedding: `${parent.name} with ${r.target.name}`, relationship: r.describe.relationship })),
      `Try changing '${name}' to one of the following: ${found.map((r) => `'${name}!${r.describe.hint ?? ''}'`).join(', ')}. Find the desired relationship in the 'details' key.`);
  }

  /**
   * A read of `fromSql` (a table, the rows a write returned, or a function
   * call) through the request's select, filters, order and limits: the
   * SELECT, and the count of all rows it would give without limits.
   */
  read(scope: Scope, fromSql: string, opts: { where?: string[]; limit?: number; offset?: number; applyFilters: boolean; order: boolean }): { source: string; count: string } {
    this.checkNodePaths(this.query.select);
    const top = this.nodeOptions('');
    const list = this.selectList(scope, this.query.select);
    const where = [...(opts.where ?? []), ...(opts.applyFilters ? top.where.map((c) => this.condition(scope, c)) : []), ...list.where];
    const whereSql = where.length ? ` WHERE ${where.join(' AND ')}` : '';
    const fromAll = `${fromSql}${list.joins.map((j) => ` ${j}`).join('')}`;
    const source = `SELECT ${list.columns.join(', ')} FROM ${fromAll}${whereSql}`
      + (opts.order ? this.orderSql(scope, top.order) : '') + QueryBuilder.limitSql(opts.limit, opts.offset);
    return { source, count: `(SELECT pg_catalog.count(*) FROM ${fromAll}${whereSql})` };
  }

  /**
   * A read as one shard of a sharded database answers it, for the gateway to
   * merge: each row's JSON (as json_agg would write it) and its order keys,
   * the first offset + limit rows in order, and the shard's count (one row of
   * NULLs when the shard has none). CSV: each row's record text instead of its
   * JSON, and the header its keys make as the last column.
   */
  shardRows(scope: Scope, fromSql: string, opts: { limit?: number; offset?: number; count: boolean; media: Media }): { sql: string; merge: Merge } {
    this.checkNodePaths(this.query.select);
    const top = this.nodeOptions('');
    const list = this.selectList(scope, this.query.select);
    const where = [...top.where.map((c) => this.condition(scope, c)), ...list.where];
    const whereSql = where.length ? ` WHERE ${where.join(' AND ')}` : '';
    const fromAll = `${fromSql}${list.joins.map((j) => ` ${j}`).join('')}`;
    const keys = top.order.map((t, i) => `, ${this.fieldSql(scope, t.field)} AS pgrst_o${i}`).join('');
    const window = opts.limit === undefined ? undefined : opts.limit + (opts.offset ?? 0);
    const rows = `SELECT ${shardRowSql(opts.media)} AS pgrst_json${keys}${opts.media === 'csv' ? `, ${CSV_HEADER('pgrst_row')} AS pgrst_header` : ''} FROM ${fromAll}, LATERAL (SELECT ${list.columns.join(', ')}) AS pgrst_row`
      + `${whereSql}${this.orderSql(scope, top.order)}${QueryBuilder.limitSql(window, undefined)}`;
    const count = opts.count ? `(SELECT pg_catalog.count(*) FROM ${fromAll}${whereSql})` : 'NULL::bigint';
    return {
      sql: `SELECT ${count} AS pgrst_total, pgrst_r.* FROM (SELECT 1) pgrst_one LEFT JOIN LATERAL (${rows}) pgrst_r ON TRUE`,
      merge: {
        // columns: pgrst_total, pgrst_json, then the keys; NULLs sort as Postgres's defaults unless asked
        orderBy: top.order.map((t, i) => ({ column: i + 3, desc: t.dir === 'desc', nullsFirst: t.nulls ? t.nulls === 'first' : t.dir === 'desc' })),
        distinct: false,
        limit: opts.limit === undefined ? undefined : { literal: String(opts.limit) },
        offset: opts.offset ? { literal: String(opts.offset) } : undefined,
      },
    };
  }

  /**
   * The statement the sharded planner routes a request by: its table, each
   * table its embeds join (on their foreign keys, as the planner must see
   * sharded tables joined on their primary vindex), and its top-level eq/in
   * filters, which may pin the primary vindex. A write names its table only.
   */
  routingProbe(table: Table, verb: 'SELECT' | 'UPDATE' | 'DELETE', set: string[] = []): Probe {
    const params: Array<string | null> = [];
    const param = (v: string) => {
      params.push(v);
      return `$${params.length}`;
    };
    const root = 'pgrst_p0';
    const joins: string[] = [];
    const where: string[] = [];
    let n = 1;
    const visit = (parent: Table, alias: string, items: SelectItem[]) => {
      for (const it of items) {
        if (it.kind !== 'embed') continue;
        const rel = this.relationship(parent, it.name, it.hint);
        // a function of the parent's row reads whatever it reads on the shard it runs on
        if (rel.computed) throw new RestError(501, '0A000', `the computed relationship '${it.name}' on a sharded database`);
        const child = `pgrst_p${n++}`;
        const link = rel.join(child, alias, `pgrst_p${n++}`);
        joins.push(` JOIN ${qualified(rel.target)} AS ${ident(child)} ON TRUE${link.from ? ` ${link.from}` : ''}`);
        where.push(link.on);
        visit(rel.target, child, it.select);
      }
    };
    if (verb === 'SELECT') visit(table, root, this.query.select);
    for (const c of this.nodeOptions('').where) {
      if (c.kind !== 'filter' || c.negate || c.field.json.length || !table.columns.has(c.field.column)) continue;
      const col = `${ident(root)}.${ident(c.field.column)}`;
      if (c.op === 'eq') where.push(`${col} = ${param(c.value as string)}`);
      else if (c.op === 'in' && (c.value as string[]).length) where.push(`${col} IN (${(c.value as string[]).map(param).join(', ')})`);
    }
    const whereSql = where.length ? ` WHERE ${where.join(' AND ')}` : '';
    const target = `${qualified(table)} AS ${ident(root)}`;
    const sql = verb === 'SELECT' ? `SELECT 1 FROM ${target}${joins.join('')}${whereSql}`
      : verb === 'UPDATE' ? `UPDATE ${target} SET ${(set.length ? set : [table.columnOrder[0]]).map((c) => `${ident(c)} = NULL`).join(', ')}${whereSql}`
        : `DELETE FROM ${target}${whereSql}`;
    return { sql, params };
  }
}

/**
 * How a response's rows are written: a JSON array, one JSON object (singular),
 * either without its null-valued keys (PostgREST's `nulls=stripped`), or CSV.
 */
export type Media = 'json' | 'object' | 'json-stripped' | 'object-stripped' | 'csv';

export const isSingular = (media: Media) => media === 'object' || media === 'object-stripped';

/** The rows written by a media type handler aggregate of the table's rows (PostgREST 12). */
export interface AggregateBody { aggregate: MediaAggregate; table: Table }

/**
 * The body of the rows of `pgrst_source`, aggregated over them as `_postgrest_t`.
 * CSV as PostgREST builds it: the first row's keys as the header, then each
 * row's record text without its parentheses (Postgres's quoting), no final newline.
 */
/** The CSV header of a row: its keys. */
const CSV_HEADER = (row: string) => `(SELECT coalesce(string_agg(pgrst_k.k, ','), '') FROM json_object_keys(row_to_json(${row})) AS pgrst_k(k))`;
/** A row's record text without its parentheses: its CSV line. */
const CSV_RECORD = (row: string) => `substring(${row}::text, 2, length(${row}::text) - 2)`;

/** One row of a shard's answer as `bodySql` writes it into the body. */
function shardRowSql(media: Media): string {
  if (media === 'csv') return CSV_RECORD('pgrst_row');
  return media.endsWith('-stripped') ? 'json_strip_nulls(row_to_json(pgrst_row))::text' : 'row_to_json(pgrst_row)::text';
}

export function bodySql(media: Media | AggregateBody): string {
  if (typeof media === 'object') {
    // the cast fails (42846) when select= changed the row's shape, as it does in PostgREST
    return `${qualified(media.aggregate)}(_postgrest_t::${qualified(media.table)})${media.aggregate.binary ? '' : '::text'}`;
  }
  if (media === 'object') return `coalesce((json_agg(_postgrest_t)->0)::text, 'null')`;
  if (media === 'json') return `coalesce(json_agg(_postgrest_t), '[]')::text`;
  // json_strip_nulls drops null-valued keys at every depth (and writes the JSON without spaces, as PostgREST's does)
  if (media === 'object-stripped') return `coalesce((json_strip_nulls(json_agg(_postgrest_t))->0)::text, 'null')`;
  if (media === 'json-stripped') return `coalesce(json_strip_nulls(json_agg(_postgrest_t)), '[]')::text`;
  const header = `coalesce((SELECT ${CSV_HEADER('pgrst_h')} FROM (SELECT * FROM pgrst_source LIMIT 1) pgrst_h), '')`;
  return `${header} || E'\\n' || coalesce(string_agg(${CSV_RECORD('_postgrest_t')}, E'\\n'), '')`;
}

/**
 * The `response.headers` and `response.status` settings the statement's
 * functions (or the pre-request) may have set, read after its rows, as
 * PostgREST reads them.
 */
export const RESPONSE_SETTINGS = `, nullif(current_setting('response.headers', true), '') AS response_headers, nullif(current_setting('response.status', true), '') AS response_status`;

/** PostgREST's response row: total (count=exact), page_total, the body built by Postgres, and the response settings. */
export function responseSql(source: string, total: string | null, media: Media | AggregateBody, extra = ''): string {
  return `${source.startsWith('WITH ') ? source : `WITH pgrst_source AS (${source})`} SELECT ${total ?? 'NULL::bigint'} AS total, pg_catalog.count(_postgrest_t) AS page_total, ${bodySql(media)} AS body${extra}${RESPONSE_SETTINGS} FROM (SELECT * FROM pgrst_source) _postgrest_t`;
}

export function findTable(cache: SchemaCache, schema: string, name: string): Table {
  const t = cache.tables.get(tableKey(schema, name));
  if (!t) throw new RestError(404, '42P01', `relation "${schema}.${name}" does not exist`);
  return t;
}

/** The function `/rpc/<name>` calls with these argument names (PostgREST's PGRST202 when none fits). */
export function findFunction(cache: SchemaCache, schema: string, name: string, argNames: string[], post: boolean): RestFunction {
  const given = new Set(argNames);
  const sameName = cache.functions.filter((f) => f.schema === schema && f.name === name);
  const fits = sameName.filter((f) => [...given].every((a) => f.args.some((x) => x.name === a))
    && f.args.every((x) => x.hasDefault || given.has(x.name)));
  if (fits.length === 1) return fits[0];
  const sorted = [...given].sort();
  if (fits.length > 1) {
    throw new RestError(300, 'PGRST203', `Could not choose the best candidate function between: ${fits.map((f) => `${schema}.${name}(${f.args.map((a) => `${a.name} => ${a.type}`).join(', ')})`).join(', ')}`,
      null, 'Try renaming the parameters or the function itself in the database so function overloading can be resolved');
  }
  const params = (sorted.length ? `with parameter${sorted.length > 1 ? 's' : ''} ${sorted.join(', ')}` : 'without parameters')
    + (post ? ' or with a single unnamed json/jsonb parameter' : '');
  // (a function taking its body as an unnamed parameter gets no hint from PostgREST either)
  const hint = sameName.length && sameName[0].args.every((a) => a.name !== '') ? `Perhaps you meant to call the function ${schema}.${name}(${sameName[0].args.map((a) => a.name).join(', ')})` : null;
  throw new RestError(404, 'PGRST202', `Could not find the function ${schema}.${name}(${sorted.join(', ')}) in the schema cache`,
    `Searched for the function ${schema}.${name} ${params}, but no matches were found in the schema cache.`, hint);
}

export type { Scope };
