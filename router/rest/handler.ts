/**
 * One PostgREST request: authenticate, pick the schema, build the statement,
 * run it in one transaction (role and request settings first), and shape the
 * response as PostgREST 12 does (status, Content-Range, Location, body).
 */
import { errorBody, fromDatabaseError, isDatabaseError, RestError } from './errors.ts';
import { authenticate, type Auth } from './jwt.ts';
import { FILTER_OPS, parseCsv, parsePrefer, parseQuery, parseRange, type ParsedQuery, type Prefer } from './parse.ts';
import { tableKey, type MediaAggregate, type RestFunction, type SchemaCache, type Table } from './schema-cache.ts';
import type { Merge } from '../planner/plan.ts';
import { moveLookupRows, type LookupAccess, type TextRow } from '../gateway/lookups.ts';
import type { LookupVindex } from '../../schemas/vschema/vschema.ts';
import { mergeReads, mergeWrites, paramText, placeRows, routeProbe, type Probe, type ShardRouting, type ShardRows } from './sharded.ts';
import { ACCESSIBLE_SQL, openApiDocument, type Accessible } from './openapi.ts';
import { bodySql, findFunction, findTable, ident, isSingular, qualified, QueryBuilder, RESPONSE_SETTINGS, responseSql, type Media } from './sql.ts';

export interface RestConfig {
  /** Exposed schemas; the first is the default profile. */
  schemas: string[];
  anonRole?: string;
  jwtSecret?: string;
  /**
   * PostgREST's db-pre-request: a function (`schema.name` or `name`) called in
   * each request's transaction after its role and settings, before its statement;
   * what it raises is the response.
   */
  preRequest?: string;
}

export interface RestRequest {
  method: string;
  /** The path after the database prefix: `/clients`, `/rpc/add`. */
  path: string;
  /** The path the client used (for Content-Location). */
  fullPath: string;
  query: [string, string][];
  headers: Record<string, string | undefined>;
  /** The raw body (JSON is parsed here, so its errors are PostgREST's); bytes for application/octet-stream. */
  body: string | Buffer | undefined;
}

export interface RestResponse {
  status: number;
  headers: Record<string, string>;
  /** Bytes for a bytea media type handler's result. */
  body: string | Buffer;
  /** An error's code (SQLSTATE or PGRST...): what routing retries on. */
  code?: string;
}

/** A transaction the request runs in: statements in order, then commit or rollback. */
export interface Transaction {
  query(sql: string, params: unknown[]): Promise<Record<string, any>[]>;
  /** Rows as arrays of the text Postgres sent, with the column types (for merging shards' rows). */
  rows(sql: string, params: unknown[]): Promise<ShardRows>;
}

/**
 * Runs `fn` in one transaction on the database: commit when it returns, unless
 * it asks for rollback; rollback when it throws. Without `decideAfter`, the
 * COMMIT may be sent right behind the statements `fn` issues before its first
 * await (pipelined: one round trip); an error in them turns it into a rollback.
 */
export type RunTransaction = <T>(opts: { readOnly: boolean; decideAfter: boolean }, fn: (tx: Transaction) => Promise<{ result: T; rollback: boolean }>) => Promise<T>;

/**
 * One transaction on each shard named, committed (or rolled back) together after `fn`; `on(shard)` is the
 * transaction on any shard, opened and joined to the others when not among them (a lookup table's shard).
 */
export type RunShards = <T>(shards: string[], opts: { readOnly: boolean },
  fn: (txs: Transaction[], on: (shard: string) => Promise<Transaction>) => Promise<{ result: T; rollback: boolean }>) => Promise<T>;

/** Where a request runs: one database, or the shards of a sharded one. */
export interface RestTarget {
  run: RunTransaction;
  runShards: RunShards;
  /** The sharded planner and key ranges when the database is sharded. */
  sharding(): ShardRouting | undefined;
}

const JSON_TYPE = 'application/json; charset=utf-8';
const OBJECT_TYPE = 'application/vnd.pgrst.object+json; charset=utf-8';

export function errorResponse(err: RestError, extra: Record<string, string> = {}): RestResponse {
  return { status: err.status, headers: { 'Content-Type': JSON_TYPE, ...extra, ...err.headers }, body: err.body(), code: err.code };
}

/** Query string, sorted and encoded the way PostgREST's Content-Location has it. */
function contentLocation(fullPath: string, query: [string, string][]): string {
  const enc = (s: string) => encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
  // a repeated key appears once, its values joined by commas
  const byKey = new Map<string, string[]>();
  for (const [k, v] of query) byKey.set(k, [...(byKey.get(k) ?? []), v]);
  const sorted = [...byKey.entries()].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  return sorted.length ? `${fullPath}?${sorted.map(([k, v]) => `${enc(k)}=${v.map(enc).join(',')}`).join('&')}` : fullPath;
}

function contentRange(offset: number, pageTotal: number, total: number | null): string {
  const t = total === null ? '*' : String(total);
  return pageTotal > 0 ? `${offset}-${offset + pageTotal - 1}/${t}` : `*/${t}`;
}

function profile(req: RestRequest, config: RestConfig): string {
  const write = !['GET', 'HEAD'].includes(req.method);
  const asked = write ? req.headers['content-profile'] : req.headers['accept-profile'];
  if (asked === undefined) return config.schemas[0];
  if (!config.schemas.includes(asked)) {
    throw new RestError(406, 'PGRST106', `The schema must be one of the following: ${config.schemas.join(', ')}`);
  }
  return asked;
}

const CONTENT_TYPES: Record<Media | 'openapi', string> = {
  json: JSON_TYPE, object: OBJECT_TYPE, csv: 'text/csv; charset=utf-8', openapi: 'application/openapi+json; charset=utf-8',
  'json-stripped': 'application/vnd.pgrst.array+json;nulls=stripped; charset=utf-8', 'object-stripped': 'application/vnd.pgrst.object+json;nulls=stripped; charset=utf-8',
};
const ACCEPTED: Record<string, Media | 'openapi'> = {
  'application/json': 'json', 'application/vnd.pgrst.array+json': 'json', 'application/vnd.pgrst.array': 'json',
  'application/vnd.pgrst.object+json': 'object', 'application/vnd.pgrst.object': 'object',
  'text/csv': 'csv', 'application/openapi+json': 'openapi',
};
/** PostgREST's own array and object types take `nulls=stripped` (`application/json` does not). */
const STRIPPED: Record<string, Media> = {
  'application/vnd.pgrst.array+json': 'json-stripped', 'application/vnd.pgrst.array': 'json-stripped',
  'application/vnd.pgrst.object+json': 'object-stripped', 'application/vnd.pgrst.object': 'object-stripped',
};

