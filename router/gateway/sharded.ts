/**
 * A client of a sharded database. Unlike GatewaySession, which relays bytes to
 * the one shard of an unsharded database, this session terminates the client
 * protocol: every statement is planned (router/planner) and run on the shards
 * its plan names, over one pooler link per shard (opened on first use, with
 * the session's settings replayed), and scatter results are merged here.
 * Transactions span the shards they touch under the session's
 * mg.transaction_mode (docs/sharding.md).
 */
import net from 'node:net';
import { counter, histogram } from '../../common/metrics.ts';
import { VindexValueError } from '../../schemas/vschema/vindex.ts';
import type { KeyRange } from '../../schemas/index.ts';
import { parseVSchema } from '../../schemas/vschema/index.ts';
import { MOVED_WRITES_SQLSTATE, movedTablesOf, type VSchemaRecord } from '../../schemas/topology.ts';
import type { SchemaChange } from '../../schemas/generated/types.ts';
import { rowWindow } from '../planner/merge.ts';
import { CopyRowSplitter, type CopyRow } from '../planner/copy-rows.ts';
import { describePlan, fillSequence, idsNeeded, pinnedShards, routeKind, shardOfValue, type BoundParam, type CopyInPlan, type InsertPlan, type Merge, type Plan } from '../planner/plan.ts';
import { ColumnsNeededError, Planner, RefusedError } from '../planner/planner.ts';
import { renumberParams } from '../planner/sqltext.ts';
import { PgError, SQLSTATE } from '../protocol/errors.ts';
import { ReadThrottle } from '../protocol/output.ts';
import { quoteIdent } from '../pooler/text.ts';
import type { TwoPhaseCoordinator } from '../twopc/coordinator.ts';
import { cstr, DEFAULT_MAX_MESSAGE, frameAt, int16, int32, message, MessageScanner, BodyReader } from '../protocol/frames.ts';
import { routeStatements, type Routed } from './routing.ts';
import {
  BIND_COMPLETE, backendKeyData, CLOSE_COMPLETE, commandComplete, dataRow, decodeParse, encodeCancel, encodeErrorFields, EMPTY_QUERY_RESPONSE, errorFieldsAt, errorResponse,
  NO_DATA, PARSE_COMPLETE, parameterStatus, readyForQuery, rowDescription, SYNC, T,
} from '../protocol/messages.ts';
import type { Discovery, Endpoint, PrimaryMove } from './discovery.ts';
import { insertLookupRows, moveLookupRows, shardsByLookup, type LookupAccess, type TextRow } from './lookups.ts';
import { ScatterRead } from './scatter-read.ts';
import { sequenceBlocks } from './sequences.ts';
import { decodeDataRow, ShardLink, ShardResult, shardError, withoutLastColumns, type ResponseHandler } from './shard-link.ts';
import { READ_ONLY_BEGIN, readOnlyRouted } from './session.ts';

export type TransactionMode = 'single' | 'multi' | 'twopc';

/** What a transaction carries to its end: savepoints and SET LOCALs (replayed on shards that join), and its DDL. */
type TxScoped = { savepoint: string } | { setLocal: string } | { ddl: SchemaChangeRecord };
const txScopedSql = (e: { savepoint: string } | { setLocal: string }) => ('savepoint' in e ? `SAVEPOINT ${quoteIdent(e.savepoint)}` : e.setLocal);

/** Statements by route kind since the last scrape: a plain count per statement (prom-client's inc costs about a microsecond). */
const statementsByRoute = new Map<string, number>();
counter('mg_gateway_sharded_statements_total', 'Statements of sharded databases, by route kind', ['route'], function collect() {
  for (const [route, n] of statementsByRoute) this.inc({ route }, n);
  statementsByRoute.clear();
});
const countStatement = (route: string) => void statementsByRoute.set(route, (statementsByRoute.get(route) ?? 0) + 1);
/** Bytes of a streamed result gathered before they go to the client (one write, not one per row). */
const STREAM_CHUNK = 64 * 1024;
const copyRows = counter('mg_gateway_sharded_copy_rows_total', 'Rows of COPY FROM STDIN into sharded databases the gateway split and sent to their shards');
const shardsPerStatement = histogram('mg_gateway_sharded_shards_per_statement', 'Shards a statement of a sharded database ran on', [], [1, 2, 4, 8, 16, 32, 64, 128, 256]);
const refusals = counter('mg_gateway_sharded_refused_total', 'Statements refused with 0A000 because no route answers them correctly');
const commits = counter('mg_gateway_sharded_commits_total', 'Commits of sharded transactions, by mode and participant count', ['mode', 'shards']);
const heldStatements = counter('mg_gateway_routing_held_total', 'Statements on moved tables held while their workflow switched traffic, by outcome', ['outcome']);

/** Planners by VSchema version: each caches its plans, and a new version starts a new cache. */
const planners = new WeakMap<VSchemaRecord, Planner>();
/** The database whose shards answer a planner's questions about columns. */
const databaseOf = new WeakMap<Planner, string>();
const noVSchema = new Planner(parseVSchema({}));
export function plannerFor(database: string, record: VSchemaRecord | undefined): Planner {
  if (!record) return noVSchema;
  let p = planners.get(record);
  if (!p) {
    planners.set(record, (p = new Planner(record.vschema)));
    databaseOf.set(p, database);
  }
  return p;
}

/** The columns of relations named as statements name them (a JSON array of texts), from a shard's catalog. */
const COLUMNS_OF = `SELECT r.relation, a.attname FROM json_array_elements_text($1::json) AS r(relation)
  LEFT JOIN pg_attribute a ON a.attrelid = to_regclass(r.relation) AND a.attnum > 0 AND NOT a.attisdropped`;

export interface ShardedSessionOptions {
  discovery: Discovery;
  bufferWindowMs: number;
  key: { pid: number; secret: number };
  /** Commits the transactions that wrote on several shards in `twopc` mode. */
  twopc: TwoPhaseCoordinator;
  /** Records DDL that ran on the shards (an event on mg.schema.changes.v1); never throws. */
  recordSchemaChange: (change: SchemaChangeRecord) => void;
  /** Told once a session is idle again after DDL ran on the database (the REST schema cache reloads). */
  onSchemaChange?: (database: string) => void;
  /** Transactions that begin READ ONLY run on each shard's replicas (a shard's primary when it has none usable). */
  readOnlyToReplicas?: boolean;
}

/** A SchemaChange event as the session knows it (the gateway adds id, time and source). */
export type SchemaChangeRecord = Omit<SchemaChange, 'eventId' | 'ts' | 'source'>;

/** How a statement reaches the shards: as a Query, or as the Parse/Bind/Execute of a portal (`limited`: Execute with a row limit). */
type How = { simple: true } | { simple: false; portal: Portal; describe: boolean; limited: boolean };

/**
 * A prepared statement of the extended protocol: the text and its plan, made at Parse. `shardParse` is the
 * Parse of the unnamed statement that shards get for the plan's text with these parameter types (made once).
 */
interface Prepared { sql: string; paramTypes: number[]; plan: Plan; database: string; shardParse?: Buffer; planner: Planner }
/**
 * A bound portal: its first Execute runs it. A read executed with a row limit keeps its shards' answers open
 * in `read` and hands its rows out Execute by Execute; other statements' rows are computed whole, kept in
 * `pending`. `shardBind` is the Bind of the unnamed portal and statement that shards get (`bindRest` after
 * empty names).
 */
interface Portal { prepared: Prepared; params: BoundParam[]; bindRest: Buffer; shardBind: Buffer; pending?: Buffer[]; tag?: string; read?: ScatterRead; described: boolean }

/** Statements the session answers itself (no rows to describe). */
/** A statement and the database that runs it. */
type Route = Extract<Routed, { database: string }>;

const SESSION_COMMANDS = new Set(['begin', 'commit', 'rollback', 'set', 'transaction_mode', 'set_local', 'savepoint', 'release', 'rollback_to']);
/** Plans that write rows or schema: refused in a replica session before anything runs (a sequence block, a lookup row). */
const WRITES = new Set<Plan['kind']>(['insert', 'write', 'all']);

export class ShardedSession {
  readonly database: string;
  /** `db@replica`: each shard's link goes to one of its serving replicas within the lag threshold, and writes are refused. */
  readonly target: 'primary' | 'replica';
  /**
   * The database the statement being run goes to: the session's own, or (on a
   * database with routing rules) the one serving the statement's tables.
   */
  private current: string;
  /** Shard links by `database/shard`. */
  private readonly links = new Map<string, ShardLink>();
  /** See sequenceLink(). */
  private seqLink: ShardLink | undefined;
  private readonly connecting = new Map<string, Promise<ShardLink>>();
  private readonly fromClient = new MessageScanner(DEFAULT_MAX_MESSAGE);
  private out: Buffer[] = [];
  /** Bytes of rows in `out`: past STREAM_CHUNK a streamed result goes out before it ends. */
  private outRowBytes = 0;
  /** A client slower than a streamed result stops its shards' reads (forward()). */
  private readonly throttle: ReadThrottle;
  /**
   * Client messages are handled one after another, each after the previous one's shard work; those
   * that need no shard (Parse, Bind, Sync, ...) are handled at once, without a promise.
   */
  private readonly inbox: Buffer[] = [];
  private pumping = false;
  private ended = false;
  /** Set when the database is dropped or scaled to zero: the session ends at its next idle point. */
  private endAtIdle: PgError | undefined;
  /** Session SETs in order, replayed on each new shard link. */
  private settings: string[] = [];
  mode: TransactionMode;
  private inTransaction = false;
  /** The open transaction began READ ONLY and runs on replicas (readOnlyToReplicas). */
  private readOnlyTransaction = false;
  /** The transaction was opened by the gateway for one statement that keeps lookup vindexes (not by BEGIN). */
  private implicitTransaction = false;
  private transactionFailed = false;
  /** DDL ran since the session was last idle (onSchemaChange is told once it is). */
  private schemaChanged = false;
  /** This session's temporary tables: a copy on each shard link, read and written as reference tables (decision 0082). */
  private readonly temps = new Set<string>();
  private beginSql = 'BEGIN';
  /**
   * The open transaction's SAVEPOINTs and SET LOCALs in order: sent to every shard in the transaction, and
   * replayed after BEGIN on a shard that joins later, where its work then starts after every savepoint (so
   * ROLLBACK TO a savepoint set before it joined undoes all of it, as on one Postgres). Its DDL is here
   * too (not replayed): recorded at COMMIT unless a ROLLBACK TO undid it.
   */
  private txScoped: TxScoped[] = [];
  /** The route of the last statement, for SHOW mg_plan. */
  private lastRoute: { plan: Plan; shards: string[] } | undefined;
  private readonly prepared = new Map<string, Prepared>();
  private readonly portals = new Map<string, Portal>();
  /** Extended protocol: after an error, messages are skipped until Sync. */
  private skipToSync = false;
  /** A COPY FROM STDIN in progress: the client's CopyData go to the shards. */
  private copying: CopyIn | undefined;

