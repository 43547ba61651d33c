/**
 * Session settings as the pooler tracks them: an ordered list of (GUC name, SQL
 * that establishes its value). Order matters (SET SESSION AUTHORIZATION resets
 * ROLE, a later SET wins), so a re-SET moves the name to the end. Instances are
 * immutable: a change makes a new one, so savepoint snapshots are just references.
 */
import { PgError, SQLSTATE } from '../protocol/errors.ts';
import { SESSION_STATE_PARAM } from '../protocol/messages.ts';
import { quoteLiteral, splitOptions } from './text.ts';

const interned = new Map<string, string>();
/** One string object per distinct value, so comparisons on the checkout path are pointer-cheap. */
export function intern(s: string): string {
  const hit = interned.get(s);
  if (hit !== undefined) return hit;
  if (interned.size >= 10_000) interned.clear();
  interned.set(s, s);
  return s;
}

export class Settings {
  /** Equal fingerprints mean equal settings (same names, values and order). */
  readonly fp: string;
  private ctx?: string;

  constructor(readonly map: ReadonlyMap<string, string>) {
    let fp = '';
    for (const [k, v] of map) fp += `${k}\u0001${v}\u0002`;
    this.fp = intern(fp);
  }

  static readonly EMPTY = new Settings(new Map());

  get size(): number {
    return this.map.size;
  }

  with(name: string, sql: string): Settings {
    const m = new Map(this.map);
    m.delete(name);
    m.set(name, sql);
    return new Settings(m);
  }

  without(name: string): Settings {
    if (!this.map.has(name)) return this;
    const m = new Map(this.map);
    m.delete(name);
    return new Settings(m);
  }

  /** What plans depend on: prepared statements are named per (SQL, types, this). */
  get planContext(): string {
    this.ctx ??= `${this.map.get('search_path') ?? ''}\u0001${this.map.get('role') ?? ''}\u0001${this.map.get('session_authorization') ?? ''}`;
    return this.ctx;
  }

  /** True when `this` is an ordered prefix of `other`. */
  isPrefixOf(other: Settings): boolean {
    if (this.map.size > other.map.size) return false;
    const it = other.map.entries();
    for (const [k, v] of this.map) {
      const o = it.next().value as [string, string];
      if (o[0] !== k || o[1] !== v) return false;
    }
    return true;
  }
}

/** SQL that sets a GUC to a raw value exactly as a startup packet or `-c` would. */
export const setConfigSql = (name: string, value: string) =>
  `SELECT pg_catalog.set_config(${quoteLiteral(name)}, ${quoteLiteral(value)}, false)`;

/** Startup keys that are not GUCs. */
const NOT_GUC = new Set(['user', 'database', 'options', 'replication', SESSION_STATE_PARAM]);

/**
 * The session settings a startup packet asks for: every GUC given directly, then
 * `-c name=value` / `--name=value` switches inside `options`, in that order, as
 * Postgres applies them.
 */
export function startupSettings(params: Record<string, string>): Map<string, string> {
  const out = new Map<string, string>();
  for (const [k, v] of Object.entries(params)) {
    if (NOT_GUC.has(k) || k.startsWith('_pq_.')) continue;
    out.set(k.toLowerCase(), v);
  }
  if (params.options) {
    const toks = splitOptions(params.options);
    for (let i = 0; i < toks.length; i++) {
      const t = toks[i];
      let kv: string | undefined;
      if (t === '-c') kv = toks[++i];
      else if (t.startsWith('-c')) kv = t.slice(2);
      else if (t.startsWith('--')) kv = t.slice(2);
      else {
        throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, `invalid command-line argument for server process: ${t}`,
          undefined, 'The pooler accepts only -c name=value and --name=value in options.');
      }
      const eq = kv?.indexOf('=') ?? -1;
      if (!kv || eq <= 0) {
        throw new PgError('FATAL', '42601', `-c ${kv ?? ''} requires a value`);
      }
      let name = kv.slice(0, eq).toLowerCase();
      if (t.startsWith('--')) name = name.replace(/-/g, '_');
      out.delete(name);
      out.set(name, kv.slice(eq + 1));
    }
  }
  return out;
}

export function settingsFromStartup(gucs: Map<string, string>): Settings {
  const m = new Map<string, string>();
  for (const [k, v] of gucs) m.set(k, setConfigSql(k, v));
  return new Settings(m);
}

/** A session's settings as the gateway carries them (see SESSION_STATE_PARAM). */
export const encodeSessionState = (s: Settings): string => JSON.stringify([...s.map]);

export function decodeSessionState(text: string): Settings {
  let entries: unknown;
  try {
    entries = JSON.parse(text);
  } catch {
    entries = null;
  }
  if (!Array.isArray(entries) || !entries.every((e) => Array.isArray(e) && e.length === 2 && typeof e[0] === 'string' && typeof e[1] === 'string')) {
    throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, `invalid ${SESSION_STATE_PARAM} startup parameter: expected a JSON list of [name, sql] pairs`);
  }
  return new Settings(new Map(entries as Array<[string, string]>));
}

/** GUCs that RESET ALL leaves alone. */
const NO_RESET_ALL = ['session_authorization', 'role'];

/** RESET ALL as Postgres applies it to a session whose defaults are `startup`. */
export function afterResetAll(current: Settings, startup: Settings): Settings {
  let s = startup;
  for (const k of NO_RESET_ALL) {
    const v = current.map.get(k);
    if (v !== undefined) s = s.with(k, v);
  }
  return s;
}

/**
 * The statements that take a server connection from `applied` (null: unknown) to
 * `desired`: only the missing tail when what is applied is a prefix of what is
 * desired, otherwise back to the server's defaults and everything replayed.
 * Returns '' when nothing is needed.
 */
export function settingsDelta(applied: Settings | null, desired: Settings): string {
  if (applied && applied.fp === desired.fp) return '';
  const stmts: string[] = [];
  let from = 0;
  if (applied && applied.isPrefixOf(desired)) {
    from = applied.size;
  } else {
    if (!applied || applied.map.has('session_authorization')) stmts.push('RESET SESSION AUTHORIZATION');
    if (!applied || applied.map.has('role')) stmts.push('RESET ROLE');
    stmts.push('RESET ALL');
  }
  let i = 0;
  for (const sql of desired.map.values()) if (i++ >= from) stmts.push(sql);
  return stmts.join('; ');
}
