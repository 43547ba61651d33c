/**
 * Lookup vindexes at the gateway: finding an owner row's shards through its
 * lookup table, and keeping the lookup table in step with the owner's writes
 * (docs/sharding.md, decision 0031). The lookup table has one row per owner
 * row with a value: `from` = the value, `to` = where the row is (its 8-byte
 * keyspace id, or its primary vindex column's value). It lives on the shard
 * its own vindex names for `from`, or on the first shard.
 */
import { counter } from '../../common/metrics.ts';
import { keyspaceId, shardFor, type KeyRange } from '../../schemas/vschema/vindex.ts';
import { lookupShard, lookupTo, type LookupVindex } from '../../schemas/vschema/vschema.ts';
import { inRangeOrder, resolveValue, type BoundParam, type InsertPlan, type OwnedWrite, type Pin, type ValueRef } from '../planner/plan.ts';
import { PgError } from '../protocol/errors.ts';

const lookupStatements = counter('mg_gateway_lookup_statements_total', 'Statements on lookup tables, by what they did (read, insert, delete)', ['op']);
const missingRows = counter('mg_gateway_lookup_rows_missing_total', 'Lookup rows an owner row\'s change should have removed but did not find (written around the gateway?)', ['vindex']);

/** A row as the shards return it (text format). */
export type TextRow = Array<Buffer | null>;

/** How the lookup code reaches the shards of the session. */
export interface LookupAccess {
  ranges: readonly KeyRange[];
  /**
   * Runs one statement with text parameters on a shard and returns its rows:
   * `write` ones join the session's transaction there; reads see it where it runs.
   */
  run(shard: string, sql: string, params: Array<string | null>, write: boolean): Promise<TextRow[]>;
}

const q = (name: string) => `"${name.replace(/"/g, '""')}"`;

/** A value in the text form a parameter takes (bound binary parameters of other types than integers and uuids are passed as their bytes). */
function text(v: ValueRef, params: readonly BoundParam[] | undefined): string | null {
  const r = resolveValue(v, params);
  return r === null ? null : Buffer.isBuffer(r) ? r.toString('utf8') : r;
}

/** Groups items by a key, keeping first-seen order. */
function groupBy<T>(items: T[], key: (t: T) => string): Map<string, T[]> {
  const out = new Map<string, T[]>();
  for (const t of items) out.set(key(t), [...(out.get(key(t)) ?? []), t]);
  return out;
}

/** The shards whose owner rows have the pinned values, from one query per lookup-table shard; the first shard when none does. */
export async function shardsByLookup(pin: Pin, params: readonly BoundParam[] | undefined, access: LookupAccess): Promise<string[]> {
  const l = pin.lookup!;
  const values = [...new Set(pin.values.map((v) => text(v, params)).filter((v): v is string => v !== null))];
  const to = l.toIsPrimaryColumn ? `${q(l.to)}::text` : `encode(${q(l.to)}, 'hex')`;
  const found = await Promise.all([...groupBy(values, (v) => lookupShard(l, v, access.ranges))].map(async ([shard, vs]) => {
    lookupStatements.inc({ op: 'read' });
    return access.run(shard, `SELECT ${to} FROM ${q(l.table)} WHERE ${q(l.from)} IN (${vs.map((_, i) => `$${i + 1}`).join(', ')})`, vs, false);
  }));
  const shards = found.flat().map(([t]) => {
    const ksid = l.toIsPrimaryColumn ? keyspaceId(l.primary.type, t!.toString('utf8')) : Buffer.from(t!.toString('latin1'), 'hex');
    return shardFor(ksid, access.ranges);
  });
  return inRangeOrder(shards, access.ranges);
}

/** One lookup row to write or remove: the vindex, the value, and where its owner row is. */
interface LookupRow { lookup: LookupVindex; from: string; to: string }

