/**
 * Byte-level edits of statement text, for the few rewrites the planner makes
 * (per-shard LIMIT, splitting a multi-row INSERT). libpg-query reports byte
 * offsets into the UTF-8 text, so all of this works on a Buffer.
 */

const OPEN = 0x28; // (
const CLOSE = 0x29; // )
const QUOTE = 0x27; // '
const DQUOTE = 0x22; // "
const DOLLAR = 0x24;
export const isSpace = (c: number) => c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d || c === 0x0c;

/** The byte just past the token that starts at `at` (a number, $n, ALL, or a minus sign and a number). */
export function tokenEnd(text: Buffer, at: number): number {
  const m = /^(-?\s*\d+(\.\d+)?|\$\d+|all)/i.exec(text.toString('latin1', at, Math.min(text.length, at + 40)));
  if (!m) throw new Error(`no token at byte ${at}`);
  return at + m[0].length;
}

/** Replaces byte ranges (not overlapping) with new text. */
export function splice(text: Buffer, edits: Array<{ start: number; end: number; text: string }>): Buffer {
  const out: Buffer[] = [];
  let at = 0;
  for (const e of [...edits].sort((a, b) => a.start - b.start)) {
    out.push(text.subarray(at, e.start), Buffer.from(e.text, 'utf8'));
    at = e.end;
  }
  out.push(text.subarray(at));
  return Buffer.concat(out);
}

/** Skips a quoted string, dollar-quoted body or comment starting at i; returns where it ends, or i when none starts there. */
function skipOpaque(text: Buffer, i: number): number {
  const c = text[i];
  if (c === QUOTE) {
    const escapes = i > 0 && (text[i - 1] === 0x45 || text[i - 1] === 0x65); // E'...'
    for (let j = i + 1; j < text.length; j++) {
      if (escapes && text[j] === 0x5c) j++;
      else if (text[j] === QUOTE) {
        if (text[j + 1] === QUOTE) j++;
        else return j + 1;
      }
    }
    return text.length;
  }
  if (c === DQUOTE) {
    const j = text.indexOf(DQUOTE, i + 1);
    return j < 0 ? text.length : j + 1;
  }
  if (c === 0x2d && text[i + 1] === 0x2d) { // -- comment
    const j = text.indexOf(0x0a, i);
    return j < 0 ? text.length : j + 1;
  }
  if (c === 0x2f && text[i + 1] === 0x2a) { // /* comment */
    const j = text.indexOf('*/', i + 2);
    return j < 0 ? text.length : j + 2;
  }
  if (c === DOLLAR) {
    const m = /^\$([A-Za-z_][A-Za-z0-9_]*)?\$/.exec(text.toString('latin1', i, Math.min(text.length, i + 64)));
    if (!m) return i; // $1: a parameter
    const j = text.indexOf(m[0], i + m[0].length);
    return j < 0 ? text.length : j + m[0].length;
  }
  return i;
}

/**
 * The byte spans of the rows of a VALUES list, given where the first row's
 * first item starts: [open paren, just past the close paren] per row, and
 * where the list ends.
 */
export function valuesRowSpans(text: Buffer, firstItem: number, rows: number): { spans: Array<[number, number]>; end: number } {
  let i = firstItem - 1;
  while (i >= 0 && text[i] !== OPEN) i--;
  if (i < 0) throw new Error('no ( before the first VALUES row');
  const spans: Array<[number, number]> = [];
  while (spans.length < rows) {
    while (i < text.length && (isSpace(text[i]) || text[i] === 0x2c)) i++;
    if (text[i] !== OPEN) throw new Error(`expected ( at byte ${i}`);
    const start = i;
    let depth = 0;
    for (; i < text.length; i++) {
      const skipped = skipOpaque(text, i);
      if (skipped !== i) {
        i = skipped - 1;
        continue;
      }
      if (text[i] === OPEN) depth++;
      else if (text[i] === CLOSE && --depth === 0) break;
    }
    spans.push([start, ++i]);
  }
  return { spans, end: i };
}

/** A literal of a statement's text: where it starts, and its value as the parser gives it. */
export interface Literal { at: number; value: string }

