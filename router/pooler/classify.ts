/**
 * Which statements change session state. A cheap case-insensitive prefilter runs
 * on every query; only queries it flags are parsed with libpg-query (the real
 * Postgres parser), and results are cached per SQL text.
 */
import { loadModule, parseSync } from 'libpg-query';
import { setConfigSql } from './settings.ts';

export type PinReason = 'temp' | 'advisory' | 'cursor' | 'prepare' | 'listen' | 'load' | 'dblink' | 'setseed' | 'unknown';

export type Effect =
  | { t: 'set'; name: string; sql: string }
  | { t: 'reset'; name: string }
  | { t: 'resetAll' }
  /** set_config whose value (or whether it ran at all) is only known after the fact: re-read it. */
  | { t: 'dynamic'; name: string }
  | { t: 'pin'; reason: PinReason }
  | { t: 'unpin'; reason: PinReason }
  | { t: 'discardAll' }
  | { t: 'deallocate'; name: string | null }
  | { t: 'listen'; channel: string }
  | { t: 'unlisten'; channel: string | null }
  | { t: 'savepoint'; name: string }
  | { t: 'release'; name: string }
  | { t: 'rollbackTo'; name: string }
  /** DROP DATABASE: before it runs, this pooler's idle server connections to that database close (else Postgres refuses: 55006). */
  | { t: 'releaseDatabase'; name: string }
  /** The statement must not run (it would weaken the durability policy): refused with 42501. */
  | { t: 'forbidden'; message: string; detail: string };

/** One statement of a query: what its successful completion does to the session. */
export interface StmtEffects {
  effects: Effect[];
}

/** Per statement, in order; null when the query touches no session state. */
export type Classified = StmtEffects[] | null;

/** Keyword at the start of a statement (comments allowed before it), or a telltale function/word anywhere. */
const PREFILTER = new RegExp(
  String.raw`(?:^|;)(?:\s|/\*[\s\S]*?\*/|--[^\n]*(?:\n|$))*` +
    String.raw`(?:set|reset|discard|listen|unlisten|prepare|deallocate|declare|load|savepoint|release|close|drop\s+database|rollback\s+(?:(?:work|transaction)\s+)?to)\b` +
    String.raw`|set_config|temp|advisory|dblink|setseed|synchronous_commit`,
  'i',
);

export const prefilter = (sql: string) => PREFILTER.test(sql);

const SAVEPOINT_FAST = /^\s*(savepoint|release(?:\s+savepoint)?|rollback(?:\s+work|\s+transaction)?\s+to(?:\s+savepoint)?)\s+([A-Za-z_][A-Za-z0-9_$]*)\s*;?\s*$/i;

let loaded: Promise<void> | undefined;
let ready = false;
/** Loads the WASM parser once; call before serving. */
export function loadParser(): Promise<void> {
  loaded ??= loadModule().then(() => {
    ready = true;
  });
  return loaded;
}

const CACHE_MAX = 4096;
const cache = new Map<string, Classified>();

export function classify(sql: string): Classified {
  if (!PREFILTER.test(sql)) return null;
  const hit = cache.get(sql);
  if (hit !== undefined) return hit;
  const result = classifyUncached(sql);
  if (cache.size >= CACHE_MAX) cache.clear();
  cache.set(sql, result);
  return result;
}

interface RawStmt {
  stmt: Record<string, any>;
  stmt_location?: number;
  stmt_len?: number;
}

function classifyUncached(sql: string): Classified {
  const fast = SAVEPOINT_FAST.exec(sql);
  if (fast) {
    const kw = fast[1].toLowerCase();
    const name = fast[2].toLowerCase();
    const t = kw.startsWith('savepoint') ? 'savepoint' : kw.startsWith('release') ? 'release' : 'rollbackTo';
    return [{ effects: [{ t, name }] }];
  }
  if (!ready) throw new Error('classify() before loadParser()');
  let stmts: RawStmt[];
  try {
    stmts = (parseSync(sql) as { stmts?: RawStmt[] }).stmts ?? [];
  } catch {
    // Postgres will most likely reject it too; if it does not, we cannot know what it did.
    return [{ effects: [{ t: 'pin', reason: 'unknown' }] }];
  }
  // libpg-query speaks UTF-8 byte offsets.
  const bytes = Buffer.from(sql, 'utf8');
  let any = false;
  const out = stmts.map((raw) => {
    const start = raw.stmt_location ?? 0;
    const text = bytes.toString('utf8', start, raw.stmt_len ? start + raw.stmt_len : bytes.length).trim();
    const guard = durabilityGuard(raw.stmt);
    const effects = guard ? [guard] : statementEffects(raw.stmt, text);
    if (effects.length) any = true;
    return { effects };
  });
  return any ? out : null;
}

const boolConst = (n: any): boolean | undefined => {
  const c = n?.A_Const;
  if (!c) return undefined;
  if ('boolval' in c) return Boolean(c.boolval?.boolval);
  if (c.sval) return ['true', 'on', 't', 'yes', '1'].includes(String(c.sval.sval).toLowerCase());
  return undefined;
};

