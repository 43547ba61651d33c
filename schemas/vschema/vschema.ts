/**
 * The VSchema of a sharded database: which tables are sharded by which
 * vindex, which are reference tables, sequences and routed procedures.
 * Validated with zod; every error names the table, column or vindex at fault.
 * Published whole, versioned, as VSchemaApplied on the topology log.
 */
import { z } from 'zod';

const ident = z.string().regex(/^[a-z_][a-z0-9_$]{0,62}$/, 'must be a lower-case SQL identifier');

const vindexSchema = z.object({
  type: z.enum(['hash', 'xxhash', 'identity', 'lookup', 'consistent_lookup_unique']),
  /** Lookup vindexes: the table mapping `from` values to the owner's keyspace id (`to`). */
  params: z.object({ table: ident, from: ident, to: ident }).strict().optional(),
  /** The table whose writes keep a lookup vindex in step. */
  owner: ident.optional(),
}).strict().superRefine((v, ctx) => {
  const lookup = v.type === 'lookup' || v.type === 'consistent_lookup_unique';
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
      else if (i === 0 && (vi.type === 'lookup' || vi.type === 'consistent_lookup_unique')) {
        faults.push(`table ${name}, column ${cv.column}: the primary vindex ${cv.name} must be hash, xxhash or identity, not ${vi.type}`);
      }
    });
    if (t.auto_increment && !v.sequences[t.auto_increment.sequence]) {
      faults.push(`table ${name}, column ${t.auto_increment.column}: sequence ${t.auto_increment.sequence} is not defined`);
    }
  }
  for (const [name, vi] of Object.entries(v.vindexes)) {
    if (vi.owner && !v.tables[vi.owner]) faults.push(`vindex ${name}: owner table ${vi.owner} is not defined`);
  }
  for (const [name, r] of Object.entries(v.routines)) {
    const vi = v.vindexes[r.vindex];
    if (!vi) faults.push(`routine ${name}: vindex ${r.vindex} is not defined`);
    else if (vi.type === 'lookup' || vi.type === 'consistent_lookup_unique') faults.push(`routine ${name}: vindex ${r.vindex} must be hash, xxhash or identity`);
  }
  if (faults.length) throw new VSchemaError(faults.join('\n'));
  return v;
}

function describePath(p: (string | number)[]): string {
  if (p[0] === 'tables' && p.length > 1) return `table ${p[1]}${p.length > 2 ? ` (${p.slice(2).join('.')})` : ''}`;
  if (p[0] === 'vindexes' && p.length > 1) return `vindex ${p[1]}${p.length > 2 ? ` (${p.slice(2).join('.')})` : ''}`;
  if (p[0] === 'routines' && p.length > 1) return `routine ${p[1]}${p.length > 2 ? ` (${p.slice(2).join('.')})` : ''}`;
  if (p[0] === 'sequences' && p.length > 1) return `sequence ${p[1]}`;
  return p.join('.') || '(top level)';
}
