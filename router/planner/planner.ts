/**
 * The planner of a sharded database: parses each statement with libpg-query
 * (the Postgres parser) and decides where it runs and how results merge, from
 * the database's VSchema. Plans are cached per statement text; what cannot be
 * answered correctly is planned as `refused` with a message naming the
 * construct (the gateway reports it as 0A000).
 */
import { loadModule, parseSync } from 'libpg-query';
import type { FunctionalVindex } from '../../schemas/vschema/vindex.ts';
import { ownedLookups, type LookupVindex, type VSchema } from '../../schemas/vschema/vschema.ts';
import type { AggregateFn, Comparison, CopyInPlan, Having, InsertLookups, Merge, OwnedWrite, Pin, Plan, SequenceFill, SortKey, ValueRef } from './plan.ts';
import { closeParenAfter, isSpace, literalShape, splice, tokenEnd, tokenEnds, topLevelKeyword, valuesRowSpans, withoutTrailingSemicolon, type Literal } from './sqltext.ts';

/** libpg-query is WebAssembly: load it once before the first parse. */
export const plannerReady: Promise<void> = loadModule();

const CACHE_LIMIT = 10_000;
const AGGREGATES = new Set(['count', 'sum', 'min', 'max']);
/** Statements that change or maintain the schema, roles and grants: run on every shard. */
const DDL = new Set([
  'CreateStmt', 'AlterTableStmt', 'DropStmt', 'IndexStmt', 'RenameStmt', 'CommentStmt', 'ViewStmt', 'CreateSeqStmt', 'AlterSeqStmt',
  'CreateFunctionStmt', 'AlterFunctionStmt', 'CreateExtensionStmt', 'CreateSchemaStmt', 'CreateEnumStmt', 'CompositeTypeStmt',
  'GrantStmt', 'TruncateStmt', 'CreateTrigStmt', 'CreateDomainStmt', 'AlterEnumStmt', 'DefineStmt', 'AlterOwnerStmt',
  'AlterObjectSchemaStmt', 'CreatePolicyStmt', 'CreateStatsStmt', 'RuleStmt', 'VacuumStmt', 'ReindexStmt',
  'CreateRoleStmt', 'AlterRoleStmt', 'DropRoleStmt', 'GrantRoleStmt',
]);
const SYSTEM_SCHEMAS = new Set(['pg_catalog', 'information_schema']);
/** Types a count may be cast to and still be added up across shards. */
const NUMERIC_TYPES = new Set(['int2', 'int4', 'int8', 'numeric', 'float4', 'float8']);

export class RefusedError extends Error {}

/**
 * Thrown when a plan depends on which columns some relations have and the planner has not learnt
 * them (see Planner.learnColumns): the caller reads them from a shard's catalog and plans again.
 */
export class ColumnsNeededError extends Error {
  constructor(readonly planner: Planner, readonly relations: string[]) {
    super(`the planner needs the columns of ${relations.join(', ')}`);
  }
}
const refuse = (message: string): never => {
  throw new RefusedError(message);
};

interface TableUse {
  alias: string;
  name: string;
  kind: 'sharded' | 'reference' | 'system';
  pin?: { column: string; vindex: string; type: FunctionalVindex };
  /** The lookup vindexes the table owns: they route reads too, and its writes keep them. */
  lookups?: LookupVindex[];
  /** How the statement names it (schema-qualified or not), for statements the planner writes. */
  relation?: string;
}

/** Makes the plan of a statement from its text and literals, for statements of one shape (see literalShape). */
type Template = (sql: string, literals: Literal[]) => Plan[];

export class Planner {
  private readonly cache = new Map<string, Plan[]>();
  /** Plans by literal shape: `... WHERE id = 7` and `... WHERE id = 8` share one, with no parse. */
  private readonly templates = new Map<string, Template>();
  /** Names of the CTEs of the statement being planned: they read like tables, and are checked where they are defined. */
  private ctes = new Set<string>();
  /** The temporary tables of the session whose statement is being planned: they read like reference tables. */
  private temps: ReadonlySet<string> = NO_TEMPS;
  /** Each table's owned lookup vindexes, worked out once per VSchema version. */
  private readonly lookupsOf = new Map<string, LookupVindex[]>();
  /** The columns of the relations a plan had to know about, by the relation as statements name it. */
  private readonly columns = new Map<string, ReadonlySet<string>>();

  constructor(private readonly vschema: VSchema) {}

  /** What a shard's catalog says `relation` has (no names: it has no such relation). */
  learnColumns(relation: string, names: Iterable<string>): void {
    this.columns.set(relation, new Set(names));
  }

  /** The schema changed (DDL through the gateway): what was learnt goes, with the plans made from it. */
  forgetColumns(): void {
    if (!this.columns.size) return;
    this.columns.clear();
    this.cache.clear();
    this.templates.clear();
  }

  /**
   * The plans of the statements in `sql` (one per statement; a parse error throws the parser's error).
   * `temps`: the session's temporary tables. A session that has some plans every statement anew, since
   * a name in it may be one of them, and the cached plans are every session's.
   */
  plan(sql: string, temps: ReadonlySet<string> = NO_TEMPS): Plan[] {
    if (temps.size) {
      this.temps = temps;
      try {
        return this.parseAndPlan(sql);
      } finally {
        this.temps = NO_TEMPS;
      }
    }
    const hit = this.cache.get(sql);
    if (hit) return hit;
    const shape = literalShape(sql);
    const template = shape && this.templates.get(shape.key);
    if (template) return template(sql, shape.literals);
    const plans = this.parseAndPlan(sql);
    if (this.cache.size >= CACHE_LIMIT) this.cache.clear();
    this.cache.set(sql, plans);
    const made = shape && plans.length === 1 ? templateOf(plans[0], sql, shape.literals) : undefined;
    if (made) {
      if (this.templates.size >= CACHE_LIMIT) this.templates.clear();
      this.templates.set(shape!.key, made);
    }
    return plans;
  }

  private parseAndPlan(sql: string): Plan[] {
    const text = Buffer.from(sql, 'utf8');
    const stmts: Array<{ stmt: any; stmt_location?: number; stmt_len?: number }> = parseSync(sql).stmts ?? [];
    const plans = stmts.length === 0 ? [{ kind: 'empty' } as Plan] : stmts.map((s) => {
      const start = s.stmt_location ?? 0;
      const own = text.subarray(start, s.stmt_len ? start + s.stmt_len : text.length);
      try {
        this.ctes = new Set();
        walk(s.stmt, (k, n) => {
          if (k === 'CommonTableExpr') this.ctes.add(n.ctename);
        });
        return this.planStatement(s.stmt, own, start);
      } catch (err) {
        if (err instanceof RefusedError) return { kind: 'refused', message: err.message } as Plan;
        throw err;
      }
    });
    return plans;
  }

  /** `base` is where `text` starts in the whole query (node locations are offsets into the whole query). */
  private planStatement(node: any, text: Buffer, base: number): Plan {
    const [type, body] = Object.entries(node)[0] as [string, any];
    switch (type) {
      case 'SelectStmt': return this.planSelect(body, text, base);
      case 'InsertStmt': return this.planInsert(body, text, base);
      case 'UpdateStmt': case 'DeleteStmt': return this.planWrite(type, body, text);
      case 'TransactionStmt': return planTransaction(body, text);
      case 'VariableSetStmt': return planSet(body, text);
      case 'VariableShowStmt':
        if (body.name === 'mg_plan') return { kind: 'show_plan' };
        return { kind: 'reference', sql: text, tables: [] };
      case 'ExplainStmt': {
        const inner = this.planStatement(body.query, text, base);
        if (inner.kind === 'refused') return inner;
        const analyze = (body.options ?? []).some((o: any) => o.DefElem?.defname === 'analyze' && !['false', 'off'].includes(o.DefElem.arg?.String?.sval));
        if (analyze && ((inner.kind === 'insert' && inner.lookups) || (inner.kind === 'write' && inner.owned))) {
          refuse('EXPLAIN ANALYZE of a write that keeps lookup vindexes (it would run without its lookup rows)');
        }
        return { kind: 'explain', sql: text, inner };
      }
      case 'CallStmt': return this.planRoutineCall(body.funccall, text, 'CALL');
      case 'CopyStmt': return this.planCopy(body, text, base);
      default:
        if (DDL.has(type)) return { kind: 'all', sql: text, tables: [], ddl: true, ...(type === 'RenameStmt' && body.renameType === 'OBJECT_COLUMN' ? { renamesColumn: true } : {}), ...tempTablesOf(type, body) };
        return refuse(`${statementName(type)} is not supported on a sharded database`);
    }
  }