/** A media type a PostgREST 12 media type handler writes the result in (`text/html`): the body is its value as it is. */
interface Raw { raw: string }

/**
 * The response's media type: the client's most preferred (Accept, with
 * q-values) among those the resource offers; `*​/*` or no Accept takes the
 * first offered. `raw`: the types the resource's media type handlers write.
 * Media type parameters count only before `q` (after it they are accept-extensions).
 */
function responseMedia<M extends Media | 'openapi'>(req: RestRequest, offered: M[]): M;
function responseMedia<M extends Media | 'openapi'>(req: RestRequest, offered: M[], raw: string[]): M | Raw;
function responseMedia<M extends Media | 'openapi'>(req: RestRequest, offered: M[], raw: string[] = []): M | Raw {
  const ranges = (req.headers.accept ?? '').split(',').map((part, i) => {
    const [type, ...params] = part.split(';').map((x) => x.trim());
    const qAt = params.findIndex((x) => x.startsWith('q='));
    const own = qAt < 0 ? params : params.slice(0, qAt);
    // case-sensitive, as in PostgREST (`TEXT/CSV` is 415)
    return { type, q: qAt < 0 ? 1 : Number(params[qAt].slice(2)), stripped: own.includes('nulls=stripped'), i };
  }).filter((r) => r.type !== '' && !(r.q <= 0)).sort((a, b) => b.q - a.q || a.i - b.i);
  if (!ranges.length) return offered[0];
  for (const r of ranges) {
    if (r.type !== '*/*' && raw.includes(r.type)) return { raw: r.type };
    const media = r.type === '*/*' ? offered[0] : (r.stripped && STRIPPED[r.type]) || ACCEPTED[r.type];
    if (media !== undefined && offered.includes(media as M)) return media as M;
  }
  throw new RestError(415, 'PGRST107', `None of these media types are available: ${ranges.map((r) => r.type).join(', ')}`);
}

const TABLE_MEDIA: Media[] = ['json', 'object', 'json-stripped', 'object-stripped', 'csv'];

/** The media type of a table's rows: ours, or one of the table's handler aggregates (`raw`). */
function tableMedia(req: RestRequest, cache: SchemaCache, table: Table): { media: Media; raw?: MediaAggregate } {
  const aggregates = cache.mediaAggregates.get(tableKey(table.schema, table.name)) ?? [];
  const chosen = responseMedia(req, TABLE_MEDIA, aggregates.map((a) => a.type));
  return typeof chosen === 'object' ? { media: 'json', raw: aggregates.find((a) => a.type === chosen.raw) } : { media: chosen };
}
/** The media type of a write's response (return=representation). */
const writeMedia = (req: RestRequest) => responseMedia(req, TABLE_MEDIA);

/**
 * The payload: JSON, or CSV as PostgREST reads it (a header line of column
 * names, every value a string but `NULL`, which is null). `single`: PATCH and
 * PUT take the first CSV row.
 */
function parseBody(req: RestRequest, single = false): unknown {
  const type = (req.headers['content-type'] ?? 'application/json').split(';')[0].trim().toLowerCase();
  if (type === 'text/csv') {
    const [header, ...records] = parseCsv(String(req.body ?? ''));
    if (!header) throw new RestError(400, 'PGRST102', 'parse error (not enough input) at ""');
    const rows = records.map((r) => Object.fromEntries(header.map((h, i) => [h, r[i] === undefined || r[i] === 'NULL' ? null : r[i]])));
    return single ? rows[0] ?? {} : rows;
  }
  // a form is one object of strings
  if (type === 'application/x-www-form-urlencoded') return Object.fromEntries(new URLSearchParams(String(req.body ?? '')));
  if (type !== 'application/json') {
    throw new RestError(415, 'PGRST107', `None of these media types are available: ${type}`);
  }
  try {
    return JSON.parse(String(req.body ?? ''));
  } catch {
    throw new RestError(400, 'PGRST102', 'Empty or invalid json');
  }
}

/** Applied preferences, in PostgREST's order. */
function preferenceApplied(p: Prefer, keys: (keyof Prefer)[]): Record<string, string> {
  const applied = keys.filter((k) => p[k] !== undefined).map((k) => `${k}=${p[k]}`);
  return applied.length ? { 'Preference-Applied': applied.join(', ') } : {};
}

interface ResponseRow {
  total: string | null; page_total: string; body: string; location?: string | null; inserted?: string;
  response_headers?: string | null; response_status?: string | null;
}

/** What functions set in `response.headers` (an array of one-key objects) and `response.status` overrides the response, as in PostgREST. */
function withResponseSettings(res: RestResponse, row: ResponseRow): RestResponse {
  if (row.response_headers) {
    let extra: unknown;
    try {
      extra = JSON.parse(row.response_headers);
    } catch { /* reported below */ }
    const valid = Array.isArray(extra) && extra.every((h) => typeof h === 'object' && h !== null && Object.keys(h).length === 1 && typeof Object.values(h)[0] === 'string');
    if (!valid) throw new RestError(500, 'PGRST111', 'response.headers guc must be a JSON array composed of objects with a single key and a string value');
    res = { ...res, headers: { ...res.headers, ...Object.assign({}, ...(extra as Record<string, string>[])) } };
  }
  if (row.response_status) {
    const status = /^\d{3}$/.test(row.response_status.trim()) ? Number(row.response_status) : NaN;
    if (!(status >= 100 && status <= 599)) throw new RestError(500, 'PGRST112', 'response.status guc must be a valid status code');
    res = { ...res, status };
  }
  return res;
}

interface Plan {
  sql: string;
  params: unknown[];
  readOnly: boolean;
  /** Whether commit or rollback depends on the result (a singular response must have one row). */
  decideAfter: boolean;
  /** Turns the statement's one row into the response (or throws a RestError, which rolls back). */
  respond(row: ResponseRow): RestResponse;
  /** On a sharded database: how the planner routes the request, and how the shards' answers merge. */
  sharded?: ShardedPlan;
}

interface OwnedRows { select(columns: string[]): { sql: string; params: unknown[] }; payload?: Record<string, unknown> }

type ShardedPlan =
  /** `sql` reads rows for the merge (QueryBuilder.shardRows). */
  | { kind: 'read'; probe: Probe; top: string; merge: Merge; counted: boolean; media: Media }
  /**
   * `sql` runs as it is on the shards the probe routes to. `owned`: for a table owning lookup vindexes, the rows
   * the request's filters match (`columns` as text, locked) and a PATCH's new values, to keep the lookup rows in step.
   */
  | { kind: 'write'; probe: Probe; top: string; media: Media; owned?: OwnedRows }
  /** `sql` runs on each shard with the rows placed there in parameter `rowsParam` (0-based). */
  | { kind: 'insert'; probe: Probe; rows: Array<Record<string, unknown>>; cols: string[]; rowsParam: number; media: Media };

