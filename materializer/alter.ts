/**
 * Online migrations (decision 0060): the submitted ALTER TABLE parsed with
 * libpg-query, checked against what a shadow-table migration can carry, and
 * rewritten to run on the shadow table; and the column mapping between the
 * old and the new shape of the table, which both directions of the apply use.
 */
import { loadModule, parseSync } from 'libpg-query';
import { INTERNAL_SCHEMAS } from '../schemas/index.ts';
import type { Column } from './tables.ts';

/** An ALTER TABLE the migration can run: its table and the statement with the table's name cut out (see `forTable`). */
export interface ParsedAlter {
  schema: string;
  table: string;
  /** The text before and after the table's name in the statement. */
  head: string;
  tail: string;
}

/** Why an ALTER TABLE cannot be migrated online (the API answers 400 with it). */
export class AlterError extends Error {}

/** Subcommands a shadow table carries: the copy and the apply move values by column name, as text. */
const SUPPORTED: Record<string, string> = {
  AT_AddColumn: 'ADD COLUMN', AT_DropColumn: 'DROP COLUMN', AT_AlterColumnType: 'ALTER COLUMN TYPE', AT_ColumnDefault: 'ALTER COLUMN SET/DROP DEFAULT',
  AT_SetNotNull: 'ALTER COLUMN SET NOT NULL', AT_DropNotNull: 'ALTER COLUMN DROP NOT NULL', AT_AddConstraint: 'ADD CONSTRAINT ... CHECK', AT_DropConstraint: 'DROP CONSTRAINT',
};

/** Postgres's own names of the refused subcommands (AT_AddIndex -> ADD INDEX), for the error. */
const spoken = (subtype: string) => subtype.replace(/^AT_/, '').replace(/([a-z])([A-Z])/g, '$1 $2').toUpperCase();

let loaded: Promise<void> | undefined;
export const loadParser = () => (loaded ??= loadModule());

/** Parses one ALTER TABLE statement (loadParser first); throws AlterError naming what it cannot carry. */
export function parseAlter(sql: string): ParsedAlter {
  let stmts: any[];
  try {
    stmts = parseSync(sql).stmts ?? [];
  } catch (err) {
    throw new AlterError(`syntax error: ${(err as Error).message}`);
  }
  if (stmts.length !== 1) throw new AlterError(`submit one ALTER TABLE statement (got ${stmts.length} statements)`);
  const kind = Object.keys(stmts[0].stmt)[0];
  const alter = stmts[0].stmt.AlterTableStmt;
  if (!alter || alter.objtype !== 'OBJECT_TABLE') throw new AlterError(`only ALTER TABLE is migrated online (got ${kind === 'AlterTableStmt' ? `ALTER ${String(alter.objtype).replace('OBJECT_', '')}` : kind})`);
  if (alter.missing_ok) throw new AlterError('ALTER TABLE IF EXISTS: name a table that exists');
  const schema: string = alter.relation.schemaname ?? 'public';
  const table: string = alter.relation.relname;
  if (INTERNAL_SCHEMAS.has(schema)) throw new AlterError(`table ${schema}.${table}: schema ${schema} is internal to the project`);
  const refused: string[] = [];
  for (const { AlterTableCmd: cmd } of alter.cmds) {
    const why = refusal(cmd);
    if (why) refused.push(why);
  }
  if (refused.length) {
    throw new AlterError(`not supported by an online migration: ${refused.join('; ')} (supported: ${Object.values(SUPPORTED).join(', ')}; run other changes directly)`);
  }
  const text = Buffer.from(sql, 'utf8');
  const start = alter.relation.location as number;
  const end = nameEnd(text, start);
  return { schema, table, head: text.subarray(0, start).toString('utf8'), tail: text.subarray(end).toString('utf8').replace(/[\s;]+$/, '') };
}

/** The statement run on another table (the shadow): the same subcommands, that table's name in place of the original's. */
export const forTable = (a: ParsedAlter, qualified: string) => `${a.head}${qualified}${a.tail}`;

function refusal(cmd: any): string | undefined {
  const subtype: string = cmd.subtype;
  if (!(subtype in SUPPORTED)) return spoken(subtype);
  const column = cmd.def?.ColumnDef;
  if (subtype === 'AT_AddColumn') {
    const kinds = (column.constraints ?? []).map((c: any) => c.Constraint.contype as string)
      .filter((k: string) => !['CONSTR_DEFAULT', 'CONSTR_NOTNULL', 'CONSTR_NULL', 'CONSTR_CHECK'].includes(k));
    if (kinds.length) return `ADD COLUMN ${column.colname} with ${kinds.map((k: string) => k.replace('CONSTR_', '')).join(', ')}`;
  }
  if (subtype === 'AT_AlterColumnType' && column.raw_default) return `ALTER COLUMN ${cmd.name} TYPE ... USING (values move with the implicit cast only)`;
  if (subtype === 'AT_AddConstraint' && cmd.def.Constraint.contype !== 'CONSTR_CHECK') return `ADD CONSTRAINT ${cmd.def.Constraint.contype.replace('CONSTR_', '')} (only CHECK constraints)`;
  return undefined;
}

/** The byte offset just past a possibly qualified, possibly quoted name starting at `at`. */
function nameEnd(text: Buffer, at: number): number {
  let i = at;
  for (;;) {
    if (text[i] === 0x22) { // "quoted", with "" inside
      i++;
      while (i < text.length && !(text[i] === 0x22 && text[i + 1] !== 0x22)) i += text[i] === 0x22 ? 2 : 1;
      i++;
    } else {
      while (i < text.length && (text[i] >= 0x80 || /[\p{L}\p{N}_$]/u.test(String.fromCharCode(text[i])))) i++;
    }
    let j = i;
    while (j < text.length && /\s/.test(String.fromCharCode(text[j]))) j++;
    if (text[j] !== 0x2e) return i; // no "." follows: the name ends here
    j++;
    while (j < text.length && /\s/.test(String.fromCharCode(text[j]))) j++;
    i = j;
  }
}

/**
 * The columns of `to` that the rows of `from` fill, with `to`'s types: a
 * column only `to` has is left to its default (an added column, or going
 * back, a dropped one), a column only `from` has is left out, and a column
 * whose type changed is cast from the value's text to its new type.
 */
export function mappedColumns(from: Column[], to: Column[]): Column[] {
  const names = new Set(from.map((c) => c.name));
  return to.filter((c) => names.has(c.name));
}