  private planSelect(s: any, text: Buffer, base: number): Plan {
    if (s.op && s.op !== 'SETOP_NONE') {
      const tables = this.tablesUnder(s);
      if (tables.every((t) => t.kind !== 'sharded')) return { kind: 'reference', sql: text, tables: tables.map((t) => t.name) };
      return refuse(`${s.op.replace('SETOP_', '')} over sharded tables`);
    }
    if (s.valuesLists) return { kind: 'reference', sql: text, tables: [] };
    if (s.intoClause) return refuse('SELECT INTO on a sharded database');
    // tablesUnder does not see the target of an INSERT/UPDATE/DELETE in WITH, and it would run on one shard only.
    if ((s.withClause?.ctes ?? []).some((c: any) => !c.CommonTableExpr?.ctequery?.SelectStmt)) return refuse('INSERT, UPDATE or DELETE in WITH on a sharded database');
    const from = this.fromTables(s.fromClause ?? []);
    const sharded = from.filter((t) => t.kind === 'sharded');
    // Tables named outside the top-level FROM (subqueries, CTEs) see one shard's rows only: they must stay on it.
    const nested = this.tablesUnder(s);
    for (const f of from) nested.splice(nested.findIndex((t) => t.alias === f.alias && t.name === f.name), 1);
    const nestedSharded = nested.find((t) => t.kind === 'sharded');
    if (nestedSharded) {
      const pin = this.oneShardWithSubqueries({ node: s, where: s.whereClause, from: s.fromClause }, sharded, nestedSharded);
      const plan: Plan = { kind: 'select', sql: text, pin, tables: [...new Set([...from, ...nested].map((t) => t.name))] };
      untemplated.add(plan); // the subqueries' values pin it too, which a template would not check
      return plan;
    }
    if (!sharded.length) {
      if (s.targetList?.length === 1 && !s.fromClause) {
        const call = s.targetList[0].ResTarget?.val?.FuncCall;
        const name = call && lastName(call.funcname);
        if (name && this.vschema.routines[name]) return this.planRoutineCall(call, text, 'SELECT');
      }
      return { kind: 'reference', sql: text, tables: from.map((t) => t.name) };
    }
    this.checkJoined(sharded, [s.whereClause, ...joinQuals(s.fromClause ?? [])]);
    const pin = this.pinOf(sharded, s.whereClause);
    const tables = from.map((t) => t.name);
    // IN (...), or a non-unique lookup, may name several shards: their rows merge like a scatter's (order, limit, aggregates).
    if (pin && (pin.values.length > 1 || pin.lookup?.type === 'lookup')) {
      const merged = this.scatterSelect(s, text, base, tables);
      if (merged.kind === 'select' && merged.merge) return { ...merged, pin };
    }
    if (pin) return { kind: 'select', sql: text, pin, tables };
    return this.scatterSelect(s, text, base, tables);
  }