export async function handleRest(req: RestRequest, cache: SchemaCache, config: RestConfig, target: RestTarget): Promise<RestResponse> {
  let auth: Auth | undefined;
  try {
    auth = authenticate(req.headers.authorization, { secret: config.jwtSecret, anonRole: config.anonRole });
    const schema = profile(req, config);
    const sharding = target.sharding();
    const plan = planRequest(req, cache, schema, sharding !== undefined);
    const prefer = parsePrefer(req.headers.prefer);
    const settings = `SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true), set_config('request.method', $3, true), set_config('request.path', $4, true), set_config('request.headers', $5, true)`;
    const headers = Object.fromEntries(Object.entries(req.headers).filter(([k]) => k !== 'authorization'));
    const a = auth;
    const rollback = prefer.tx === 'rollback';
    const preRequest = config.preRequest === undefined ? undefined : `SELECT ${config.preRequest.split('.').map(ident).join('.')}()`;
    // sent at once (pipelined); a failed set_config (an unknown role) or pre-request fails the statements behind it too, and is reported
    const prelude = (tx: Transaction) => [
      tx.query(settings, [a.role, JSON.stringify(a.claims), req.method, req.fullPath, JSON.stringify(headers)]),
      ...(preRequest ? [tx.query(preRequest, [])] : []),
    ];
    if (sharding) return await runSharded(plan, sharding, target.runShards, prelude, rollback);
    return await target.run({ readOnly: plan.readOnly, decideAfter: plan.decideAfter || rollback }, async (tx) => {
      const [row] = await lastAfter(prelude(tx), tx.query(plan.sql, plan.params));
      const result = withResponseSettings(plan.respond(row as ResponseRow), row as ResponseRow);
      return { result, rollback };
    });
  } catch (err) {
    if (err instanceof RestError) return errorResponse(err);
    if (isDatabaseError(err)) return errorResponse(fromDatabaseError(err, auth?.authenticated ?? false));
    throw err;
  }
}

/** `last`'s result once every statement before it succeeded; else the first one's error, in the order they were sent. */
async function lastAfter<T>(before: Promise<unknown>[], last: Promise<T>): Promise<T> {
  const settled = await Promise.allSettled([...before, last]);
  const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
  return (settled[settled.length - 1] as PromiseFulfilledResult<T>).value;
}

/**
 * A request on a sharded database: routed by the planner from the plan's
 * probe, run on each shard it names in one transaction per shard, answers
 * merged. One shard's answer is the response as it is.
 */
async function runSharded(plan: Plan, routing: ShardRouting, runShards: RunShards, prelude: (tx: Transaction) => Promise<unknown>[], rollback: boolean): Promise<RestResponse> {
  const s = plan.sharded;
  if (!s) throw new RestError(501, '0A000', 'this request is not supported on a sharded database');
  const opts = { readOnly: plan.readOnly };
  // Lookup tables are the gateway's (as in the wire protocol): read and written as its user, never under the request's role.
  const textRows = (r: ShardRows): TextRow[] => r.rows.map((row) => row.map((v) => (v === null ? null : Buffer.from(v))));
  const lookupReads: LookupAccess = {
    ranges: routing.ranges,
    run: (shard, sql, params) => runShards([shard], { readOnly: true }, async ([tx]) => ({ result: textRows(await tx.rows(sql, params)), rollback: false })),
  };
  if (s.kind === 'read') {
    const { shards } = await routeProbe(routing, s.probe, s.top, lookupReads);
    return runShards(shards, opts, async (txs) => {
      const parts = await Promise.all(txs.map((tx) => lastAfter(prelude(tx), tx.rows(plan.sql, plan.params))));
      return { result: plan.respond(mergeReads(parts, s.merge, s.counted, s.media)), rollback };
    });
  }
  let shards: string[];
  let params: unknown[][];
  let order: number[][] | undefined;
  let replicated = false;
  let owns: LookupVindex[] | undefined;
  const placed = s.kind === 'insert' ? placeRows(routing, s.probe, s.rows, s.cols) : undefined;
  if (s.kind === 'insert' && placed && s.rows.length) {
    const byShard = new Map<string, number[]>();
    placed.shards.forEach((shard, i) => byShard.set(shard, [...(byShard.get(shard) ?? []), i]));
    shards = routing.ranges.map((r) => r.shard).filter((shard) => byShard.has(shard));
    order = shards.map((shard) => byShard.get(shard)!);
    params = order.map((rows) => plan.params.map((p, i) => (i === s.rowsParam ? JSON.stringify(rows.map((r) => s.rows[r])) : p)));
  } else {
    if (s.kind === 'insert') {
      // a reference table (every shard writes every row), or no rows (any shard answers)
      replicated = placed === undefined;
      shards = replicated ? routing.ranges.map((r) => r.shard) : [routing.ranges[0].shard];
    } else {
      ({ shards, owns } = await routeProbe(routing, s.probe, s.top, lookupReads));
      replicated = routing.vschema?.tables[s.top]?.type === 'reference';
    }
    params = shards.map(() => plan.params);
  }
  const owned = owns && s.kind === 'write' ? s.owned : undefined;
  // the owner rows the request changes, locked, with their lookup columns before the change
  const lockOwned = owned?.select([owns![0].primary.column, ...owns!.map((l) => l.column)]);
  return runShards(shards, opts, async (txs, on) => {
    // Lookup rows are written in the request's transaction (their shards join it), as the gateway's user: on a
    // shard where the request's role is set by then, the role is reset first (nothing of the request runs after).
    const roled = new Set<Transaction>();
    const resets = new Map<Transaction, Promise<unknown>>();
    const lookupWrites: LookupAccess = {
      ranges: routing.ranges,
      run: async (shard, sql, params) => {
        const tx = await on(shard);
        if (roled.has(tx)) {
          if (!resets.has(tx)) resets.set(tx, tx.query('RESET ROLE', []));
          await resets.get(tx);
        }
        return textRows(await tx.rows(sql, params));
      },
    };
    await placed?.writeLookups?.(lookupWrites); // an insert's first: a duplicate is the lookup's error
    const lockedRows: TextRow[] = [];
    const rows = await Promise.all(txs.map(async (tx, i) => {
      roled.add(tx);
      if (!lockOwned) return (await lastAfter(prelude(tx), tx.query(plan.sql, params[i])))[0];
      lockedRows.push(...textRows(await lastAfter(prelude(tx), tx.rows(lockOwned.sql, lockOwned.params))));
      return (await tx.query(plan.sql, params[i]))[0];
    }));
    if (owned) {
      const newValues = owned.payload && owns!.map((l) => ({ literal: paramText(owned.payload![l.column]) }));
      await moveLookupRows({ lookups: owns!, newValues }, lockedRows, undefined, lookupWrites);
    }
    const row = rows.length === 1 || replicated ? rows[0] : mergeWrites(rows, s.media, order);
    return { result: plan.respond(row as ResponseRow), rollback };
  });
}