/** Inserts the lookup rows, grouped into one INSERT per lookup table and shard; a duplicate of a unique lookup is 23505 naming the vindex. */
async function insertRows(rows: LookupRow[], access: LookupAccess): Promise<void> {
  const groups = groupBy(rows, (r) => `${r.lookup.vindex}\u0000${lookupShard(r.lookup, r.from, access.ranges)}`);
  for (const group of groups.values()) {
    const l = group[0].lookup;
    const shard = lookupShard(l, group[0].from, access.ranges);
    const tuples = group.map((_, i) => `($${2 * i + 1}, $${2 * i + 2})`).join(', ');
    lookupStatements.inc({ op: 'insert' });
    await access.run(shard, `INSERT INTO ${q(l.table)} (${q(l.from)}, ${q(l.to)}) VALUES ${tuples}`, group.flatMap((r) => [r.from, r.to]), true).catch((err) => {
      // a shard's error as the wire protocol or node-postgres (REST) reports it
      const { code, detail } = err as { code?: string; detail?: string };
      if (code !== '23505') throw err;
      throw new PgError('ERROR', '23505', `duplicate key value violates unique lookup vindex ${l.vindex} of ${l.owner}.${l.column}`,
        `${(detail ?? '').replace(/\.$/, '')} in lookup table ${l.table} (shard ${shard}).`);
    });
  }
}

/** Removes one lookup row per owner row (a non-unique lookup holds one row per owner row, so equal pairs are counted, not merged). */
async function deleteRows(rows: LookupRow[], access: LookupAccess): Promise<void> {
  for (const r of rows) {
    const { table, from, to } = r.lookup;
    lookupStatements.inc({ op: 'delete' });
    const removed = await access.run(lookupShard(r.lookup, r.from, access.ranges),
      `DELETE FROM ${q(table)} WHERE ctid = (SELECT ctid FROM ${q(table)} WHERE ${q(from)} = $1 AND ${q(to)} = $2 LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING 1`, [r.from, r.to], true);
    // A write-only vindex lacks the rows of owners older than it until its backfill: not a fault.
    if (!removed.length && !r.lookup.writeOnly) missingRows.inc({ vindex: r.lookup.vindex });
  }
}

/**
 * The lookup rows of an INSERT's rows (after its sequence ids are filled), written before the rows themselves.
 * Once per set of parameters: a REST insert binds the statement's one row to each row of its payload.
 */
export async function insertLookupRows(plan: InsertPlan, paramSets: ReadonlyArray<readonly BoundParam[] | undefined>, access: LookupAccess): Promise<void> {
  const rows = paramSets.flatMap((params) => plan.lookups!.flatMap(({ lookup, values }) => values.flatMap((v, i) => {
    const from = text(v, params);
    return from === null ? [] : [{ lookup, from, to: lookupTo(lookup, text(plan.pin.values[i], params)!) }];
  })));
  await insertRows(rows, access);
}

/**
 * The lookup rows an UPDATE or DELETE changes, given the rows it is about to
 * change (primary vindex column, then each lookup's column, as OwnedWrite's
 * SELECT reads them): old rows removed, new ones written (UPDATE).
 */
export async function moveLookupRows(owned: Pick<OwnedWrite, 'lookups' | 'newValues'>, rows: TextRow[], params: readonly BoundParam[] | undefined, access: LookupAccess): Promise<void> {
  const gone: LookupRow[] = [];
  const added: LookupRow[] = [];
  for (const row of rows) {
    const primary = row[0]!.toString('utf8');
    owned.lookups.forEach((lookup, j) => {
      const old = row[j + 1]?.toString('utf8') ?? null;
      const now = owned.newValues ? text(owned.newValues[j], params) : null;
      if (owned.newValues && old === now) return;
      const to = lookupTo(lookup, primary);
      if (old !== null) gone.push({ lookup, from: old, to });
      if (now !== null) added.push({ lookup, from: now, to });
    });
  }
  await deleteRows(gone, access);
  await insertRows(added, access);
}
