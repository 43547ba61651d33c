/**
 * Routing rules (decision 0039) applied to the statements of a database some
 * of whose tables a MoveTables workflow moves: each statement is parsed, its
 * tables looked up in the rules, and it goes to the source database (relayed
 * to its one shard as written, or planned with its VSchema when it is
 * sharded) or to the target (planned with the target's VSchema). Only sessions of a database with rules come here; the others keep
 * relaying bytes unparsed.
 */
import { parseSync } from 'libpg-query';
import type { RoutingRuleChanged } from '../../schemas/index.ts';
import type { Plan } from '../planner/plan.ts';
import { walk, type Planner } from '../planner/planner.ts';

/** One statement and where it runs now. `held`: the tables' switch is in progress, ask again once this rule changes. */
export type Routed =
  | { text: string; database: string; plan: Plan; held?: undefined }
  | { text: string; held: RoutingRuleChanged };

export interface RoutingContext {
  source: string;
  rules: Map<string, RoutingRuleChanged>;
  inTransaction: boolean;
  /** The source's statements: only session commands (BEGIN, SET, ...) are taken from its plans, unless the source is sharded. */
  sessionPlanner: Planner;
  /** The source is sharded: its statements are planned with its VSchema (sessionPlanner) like any of its sessions'. */
  sourceSharded: boolean;
  /** The session's temporary tables (a sharded source's session reads them as its reference tables). */
  temps?: ReadonlySet<string>;
  targetPlanner(database: string): Planner;
}

/** Plans the source answers as the session itself does; everything else is relayed to the source's shard as written. */
const SESSION_KINDS = new Set<Plan['kind']>(['begin', 'commit', 'rollback', 'set', 'transaction_mode', 'show_plan', 'empty']);
const SYSTEM_SCHEMAS = new Set(['pg_catalog', 'information_schema']);
const WRITES = new Set(['InsertStmt', 'UpdateStmt', 'DeleteStmt', 'MergeStmt', 'TruncateStmt']);

/** Routes every statement of `sql` (a parse error throws the parser's error). */
export function routeStatements(sql: string, ctx: RoutingContext): Routed[] {
  const text = Buffer.from(sql, 'utf8');
  const stmts: Array<{ stmt: any; stmt_location?: number; stmt_len?: number }> = parseSync(sql).stmts ?? [];
  if (stmts.length === 0) return [{ text: sql, database: ctx.source, plan: { kind: 'empty' } }];
  return stmts.map((s) => {
    const start = s.stmt_location ?? 0;
    const own = text.subarray(start, s.stmt_len ? start + s.stmt_len : text.length).toString('utf8');
    return routeOne(own, s.stmt, ctx);
  });
}

function routeOne(text: string, stmt: any, ctx: RoutingContext): Routed {
  const ctes = new Set<string>();
  const tables = new Set<string>();
  let writes = false;
  walk(stmt, (kind, n) => {
    if (kind === 'CommonTableExpr') ctes.add(n.ctename);
    if (WRITES.has(kind)) writes = true;
    if (kind === 'SelectStmt' && n.lockingClause) writes = true;
  });
  const use = (rv: any) => {
    if (SYSTEM_SCHEMAS.has(rv.schemaname) || (!rv.schemaname && ctes.has(rv.relname))) return;
    tables.add(`${rv.schemaname ?? 'public'}.${rv.relname}`);
  };
  walk(stmt, (kind, n) => {
    if (kind === 'RangeVar') use(n);
    else if (WRITES.has(kind) && n.relation) use(n.relation); // a write's own table is a field, not a RangeVar node
  });
  const moved = [...tables].filter((t) => ctx.rules.has(t));
  const rules = new Set(moved.map((t) => ctx.rules.get(t)!));
  const held = [...rules].find((r) => r.state === 'WRITES_HELD');
  // Inside a transaction the statement is not held: the transaction may hold the source's locks the
  // switch waits for. It goes to the source, which runs it before the freeze or refuses it after.
  if (held && !ctx.inTransaction) return { text, held };
  const toTarget = [...rules].filter((r) => r.state === 'TARGET' || (r.state === 'READS_TARGET' && !writes && !ctx.inTransaction));
  if (toTarget.length === 0) return { text, database: ctx.source, plan: sourcePlan(text, writes, ctx) };
  const targets = new Set(toTarget.map((r) => r.targetDatabase));
  const staying = [...tables].filter((t) => !toTarget.some((r) => r.tables.includes(t)));
  if (targets.size > 1 || staying.length) {
    const movedNames = [...tables].filter((t) => !staying.includes(t));
    return {
      text, database: ctx.source,
      plan: {
        kind: 'refused',
        message: `the statement mixes tables served by ${[...targets].join(', ')} (${movedNames.join(', ')}) with tables ${staying.length ? `of ${ctx.source} (${staying.join(', ')})` : 'of another database'}: run them as separate statements`,
      },
    };
  }
  const target = [...targets][0];
  const plans = ctx.targetPlanner(target).plan(text);
  return { text, database: target, plan: plans[0] };
}

/** An unsharded source has one shard: a read runs there as a `reference` plan (so a replica session may take it), anything else as `all`. */
function sourcePlan(text: string, writes: boolean, ctx: RoutingContext): Plan {
  const [plan] = ctx.sessionPlanner.plan(text, ctx.temps);
  if (plan && (ctx.sourceSharded || SESSION_KINDS.has(plan.kind))) return plan;
  const sql = Buffer.from(text, 'utf8');
  return writes ? { kind: 'all', sql, tables: [], ddl: false } : { kind: 'reference', sql, tables: [] };
}
