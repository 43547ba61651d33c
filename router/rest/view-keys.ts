/**
 * Keys and foreign keys of views, inferred from their base tables the way
 * PostgREST 12 does it: a view column that is a plain reference to a table
 * column (through joins, subqueries and other views) carries that column's
 * primary-key and foreign-key roles, when every column of the key is in the
 * view. The column origins come from the view's rewrite rule (pg_rewrite's
 * ev_action, the planner's node tree), whose top-level target list records
 * each output column's origin table and column (resorigtbl, resorigcol).
 */
import type { ForeignKey } from './schema-cache.ts';

/** A node of a pg_node_tree: `{TYPE :field value ...}`. */
export interface TreeNode { type: string; fields: Record<string, TreeValue> }
export type TreeValue = TreeNode | TreeValue[] | string | null;

/**
 * Reads the text form of a pg_node_tree (outfuncs.c): nodes in braces, lists in
 * parentheses, `<>` for NULL, other tokens as strings (a backslash escapes
 * the next character). A field's value is the items up to the next field.
 */
export function parseNodeTree(text: string): TreeValue {
  const tokens = tokenize(text);
  let i = 0;
  const item = (): TreeValue => {
    const t = tokens[i++];
    if (t.kind === 'open' && t.text === '{') {
      const node: TreeNode = { type: tokens[i++]?.text ?? '', fields: {} };
      while (i < tokens.length && !(tokens[i].kind === 'close' && tokens[i].text === '}')) {
        const field = tokens[i++];
        const values: TreeValue[] = [];
        while (i < tokens.length && !isField(tokens[i]) && !(tokens[i].kind === 'close' && tokens[i].text === '}')) values.push(item());
        if (isField(field)) node.fields[field.text.slice(1)] = values.length === 0 ? null : values.length === 1 ? values[0] : values;
      }
      i++;
      return node;
    }
    if (t.kind === 'open') {
      const list: TreeValue[] = [];
      while (i < tokens.length && !(tokens[i].kind === 'close' && tokens[i].text === ')')) list.push(item());
      i++;
      return list;
    }
    return t.kind === 'word' && t.text === '<>' ? null : t.text;
  };
  return tokens.length ? item() : null;
}

interface Token { kind: 'open' | 'close' | 'word' | 'escaped'; text: string }
const isField = (t: Token) => t.kind === 'word' && t.text.startsWith(':');

function tokenize(text: string): Token[] {
  const tokens: Token[] = [];
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === ' ' || c === '\n' || c === '\t' || c === '\r') { i++; continue; }
    if (c === '{' || c === '(') { tokens.push({ kind: 'open', text: c }); i++; continue; }
    if (c === '}' || c === ')') { tokens.push({ kind: 'close', text: c }); i++; continue; }
    let word = '';
    let escaped = false;
    while (i < text.length && !' \n\t\r{}()'.includes(text[i])) {
      if (text[i] === '\\' && i + 1 < text.length) { escaped = true; i++; }
      word += text[i++];
    }
    tokens.push({ kind: escaped ? 'escaped' : 'word', text: word });
  }
  return tokens;
}

/** Where each column of a view comes from: its position, and the table (or view) oid and column number it references. */
export function columnOrigins(definition: string): { column: number; table: number; tableColumn: number }[] {
  const tree = parseNodeTree(definition);
  const query = Array.isArray(tree) ? tree[0] : tree;
  if (!query || typeof query !== 'object' || Array.isArray(query)) return [];
  const targets = query.fields.targetList;
  const origins = [];
  for (const entry of Array.isArray(targets) ? targets : []) {
    if (!entry || typeof entry !== 'object' || Array.isArray(entry) || entry.type !== 'TARGETENTRY') continue;
    const table = Number(entry.fields.resorigtbl);
    if (table > 0) origins.push({ column: Number(entry.fields.resno), table, tableColumn: Number(entry.fields.resorigcol) });
  }
  return origins;
}