  constructor(private readonly socket: net.Socket, readonly params: Record<string, string>, private readonly opts: ShardedSessionOptions) {
    const [database, suffix] = (params.database ?? params.user).split('@');
    this.database = database;
    this.current = database;
    this.target = suffix === 'replica' ? 'replica' : 'primary';
    this.mode = (opts.discovery.topology.databases.get(this.database)?.transactionMode as TransactionMode | null) ?? 'multi';
    this.throttle = new ReadThrottle(socket);
  }

  private get planner(): Planner {
    return plannerFor(this.database, this.opts.discovery.topology.vschemas.get(this.database));
  }

  /**
   * The statements of `sql` and where each runs. On a database with routing
   * rules, a statement on tables whose switch is in progress waits here (the
   * buffer window at most) until the rule changes.
   */
  private routed(sql: string): Route[] | Promise<Route[]> {
    return this.learningColumns(() => (movedTablesOf(this.opts.discovery.topology, this.database) || this.unsharded ? this.routedByRules(sql) : this.plannedHere(sql)));
  }

  /** Plans with `plan`; when a planner must first know which columns some relations have, reads them and plans again. */
  private learningColumns(plan: () => Route[] | Promise<Route[]>): Route[] | Promise<Route[]> {
    const again = (err: unknown): Promise<Route[]> => {
      if (!(err instanceof ColumnsNeededError)) throw err;
      return this.learnColumns(err).then(() => this.learningColumns(plan));
    };
    try {
      const routes = plan();
      return routes instanceof Promise ? routes.catch(again) : routes;
    } catch (err) {
      return again(err);
    }
  }

  /** Reads from the first shard of the planner's database the columns it asked about (on this session's link, its search_path). */
  private async learnColumns(needed: ColumnsNeededError): Promise<void> {
    const database = databaseOf.get(needed.planner) ?? this.database;
    const before = this.current;
    this.current = database;
    try {
      const link = await this.link(this.ranges()[0].shard);
      const result = await link.execute(COLUMNS_OF, [JSON.stringify(needed.relations)]);
      const columns = new Map<string, string[]>(needed.relations.map((r) => [r, []]));
      for (const row of result.rows.map(decodeDataRow)) if (row[1]) columns.get(row[0]!.toString('utf8'))?.push(row[1].toString('utf8'));
      for (const [relation, names] of columns) needed.planner.learnColumns(relation, names);
    } finally {
      this.current = before;
    }
  }

  /**
   * An unsharded database's session is planned here only for its routing rules; once they are gone
   * (a workflow cancelled, a migration ended) its statements still go to its one shard as written.
   */
  private get unsharded(): boolean {
    return !this.opts.discovery.topology.databases.get(this.database)?.sharded;
  }

  /** The statements of `sql` planned with this database's VSchema (and this session's temporary tables). */
  private plannedHere(sql: string): Route[] {
    return this.planner.plan(sql, this.temps).map((plan) => ({ text: sql, database: this.database, plan }));
  }

  private async routedByRules(sql: string): Promise<Route[]> {
    const topology = this.opts.discovery.topology;
    for (;;) {
      const rules = movedTablesOf(topology, this.database);
      if (!rules && !this.unsharded) return this.plannedHere(sql);
      const routes = routeStatements(sql, {
        source: this.database, rules: rules ?? new Map(), inTransaction: this.inTransaction,
        ...(topology.databases.get(this.database)?.sharded ? { sessionPlanner: this.planner, sourceSharded: true, temps: this.temps } : { sessionPlanner: noVSchema, sourceSharded: false }),
        targetPlanner: (db) => plannerFor(db, topology.vschemas.get(db)),
      });
      const held = routes.find((r) => r.held)?.held;
      if (!held) return routes as Route[];
      const changed = await this.opts.discovery.waitUntil(() => topology.routingRules.get(held.workflow)?.version !== held.version, this.opts.bufferWindowMs);
      heldStatements.inc({ outcome: changed ? 'released' : 'timed_out' });
      if (!changed) {
        throw new PgError('ERROR', SQLSTATE.CANNOT_CONNECT_NOW, `workflow ${held.workflow} is switching traffic of ${held.tables.join(', ')} and did not finish within ${this.opts.bufferWindowMs} ms`);
      }
    }
  }

  /**
   * Runs a routed statement. One the database refuses because its writes
   * moved away meanwhile (a statement that reached it before this gateway saw
   * the switch begin) runs again once the rule has changed: where it now
   * points, or on the same database when a switch failed and rolled back
   * (which lets it take writes again). Not inside a transaction (that
   * transaction cannot move).
   */
  private async executeRouted(r: Route, how: How): Promise<void> {
    this.current = r.database;
    const rules = this.ruleVersions();
    try {
      await this.execute(r.plan, how);
    } catch (err) {
      if (!(err instanceof PgError) || err.code !== MOVED_WRITES_SQLSTATE || this.inTransaction) throw err;
      const topology = this.opts.discovery.topology;
      const deadline = Date.now() + this.opts.bufferWindowMs;
      for (;;) {
        const [again] = await this.routed(r.text);
        if (again.database !== r.database || this.ruleVersions() !== rules) {
          heldStatements.inc({ outcome: 'retried' });
          return this.executeRouted(again, how);
        }
        // This gateway has not seen the switch begin yet: wait for the next topology event.
        const seen = topology.applied;
        if (Date.now() >= deadline || !(await this.opts.discovery.waitUntil(() => topology.applied !== seen, deadline - Date.now()))) throw err;
      }
    }
  }

  /** The versions of the routing rules of this session's database, as one comparable text. */
  private ruleVersions(): string {
    const rules = movedTablesOf(this.opts.discovery.topology, this.database);
    return rules ? [...new Set(rules.values())].map((rule) => `${rule.workflow}@${rule.version}`).join(',') : '';
  }

  /** The shards of the statement's database, in key-range order. */
  private ranges() {
    return this.opts.discovery.keyRanges(this.current);
  }

  async start(pending: Buffer): Promise<void> {
    const ranges = this.ranges();
    if (!ranges.length) throw new PgError('FATAL', SQLSTATE.INVALID_CATALOG_NAME, `database "${this.database}" does not exist`);
    const first = await this.link(ranges[0].shard);
    const greeting = [...first.up.parameters].map(([k, v]) => parameterStatus(k, v));
    this.socket.write(Buffer.concat([...greeting, backendKeyData(this.opts.key.pid, this.opts.key.secret), readyForQuery('I')]));
    this.socket.on('data', (chunk: Buffer) => this.onClientData(chunk));
    this.socket.on('close', () => this.end());
    this.socket.on('error', () => this.end());
    if (pending.length) this.onClientData(pending);
  }

  /** A cancel request reaches whatever the session is running on every shard. */
  cancel(): void {
    for (const link of this.links.values()) {
      const s = net.connect({ host: link.ep.host, port: link.ep.port }, () => s.end(encodeCancel(link.up.pid, link.up.secret)));
      s.on('error', () => s.destroy());
    }
  }

  /** Links are per shard and reopened on demand; idle release is the unsharded sessions' business. */
  releaseIdleLink(): boolean {
    return false;
  }

  /**
   * A shard's primary moved: a link to the old one that is in the client's
   * transaction ends the session (57P01: it did not commit); an idle one is
   * closed and reopened on the new primary at next use.
   */
  leaveReplacedPrimary(move: PrimaryMove): 'in_transaction' | undefined {
    if (this.ended) return undefined;
    const key = `${move.database}/${move.shard}`;
    const link = this.links.get(key);
    if (!link || link.ep.instanceId === move.to) return undefined;
    if (link.inTransaction) {
      this.fail(new PgError('FATAL', SQLSTATE.ADMIN_SHUTDOWN,
        `terminating connection because the primary of ${move.database}/${move.shard} was replaced (term ${move.term}): the open transaction did not commit`));
      return 'in_transaction';
    }
    this.links.delete(key);
    link.up.end();
    return undefined;
  }

  /** The database was dropped or scaled to zero: ends the session now if it is idle, else once its transaction is over. */
  leaveDatabase(err: PgError): void {
    this.endAtIdle = err;
    this.leaveIfIdle();
  }

  private leaveIfIdle(): void {
    if (this.endAtIdle && !this.inTransaction) this.fail(this.endAtIdle);
  }

  end(): void {
    if (this.ended) return;
    this.ended = true;
    for (const link of this.links.values()) {
      link.up.socket.resume(); // a link a read paused must be read to see its close
      link.up.end();
    }
    this.seqLink?.up.end();
    this.socket.destroy();
  }

  private fail(err: PgError): void {
    if (!this.ended) this.socket.write(errorResponse(err));
    this.end();
  }