const strConst = (n: any): string | undefined => {
  const c = n?.A_Const;
  if (!c) return undefined;
  if (c.sval) return c.sval.sval ?? '';
  if (c.ival) return String(c.ival.ival ?? 0);
  if ('ival' in c) return '0';
  if (c.fval) return String(c.fval.fval);
  return undefined;
};

const funcName = (fc: any): string => {
  const names = fc?.funcname as Array<{ String?: { sval?: string } }> | undefined;
  return names?.[names.length - 1]?.String?.sval?.toLowerCase() ?? '';
};

const PIN_FUNCS: Record<string, 'advisory' | 'dblink' | 'setseed'> = {
  pg_advisory_lock: 'advisory',
  pg_advisory_lock_shared: 'advisory',
  pg_try_advisory_lock: 'advisory',
  pg_try_advisory_lock_shared: 'advisory',
  dblink_connect: 'dblink',
  dblink_connect_u: 'dblink',
  setseed: 'setseed',
};

function statementEffects(stmt: Record<string, any>, text: string): Effect[] {
  const [type] = Object.keys(stmt);
  const n = stmt[type];
  switch (type) {
    case 'VariableSetStmt': {
      if (n.is_local) return [];
      const name = String(n.name ?? '').toLowerCase();
      switch (n.kind) {
        case 'VAR_SET_VALUE':
          return name === 'session_authorization'
            ? [{ t: 'reset', name: 'role' }, { t: 'set', name, sql: text }]
            : [{ t: 'set', name, sql: text }];
        case 'VAR_SET_DEFAULT':
        case 'VAR_RESET':
          return name === 'session_authorization' ? [{ t: 'reset', name: 'role' }, { t: 'reset', name }] : [{ t: 'reset', name }];
        case 'VAR_SET_CURRENT':
          return [{ t: 'dynamic', name }];
        case 'VAR_RESET_ALL':
          return [{ t: 'resetAll' }];
        case 'VAR_SET_MULTI':
          if (name === 'session characteristics') {
            return (n.args ?? []).map((a: any) => ({ t: 'set', name: `default_${a.DefElem?.defname}`, sql: text }) as Effect);
          }
          return []; // SET TRANSACTION: this transaction only
        default:
          return [{ t: 'pin', reason: 'unknown' }];
      }
    }
    case 'TransactionStmt': {
      const name = String(n.savepoint_name ?? '');
      if (n.kind === 'TRANS_STMT_SAVEPOINT') return [{ t: 'savepoint', name }];
      if (n.kind === 'TRANS_STMT_RELEASE') return [{ t: 'release', name }];
      if (n.kind === 'TRANS_STMT_ROLLBACK_TO') return [{ t: 'rollbackTo', name }];
      return [];
    }
    case 'DiscardStmt':
      if (n.target === 'DISCARD_ALL') return [{ t: 'discardAll' }];
      if (n.target === 'DISCARD_TEMP') return [{ t: 'unpin', reason: 'temp' }];
      return [];
    case 'DeallocateStmt':
      return [{ t: 'deallocate', name: n.isall || !n.name ? null : String(n.name) }];
    case 'ListenStmt':
      return [{ t: 'listen', channel: String(n.conditionname) }];
    case 'UnlistenStmt':
      return [{ t: 'unlisten', channel: n.conditionname ? String(n.conditionname) : null }];
    case 'PrepareStmt':
      return [{ t: 'pin', reason: 'prepare' }];
    case 'LoadStmt':
      return [{ t: 'pin', reason: 'load' }];
    case 'DeclareCursorStmt':
      // CURSOR_OPT_HOLD
      return (Number(n.options ?? 0) & 0x20) !== 0 ? [{ t: 'pin', reason: 'cursor' }] : [];
    case 'ClosePortalStmt':
      return n.portalname ? [] : [{ t: 'unpin', reason: 'cursor' }];
    case 'DropdbStmt':
      return [{ t: 'releaseDatabase', name: String(n.dbname) }];
    default:
      return genericEffects(type, n);
  }
}

