/**
 * What the planner decides for one statement of a sharded database, and how a
 * decision with bind parameters becomes the list of shards to run on.
 */
import { keyspaceId, shardFor, VindexValueError, type FunctionalVindex, type KeyRange, type VindexType } from '../../schemas/vschema/vindex.ts';
import type { LookupVindex } from '../../schemas/vschema/vschema.ts';

/** A value in the statement: SQL literal text (null for NULL) or bind parameter $n (1-based). */
export type ValueRef = { literal: string | null } | { param: number };

/** Where the rows of a statement live: the vindex, and the values WHERE pins it to. */
export interface Pin {
  vindex: string;
  type: VindexType;
  /** table.column, for EXPLAIN. */
  column: string;
  values: ValueRef[];
  /** A lookup vindex: the gateway reads its lookup table to find the shards (router/gateway/lookups.ts). */
  lookup?: LookupVindex;
}

/** The lookup rows an INSERT writes: per lookup vindex the table owns, each row's value of its column (NULL: no lookup row). */
export interface InsertLookups { lookup: LookupVindex; values: ValueRef[] }

/**
 * An UPDATE or DELETE of rows whose lookup vindex columns it changes: the rows
 * are read (and locked) first, so their lookup rows can be moved or removed
 * in the same transaction.
 */
export interface OwnedWrite {
  /** The lookup vindexes whose rows change: every one of the table for DELETE, those whose column is SET for UPDATE. */
  lookups: LookupVindex[];
  /** UPDATE: each lookup column's new value (same order as `lookups`). */
  newValues?: ValueRef[];
  /** `SELECT <primary vindex column>, <lookup columns> FROM <table> WHERE <the statement's WHERE> FOR UPDATE`. */
  select: Buffer;
}

export type AggregateFn = 'count' | 'sum' | 'min' | 'max';

/**
 * A column to sort by: its 1-based position in the row the shards send (negative: counted from the row's end, -1 the
 * last, for items after a `*`), or an output name, a column of `*` found when the rows come back.
 */
export interface SortKey { column: string | number; desc: boolean; nullsFirst: boolean }

/**
 * A HAVING the gateway applies to each merged group (decision 0072): comparisons of a selected
 * column (1-based output position) with a constant or $n, and IS [NOT] NULL, under AND / OR / NOT.
 */
export type Having =
  | { op: 'and' | 'or'; args: Having[] }
  | { op: 'not'; arg: Having }
  | { op: 'is null' | 'is not null'; column: number }
  | { op: Comparison; column: number; value: ValueRef };
export type Comparison = '=' | '<>' | '<' | '<=' | '>' | '>=';

/** How the gateway merges the rows of a scatter SELECT. Columns are by 1-based position in the shards' rows (or as SortKey says). */
export interface Merge {
  orderBy: SortKey[];
  /**
   * GROUP BY (or DISTINCT) merged as the rows stream (decision 0070): every shard sends its rows in
   * this order of the group columns, so one group's rows from all shards arrive one after another
   * and the gateway folds each group as it passes. Unset: the shards' rows are gathered first.
   */
  groupOrder?: SortKey[];
  /** Partial aggregates from every shard, combined per group of the other columns. */
  aggregates?: Array<{ column: number; fn: AggregateFn }>;
  groupBy?: number[];
  /** Applied to each merged group before DISTINCT, ORDER BY and OFFSET/LIMIT; the shards send every group. */
  having?: Having;
  distinct: boolean;
  /**
   * How many items the shards' select list has after the client's (decision 0074): sort keys, group columns and
   * aggregates the merge needs and the client did not select. They end every row and are stripped before the client.
   */
  hidden?: number;
  limit?: ValueRef;
  offset?: ValueRef;
}

/** An INSERT into a sharded table: the text around its VALUES rows, and each row's value of the primary vindex. */
export interface InsertPlan { kind: 'insert'; table: string; pin: Pin; prefix: Buffer; rows: Buffer[]; suffix: Buffer; sequence?: SequenceFill; lookups?: InsertLookups[] }

/**
 * COPY FROM STDIN: the statement as written goes to the shards; the gateway splits the client's
 * data into rows and sends each where `column` (0-based, in the row) places it. No `column`: a
 * reference table, every row to every shard.
 */
export interface CopyInPlan {
  kind: 'copy_in'; table: string; sql: Buffer;
  format: 'text' | 'csv'; delimiter: string; header: boolean; quote: string; escape: string; null: string;
  place?: { column: number; pin: Omit<Pin, 'values'> };
}