  private readonly clientSink = {
    // A view, not a copy: Node never reuses a socket's read buffers, and the scanner's assembled messages are new.
    onMessage: (buf: Buffer, start: number, len: number) => void this.inbox.push(buf.subarray(start, start + len)),
  };

  private onClientData(chunk: Buffer): void {
    try {
      this.fromClient.push(chunk, this.clientSink);
    } catch (err) {
      this.fail(asPgError(err, 'FATAL'));
      return;
    }
    this.pump();
  }

  /** Handles queued client messages in order until one has to wait for shards; it resumes the pump when done. */
  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      for (let msg = this.inbox.shift(); msg && !this.ended; msg = this.inbox.shift()) {
        const waiting = this.onClientMessage(msg);
        if (waiting) {
          waiting.then(() => this.resume(), (err) => this.fail(asPgError(err, 'FATAL')));
          return;
        }
        this.leaveIfIdle();
      }
    } catch (err) {
      this.fail(asPgError(err, 'FATAL'));
    }
    this.pumping = false;
  }

  private resume(): void {
    this.leaveIfIdle();
    this.pumping = false;
    this.pump();
  }

  /** Handles one client message; a promise when it waits for shards. */
  private onClientMessage(msg: Buffer): Promise<void> | void {
    if (this.ended) return;
    const f = frameAt(msg, 0, msg.length);
    switch (f.type) {
      case T.Terminate: return this.end();
      case T.Query: return this.simpleQuery(new BodyReader(f.body).cstr());
      case T.Sync:
        this.skipToSync = false;
        if (!this.inTransaction) this.closeReads(); // the end of the implicit transaction ends its portals, as in Postgres
        this.reply(readyForQuery(this.status()));
        this.flush();
        return;
      case T.Flush: this.flush(); return;
      // Outside COPY, Postgres drops these too (after a COPY failed, the client may still send its data).
      case T.CopyData: return this.copying?.rows(f.body);
      case T.CopyDone: return this.copying ? this.endCopy(this.copying) : undefined;
      case T.CopyFail: return this.copying ? this.endCopy(this.copying, new PgError('ERROR', SQLSTATE.QUERY_CANCELED, `COPY from stdin failed: ${new BodyReader(f.body).cstr()}`)) : undefined;
      case T.Parse: case T.Bind: case T.Describe: case T.Execute: case T.Close:
        if (this.skipToSync) return;
        try {
          return this.extended(f.type, f.body, msg)?.catch(this.extendedFailed);
        } catch (err) {
          return this.extendedFailed(err);
        }
      default:
        this.reply(errorResponse(new PgError('ERROR', SQLSTATE.FEATURE_NOT_SUPPORTED, `message type '${String.fromCharCode(f.type)}' is not supported on a sharded database`)));
        this.reply(readyForQuery(this.status()));
        this.flush();
    }
  }

  /** After an error in the extended protocol, messages are skipped until Sync. */
  private readonly extendedFailed = (err: unknown): void => {
    this.reportError(err);
    this.skipToSync = true;
  };

  private status(): 'I' | 'T' | 'E' {
    return !this.inTransaction ? 'I' : this.transactionFailed ? 'E' : 'T';
  }

  private reply(buf: Buffer): void {
    this.out.push(buf);
  }

  private flush(): void {
    if (this.schemaChanged && !this.inTransaction) {
      this.schemaChanged = false;
      this.planner.forgetColumns();
      this.opts.onSchemaChange?.(this.database);
    }
    if (!this.out.length || this.ended) return;
    if (this.outRowBytes < STREAM_CHUNK) {
      this.socket.write(this.out.length === 1 ? this.out[0] : Buffer.concat(this.out)); // one small copy beats many writes
    } else {
      // A chunk of a streamed result: its views go out as they are (one writev), not copied once more.
      this.socket.cork();
      for (const b of this.out) this.socket.write(b);
      this.socket.uncork();
    }
    this.out = [];
    this.outRowBytes = 0;
  }

  /**
   * One row of a result that streams (a read's, a COPY TO's): a view of the shard's read buffer,
   * which is not reused. Past STREAM_CHUNK bytes the rows go out, and while the client's socket is
   * congested the shards' links are not read: the gateway holds a bounded part of any result.
   */
  private forward(buf: Buffer, start: number, len: number, links: ShardLink[]): void {
    this.out.push(buf.subarray(start, start + len));
    this.outRowBytes += len;
    if (this.outRowBytes < STREAM_CHUNK) return;
    this.flush();
    this.throttle.check(links.map((l) => l.up.socket));
  }

  private reportError(err: unknown): void {
    const e = asPgError(err, 'ERROR');
    if (e.code === SQLSTATE.FEATURE_NOT_SUPPORTED) refusals.inc();
    this.reply(errorResponse(e));
    if (this.inTransaction) this.transactionFailed = true;
  }

  // --- simple query protocol -------------------------------------------------------------------

  private async simpleQuery(sql: string): Promise<void> {
    let routes: Route[];
    try {
      routes = await this.routed(sql);
    } catch (err) {
      routes = [];
      this.reportError(err);
    }
    // A COMMIT or ROLLBACK ends a suspended portal's read; anything else may need its links.
    if (routes.length && routes[0].plan.kind !== 'commit' && routes[0].plan.kind !== 'rollback') await this.readsGathered();
    for (const r of routes) {
      try {
        if (r.plan.kind === 'copy_in' && routes.length > 1) throw new PgError('ERROR', SQLSTATE.FEATURE_NOT_SUPPORTED, 'not supported on a sharded database: COPY with other statements in one query');
        await this.executeRouted(r, { simple: true });
      } catch (err) {
        this.reportError(err);
        break;
      }
    }
    if (this.copying) return this.flush(); // ReadyForQuery comes when the COPY ends
    this.reply(readyForQuery(this.status()));
    this.flush();
  }

  // --- execution ------------------------------------------------------------------------------

  /**
   * Runs one planned statement and writes its answer (without ReadyForQuery).
   * `simple`: shards get the text as a Query; otherwise the portal's Parse/Bind/Execute.
   */
  private async execute(plan: Plan, how: How): Promise<void> {
    if (this.transactionFailed && plan.kind !== 'rollback' && plan.kind !== 'commit' && plan.kind !== 'rollback_to') {
      throw new PgError('ERROR', '25P02', 'current transaction is aborted, commands ignored until end of transaction block');
    }
    const params = how.simple ? undefined : how.portal.params;
    switch (plan.kind) {
      case 'empty': this.reply(EMPTY_QUERY_RESPONSE); return;
      case 'refused': throw new PgError('ERROR', SQLSTATE.FEATURE_NOT_SUPPORTED, `not supported on a sharded database: ${plan.message}`);
      case 'transaction_mode':
        if (this.inTransaction) throw new PgError('ERROR', '25001', 'mg.transaction_mode cannot change inside a transaction');
        this.mode = plan.mode as TransactionMode;
        this.reply(commandComplete('SET'));
        return;
      case 'show_plan':
        this.reply(rowDescription([{ name: 'mg_plan' }]));
        this.reply(dataRow([this.lastRoute ? describePlan(this.lastRoute.plan, this.lastRoute.shards) : 'no statement yet']));
        this.reply(commandComplete('SHOW'));
        return;
      case 'set': return this.runSet(plan.sql);
      case 'copy_in':
        if (!how.simple) throw new PgError('ERROR', SQLSTATE.FEATURE_NOT_SUPPORTED, 'not supported on a sharded database: COPY through the extended protocol');
        if (this.target === 'replica' || this.readOnlyTransaction) throw new PgError('ERROR', SQLSTATE.READ_ONLY_SQL_TRANSACTION, 'cannot COPY into a table in a read-only session or transaction');
        countStatement('copy_in');
        return this.startCopy(plan);
      case 'copy_out': {
        const sql = plan.sql;
        if (!how.simple) throw new PgError('ERROR', SQLSTATE.FEATURE_NOT_SUPPORTED, 'not supported on a sharded database: COPY through the extended protocol');
        countStatement('copy_out');
        const shards = plan.reference ? await this.shardsOf({ kind: 'reference', sql: plan.sql, tables: plan.tables }) : await this.shardsOf({ kind: 'select', sql: plan.sql, pin: plan.pin, tables: plan.tables });
        if (shards.length === 1) return this.relay(shards[0], sql, how, true);
        return this.streamOnShards(shards, sql, how, { copyHeader: plan.header });
      }
      case 'set_local': case 'savepoint': case 'release': case 'rollback_to': return this.runTransactionScoped(plan);
      case 'begin':
        if (this.inTransaction) this.reply(notice('25001', 'there is already a transaction in progress'));
        else if (this.opts.readOnlyToReplicas && this.target === 'primary' && READ_ONLY_BEGIN.test(plan.sql.toString('utf8'))) {
          this.readOnlyTransaction = true;
          readOnlyRouted.inc({ outcome: 'replica' });
        }
        this.inTransaction = true;
        this.transactionFailed = false;
        this.beginSql = plan.sql.toString('utf8');
        this.reply(commandComplete('BEGIN'));
        return;
      case 'commit': return this.finishTransaction(!this.transactionFailed);
      case 'rollback': return this.finishTransaction(false);
      case 'explain': {
        const shards = await this.shardsOf(plan.inner, params);
        this.lastRoute = { plan: plan.inner, shards };
        const text = plan.sql;
        const results = await this.onShards(shards, () => text, how, false);
        this.reply(rowDescription([{ name: 'QUERY PLAN' }]));
        const lines = [`mg route: ${describePlan(plan.inner, shards)}`];
        for (const r of results) {
          lines.push(`shard ${r.shard}:`);
          for (const row of r.rows) lines.push(`  ${decodeDataRow(row)[0]?.toString('utf8') ?? ''}`);
        }
        for (const l of lines) this.reply(dataRow([l]));
        this.reply(commandComplete(`EXPLAIN`));
        return;
      }
      default: break;
    }
    if (this.target === 'replica' && WRITES.has(plan.kind)) {
      throw new PgError('ERROR', SQLSTATE.READ_ONLY_SQL_TRANSACTION, `cannot write through a replica session (${this.database}@replica)`, undefined,
        `Connect to ${this.database} to write.`);
    }
    if (this.readOnlyTransaction && WRITES.has(plan.kind)) throw new PgError('ERROR', SQLSTATE.READ_ONLY_SQL_TRANSACTION, 'cannot write in a read-only transaction');
    if (plan.kind === 'insert' && plan.sequence) plan = fillSequence(plan, await this.sequenceIds(plan));
    const shards = await this.shardsOf(plan, params);
    this.lastRoute = { plan, shards }; // described when SHOW mg_plan asks
    countStatement(routeKind(plan, shards.length) ?? 'session');
    shardsPerStatement.observe(shards.length);
    if ((plan.kind === 'insert' && plan.lookups) || (plan.kind === 'write' && plan.owned)) return this.keepingLookups(plan, shards, how);
    return this.run(plan, shards, how);
  }

  /** Runs a planned statement that reads or writes rows on `shards` and writes its answer. */
  private async run(plan: Plan, shards: string[], how: How): Promise<void> {
    const params = how.simple ? undefined : how.portal.params;
    if (plan.kind === 'insert') {
      const byShard = new Map<string, Buffer[]>();
      plan.rows.forEach((row, i) => {
        const s = shardOfValue(plan.pin, plan.pin.values[i], this.ranges(), params)!;
        byShard.set(s, [...(byShard.get(s) ?? []), row]);
      });
      const textFor = (shard: string) => Buffer.concat([plan.prefix, ...joinRows(byShard.get(shard)!), plan.suffix]);
      if (shards.length === 1 && (how.simple || !how.limited)) return this.relay(shards[0], textFor(shards[0]), how);
      if (how.simple) return this.union(await this.onShards(shards, textFor, how, true), how);
      // Each shard gets its rows with their parameters renumbered, bound with just those parameters.
      const perShard = new Map(shards.map((s) => [s, narrowed(how, textFor(s))]));
      return this.union(await this.onShards(shards, (s) => perShard.get(s)!.text, how, true, (s) => perShard.get(s)!.how), how);
    }
    const sql = (plan as { sql: Buffer }).sql;
    if (plan.kind === 'all' && plan.ddl) {
      this.schemaChanged = true;
      await this.runDdl(sql, shards, how);
      if (plan.temp?.creates) this.temps.add(plan.temp.creates);
      for (const name of plan.temp?.drops ?? []) this.temps.delete(name);
      return;
    }
    const read = plan.kind === 'select' || plan.kind === 'reference';
    if (shards.length === 1 && !(plan.kind === 'select' && plan.merge) && (how.simple || !how.limited)) return this.relay(shards[0], sql, how, read);
    // A scatter read whose rows need no merging streams.
    if (plan.kind === 'select' && !plan.merge && (how.simple || !how.limited)) return this.streamOnShards(shards, sql, how);
    // So does one merged by ORDER BY and LIMIT only, or group by group, and any read of a portal with a row
    // limit, at the client's pace; other grouped reads are gathered there, then merged.
    if (read) return this.scatterRead(shards, sql, plan.kind === 'select' ? plan.merge : undefined, how);
    const results = await this.onShards(shards, () => sql, how, true);
    if (plan.kind === 'all') return this.replyFirst(results, how);
    return this.union(results, how);
  }

  /**
   * A write that keeps lookup vindexes in step: the lookup rows are written
   * (and, for UPDATE/DELETE, the changed rows read and locked first) before
   * the owner's statement, in one transaction. Outside BEGIN the gateway opens
   * one itself and commits it with two-phase commit when it spans shards, so
   * the owner and its lookup rows commit together or not at all (decision 0031).
   */
  private async keepingLookups(plan: Plan, shards: string[], how: How): Promise<void> {
    const params = how.simple ? undefined : how.portal.params;
    const implicit = !this.inTransaction;
    if (implicit) {
      this.inTransaction = this.implicitTransaction = true;
      this.beginSql = 'BEGIN';
    }
    const mark = this.out.length;
    try {
      if (plan.kind === 'insert') await insertLookupRows(plan, [params], this.lookupAccess());
      else if (plan.kind === 'write' && plan.owned) await moveLookupRows(plan.owned, await this.ownedRows(plan.owned.select, shards, how), params, this.lookupAccess());
      await this.run(plan, shards, how);
    } catch (err) {
      if (implicit) await this.endTransaction(false, 'twopc');
      throw err;
    }
    if (!implicit) return;
    if (this.transactionFailed) return this.endTransaction(false, 'twopc'); // the owner's statement failed: its error is the answer
    try {
      await this.endTransaction(true, 'twopc');
    } catch (err) {
      this.out.length = mark; // nothing committed: the statement's answer is the error
      if (!how.simple) how.portal.pending = undefined;
      throw err;
    }
  }

  /** The rows an UPDATE/DELETE is about to change, locked, read with its own WHERE (and parameters) on its shards, as text. */
  private async ownedRows(select: Buffer, shards: string[], how: How): Promise<TextRow[]> {
    const cut = how.simple ? { text: select, how } : narrowed(how, select, true);
    const results = await this.onShards(shards, () => cut.text, cut.how, true);
    return results.flatMap((r) => r.rows.map(decodeDataRow));
  }

  /** The session's shards as the lookup code uses them: writes join the transaction, reads run where the session is. */
  private lookupAccess(): LookupAccess {
    return {
      ranges: this.ranges(),
      run: async (shard, sql, params, write) => {
        const link = write ? await this.enlist(shard) : await this.link(shard);
        return (await link.execute(sql, params)).rows.map(decodeDataRow);
      },
    };
  }

  /** Ids for the rows of an INSERT that leave their auto-increment column to the sequence, from this gateway's block. */
  private async sequenceIds(plan: InsertPlan): Promise<string[]> {
    const fill = plan.sequence!;
    const cache = this.opts.discovery.topology.vschemas.get(this.current)?.vschema.sequences[fill.sequence]?.cache ?? 1000;
    return sequenceBlocks.take(this.current, fill.sequence, cache, idsNeeded(fill, plan.rows.length), async (sql) => {
      const r = await (await this.sequenceLink()).query(sql);
      return r.rows.length ? decodeDataRow(r.rows[0])[0]?.toString('utf8') : undefined;
    });
  }

  /** A link to the first shard that is never in the client's transaction: a block taken must stay taken whatever the client does. */
  private async sequenceLink(): Promise<ShardLink> {
    const shard = this.ranges()[0].shard;
    const held = this.seqLink;
    if (held && !held.closed && this.opts.discovery.primary(this.current, shard)?.instanceId === held.ep.instanceId) return held;
    held?.up.end();
    const link = await ShardLink.open(shard, await this.primaryOf(shard), { ...this.params, database: this.current }, () => {
      if (this.seqLink === link) this.seqLink = undefined;
    });
    this.seqLink = link;
    return link;
  }

  /** The shards a plan runs on (a lookup vindex's from its lookup table). */
  private async shardsOf(plan: Plan, params?: BoundParam[]): Promise<string[]> {
    const ranges = this.ranges();
    try {
      switch (plan.kind) {
        case 'select': case 'write':
          if (plan.pin?.lookup) return await shardsByLookup(plan.pin, params, this.lookupAccess());
          return plan.pin ? pinnedShards(plan.pin, ranges, params) : ranges.map((r) => r.shard);
        case 'insert': return pinnedShards(plan.pin, ranges, params);
        case 'all': {
          if (!plan.ddl) return ranges.map((r) => r.shard);
          const every = this.opts.discovery.everyShard(this.current);
          if (plan.renamesColumn && every.length > ranges.length) {
            throw new PgError('ERROR', SQLSTATE.FEATURE_NOT_SUPPORTED, `RENAME COLUMN while database ${this.current} is resharded: the changes still on their way `
              + 'to the new shard set carry the old name, which neither set would have. Rename before the workflow\'s create or after its complete');
          }
          return every;
        }
        case 'reference': {
          // Any shard answers: one this session already uses (its transaction's writes included), else the first.
          const linkOf = (r: { shard: string }) => this.links.get(this.linkKey(this.current, r.shard));
          const used = ranges.find((r) => linkOf(r)?.inTransaction) ?? ranges.find((r) => linkOf(r)) ?? ranges[0];
          return [used.shard];
        }
        default: return [];
      }
    } catch (err) {
      if (err instanceof VindexValueError) throw new PgError('ERROR', '22023', err.message);
      throw err;
    }
  }

  /**
   * A single shard's answer goes to the client as it came (RowDescription, rows, tag, errors).
   * `stream`: a read's rows go out as they come (forward()); a write's answer is held until it is
   * whole, since a write that keeps lookups may still replace it with an error at its commit.
   */
  private async relay(shard: string, sql: Buffer, how: How, stream = false): Promise<void> {
    const link = await this.enlist(shard);
    let error: Record<string, string> | undefined;
    const handler: ResponseHandler = (type, buf, start, len) => {
      if (type === T.ParseComplete || type === T.BindComplete) return;
      if (type === T.ErrorResponse) {
        error = errorFieldsAt(buf, start, len);
        if (error.C === MOVED_WRITES_SQLSTATE) return; // thrown below: the caller may run it elsewhere
      }
      if (stream && (type === T.DataRow || type === T.CopyData)) return this.forward(buf, start, len, [link]);
      this.out.push(buf.subarray(start, start + len)); // a view: the shard's read buffer is not reused (flush copies once)
    };
    await link.request(this.requestBytes(sql, how, !how.simple && how.describe), handler);
    if (!error) return;
    if (error.C === MOVED_WRITES_SQLSTATE) {
      if (this.inTransaction) this.transactionFailed = true;
      throw new PgError('ERROR', error.C, error.M ?? 'the table\'s writes moved to another database', error.D, error.H);
    }
    if (this.inTransaction) this.transactionFailed = true;
    if (!how.simple) this.skipToSync = true;
  }

  /** Runs the statement on each shard in parallel and collects; an error on any shard is thrown naming it. */
  private async onShards(shards: string[], textFor: (shard: string) => Buffer, how: How, named: boolean, howFor?: (shard: string) => How): Promise<ShardResult[]> {
    const results = await this.collectOnShards(shards, textFor, how, howFor);
    const failed = results.find((r) => r.error);
    if (failed) throw failed.pgError(named && shards.length > 1);
    return results;
  }

  /** Runs the statement on every shard in parallel and collects each shard's answer, errors included. */
  private async collectOnShards(shards: string[], textFor: (shard: string) => Buffer, how: How, howFor?: (shard: string) => How): Promise<ShardResult[]> {
    const links = await Promise.all(shards.map((s) => this.enlist(s)));
    return Promise.all(links.map(async (link) => {
      const r = new ShardResult(link.shard);
      await link.request(this.requestBytes(textFor(link.shard), howFor?.(link.shard) ?? how, true), r.collect);
      return r;
    }));
  }

  /**
   * DDL on every shard, recorded as a SchemaChange event: at once outside a transaction (FAILED names the
   * shards that refused it while the others ran it), at COMMIT inside one (a transaction that fails or
   * rolls back changed nothing).
   */
  private async runDdl(sql: Buffer, shards: string[], how: How): Promise<void> {
    const results = await this.collectOnShards(shards, () => sql, how);
    const failed = results.filter((r) => r.error);
    const change: SchemaChangeRecord = {
      database: this.database, user: this.params.user ?? '', statement: sql.toString('utf8'), shards,
      outcome: failed.length ? 'FAILED' : 'APPLIED', failedShards: failed.map((r) => r.shard), error: failed[0]?.pgError(shards.length > 1).message ?? null,
    };
    if (this.inTransaction) {
      if (!failed.length) this.txScoped.push({ ddl: change });
    } else {
      this.opts.recordSchemaChange(change);
    }
    if (failed.length) throw failed[0].pgError(shards.length > 1);
    this.replyFirst(results, how);
  }

  /**
   * What a shard is sent for one statement: a Query, or Parse/Bind/(Describe)/Execute/Sync of the
   * portal. Collected results are always described: merging needs the column types.
   */
  private requestBytes(sql: Buffer, how: How, describe: boolean): Buffer {
    if (how.simple) return message('Q', sql, Buffer.from([0]));
    const { prepared, shardBind } = how.portal;
    const parse = 'sql' in prepared.plan && sql === prepared.plan.sql ? (prepared.shardParse ??= shardParse(sql, prepared.paramTypes)) : shardParse(sql, prepared.paramTypes);
    return Buffer.concat(describe ? [parse, shardBind, DESCRIBE_PORTAL, EXECUTE_ALL, SYNC] : [parse, shardBind, EXECUTE_ALL, SYNC]);
  }

  private describeOnce(results: ShardResult[], how: How): void {
    if (!how.simple && !how.describe) return;
    const withRows = results.find((r) => r.rowDescription);
    if (withRows) this.reply(withRows.rowDescription!);
    else if (!how.simple) this.reply(NO_DATA);
  }

  /** Rows of every shard one after another; the command tag adds their counts up. */
  private union(results: ShardResult[], how: How): void {
    this.describeOnce(results, how);
    for (const r of results) for (const n of r.notices) this.reply(n);
    const rows = results.flatMap((r) => r.rows);
    this.emitRows(rows, sumTags(results.map((r) => r.tag)), how);
  }

  /**
   * Rows of several shards to the client as they arrive: a scatter read whose rows need no merging, or a
   * COPY TO (one CopyOutResponse, each shard's data, one CopyDone; with a header, the first shard's line
   * only). The first RowDescription stands for all and the counts add up. The first error, named by its
   * shard, ends the rows: those sent stay sent, as the rows before a run-time error do on one Postgres.
   */
  private async streamOnShards(shards: string[], sql: Buffer, how: How, copy?: { copyHeader: boolean }): Promise<void> {
    const links = await Promise.all(shards.map((s) => this.enlist(s)));
    const tags: Array<string | undefined> = [];
    let described = false;
    let headerSent = false;
    let failed: { shard: string; fields: Record<string, string> } | undefined;
    await Promise.all(links.map((link, i) => {
      let firstData = true;
      return link.request(this.requestBytes(sql, how, true), (type, buf, start, len) => {
        switch (type) {
          case T.RowDescription: case T.CopyOutResponse:
            if (!described && (how.simple || how.describe)) this.reply(Buffer.from(buf.subarray(start, start + len)));
            described = true;
            return;
          case T.CopyData:
            if (firstData && copy?.copyHeader) {
              firstData = false;
              if (headerSent) return; // another shard's header line went already
              headerSent = true;
            }
            if (!failed) this.forward(buf, start, len, links);
            return;
          case T.DataRow: if (!failed) this.forward(buf, start, len, links); return;
          case T.CommandComplete: tags[i] = buf.toString('utf8', start + 5, start + len - 1); return;
          case T.ErrorResponse: failed ??= { shard: link.shard, fields: errorFieldsAt(buf, start, len) }; return;
          case T.NoticeResponse: this.reply(Buffer.from(buf.subarray(start, start + len))); return;
          default: return; // ParseComplete, BindComplete, CopyDone: the gateway answers those itself
        }
      });
    }));
    if (failed) throw shardError(failed.shard, failed.fields, shards.length > 1);
    if (copy) this.reply(message('c'));
    else if (!described && !how.simple && how.describe) this.reply(NO_DATA);
    this.reply(commandComplete(sumTags(tags)));
  }

  /**
   * A read whose rows go out through a ScatterRead (decision 0065): in the merge's order, OFFSET and LIMIT
   * applied as they go, each shard holding a bounded buffer in the gateway. A portal with a row limit keeps
   * it for its Executes (executePortal); otherwise every row goes now.
   */
  private async scatterRead(shards: string[], sql: Buffer, merge: Merge | undefined, how: How): Promise<void> {
    const params = how.simple ? undefined : how.portal.params;
    const { offset, limit } = merge ? rowWindow(merge, params) : { offset: 0, limit: undefined };
    const links = await Promise.all(shards.map((s) => this.enlist(s)));
    const read = new ScatterRead(links, {
      request: () => this.requestBytes(sql, how, true), orderBy: merge?.groupOrder ?? merge?.orderBy, offset, limit,
      group: merge && (merge.aggregates || merge.groupBy || merge.distinct) ? { merge, params } : undefined, hidden: merge?.hidden ?? 0,
      describe: how.simple || how.describe, named: shards.length > 1,
      reply: (msg) => this.reply(msg), forward: (row, ls) => this.forward(row, 0, row.length, ls),
    });
    if (!how.simple && how.limited) {
      how.portal.read = read;
      return;
    }
    await this.sendRows(read, 0, !how.simple && how.describe);
  }

  /**
   * Sends up to `maxRows` (0: all) more rows of a read; then its tag (the rows of this Execute, as Postgres
   * counts them) when it is complete, PortalSuspended when it has more. Says whether it is complete.
   */
  private async sendRows(read: ScatterRead, maxRows: number, describeNoRows: boolean): Promise<boolean> {
    const { rows, complete } = await read.take(maxRows > 0 ? maxRows : Infinity);
    if (!complete) {
      this.reply(PORTAL_SUSPENDED);
      return false;
    }
    if (describeNoRows && !read.described) this.reply(NO_DATA);
    this.reply(commandComplete(read.tag(rows)));
    return true;
  }

  /**
   * A portal's suspended read holds its shard links mid-request: before another statement uses the links,
   * the rest of its rows is gathered (kept whole, as before decision 0065). Nothing to wait for: undefined.
   */
  private readsGathered(except?: Portal): Promise<void> | undefined {
    const reads = [...this.portals.values()].filter((p) => p !== except && p.read).map((p) => p.read!.gather());
    return reads.length ? Promise.all(reads).then(() => undefined) : undefined;
  }

  /** The transaction that held the portals ended: their reads' rest is dropped (read to the end, not kept), and they are gone. */
  private closeReads(): void {
    for (const [name, p] of this.portals) {
      if (!p.read) continue;
      void p.read.abandon();
      this.portals.delete(name);
    }
  }

  /** DDL and reference-table writes: every shard ran the same; its answer once. */
  private replyFirst(results: ShardResult[], how: How): void {
    this.describeOnce(results, how);
    for (const n of results[0].notices) this.reply(n);
    this.emitRows(results[0].rows, results[0].tag ?? '', how);
  }

  /** Rows and tag; for a portal, kept for Executes with a row limit. */
  private emitRows(rows: Buffer[], tag: string, how: How): void {
    if (!how.simple) {
      how.portal.pending = rows;
      how.portal.tag = tag;
      return;
    }
    for (const r of rows) this.reply(r);
    this.reply(commandComplete(tag));
  }

  // --- COPY FROM STDIN ---------------------------------------------------------------------------

  /**
   * Starts the COPY on every shard, in the session's transaction or in one the gateway opens (committed
   * with two-phase commit when rows went to several shards: the COPY is all or nothing, as on one
   * Postgres), and answers the client's CopyInResponse; its rows then go where they belong (CopyIn).
   */
  private async startCopy(plan: CopyInPlan): Promise<void> {
    const implicit = !this.inTransaction;
    if (implicit) {
      this.inTransaction = this.implicitTransaction = true;
      this.beginSql = 'BEGIN';
    }
    try {
      const links = await Promise.all(this.ranges().map((r) => this.enlist(r.shard)));
      const copy = new CopyIn(plan, links, this.ranges(), implicit);
      const started = await copy.started;
      if (started.error) {
        await copy.fail('the COPY did not start on every shard');
        throw started.error;
      }
      this.copying = copy;
      this.reply(started.response!);
    } catch (err) {
      if (implicit) await this.endTransaction(false, 'twopc');
      throw err;
    }
  }

  /** CopyDone (no `failure`) or CopyFail: ends the COPY on every shard, commits what the gateway opened, answers the client. */
  private async endCopy(copy: CopyIn, failure?: PgError): Promise<void> {
    this.copying = undefined;
    try {
      const tag = await copy.end(failure);
      if (copy.implicit) await this.endTransaction(true, 'twopc');
      this.reply(commandComplete(tag));
    } catch (err) {
      if (copy.implicit && this.inTransaction) await this.endTransaction(false, 'twopc');
      this.reportError(err);
    }
    this.reply(readyForQuery(this.status()));
    this.flush();
  }

  // --- links and transactions -----------------------------------------------------------------

  /** The session's link to a shard's primary (or replica), opened (and its settings replayed) on first use. */
  private link(shard: string): ShardLink | Promise<ShardLink> {
    const database = this.current;
    const key = this.linkKey(database, shard);
    const held = this.links.get(key);
    if (held && !held.closed && (held.inTransaction || this.stillTarget(database, shard, held.ep))) return held;
    if (held) {
      this.links.delete(key);
      if (held.inTransaction) throw new PgError('FATAL', SQLSTATE.CONNECTION_FAILURE, `lost the connection to shard ${shard} in the middle of a transaction`);
      held.up.end();
    }
    let opening = this.connecting.get(key);
    if (!opening) {
      opening = this.openLink(database, shard).finally(() => this.connecting.delete(key));
      this.connecting.set(key, opening);
    }
    return opening;
  }

  /** Links to replicas for a READ ONLY transaction are kept apart from the session's links to primaries. */
  private linkKey(database: string, shard: string): string {
    return this.readOnlyTransaction ? `${database}/${shard}@replica` : `${database}/${shard}`;
  }

  /** Whether `ep` is still where the session's statements on `shard` go: the primary, or a usable replica. */
  private stillTarget(database: string, shard: string, ep: Endpoint): boolean {
    const d = this.opts.discovery;
    return this.target === 'replica' || this.readOnlyTransaction ? d.replicaUsable(ep.instanceId) : d.primary(database, shard)?.instanceId === ep.instanceId;
  }

  private async openLink(database: string, shard: string): Promise<ShardLink> {
    const key = this.linkKey(database, shard);
    const ep = this.target === 'replica' ? this.replicaOf(shard) : this.readOnlyTransaction ? await this.replicaOrPrimary(shard) : await this.primaryOf(shard);
    const link = await ShardLink.open(shard, ep, { ...this.params, database }, () => {
      if (this.links.get(key) === link) this.links.delete(key);
      if (link.inTransaction && !this.ended) this.fail(new PgError('FATAL', SQLSTATE.CONNECTION_FAILURE, `lost the connection to shard ${shard} in the middle of a transaction`));
    });
    for (const set of this.settings) await link.query(set);
    this.links.set(key, link);
    return link;
  }

  private async primaryOf(shard: string): Promise<Endpoint> {
    const d = this.opts.discovery;
    const ep = d.primary(this.current, shard) ?? (await d.waitForPrimary(this.current, shard, this.opts.bufferWindowMs));
    if (!ep) throw new PgError('ERROR', SQLSTATE.CANNOT_CONNECT_NOW, `no serving primary for ${this.current}/${shard} after waiting ${this.opts.bufferWindowMs} ms`);
    return ep;
  }

  /** A READ ONLY transaction's shard: a replica, else (none usable) the primary. */
  private async replicaOrPrimary(shard: string): Promise<Endpoint> {
    try {
      return this.replicaOf(shard);
    } catch {
      readOnlyRouted.inc({ outcome: 'no_replica' });
      return this.primaryOf(shard);
    }
  }

  /** A serving replica of the shard within the lag threshold, at random (as for unsharded databases). */
  private replicaOf(shard: string): Endpoint {
    const replicas = this.opts.discovery.replicas(this.current, shard);
    if (!replicas.length) throw new PgError('ERROR', SQLSTATE.CANNOT_CONNECT_NOW, `no healthy replica of ${this.current}/${shard} within the lag threshold`);
    return replicas[Math.floor(Math.random() * replicas.length)];
  }

  /** The link for a statement on `shard`; inside a transaction, the shard joins it (as the mode allows). */
  private async enlist(shard: string): Promise<ShardLink> {
    const link = await this.link(shard);
    if (!this.inTransaction || link.inTransaction) return link;
    const others = [...this.links.values()].filter((l) => l.inTransaction);
    if (this.mode === 'single' && !this.implicitTransaction && others.length) {
      throw new PgError('ERROR', SQLSTATE.FEATURE_NOT_SUPPORTED,
        `transaction_mode single: this transaction runs on shard ${others[0].shard} and the statement needs shard ${shard}`,
        undefined, "SET mg.transaction_mode = 'multi' (or 'twopc') before BEGIN to span shards.");
    }
    await link.query(this.beginSql);
    const replay = this.txScoped.flatMap((e) => ('ddl' in e ? [] : [txScopedSql(e)]));
    if (replay.length) await link.query(replay.join('; '));
    link.inTransaction = true;
    return link;
  }

  /** COMMIT (when `commit`) or ROLLBACK on every shard of the transaction. */
  private async finishTransaction(commit: boolean): Promise<void> {
    if (!this.inTransaction) {
      this.reply(notice('25P01', 'there is no transaction in progress'));
      this.reply(commandComplete(commit ? 'COMMIT' : 'ROLLBACK'));
      return;
    }
    // Nothing was written on replicas, and a standby cannot PREPARE: each shard's read transaction just ends.
    await this.endTransaction(commit, this.target === 'replica' || this.readOnlyTransaction ? 'multi' : this.mode);
    this.reply(commandComplete(commit ? 'COMMIT' : 'ROLLBACK'));
  }

  /** Commits (in `mode`) or rolls back the transaction on every shard it touched; a failed commit rolls back what it can and throws. */
  private async endTransaction(commit: boolean, mode: TransactionMode): Promise<void> {
    this.closeReads();
    const participants = [...this.links.values()].filter((l) => l.inTransaction);
    this.inTransaction = this.implicitTransaction = this.readOnlyTransaction = false;
    const schemaChanges = this.txScoped.flatMap((e) => ('ddl' in e ? [e.ddl] : []));
    this.txScoped = [];
    this.transactionFailed = false;
    const release = () => participants.forEach((l) => (l.inTransaction = false));
    if (!commit) {
      await Promise.all(participants.map((l) => l.query('ROLLBACK').catch(() => undefined)));
      release();
      return;
    }
    commits.inc({ mode, shards: String(Math.min(participants.length, 3)).replace('3', '3+') });
    try {
      if (participants.length > 1 && mode === 'twopc') {
        await this.opts.twopc.commit(this.database, participants.map((l) => ({ shard: l.shard, query: async (sql: string) => void (await l.query(sql)) })));
      } else {
        await this.commitShardByShard(participants);
      }
    } catch (err) {
      await Promise.all(participants.map((l) => l.query('ROLLBACK').catch(() => undefined)));
      throw err;
    } finally {
      release();
    }
    for (const change of schemaChanges) this.opts.recordSchemaChange(change);
  }

  /** `multi` (and any one-shard transaction): COMMIT on each shard in turn; a failure says which shards had committed. */
  private async commitShardByShard(participants: ShardLink[]): Promise<void> {
    const done: string[] = [];
    for (const link of participants) {
      try {
        const r = await link.query('COMMIT');
        if (r.tag === 'ROLLBACK') throw new PgError('ERROR', '40000', `shard ${link.shard}: the transaction was rolled back there`);
      } catch (err) {
        const e = asPgError(err, 'ERROR');
        link.inTransaction = false;
        throw new PgError('ERROR', e.code, done.length ? `${e.message}; already committed on ${done.join(', ')} (transaction_mode multi)` : e.message, e.detail, e.hint);
      }
      link.inTransaction = false;
      done.push(link.shard);
    }
  }

  /**
   * SET LOCAL, SAVEPOINT, RELEASE and ROLLBACK TO: answered as one Postgres would (outside a transaction, an
   * unknown savepoint), run on every shard in the transaction, and kept for shards that join it later.
   */
  private async runTransactionScoped(plan: Extract<Plan, { kind: 'set_local' | 'savepoint' | 'release' | 'rollback_to' }>): Promise<void> {
    const tag = plan.kind === 'set_local' ? 'SET' : plan.kind === 'rollback_to' ? 'ROLLBACK' : plan.kind.toUpperCase();
    if (!this.inTransaction) {
      if (plan.kind !== 'set_local') throw new PgError('ERROR', '25P01', `${plan.kind === 'rollback_to' ? 'ROLLBACK TO SAVEPOINT' : tag} can only be used in transaction blocks`);
      this.reply(notice('25P01', 'SET LOCAL can only be used in transaction blocks'));
      this.reply(commandComplete(tag));
      return;
    }
    const entry = plan.kind === 'set_local' ? { setLocal: plan.sql.toString('utf8') } : { savepoint: plan.name };
    let at = -1;
    if (plan.kind === 'release' || plan.kind === 'rollback_to') {
      at = this.txScoped.map((e) => ('savepoint' in e ? e.savepoint : undefined)).lastIndexOf(plan.name);
      if (at < 0) throw new PgError('ERROR', '3B001', `savepoint "${plan.name}" does not exist`);
    }
    const participants = [...this.links.values()].filter((l) => l.inTransaction);
    const text = plan.kind === 'release' ? `RELEASE SAVEPOINT ${quoteIdent(plan.name)}` : plan.kind === 'rollback_to' ? `ROLLBACK TO SAVEPOINT ${quoteIdent(plan.name)}` : txScopedSql(entry);
    await Promise.all(participants.map((l) => l.query(text)));
    if (plan.kind === 'rollback_to') {
      // The savepoint stays; what came after it (later savepoints, SET LOCALs) is undone.
      this.txScoped = this.txScoped.slice(0, at + 1);
      this.transactionFailed = false;
    } else if (plan.kind === 'release') {
      // It and later savepoints go; SET LOCALs made since stay in force.
      this.txScoped = [...this.txScoped.slice(0, at), ...this.txScoped.slice(at).filter((e) => !('savepoint' in e))];
    } else {
      this.txScoped.push(entry);
    }
    this.reply(commandComplete(tag));
  }

  /** A session SET: checked on one shard, then applied on every link and replayed on later ones. */
  private async runSet(sql: Buffer): Promise<void> {
    const text = sql.toString('utf8');
    const targets = this.links.size ? [...this.links.values()] : [await this.link(this.ranges()[0].shard)];
    for (const link of targets) await link.query(text).catch((err) => {
      throw err instanceof PgError ? new PgError('ERROR', err.code, err.message.replace(/^shard \S+: /, ''), err.detail, err.hint) : err;
    });
    this.settings.push(text);
    this.reply(commandComplete('SET'));
  }

  // --- extended query protocol ----------------------------------------------------------------

  /** An extended-protocol message; a promise when it waits for shards (or for a switch of traffic). */
  private extended(type: number, body: Buffer, raw: Buffer): Promise<void> | void {
    const r = new BodyReader(body);
    switch (type) {
      case T.Parse: {
        const p = decodeParse(frameAt(raw, 0, raw.length));
        if (p.name && this.prepared.has(p.name)) throw new PgError('ERROR', SQLSTATE.DUPLICATE_PREPARED_STATEMENT, `prepared statement "${p.name}" already exists`);
        const prepare = (routes: Route[]) => {
          if (routes.length > 1) throw new PgError('ERROR', SQLSTATE.SYNTAX_ERROR, 'cannot insert multiple commands into a prepared statement');
          const { plan } = routes[0];
          // A Parse of the unnamed statement whose text the plan sends unedited is what the shards get: kept as it came.
          const unedited = p.name === '' && 'sql' in plan && Buffer.isBuffer(plan.sql) && raw[6 + plan.sql.length] === 0 && plan.sql.equals(raw.subarray(6, 6 + plan.sql.length));
          this.prepared.set(p.name, { sql: p.sql, paramTypes: p.paramTypes, plan, database: routes[0].database, shardParse: unedited ? raw : undefined, planner: this.planner });
          this.reply(PARSE_COMPLETE);
        };
        const routes = this.routed(p.sql);
        return routes instanceof Promise ? routes.then(prepare) : prepare(routes);
      }
      case T.Bind: {
        const portalName = r.cstr();
        const stmtName = r.cstr();
        const prepared = this.prepared.get(stmtName);
        if (!prepared) throw new PgError('ERROR', SQLSTATE.UNDEFINED_PREPARED_STATEMENT, `prepared statement "${stmtName}" does not exist`);
        const plan = prepared.plan;
        const hidden = plan.kind === 'select' ? plan.merge?.hidden ?? 0 : 0;
        const clientRest = r.rest();
        const bindRest = hidden ? withHiddenResultFormats(clientRest, hidden) : clientRest;
        // The client's Bind when the names are already empty and no format was added.
        const shardBind = portalName === '' && stmtName === '' && bindRest === clientRest ? raw : shardBindOf(bindRest);
        void this.portals.get(portalName)?.read?.abandon(); // a portal bound again (the unnamed one, typically) replaces the old
        this.portals.set(portalName, { prepared, params: decodeBindParams(bindRest, prepared.paramTypes), bindRest, shardBind, described: false });
        this.reply(BIND_COMPLETE);
        return;
      }
      case T.Describe: {
        const kind = String.fromCharCode(r.byte());
        const name = r.cstr();
        if (kind === 'S') {
          const gathering = this.readsGathered(); // it asks a shard, over a link a suspended read may hold
          return gathering ? gathering.then(() => this.describeStatement(name)) : this.describeStatement(name);
        }
        const portal = this.portals.get(name);
        if (!portal) throw new PgError('ERROR', '34000', `portal "${name}" does not exist`);
        portal.described = true; // answered with the rows at Execute
        if (portal.pending || portal.read) throw new PgError('ERROR', SQLSTATE.FEATURE_NOT_SUPPORTED, 'not supported on a sharded database: Describe of a portal already executed');
        return;
      }
      case T.Execute: {
        const name = r.cstr();
        const maxRows = r.int32();
        const portal = this.portals.get(name);
        if (!portal) throw new PgError('ERROR', '34000', `portal "${name}" does not exist`);
        // A portal that has not run yet will use shard links: another portal's suspended read lets go of them first.
        const gathering = portal.pending || portal.read ? undefined : this.readsGathered(portal);
        return gathering ? gathering.then(() => this.executePortal(portal, name, maxRows)) : this.executePortal(portal, name, maxRows);
      }
      case T.Close: {
        const kind = String.fromCharCode(r.byte());
        const name = r.cstr();
        if (kind === 'S') this.prepared.delete(name);
        else {
          void this.portals.get(name)?.read?.abandon();
          this.portals.delete(name);
        }
        this.reply(CLOSE_COMPLETE);
        return;
      }
    }
  }

  /** Parameter types and row shape come from one shard: every shard has the same schema. */
  private async describeStatement(name: string): Promise<void> {
    const prepared = this.prepared.get(name);
    if (!prepared) throw new PgError('ERROR', SQLSTATE.UNDEFINED_PREPARED_STATEMENT, `prepared statement "${name}" does not exist`);
    const p = prepared.plan;
    if (p.kind === 'refused') throw new PgError('ERROR', SQLSTATE.FEATURE_NOT_SUPPORTED, `not supported on a sharded database: ${p.message}`);
    const text = 'sql' in p ? (p.sql as Buffer) : p.kind === 'insert' ? Buffer.concat([p.prefix, ...joinRows(p.rows), p.suffix]) : undefined;
    if (!text || SESSION_COMMANDS.has(p.kind) || p.kind === 'show_plan' || p.kind === 'explain') {
      this.reply(message('t', int16(prepared.paramTypes.length), ...prepared.paramTypes.map(int32)));
      this.reply(p.kind === 'show_plan' ? rowDescription([{ name: 'mg_plan' }]) : p.kind === 'explain' ? rowDescription([{ name: 'QUERY PLAN' }]) : NO_DATA);
      return;
    }
    this.current = prepared.database;
    const [shard] = await this.shardsOf({ kind: 'reference', sql: text, tables: [] });
    const link = await this.link(shard);
    const result = new ShardResult(shard);
    await link.request(Buffer.concat([
      message('P', cstr(''), text, Buffer.from([0]), int16(prepared.paramTypes.length), ...prepared.paramTypes.map(int32)),
      message('D', Buffer.from('S'), cstr('')), SYNC,
    ]), result.collect);
    if (result.error) throw result.pgError(false);
    // The client's statement types are what the shard inferred, so later Parses to other shards agree.
    const types = parameterTypes(result.parameterDescription);
    if (types) {
      prepared.paramTypes = types;
      prepared.shardParse = undefined;
    }
    this.reply(result.parameterDescription ?? message('t', int16(0)));
    const hidden = p.kind === 'select' ? p.merge?.hidden : undefined;
    this.reply(result.rowDescription && hidden ? withoutLastColumns(result.rowDescription, hidden) : result.rowDescription ?? NO_DATA);
  }

  private async executePortal(portal: Portal, name: string, maxRows: number): Promise<void> {
    let first = false;
    if (!portal.pending && !portal.read) {
      // Rules may have changed since Parse: a statement of a database with rules is routed again now.
      const { prepared } = portal;
      if (prepared.planner !== this.planner && !movedTablesOf(this.opts.discovery.topology, this.database)) {
        // A new VSchema since Parse (a lookup vindex added, decision 0059): planned again, so its writes keep what it now says.
        Object.assign(prepared, { plan: (await this.learningColumns(() => this.plannedHere(prepared.sql)))[0].plan, planner: this.planner, shardParse: undefined });
      }
      const [route] = movedTablesOf(this.opts.discovery.topology, this.database) ? await this.routed(prepared.sql) : [{ text: prepared.sql, database: prepared.database, plan: prepared.plan }];
      await this.executeRouted(route, { simple: false, portal, describe: portal.described, limited: maxRows > 0 });
      if (!portal.pending && !portal.read) return; // answered already (relayed from one shard, or a session command)
      first = true;
    }
    const read = portal.read;
    if (read) {
      let complete: boolean;
      try {
        complete = await this.sendRows(read, maxRows, first && portal.described);
      } catch (err) {
        portal.read = undefined;
        throw err;
      }
      if (!complete) return;
      // Run to its end: an Execute more of a named portal answers no rows, as in Postgres.
      Object.assign(portal, { read: undefined, pending: [], tag: read.tag(0) });
      if (name === '') this.portals.delete(name);
      return;
    }
    const rows = portal.pending!;
    const n = maxRows > 0 ? Math.min(maxRows, rows.length) : rows.length;
    for (const row of rows.splice(0, n)) this.reply(row);
    if (maxRows > 0 && rows.length > 0) {
      this.reply(PORTAL_SUSPENDED); // the next Execute goes on from here
      return;
    }
    if (portal.tag !== undefined) this.reply(commandComplete(portal.tag));
    portal.tag = undefined;
    if (name === '') this.portals.delete(name);
  }
}