  /** A SELECT over every shard: what the gateway must merge (none when the shards' rows can go out as they come), and the per-shard text. */
  private scatterSelect(s: any, text: Buffer, base: number, tables: string[]): Plan {
    if (s.distinctClause && Object.keys(s.distinctClause[0] ?? {}).length) refuse('DISTINCT ON over all shards');
    if (s.groupingSets) refuse('GROUPING SETS over all shards');
    if (s.lockingClause && (s.limitCount || s.limitOffset)) refuse('FOR UPDATE with LIMIT over all shards');
    const targets: any[] = s.targetList ?? [];
    const names = targets.map((t) => t.ResTarget?.name ?? columnName(t.ResTarget?.val));
    const star = targets.findIndex(isStar);
    // What the merge needs and the client did not select (a sort key, a group column, an aggregate HAVING tests)
    // goes to the shards as hidden items after the client's, so its column numbers stay; the gateway strips them.
    const hidden: any[] = [];
    const values = () => [...targets.map((t) => t.ResTarget?.val), ...hidden];
    /** The 0-based item (the client's, then the hidden ones) that is the same expression as `node`, made hidden if none is. */
    const item = (node: any): number => {
      const key = withoutLocations(node);
      const at = values().findIndex((v) => withoutLocations(v) === key);
      if (at >= 0) return at;
      hidden.push(node);
      return targets.length + hidden.length - 1;
    };
    const positions: number[] = []; // GROUP BY and ORDER BY by position, which must not reach a hidden item
    const position = (n: any): number | undefined => {
      if (n?.A_Const?.ival === undefined) return undefined;
      positions.push(n.A_Const.ival.ival ?? 0);
      return positions[positions.length - 1];
    };
    /** An unqualified column name, which names a select-list item by its output name (SQL92) before an input column. */
    const bareName = (n: any) => (n?.ColumnRef && fieldsOf(n.ColumnRef).length === 1 ? columnName(n) : undefined);
    // GROUP BY takes a name as an input column before an output name (Postgres): an output name is the column
    // when its item reads a column of that name (`lower(s) AS s ... GROUP BY s`) or a FROM relation has one
    // (`date(at) AS day ... GROUP BY day` over a table with a column `day`; the shards' catalog says), else the item.
    const readsItsName = (i: number, name: string) => i >= 0 && !!findNode(targets[i].ResTarget?.val, (k, n) => k === 'ColumnRef' && columnName({ ColumnRef: n }) === name);
    const groupItems: number[] = (s.groupClause ?? []).map((g: any) => {
      const name = bareName(g);
      const output = name === undefined ? -1 : names.indexOf(name);
      const at = position(g) ?? (output < 0 || readsItsName(output, name!) || this.isInputColumn(name!, s.fromClause ?? []) ? 0 : output + 1);
      return at > 0 ? at - 1 : item(g);
    });
    // A HAVING operand: an item as written (casts included), else a selected column by its name, else a hidden item.
    const having = s.havingClause ? havingOf(s.havingClause, (n) => {
      const name = bareName(n);
      const byName = name === undefined ? -1 : targets.findIndex((t) => t.ResTarget?.val?.ColumnRef && columnName(t.ResTarget.val) === name);
      const written = values().some((v) => withoutLocations(v) === withoutLocations(n));
      return (written || byName < 0 ? item(n) : byName) + 1;
    }) : undefined;
    const sorts = (s.sortClause ?? []).map((sb: any) => {
      const by = sb.SortBy;
      const desc = by.sortby_dir === 'SORTBY_DESC';
      const nullsFirst = by.sortby_nulls === 'SORTBY_NULLS_DEFAULT' ? desc : by.sortby_nulls === 'SORTBY_NULLS_FIRST';
      if (by.useOp) refuse('ORDER BY ... USING over all shards');
      // The merge orders text by its bytes, as the instances' C.UTF-8 collation does.
      const collate = findNode(by.node, (k) => k === 'CollateClause');
      if (collate && !['C', 'POSIX', 'C.UTF-8'].includes(lastName(collate.collname))) refuse(`ORDER BY ... COLLATE "${lastName(collate.collname)}" over all shards`);
      const at = position(by.node);
      if (at !== undefined) return { column: at, desc, nullsFirst };
      const name = bareName(by.node);
      if (name !== undefined && names.includes(name)) return { item: names.indexOf(name), desc, nullsFirst };
      // A column of `*` is found by name when the rows come back (its position is not known here).
      if (name !== undefined && star >= 0) return { column: name, desc, nullsFirst };
      return { item: item(by.node), desc, nullsFirst };
    });
    const items = values();
    const aggregates: Merge['aggregates'] = [];
    items.forEach((v, i) => {
      if (findNode(v, (k, n) => k === 'FuncCall' && n.over)) refuse('a window function over all shards');
      const call = (v?.TypeCast ? v.TypeCast.arg : v)?.FuncCall;
      const fn = call && lastName(call.funcname);
      if (fn && AGGREGATES.has(fn) && !call.over) {
        if (call.agg_distinct) refuse(`${fn}(DISTINCT ...) over all shards`);
        if (call.agg_filter || call.agg_order) refuse(`${fn}(...) with FILTER or ORDER BY over all shards`);
        // count(*)::int adds up like count(*); any other cast is taken by each shard's share before the merge
        // (sum(x)::int rounds each share, max(x)::text compares as text).
        const cast = v.TypeCast && lastName(v.TypeCast.typeName.names);
        if (cast && !(fn === 'count' && NUMERIC_TYPES.has(cast))) refuse(`${fn}(...)::${cast} over all shards (each shard would cast its part: select ${fn}(...) and cast in the client)`);
        aggregates.push({ column: i + 1, fn: fn as AggregateFn });
        return;
      }
      if (fn && isAggregateName(fn)) refuse(`${fn}(...) over all shards`);
      const agg = ownAggregate(v);
      if (agg) refuse(`${lastName(agg.funcname)}(...) inside an expression over all shards (select the aggregate itself)`);
    });
    const grouped = (s.groupClause ?? []).length > 0;
    let groupBy: number[] | undefined;
    // A HAVING makes a grouped query even without GROUP BY or aggregates: one group of every row.
    if (grouped || aggregates.length || s.havingClause) {
      groupBy = groupItems.map((i) => i + 1);
      // Any other item must be the same in each shard's partial row of a group (the merge keeps the first): an
      // expression of group columns only, or of none. A column is grouped by its name. This refuses `*` too, so
      // a grouped read knows every item's position.
      const groupNames = new Set([...(s.groupClause ?? []), ...groupItems.map((i) => items[i])].map((n) => n?.ColumnRef && columnName(n)).filter(Boolean));
      items.forEach((v, i) => {
        if (groupBy!.includes(i + 1) || aggregates.some((a) => a.column === i + 1)) return;
        const outside = findNode(v, (k, n) => k === 'ColumnRef' && !groupNames.has(columnName({ ColumnRef: n })));
        if (outside) refuse(`a ${i < targets.length ? 'selected ' : ''}column outside GROUP BY (${columnName({ ColumnRef: outside }) ?? '*'}), over all shards`);
      });
    }
    if (hidden.length) {
      // Postgres refuses these itself, but the shards would not: the hidden items make them valid there.
      if (s.distinctClause) refuse('DISTINCT with ORDER BY, GROUP BY or HAVING on what it does not select, over all shards');
      const beyond = positions.find((p) => star >= 0 || p > targets.length);
      if (beyond !== undefined) refuse(`ORDER BY or GROUP BY position ${beyond} beside an item the gateway adds${star >= 0 ? ' after *' : ''}, over all shards`);
    }
    // Items after a `*` are counted from the row's end (-1: the last column): how many columns `*` makes is not known here.
    const orderBy: SortKey[] = sorts.map(({ item: i, ...key }: any) => (i === undefined ? key : { ...key, column: star >= 0 && i > star ? i - items.length : i + 1 }));
    const limit = s.limitCount && !s.limitCount.A_Const?.isnull ? valueOf(s.limitCount) : undefined;
    const offset = s.limitOffset ? valueOf(s.limitOffset) : undefined;
    if (s.limitOption === 'LIMIT_OPTION_WITH_TIES') refuse('FETCH ... WITH TIES over all shards');
    if ((s.limitCount && !limit) || (s.limitOffset && !offset)) refuse('a LIMIT or OFFSET expression over all shards (use a number or $n)');
    const distinct = !!s.distinctClause;
    const groupOrder = streamedGroups(groupBy, distinct && !aggregates.length && !targets.some(isStar) ? targets.length : 0, orderBy);
    const merge: Merge = { orderBy, groupOrder, aggregates: aggregates.length ? aggregates : undefined, groupBy, having, distinct, limit, offset, hidden: hidden.length || undefined };
    // Each shard returns the rows the gateway's LIMIT may need after merging: the first limit + offset,
    // or all of them when groups or DISTINCT merge first, unless the shards sort by the groups themselves
    // (the first limit + offset groups of each shard hold every row of the first groups overall) and no
    // HAVING drops groups at the gateway. Parameters stay referenced, or Bind would not fit.
    const edits: Array<{ start: number; end: number; text: string }> = [];
    const token = (node: any) => {
      const at = nodeLocation(node) - base;
      return { start: at, end: tokenEnd(text, at), text: text.toString('utf8', at, tokenEnd(text, at)) };
    };
    const sortedByGroups = groupOrder && orderBy.length > 0;
    const needsAll = (aggregates.length > 0 || !!groupBy || distinct) && (!sortedByGroups || !!having);
    if (limit) {
      const l = token(s.limitCount);
      const o = offset ? token(s.limitOffset) : undefined;
      if (needsAll) edits.push({ ...l, text: 'param' in limit ? `(NULL + 0 * ${l.text})` : 'ALL' });
      else if (o) edits.push({ ...l, text: 'literal' in limit && 'literal' in offset! ? String(Number(l.text) + Number(o.text)) : `(${l.text} + ${o.text})` });
    }
    if (offset) {
      const o = token(s.limitOffset);
      edits.push({ ...o, text: 'param' in offset ? `(0 * ${o.text})` : '0' });
    }
    if (having) {
      // A shard's partial group must not be filtered: `HAVING TRUE OR <condition>` keeps every group (OR binds
      // loosest) and the condition's $n in place, with the types Postgres infers for them.
      const at = topLevelKeyword(text, 'having');
      if (at < 0) refuse('a HAVING the gateway cannot find in the text');
      edits.push({ start: at + 'having'.length, end: at + 'having'.length, text: ' TRUE OR' });
    }
    if (hidden.length) {
      // Named apart, so that no ORDER BY name of the statement finds a hidden item on the shards.
      const last = targets[targets.length - 1];
      const end = spanEnd(text, last.ResTarget.location - base, last, (t) => t) ?? refuse('a select list the gateway cannot find in the text');
      edits.push({ start: end, end, text: hidden.map((h, j) => `, ${expressionText(h, text, base)} AS mg_hidden_${j + 1}`).join('') });
    }
    // Without any of these the plan has no merge, and its rows stream (decision 0062).
    const merges = orderBy.length > 0 || aggregates.length > 0 || !!groupBy || distinct || !!limit || !!offset;
    const sql = edits.length ? splice(text, edits) : text;
    return { kind: 'select', sql: groupOrder && !sortedByGroups ? sortedBy(sql, groupOrder) : sql, merge: merges ? merge : undefined, tables };
  }

  private planWrite(type: string, w: any, text: Buffer): Plan {
    const target = this.tableUse(w.relation);
    const extra = this.fromTables(w.fromClause ?? w.usingClause ?? []);
    const verb = type === 'UpdateStmt' ? 'UPDATE' : 'DELETE';
    if (w.withClause) refuse(`WITH ... ${verb} on a sharded database`);
    if (target.kind === 'system') refuse(`${verb} of a system catalog through the gateway`);
    const nested = this.tablesUnder({ where: w.whereClause, targets: w.targetList, returning: w.returningList });
    const read = [...extra, ...nested].find((t) => t.kind === 'sharded');
    if (target.kind === 'reference') {
      if (read) refuse(`${verb} of reference table ${target.name} that reads a sharded table`);
      return { kind: 'all', sql: text, tables: [target.name], ddl: false };
    }
    if (type === 'UpdateStmt') {
      for (const t of w.targetList ?? []) {
        if (t.ResTarget?.name === target.pin!.column) refuse(`UPDATE of ${target.name}.${target.pin!.column}, its primary vindex column (it would move the row to another shard)`);
      }
    }
    const owned = this.ownedWrite(type, w, target, extra.length > 0, text);
    if (read) {
      // Other sharded tables (FROM/USING, subqueries) must stay on the target's one shard, as for a SELECT.
      if (owned) refuse(`${verb} of ${target.name} that reads sharded table ${read.name}: its lookup vindexes are kept in step only for writes of one table`);
      const from = w.fromClause ?? w.usingClause ?? [];
      const top = [target, ...extra.filter((t) => t.kind === 'sharded')];
      const pin = this.oneShardWithSubqueries({ node: { from, where: w.whereClause, targets: w.targetList, returning: w.returningList }, where: w.whereClause, from, target }, top, read);
      const plan: Plan = { kind: 'write', sql: text, pin, tables: [...new Set([target, ...extra, ...nested].map((t) => t.name))] };
      untemplated.add(plan);
      return plan;
    }
    const pin = this.pinOf([target], w.whereClause);
    return { kind: 'write', sql: text, pin, tables: [target.name], ...(owned ? { owned } : {}) };
  }

