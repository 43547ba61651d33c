/**
 * What PostgREST calls the schema cache: the exposed schemas' tables, views,
 * columns, keys, foreign keys and functions, read from the catalog in one
 * round trip. Every identifier of a request is checked against it before it is
 * quoted into SQL.
 */
import { inferViewKeys, type KeyConstraint } from './view-keys.ts';

export interface Column {
  name: string;
  /** format_type(): safe to splice, it comes from the catalog. */
  type: string;
  nullable: boolean;
  hasDefault: boolean;
  /**
   * The expression an insert would take for it (its default, an identity's
   * nextval, its domain's default), for `Prefer: missing=default`; from the catalog, safe to splice.
   */
  defaultSql: string | null;
  /** What the OpenAPI document says of it (openapi.ts). */
  doc: ColumnDoc;
}

/** A column as PostgREST's OpenAPI document describes it. */
export interface ColumnDoc {
  /** The type's name without modifiers, schema-qualified outside pg_catalog (`character varying`, `public.mood[]`). */
  format: string;
  /** The base type (domains resolved) without modifiers, for the JSON Schema type. */
  baseType: string;
  description: string | null;
  /** The default expression (a domain's own default for a domain column). */
  default: string | null;
  maxLength: number | null;
  enum: string[] | null;
}

export interface Table {
  schema: string;
  name: string;
  kind: 'table' | 'view';
  columns: Map<string, Column>;
  /** Column order as in the catalog (what `select=*` returns). */
  columnOrder: string[];
  /** A view's is inferred from its base tables (view-keys.ts). */
  primaryKey: string[];
  description: string | null;
  /** PostgREST's insertable/updatable/deletable: tables always, views when Postgres can write through them. */
  writable: { insert: boolean; update: boolean; delete: boolean };
}

export interface ForeignKey {
  name: string;
  /** The referencing side. */
  table: string;
  schema: string;
  columns: string[];
  /** The referenced side. */
  refTable: string;
  refSchema: string;
  refColumns: string[];
  /** Its columns are a primary or unique key of the referencing table (the inverse relationship is to one too). */
  oneToOne: boolean;
}

export interface FunctionArg {
  name: string;
  type: string;
  /** Trailing arguments with defaults may be left out. */
  hasDefault: boolean;
}

export interface RestFunction {
  schema: string;
  name: string;
  args: FunctionArg[];
  volatility: 'i' | 's' | 'v';
  returnsSet: boolean;
  /** A table's row type (the result filters, selects and embeds like that table), else a scalar. */
  returnsTable: { schema: string; name: string } | null;
  returnType: string;
  /**
   * A PostgREST 12 media type handler: the result is a domain named after a
   * media type (`create domain "text/html" as text`), answered as it is when
   * the client accepts that type. `binary`: over bytea (sent as bytes).
   */
  mediaType: { type: string; binary: boolean } | null;
  /** The table whose row type is the function's only argument (a computed relationship when it returns a table's rows). */
  rowArgument: { schema: string; name: string } | null;
  /** `ROWS 1` on a set-returning function: a computed relationship to one row. */
  returnsOneRow: boolean;
  description: string | null;
}

export interface SchemaCache {
  schemas: string[];
  tables: Map<string, Table>;
  foreignKeys: ForeignKey[];
  functions: RestFunction[];
  /** Type names a `::cast` of `select=` may name (pg_catalog's, and SQL's spellings of them). */
  castTypes: Set<string>;
  /** COMMENT ON SCHEMA of each exposed schema (the OpenAPI document's title and description). */
  schemaComments: Map<string, string | null>;
  /**
   * PostgREST 12 media type handlers for tables: aggregates of a table's rows
   * whose result is a domain named after a media type, by the table's key.
   */
  mediaAggregates: Map<string, MediaAggregate[]>;
}

export interface MediaAggregate { schema: string; name: string; type: string; binary: boolean }

export const tableKey = (schema: string, name: string) => `${schema}\u0000${name}`;