/**
 * One COPY FROM STDIN spread over a database's shards: each shard runs the statement as written, and
 * gets the rows its key range holds (a reference table: every row).
 */
class CopyIn {
  /** Resolves once every shard is ready for rows (its CopyInResponse) or one refused the COPY. */
  readonly started: Promise<{ response?: Buffer; error?: PgError }>;
  private readonly splitter: CopyRowSplitter;
  private readonly done: Array<Promise<unknown>>;
  private readonly results: ShardResult[];
  /** Set when a row cannot be placed, or a shard failed the COPY: the rest of the data is dropped. */
  private failure: PgError | undefined;

  constructor(private readonly plan: CopyInPlan, private readonly links: ShardLink[], private readonly ranges: readonly KeyRange[], readonly implicit: boolean) {
    this.splitter = new CopyRowSplitter(plan);
    this.results = links.map((l) => new ShardResult(l.shard));
    const ready: Array<(response: Buffer | undefined) => void> = [];
    const responses = links.map((_, i) => new Promise<Buffer | undefined>((resolve) => (ready[i] = resolve)));
    this.done = links.map((link, i) => link.request(message('Q', plan.sql, Buffer.from([0])), (type, buf, start, len) => {
      if (type === T.CopyInResponse) ready[i](Buffer.from(buf.subarray(start, start + len)));
      else this.results[i].collect(type, buf, start, len);
    }).then(() => ready[i](undefined), (err) => {
      this.failure ??= asPgError(err, 'ERROR');
      ready[i](undefined);
    }));
    this.started = Promise.all(responses).then((responses) => {
      const refused = this.shardError();
      return refused ? { error: refused } : { response: responses[0] };
    });
  }

