/**
 * The VSchema of a sharded database: which tables are sharded by which
 * vindex, which are reference tables, sequences and routed procedures.
 * Validated with zod; every error names the table, column or vindex at fault.
 * Published whole, versioned, as VSchemaApplied on the topology log.
 */
import { z } from 'zod';
import { keyspaceId, shardFor, type FunctionalVindex, type KeyRange } from './vindex.ts';

const ident = z.string().regex(/^[a-z_][a-z0-9_$]{0,62}$/, 'must be a lower-case SQL identifier');

const vindexSchema = z.object({
  type: z.enum(['hash', 'xxhash', 'identity', 'lookup', 'consistent_lookup_unique']),
  /** Lookup vindexes: the table mapping `from` values to the owner's keyspace id (`to`). */
  params: z.object({
    table: ident, from: ident, to: ident,
    /** Writes keep the lookup table, reads do not route by it yet: the state while `mg vschema backfill` fills it for the rows that existed before (decision 0059). */
    write_only: z.boolean().optional(),
  }).strict().optional(),
  /** The table whose writes keep a lookup vindex in step. */
  owner: ident.optional(),
}).strict().superRefine((v, ctx) => {
  const lookup = isLookup(v.type);
  if (lookup && !v.params) ctx.addIssue({ code: 'custom', message: `a ${v.type} vindex needs params {table, from, to}`, path: ['params'] });
  if (!lookup && v.params) ctx.addIssue({ code: 'custom', message: `a ${v.type} vindex takes no params`, path: ['params'] });
});

const columnVindex = z.object({ column: ident, name: ident }).strict();

const tableSchema = z.object({
  type: z.enum(['sharded', 'reference']).default('sharded'),
  /** The first is the primary vindex: it places the row. The others are secondary (lookups). */
  column_vindexes: z.array(columnVindex).default([]),
  /** A column filled from a sequence when an INSERT leaves it out. */
  auto_increment: z.object({ column: ident, sequence: ident }).strict().optional(),
  /**
   * The table's columns in their order (as Vitess's authoritative column list): an INSERT without a
   * column list is placed by them. Without it such an INSERT is refused.
   */
  columns: z.array(ident).min(1).optional(),
}).strict();

const routineSchema = z.object({
  /** The argument (0-based position) that carries the shard key, and the vindex that maps it. */
  argument: z.number().int().min(0).max(99),
  vindex: ident,
}).strict();

export const vschemaSchema = z.object({
  sharded: z.boolean().default(true),
  vindexes: z.record(ident, vindexSchema).default({}),
  tables: z.record(ident, tableSchema).default({}),
  /** Unsharded sequence tables (on the first shard) that hand out ids in blocks. */
  sequences: z.record(ident, z.object({ cache: z.number().int().min(1).max(1_000_000).default(1000) }).strict()).default({}),
  routines: z.record(ident, routineSchema).default({}),
}).strict();

export type VSchema = z.infer<typeof vschemaSchema>;
export type VSchemaTable = VSchema['tables'][string];
export type VSchemaVindex = VSchema['vindexes'][string];

export class VSchemaError extends Error {}

/** Validates a VSchema (parsed YAML/JSON) or throws one error listing every fault by its path. */
export function parseVSchema(raw: unknown): VSchema {
  const r = vschemaSchema.safeParse(raw ?? {});
  if (!r.success) throw new VSchemaError(r.error.issues.map((i) => `${describePath(i.path)}: ${i.message}`).join('\n'));
  const v = r.data;
  const faults: string[] = [];
  for (const [name, t] of Object.entries(v.tables)) {
    if (t.type === 'reference') {
      if (t.column_vindexes.length) faults.push(`table ${name}: a reference table has no vindexes`);
      continue;
    }
    if (!t.column_vindexes.length) faults.push(`table ${name}: a sharded table needs a primary vindex (column_vindexes[0])`);
    t.column_vindexes.forEach((cv, i) => {
      const vi = v.vindexes[cv.name];
      if (!vi) faults.push(`table ${name}, column ${cv.column}: vindex ${cv.name} is not defined`);
      else if (i === 0 && isLookup(vi.type)) {
        faults.push(`table ${name}, column ${cv.column}: the primary vindex ${cv.name} must be hash, xxhash or identity, not ${vi.type}`);
      } else if (isLookup(vi.type) && vi.owner && vi.owner !== name) {
        faults.push(`table ${name}, column ${cv.column}: lookup vindex ${cv.name} is owned by table ${vi.owner} (only its owner routes by it)`);
      }
    });
    if (t.columns) {
      const listed = new Set(t.columns);
      if (listed.size !== t.columns.length) faults.push(`table ${name}: columns lists a column twice`);
      for (const cv of t.column_vindexes) if (!listed.has(cv.column)) faults.push(`table ${name}: columns does not list ${cv.column}, a vindex column`);
    }
    if (t.auto_increment && !v.sequences[t.auto_increment.sequence]) {
      faults.push(`table ${name}, column ${t.auto_increment.column}: sequence ${t.auto_increment.sequence} is not defined`);
    }
  }
  for (const [name, vi] of Object.entries(v.vindexes)) {
    if (vi.owner && !v.tables[vi.owner]) faults.push(`vindex ${name}: owner table ${vi.owner} is not defined`);
    if (isLookup(vi.type)) faults.push(...lookupFaults(v, name, vi));
  }
  for (const [name, r] of Object.entries(v.routines)) {
    const vi = v.vindexes[r.vindex];
    if (!vi) faults.push(`routine ${name}: vindex ${r.vindex} is not defined`);
    else if (isLookup(vi.type)) faults.push(`routine ${name}: vindex ${r.vindex} must be hash, xxhash or identity`);
  }
  if (faults.length) throw new VSchemaError(faults.join('\n'));
  return v;
}