/** A type's name as PostgREST's OpenAPI document writes it: pg_catalog's by their SQL name, others schema-qualified. */
const nominal = (t: string) => `(case when ${t}.typnamespace = 'pg_catalog'::regnamespace then format_type(${t}.oid, null)
  else (select nspname from pg_namespace where oid = ${t}.typnamespace) || '.' || ${t}.typname end)`;

const TABLES_SQL = `
select c.oid::int8 as oid, n.nspname as schema, c.relname as name, case when c.relkind in ('v', 'm') then 'view' else 'table' end as kind,
  obj_description(c.oid, 'pg_class') as description,
  c.relkind in ('r', 'p') or (c.relkind in ('v', 'f') and pg_relation_is_updatable(c.oid::regclass, true) & 8 = 8) as insertable,
  c.relkind in ('r', 'p') or (c.relkind in ('v', 'f') and pg_relation_is_updatable(c.oid::regclass, true) & 4 = 4) as updatable,
  c.relkind in ('r', 'p') or (c.relkind in ('v', 'f') and pg_relation_is_updatable(c.oid::regclass, true) & 16 = 16) as deletable,
  coalesce((select json_agg(json_build_object('name', a.attname, 'type', format_type(a.atttypid, a.atttypmod),
      'nullable', not a.attnotnull, 'hasDefault', a.atthasdef or a.attidentity <> '' or a.attgenerated <> '',
      'defaultSql', case when a.attidentity <> '' then format('nextval(%L::regclass)', pg_get_serial_sequence(format('%I.%I', n.nspname, c.relname), a.attname))
        when a.attgenerated = '' then coalesce(pg_get_expr(d.adbin, d.adrelid), pg_get_expr(t.typdefaultbin, 0)) end,
      'doc', json_build_object(
        'format', case when et.oid is not null then ${nominal('et')} || '[]' else ${nominal('bt')} end,
        'baseType', format_type(bt.oid, null),
        'description', col_description(c.oid, a.attnum),
        'default', case when t.typbasetype <> 0 then pg_get_expr(t.typdefaultbin, 0)
          when a.attgenerated = '' and a.attidentity = '' then pg_get_expr(d.adbin, d.adrelid) end,
        'maxLength', case when a.atttypid in ('varchar'::regtype, 'bpchar'::regtype) and a.atttypmod > 4 then a.atttypmod - 4 end,
        'enum', (select json_agg(e.enumlabel order by e.enumsortorder) from pg_enum e where e.enumtypid = bt.oid)))
      order by a.attnum)
    from pg_attribute a join pg_type t on t.oid = a.atttypid join pg_type bt on bt.oid = coalesce(nullif(t.typbasetype, 0), t.oid)
    left join pg_type et on et.oid = bt.typelem and bt.typcategory = 'A'
    left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
    where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped), '[]') as columns,
  coalesce((select json_agg(a.attname order by u.ord) from pg_constraint k, unnest(k.conkey) with ordinality u(attnum, ord)
    join pg_attribute a on a.attrelid = c.oid and a.attnum = u.attnum where k.conrelid = c.oid and k.contype = 'p'), '[]') as primary_key
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where n.nspname = any($1) and c.relkind in ('r', 'v', 'm', 'p', 'f')`;

/**
 * Primary and foreign keys of every schema: a view of an exposed schema may
 * show a table of another one, and takes its keys (view-keys.ts).
 */
const KEYS_SQL = `
select k.conname as name, k.contype::text as type,
  t1.oid::int8 as oid, n1.nspname as schema, t1.relname as table, k.conkey as attnums,
  (select json_agg(a.attname order by u.ord) from unnest(k.conkey) with ordinality u(attnum, ord)
    join pg_attribute a on a.attrelid = k.conrelid and a.attnum = u.attnum) as columns,
  t2.oid::int8 as ref_oid, n2.nspname as ref_schema, t2.relname as ref_table, k.confkey as ref_attnums,
  (select json_agg(a.attname order by u.ord) from unnest(k.confkey) with ordinality u(attnum, ord)
    join pg_attribute a on a.attrelid = k.confrelid and a.attnum = u.attnum) as ref_columns,
  k.contype = 'f' and exists (select from pg_constraint u where u.conrelid = k.conrelid and u.contype in ('p', 'u')
    and u.conkey @> k.conkey and u.conkey <@ k.conkey) as one_to_one
from pg_constraint k
join pg_class t1 on t1.oid = k.conrelid join pg_namespace n1 on n1.oid = t1.relnamespace
left join pg_class t2 on t2.oid = k.confrelid left join pg_namespace n2 on n2.oid = t2.relnamespace
where k.contype in ('p', 'f') and n1.nspname not in ('pg_catalog', 'information_schema')
order by k.conname, n1.nspname, t1.relname`;

