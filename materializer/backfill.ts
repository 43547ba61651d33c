/**
 * Backfilling a lookup vindex (decision 0059): its lookup table gets the rows
 * of the owner rows that existed before the vindex, while clients go on writing
 * through the gateways, which keep the rows of their own writes (the vindex is
 * `write_only` meanwhile). Each owner shard is read in primary-key pages, and
 * each page is compared and filled in one transaction per shard under locks
 * that no gateway write passes: the lookup table's, on every shard that holds
 * it (SHARE ROW EXCLUSIVE), then the owner table's on its shard (SHARE). A
 * gateway writes an owner row and its lookup rows in one transaction, so a page
 * sees each such write wholly done or not begun; a write that waits for a lock
 * across shards (a cross-shard deadlock Postgres cannot see) ends the page's
 * wait after LOCK_TIMEOUT, and the page is tried again.
 */
import type pg from 'pg';
import { counter } from '../common/metrics.ts';
import { lookupShard, lookupTo, ownedLookups, type KeyRange, type LookupVindex, type VSchema } from '../schemas/index.ts';
import type { Row } from './changes.ts';
import type { ShardMap } from './shards.ts';
import { describeTable, pageSql, quoteIdent, type MovedTable } from './tables.ts';

/** How long a page waits for a lock before it lets go of its others and starts again. */
const LOCK_TIMEOUT = '2s';
const LOCK_NOT_AVAILABLE = '55P03';
const UNIQUE_VIOLATION = '23505';
/** Tries of one page before the backfill gives up (the table is that busy, or something holds a lock for long). */
const PAGE_TRIES = 50;
/**
 * How long after a VSchema is published the backfill starts: every gateway folds it within
 * milliseconds, and a statement planned before it waits at most the gateway's buffer window
 * (10 s by default) before it runs. See decision 0059 for what this does not cover.
 */
export const SETTLE_MS = 10_000;
/** At most one progress step per shard in this time (and one at each shard's end). */
const STEP_EVERY_MS = 1_000;

const rows = counter('mg_materializer_backfill_rows_total', 'Owner rows a lookup backfill read, and lookup rows it wrote', ['vindex', 'what']);
const pageRetries = counter('mg_materializer_backfill_lock_retries_total', 'Backfill pages started again after a lock wait timed out', ['vindex']);

export interface ShardProgress { shard: string; rowsScanned: number; rowsInserted: number; done: boolean }

/** One run of a backfill, as the REST API shows it: the shape of an admin API operation, with its counts. */
export interface Backfill {
  kind: 'backfill';
  /** `<database>/<vindex>`. */
  target: string;
  database: string;
  vindex: string;
  /** The VSchema version it started with. */
  version: string;
  state: 'running' | 'succeeded' | 'failed';
  startedAt: string;
  finishedAt: string | null;
  rowsScanned: number;
  rowsInserted: number;
  lockRetries: number;
  shards: ShardProgress[];
  steps: Array<{ at: string; message: string }>;
  error: string | null;
  /** The SQLSTATE of the error when it has one (23505: a unique lookup's value held by two owner rows). */
  code: string | null;
}

export class BackfillError extends Error {
  constructor(message: string, readonly code: string | null = null) {
    super(message);
  }
}