  /** A CopyData of the client: its complete rows, each to its shard (one CopyData per shard). */
  rows(chunk: Buffer): void {
    if (this.failure || this.shardError()) return;
    this.send(() => this.splitter.push(chunk));
  }

  /** CopyDone, or CopyFail with `failure`: the shards' answers; throws what failed. */
  async end(failure?: PgError): Promise<string> {
    if (!failure && !this.failure && !this.shardError()) this.send(() => this.splitter.finish());
    const why = failure ?? this.failure;
    if (why) {
      await this.fail(why.message);
      throw why;
    }
    for (const link of this.links) link.up.write(message('c'));
    await Promise.all(this.done);
    const refused = this.shardError();
    if (refused) throw refused;
    const counts = this.results.map((r) => Number(/^COPY (\d+)$/.exec(r.tag ?? '')?.[1] ?? 0));
    return `COPY ${this.plan.place ? counts.reduce((a, b) => a + b, 0) : counts[0]}`;
  }

  /** Ends the COPY on every shard still in it (CopyFail); the shards roll their part back. */
  async fail(why: string): Promise<void> {
    for (const link of this.links) link.up.write(message('f', cstr(why)));
    await Promise.all(this.done);
  }

  /** Routes the rows `split` gives and writes one CopyData per shard; a row that cannot be placed fails the COPY instead. */
  private send(split: () => CopyRow[]): void {
    const byShard = new Map<ShardLink, Buffer[]>();
    try {
      for (const row of split()) this.route(row, byShard);
    } catch (err) {
      this.failure = asPgError(err, 'ERROR');
      return;
    }
    for (const [link, rows] of byShard) link.up.write(message('d', ...rows));
  }