/** The exposed schemas' views with their rewrite rule's node tree, whose target list says where each column comes from. */
const VIEWS_SQL = `
select c.oid::int8 as oid, n.nspname as schema, c.relname as name, r.ev_action::text as definition,
  (select json_object_agg(a.attnum, a.attname) from pg_attribute a where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped) as columns
from pg_class c join pg_namespace n on n.oid = c.relnamespace join pg_rewrite r on r.ev_class = c.oid and r.rulename = '_RETURN'
where c.relkind in ('v', 'm') and n.nspname = any($1)`;

const FUNCTIONS_SQL = `
select n.nspname as schema, p.proname as name, p.provolatile::text as volatility, p.proretset as returns_set,
  p.pronargdefaults as n_defaults, format_type(p.prorettype, null) as return_type, obj_description(p.oid, 'pg_proc') as description,
  coalesce((select json_agg(json_build_object('name', coalesce(a.name, ''), 'type', format_type(a0.type, null)) order by a0.ord)
    from unnest(p.proargtypes::oid[]) with ordinality a0(type, ord)
    left join lateral (
      select names.name from unnest(coalesce(p.proargnames, '{}'::text[]), coalesce(p.proargmodes, array_fill('i'::"char", array[p.pronargs])))
        with ordinality names(name, mode, i)
      where names.mode in ('i', 'b', 'v') offset a0.ord - 1 limit 1
    ) a(name) on true), '[]') as args,
  case when rt.typrelid <> 0 and rc.relkind in ('r', 'v', 'm', 'p', 'f')
    then json_build_object('schema', rn.nspname, 'name', rc.relname) end as returns_table,
  case when rt.typtype = 'd' and rt.typname like '%/%'
    then json_build_object('type', rt.typname, 'binary', rt.typbasetype = 'bytea'::regtype) end as media_type,
  (select json_build_object('schema', an.nspname, 'name', ac.relname) from pg_type at join pg_class ac on ac.oid = at.typrelid
    join pg_namespace an on an.oid = ac.relnamespace
    where p.pronargs = 1 and at.oid = p.proargtypes[0] and ac.relkind in ('r', 'v', 'm', 'p', 'f')) as row_argument,
  p.proretset and p.prorows = 1 as returns_one_row
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
join pg_type rt on rt.oid = p.prorettype
left join pg_class rc on rc.oid = rt.typrelid left join pg_namespace rn on rn.oid = rc.relnamespace
where n.nspname = any($1) and p.prokind = 'f'`;

const MEDIA_AGGREGATES_SQL = `
select n.nspname as schema, p.proname as name, tn.nspname as table_schema, tc.relname as table_name,
  rt.typname as type, rt.typbasetype = 'bytea'::regtype as binary
from pg_aggregate a join pg_proc p on p.oid = a.aggfnoid join pg_namespace n on n.oid = p.pronamespace
join pg_type at on at.oid = p.proargtypes[0] join pg_class tc on tc.oid = at.typrelid join pg_namespace tn on tn.oid = tc.relnamespace
join pg_type rt on rt.oid = p.prorettype
where n.nspname = any($1) and p.pronargs = 1 and rt.typtype = 'd' and rt.typname like '%/%'`;

const SCHEMAS_SQL = `select nspname as name, obj_description(oid, 'pg_namespace') as description from pg_namespace where nspname = any($1)`;

const CAST_TYPES_SQL = `select typname from pg_type where typnamespace = 'pg_catalog'::regnamespace and typname !~ '^_|^pg_'`;