function planRequest(req: RestRequest, cache: SchemaCache, schema: string, sharded: boolean): Plan {
  // Postgres text cannot hold NUL; refuse it here rather than fail the protocol
  if (req.query.some(([k, v]) => k.includes('\u0000') || v.includes('\u0000')) || req.path.includes('\u0000')) {
    throw new RestError(400, 'PGRST100', 'Request contains a NUL byte', 'Postgres text values cannot contain NUL (\\u0000)');
  }
  const segments = req.path.split('/').filter(Boolean).map(decodeURIComponent);
  if (sharded && segments.length === 1) {
    // the gateway merges the shards' rows; a handler aggregate's output cannot be merged, nor CSV written back by
    // several shards (an RPC runs on one shard, whose answer is the response as it is)
    const { media, raw } = tableMedia(req, cache, findTable(cache, schema, segments[0]));
    const refused = raw ? raw.type : media === 'csv' && req.method !== 'GET' && req.method !== 'HEAD' ? 'CSV write' : undefined;
    if (refused) throw new RestError(501, '0A000', `${refused} responses are not supported on a sharded database`);
  }
  if (segments.length === 2 && segments[0] === 'rpc') return planRpc(req, cache, schema, segments[1], sharded);
  if (segments.length === 0 && (req.method === 'GET' || req.method === 'HEAD')) return planOpenApi(req, cache, schema, sharded);
  if (segments.length !== 1) throw new RestError(404, 'PGRST125', `Invalid path specified in request URL`);
  const table = findTable(cache, schema, segments[0]);
  switch (req.method) {
    case 'GET': case 'HEAD': return planRead(req, cache, table, sharded);
    case 'POST': return planInsert(req, cache, table, sharded);
    case 'PATCH': return planUpdate(req, cache, table, sharded);
    case 'DELETE': return planDelete(req, cache, table, sharded);
    case 'PUT': return planPut(req, cache, table, sharded);
    default: throw new RestError(405, 'PGRST117', `Unsupported HTTP method: ${req.method}`);
  }
}

/** The OpenAPI document of the schema, listing what the request's role may use (on a sharded database: the first shard's privileges). */
function planOpenApi(req: RestRequest, cache: SchemaCache, schema: string, sharded: boolean): Plan {
  const basePath = req.fullPath.replace(/\/+$/, '') || '/';
  responseMedia(req, ['openapi', 'json']); // either is answered with the OpenAPI type, as PostgREST does
  return {
    sql: ACCESSIBLE_SQL, params: [schema], readOnly: true, decideAfter: false,
    sharded: sharded ? { kind: 'write', probe: { sql: 'SELECT 1', params: [] }, top: '', media: 'json' } : undefined,
    respond(row) {
      const doc = openApiDocument(cache, schema, JSON.parse(row.body) as Accessible, req.headers.host ?? '', basePath);
      return { status: 200, headers: { 'Content-Type': CONTENT_TYPES.openapi }, body: req.method === 'HEAD' ? '' : doc };
    },
  };
}

function planRead(req: RestRequest, cache: SchemaCache, table: Table, sharded: boolean): Plan {
  const q = parseQuery(req.query);
  const prefer = parsePrefer(req.headers.prefer);
  const top = q.nodes.get('')!;
  const range = parseRange(req.headers.range);
  const offset = top.offset ?? range?.offset ?? 0;
  const limit = minDefined(top.limit, range?.limit);
  const { media, raw } = tableMedia(req, cache, table);
  const singular = !raw && isSingular(media);
  const b = new QueryBuilder(cache, q);
  const scope = { table, alias: b.nextAlias('t'), path: '' };
  const count = prefer.count !== undefined;
  const from = `${qualified(table)} AS ${ident(scope.alias)}`;
  let sql: string;
  let shardPlan: ShardedPlan | undefined;
  if (sharded) {
    const r = b.shardRows(scope, from, { limit, offset, count, media });
    sql = r.sql;
    shardPlan = { kind: 'read', probe: new QueryBuilder(cache, q).routingProbe(table, 'SELECT'), top: table.name, merge: r.merge, counted: count, media };
  } else {
    const r = b.read(scope, from, { limit, offset, applyFilters: true, order: true });
    sql = responseSql(r.source, count ? r.count : null, raw ? { aggregate: raw, table } : media);
  }
  return {
    sql, params: b.params.values, readOnly: true, decideAfter: false, sharded: shardPlan,
    respond(row) {
      const pageTotal = Number(row.page_total);
      const total = row.total === null ? null : Number(row.total);
      const applied = preferenceApplied(prefer, ['count']);
      if (total !== null && offset > 0 && offset >= total && pageTotal === 0) {
        throw new RestError(416, 'PGRST103', 'Requested range not satisfiable', `An offset of ${offset} was requested, but there are only ${total} rows.`, null,
          { 'Content-Range': `*/${total}`, 'Content-Location': contentLocation(req.fullPath, req.query), ...applied });
      }
      singularCheck(singular, pageTotal);
      const partial = total !== null && (offset > 0 || offset + pageTotal < total);
      return {
        status: partial ? 206 : 200,
        headers: {
          'Content-Range': contentRange(offset, pageTotal, total), 'Content-Location': contentLocation(req.fullPath, req.query),
          'Content-Type': raw ? rawContentType(raw.type) : CONTENT_TYPES[media], ...applied,
        },
        body: req.method === 'HEAD' ? '' : raw ? rawBody(row) : row.body,
      };
    },
  };
}

const minDefined = (a: number | undefined, b: number | undefined) => (a === undefined ? b : b === undefined ? a : Math.min(a, b));

function singularCheck(singular: boolean, rows: number): void {
  if (singular && rows !== 1) {
    throw new RestError(406, 'PGRST116', 'JSON object requested, multiple (or no) rows returned', `The result contains ${rows} rows`, null,
      { 'Content-Type': OBJECT_TYPE });
  }
}

