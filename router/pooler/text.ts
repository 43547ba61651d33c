/** Text helpers of the pooler: SQL quoting, startup `options` splitting, a coarse clock. */

let coarse = Date.now();
setInterval(() => {
  coarse = Date.now();
}, 20).unref();
/** Wall clock in ms, updated every 20 ms: for bookkeeping on the hot path (idle times, SHOW output). */
export const coarseNow = () => coarse;

/** SQL string literal that means the same with standard_conforming_strings on or off. */
export function quoteLiteral(s: string): string {
  return s.includes('\\') ? `E'${s.replace(/\\/g, '\\\\').replace(/'/g, "''")}'` : `'${s.replace(/'/g, "''")}'`;
}

export function quoteIdent(s: string): string {
  return `"${s.replace(/"/g, '""')}"`;
}

/** Splits a startup `options` string as Postgres does (pg_split_opts): whitespace separates, backslash escapes. */
export function splitOptions(s: string): string[] {
  const out: string[] = [];
  let cur = '';
  let inTok = false;
  for (let i = 0; i < s.length; i++) {
    const ch = s[i];
    if (ch === '\\' && i + 1 < s.length) {
      cur += s[++i];
      inTok = true;
    } else if (/\s/.test(ch)) {
      if (inTok) out.push(cur);
      cur = '';
      inTok = false;
    } else {
      cur += ch;
      inTok = true;
    }
  }
  if (inTok) out.push(cur);
  return out;
}
