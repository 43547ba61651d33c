/**
 * PostgREST's request language (query string and headers) parsed into a tree:
 * select items, filters with and/or/not, order, limits, Prefer. Nothing here
 * touches SQL; names are checked against the schema cache when SQL is built.
 */
import { parseError, RestError } from './errors.ts';

export interface JsonStep { arrow: '->' | '->>'; key: string }
export interface Field { column: string; json: JsonStep[] }

export type SelectItem =
  | { kind: 'star' }
  | { kind: 'field'; field: Field; alias?: string; cast?: string }
  /** `spread`: `...rel(cols)`, the embedded row's columns in the parent object. */
  | { kind: 'embed'; name: string; alias?: string; hint?: string; inner: boolean; spread: boolean; select: SelectItem[] };

export type Condition =
  | { kind: 'filter'; field: Field; negate: boolean; op: string; config?: string; value: string | string[] }
  | { kind: 'logic'; op: 'and' | 'or'; negate: boolean; children: Condition[] };

export interface OrderTerm { field: Field; dir?: 'asc' | 'desc'; nulls?: 'first' | 'last' }

/** What applies to one resource of the request: the top one ('' path) or an embedded one ('projects', 'projects.tasks'). */
export interface NodeOptions { where: Condition[]; order: OrderTerm[]; limit?: number; offset?: number }

export const FILTER_OPS = new Set(['eq', 'neq', 'gt', 'gte', 'lt', 'lte', 'like', 'ilike', 'match', 'imatch', 'in', 'is',
  'isdistinct', 'fts', 'plfts', 'phfts', 'wfts', 'cs', 'cd', 'ov', 'sl', 'sr', 'nxr', 'nxl', 'adj']);
const FTS_OPS = new Set(['fts', 'plfts', 'phfts', 'wfts']);
const IS_VALUES = new Set(['null', 'not_null', 'true', 'false', 'unknown']);
/** Query parameters that are not filters. */
export const RESERVED_PARAMS = new Set(['select', 'order', 'limit', 'offset', 'on_conflict', 'columns']);

/** Splits on `sep` outside parentheses and double quotes. */
export function splitTop(s: string, sep = ','): string[] {
  const out: string[] = [];
  let depth = 0, quoted = false, start = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s[i];
    if (c === '\\' && quoted) { i++; continue; }
    if (c === '"') quoted = !quoted;
    else if (!quoted && c === '(') depth++;
    else if (!quoted && c === ')') depth--;
    else if (!quoted && depth === 0 && c === sep) { out.push(s.slice(start, i)); start = i + 1; }
  }
  out.push(s.slice(start));
  return out;
}

const unquote = (s: string) => (s.length >= 2 && s.startsWith('"') && s.endsWith('"') ? s.slice(1, -1).replace(/\\(.)/g, '$1') : s);

const NAME = String.raw`(?:"(?:[^"\\]|\\.)+"|[^\s"(),.:!>\-]+(?:-(?!>)[^\s"(),.:!>\-]*)*)`;
const NAME_RE = new RegExp(`^${NAME}$`);

/** `col`, `col->a->>b`, `col->0`. */
export function parseField(s: string, what: string): Field {
  const parts = s.split(/(->>|->)/);
  const column = parts[0].trim();
  if (!column || !NAME_RE.test(column)) throw parseError(what, `unexpected "${s.slice(0, 1)}" expecting field name (* or [a..z0..9_$])`);
  const json: JsonStep[] = [];
  for (let i = 1; i < parts.length; i += 2) {
    const key = parts[i + 1];
    if (!key) throw parseError(what, `unexpected end of input expecting json path key`);
    json.push({ arrow: parts[i] as JsonStep['arrow'], key: unquote(key) });
  }
  return { column: unquote(column), json };
}

export function parseSelect(s: string): SelectItem[] {
  const what = `select parameter (${s})`;
  if (s.trim() === '') return [];
  return splitTop(s).map((raw) => {
    const item = raw.trim();
    if (item === '*') return { kind: 'star' } as const;
    if (item === '') throw parseError(what, 'unexpected empty select item');
    const paren = item.indexOf('(');
    if (paren > 0 && item.endsWith(')')) {
      let head = item.slice(0, paren);
      const spread = head.startsWith('...');
      if (spread) head = head.slice(3);
      let alias: string | undefined;
      const colon = head.indexOf(':');
      if (colon > 0 && !spread) { alias = unquote(head.slice(0, colon)); head = head.slice(colon + 1); }
      const [name, ...bangs] = head.split('!');
      let inner = false, hint: string | undefined;
      for (const b of bangs) {
        if (b === 'inner') inner = true;
        else if (b === 'left') inner = false;
        else if (hint === undefined && b) hint = b;
        else throw parseError(what, `unexpected "!" in embedding ${head}`);
      }
      if (!name || !NAME_RE.test(name)) throw parseError(what, `unexpected "${name.slice(0, 1)}" expecting field name`);
      return { kind: 'embed', name: unquote(name), alias, hint, inner, spread, select: parseSelect(item.slice(paren + 1, -1)) } as const;
    }
    let rest = item, alias: string | undefined, cast: string | undefined;
    const castAt = rest.lastIndexOf('::');
    if (castAt > 0) { cast = rest.slice(castAt + 2).trim(); rest = rest.slice(0, castAt); }
    const colon = rest.search(/:(?!:)/);
    if (colon > 0 && !rest.slice(0, colon).includes('->')) { alias = unquote(rest.slice(0, colon)); rest = rest.slice(colon + 1); }
    if (cast !== undefined && !/^[a-z][a-z0-9_ ]*$/i.test(cast)) throw parseError(what, `unexpected "${cast.slice(0, 1)}" expecting cast type`);
    return { kind: 'field', field: parseField(rest, what), alias, cast };
  });
}