  /** The lookup rows an UPDATE/DELETE moves or removes: which vindexes, their new values, and the SELECT that finds the rows first. */
  private ownedWrite(type: string, w: any, target: TableUse, joins: boolean, text: Buffer): OwnedWrite | undefined {
    const verb = type === 'UpdateStmt' ? 'UPDATE' : 'DELETE';
    const sets = new Map<string, any>((type === 'UpdateStmt' ? w.targetList ?? [] : []).map((t: any) => [t.ResTarget?.name, t.ResTarget?.val]));
    const lookups = (target.lookups ?? []).filter((l) => type === 'DeleteStmt' || sets.has(l.column));
    if (!lookups.length) return undefined;
    const names = lookups.map((l) => l.vindex).join(', ');
    if (joins) refuse(`${verb} of ${target.name} with ${type === 'UpdateStmt' ? 'FROM' : 'USING'}: its lookup vindex ${names} must be kept in step row by row`);
    if (w.whereClause?.CurrentOfExpr) refuse(`${verb} ... WHERE CURRENT OF on ${target.name}`);
    let newValues: ValueRef[] | undefined;
    if (type === 'UpdateStmt') {
      newValues = lookups.map((l) => valueOf(sets.get(l.column)) ?? refuse(`UPDATE of ${target.name}.${l.column}, a lookup vindex column: the new value must be a literal, NULL or $n`));
    }
    const where = topLevelKeyword(text, 'where');
    const returning = topLevelKeyword(text, 'returning');
    let end = returning >= 0 ? returning : text.length;
    while (end > 0 && (text[end - 1] === 0x3b || text[end - 1] <= 0x20)) end--; // a trailing ; and spaces
    const alias = quoteIdent(target.alias);
    const columns = [target.pin!.column, ...lookups.map((l) => l.column)].map((c) => `${alias}.${quoteIdent(c)}`).join(', ');
    const select = Buffer.concat([
      Buffer.from(`SELECT ${columns} FROM ${target.relation} AS ${alias} `),
      where >= 0 ? text.subarray(where, end) : Buffer.alloc(0),
      Buffer.from(' FOR UPDATE'),
    ]);
    return { lookups, newValues, select };
  }

  private planInsert(ins: any, text: Buffer, base: number): Plan {
    const target = this.tableUse(ins.relation);
    if (ins.withClause) refuse('WITH ... INSERT on a sharded database');
    if (target.kind === 'system') refuse('INSERT into a system catalog through the gateway');
    const select = ins.selectStmt?.SelectStmt;
    const sources = select ? this.tablesUnder(select) : [];
    if (target.kind === 'reference') {
      if (sources.some((t) => t.kind === 'sharded')) refuse(`INSERT into reference table ${target.name} from a sharded table`);
      return { kind: 'all', sql: text, tables: [target.name], ddl: false };
    }
    if (!select?.valuesLists) refuse(`INSERT ... SELECT into sharded table ${target.name}`);
    if (ins.onConflictClause?.onConflictWhere || ins.onConflictClause?.targetList?.some((t: any) => t.ResTarget?.name === target.pin!.column)) {
      refuse(`ON CONFLICT DO UPDATE of ${target.name}.${target.pin!.column}, its primary vindex column`);
    }
    const rows: any[][] = select.valuesLists.map((l: any) => l.List.items);
    const cols = this.insertColumns(target.name, ins, rows[0].length);
    const { spans, end } = valuesRowSpans(text, nodeLocation(rows[0][0]) - base, rows.length);
    const sequence = this.sequenceFill(target.name, ins, cols, rows, spans, text, base);
    const at = cols.indexOf(target.pin!.column);
    const placedBySequence = sequence?.places ?? false;
    if (at < 0 && !placedBySequence) refuse(`INSERT into ${target.name} without its primary vindex column ${target.pin!.column}`);
    const values: ValueRef[] = rows.map((items, i) => {
      if (placedBySequence && (at < 0 || sequence!.defaults[i] !== undefined)) return { literal: null }; // the id it gets places it
      const v = valueOf(items[at]);
      if (!v) refuse(`INSERT into ${target.name}: ${target.pin!.column} must be a literal or $n to place the row`);
      if ('literal' in v! && v.literal === null) refuse(`INSERT into ${target.name}: NULL in its primary vindex column ${target.pin!.column}`);
      return v!;
    });
    const lookups = this.insertLookups(target, ins, cols, rows);
    return {
      kind: 'insert', table: target.name,
      pin: { vindex: target.pin!.vindex, type: target.pin!.type, column: `${target.name}.${target.pin!.column}`, values },
      prefix: text.subarray(0, spans[0][0]), rows: spans.map(([a, b]) => text.subarray(a, b)), suffix: text.subarray(end), sequence,
      ...(lookups.length ? { lookups } : {}),
    };
  }

  /** COPY FROM STDIN into a table of the VSchema; other COPYs (files, programs, TO) are refused. */
  private planCopy(c: any, text: Buffer, base: number): Plan {
    if (c.filename || c.is_program) refuse(`COPY ${c.is_from ? 'from' : 'to'} a file or program on a sharded database (use COPY ... ${c.is_from ? 'FROM STDIN' : 'TO STDOUT'})`);
    if (!c.is_from) return this.planCopyOut(c, text, base);
    const target = this.tableUse(c.relation);
    if (target.kind === 'system') refuse('COPY into a system catalog through the gateway');
    const options = copyOptions(c);
    for (const name of options.keys()) {
      if (!['format', 'delimiter', 'header', 'null', 'quote', 'escape', 'encoding'].includes(name)) refuse(`COPY option ${name} on a sharded database`);
    }
    const format = (options.get('format') ?? 'text').toLowerCase();
    if (format !== 'text' && format !== 'csv') refuse(`COPY FORMAT ${format} on a sharded database (text and csv are split by row)`);
    const header = options.get('header')?.toLowerCase();
    if (header === 'match') refuse('COPY HEADER MATCH on a sharded database');
    const encoding = options.get('encoding')?.toLowerCase().replace(/[-_]/g, '');
    if (encoding && encoding !== 'utf8') refuse('COPY ENCODING other than UTF8 on a sharded database');
    const csv = format === 'csv';
    const plan: CopyInPlan = {
      kind: 'copy_in', table: target.name, sql: text, format: csv ? 'csv' : 'text', header: header !== undefined && !['false', 'off', '0'].includes(header),
      delimiter: options.get('delimiter') ?? (csv ? ',' : '\t'), null: options.get('null') ?? (csv ? '' : '\\N'),
      quote: options.get('quote') ?? '"', escape: options.get('escape') ?? options.get('quote') ?? '"',
    };
    if (plan.delimiter.length !== 1 || plan.quote.length !== 1 || plan.escape.length !== 1) refuse('COPY DELIMITER, QUOTE and ESCAPE of more than one byte on a sharded database');
    if (target.kind === 'reference') return plan;
    if (target.lookups?.length) refuse(`COPY into ${target.name}, which owns lookup vindex ${target.lookups.map((l) => l.vindex).join(', ')} (INSERT its rows instead)`);
    const listed: string[] = (c.attlist ?? []).map((a: any) => a.String.sval);
    const columns = listed.length ? listed : this.vschema.tables[target.name].columns;
    if (!columns) refuse(`COPY into sharded table ${target.name} without a column list (name the columns, or list the table's columns in its VSchema entry)`);
    const column = columns!.indexOf(target.pin!.column);
    if (column < 0) refuse(`COPY into ${target.name} without its primary vindex column ${target.pin!.column}`);
    return { ...plan, place: { column, pin: { vindex: target.pin!.vindex, type: target.pin!.type, column: `${target.name}.${target.pin!.column}` } } };
  }