const isIdent = (c: number) => (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c === 0x5f || c === DOLLAR;
const isDigit = (c: number) => c >= 0x30 && c <= 0x39;

/**
 * The statement with its numeric and string literals replaced by markers (the
 * key of its shape), and the literals in order. Only for ASCII text (so string
 * and byte offsets agree); undefined otherwise. Statements that differ only in
 * literals share a key, so a plan made for one serves the others.
 */
export function literalShape(sql: string): { key: string; literals: Literal[] } | undefined {
  const literals: Literal[] = [];
  let key = '';
  let i = 0;
  let copied = 0;
  const n = sql.length;
  while (i < n) {
    const c = sql.charCodeAt(i);
    if (c > 0x7f) return undefined;
    const prevIdent = i > 0 && isIdent(sql.charCodeAt(i - 1));
    if (c === QUOTE && !prevIdent) {
      let j = i + 1;
      let value = '';
      for (;;) {
        if (j >= n) return undefined;
        if (sql.charCodeAt(j) === QUOTE) {
          if (sql.charCodeAt(j + 1) === QUOTE) {
            value += "'";
            j += 2;
            continue;
          }
          break;
        }
        value += sql[j++];
      }
      key += `${sql.slice(copied, i)}\u0001s`;
      literals.push({ at: i, value });
      i = copied = j + 1;
      continue;
    }
    if (isDigit(c) && !prevIdent) {
      let j = i;
      while (j < n && isDigit(sql.charCodeAt(j))) j++;
      const next = sql.charCodeAt(j);
      // 1.5, 1e3, 0x1F, 007 (which the parser reads as 7): leave to the parser
      if (next === 0x2e || next === 0x65 || next === 0x45 || (j < n && isIdent(next)) || (c === 0x30 && j > i + 1)) return undefined;
      key += `${sql.slice(copied, i)}\u0001n`;
      literals.push({ at: i, value: sql.slice(i, j) });
      i = copied = j;
      continue;
    }
    const skipped = c === QUOTE || c === DQUOTE || c === DOLLAR || c === 0x2d || c === 0x2f ? skipOpaqueText(sql, i) : i;
    i = skipped > i ? skipped : i + 1;
  }
  return { key: key + sql.slice(copied), literals };
}

/** skipOpaque over a string (ASCII, so the byte scanner applies). */
const skipOpaqueText = (sql: string, i: number) => skipOpaque(Buffer.from(sql, 'latin1'), i);

/** The byte of the `)` that closes a list whose last item starts at `at` (skipping quoted names). */
/** The length of `sql` without a trailing `;` and the spaces around it. */
export function withoutTrailingSemicolon(sql: string): number {
  let end = sql.length;
  while (end > 0 && (sql.charCodeAt(end - 1) === 0x3b || sql.charCodeAt(end - 1) <= 0x20)) end--;
  return end;
}

export function closeParenAfter(text: Buffer, at: number): number {
  for (let i = at; i < text.length; i++) {
    const skipped = skipOpaque(text, i);
    if (skipped !== i) {
      i = skipped - 1;
      continue;
    }
    if (text[i] === CLOSE) return i;
  }
  throw new Error(`no ) after byte ${at}`);
}

/**
 * The text with its parameters numbered $1, $2, ... in order of first use, and
 * the old number of each (1-based): what one shard is sent of a statement whose
 * other rows went elsewhere, so it is bound only with the parameters it uses.
 */
export function renumberParams(text: Buffer): { text: Buffer; used: number[] } {
  const used: number[] = [];
  const edits: Array<{ start: number; end: number; text: string }> = [];
  for (let i = 0; i < text.length; i++) {
    const skipped = skipOpaque(text, i);
    if (skipped !== i) {
      i = skipped - 1;
      continue;
    }
    if (text[i] !== DOLLAR || (i > 0 && isIdent(text[i - 1])) || !isDigit(text[i + 1])) continue;
    let j = i + 1;
    while (j < text.length && isDigit(text[j])) j++;
    const n = Number(text.toString('latin1', i + 1, j));
    if (!used.includes(n)) used.push(n);
    edits.push({ start: i, end: j, text: `$${used.indexOf(n) + 1}` });
    i = j - 1;
  }
  return { text: edits.length ? splice(text, edits) : text, used };
}

/** Where a keyword (lower case) first stands outside parentheses, quotes and comments, as a whole word; -1 when it does not. */
export function topLevelKeyword(text: Buffer, keyword: string): number {
  let depth = 0;
  for (let i = 0; i < text.length; i++) {
    const skipped = skipOpaque(text, i);
    if (skipped !== i) {
      i = skipped - 1;
      continue;
    }
    const c = text[i];
    if (c === OPEN) depth++;
    else if (c === CLOSE) depth--;
    else if (depth === 0 && (i === 0 || !isIdent(text[i - 1])) && !isIdent(text[i + keyword.length] ?? 0x20)
      && text.toString('latin1', i, i + keyword.length).toLowerCase() === keyword) return i;
  }
  return -1;
}

/**
 * The bytes where an expression that starts at `start` may end, nearest first: after each token
 * outside parentheses, quotes and comments, up to a `)` that closes an outer parenthesis or a `;`.
 */
export function* tokenEnds(text: Buffer, start: number): Generator<number> {
  let depth = 0;
  for (let i = start; i < text.length; i++) {
    const skipped = skipOpaque(text, i);
    if (skipped !== i) {
      i = skipped - 1;
      if (depth === 0) yield skipped;
      continue;
    }
    const c = text[i];
    if (c === OPEN) depth++;
    else if (c === CLOSE && --depth < 0) return;
    else if (c === 0x3b && depth === 0) return;
    if (depth === 0 && !isSpace(c) && !(isIdent(c) && isIdent(text[i + 1] ?? 0x20))) yield i + 1;
  }
}