/** SQL's spellings of pg_catalog types that `::` accepts unquoted. */
const SQL_TYPE_NAMES = ['integer', 'int', 'smallint', 'bigint', 'real', 'double precision', 'boolean', 'decimal',
  'character varying', 'character', 'varchar', 'char', 'timestamp with time zone', 'timestamp without time zone',
  'time with time zone', 'time without time zone'];

export type Query = (sql: string, params: unknown[]) => Promise<Record<string, any>[]>;

export async function loadSchemaCache(query: Query, schemas: string[]): Promise<SchemaCache> {
  const [tables, keys, views, fns, casts, comments, aggregates] = await Promise.all([
    query(TABLES_SQL, [schemas]), query(KEYS_SQL, []), query(VIEWS_SQL, [schemas]), query(FUNCTIONS_SQL, [schemas]), query(CAST_TYPES_SQL, []),
    query(SCHEMAS_SQL, [schemas]), query(MEDIA_AGGREGATES_SQL, [schemas]),
  ]);
  const constraints: KeyConstraint[] = keys.map((k) => ({
    name: k.name, type: k.type, oneToOne: k.one_to_one,
    table: { oid: Number(k.oid), schema: k.schema, name: k.table, attnums: k.attnums, columns: k.columns },
    ref: k.type === 'f' ? { oid: Number(k.ref_oid), schema: k.ref_schema, name: k.ref_table, attnums: k.ref_attnums, columns: k.ref_columns } : null,
  }));
  const viewKeys = inferViewKeys(views.map((v) => ({ oid: Number(v.oid), schema: v.schema, name: v.name, definition: v.definition, columns: v.columns ?? {} })), constraints);
  const cache: SchemaCache = {
    schemas, tables: new Map(), foreignKeys: [], functions: [], castTypes: new Set(SQL_TYPE_NAMES),
    schemaComments: new Map(comments.map((c) => [c.name, c.description])), mediaAggregates: new Map(),
  };
  for (const a of aggregates) {
    const key = tableKey(a.table_schema, a.table_name);
    cache.mediaAggregates.set(key, [...(cache.mediaAggregates.get(key) ?? []), { schema: a.schema, name: a.name, type: a.type, binary: a.binary }]);
  }
  for (const t of tables) {
    const columns = (t.columns as Column[]);
    cache.tables.set(tableKey(t.schema, t.name), {
      schema: t.schema, name: t.name, kind: t.kind,
      columns: new Map(columns.map((c) => [c.name, c])), columnOrder: columns.map((c) => c.name),
      primaryKey: t.kind === 'view' ? viewKeys.primaryKeys.get(Number(t.oid)) ?? [] : t.primary_key,
      description: t.description, writable: { insert: t.insertable, update: t.updatable, delete: t.deletable },
    });
  }
  const exposed = (schema: string) => schemas.includes(schema);
  const tableFks: ForeignKey[] = constraints.filter((k) => k.ref).map((k) => ({
    name: k.name, schema: k.table.schema, table: k.table.name, columns: k.table.columns,
    refSchema: k.ref!.schema, refTable: k.ref!.name, refColumns: k.ref!.columns, oneToOne: k.oneToOne,
  }));
  // as PostgREST: relationships whose both ends are exposed, tables' first, then those through views
  cache.foreignKeys = [...tableFks, ...viewKeys.foreignKeys].filter((f) => exposed(f.schema) && exposed(f.refSchema));
  cache.functions = fns.map((f) => {
    const args = f.args as { name: string; type: string }[];
    return {
      schema: f.schema, name: f.name, volatility: f.volatility, returnsSet: f.returns_set, returnsTable: f.returns_table,
      returnType: f.return_type, mediaType: f.media_type,
      rowArgument: f.row_argument, returnsOneRow: f.returns_one_row, description: f.description,
      args: args.map((a, i) => ({ ...a, hasDefault: i >= args.length - f.n_defaults })),
    };
  });
  for (const c of casts) cache.castTypes.add(c.typname);
  return cache;
}