/** The lookup vindex named `vindex` with its owner, in a VSchema; undefined when there is none. */
export function findLookup(vschema: VSchema, vindex: string): LookupVindex | undefined {
  const owner = vschema.vindexes[vindex]?.owner;
  return owner ? ownedLookups(vschema, owner).find((l) => l.vindex === vindex) : undefined;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const codeOf = (err: unknown) => (err as { code?: string }).code;
const pair = (value: string, to: string) => JSON.stringify([value, to]);

/** Runs the backfill `job` describes to its end (success, or a BackfillError / a shard's error). */
export async function runBackfill(shards: ShardMap, job: Backfill, appliedAt: Date, pageRows: number): Promise<void> {
  const step = (message: string) => void job.steps.push({ at: new Date().toISOString(), message });
  const wait = appliedAt.getTime() + SETTLE_MS - Date.now();
  if (wait > 0) {
    step(`waiting ${(wait / 1000).toFixed(1)} s for every gateway to fold VSchema version ${job.version} (published ${appliedAt.toISOString()})`);
    await sleep(wait);
  }
  const lookup = currentLookup(shards, job);
  const ranges = shards.ranges(job.database);
  job.shards = ranges.map((r) => ({ shard: r.shard, rowsScanned: 0, rowsInserted: 0, done: false }));
  const where = lookup.sharding ? `sharded by ${lookup.from}` : `on the first shard ${ranges[0].shard}`;
  step(`lookup vindex ${lookup.vindex} (${lookup.type}) of ${lookup.owner}.${lookup.column}: lookup table ${lookup.table} ${where}; ${ranges.length} owner shards, ${pageRows} rows a page`);
  for (const progress of job.shards) {
    await backfillShard(shards, job, progress, ranges, pageRows, step);
    step(`shard ${progress.shard}: done, ${progress.rowsScanned} rows scanned, ${progress.rowsInserted} lookup rows inserted`);
  }
  step(`done: ${job.rowsScanned} rows of ${lookup.owner} scanned, ${job.rowsInserted} lookup rows inserted, ${job.lockRetries} pages retried after a lock wait`);
}

/** The vindex as the VSchema has it now: a change of what it maps under a running backfill stops it. */
function currentLookup(shards: ShardMap, job: Backfill): LookupVindex {
  const vschema = shards.state.vschemas.get(job.database)?.vschema;
  const l = vschema && findLookup(vschema, job.vindex);
  if (!l) throw new BackfillError(`lookup vindex ${job.vindex} is no longer in the VSchema of ${job.database}`);
  return l;
}

const sameMapping = (a: LookupVindex, b: LookupVindex) =>
  JSON.stringify([a.owner, a.column, a.table, a.from, a.to, a.primary, a.sharding]) === JSON.stringify([b.owner, b.column, b.table, b.from, b.to, b.primary, b.sharding]);

async function backfillShard(
  shards: ShardMap, job: Backfill, progress: ShardProgress, ranges: KeyRange[], pageRows: number, step: (m: string) => void,
): Promise<void> {
  const lookup = currentLookup(shards, job);
  const app = `mg-backfill-${job.vindex}`;
  const lookupShards = lookup.sharding ? ranges.map((r) => r.shard) : [ranges[0].shard];
  const clients: pg.Client[] = [];
  const connect = async (shard: string) => {
    const c = await shards.connect(job.database, shard, app);
    clients.push(c);
    return c;
  };
  try {
    const owner = await connect(progress.shard);
    const lookups = new Map<string, pg.Client>();
    for (const s of lookupShards) lookups.set(s, await connect(s));
    const table = await describeTable(owner, lookup.owner, { database: job.database, vschema: shards.state.vschemas.get(job.database)?.vschema });
    const column = table.columns.find((c) => c.name === lookup.column);
    if (!column) throw new BackfillError(`table ${lookup.owner} has no column ${lookup.column} (the column of lookup vindex ${lookup.vindex}) on shard ${progress.shard}`);
    // Pages carry only what the comparison needs: the key, the primary vindex column and the lookup column.
    const read: MovedTable = { ...table, columns: table.columns.filter((c) => table.key.includes(c.name) || c.name === lookup.column || c.name === lookup.primary.column) };
    const page: Page = { owner, lookups, ranges, lookup, table: read, valueType: column.type, settled: new Set() };
    let after: string[] | null = null;
    let stepped = Date.now();
    for (;;) {
      if (!sameMapping(currentLookup(shards, job), lookup)) throw new BackfillError(`the VSchema of ${job.database} changed lookup vindex ${job.vindex} under the backfill: run it again`);
      const { scanned, inserted, lastKey, values } = await underLocks(page, () => fillPage(page, after, pageRows), () => {
        job.lockRetries++;
        pageRetries.inc({ vindex: job.vindex });
      });
      // A non-unique lookup's values repeat over pages: once compared under the locks, gateways keep their rows.
      if (lookup.type === 'lookup') for (const v of values) page.settled.add(v);
      progress.rowsScanned += scanned;
      progress.rowsInserted += inserted;
      job.rowsScanned += scanned;
      job.rowsInserted += inserted;
      rows.inc({ vindex: job.vindex, what: 'scanned' }, scanned);
      rows.inc({ vindex: job.vindex, what: 'inserted' }, inserted);
      if (scanned < pageRows) break;
      after = lastKey;
      if (Date.now() - stepped >= STEP_EVERY_MS) {
        stepped = Date.now();
        step(`shard ${progress.shard}: ${progress.rowsScanned} rows scanned, ${progress.rowsInserted} lookup rows inserted`);
      }
    }
    progress.done = true;
  } finally {
    await Promise.all(clients.map((c) => c.end().catch(() => undefined)));
  }
}

/** What one page works with: sessions on the owner shard and on each shard of the lookup table. */
interface Page {
  owner: pg.Client;
  lookups: Map<string, pg.Client>;
  ranges: KeyRange[];
  lookup: LookupVindex;
  /** The owner table, its columns narrowed to the key, the primary vindex column and the lookup column. */
  table: MovedTable;
  /** The lookup column's type (values travel as text arrays cast to it). */
  valueType: string;
  /** Values whose every owner row of the shard a committed page compared (a non-unique lookup's; see fillPage). */
  settled: Set<string>;
}

/**
 * `work` in one transaction per session, after the locks: the lookup table's first (the order a
 * gateway's INSERT takes them in), then the owner table's. A lock not granted within LOCK_TIMEOUT
 * rolls everything back and starts again; so does nothing else.
 */
async function underLocks<T>(p: Page, work: () => Promise<T>, onRetry: () => void): Promise<T> {
  const lookups = [...p.lookups.values()];
  for (let tries = 1; ; tries++) {
    try {
      for (const c of lookups) await c.query(`BEGIN; SET LOCAL lock_timeout = '${LOCK_TIMEOUT}'; LOCK TABLE ${quoteIdent(p.lookup.table)} IN SHARE ROW EXCLUSIVE MODE`);
      await p.owner.query(`BEGIN; SET LOCAL lock_timeout = '${LOCK_TIMEOUT}'; LOCK TABLE ${p.table.sql} IN SHARE MODE`);
      const out = await work();
      for (const c of lookups) await c.query('COMMIT');
      await p.owner.query('COMMIT');
      return out;
    } catch (err) {
      await Promise.all([...lookups, p.owner].map((c) => c.query('ROLLBACK').catch(() => undefined)));
      if (codeOf(err) !== LOCK_NOT_AVAILABLE || tries >= PAGE_TRIES) throw err;
      onRetry();
    }
  }
}

/**
 * One page of owner rows after `after`: the lookup rows their values need, less those the lookup
 * table holds, inserted. The need is counted over every owner row of the shard with the page's
 * values, not the page's only: a non-unique lookup holds one row per owner row, and owners with
 * the same (value, to) pair may sit on several pages, the lookup rows of some of them written by
 * gateways already. All owners of one pair are on this shard (`to` names it). A value compared
 * once is settled for the shard: its owner rows changed since went through gateways that keep
 * the vindex, so later pages skip it (which keeps a few-valued column from being read again
 * on every page).
 */
async function fillPage(p: Page, after: string[] | null, pageRows: number): Promise<{ scanned: number; inserted: number; lastKey: string[]; values: string[] }> {
  const { lookup: l, table: t } = p;
  const page = (await p.owner.query<Row>(pageSql(t, after, pageRows))).rows;
  const lastKey = page.length ? t.key.map((k) => page[page.length - 1][k]!) : [];
  const values = [...new Set(page.map((r) => r[l.column]).filter((v): v is string => v !== null && !p.settled.has(v)))];
  if (!values.length) return { scanned: page.length, inserted: 0, lastKey, values };

  const owners = await p.owner.query<{ p: string; v: string }>(
    `SELECT ${quoteIdent(l.primary.column)}::text AS p, ${quoteIdent(l.column)}::text AS v FROM ${t.sql} WHERE ${quoteIdent(l.column)} = ANY($1::${p.valueType}[])`, [values]);
  const need = new Map<string, { value: string; to: string; n: number }>();
  for (const o of owners.rows) {
    const to = lookupTo(l, o.p);
    const k = pair(o.v, to);
    need.set(k, { value: o.v, to, n: (need.get(k)?.n ?? 0) + 1 });
  }
  const have = new Map<string, number>();
  /** Per value, the `to`s its lookup rows hold (named when a unique value turns out to be held twice). */
  const held = new Map<string, string[]>();
  for (const [shard, vs] of byLookupShard(values, (v) => v, p)) {
    const found = await p.lookups.get(shard)!.query<{ v: string; t: string }>(
      `SELECT ${quoteIdent(l.from)}::text AS v, ${quoteIdent(l.to)}::text AS t FROM ${quoteIdent(l.table)} WHERE ${quoteIdent(l.from)} = ANY($1::${p.valueType}[])`, [vs]);
    for (const r of found.rows) {
      have.set(pair(r.v, r.t), (have.get(pair(r.v, r.t)) ?? 0) + 1);
      held.set(r.v, [...(held.get(r.v) ?? []), r.t]);
    }
  }
  const missing = [...need].flatMap(([k, { value, to, n }]) => Array.from({ length: Math.max(0, n - (have.get(k) ?? 0)) }, () => ({ value, to })));

  let inserted = 0;
  for (const [shard, group] of byLookupShard(missing, (m) => m.value, p)) {
    const tuples = group.map((_, i) => `($${2 * i + 1}, $${2 * i + 2})`).join(', ');
    // DO NOTHING rather than an error: the rows a unique key refused are the duplicates, named below.
    const written = await p.lookups.get(shard)!.query<{ v: string }>(
      `INSERT INTO ${quoteIdent(l.table)} (${quoteIdent(l.from)}, ${quoteIdent(l.to)}) VALUES ${tuples} ON CONFLICT DO NOTHING RETURNING ${quoteIdent(l.from)}::text AS v`,
      group.flatMap((m) => [m.value, m.to]));
    if (written.rows.length < group.length) throw duplicates(l, group, written.rows.map((r) => r.v), held, shard);
    inserted += written.rows.length;
  }
  return { scanned: page.length, inserted, lastKey, values };
}

/** Items grouped by the lookup-table shard their value's rows live on. */
function byLookupShard<T>(items: T[], value: (t: T) => string, p: Page): Map<string, T[]> {
  const out = new Map<string, T[]>();
  for (const item of items) {
    const shard = lookupShard(p.lookup, value(item), p.ranges);
    out.set(shard, [...(out.get(shard) ?? []), item]);
  }
  return out;
}

/** The error for rows the lookup table's unique key refused: each value, and where the owner rows that hold it are. */
function duplicates(l: LookupVindex, tried: Array<{ value: string; to: string }>, written: string[], held: Map<string, string[]>, shard: string): BackfillError {
  const left = [...written];
  const refused = tried.filter((m) => {
    const i = left.indexOf(m.value);
    if (i < 0) return true;
    left.splice(i, 1);
    return false;
  });
  const where = l.toIsPrimaryColumn ? l.to : 'keyspace ids';
  const values = [...new Set(refused.map((m) => m.value))].map((v) => {
    const tos = [...new Set([...(held.get(v) ?? []), ...tried.filter((m) => m.value === v).map((m) => m.to)])];
    return `${JSON.stringify(v)} (${where} ${tos.join(', ')})`;
  });
  return new BackfillError(
    `duplicate key value violates unique lookup vindex ${l.vindex} of ${l.owner}.${l.column}: more than one row of ${l.owner} has ${l.column} = ${values.join(', ')}`
    + ` in lookup table ${l.table} (shard ${shard}); nothing of this page was written: make the values unique and run the backfill again`,
    UNIQUE_VIOLATION);
}