/** The value side of a filter: `[not.]op[(config)].value`. */
export function parseFilterValue(field: Field, raw: string, where: string): Condition {
  let s = raw, negate = false;
  if (s.startsWith('not.')) { negate = true; s = s.slice(4); }
  const m = /^([a-z]+)(?:\(([^)]*)\))?\.([\s\S]*)$/.exec(s);
  if (!m || !FILTER_OPS.has(m[1])) {
    throw parseError(`filter (${raw})`, `unexpected "${s.slice(0, 1)}" expecting "not" or operator (eq, gt, ...)`);
  }
  const [, op, config, value] = m;
  const valueColumn = raw.length - value.length + 1;
  const unexpected = value ? `unexpected "${value[0]}"` : 'unexpected end of input';
  if (config !== undefined && !FTS_OPS.has(op)) throw parseError(`filter (${raw})`, `unexpected "(" after operator ${op}`);
  if (op === 'in') {
    if (!value.startsWith('(')) throw parseError(`filter (${raw})`, `${unexpected} expecting "("`, valueColumn);
    if (!value.endsWith(')')) throw parseError(`filter (${raw})`, 'unexpected end of input expecting "," or ")"', raw.length + 1);
    const inner = value.slice(1, -1);
    return { kind: 'filter', field, negate, op, value: inner === '' ? [] : splitTop(inner).map((v) => unquote(v.trim() === v ? v : v)) };
  }
  if (op === 'is' && !IS_VALUES.has(value.toLowerCase())) {
    throw parseError(`filter (${raw})`, `${unexpected} expecting null or trilean value (unknown, true, false)`, valueColumn);
  }
  void where;
  return { kind: 'filter', field, negate, op, config, value: op === 'is' ? value.toLowerCase() : value };
}

/** `(a.eq.1,or(b.is.null,c.gt.2))` after `and`/`or` (negate: `not.or`). */
export function parseLogic(op: 'and' | 'or', negate: boolean, raw: string): Condition {
  const what = `logic tree (${raw})`;
  if (!raw.startsWith('(') || !raw.endsWith(')')) throw parseError(what, 'unexpected end of input expecting "("');
  const inner = raw.slice(1, -1);
  if (inner.trim() === '') throw parseError(what, 'unexpected ")" expecting filter');
  const children = splitTop(inner).map((item): Condition => {
    const lm = /^(not\.)?(and|or)(\(.*\))$/s.exec(item);
    if (lm) return parseLogic(lm[2] as 'and' | 'or', !!lm[1], lm[3]);
    const parts = splitFieldAndValue(item);
    if (!parts) throw parseError(what, `unexpected "${item.slice(0, 1)}" expecting filter`);
    return parseFilterValue(parseField(parts[0], what), parts[1], what);
  });
  return { kind: 'logic', op, negate, children };
}

/** `col->a.eq.1` -> [`col->a`, `eq.1`]: the field ends at the first dot outside quotes. */
function splitFieldAndValue(item: string): [string, string] | null {
  let quoted = false;
  for (let i = 0; i < item.length; i++) {
    if (item[i] === '"') quoted = !quoted;
    else if (item[i] === '.' && !quoted) return [item.slice(0, i), item.slice(i + 1)];
  }
  return null;
}

export function parseOrder(raw: string): OrderTerm[] {
  let at = 0;
  return splitTop(raw).map((term) => {
    const parts = term.split('.');
    const modifiers = parts.splice(1);
    const t: OrderTerm = { field: parseField(parts[0], `order (${raw})`) };
    let column = at + parts[0].length + 2;
    for (const m of modifiers) {
      if (m === 'asc' || m === 'desc') t.dir = m;
      else if (m === 'nullsfirst') t.nulls = 'first';
      else if (m === 'nullslast') t.nulls = 'last';
      else throw parseError(`order (${raw})`, `unexpected "${m.slice(0, 1)}" expecting "asc", "desc", "nullsfirst" or "nullslast"`, column);
      column += m.length + 1;
    }
    at += term.length + 1;
    return t;
  });
}

/** A limit or offset that is not a number is ignored, as PostgREST 12 does. */
function parseNonNegative(raw: string): number | undefined {
  return /^\d{1,15}$/.test(raw) ? Number(raw) : undefined;
}

