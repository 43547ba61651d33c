/**
 * REST requests on a sharded database. The sharded planner (router/planner,
 * the one wire-protocol traffic goes through) decides where a request runs
 * from a probe statement: the request's tables, the joins its embeds make, and
 * its filters that can pin the primary vindex. Its refusals are the wire
 * protocol's (0A000). Each shard then runs the request's own statement; the
 * gateway merges their answers as the planner's merge does (order, then
 * offset/limit), keeping Postgres's JSON text of every row.
 */
import type { KeyRange } from '../../schemas/vschema/vindex.ts';
import { VindexValueError } from '../../schemas/vschema/vindex.ts';
import type { LookupVindex, VSchema } from '../../schemas/vschema/vschema.ts';
import { counter } from '../../common/metrics.ts';
import { mergeRows, type Field } from '../planner/merge.ts';
import { pinnedShards, routeKind, shardOfValue, type BoundParam, type Merge } from '../planner/plan.ts';
import type { Planner } from '../planner/planner.ts';
import { insertLookupRows, shardsByLookup, type LookupAccess } from '../gateway/lookups.ts';
import { RestError } from './errors.ts';
import { isSingular, type Media } from './sql.ts';

const routed = counter('mg_rest_sharded_requests_total', 'REST requests on sharded databases, by route kind (single, multi, scatter, reference, insert)', ['route']);

export interface ShardRouting {
  planner: Planner;
  vschema: VSchema | undefined;
  /** Shards in key-range order. */
  ranges: readonly KeyRange[];
}

/** A statement the planner routes by, with its parameters as text. */
export interface Probe { sql: string; params: Array<string | null> }

const asParams = (values: Array<string | null>): BoundParam[] => values.map((v) => ({ value: v === null ? null : Buffer.from(v), binary: false, typeOid: 0 }));

function planOf(routing: ShardRouting, probe: Probe) {
  const [plan] = routing.planner.plan(probe.sql);
  if (plan.kind === 'refused') throw new RestError(501, '0A000', plan.message);
  return plan;
}

/** A value a vindex cannot hash is the client's error (400), thrown or rejected. */
function vindexError<T>(fn: () => T): T {
  const client = (err: unknown): never => {
    if (err instanceof VindexValueError) throw new RestError(400, '22023', err.message);
    throw err;
  };
  try {
    const result = fn();
    return (result instanceof Promise ? result.catch(client) : result) as T;
  } catch (err) {
    return client(err);
  }
}

/**
 * The shards a request runs on: those its pin names (through the lookup
 * table for a lookup vindex), every shard when unpinned, one shard when it
 * reads reference tables only; and for a write, the lookup vindexes whose rows
 * it changes. A reference table read with sharded tables embedded is refused:
 * each shard would answer the same rows with only its own part of the embeds.
 */
export async function routeProbe(routing: ShardRouting, probe: Probe, top: string, lookups: LookupAccess): Promise<{ shards: string[]; owns?: LookupVindex[] }> {
  const plan = planOf(routing, probe);
  const all = routing.ranges.map((r) => r.shard);
  let shards: string[];
  if (plan.kind === 'reference' || (plan.kind === 'all' && !plan.ddl)) shards = plan.kind === 'reference' ? [all[0]] : all;
  else if (plan.kind === 'select' || plan.kind === 'write') {
    if (routing.vschema?.tables[top]?.type === 'reference') {
      throw new RestError(501, '0A000', `an embed of a sharded table under reference table ${top}`);
    }
    if (!plan.pin) shards = all;
    else if (plan.pin.lookup) shards = await vindexError(() => shardsByLookup(plan.pin!, asParams(probe.params), lookups));
    else shards = vindexError(() => pinnedShards(plan.pin!, routing.ranges, asParams(probe.params)));
  } else throw new RestError(501, '0A000', `the request is not supported on a sharded database (planned as ${plan.kind})`);
  routed.inc({ route: routeKind(plan, shards.length) ?? plan.kind });
  return { shards, owns: plan.kind === 'write' ? plan.owned?.lookups : undefined };
}

/** A payload value as the text of a parameter. */
export const paramText = (v: unknown): string | null => (v === undefined || v === null ? null : typeof v === 'object' ? JSON.stringify(v) : String(v));

/**
 * Where each row of an insert goes: by its primary vindex column, whose
 * position among the probe's VALUES the planner names; and, when the table
 * owns lookup vindexes, how to write their rows (each payload row bound to
 * the probe's one row). Undefined: the table is a reference table, every
 * shard takes every row.
 */