  private route(row: CopyRow, byShard: Map<ShardLink, Buffer[]>): void {
    if (!row.header) copyRows.inc();
    const to = this.plan.place && !row.header ? [this.linkOf(row)] : this.links;
    for (const link of to) byShard.set(link, [...(byShard.get(link) ?? []), row.bytes]);
  }

  private linkOf(row: CopyRow): ShardLink {
    const { pin } = this.plan.place!;
    if (row.value === null || row.value === undefined) throw new PgError('ERROR', '23502', `COPY into ${this.plan.table}: a row without a value in its primary vindex column ${pin.column}`);
    let shard: string | undefined;
    try {
      shard = shardOfValue(pin, { literal: row.value }, this.ranges);
    } catch (err) {
      if (err instanceof VindexValueError) throw new PgError('ERROR', '22023', `COPY into ${this.plan.table}: ${err.message}`);
      throw err;
    }
    return this.links.find((l) => l.shard === shard)!;
  }

  /** The first shard that refused the COPY or failed it, as an error naming it. */
  private shardError(): PgError | undefined {
    const failed = this.results.find((r) => r.error);
    return failed ? failed.pgError(this.links.length > 1) : this.failure;
  }
}

const DESCRIBE_PORTAL = message('D', Buffer.from('P'), cstr(''));
const PORTAL_SUSPENDED = message('s');
const EXECUTE_ALL = message('E', cstr(''), int32(0));