/** Columns a JSON payload writes: its keys (all objects of an array must have the same), or `columns=`. */
function payloadColumns(table: Table, payload: unknown, q: ParsedQuery): string[] {
  const objects = Array.isArray(payload) ? payload : [payload];
  if (!objects.every((o) => typeof o === 'object' && o !== null && !Array.isArray(o))) {
    throw new RestError(400, 'PGRST102', 'Empty or invalid json');
  }
  let cols: string[];
  if (q.columns) cols = q.columns;
  else {
    cols = objects.length ? Object.keys(objects[0] as object) : [];
    const key = [...cols].sort().join('\u0000');
    if (objects.some((o) => Object.keys(o as object).sort().join('\u0000') !== key)) throw new RestError(400, 'PGRST102', 'All object keys must match');
  }
  for (const c of cols) {
    if (!table.columns.has(c)) throw new RestError(400, 'PGRST204', `Column '${c}' of relation '${table.name}' does not exist`);
  }
  return cols;
}

/** The rows written, read back through the request's select (return=representation) into the response row. */
function mutationPlan(req: RestRequest, cache: SchemaCache, table: Table, q: ParsedQuery, write: (b: QueryBuilder, alias: string) => string, kind: 'insert' | 'put' | 'update' | 'delete'): Plan {
  const prefer = parsePrefer(req.headers.prefer);
  const { media, raw } = tableMedia(req, cache, table);
  const singular = !raw && isSingular(media);
  const b = new QueryBuilder(cache, q);
  const alias = b.nextAlias('t');
  const mutation = write(b, alias);
  const returning = prefer.return === 'representation';
  const upsert = kind === 'put' || (kind === 'insert' && prefer.resolution === 'merge-duplicates');
  const pk = table.primaryKey;
  const location = kind === 'insert' && prefer.return === 'headers-only' && pk.length
    ? `, (SELECT json_build_array(${pk.map((c) => `${ident(c)}::text`).join(', ')})::text FROM pgrst_written LIMIT 1) AS location` : '';
  // The written rows' columns are returned only when the response shows them: RETURNING needs SELECT on
  // them, and a role allowed to INSERT into a table it may not read (return=minimal) writes as with PostgREST.
  const returned = returning || location ? `${ident(alias)}.*, ` : '';
  let body = 'NULL';
  let source = '';
  if (returning) {
    const readScope = { table, alias: b.nextAlias('t'), path: '' };
    const tableColumns = table.columnOrder.map(ident).join(', ');
    const read = b.read(readScope, `(SELECT ${tableColumns} FROM pgrst_written) AS ${ident(readScope.alias)}`, { applyFilters: false, order: kind !== 'insert' });
    source = `, pgrst_source AS (${read.source})`;
    body = `(SELECT ${bodySql(raw ? { aggregate: raw, table } : media)} FROM pgrst_source _postgrest_t)`;
  }
  const sql = `WITH pgrst_written AS (${mutation} RETURNING ${returned}${upsert ? insertedSql(table, q, alias) : 'true'} AS pgrst_inserted)${source}`
    + ` SELECT ${prefer.count ? '(SELECT pg_catalog.count(*) FROM pgrst_written)' : 'NULL::bigint'} AS total,`
    + ` (SELECT pg_catalog.count(*) FROM pgrst_written) AS page_total, (SELECT pg_catalog.count(*) FROM pgrst_written WHERE pgrst_inserted) AS inserted,`
    + ` ${body} AS body${location}${RESPONSE_SETTINGS}`;
  return {
    sql, params: b.params.values, readOnly: false, decideAfter: singular,
    respond(row) {
      const n = Number(row.page_total);
      const total = row.total === null ? null : Number(row.total);
      singularCheck(singular, n);
      const insertStatus = upsert && Number(row.inserted) === 0 ? 200 : 201;
      const headers: Record<string, string> = {
        ...(kind === 'put' ? {} : { 'Content-Range': kind === 'update' ? contentRange(0, n, total) : `*/${total ?? '*'}` }),
        ...preferenceApplied(prefer, ['resolution', 'missing', 'return', 'count', 'tx']),
      };
      if (row.location && n === 1) {
        const values = JSON.parse(row.location) as string[];
        headers.Location = `${req.fullPath}?${pk.map((c, i) => `${encodeURIComponent(c)}=eq.${encodeURIComponent(values[i])}`).join('&')}`;
      }
      if (returning) {
        headers['Content-Type'] = raw ? rawContentType(raw.type) : CONTENT_TYPES[media];
        return { status: kind === 'insert' || kind === 'put' ? insertStatus : 200, headers, body: raw ? rawBody(row) : row.body };
      }
      return { status: kind === 'insert' ? insertStatus : 204, headers, body: '' };
    },
  };
}

/**
 * Whether an upserted row was inserted rather than updated (201 or 200): a table's new row has xmax = 0; a view has
 * no system columns, so its row was inserted when the statement's snapshot, which does not see its own writes, has
 * no row with that conflict key.
 */
function insertedSql(table: Table, q: ParsedQuery, alias: string): string {
  if (table.kind === 'table') return `${ident(alias)}.xmax = 0`;
  const before = conflictTarget(table, q).map((c) => `pgrst_before.${ident(c)} = ${ident(alias)}.${ident(c)}`).join(' AND ');
  return `NOT EXISTS (SELECT FROM ${qualified(table)} AS pgrst_before WHERE ${before})`;
}

/** The columns an upsert's ON CONFLICT names: on_conflict=, else the primary key (a view's inferred one). */
const conflictTarget = (table: Table, q: ParsedQuery) => q.onConflict ?? table.primaryKey;

/** PUT: an upsert of the one row its primary-key filters name. */
function planPut(req: RestRequest, cache: SchemaCache, table: Table, sharded: boolean): Plan {
  const q = parseQuery(req.query);
  const where = q.nodes.get('')!.where;
  const pk = table.primaryKey;
  const eqs = where.filter((c) => c.kind === 'filter' && c.op === 'eq' && !c.negate && !c.field.json.length);
  if (!pk.length || eqs.length !== where.length || eqs.length !== pk.length
    || !pk.every((k) => eqs.some((c) => c.kind === 'filter' && c.field.column === k))) {
    throw new RestError(405, 'PGRST105', 'Filters must include all and only primary key columns with \'eq\' operators');
  }
  const payload = parseBody(req, true);
  if (Array.isArray(payload)) throw new RestError(400, 'PGRST102', 'Expected a single JSON object in the PUT request body');
  const cols = payloadColumns(table, payload, q);
  const filterValue = (k: string) => eqs.find((c) => c.kind === 'filter' && c.field.column === k)!;
  for (const k of pk) {
    const v = (payload as Record<string, unknown>)[k];
    const f = filterValue(k);
    if (v === undefined || (f.kind === 'filter' && String(v) !== f.value)) {
      throw new RestError(400, 'PGRST115', 'Payload values do not match URL in primary key column(s)');
    }
  }
  q.nodes.get('')!.where = [];
  return planInsert(req, cache, table, sharded, { q, payload, cols, resolution: 'merge-duplicates' });
}

