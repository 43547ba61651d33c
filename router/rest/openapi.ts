/**
 * The OpenAPI (Swagger 2.0) document PostgREST 12 serves at `/`: a definition
 * per table and view with its columns' types, a path per table (the methods
 * Postgres can run on it) and per function, built from the schema cache. As in
 * PostgREST's default `openapi-mode = follow-privileges`, it lists only what
 * the request's role may use: ACCESSIBLE_SQL runs inside the request's
 * transaction, after its role is set.
 */
import type { Column, RestFunction, SchemaCache, Table } from './schema-cache.ts';

/** PostgREST's version string, which the document carries. */
const VERSION = '12.0.2';
const MEDIA = ['application/json', 'application/vnd.pgrst.object+json;nulls=stripped', 'application/vnd.pgrst.object+json', 'text/csv'];

/** Names of the relations and functions of schema $1 the current role may use (PostgREST's follow-privileges test). */
export const ACCESSIBLE_SQL = `SELECT NULL::bigint AS total, 1 AS page_total, json_build_object(
  'tables', (SELECT coalesce(json_agg(c.relname), '[]') FROM pg_class c
    WHERE c.relnamespace = $1::regnamespace AND c.relkind IN ('r', 'v', 'm', 'f', 'p')
      AND (pg_has_role(c.relowner, 'USAGE') OR has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')
        OR has_any_column_privilege(c.oid, 'SELECT, INSERT, UPDATE, REFERENCES'))),
  'functions', (SELECT coalesce(json_agg(p.proname || '(' || array_to_string(array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes::oid[]) t), ',') || ')'), '[]')
    FROM pg_proc p WHERE p.pronamespace = $1::regnamespace AND has_function_privilege(p.oid, 'EXECUTE'))
)::text AS body`;

export interface Accessible { tables: string[]; functions: string[] }

/** The key ACCESSIBLE_SQL names a function by. */
const functionKey = (f: RestFunction) => `${f.name}(${f.args.map((a) => a.type).join(',')})`;

/** The JSON Schema type PostgREST gives a Postgres type (none for json/jsonb). */
function jsonType(type: string): string | undefined {
  if (type.endsWith('[]')) return 'array';
  switch (type) {
    case 'boolean': return 'boolean';
    case 'smallint': case 'integer': case 'bigint': return 'integer';
    case 'numeric': case 'real': case 'double precision': return 'number';
    case 'json': case 'jsonb': return undefined;
    default: return 'string';
  }
}

/**
 * A column default as PostgREST shows it: the expression read as JSON, a
 * string column's `'literal'::type` as its literal; left out when that is not
 * valid JSON (`nextval(...)`, a literal with a double quote inside).
 */
function defaultValue(expr: string | null, type: string | undefined): unknown {
  if (expr === null) return undefined;
  let text = expr;
  if (type === 'string') text = `"${/^'(.*)'::[^']+$/s.exec(expr)?.[1] ?? expr}"`;
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** A comment's first line and the rest (PostgREST's summary and description). */
function splitComment(comment: string | null): { summary?: string; description?: string } {
  if (!comment) return {};
  const nl = comment.indexOf('\n');
  if (nl < 0) return { summary: comment };
  const rest = comment.slice(nl + 1);
  return { summary: comment.slice(0, nl), ...(rest ? { description: rest } : {}) };
}

const compact = <T extends Record<string, unknown>>(o: T): T =>
  Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined && v !== null)) as T;

function columnSchema(cache: SchemaCache, table: Table, col: Column): Record<string, unknown> {
  const type = jsonType(col.doc.baseType);
  const notes = ['Note:'];
  if (table.primaryKey.includes(col.name)) notes.push('This is a Primary Key.<pk/>');
  // as PostgREST: the first single-column many-to-one FK of the column, tables' FKs before those through views
  const fk = cache.foreignKeys.find((f) => f.schema === table.schema && f.table === table.name && !f.oneToOne && f.columns.length === 1 && f.columns[0] === col.name);
  if (fk) {
    const ref = fk.refColumns[fk.columns.indexOf(col.name)];
    notes.push(`This is a Foreign Key to \`${fk.refTable}.${ref}\`.<fk table='${fk.refTable}' column='${ref}'/>`);
  }
  const description = notes.length > 1 ? `${col.doc.description ? `${col.doc.description}\n\n` : ''}${notes.join('\n')}` : col.doc.description;
  const element = col.doc.baseType.endsWith('[]') ? jsonType(col.doc.baseType.slice(0, -2)) : undefined;
  return compact({
    default: defaultValue(col.doc.default, type), description, enum: col.doc.enum, format: col.doc.format,
    maxLength: col.doc.maxLength, items: type === 'array' ? compact({ type: element }) : undefined, type,
  });
}

function tablePaths(table: Table): Record<string, unknown> {
  const ref = (name: string) => ({ $ref: `#/parameters/${name}` });
  const filters = table.columnOrder.map((c) => ref(`rowFilter.${table.name}.${c}`));
  const base = { tags: [table.name], ...splitComment(table.description) };
  const ops: Record<string, unknown> = {
    get: {
      ...base,
      parameters: [...filters, ...['select', 'order', 'range', 'rangeUnit', 'offset', 'limit', 'preferCount'].map(ref)],
      responses: { 200: { description: 'OK', schema: { items: { $ref: `#/definitions/${table.name}` }, type: 'array' } }, 206: { description: 'Partial Content' } },
    },
  };
  if (table.writable.insert) ops.post = { ...base, parameters: [ref(`body.${table.name}`), ref('select'), ref('preferPost')], responses: { 201: { description: 'Created' } } };
  if (table.writable.delete) ops.delete = { ...base, parameters: [...filters, ref('preferReturn')], responses: { 204: { description: 'No Content' } } };
  if (table.writable.update) ops.patch = { ...base, parameters: [...filters, ref(`body.${table.name}`), ref('preferReturn')], responses: { 204: { description: 'No Content' } } };
  return ops;
}