/** An INSERT's auto-increment column, filled from a VSchema sequence where the statement leaves it out or says DEFAULT. */
export interface SequenceFill {
  sequence: string;
  column: string;
  /** The column is not in the column list: `, column` goes in at this byte of the prefix, and an id at the end of every row. */
  addColumnAt?: number;
  /** Per row: the byte (in the row's text) of the DEFAULT to replace with an id, if that row has one. */
  defaults: Array<number | undefined>;
  /** The sequence column is the primary vindex column: filled rows are placed by their ids. */
  places: boolean;
}

/** How many ids an INSERT takes from its sequence. */
export function idsNeeded(fill: SequenceFill, rows: number): number {
  return fill.addColumnAt !== undefined ? rows : fill.defaults.filter((d) => d !== undefined).length;
}

/** The INSERT with its sequence column filled by `ids` (in row order), ready to place and run. */
export function fillSequence(plan: InsertPlan, ids: string[]): InsertPlan {
  const fill = plan.sequence!;
  const values = [...plan.pin.values];
  let next = 0;
  const rows = plan.rows.map((row, i) => {
    const at = fill.addColumnAt !== undefined ? row.length - 1 : fill.defaults[i];
    if (at === undefined) return row;
    const id = ids[next++];
    if (fill.places) values[i] = { literal: id };
    const replaced = fill.addColumnAt !== undefined ? 0 : 'DEFAULT'.length;
    return Buffer.concat([row.subarray(0, at), Buffer.from(fill.addColumnAt !== undefined ? `, ${id}` : id), row.subarray(at + replaced)]);
  });
  const prefix = fill.addColumnAt === undefined ? plan.prefix
    : Buffer.concat([plan.prefix.subarray(0, fill.addColumnAt), Buffer.from(`, ${fill.column}`), plan.prefix.subarray(fill.addColumnAt)]);
  return { ...plan, prefix, rows, pin: { ...plan.pin, values }, sequence: undefined };
}

/** Route kinds, as metrics and EXPLAIN name them. */
export type RouteKind = 'single' | 'multi' | 'scatter' | 'reference' | 'all' | 'insert';

export type Plan =
  /** Runs `sql` on the shards of `pin`, or on every shard (scatter) when unpinned. */
  | { kind: 'select' | 'write'; sql: Buffer; pin?: Pin; merge?: Merge; tables: string[]; owned?: OwnedWrite }
  /** Reads only reference tables (or no table): any one shard answers. */
  | { kind: 'reference'; sql: Buffer; tables: string[] }
  /** Runs on every shard: DDL, writes to reference tables. */
  /** renamesColumn: an `ALTER TABLE ... RENAME COLUMN`, refused while the database is resharded (decision 0068). */
  /** temp: the session's temporary tables it creates or may drop (decision 0082). */
  | { kind: 'all'; sql: Buffer; tables: string[]; ddl: boolean; renamesColumn?: boolean; temp?: { creates?: string; drops?: string[] } }
  /** An INSERT into a sharded table, rows placed by their keyspace ids. */
  | InsertPlan
  | { kind: 'begin' | 'commit' | 'rollback'; sql: Buffer }
  /** A session setting: sent to every shard link the session has and replayed on new ones. */
  | { kind: 'set'; sql: Buffer }
  /** SET LOCAL, SAVEPOINT, RELEASE, ROLLBACK TO: on every shard in the transaction, and replayed on shards that join it later. */
  | { kind: 'set_local'; sql: Buffer }
  | { kind: 'savepoint' | 'release' | 'rollback_to'; name: string }
  | { kind: 'transaction_mode'; mode: string }
  | { kind: 'show_plan' }
  | { kind: 'explain'; sql: Buffer; inner: Plan }
  /** COPY ... FROM STDIN into a sharded table (each row to the shard of its vindex value) or a reference table (every row to every shard). */
  | CopyInPlan
  /** COPY ... TO STDOUT of a table or a query: the shards the table or the query's plan names; their data one after another. */
  | { kind: 'copy_out'; sql: Buffer; pin?: Pin; reference: boolean; tables: string[]; header: boolean }
  | { kind: 'refused'; message: string }
  | { kind: 'empty' };

/** The route kind of a plan that runs somewhere, given how many shards its pin names. */
export function routeKind(plan: Plan, shards: number): RouteKind | undefined {
  switch (plan.kind) {
    case 'select': case 'write': return plan.pin ? (shards === 1 ? 'single' : 'multi') : 'scatter';
    case 'reference': return 'reference';
    case 'all': return 'all';
    case 'insert': return 'insert';
    default: return undefined;
  }
}

/** A bound parameter as the client sent it. */
export interface BoundParam { value: Buffer | null; binary: boolean; typeOid: number }

const INT_OIDS: Record<number, number> = { 20: 8, 21: 2, 23: 4 };