function planInsert(req: RestRequest, cache: SchemaCache, table: Table, sharded: boolean, put?: { q: ParsedQuery; payload: unknown; cols: string[]; resolution: 'merge-duplicates' }): Plan {
  const q = put?.q ?? parseQuery(req.query);
  const payload = put ? put.payload : parseBody(req);
  const cols = put?.cols ?? payloadColumns(table, payload, q);
  const prefer = parsePrefer(req.headers.prefer);
  const resolution = put?.resolution ?? prefer.resolution;
  const objects = (Array.isArray(payload) ? payload : [payload]) as Array<Record<string, unknown>>;
  const list = cols.map((c) => ident(c)).join(', ');
  let conflict = '';
  let rowsParam = -1;
  const plan = mutationPlan(req, cache, table, q, (b, alias) => {
    rowsParam = b.params.values.length;
    // no columns: every column takes its default, as in PostgREST
    const rows = b.params.add(JSON.stringify(objects));
    // missing=default: a key a row lacks takes the column's default (per row), not NULL
    const source = prefer.missing === 'default'
      ? `SELECT ${cols.map((c) => withDefault(b, table, c, 'pgrst_e.v')).join(', ')} FROM json_array_elements(${rows}::json) pgrst_e(v), LATERAL json_populate_record(NULL::${qualified(table)}, pgrst_e.v) _`
      : `SELECT ${list} FROM json_populate_recordset(NULL::${qualified(table)}, ${rows}::json) _`;
    const sql = `INSERT INTO ${qualified(table)} AS ${ident(alias)}${cols.length ? ` (${list})` : ''} ${source}`;
    if (resolution) {
      const target = conflictTarget(table, q);
      if (!target.length) throw new RestError(400, 'PGRST103', 'on_conflict needs a primary key or the on_conflict parameter');
      for (const c of target) b.column(table, c);
      const updates = cols.filter((c) => !target.includes(c));
      conflict = ` ON CONFLICT (${target.map(ident).join(', ')}) ` + (resolution === 'ignore-duplicates' || !updates.length ? 'DO NOTHING'
        : `DO UPDATE SET ${updates.map((c) => `${ident(c)} = EXCLUDED.${ident(c)}`).join(', ')}`);
    } else if (q.onConflict) for (const c of q.onConflict) b.column(table, c);
    return sql + conflict;
  }, put ? 'put' : 'insert');
  if (sharded) {
    // the planner places rows by the primary vindex column's position in the VALUES
    const probe = `INSERT INTO ${qualified(table)}${cols.length ? ` (${list})` : ''} VALUES (${cols.map((_, i) => `$${i + 1}`).join(', ')})${conflict}`;
    plan.sharded = { kind: 'insert', probe: { sql: probe, params: cols.map(() => null) }, rows: objects, cols, rowsParam, media: writeMedia(req) };
  }
  return plan;
}

/** Column `c` of the populated row `_`, or its default when the JSON object `json` lacks the key. */
function withDefault(b: QueryBuilder, table: Table, c: string, json: string): string {
  const def = table.columns.get(c)!.defaultSql;
  return def === null ? `_.${ident(c)}` : `CASE WHEN ${json}::jsonb ? ${b.params.add(c)} THEN _.${ident(c)} ELSE ${def} END`;
}

function planUpdate(req: RestRequest, cache: SchemaCache, table: Table, sharded: boolean): Plan {
  const prefer = parsePrefer(req.headers.prefer);
  const q = parseQuery(req.query);
  const payload = parseBody(req, true);
  if (Array.isArray(payload)) throw new RestError(400, 'PGRST102', 'Empty or invalid json');
  const cols = payloadColumns(table, payload, q);
  const plan = mutationPlan(req, cache, table, q, (b, alias) => {
    // an empty object updates nothing (PostgREST answers 204 without touching a row)
    if (!cols.length) return `UPDATE ${qualified(table)} AS ${ident(alias)} SET ${ident(table.columnOrder[0])} = ${ident(alias)}.${ident(table.columnOrder[0])} WHERE FALSE`;
    const row = b.params.add(JSON.stringify(payload));
    const value = (c: string) => (prefer.missing === 'default' ? withDefault(b, table, c, `${row}::json`) : `_.${ident(c)}`);
    return `UPDATE ${qualified(table)} AS ${ident(alias)} SET ${cols.map((c) => `${ident(c)} = ${value(c)}`).join(', ')}`
      + ` FROM (SELECT * FROM json_populate_record(NULL::${qualified(table)}, ${row}::json)) _${mutationWhere(b, table, alias, q)}`;
  }, 'update');
  return routedWrite(req, cache, table, q, plan, sharded, 'UPDATE', cols, payload as Record<string, unknown>);
}

function planDelete(req: RestRequest, cache: SchemaCache, table: Table, sharded: boolean): Plan {
  const q = parseQuery(req.query);
  const plan = mutationPlan(req, cache, table, q, (b, alias) => {
    return `DELETE FROM ${qualified(table)} AS ${ident(alias)}${mutationWhere(b, table, alias, q)}`;
  }, 'delete');
  return routedWrite(req, cache, table, q, plan, sharded, 'DELETE');
}

/**
 * The WHERE of a PATCH or DELETE: its filters, and with `limit`/`offset` only
 * the rows its `order` puts first (PostgREST's limited update/delete, by ctid;
 * an order is required, PGRST109).
 */
function mutationWhere(b: QueryBuilder, table: Table, alias: string, q: ParsedQuery): string {
  const top = q.nodes.get('')!;
  const scope = { table, alias, path: '' };
  const where = top.where.map((c) => b.condition(scope, c));
  if (top.limit !== undefined || top.offset) {
    if (!top.order.length) throw new RestError(400, 'PGRST109', "A 'limit' was applied without an explicit 'order'", null, "Apply an 'order' using unique column(s)");
    const inner = { table, alias: b.nextAlias('t'), path: '' };
    const conds = top.where.map((c) => b.condition(inner, c));
    where.push(`${ident(alias)}.ctid = ANY(ARRAY(SELECT ${ident(inner.alias)}.ctid FROM ${qualified(table)} AS ${ident(inner.alias)}`
      + `${conds.length ? ` WHERE ${conds.join(' AND ')}` : ''}${b.orderSql(inner, top.order)}${QueryBuilder.limitSql(top.limit, top.offset)}))`);
  }
  return where.length ? ` WHERE ${where.join(' AND ')}` : '';
}