/** The Parse of the unnamed statement a shard gets. */
function shardParse(sql: Buffer, paramTypes: number[]): Buffer {
  return message('P', cstr(''), sql, Buffer.from([0]), int16(paramTypes.length), ...paramTypes.map(int32));
}

/** The Bind of the unnamed portal and statement a shard gets, from a Bind body after its names. */
function shardBindOf(bindRest: Buffer): Buffer {
  return message('B', cstr(''), cstr(''), bindRest);
}

function joinRows(rows: Buffer[]): Buffer[] {
  return rows.flatMap((r, i) => (i ? [Buffer.from(', '), r] : [r]));
}

/** SELECT 3 + SELECT 4 = SELECT 7; INSERT 0 1 + INSERT 0 2 = INSERT 0 3. */
function sumTags(tags: Array<string | undefined>): string {
  const first = tags.find((t) => t !== undefined) ?? '';
  const m = /^(.*?)(\d+)$/.exec(first);
  if (!m) return first;
  let total = 0;
  for (const t of tags) total += Number(/(\d+)$/.exec(t ?? '')?.[1] ?? 0);
  return `${m[1]}${total}`;
}

function notice(code: string, text: string): Buffer {
  return encodeErrorFields('N', { S: 'WARNING', V: 'WARNING', C: code, M: text });
}