  /** COPY TO STDOUT: a table's rows from every shard (a reference table's from one), or a query's rows as its plan routes them, unmerged. */
  private planCopyOut(c: any, text: Buffer, base: number): Plan {
    const options = new Map([...copyOptions(c)].map(([name, value]) => [name, value.toLowerCase()]));
    // Each shard's CSV header is its first line: the gateway keeps the first shard's only.
    const header = options.get('format') === 'csv' && options.has('header') && !['false', 'off', '0'].includes(options.get('header')!);
    const plan = (p: { pin?: Pin; reference: boolean; tables: string[] }): Plan => {
      // A binary COPY is one file per shard (a header and a trailer each): it cannot be spliced.
      if (options.get('format') === 'binary' && !p.reference && !(p.pin && p.pin.values.length === 1)) refuse('COPY ... TO in binary format over several shards');
      return { kind: 'copy_out', sql: text, header, ...p };
    };
    if (c.relation) {
      const t = this.tableUse(c.relation);
      return plan({ reference: t.kind !== 'sharded', tables: [t.name] });
    }
    const query = c.query?.SelectStmt ? this.planSelect(c.query.SelectStmt, text, base) : refuse('COPY (a statement other than SELECT) TO STDOUT on a sharded database');
    if (query.kind === 'refused') return query;
    if (query.kind === 'reference') return plan({ reference: true, tables: query.tables });
    if (query.kind !== 'select' || query.merge || query.pin?.lookup) return refuse('COPY (a query whose rows the gateway merges or looks up) TO STDOUT on a sharded database (SELECT it instead)');
    return plan({ pin: query.pin, reference: false, tables: query.tables });
  }

  /** The columns an INSERT's values go to: its column list, else the first of the VSchema's `columns` (Postgres fills the rest with defaults). */
  private insertColumns(table: string, ins: any, width: number): string[] {
    if (ins.cols?.length) return ins.cols.map((c: any) => c.ResTarget.name);
    const columns = this.vschema.tables[table].columns;
    if (!columns) refuse(`INSERT into sharded table ${table} without a column list (name the columns, or list the table's columns in its VSchema entry)`);
    if (width > columns!.length) refuse(`INSERT into sharded table ${table} has ${width} values, more than the ${columns!.length} columns its VSchema lists`);
    return columns!.slice(0, width);
  }

  /** Each row's value of each lookup vindex column the table owns: the lookup rows the INSERT writes with it. */
  private insertLookups(target: TableUse, ins: any, cols: string[], rows: any[][]): InsertLookups[] {
    const owned = target.lookups ?? [];
    if (!owned.length) return [];
    // A row the conflict skips (or updates) would leave a lookup row without its owner, or change a value behind its back.
    if (ins.onConflictClause) refuse(`INSERT ... ON CONFLICT into ${target.name}, which owns lookup vindex ${owned.map((l) => l.vindex).join(', ')}`);
    return owned.map((lookup) => {
      const at = cols.indexOf(lookup.column);
      if (at < 0) refuse(`INSERT into ${target.name} without its lookup vindex column ${lookup.column} (write it, NULL if it has no value)`);
      const values = rows.map((items) => valueOf(items[at]) ?? refuse(`INSERT into ${target.name}: ${lookup.column} (lookup vindex ${lookup.vindex}) must be a literal, NULL or $n`));
      return { lookup, values };
    });
  }

  /** Where an INSERT leaves the table's auto-increment column to its sequence: left out of the column list, or DEFAULT in a row. */
  private sequenceFill(table: string, ins: any, cols: string[], rows: any[][], spans: Array<[number, number]>, text: Buffer, base: number): SequenceFill | undefined {
    const auto = this.vschema.tables[table]?.auto_increment;
    if (!auto) return undefined;
    const places = this.vschema.tables[table].column_vindexes[0].column === auto.column;
    const at = cols.indexOf(auto.column);
    if (at < 0) {
      // Without a column list the column would take its local default: no column list to add it to.
      if (!ins.cols?.length) refuse(`INSERT into ${table} without a column list and without its auto-increment column ${auto.column}: name the columns`);
      const lastCol = ins.cols[ins.cols.length - 1].ResTarget.location - base;
      return { sequence: auto.sequence, column: auto.column, addColumnAt: closeParenAfter(text, lastCol), defaults: [], places };
    }
    const defaults = rows.map((items, i) => (items[at]?.SetToDefault ? items[at].SetToDefault.location - base - spans[i][0] : undefined));
    return defaults.some((d) => d !== undefined) ? { sequence: auto.sequence, column: auto.column, defaults, places } : undefined;
  }

  private planRoutineCall(call: any, text: Buffer, verb: string): Plan {
    const name = lastName(call.funcname);
    const routine = this.vschema.routines[name];
    if (!routine) {
      return verb === 'CALL' ? refuse(`CALL ${name}: the procedure is not in the VSchema (routines)`) : { kind: 'reference', sql: text, tables: [] };
    }
    const arg = (call.args ?? [])[routine.argument];
    const v = arg && valueOf(arg);
    if (!v) return refuse(`${verb} ${name}: argument ${routine.argument} carries the shard key and must be a literal or $n`);
    const vi = this.vschema.vindexes[routine.vindex];
    return { kind: 'write', sql: text, pin: { vindex: routine.vindex, type: vi.type as FunctionalVindex, column: `${name}(arg ${routine.argument})`, values: [v] }, tables: [] };
  }

  /** The table a RangeVar names, as the VSchema knows it; unknown user tables are refused. */
  private tableUse(rv: any): TableUse {
    const name: string = rv.relname;
    const alias: string = rv.alias?.aliasname ?? name;
    if (SYSTEM_SCHEMAS.has(rv.schemaname) || (!rv.schemaname && name.startsWith('pg_'))) return { alias, name, kind: 'system' };
    if (!rv.schemaname && this.ctes.has(name)) return { alias, name, kind: 'reference' };
    // A temporary table comes first in the search path: it hides a table of the VSchema of the same name.
    if ((!rv.schemaname || rv.schemaname === 'pg_temp') && this.temps.has(name)) return { alias, name, kind: 'reference' };
    const t = this.vschema.tables[name];
    if (!t) return refuse(`table ${name} is not in the VSchema of this sharded database`);
    if (t.type === 'reference') return { alias, name, kind: 'reference' };
    const cv = t.column_vindexes[0];
    let lookups = this.lookupsOf.get(name);
    if (!lookups) this.lookupsOf.set(name, (lookups = ownedLookups(this.vschema, name)));
    const relation = rv.schemaname ? `${quoteIdent(rv.schemaname)}.${quoteIdent(name)}` : quoteIdent(name);
    return { alias, name, kind: 'sharded', pin: { column: cv.column, vindex: cv.name, type: this.vschema.vindexes[cv.name].type as FunctionalVindex }, lookups, relation };
  }

  /**
   * Whether `name` is a column of a relation of the FROM list, from the columns learnt (a GROUP BY
   * name is one before it is an output name). Throws ColumnsNeededError for relations not learnt yet.
   */
  private isInputColumn(name: string, from: any[]): boolean {
    const relations: string[] = [];
    const visit = (n: any) => {
      if (n.JoinExpr) return [n.JoinExpr.larg, n.JoinExpr.rarg].forEach(visit);
      const rv = n.RangeVar;
      const unknown = !rv ? 'a subquery or function' : !rv.schemaname && this.ctes.has(rv.relname) ? `WITH query ${rv.relname}`
        : this.temps.has(rv.relname) ? `temporary table ${rv.relname}` : undefined; // learnt columns are every session's
      if (unknown) refuse(`GROUP BY ${name}, an output name that may also be a column of ${unknown}, over all shards (group by the expression or its position)`);
      relations.push(rv.schemaname ? `${quoteIdent(rv.schemaname)}.${quoteIdent(rv.relname)}` : quoteIdent(rv.relname));
    };
    from.forEach(visit);
    const unknown = relations.filter((r) => !this.columns.has(r));
    if (unknown.length) throw new ColumnsNeededError(this, unknown);
    return relations.some((r) => this.columns.get(r)!.has(name));
  }

  /** The tables of a FROM list (joins flattened); subqueries in FROM are looked at by the caller. */
  private fromTables(items: any[]): TableUse[] {
    const out: TableUse[] = [];
    const visit = (n: any) => {
      if (n.RangeVar) out.push(this.tableUse(n.RangeVar));
      else if (n.JoinExpr) {
        visit(n.JoinExpr.larg);
        visit(n.JoinExpr.rarg);
      }
    };
    items.forEach(visit);
    return out;
  }

  /** Every table named anywhere under a node (subqueries, CTEs included). */
  tablesUnder(node: any): TableUse[] {
    const out: TableUse[] = [];
    walk(node, (k, n) => {
      if (k === 'RangeVar') out.push(this.tableUse(n));
    });
    return out;
  }