/** PATCH and DELETE on a sharded database run where their filters pin the primary vindex, or on every shard. */
function routedWrite(req: RestRequest, cache: SchemaCache, table: Table, q: ParsedQuery, plan: Plan, sharded: boolean, verb: 'UPDATE' | 'DELETE', cols?: string[],
  payload?: Record<string, unknown>): Plan {
  const top = q.nodes.get('')!;
  // each shard would apply the limit to its own rows
  if (sharded && (top.limit !== undefined || top.offset)) throw new RestError(501, '0A000', `a ${verb === 'UPDATE' ? 'PATCH' : 'DELETE'} with limit/offset on a sharded database`);
  if (!sharded) return plan;
  const select = (columns: string[]) => {
    const b = new QueryBuilder(cache, q);
    const alias = b.nextAlias('t');
    const list = columns.map((c) => `${ident(alias)}.${ident(c)}::text`).join(', ');
    return { sql: `SELECT ${list} FROM ${qualified(table)} AS ${ident(alias)}${mutationWhere(b, table, alias, q)} FOR UPDATE`, params: b.params.values };
  };
  plan.sharded = { kind: 'write', probe: new QueryBuilder(cache, q).routingProbe(table, verb, cols), top: table.name, media: writeMedia(req), owned: { select, payload } };
  return plan;
}

function planRpc(req: RestRequest, cache: SchemaCache, schema: string, name: string, sharded: boolean): Plan {
  if (!['GET', 'HEAD', 'POST'].includes(req.method)) throw new RestError(405, 'PGRST101', 'Only GET and POST are allowed for RPC');
  const prefer = parsePrefer(req.headers.prefer);
  const singleObject = prefer.params === 'single-object';
  const unnamed = req.method === 'POST' && !singleObject ? unnamedParameterCall(req, cache, schema, name) : undefined;
  let args: Record<string, unknown> = {}; // none by name when the body is the unnamed argument
  if (req.method !== 'POST') {
    const names = new Set(cache.functions.filter((f) => f.schema === schema && f.name === name).flatMap((f) => f.args.map((a) => a.name)));
    args = Object.fromEntries(req.query.filter(([k, v]) => names.has(k) || !isQueryKeyword(k, v)));
  } else if (!unnamed && !singleObject) {
    const body = req.body === undefined || req.body === '' ? {} : parseBody(req);
    if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new RestError(400, 'PGRST102', 'Empty or invalid json');
    args = body as Record<string, unknown>;
  }
  const fn = singleObject ? singleObjectFunction(cache, schema, name) : unnamed ?? findFunction(cache, schema, name, Object.keys(args), req.method === 'POST');
  // the one argument the whole body (or with params=single-object, the query string's arguments) is
  const whole = singleObject ? (req.method === 'POST' ? singleObjectBody(req) : JSON.stringify(args)) : unnamed ? req.body ?? '' : undefined;
  const q = parseQuery(req.query, new Set(req.method === 'POST' ? [] : Object.keys(args)));
  const b = new QueryBuilder(cache, q);
  const given = whole === undefined ? fn.args.filter((a) => a.name in args) : [];
  const record = given.length
    ? `json_to_record(${b.params.add(JSON.stringify(args))}::json) AS _(${given.map((a) => `${ident(a.name)} ${a.type}`).join(', ')})` : '';
  const call = whole !== undefined ? `${qualified(fn)}(${b.params.add(whole)}::${fn.args[0].type})`
    : `${qualified(fn)}(${given.map((a) => `${ident(a.name)} := _.${ident(a.name)}`).join(', ')})`;
  const table = fn.returnsTable ? cache.tables.get(`${fn.returnsTable.schema}\u0000${fn.returnsTable.name}`) : undefined;
  // media type handlers: a function's own result type, or an aggregate of the rows it returns; `*/*` answers whatever is asked
  const handler = fn.returnsSet ? null : fn.mediaType;
  const aggregates = table ? cache.mediaAggregates.get(tableKey(table.schema, table.name)) ?? [] : [];
  const chosen = handler?.type === '*/*' ? { raw: '*/*' } : responseMedia(req, TABLE_MEDIA, handler ? [handler.type] : aggregates.map((a) => a.type));
  const raw = typeof chosen === 'object' ? chosen.raw : undefined;
  const media = typeof chosen === 'object' ? 'json' : chosen;
  const singular = !raw && isSingular(media);
  const readOnly = req.method !== 'POST';
  const top = q.nodes.get('')!;
  let sql: string;
  if (raw && handler) {
    // a media type handler's result is the body as it is (bytes for a bytea domain; NULL is empty)
    sql = `SELECT ${prefer.count ? '1::bigint' : 'NULL::bigint'} AS total, 1 AS page_total, ${call}::${handler.binary ? 'bytea' : 'text'} AS body${RESPONSE_SETTINGS} FROM (SELECT 1) _one${record ? `, ${record}` : ''}`;
  } else if (table) {
    const scope = { table, alias: b.nextAlias('t'), path: '' };
    const from = record ? `${record}, LATERAL ${call} AS ${ident(scope.alias)}` : `${call} AS ${ident(scope.alias)}`;
    const r = b.read(scope, from, { limit: top.limit, offset: top.offset, applyFilters: true, order: true });
    const aggregate = aggregates.find((a) => a.type === raw);
    sql = responseSql(r.source, prefer.count !== undefined ? r.count : null, aggregate ? { aggregate, table } : fn.returnsSet ? media : asObject(media));
  } else {
    if (q.nodes.size > 1 || top.where.length || top.order.length) throw new RestError(400, 'PGRST100', `"failed to parse filter" (line 1, column 1)`, 'filters apply only to functions that return rows');
    const rows = fn.returnsSet ? `${record ? `${record}, ` : ''}LATERAL ${call} pgrst_v` : `(SELECT 1) _one${record ? `, ${record}` : ''}`;
    const total = prefer.count ? 'pg_catalog.count(*)' : null;
    if (media === 'csv') {
      // PostgREST's CSV of a scalar result: one column named pgrst_scalar
      sql = responseSql(`SELECT ${fn.returnsSet ? 'pgrst_v' : call} AS pgrst_scalar FROM ${rows}`, total, 'csv');
    } else {
      const value = fn.returnType === 'void' ? `(SELECT NULL::json FROM (SELECT ${call}) _void)` : `to_json(${call})`;
      const values = media.endsWith('-stripped') ? 'json_strip_nulls(json_agg(_postgrest_t.v))' : 'json_agg(_postgrest_t.v)';
      const body = fn.returnsSet ? `coalesce(${values}, '[]')::text` : `coalesce((${values}->0)::text, 'null')`;
      sql = `SELECT ${total ?? 'NULL::bigint'} AS total, pg_catalog.count(*) AS page_total, ${body} AS body${RESPONSE_SETTINGS} FROM (SELECT ${fn.returnsSet ? 'to_json(pgrst_v)' : value} AS v FROM ${rows}) _postgrest_t`;
    }
  }
  return {
    sql, params: b.params.values, readOnly, decideAfter: singular && !readOnly,
    sharded: sharded ? { kind: 'write', probe: rpcProbe(fn, args), top: '', media } : undefined,
    respond(row): RestResponse {
      const pageTotal = Number(row.page_total);
      if (singular) singularCheck(true, pageTotal);
      const range = contentRange(0, pageTotal, row.total === null ? null : Number(row.total));
      const applied = preferenceApplied(prefer, ['params', 'count']);
      if (fn.returnType === 'void') return { status: 204, headers: { 'Content-Range': range, ...applied }, body: '' };
      return {
        status: 200,
        headers: { 'Content-Range': range, 'Content-Type': raw ? rawContentType(raw) : CONTENT_TYPES[media], ...applied },
        body: req.method === 'HEAD' ? '' : raw ? rawBody(row) : row.body,
      };
    },
  };
}