export function placeRows(routing: ShardRouting, probe: Probe, rows: Array<Record<string, unknown>>, cols: string[]):
  { shards: string[]; writeLookups?: (access: LookupAccess) => Promise<void> } | undefined {
  const plan = planOf(routing, probe);
  if (plan.kind === 'all') {
    routed.inc({ route: 'all' });
    return undefined;
  }
  if (plan.kind !== 'insert') throw new RestError(501, '0A000', `the insert is not supported on a sharded database (planned as ${plan.kind})`);
  const ref = plan.pin.values[0];
  const column = 'param' in ref ? cols[ref.param - 1] : undefined;
  if (column === undefined) throw new RestError(501, '0A000', `insert into ${plan.table}: its primary vindex column must come from the payload`);
  routed.inc({ route: 'insert' });
  const shards = rows.map((row) => {
    const text = paramText(row[column]);
    if (text === null) throw new RestError(400, '23502', `null value in column "${column}" of relation "${plan.table}": it places the row on a shard`);
    return vindexError(() => shardOfValue(plan.pin, { literal: text }, routing.ranges))!;
  });
  if (!plan.lookups) return { shards };
  const paramSets = rows.map((row) => asParams(cols.map((c) => paramText(row[c]))));
  return { shards, writeLookups: (access) => vindexError(() => insertLookupRows(plan, paramSets, access)) };
}

/** The rows of a JSON array of rows as Postgres wrote them (json_agg's text), without re-serializing them. */
export function jsonElements(text: string): string[] {
  const out: string[] = [];
  let depth = 0;
  let start = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === '\\') i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === '{' || c === '[') {
      if (depth === 1) start = i;
      depth++;
    } else if (c === '}' || c === ']') {
      depth--;
      if (depth === 1) out.push(text.slice(start, i + 1));
    }
  }
  return out;
}

/**
 * The body of several rows as Postgres writes it for the media type (router/rest/sql.ts bodySql): a JSON array as
 * json_agg writes it, or without spaces as json_strip_nulls does; CSV lines under their header.
 */
function bodyOf(elements: string[], media: Media, csvHeader: string): string {
  if (media === 'csv') return `${csvHeader}\n${elements.join('\n')}`;
  if (media === 'json-stripped') return `[${elements.join(',')}]`;
  return elements.length ? `[${elements.join(', \n ')}]` : '[]';
}

/** The rows one shard read: `pgrst_total`, `pgrst_json`, the order keys and for CSV the header (see QueryBuilder.shardRows). */
export interface ShardRows { fields: Field[]; rows: Array<Array<string | null>> }

/**
 * The response row of a read over several shards: counts summed, rows merged
 * in the request's order, then its offset and limit applied.
 */
export function mergeReads(parts: ShardRows[], merge: Merge, counted: boolean, media: Media): { total: string | null; page_total: string; body: string } {
  let total = 0n;
  const rows: Array<Array<Buffer | null>> = [];
  for (const p of parts) {
    if (p.rows.length && p.rows[0][0] !== null) total += BigInt(p.rows[0][0]);
    for (const r of p.rows) if (r[1] !== null) rows.push(r.map((v) => (v === null ? null : Buffer.from(v))));
  }
  const page = mergeRows(rows, parts[0].fields, merge);
  const merged = page.map((r) => r[1]!.toString());
  return {
    total: counted ? String(total) : null,
    page_total: String(merged.length),
    body: isSingular(media) ? (merged.length ? merged[0] : 'null') : bodyOf(merged, media, page.length ? page[0][page[0].length - 1]!.toString() : ''),
  };
}

/** A write's response row from each shard's: counts summed, bodies joined (in `order` when given: each element's place). */
export function mergeWrites(rows: Array<Record<string, any>>, media: Media, order?: number[][]): Record<string, any> {
  const singular = isSingular(media);
  const sum = (k: string) => rows.reduce((n, r) => n + BigInt(r[k] ?? 0), 0n);
  const counted = rows.some((r) => r.total !== null && r.total !== undefined);
  let elements: string[];
  // A write whose response shows no row has no body (NULL) on any shard.
  if (singular) elements = rows.filter((r) => Number(r.page_total) > 0 && r.body !== null).map((r) => r.body as string);
  else {
    const per = rows.map((r) => (r.body === null ? [] : jsonElements(r.body as string)));
    if (order && per.every((els, i) => els.length === order[i].length)) {
      const placed: Array<[number, string]> = per.flatMap((els, i) => els.map((e, j): [number, string] => [order[i][j], e]));
      elements = placed.sort((a, b) => a[0] - b[0]).map(([, e]) => e);
    } else elements = per.flat();
  }
  return {
    total: counted ? String(sum('total')) : null,
    page_total: String(sum('page_total')),
    inserted: String(sum('inserted')),
    body: singular ? (elements.length === 1 ? elements[0] : 'null') : bodyOf(elements, media, ''),
    location: rows.find((r) => r.location)?.location ?? null,
  };
}