/** Any other statement: temp objects, session advisory locks, set_config calls anywhere in it. */
function genericEffects(type: string, n: any): Effect[] {
  const effects: Effect[] = [];
  const onCommitDrop = (type === 'CreateStmt' && n.oncommit === 'ONCOMMIT_DROP') ||
    (type === 'CreateTableAsStmt' && n.into?.onCommit === 'ONCOMMIT_DROP');
  let temp = false;
  const pins = new Set<'advisory' | 'dblink' | 'setseed'>();
  let unlockAll = false;
  const calls: any[] = [];
  walk(n, (k, v) => {
    if (k === 'FuncCall') {
      const fname = funcName(v);
      const pin = PIN_FUNCS[fname];
      if (pin) pins.add(pin);
      else if (fname === 'pg_advisory_unlock_all') unlockAll = true;
      else if (fname === 'set_config') calls.push(v);
    } else if ((k === 'relpersistence' && v === 't') || (k === 'schemaname' && typeof v === 'string' && v.startsWith('pg_temp')) ||
      (k === 'sval' && v === 'pg_temp')) {
      temp = true;
    }
  });
  if (temp && !onCommitDrop) effects.push({ t: 'pin', reason: 'temp' });
  for (const p of pins) effects.push({ t: 'pin', reason: p });
  if (unlockAll) effects.push({ t: 'unpin', reason: 'advisory' });
  if (calls.length) {
    // Only a bare `SELECT set_config(...)[, ...]` surely runs each call once; anything else is re-read afterwards.
    const plain = type === 'SelectStmt' && !n.fromClause && !n.whereClause && !n.havingClause && !n.groupClause &&
      !n.withClause && !n.limitCount && !n.limitOffset && (n.op ?? 'SETOP_NONE') === 'SETOP_NONE' &&
      (n.targetList ?? []).every((t: any) => t.ResTarget?.val?.FuncCall && funcName(t.ResTarget.val.FuncCall) === 'set_config');
    for (const fc of calls) {
      const args = fc.args ?? [];
      const name = strConst(args[0]);
      if (name === undefined) {
        effects.push({ t: 'pin', reason: 'unknown' });
        continue;
      }
      const isLocal = boolConst(args[2]);
      if (isLocal === true) continue;
      const value = strConst(args[1]);
      if (plain && isLocal === false && value !== undefined) effects.push({ t: 'set', name: name.toLowerCase(), sql: setConfigSql(name.toLowerCase(), value) });
      else effects.push({ t: 'dynamic', name: name.toLowerCase() });
    }
  }
  return effects;
}

/**
 * synchronous_commit values that acknowledge a commit before the database's
 * durability policy holds it (off also before it is flushed locally).
 */
const WEAK_SYNC_COMMIT = new Set(['off', 'false', 'no', '0', 'local', 'remote_write']);
const weakSyncCommit = (value: string | undefined) => value === undefined || WEAK_SYNC_COMMIT.has(value.trim().toLowerCase());

export const DURABILITY_DETAIL = 'The database\'s durability policy needs synchronous_commit on (or remote_apply): '
  + 'off, local and remote_write acknowledge commits that the policy does not hold yet.';

/** A startup value of synchronous_commit that weakens the policy. */
export function weakensDurability(name: string, value: string): boolean {
  return name.toLowerCase() === 'synchronous_commit' && weakSyncCommit(value);
}

/**
 * Refuses the statements that weaken synchronous_commit: SET and SET LOCAL,
 * set_config with a weak or computed value, ALTER ROLE / DATABASE / SYSTEM ...
 * SET and CREATE FUNCTION ... SET. Clients may log in as roles Postgres would
 * let do all of it. A superuser can still get around a parser (dynamic SQL in
 * a DO block): the guard stops ordinary use, roles without superuser stop the rest.
 */
function durabilityGuard(stmt: Record<string, any>): Effect | null {
  let weak = false;
  walk(stmt, (k, v) => {
    // ALTER ROLE / DATABASE / SYSTEM hold theirs in `setstmt`, unwrapped.
    if ((k === 'VariableSetStmt' || k === 'setstmt') && String(v.name ?? '').toLowerCase() === 'synchronous_commit' && v.kind === 'VAR_SET_VALUE') {
      if (weakSyncCommit(strConst(v.args?.[0]))) weak = true;
    } else if (k === 'FuncCall' && funcName(v) === 'set_config') {
      if (strConst(v.args?.[0])?.toLowerCase() === 'synchronous_commit' && weakSyncCommit(strConst(v.args?.[1]))) weak = true;
    }
  });
  return weak ? { t: 'forbidden', message: 'permission denied to set parameter "synchronous_commit"', detail: DURABILITY_DETAIL } : null;
}

function walk(n: unknown, f: (key: string, val: any) => void): void {
  if (Array.isArray(n)) {
    for (const x of n) walk(x, f);
  } else if (n !== null && typeof n === 'object') {
    for (const k in n as Record<string, unknown>) {
      const v = (n as Record<string, unknown>)[k];
      f(k, v);
      if (v !== null && typeof v === 'object') walk(v, f);
    }
  }
}

/**
 * A syntax error as Postgres would report it for `sql` (SQLSTATE 42601, with the
 * cursor position), or null when the parser accepts it. For statements whose
 * Parse is answered before a server has seen them.
 */
export function syntaxError(sql: string): { message: string; position?: number } | null {
  if (!ready) return null;
  try {
    parseSync(sql);
    return null;
  } catch (err) {
    const details = (err as { sqlDetails?: { message?: string; cursorPosition?: number } }).sqlDetails;
    const message = details?.message ?? (err as Error).message;
    const pos = details?.cursorPosition;
    return { message, position: pos !== undefined && pos >= 0 ? pos + 1 : undefined };
  }
}