  /** Sharded tables in one query must be joined on their primary vindex columns (same vindex), or rows would miss each other. */
  private checkJoined(sharded: TableUse[], conditions: any[]): void {
    if (sharded.length < 2) return;
    const joined = new Set([sharded[0].alias]);
    const pairs = conditions.flatMap(conjuncts).map(equalityColumns).filter((p): p is [string[], string[]] => !!p);
    let grew = true;
    while (grew) {
      grew = false;
      for (const [a, b] of pairs) {
        const ta = columnTable(a, sharded);
        const tb = columnTable(b, sharded);
        if (!ta || !tb || ta === tb || ta.pin!.type !== tb.pin!.type || ta.pin!.vindex !== tb.pin!.vindex) continue;
        if (joined.has(ta.alias) !== joined.has(tb.alias)) {
          joined.add(ta.alias);
          joined.add(tb.alias);
          grew = true;
        }
      }
    }
    const apart = sharded.find((t) => !joined.has(t.alias));
    if (apart) refuse(`a join of sharded tables ${sharded[0].name} and ${apart.name} not on their primary vindex columns (${sharded[0].pin!.column}, ${apart.pin!.column})`);
  }

  /**
   * A statement whose subqueries (or CTEs, or FROM subselects) read sharded tables runs on one shard only
   * when every query level's sharded tables are pinned to the same keyspace id: by the same vindex and the
   * same single value (literal or $n), or by equality with the pinned top level's vindex column
   * (`l.tenant_id = o.tenant_id`). Anything else would read one shard's rows where all are meant: refused.
   */
  private oneShardWithSubqueries(top: { node: any; where: any; from?: any[]; target?: TableUse }, topSharded: TableUse[], nested: TableUse): Pin {
    const levels: Array<{ node: any; sharded: TableUse[] }> = [];
    walk(top.node, (k, n) => {
      if (k !== 'SelectStmt') return;
      if (n.op && n.op !== 'SETOP_NONE') {
        const inner = this.tablesUnder(n).find((t) => t.kind === 'sharded');
        if (inner) refuse(`${n.op.replace('SETOP_', '')} inside a subquery over sharded table ${inner.name}`);
        return;
      }
      levels.push({ node: n, sharded: this.fromTables(n.fromClause ?? []).filter((t) => t.kind === 'sharded') });
    });
    // Every sharded table must be in some level's FROM (an UPDATE/DELETE target is not among what tablesUnder sees).
    const covered = topSharded.length + levels.reduce((n, l) => n + l.sharded.length, 0);
    const named = this.tablesUnder(top.node).filter((t) => t.kind === 'sharded');
    if (covered !== named.length + (top.target ? 1 : 0)) refuse(`sharded table ${named[0].name} in a place of a subquery the gateway cannot follow`);
    let pin: Pin | undefined;
    if (topSharded.length) {
      this.checkJoined(topSharded, [top.where, ...joinQuals(top.from ?? [])]);
      pin = this.primaryPinOf(topSharded, top.where);
      if (!pin) refuse(`a subquery or WITH over sharded table ${nested.name} in a statement not pinned to one shard (pin ${topSharded[0].name}.${topSharded[0].pin!.column} to one value)`);
    }
    for (const level of levels) {
      if (!level.sharded.length) continue;
      const where = level.node.whereClause;
      this.checkJoined(level.sharded, [where, ...joinQuals(level.node.fromClause ?? [])]);
      const own = this.primaryPinOf(level.sharded, where);
      const first = level.sharded[0];
      if (own && (!pin || samePin(own, pin))) {
        pin ??= own;
        continue;
      }
      if (pin && this.correlatedOnVindex(level.sharded, where, topSharded)) continue;
      const column = `${first.name}.${first.pin!.column}`;
      refuse(pin ? `a subquery or WITH over sharded table ${first.name} that is not pinned to the statement's shard (pin ${column} to the same value, or correlate it on that column)`
        : `a subquery or WITH over sharded table ${first.name} not pinned to one shard (pin ${column} to one value)`);
    }
    return pin!;
  }

  /** The pin of the tables' primary vindex to one value (not a lookup), when WHERE sets one. */
  private primaryPinOf(tables: TableUse[], where: any): Pin | undefined {
    const pin = this.pinOf(tables, where);
    return pin && !pin.lookup && pin.values.length === 1 ? pin : undefined;
  }

  /** A conjunct of `where` equates one of `inner`'s vindex columns with a top-level table's column of the same vindex, named through its alias. */
  private correlatedOnVindex(inner: TableUse[], where: any, top: TableUse[]): boolean {
    const innerAliases = new Set(inner.map((t) => t.alias));
    return conjuncts(where).map(equalityColumns).some((pair) => {
      if (!pair) return false;
      for (const [a, b] of [pair, [pair[1], pair[0]]]) {
        const ti = columnTable(a, inner);
        const outerAlias = b.length >= 2 ? b[b.length - 2] : undefined; // an unqualified name would resolve in the subquery first
        const to = outerAlias && !innerAliases.has(outerAlias) ? columnTable(b, top) : undefined;
        if (ti && to && ti.pin!.vindex === to.pin!.vindex && ti.pin!.type === to.pin!.type) return true;
      }
      return false;
    });
  }

  /** The pin WHERE puts on the tables' primary vindex (all are joined on it, so one pins all). */
  private pinOf(tables: TableUse[], where: any): Pin | undefined {
    for (const c of conjuncts(where)) {
      const e = c.A_Expr;
      if (!e || (e.kind !== 'AEXPR_OP' && e.kind !== 'AEXPR_IN') || lastName(e.name) !== '=') continue;
      const col = e.lexpr?.ColumnRef ? fieldsOf(e.lexpr.ColumnRef) : undefined;
      const t = col && columnTable(col, tables);
      if (!t) continue;
      const list = e.kind === 'AEXPR_IN' ? e.rexpr?.List?.items ?? [] : [e.rexpr];
      const values = list.map(valueOf);
      if (!values.length || values.some((v: ValueRef | undefined) => !v)) continue;
      return { vindex: t.pin!.vindex, type: t.pin!.type, column: `${t.name}.${t.pin!.column}`, values };
    }
    return this.lookupPinOf(tables, where);
  }

  /** Without the primary vindex pinned: a lookup vindex column = value or IN (...), which the gateway turns into shards through the lookup table. */
  private lookupPinOf(tables: TableUse[], where: any): Pin | undefined {
    for (const c of conjuncts(where)) {
      const e = c.A_Expr;
      if (!e || (e.kind !== 'AEXPR_OP' && e.kind !== 'AEXPR_IN') || lastName(e.name) !== '=' || !e.lexpr?.ColumnRef) continue;
      const fields = fieldsOf(e.lexpr.ColumnRef);
      const col = fields[fields.length - 1];
      // A write-only vindex's lookup table may lack rows that existed before it: it does not route yet.
      const routing = (t: TableUse) => t.lookups?.find((l) => l.column === col && !l.writeOnly);
      const owners = tables.filter((t) => (fields.length < 2 || t.alias === fields[fields.length - 2]) && routing(t));
      if (owners.length !== 1) continue;
      const lookup = routing(owners[0])!;
      const values = (e.kind === 'AEXPR_IN' ? e.rexpr?.List?.items ?? [] : [e.rexpr]).map(valueOf);
      if (!values.length || values.some((v: ValueRef | undefined) => !v)) continue;
      return { vindex: lookup.vindex, type: lookup.type, column: `${lookup.owner}.${lookup.column}`, values, lookup };
    }
    return undefined;
  }
}

/**
 * A template for statements shaped like this one, when its route depends on
 * literals only through its pin (or not at all) and its text goes to the shards
 * unedited: a pinned SELECT/UPDATE/DELETE/routine call, or a reference read.
 * Each pin literal must be one of the text's literals, with the same value.
 */
function templateOf(plan: Plan, sql: string, literals: Literal[]): Template | undefined {
  // The shards get the text as the client wrote it, less a trailing `;` (pgbench and psql send one).
  const length = 'sql' in plan && plan.sql.length === sql.length ? sql.length : withoutTrailingSemicolon(sql);
  const statementOf = length === sql.length ? (text: string) => Buffer.from(text, 'latin1') : (text: string) => Buffer.from(text.slice(0, withoutTrailingSemicolon(text)), 'latin1');
  if (!('sql' in plan) || untemplated.has(plan) || plan.sql.length !== length || plan.sql.toString('latin1') !== sql.slice(0, length)) return undefined;
  if (plan.kind === 'reference') {
    const tables = plan.tables;
    return (text) => [{ kind: 'reference', sql: statementOf(text), tables }];
  }
  if ((plan.kind !== 'select' && plan.kind !== 'write') || !plan.pin || plan.merge || plan.owned) return undefined;
  const slots: Array<number | ValueRef> = [];
  for (const v of plan.pin.values) {
    if ('param' in v) {
      slots.push(v);
      continue;
    }
    const at = literalAt.get(v);
    const index = at === undefined ? -1 : literals.findIndex((l) => l.at === at);
    if (index < 0 || literals[index].value !== v.literal) return undefined;
    slots.push(index);
  }
  const { kind, pin, tables } = plan;
  return (text, lits) => [{
    kind, tables, sql: statementOf(text),
    pin: { ...pin, values: slots.map((s) => (typeof s === 'number' ? { literal: lits[s].value } : s)) },
  }];
}