/** A value as a vindex reads it: literal text, or a parameter in text form (binary integers and uuids decoded). */
export function resolveValue(v: ValueRef, params: readonly BoundParam[] = []): string | Buffer | null {
  if ('literal' in v) return v.literal;
  const p = params[v.param - 1];
  if (!p) throw new VindexValueError(`there is no parameter $${v.param}`);
  if (p.value === null) return null;
  if (!p.binary) return p.value;
  const size = INT_OIDS[p.typeOid];
  if (size === p.value.length) return String(size === 8 ? p.value.readBigInt64BE() : size === 4 ? p.value.readInt32BE() : p.value.readInt16BE());
  if (p.typeOid === 2950 && p.value.length === 16) {
    const h = p.value.toString('hex');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }
  return p.value;
}

/** The shard one value maps to, or undefined for NULL (which matches no row). */
export function shardOfValue(pin: { type: VindexType }, v: ValueRef, ranges: readonly KeyRange[], params?: readonly BoundParam[]): string | undefined {
  const value = resolveValue(v, params);
  return value === null ? undefined : shardFor(keyspaceId(functional(pin.type), value), ranges);
}

function functional(type: VindexType): FunctionalVindex {
  if (type === 'lookup' || type === 'consistent_lookup_unique') throw new Error(`a ${type} vindex maps values through its lookup table, not a function`);
  return type;
}

/** The shards a pinned statement runs on, in key-range order (at least one: a NULL pin still needs an answer). */
export function pinnedShards(pin: Pin, ranges: readonly KeyRange[], params?: readonly BoundParam[]): string[] {
  if (pin.values.length === 1) return [shardOfValue(pin, pin.values[0], ranges, params) ?? ranges[0].shard];
  return inRangeOrder(pin.values.map((v) => shardOfValue(pin, v, ranges, params)), ranges);
}

/** The named shards (undefined: none), once each, in key-range order; the first shard when none is named. */
export function inRangeOrder(named: Array<string | undefined>, ranges: readonly KeyRange[]): string[] {
  const set = new Set(named);
  const out = ranges.map((r) => r.shard).filter((s) => set.has(s));
  return out.length ? out : [ranges[0].shard];
}

/** The value of LIMIT/OFFSET as a number (undefined for ALL or NULL). */
export function countValue(v: ValueRef | undefined, params?: readonly BoundParam[]): number | undefined {
  if (!v) return undefined;
  const r = resolveValue(v, params);
  if (r === null) return undefined;
  const n = Number(String(r));
  if (!Number.isInteger(n) || n < 0) throw new VindexValueError(`LIMIT and OFFSET take a non-negative integer, not ${String(r)}`);
  return n;
}

/** One line that says where a plan runs, for EXPLAIN and SHOW mg_plan. */
export function describePlan(plan: Plan, shards: string[]): string {
  const where = shards.join(', ');
  switch (plan.kind) {
    case 'select': case 'write':
      if (!plan.pin) {
        const m = plan.merge;
        const merge = m ? [m.aggregates?.length ? 'aggregate' : '', m.groupBy?.length ? 'group by' : '', m.having ? 'having' : '', m.distinct ? 'distinct' : '', m.groupOrder ? 'streamed group by group' : '', m.orderBy.length ? 'merge sort' : '', m.limit || m.offset ? 'limit' : '', m.hidden ? `${m.hidden} hidden column${m.hidden > 1 ? 's' : ''}` : ''].filter(Boolean).join(', ') : '';
        return `scatter to ${shards.length} shards (${where})${merge ? `, gateway ${merge}` : ''}${keeps(plan.owned?.lookups)}`;
      }
      return `${shards.length === 1 ? 'single shard' : `${shards.length} shards`} ${where} by ${plan.pin.lookup ? 'lookup ' : ''}vindex ${plan.pin.vindex} (${plan.pin.type}) on ${plan.pin.column}`
        + `${plan.pin.lookup ? ` via lookup table ${plan.pin.lookup.table}` : ''}${keeps(plan.owned?.lookups)}`;
    case 'reference': return `reference tables only: one shard (${where})`;
    case 'all': return `every shard (${where}): ${plan.ddl ? 'DDL' : 'reference table write'}`;
    case 'insert': return `insert: rows placed by vindex ${plan.pin.vindex} (${plan.pin.type}) on ${plan.pin.column}, to ${where}${plan.sequence ? `, ${plan.sequence.column} from sequence ${plan.sequence.sequence}` : ''}${keeps(plan.lookups?.map((l) => l.lookup))}`;
    case 'refused': return `refused: ${plan.message}`;
    default: return `session: ${plan.kind}`;
  }
}

/** `, keeps lookup vindex email (users_email_idx)` for a write that moves lookup rows. */
function keeps(lookups: LookupVindex[] | undefined): string {
  return lookups?.length ? `, keeps lookup ${lookups.map((l) => `vindex ${l.vindex} (${l.table})`).join(', ')}` : '';
}