/** Any error as what the client is told; `severity` for ones that are not already PgErrors. */
function asPgError(err: unknown, severity: 'ERROR' | 'FATAL'): PgError {
  if (err instanceof PgError) return err;
  if (err instanceof RefusedError) return new PgError('ERROR', SQLSTATE.FEATURE_NOT_SUPPORTED, `not supported on a sharded database: ${err.message}`);
  if (err instanceof VindexValueError) return new PgError('ERROR', '22023', err.message);
  const e = err as { name?: string; message?: string; sqlDetails?: { cursorPosition?: number } };
  if (e?.name === 'SqlError' || /syntax error/.test(e?.message ?? '')) return new PgError('ERROR', SQLSTATE.SYNTAX_ERROR, e.message ?? 'syntax error');
  return new PgError(severity, SQLSTATE.INTERNAL_ERROR, (err as Error)?.message ?? String(err));
}

function parameterTypes(desc: Buffer | undefined): number[] | undefined {
  if (!desc) return undefined;
  const n = desc.readInt16BE(5);
  return Array.from({ length: n }, (_, i) => desc.readInt32BE(7 + 4 * i));
}

/** A portal's statement cut down to `text`: parameters renumbered, bound with just those it uses (`textResults`: rows come back as text). */
function narrowed(how: Extract<How, { simple: false }>, text: Buffer, textResults = false): { text: Buffer; how: How } {
  const { text: renumbered, used } = renumberParams(text);
  const types = how.portal.prepared.paramTypes;
  const prepared = { ...how.portal.prepared, paramTypes: types.length ? used.map((n) => types[n - 1] ?? 0) : [], shardParse: undefined };
  const bindRest = bindSubset(how.portal.bindRest, used, textResults);
  return { text: renumbered, how: { ...how, portal: { ...how.portal, prepared, bindRest, shardBind: shardBindOf(bindRest) } } };
}

/** A Bind body (after the portal and statement names) with only the parameters `used` (1-based), in that order. */
function bindSubset(rest: Buffer, used: number[], textResults = false): Buffer {
  const r = new BodyReader(rest);
  const formats = Array.from({ length: r.int16() }, () => r.int16());
  const values = Array.from({ length: r.int16() }, () => {
    const len = r.int32();
    return len < 0 ? int32(-1) : Buffer.concat([int32(len), r.bytes(len)]);
  });
  const keptFormats = formats.length > 1 ? used.map((n) => formats[n - 1]) : formats;
  return Buffer.concat([
    int16(keptFormats.length), ...keptFormats.map(int16),
    int16(used.length), ...used.map((n) => values[n - 1]),
    textResults ? int16(0) : r.rest(),
  ]);
}

/**
 * A Bind body whose result format codes, when given one per column, also cover the `hidden` columns the
 * shards' rows end with (decision 0074): as text, which the merge reads like binary.
 */
function withHiddenResultFormats(rest: Buffer, hidden: number): Buffer {
  const r = new BodyReader(rest);
  r.bytes(2 * r.int16()); // parameter formats
  for (let n = r.int16(); n > 0; n--) {
    const len = r.int32();
    if (len > 0) r.bytes(len);
  }
  const start = r.at;
  const count = r.int16();
  if (count <= 1) return rest;
  return Buffer.concat([rest.subarray(0, start), int16(count + hidden), r.rest(), Buffer.alloc(2 * hidden)]);
}

/** The parameters of a Bind (after the portal and statement names), for routing. */
function decodeBindParams(rest: Buffer, paramTypes: number[]): BoundParam[] {
  const r = new BodyReader(rest);
  const formats = Array.from({ length: r.int16() }, () => r.int16());
  const n = r.int16();
  const params: BoundParam[] = [];
  for (let i = 0; i < n; i++) {
    const len = r.int32();
    const value = len < 0 ? null : Buffer.from(r.bytes(len));
    const binary = (formats.length === 1 ? formats[0] : formats[i] ?? 0) === 1;
    params.push({ value, binary, typeOid: paramTypes[i] ?? 0 });
  }
  return params;
}