/** A COPY statement's options by name. */
function copyOptions(c: any): Map<string, string> {
  return new Map((c.options ?? []).map((o: any) => [o.DefElem.defname, defElemValue(o.DefElem.arg)]));
}

/** A COPY option's value as Postgres reads it (a bare option, e.g. HEADER, is true). */
function defElemValue(arg: any): string {
  if (!arg) return 'true';
  if (arg.String) return arg.String.sval;
  if (arg.Boolean) return arg.Boolean.boolval ? 'true' : 'false';
  if (arg.Integer) return String(arg.Integer.ival ?? 0);
  return refuse('a COPY option value the gateway cannot read');
}

/** Plans no template may stand for (see oneShardWithSubqueries). */
const untemplated = new WeakSet<Plan>();

/** Two pins of one vindex to the same single value. */
function samePin(a: Pin, b: Pin): boolean {
  const [x, y] = [a.values[0], b.values[0]];
  const same = 'param' in x ? 'param' in y && x.param === y.param : 'literal' in y && x.literal === y.literal;
  return a.vindex === b.vindex && a.type === b.type && same;
}

/** Where each literal ValueRef's token starts in the text (for templateOf). */
const literalAt = new WeakMap<ValueRef, number>();

function planTransaction(t: any, text: Buffer): Plan {
  switch (t.kind) {
    case 'TRANS_STMT_BEGIN': case 'TRANS_STMT_START': return { kind: 'begin', sql: text };
    case 'TRANS_STMT_COMMIT': return { kind: 'commit', sql: text };
    case 'TRANS_STMT_ROLLBACK': return { kind: 'rollback', sql: text };
    case 'TRANS_STMT_SAVEPOINT': return { kind: 'savepoint', name: t.savepoint_name };
    case 'TRANS_STMT_RELEASE': return { kind: 'release', name: t.savepoint_name };
    case 'TRANS_STMT_ROLLBACK_TO': return { kind: 'rollback_to', name: t.savepoint_name };
    default: return refuse(`${t.kind.replace('TRANS_STMT_', '').replace(/_/g, ' ')} on a sharded database`);
  }
}

function planSet(s: any, text: Buffer): Plan {
  if (s.name === 'mg.transaction_mode') {
    const mode = s.args?.[0]?.A_Const?.sval?.sval;
    if (!['single', 'multi', 'twopc'].includes(mode)) return refuse(`mg.transaction_mode must be 'single', 'multi' or 'twopc'`);
    return { kind: 'transaction_mode', mode };
  }
  if (s.is_local) return { kind: 'set_local', sql: text };
  return { kind: 'set', sql: text };
}

/** A literal or parameter (through casts), or undefined for any other expression. */
function valueOf(n: any): ValueRef | undefined {
  if (!n) return undefined;
  if (n.TypeCast) return valueOf(n.TypeCast.arg);
  if (n.ParamRef) return { param: n.ParamRef.number };
  const c = n.A_Const;
  if (!c) return undefined;
  if (c.isnull) return { literal: null };
  const v: ValueRef = c.ival ? { literal: String(c.ival.ival ?? 0) } : c.fval ? { literal: c.fval.fval } : c.sval ? { literal: c.sval.sval }
    : c.boolval ? { literal: c.boolval.boolval ? 'true' : 'false' }
      : { literal: '0' }; // an integer 0 has no ival field
  if (c.location !== undefined) literalAt.set(v, c.location);
  return v;
}

function nodeLocation(n: any): number {
  const body = n.TypeCast ? n.TypeCast.arg : n;
  const inner = Object.values(body)[0] as { location?: number };
  if (inner?.location === undefined || inner.location < 0) throw new RefusedError('a value without a position in the text');
  return inner.location;
}

function conjuncts(n: any): any[] {
  if (!n) return [];
  if (n.BoolExpr?.boolop === 'AND_EXPR') return n.BoolExpr.args.flatMap(conjuncts);
  return [n];
}

function joinQuals(items: any[]): any[] {
  const out: any[] = [];
  walk(items, (k, n) => {
    if (k === 'JoinExpr' && n.quals) out.push(n.quals);
  });
  return out;
}

function equalityColumns(n: any): [string[], string[]] | undefined {
  const e = n.A_Expr;
  if (!e || e.kind !== 'AEXPR_OP' || lastName(e.name) !== '=' || !e.lexpr?.ColumnRef || !e.rexpr?.ColumnRef) return undefined;
  return [fieldsOf(e.lexpr.ColumnRef), fieldsOf(e.rexpr.ColumnRef)];
}

/** The sharded table whose primary vindex column this reference names ([alias, col] or [col]). */
function columnTable(fields: string[], tables: TableUse[]): TableUse | undefined {
  const col = fields[fields.length - 1];
  if (fields.length >= 2) return tables.find((t) => t.alias === fields[fields.length - 2] && t.pin?.column === col);
  const matches = tables.filter((t) => t.pin?.column === col);
  return matches.length === 1 ? matches[0] : undefined;
}

function fieldsOf(ref: any): string[] {
  return (ref.fields ?? []).map((f: any) => f.String?.sval ?? '*');
}

function columnName(n: any): string | undefined {
  if (n?.ColumnRef) {
    const f = fieldsOf(n.ColumnRef);
    return f[f.length - 1] === '*' ? undefined : f[f.length - 1];
  }
  if (n?.FuncCall) return lastName(n.FuncCall.funcname); // Postgres names an unaliased call after the function
  if (n?.TypeCast) return columnName(n.TypeCast.arg);
  return undefined;
}

/**
 * The order in which the shards send a grouped read so the gateway can merge it group by group
 * (decision 0070): the user's ORDER BY when it starts with every group column (by position), or, with
 * no ORDER BY, the group columns ascending (the shard text then gets that ORDER BY: sortedBy). DISTINCT
 * without GROUP BY groups by all `distinctColumns` selected. Undefined: the rows are gathered.
 */
function streamedGroups(groupBy: number[] | undefined, distinctColumns: number, orderBy: SortKey[]): SortKey[] | undefined {
  const keys = groupBy?.length ? groupBy : distinctColumns ? Array.from({ length: distinctColumns }, (_, i) => i + 1) : undefined;
  if (!keys) return undefined;
  if (!orderBy.length) return keys.map((column) => ({ column, desc: false, nullsFirst: false }));
  const leading = orderBy.slice(0, keys.length);
  const covered = new Set(leading.map((k) => k.column));
  return covered.size === keys.length && keys.every((k) => covered.has(k)) ? leading : undefined;
}

/** A read whose rows the shards send in `order` (by output position), with the text as written inside. */
function sortedBy(sql: Buffer, order: SortKey[]): Buffer {
  const text = sql.toString('latin1'); // bytes kept as they are
  const by = order.map((k) => `${k.column}${k.desc ? ' DESC' : ''}${k.nullsFirst !== k.desc ? (k.nullsFirst ? ' NULLS FIRST' : ' NULLS LAST') : ''}`);
  // New lines keep a trailing `--` comment of the text from reaching the clause after it.
  return Buffer.from(`SELECT * FROM (\n${text.slice(0, withoutTrailingSemicolon(text))}\n) AS mg_groups ORDER BY ${by.join(', ')}`, 'latin1');
}

const isStar = (t: any) => !!t.ResTarget?.val?.ColumnRef?.fields?.some((f: any) => f.A_Star);

/**
 * Where the text of `node` ends when it starts at byte `start`: at the shortest span that parses, as `SELECT <span>`,
 * to the same node (`of` picks it from the parsed target). Undefined when none does.
 */