/** A scalar or single-row result is one JSON value, not an array. */
const asObject = (media: Media): Media => (media === 'json' ? 'object' : media === 'json-stripped' ? 'object-stripped' : media);

/** PostgREST names the charset of its own text types, not of the others; `*​/*` is bytes. */
const rawContentType = (type: string) => (type === 'text/plain' || type === 'text/xml' ? `${type}; charset=utf-8` : type === '*/*' ? 'application/octet-stream' : type);

/** A handler's body goes out as bytes (NULL is empty), so that the HTTP server adds no charset to its type. */
const rawBody = (row: ResponseRow) => Buffer.from((row.body as string | Buffer | null) ?? '');

/** The function `Prefer: params=single-object` calls: one json or jsonb parameter, named or not. */
function singleObjectFunction(cache: SchemaCache, schema: string, name: string): RestFunction {
  const fn = cache.functions.find((f) => f.schema === schema && f.name === name && f.args.length === 1 && ['json', 'jsonb'].includes(f.args[0].type));
  if (!fn) {
    throw new RestError(404, 'PGRST202', `Could not find the function ${schema}.${name} in the schema cache`,
      `Searched for the function ${schema}.${name} with a single json/jsonb parameter, but no matches were found in the schema cache.`);
  }
  return fn;
}

/**
 * The body as the single object argument, as PostgREST 12 passes it: JSON as
 * sent (an array must hold objects with the same keys; any other value than an
 * object or array is `[]`), CSV as an array of objects, a form as an object,
 * other types as sent.
 */
function singleObjectBody(req: RestRequest): string {
  const type = (req.headers['content-type'] ?? 'application/json').split(';')[0].trim().toLowerCase();
  const raw = String(req.body ?? '');
  if (type === 'text/csv' || type === 'application/x-www-form-urlencoded') return JSON.stringify(parseBody(req));
  if (type !== 'application/json' || raw === '') return raw;
  const json = parseBody(req);
  const keys = (o: unknown) => (typeof o === 'object' && o !== null && !Array.isArray(o) ? Object.keys(o).sort().join('\u0000') : undefined);
  if (Array.isArray(json)) {
    if (json.length && (keys(json[0]) === undefined || json.some((o) => keys(o) !== keys(json[0])))) throw new RestError(400, 'PGRST102', 'All object keys must match');
    return raw;
  }
  return keys(json) === undefined ? '[]' : raw;
}

/** The one parameter type a function takes the whole body as, by the body's Content-Type. */
const UNNAMED_PARAMETER: Record<string, { types: string[]; label: string }> = {
  'application/json': { types: ['json', 'jsonb'], label: 'json/jsonb' }, 'text/plain': { types: ['text'], label: 'text' },
  'text/xml': { types: ['xml'], label: 'xml' }, 'application/octet-stream': { types: ['bytea'], label: 'bytea' },
};

/**
 * POST /rpc/fn to a function with a single unnamed json/jsonb, text, xml or
 * bytea parameter: the body, as sent, is its argument. Any other body than
 * JSON must find such a function (PGRST202 otherwise).
 */
function unnamedParameterCall(req: RestRequest, cache: SchemaCache, schema: string, name: string): RestFunction | undefined {
  const type = (req.headers['content-type'] ?? 'application/json').split(';')[0].trim().toLowerCase();
  const wanted = UNNAMED_PARAMETER[type];
  if (!wanted) return undefined;
  const fn = cache.functions.find((f) => f.schema === schema && f.name === name && f.args.length === 1 && f.args[0].name === '' && wanted.types.includes(f.args[0].type));
  if (!fn && type !== 'application/json') {
    throw new RestError(404, 'PGRST202', `Could not find the function ${schema}.${name} in the schema cache`,
      `Searched for the function ${schema}.${name} with a single unnamed ${wanted.label} parameter, but no matches were found in the schema cache.`);
  }
  return fn;
}

/**
 * On a sharded database the planner routes a call as `SELECT fn(...)`: by its
 * shard-key argument when the VSchema lists it under routines, else to one shard.
 */
function rpcProbe(fn: { schema: string; name: string; args: Array<{ name: string }> }, args: Record<string, unknown>): Probe {
  const params: Array<string | null> = [];
  const list = fn.args.map((a) => {
    if (!(a.name in args)) return 'NULL';
    const v = args[a.name];
    params.push(v === null ? null : typeof v === 'object' ? JSON.stringify(v) : String(v));
    return `$${params.length}`;
  });
  return { sql: `SELECT ${qualified(fn)}(${list.join(', ')})`, params };
}

/** select/order/limit/offset and filters (`x=op.value`) of a GET /rpc are not arguments. */
function isQueryKeyword(key: string, value: string): boolean {
  if (['select', 'order', 'limit', 'offset', 'or', 'and'].includes(key) || key.includes('.')) return true;
  const m = /^(?:not\.)?([a-z]+)(?:\([^)]*\))?\./.exec(value);
  return !!m && FILTER_OPS.has(m[1]);
}

export { errorBody };