function functionPaths(fn: RestFunction): Record<string, unknown> {
  const base = { tags: [`(rpc) ${fn.name}`], ...splitComment(fn.description), produces: MEDIA.slice(0, 3) };
  const responses = { 200: { description: 'OK' } };
  const query = fn.args.map((a) => ({ format: a.type, in: 'query', name: a.name, required: !a.hasDefault, type: jsonType(a.type) ?? 'string' }));
  const required = fn.args.filter((a) => !a.hasDefault).map((a) => a.name);
  const body = compact({
    description: fn.description,
    properties: fn.args.length ? Object.fromEntries(fn.args.map((a) => [a.name, compact({ format: a.type, type: jsonType(a.type) })])) : undefined,
    required: required.length ? required : undefined,
    type: 'object',
  });
  return {
    get: { ...base, ...(query.length ? { parameters: query } : {}), responses },
    post: { ...base, parameters: [{ in: 'body', name: 'args', required: true, schema: body }, { $ref: '#/parameters/preferParams' }], responses },
  };
}

function prefer(values: string[]) {
  return { name: 'Prefer', description: 'Preference', required: false, enum: values, in: 'header', type: 'string' };
}

const COMMON_PARAMETERS = {
  preferParams: prefer(['params=single-object']),
  preferReturn: prefer(['return=representation', 'return=minimal', 'return=none']),
  preferCount: prefer(['count=none']),
  preferPost: prefer(['return=representation', 'return=minimal', 'return=none', 'resolution=ignore-duplicates', 'resolution=merge-duplicates']),
  select: { name: 'select', description: 'Filtering Columns', required: false, in: 'query', type: 'string' },
  on_conflict: { name: 'on_conflict', description: 'On Conflict', required: false, in: 'query', type: 'string' },
  order: { name: 'order', description: 'Ordering', required: false, in: 'query', type: 'string' },
  range: { name: 'Range', description: 'Limiting and Pagination', required: false, in: 'header', type: 'string' },
  rangeUnit: { name: 'Range-Unit', description: 'Limiting and Pagination', required: false, default: 'items', in: 'header', type: 'string' },
  offset: { name: 'offset', description: 'Limiting and Pagination', required: false, in: 'query', type: 'string' },
  limit: { name: 'limit', description: 'Limiting and Pagination', required: false, in: 'query', type: 'string' },
};

const BODY_TYPES = ['json', 'jsonb', 'text', 'xml', 'bytea'];

/** The document for `schema`, listing what `accessible` names; `host` and `basePath` are where the client reached us. */
export function openApiDocument(cache: SchemaCache, schema: string, accessible: Accessible, host: string, basePath: string): string {
  const names = new Set(accessible.tables);
  const executable = new Set(accessible.functions);
  const tables = [...cache.tables.values()].filter((t) => t.schema === schema && names.has(t.name));
  // a single unnamed parameter of another type than the body's (a computed relationship's row, an int) cannot be called by RPC: PostgREST leaves it out
  const callable = (f: RestFunction) => !(f.args.length === 1 && f.args[0].name === '' && !BODY_TYPES.includes(f.args[0].type));
  const functions = cache.functions.filter((f) => f.schema === schema && executable.has(functionKey(f)) && callable(f));
  const paths: Record<string, unknown> = {
    '/': { get: { tags: ['Introspection'], summary: 'OpenAPI description (this document)', produces: ['application/openapi+json', 'application/json'], responses: { 200: { description: 'OK' } } } },
  };
  const definitions: Record<string, unknown> = {};
  const parameters: Record<string, unknown> = { ...COMMON_PARAMETERS };
  for (const t of tables) {
    paths[`/${t.name}`] = tablePaths(t);
    const columns = t.columnOrder.map((c) => t.columns.get(c)!);
    const required = columns.filter((c) => !c.nullable).map((c) => c.name);
    definitions[t.name] = compact({
      description: t.description, required: required.length ? required : undefined,
      properties: Object.fromEntries(columns.map((c) => [c.name, columnSchema(cache, t, c)])), type: 'object',
    });
    parameters[`body.${t.name}`] = { name: t.name, description: t.name, required: false, in: 'body', schema: { $ref: `#/definitions/${t.name}` } };
    for (const c of columns) {
      parameters[`rowFilter.${t.name}.${c.name}`] = compact({ name: c.name, description: c.doc.description, required: false, format: c.doc.format, in: 'query', type: 'string' });
    }
  }
  for (const f of functions) paths[`/rpc/${f.name}`] = functionPaths(f);
  const comment = cache.schemaComments.get(schema);
  const nl = comment ? comment.indexOf('\n') : -1;
  const info = comment
    ? { description: nl < 0 ? '' : comment.slice(nl + 1), title: nl < 0 ? comment : comment.slice(0, nl), version: VERSION }
    : { description: 'This is a dynamic API generated by PostgREST', title: 'PostgREST API', version: VERSION };
  return JSON.stringify({
    swagger: '2.0', info, host, basePath, schemes: ['http'], consumes: MEDIA, produces: MEDIA, paths, definitions, parameters,
    externalDocs: { description: 'PostgREST Documentation', url: 'https://postgrest.org/en/v12.0/api.html' },
  });
}