const isLookup = (type: string): type is LookupType => type === 'lookup' || type === 'consistent_lookup_unique';
export type LookupType = 'lookup' | 'consistent_lookup_unique';

/** What is wrong with a lookup vindex: its owner must list it, and its lookup table, if declared, is sharded by its `from` column. */
function lookupFaults(v: VSchema, name: string, vi: VSchemaVindex): string[] {
  const faults: string[] = [];
  const { table, from, to } = vi.params!;
  if (!vi.owner) return [`vindex ${name}: a ${vi.type} vindex needs an owner table (whose writes keep the lookup table in step)`];
  const owner = v.tables[vi.owner];
  if (!owner) return faults; // reported as an undefined owner
  const listed = owner.column_vindexes.slice(1).some((cv) => cv.name === name);
  if (!listed) faults.push(`vindex ${name}: owner table ${vi.owner} does not list it in its column_vindexes (as a secondary vindex)`);
  if (from === to) faults.push(`vindex ${name} (params): from and to must be different columns, not both ${from}`);
  if (table === vi.owner) faults.push(`vindex ${name} (params.table): the lookup table cannot be its owner table ${table}`);
  const lt = v.tables[table];
  if (lt && table !== vi.owner) {
    const primary = lt.column_vindexes[0];
    const type = primary && v.vindexes[primary.name]?.type;
    if (lt.type === 'reference') faults.push(`vindex ${name}: lookup table ${table} cannot be a reference table (declare it sharded by ${from}, or leave it out to keep it on the first shard)`);
    else if (primary && (primary.column !== from || (type !== 'hash' && type !== 'xxhash'))) {
      faults.push(`vindex ${name}: lookup table ${table} must be sharded by its from column ${from} with a hash or xxhash vindex`);
    }
    if (lt.column_vindexes.slice(1).length) faults.push(`vindex ${name}: lookup table ${table} cannot have secondary vindexes`);
  }
  return faults;
}

/** A lookup vindex of a table, with what the planner and the gateway need to read and keep its lookup table. */
export interface LookupVindex {
  vindex: string;
  type: LookupType;
  /** The owner table and its column the vindex maps. */
  owner: string;
  column: string;
  /** The lookup table and its columns: `from` holds the value, `to` where the owner's row is. */
  table: string;
  from: string;
  to: string;
  /** The owner's primary vindex: `to` holds its column's value when `to` is named after that column, else the 8-byte keyspace id (bytea). */
  primary: { column: string; type: FunctionalVindex };
  toIsPrimaryColumn: boolean;
  /** The vindex that shards the lookup table by `from`; none: the lookup table lives on the first shard. */
  sharding?: { vindex: string; type: FunctionalVindex };
  /** Kept by writes, not used by reads: its lookup table may still lack rows that existed before it. */
  writeOnly: boolean;
}

/** The shard of the lookup table that holds a value's rows. */
export function lookupShard(l: LookupVindex, value: string, ranges: readonly KeyRange[]): string {
  return l.sharding ? shardFor(keyspaceId(l.sharding.type, value), ranges) : ranges[0].shard;
}

/** What `to` holds (as text) for an owner row whose primary vindex column has `primary` (text). */
export function lookupTo(l: LookupVindex, primary: string): string {
  return l.toIsPrimaryColumn ? primary : `\\x${keyspaceId(l.primary.type, primary).toString('hex')}`;
}

/** The lookup vindexes a table owns (its secondary column vindexes of a lookup type), in VSchema order. */
export function ownedLookups(v: VSchema, table: string): LookupVindex[] {
  const t = v.tables[table];
  if (!t || t.type !== 'sharded' || !t.column_vindexes.length) return [];
  const pv = t.column_vindexes[0];
  const primary = { column: pv.column, type: v.vindexes[pv.name].type as FunctionalVindex };
  return t.column_vindexes.slice(1).flatMap((cv) => {
    const vi = v.vindexes[cv.name];
    if (!isLookup(vi.type) || vi.owner !== table) return [];
    const { table: lt, from, to, write_only: writeOnly } = vi.params!;
    const sv = v.tables[lt]?.column_vindexes[0];
    return [{
      vindex: cv.name, type: vi.type, owner: table, column: cv.column, table: lt, from, to, primary, toIsPrimaryColumn: to === pv.column,
      sharding: sv ? { vindex: sv.name, type: v.vindexes[sv.name].type as FunctionalVindex } : undefined, writeOnly: writeOnly === true,
    }];
  });
}

function describePath(p: (string | number)[]): string {
  if (p[0] === 'tables' && p.length > 1) return `table ${p[1]}${p.length > 2 ? ` (${p.slice(2).join('.')})` : ''}`;
  if (p[0] === 'vindexes' && p.length > 1) return `vindex ${p[1]}${p.length > 2 ? ` (${p.slice(2).join('.')})` : ''}`;
  if (p[0] === 'routines' && p.length > 1) return `routine ${p[1]}${p.length > 2 ? ` (${p.slice(2).join('.')})` : ''}`;
  if (p[0] === 'sequences' && p.length > 1) return `sequence ${p[1]}`;
  return p.join('.') || '(top level)';
}