function spanEnd(text: Buffer, start: number, node: any, of: (target: any) => any): number | undefined {
  const want = withoutLocations(node);
  for (const end of tokenEnds(text, start)) {
    let targets: any[] | undefined;
    try {
      targets = parseSync(`SELECT ${text.toString('utf8', start, end)}`).stmts?.[0]?.stmt?.SelectStmt?.targetList;
    } catch {
      continue; // not an expression yet
    }
    if (targets?.length === 1 && withoutLocations(of(targets[0])) === want) return end;
  }
  return undefined;
}

/** An expression as the statement writes it, copied so that its `$n` keep their numbers (and the types Bind gives them). */
function expressionText(node: any, text: Buffer, base: number): string {
  let start = Infinity;
  walk(node, (_, b) => {
    if (b.location >= 0 && b.location < start) start = b.location;
  });
  for (start -= base; start >= 0 && start < text.length;) {
    const end = spanEnd(text, start, node, (t) => t.ResTarget?.val);
    if (end !== undefined) return text.toString('utf8', start, end);
    // An expression in parentheses starts before its first token.
    let open = start - 1;
    while (open >= 0 && isSpace(text[open])) open--;
    if (text[open] !== 0x28) break;
    start = open;
  }
  return refuse(`${nodeName(node)} in ORDER BY, GROUP BY or HAVING, which the gateway cannot find in the text`);
}

const COMPARISONS = new Set(['=', '<>', '<', '<=', '>', '>=']);
/** The comparison with its sides swapped: `5 < count(*)` is `count(*) > 5`. */
const FLIPPED: Record<Comparison, Comparison> = { '=': '=', '<>': '<>', '<': '>', '<=': '>=', '>': '<', '>=': '<=' };

/**
 * A HAVING as the gateway applies it to each merged group (decision 0072): AND / OR / NOT of comparisons
 * between a select-list item and a constant or $n, and IS [NOT] NULL of one. Anything else is refused.
 */
function havingOf(n: any, operand: (n: any) => number): Having {
  if (findNode(n, (k) => k === 'SubLink')) refuse('a subquery in HAVING over all shards');
  const b = n.BoolExpr;
  if (b) {
    const args = b.args.map((a: any) => havingOf(a, operand));
    return b.boolop === 'NOT_EXPR' ? { op: 'not', arg: args[0] } : { op: b.boolop === 'AND_EXPR' ? 'and' : 'or', args };
  }
  if (n.NullTest) return { op: n.NullTest.nulltesttype === 'IS_NULL' ? 'is null' : 'is not null', column: operand(n.NullTest.arg) };
  const e = n.A_Expr;
  const op = e?.kind === 'AEXPR_OP' ? lastName(e.name) as Comparison : undefined;
  if (!op || !COMPARISONS.has(op)) return refuse(`${nodeName(n)} in HAVING over all shards (compare an aggregate or group column with a constant or $n)`);
  const right = valueOf(e.rexpr);
  const left = valueOf(e.lexpr);
  if (left && right) refuse('a HAVING comparison of two constants over all shards');
  if (!left && !right) return refuse(`a HAVING comparison of ${nodeName(e.lexpr)} with ${nodeName(e.rexpr)} over all shards (compare with a constant or $n)`);
  const column = operand(right ? e.lexpr : e.rexpr);
  return right ? { op, column, value: right } : { op: FLIPPED[op], column, value: left! };
}

const withoutLocations = (n: any) => JSON.stringify(n, (k, v) => (k === 'location' ? undefined : v));

/** How a refusal names an expression: a function by name, a column, an operator, else its node kind. */
function nodeName(n: any): string {
  if (n?.FuncCall) return `${lastName(n.FuncCall.funcname)}(...)`;
  if (n?.ColumnRef) return `column ${columnName(n) ?? '*'}`;
  if (n?.TypeCast) return nodeName(n.TypeCast.arg);
  if (n?.A_Expr) return n.A_Expr.kind === 'AEXPR_OP' ? `operator ${lastName(n.A_Expr.name)}` : n.A_Expr.kind.replace('AEXPR_', '').replace(/_/g, ' ');
  return Object.keys(n ?? {})[0] ?? 'an expression';
}

const NO_TEMPS: ReadonlySet<string> = new Set();

/**
 * The temporary tables a DDL statement creates (`CREATE TEMP TABLE`) or may drop (`DROP TABLE`
 * names that may be some): a session keeps their names and reads them as reference tables,
 * a copy on each shard link of that session.
 */
function tempTablesOf(type: string, body: any): { temp?: { creates?: string; drops?: string[] } } {
  if (type === 'CreateStmt' && body.relation?.relpersistence === 't') return { temp: { creates: body.relation.relname } };
  if (type === 'DropStmt' && body.removeType === 'OBJECT_TABLE') {
    const names: any[][] = (body.objects ?? []).map((o: any) => o.List?.items ?? []);
    return { temp: { drops: names.filter((n) => n.length === 1 || n[n.length - 2]?.String?.sval === 'pg_temp').map(lastName) } };
  }
  return {};
}

const quoteIdent = (name: string) => `"${name.replace(/"/g, '""')}"`;
const lastName = (names: any[] | undefined): string => (names ?? []).map((x) => x.String?.sval).filter(Boolean).pop() ?? '';
const isAggregateName = (n: string) => ['avg', 'stddev', 'variance', 'string_agg', 'array_agg', 'json_agg', 'jsonb_agg', 'bool_and', 'bool_or', 'every', 'percentile_cont', 'percentile_disc', 'mode'].includes(n);

export function walk(n: any, visit: (kind: string, body: any) => void): void {
  if (Array.isArray(n)) {
    for (const x of n) walk(x, visit);
    return;
  }
  if (!n || typeof n !== 'object') return;
  for (const [k, v] of Object.entries(n)) {
    if (v && typeof v === 'object' && !Array.isArray(v) && /^[A-Z]/.test(k)) visit(k, v);
    walk(v, visit);
  }
}

/**
 * An aggregate call of this query level under `n`: one outside any subquery, or one in a subquery whose
 * arguments may read this level's columns (Postgres gives an aggregate to the outermost level its
 * arguments read). One in a subquery whose arguments read no column (`count(*)`), or only columns
 * qualified by the names of that subquery's FROM lists (`max(p.price)`), is the subquery's: each row's.
 */
function ownAggregate(n: any, inner?: ReadonlySet<string>): any {
  if (Array.isArray(n)) {
    for (const x of n) {
      const found = ownAggregate(x, inner);
      if (found) return found;
    }
    return undefined;
  }
  if (!n || typeof n !== 'object') return undefined;
  for (const [k, v] of Object.entries(n) as Array<[string, any]>) {
    if (!v || typeof v !== 'object') continue;
    if (k === 'SubLink' && v.subselect?.SelectStmt) {
      const names = new Set([...(inner ?? []), ...fromNames(v.subselect.SelectStmt.fromClause ?? [])]);
      const found = ownAggregate(v.subselect, names) ?? ownAggregate(v.testexpr, inner);
      if (found) return found;
      continue;
    }
    if (k === 'FuncCall' && !v.over && (AGGREGATES.has(lastName(v.funcname)) || isAggregateName(lastName(v.funcname)))) {
      const reads: any[] = [];
      walk([v.args, v.agg_filter], (kind, ref) => kind === 'ColumnRef' && reads.push(ref));
      const outer = reads.some((ref) => {
        const fields = fieldsOf(ref);
        return fields.length < 2 || !inner?.has(fields[fields.length - 2]);
      });
      if (!inner || outer) return v;
    }
    const found = ownAggregate(v, inner);
    if (found) return found;
  }
  return undefined;
}

/** The names a FROM list gives its items (aliases, else table names), joins flattened. */
function fromNames(items: any[]): string[] {
  return items.flatMap((n: any): string[] => {
    if (n.JoinExpr) return [...fromNames([n.JoinExpr.larg, n.JoinExpr.rarg]), ...(n.JoinExpr.alias ? [n.JoinExpr.alias.aliasname] : [])];
    const alias = (n.RangeVar ?? n.RangeSubselect ?? n.RangeFunction)?.alias?.aliasname;
    return alias ? [alias] : n.RangeVar ? [n.RangeVar.relname] : [];
  });
}

function findNode(n: any, match: (kind: string, body: any) => boolean): any {
  let found: any;
  walk(n, (k, b) => {
    if (!found && match(k, b)) found = b;
  });
  return found;
}

const statementName = (type: string) => type.replace(/Stmt$/, '').replace(/([a-z])([A-Z])/g, '$1 $2').toUpperCase();