export interface ViewSource { oid: number; schema: string; name: string; definition: string; columns: Record<string, string> }
export interface Relation { oid: number; schema: string; name: string }
/** A primary key or a foreign key (with its referenced side), columns as numbers and names in key order. */
export interface KeyConstraint {
  name: string;
  type: 'p' | 'f';
  table: Relation & { attnums: number[]; columns: string[] };
  ref: (Relation & { attnums: number[]; columns: string[] }) | null;
  /** A foreign key whose columns are a primary or unique key of their table. */
  oneToOne: boolean;
}

/** A view's use of one key: for each key column, the view columns that show it (one key column may appear several times). */
interface KeyUse { view: ViewSource; columns: string[][] }

export interface ViewKeys {
  /** Views' primary keys, by view oid. */
  primaryKeys: Map<number, string[]>;
  /** Foreign keys from views to tables, tables to views and views to views, named after the table FK they come from. */
  foreignKeys: ForeignKey[];
}

export function inferViewKeys(views: ViewSource[], constraints: KeyConstraint[]): ViewKeys {
  const origins = new Map(views.map((v) => [v.oid, new Map(columnOrigins(v.definition).map((o) => [o.column, o]))]));
  // for each view: the view columns showing each table column `oid:attnum`, following views down to their tables
  const shown = new Map<number, Map<string, string[]>>();
  for (const view of views) {
    const columns = new Map<string, string[]>();
    for (const [attnum, name] of Object.entries(view.columns).sort(([a], [b]) => Number(a) - Number(b))) {
      const seen = new Set<number>();
      for (let o = origins.get(view.oid)?.get(Number(attnum)); o && !seen.has(o.table); o = origins.get(o.table)?.get(o.tableColumn)) {
        seen.add(o.table);
        const key = `${o.table}:${o.tableColumn}`;
        columns.set(key, [...(columns.get(key) ?? []), name]);
      }
    }
    shown.set(view.oid, columns);
  }
  // the views showing every column of one side of a key (no partial keys)
  const uses = (side: { oid: number; attnums: number[] }): KeyUse[] => views.flatMap((view) => {
    const columns = side.attnums.map((a) => shown.get(view.oid)!.get(`${side.oid}:${a}`));
    return columns.every((c) => c) ? [{ view, columns: columns as string[][] }] : [];
  });

  const primaryKeys = new Map<number, string[]>();
  for (const pk of constraints.filter((k) => k.type === 'p')) {
    // a key column shown several times: the first of them
    for (const use of uses(pk.table)) primaryKeys.set(use.view.oid, [...(primaryKeys.get(use.view.oid) ?? []), ...use.columns.map((c) => c[0])]);
  }
  const foreignKeys: ForeignKey[] = [];
  for (const fk of constraints.filter((k) => k.type === 'f' && k.ref)) {
    const ref = fk.ref!;
    const fromViews = uses(fk.table).flatMap((u) => combinations(u.columns).map((columns) => ({ view: u.view, columns })));
    const toViews = uses(ref).flatMap((u) => combinations(u.columns).map((columns) => ({ view: u.view, columns })));
    const add = (from: Relation, columns: string[], to: Relation, refColumns: string[]) => foreignKeys.push({
      name: fk.name, schema: from.schema, table: from.name, columns, refSchema: to.schema, refTable: to.name, refColumns, oneToOne: fk.oneToOne,
    });
    for (const v of fromViews) add(v.view, v.columns, ref, ref.columns);
    for (const w of toViews) add(fk.table, fk.table.columns, w.view, w.columns);
    for (const v of fromViews) for (const w of toViews) add(v.view, v.columns, w.view, w.columns);
  }
  return { primaryKeys, foreignKeys };
}

/** Every way of picking one view column per key column. */
function combinations(choices: string[][]): string[][] {
  return choices.reduce<string[][]>((acc, options) => acc.flatMap((picked) => options.map((o) => [...picked, o])), [[]]);
}