export interface ParsedQuery {
  select: SelectItem[];
  /** By embed path ('' for the top resource). */
  nodes: Map<string, NodeOptions>;
  onConflict?: string[];
  columns?: string[];
}

/**
 * The query string of a table or RPC request. `args` names parameters that are
 * function arguments (GET /rpc), not filters.
 */
export function parseQuery(params: [string, string][], args: Set<string> = new Set()): ParsedQuery {
  const q: ParsedQuery = { select: [{ kind: 'star' }], nodes: new Map() };
  const node = (path: string) => {
    let n = q.nodes.get(path);
    if (!n) q.nodes.set(path, (n = { where: [], order: [] }));
    return n;
  };
  node('');
  for (const [key, value] of params) {
    if (args.has(key)) continue;
    if (key === 'select') { q.select = parseSelect(value); continue; }
    if (key === 'on_conflict') { q.onConflict = splitTop(value).map((c) => unquote(c.trim())); continue; }
    if (key === 'columns') { q.columns = splitTop(value).map((c) => unquote(c.trim())); continue; }
    const segments = key.split('.');
    let last = segments.pop()!;
    let negate = false;
    if ((last === 'or' || last === 'and') && segments[segments.length - 1] === 'not') { segments.pop(); negate = true; }
    const path = segments.join('.');
    if (last === 'order') node(path).order.push(...parseOrder(value));
    else if (last === 'limit') node(path).limit = parseNonNegative(value) ?? node(path).limit;
    else if (last === 'offset') node(path).offset = parseNonNegative(value) ?? node(path).offset;
    else if (last === 'or' || last === 'and') node(path).where.push(parseLogic(last, negate, value));
    else {
      // a JSON path's keys may hold dots only inside the last segment's arrows
      const arrow = key.indexOf('->');
      if (arrow >= 0) {
        const head = key.slice(0, arrow).split('.');
        last = head.pop()! + key.slice(arrow);
        node(head.join('.')).where.push(parseFilterValue(parseField(last, `filter (${key})`), value, key));
      } else {
        node(path).where.push(parseFilterValue(parseField(last, `filter (${key})`), value, key));
      }
    }
  }
  return q;
}

export interface Prefer {
  return?: 'minimal' | 'headers-only' | 'representation';
  count?: 'exact' | 'planned' | 'estimated';
  resolution?: 'merge-duplicates' | 'ignore-duplicates';
  missing?: 'default' | 'null';
  tx?: 'commit' | 'rollback';
  /** RPC: the whole body (or query string) is the function's one json/jsonb argument. */
  params?: 'single-object';
}

const PREFER_VALUES: Record<keyof Prefer, string[]> = {
  return: ['minimal', 'headers-only', 'representation'],
  count: ['exact', 'planned', 'estimated'],
  resolution: ['merge-duplicates', 'ignore-duplicates'],
  missing: ['default', 'null'],
  tx: ['commit', 'rollback'],
  params: ['single-object'],
};

/** Unknown or malformed preferences are ignored, as PostgREST 12 does by default (handling=lenient). */
export function parsePrefer(header: string | string[] | undefined): Prefer {
  const p: Record<string, string> = {};
  const all = Array.isArray(header) ? header.join(',') : header ?? '';
  for (const part of all.split(',')) {
    const [k, v] = part.trim().split('=').map((x) => x?.trim());
    if (k in PREFER_VALUES && v && PREFER_VALUES[k as keyof Prefer].includes(v) && !(k in p)) p[k] = v;
  }
  return p as Prefer;
}

/** `Range: 0-9` (items). */
export function parseRange(header: string | undefined): { offset: number; limit?: number } | undefined {
  if (!header) return undefined;
  const m = /^(?:items=)?\s*(\d+)-(\d*)$/.exec(header.trim());
  if (!m) return undefined;
  const from = Number(m[1]);
  if (m[2] === '') return { offset: from };
  const to = Number(m[2]);
  if (to < from) throw new RestError(416, 'PGRST103', 'Requested range not satisfiable', 'The lower boundary must be lower than or equal to the upper boundary in the Range header.');
  return { offset: from, limit: to - from + 1 };
}

/**
 * CSV records (RFC 4180: `,` between fields, CRLF or LF between records,
 * `"` quoting with `""` inside), leniently as PostgREST reads them: an
 * unterminated quote runs to the end, a final line break ends no record.
 */
export function parseCsv(text: string): string[][] {
  const records: string[][] = [];
  let record: string[] = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c !== '"') field += c;
      else if (text[i + 1] === '"') { field += '"'; i++; } else quoted = false;
    } else if (c === '"' && field === '') quoted = true;
    else if (c === ',') { record.push(field); field = ''; }
    else if (c === '\n' || (c === '\r' && text[i + 1] === '\n')) {
      if (c === '\r') i++;
      records.push([...record, field]);
      record = [];
      field = '';
    } else field += c;
  }
  if (field !== '' || record.length) records.push([...record, field]);
  return records;
}
