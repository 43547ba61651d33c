/**
 * One client of the pooler after startup: transaction pooling with session
 * fidelity. The client's messages are relayed raw to whichever server
 * connection it holds for the current transaction; a queue of what each sent
 * message will be answered with keeps responses in order, lets the pooler
 * inject messages (Parse of a statement the server lacks) and answer others
 * itself (Close of a statement, LISTEN), and tells which statement a
 * CommandComplete belongs to, so session effects (SET, temp tables, advisory
 * locks, ...) are applied only when they really happened.
 */
import { createHash } from 'node:crypto';
import type net from 'node:net';
import type { Logger } from '../../common/log.ts';
import { PgError, PositionedError, SQLSTATE } from '../protocol/errors.ts';
import { message, MessageScanner, type MessageSink } from '../protocol/frames.ts';
import { CLOSE_COMPLETE, commandComplete, cstrAt, errorFieldsAt, errorResponse, parameterStatus, PARSE_COMPLETE, PORTABLE_PARAM, readyForQuery, SESSION_STATE_PARAM, SYNC, T } from '../protocol/messages.ts';
import { classify, syntaxError, type Effect, type PinReason, type StmtEffects } from './classify.ts';
import type { PoolerConfig } from './config.ts';
import type { SharedListener } from './listener.ts';
import type { Pool } from './pool.ts';
import { tick, type ServerConn, type ServerOwner } from './server.ts';
import { afterResetAll, encodeSessionState, intern, setConfigSql, Settings, settingsDelta } from './settings.ts';
import { inEvent, keep, OutBatch, requestFlush } from '../protocol/output.ts';
import { coarseNow, quoteLiteral } from './text.ts';

/** What a session needs from the pooler around it. */
export interface SessionServices {
  readonly config: PoolerConfig;
  readonly log: Logger;
  readonly shuttingDown: boolean;
  readonly counters: Counters;
  listener(database: string, user: string): SharedListener;
  /**
   * How many schema changes (DDL) this pooler has seen in a database: it is part of
   * every pooler-wide statement name, so a statement planned before a change is never
   * reused for a Parse after it (a fresh connection would plan it against the new schema).
   */
  schemaEpoch(database: string): number;
  schemaChanged(database: string): void;
  /** Closes the idle server connections to a database (all users), and its shared listener when nobody listens. */
  releaseDatabase(database: string): void;
  sessionClosed(c: ClientSession): void;
}

export interface Counters {
  queries: number;
  xacts: number;
  errors: Map<string, number>;
  /** Server connections opened, and those closed to give their lease to another worker (0057): how much they move. */
  serverConnects: number;
  giveBacks: number;
}

// What a message sent to the server (or answered locally) will be answered with.
const K_PARSE = 1;
const K_BIND = 2;
const K_DESCRIBE = 3;
const K_EXECUTE = 4;
const K_CLOSE = 5;
const K_SYNC = 6;
const K_QUERY = 7;
const K_FN = 8;
/** Answered by the pooler: `frames` are sent when the entry reaches the head. */
const K_SYNTH = 9;
/** A deliberate server-side error (Bind of a statement that cannot exist) whose ErrorResponse is replaced by `rewrite`. */
const K_ERROR = 10;

class Entry {
  swallow = false;
  frames: Buffer | (() => Buffer) | null = null;
  /** Reverts what was applied optimistically when the message was sent; failed=false when merely skipped. */
  undo: ((failed: boolean) => void) | null = null;
  effects: Effect[] | null = null;
  stmts: StmtEffects[] | null = null;
  idx = 0;
  rewrite: PgError | null = null;
  constructor(readonly k: number) {}
}

/** A client's prepared statement: the pooler-wide name it maps to and how to re-create it. */
interface StmtDef {
  /** '' for the unnamed statement. */
  serverName: string;
  /** Parse body after the name: SQL, parameter types. */
  rest: Buffer;
  effects: Effect[] | null;
  /** LISTEN/UNLISTEN only: answered by the shared listener. */
  listenOnly: boolean;
  /** When the client sent its Parse (a tick): a server's copy prepared before then is prepared again. */
  parsedAt: number;
  parseMsg?: Buffer;
  /** Answered ParseComplete without a server having seen it (no server was free): if its first Parse fails, the name goes. */
  unverified?: string;
}

/**
 * A client that is a gateway (it sent SESSION_STATE_PARAM): it hears of the
 * session's committed settings whenever they change, and may hand over the
 * settings the session had on its previous pooler.
 */
export interface GatewayState { carried: Settings | undefined }

/** Bind of a statement name no server has: the server answers with an error and skips to Sync, as for a real error. */
const ERROR_BIND = message('B', Buffer.from('\0mg__no_such_statement__\0', 'latin1'), Buffer.from([0, 0, 0, 0, 0, 0]));
const HIGH_WATER = 1024 * 1024;
const INBOX_MAX = 4 * 1024 * 1024;

/** Postgres's warning when a commit stops waiting for its synchronous standbys (syncrep.c). */
const SYNC_WAIT_CANCELLED = /^canceling (?:the )?wait for synchronous replication/;
/**
 * What the client hears instead of that commit's CommandComplete: the commit is
 * durable on the primary only, and a failover may or may not keep it
 * (docs/orchestrator.md), so its outcome is unknown, not a success.
 */
const COMMIT_UNCONFIRMED = new PgError('ERROR', SQLSTATE.TRANSACTION_RESOLUTION_UNKNOWN,
  'the commit was not confirmed by the durability policy\'s standbys',
  'The transaction committed on the primary, but its wait for the synchronous standbys was canceled before they held it: a failover may lose it.',
  'Check whether the transaction\'s changes are present before retrying.');

/** The error for a query with a statement the pooler refuses to run (see classify's durability guard). */
function forbiddenIn(cls: StmtEffects[]): PgError | undefined {
  for (const { effects } of cls) {
    for (const e of effects) if (e.t === 'forbidden') return new PgError('ERROR', SQLSTATE.INSUFFICIENT_PRIVILEGE, e.message, e.detail);
  }
  return undefined;
}

const SCHEMA_CHANGE_TAG = /^(?:CREATE|ALTER|DROP) /;
/**
 * Does this CommandComplete tag (CREATE/ALTER/DROP ...) say the schema changed? A temp
 * table lives in its pinned session only, so it does not make other sessions re-prepare.
 */
function isSchemaChange(buf: Buffer, tagAt: number, effects: Effect[] | null): boolean {
  if (!SCHEMA_CHANGE_TAG.test(buf.toString('latin1', tagAt, tagAt + 7))) return false;
  return !effects?.some((e) => e.t === 'pin' && e.reason === 'temp');
}

export function paramsKeyOf(m: ReadonlyMap<string, string>): string {
  let k = '';
  for (const [n, v] of m) k += `${n}\u0001${v}\u0002`;
  return intern(k);
}

export class ClientSession implements ServerOwner, MessageSink {
  state: 'ready' | 'closed' = 'ready';
  readonly connectTime = Date.now();
  requestTime = Date.now();
  waitingSince = 0;
  server: ServerConn | null = null;
  txnStatus: 'I' | 'T' | 'E' = 'I';

  // session settings: what the startup packet asked for, what is committed, what the running transaction has
  committed: Settings;
  private working: Settings;
  private savepoints: Array<{ name: string; snap: Settings }> = [];
  private txErr = false;
  /** Settings changed since the server connection was checked out. */
  private touched = false;
  /** The server's settings no longer equal ours (RESET of a startup setting); it is reset before reuse. */
  private divergent = false;
  private readonly dirtyNames = new Set<string>();
  readonly pins = new Set<PinReason>();
  private readonly stmts = new Map<string, StmtDef>();
  private unnamed: StmtDef | null = null;
  private readonly portals = new Map<string, StmtDef>();
  private readonly listens = new Set<string>();
  /**
   * The server said it stopped waiting for the synchronous standbys of a
   * commit (a cancel, or a shutdown): the commit is local only, so the client
   * must not hear that it succeeded.
   */
  private commitUnconfirmed = false;

  private readonly q: Array<Entry | undefined> = [];
  private qh = 0;
  private readonly inbox: Buffer[] = [];
  private inboxBytes = 0;
  private blocked = false;
  private pumping = false;
  private skipTillSync = false;
  private readonly scanner: MessageScanner;
  private readonly out = new OutBatch();
  flushQueued = false;
  private serverPaused = false;
  private clientPaused = false;
  private reported: Map<string, string>;
  private reportedKey: string;
  /** For a gateway client: the committed settings it last heard of (null: a plain client, no reports). */
  private reportedSession: string | null;
  /** For a gateway client: whether it last heard the session can move to another pooler. */
  private reportedPortable = true;
  private batchStart = 0;
  private xactStart = 0;
  private lastReady = 0;
  private readonly log: Logger;

  constructor(
    readonly socket: net.Socket,
    readonly pid: number,
    readonly secret: number,
    readonly user: string,
    readonly database: string,
    readonly pool: Pool,
    readonly startup: Settings,
    fromGateway: GatewayState | undefined,
    readonly applicationName: string,
    params: Map<string, string>,
    private readonly svc: SessionServices,
  ) {
    this.committed = fromGateway?.carried ?? startup;
    this.working = this.committed;
    this.reportedSession = fromGateway === undefined ? null : fromGateway.carried?.fp ?? '';
    this.reported = new Map(params);
    this.reportedKey = paramsKeyOf(params);
    this.scanner = new MessageScanner(svc.config.maxMessageBytes);
    this.log = svc.log.child({ client: pid });
    socket.on('data', (chunk: Buffer) => inEvent(this.onData, chunk));
    socket.on('drain', () => this.onClientDrain());
    socket.on('error', () => undefined);
    socket.on('close', () => this.onClientClosed());
  }

  get pendingCount(): number {
    return this.q.length - this.qh;
  }

  get preparedCount(): number {
    return this.stmts.size;
  }

  get waiting(): boolean {
    return this.waitingSince > 0;
  }

  /** Bytes that arrived with the startup packet, after it. */
  feed(rest: Buffer): void {
    if (rest.length) inEvent(this.onData, rest);
  }

  // --- input from the client ---------------------------------------------------------------

  private readonly onData = (chunk: Buffer): void => {
    if (this.state === 'closed') return;
    this.pool.stats.received += chunk.length;
    this.requestTime = coarseNow();
    try {
      this.scanner.push(chunk, this);
    } catch (err) {
      this.fatal(err instanceof PgError ? err : new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, String(err)));
    }
  };

  onMessage(buf: Buffer, start: number, len: number): void {
    if (this.state === 'closed') return;
    if (this.blocked || this.inbox.length > 0) {
      this.enqueue(keep(buf, start, start + len));
      return;
    }
    if (!this.handle(buf, start, len)) this.enqueue(keep(buf, start, start + len));
  }

  private enqueue(m: Buffer): void {
    this.inbox.push(m);
    this.inboxBytes += m.length;
    if (this.inboxBytes > INBOX_MAX && !this.clientPaused) {
      this.clientPaused = true;
      this.socket.pause();
    }
  }

  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (!this.blocked && this.inbox.length > 0 && this.state === 'ready') {
        const m = this.inbox[0];
        if (!this.handle(m, 0, m.length)) break;
        this.inbox.shift();
        this.inboxBytes -= m.length;
      }
    } finally {
      this.pumping = false;
    }
    this.maybeResumeClient();
  }

  /** Processes one client message; false when it must wait (for a server connection) and be retried. */
  private handle(buf: Buffer, start: number, len: number): boolean {
    const type = buf[start];
    try {
      if (this.skipTillSync) {
        if (type === T.Sync) {
          this.skipTillSync = false;
          return this.onSync(buf, start, len);
        }
        if (type === T.Terminate) this.close();
        return true;
      }
      switch (type) {
        case T.Query: return this.onQuery(buf, start, len);
        case T.Parse: return this.onParse(buf, start, len);
        case T.Bind: return this.onBind(buf, start, len);
        case T.Execute: return this.onExecute(buf, start, len);
        case T.Describe: return this.onDescribe(buf, start, len);
        case T.Close: return this.onClose(buf, start, len);
        case T.Sync: return this.onSync(buf, start, len);
        case T.Flush:
          if (this.server) this.server.writeRange(buf, start, start + len);
          return true;
        case T.FunctionCall:
          if (!this.needServer()) return false;
          this.startBatch();
          this.push(new Entry(K_FN));
          this.server!.writeRange(buf, start, start + len);
          return true;
        case T.CopyData:
        case T.CopyDone:
        case T.CopyFail:
          // Outside COPY, Postgres ignores these too.
          if (this.server) this.server.writeRange(buf, start, start + len);
          return true;
        case T.Terminate:
          this.close();
          return true;
        default:
          this.fatal(new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, `invalid frontend message type ${type}`));
          return true;
      }
    } catch (err) {
      if (err instanceof PgError && err.severity === 'FATAL') {
        this.fatal(err);
        return true;
      }
      const e = err instanceof PgError ? err : new PgError('ERROR', SQLSTATE.PROTOCOL_VIOLATION, `invalid message format: ${(err as Error).message}`);
      if (!(err instanceof PgError)) this.log.warn({ err }, 'error handling a client message');
      this.count('client_protocol');
      this.errorInBatch(type, e);
      return true;
    }
  }

  private onQuery(buf: Buffer, start: number, len: number): boolean {
    const end = start + len;
    if (len < 6 || buf[end - 1] !== 0) throw new PgError('ERROR', SQLSTATE.PROTOCOL_VIOLATION, 'invalid Query message: missing string terminator');
    const sql = buf.toString('utf8', start + 5, end - 1);
    const cls = classify(sql);
    const forbidden = cls && forbiddenIn(cls);
    if (forbidden) {
      this.errorInBatch(T.Query, forbidden);
      return true;
    }
    if (cls && this.answerLocally(cls)) return true;
    if (cls) for (const { effects } of cls) for (const ef of effects) if (ef.t === 'releaseDatabase') this.svc.releaseDatabase(ef.name);
    if (!this.needServer()) return false;
    this.startBatch();
    const e = new Entry(K_QUERY);
    e.stmts = cls;
    this.push(e);
    // A simple Query drops the unnamed prepared statement, on the server and for the client.
    this.unnamed = null;
    this.server!.unnamedOwner = null;
    this.server!.writeRange(buf, start, end);
    return true;
  }

  /** Statements the pooler answers itself when the client holds no server connection. */
  private answerLocally(cls: StmtEffects[]): boolean {
    const all = cls.flatMap((s) => s.effects);
    const single = cls.length === 1 && all.length === 1 ? all[0] : undefined;
    if (!this.server && this.txnStatus === 'I' && cls.every((s) => s.effects.length === 1 && (s.effects[0].t === 'listen' || s.effects[0].t === 'unlisten'))) {
      this.sharedListen(all, true);
      return true;
    }
    if (single?.t === 'discardAll' && !this.server && this.pins.size === 0) {
      this.discardAllLocal();
      this.pushSynth(Buffer.concat([commandComplete('DISCARD ALL'), this.readyNow()]));
      return true;
    }
    if (single?.t === 'deallocate' && (single.name === null ? !this.pins.has('prepare') : this.stmts.has(single.name))) {
      // Protocol-level statements share the namespace of SQL DEALLOCATE; they live in the pooler.
      if (this.txnStatus === 'E') {
        this.pushSynth(() => Buffer.concat([errorResponse(new PgError('ERROR', '25P02', 'current transaction is aborted, commands ignored until end of transaction block')), readyForQuery('E')]));
        return true;
      }
      if (single.name === null) {
        this.stmts.clear();
        this.unnamed = null;
      } else {
        this.stmts.delete(single.name);
      }
      const tag = single.name === null ? 'DEALLOCATE ALL' : 'DEALLOCATE';
      this.pushSynth(() => Buffer.concat([commandComplete(tag), this.readyNow()]));
      return true;
    }
    return false;
  }

  private onParse(buf: Buffer, start: number, len: number): boolean {
    const end = start + len;
    const [name, sqlAt] = cstrAt(buf, start + 5, end);
    const [sql, typesAt] = cstrAt(buf, sqlAt, end);
    if (typesAt + 2 > end) throw new PgError('ERROR', SQLSTATE.PROTOCOL_VIOLATION, 'invalid Parse message: missing parameter types');
    if (name !== '' && this.stmts.has(name)) {
      this.errorInBatch(T.Parse, new PgError('ERROR', SQLSTATE.DUPLICATE_PREPARED_STATEMENT, `prepared statement "${name}" already exists`));
      return true;
    }
    const cls = classify(sql);
    const forbidden = cls && forbiddenIn(cls);
    if (forbidden) {
      this.errorInBatch(T.Parse, forbidden);
      return true;
    }
    const effects = cls?.[0]?.effects ?? null;
    const listenOnly = cls !== null && cls.length === 1 && effects!.length === 1 && (effects![0].t === 'listen' || effects![0].t === 'unlisten');
    if (name !== '' && !this.server && !this.pool.hasIdle) {
      // No server is free: answer now and prepare on first use, rather than make the client wait
      // (a synchronous PQprepare would otherwise stall a single-threaded client that holds other sessions).
      const bad = syntaxError(sql);
      if (bad) {
        this.errorInBatch(T.Parse, bad.position ? new PositionedError(SQLSTATE.SYNTAX_ERROR, bad.message, bad.position)
          : new PgError('ERROR', SQLSTATE.SYNTAX_ERROR, bad.message));
        return true;
      }
      const rest = Buffer.from(buf.subarray(sqlAt, end));
      this.stmts.set(name, { serverName: this.serverNameOf(rest), rest, effects, listenOnly, parsedAt: tick(), unverified: name });
      this.pushSynth(PARSE_COMPLETE, () => this.stmts.delete(name));
      return true;
    }
    if (!this.needServer()) return false;
    const s = this.server!;
    this.startBatch();
    const rest = Buffer.from(buf.subarray(sqlAt, end));
    const e = new Entry(K_PARSE);
    if (name === '') {
      const def: StmtDef = { serverName: '', rest, effects, listenOnly, parsedAt: tick() };
      const prev = this.unnamed;
      const prevOwner = s.unnamedOwner;
      this.unnamed = def;
      s.unnamedOwner = def;
      e.undo = (failed) => {
        this.unnamed = failed ? null : prev;
        s.unnamedOwner = failed ? null : prevOwner;
      };
      this.push(e);
      s.writeRange(buf, start, end);
      return true;
    }
    const serverName = this.serverNameOf(rest);
    const def: StmtDef = { serverName, rest, effects, listenOnly, parsedAt: tick() };
    this.stmts.set(name, def);
    // The server's copy was planned before this Parse, perhaps against a table since changed where the
    // pooler could not see it (a DO block, another connection): plan it again, as Postgres would (0048).
    if (s.prepared.has(serverName)) this.closeOnServer(serverName);
    s.addPrepared(serverName);
    e.undo = () => {
      this.stmts.delete(name);
      s.prepared.delete(serverName);
    };
    this.push(e);
    s.write(parseMessage(def));
    return true;
  }

  /**
   * The pooler-wide name of a statement: the same SQL and parameter types under the same
   * search_path and role, since the database's last schema change, share one server-side plan.
   */
  private serverNameOf(parseBody: Buffer): string {
    const hash = createHash('sha1').update(this.working.planContext).update('\0')
      .update(String(this.svc.schemaEpoch(this.database))).update('\0').update(parseBody);
    return `mg_${hash.digest('hex').slice(0, 28)}`;
  }

  /** Makes sure the server holds `def` under its name, injecting a Parse whose ParseComplete is swallowed. */
  private ensurePrepared(def: StmtDef): void {
    const s = this.server!;
    if (def.serverName === '') {
      if (s.unnamedOwner === def) return;
      const prevOwner = s.unnamedOwner;
      s.unnamedOwner = def;
      const e = new Entry(K_PARSE);
      e.swallow = true;
      e.undo = (failed) => {
        s.unnamedOwner = failed ? null : prevOwner;
      };
      this.push(e);
      s.write(parseMessage(def));
      return;
    }
    const at = s.preparedAt(def.serverName);
    if (at !== undefined && at > def.parsedAt) {
      def.unverified = undefined;
      return;
    }
    // Missing, or prepared before the client's Parse (see onParse).
    if (at !== undefined) this.closeOnServer(def.serverName);
    s.addPrepared(def.serverName);
    const e = new Entry(K_PARSE);
    e.swallow = true;
    const unverified = def.unverified;
    def.unverified = undefined;
    e.undo = (failed) => {
      s.prepared.delete(def.serverName);
      if (unverified === undefined) return;
      // Its first real Parse failed: as far as the client is concerned, it never existed.
      if (failed && this.stmts.get(unverified) === def) this.stmts.delete(unverified);
      else def.unverified = unverified;
    };
    this.push(e);
    s.write(parseMessage(def));
  }

  /** Closes the server's copy of a statement about to be prepared again (its CloseComplete swallowed). */
  private closeOnServer(serverName: string): void {
    const s = this.server!;
    const copy = s.prepared.get(serverName)!;
    const e = new Entry(K_CLOSE);
    e.swallow = true;
    // Skipped after an earlier error, the copy stays (closing a statement cannot fail itself).
    e.undo = () => s.prepared.set(serverName, copy);
    this.push(e);
    s.write(message('C', Buffer.from('S'), Buffer.from(`${serverName}\0`, 'latin1')));
  }

  private lookup(name: string): StmtDef {
    const def = name === '' ? this.unnamed : this.stmts.get(name);
    if (!def) {
      throw new PgError('ERROR', SQLSTATE.UNDEFINED_PREPARED_STATEMENT,
        name === '' ? 'unnamed prepared statement does not exist' : `prepared statement "${name}" does not exist`);
    }
    return def;
  }

  private onBind(buf: Buffer, start: number, len: number): boolean {
    const end = start + len;
    const [portal, stmtAt] = cstrAt(buf, start + 5, end);
    const [stmt, restAt] = cstrAt(buf, stmtAt, end);
    const def = this.lookup(stmt);
    if (!this.needServer()) return false;
    const s = this.server!;
    this.startBatch();
    this.ensurePrepared(def);
    if (def.serverName === '') {
      s.writeRange(buf, start, end);
    } else {
      // Same message with the statement name swapped for the pooler-wide one.
      const nameLen = Buffer.byteLength(def.serverName);
      const portalLen = stmtAt - (start + 5);
      const out = Buffer.allocUnsafe(5 + portalLen + nameLen + 1 + (end - restAt));
      out[0] = T.Bind;
      out.writeInt32BE(out.length - 1, 1);
      buf.copy(out, 5, start + 5, stmtAt);
      out.write(def.serverName, 5 + portalLen, 'latin1');
      out[5 + portalLen + nameLen] = 0;
      buf.copy(out, 6 + portalLen + nameLen, restAt, end);
      s.write(out);
    }
    this.portals.set(portal, def);
    this.push(new Entry(K_BIND));
    return true;
  }

  private onDescribe(buf: Buffer, start: number, len: number): boolean {
    const end = start + len;
    const target = buf[start + 5];
    const [name] = cstrAt(buf, start + 6, end);
    if (target === 0x53 /* S */) {
      const def = this.lookup(name);
      if (!this.needServer()) return false;
      this.startBatch();
      this.ensurePrepared(def);
      this.server!.write(def.serverName === '' ? buf.subarray(start, end) : message('D', Buffer.from('S'), Buffer.from(`${def.serverName}\0`, 'latin1')));
    } else if (target === 0x50 /* P */) {
      if (!this.needServer()) return false;
      this.startBatch();
      this.server!.writeRange(buf, start, end);
    } else {
      throw new PgError('ERROR', SQLSTATE.PROTOCOL_VIOLATION, `invalid DESCRIBE message subtype ${target}`);
    }
    this.push(new Entry(K_DESCRIBE));
    return true;
  }

  private onExecute(buf: Buffer, start: number, len: number): boolean {
    const end = start + len;
    const [portal] = cstrAt(buf, start + 5, end);
    if (!this.needServer()) return false;
    this.startBatch();
    const def = this.portals.get(portal);
    if (def?.listenOnly && def.effects) {
      this.sharedListen(def.effects, false);
      return true;
    }
    const e = new Entry(K_EXECUTE);
    e.effects = def?.effects ?? null;
    this.push(e);
    this.server!.writeRange(buf, start, end);
    return true;
  }

  private onClose(buf: Buffer, start: number, len: number): boolean {
    const end = start + len;
    const target = buf[start + 5];
    const [name] = cstrAt(buf, start + 6, end);
    if (target === 0x53 /* S */) {
      // Only the client's name goes: the server's statement may serve other clients.
      if (name === '') {
        const prev = this.unnamed;
        this.unnamed = null;
        this.pushSynth(CLOSE_COMPLETE, () => {
          this.unnamed = prev;
        });
      } else {
        const prev = this.stmts.get(name);
        this.stmts.delete(name);
        this.pushSynth(CLOSE_COMPLETE, () => {
          if (prev) this.stmts.set(name, prev);
        });
      }
      return true;
    }
    if (target !== 0x50 /* P */) throw new PgError('ERROR', SQLSTATE.PROTOCOL_VIOLATION, `invalid CLOSE message subtype ${target}`);
    if (!this.server) {
      // No transaction, so no portal: closing a missing portal is not an error.
      this.pushSynth(CLOSE_COMPLETE);
      return true;
    }
    this.portals.delete(name);
    this.push(new Entry(K_CLOSE));
    this.server.writeRange(buf, start, end);
    return true;
  }

  private onSync(buf: Buffer, start: number, len: number): boolean {
    if (this.server) {
      this.startBatch();
      this.push(new Entry(K_SYNC));
      this.server.writeRange(buf, start, start + len);
    } else {
      this.pushSynth(() => this.readyNow());
    }
    return true;
  }

  // --- errors the pooler raises ------------------------------------------------------------

  /**
   * An error in the middle of the client's batch. With a server connection it is
   * raised on the server (so the transaction is aborted and the rest of the batch
   * skipped exactly as Postgres would), with the message replaced by ours.
   */
  private errorInBatch(type: number, err: PgError): void {
    this.count('client_error');
    if (!this.server) {
      this.localError(type, err);
      return;
    }
    const s = this.server;
    this.startBatch();
    const e = new Entry(K_ERROR);
    e.rewrite = err;
    this.push(e);
    s.write(ERROR_BIND);
    if (type === T.Query || type === T.FunctionCall) {
      this.push(new Entry(K_SYNC));
      s.write(SYNC);
    }
  }

  /** An error answered without a server connection (so there is no transaction to abort). */
  private localError(type: number, err: PgError): void {
    if (type === T.Query || type === T.FunctionCall || type === T.Sync) {
      this.pushSynth(() => Buffer.concat([errorResponse(err), readyForQuery('I')]));
    } else {
      this.pushSynth(errorResponse(err));
      this.skipTillSync = true;
    }
  }

  /** The message waiting for a server connection fails (queue timeout, cancel, connect failure). */
  private failBlocked(err: PgError): void {
    this.blocked = false;
    this.waitingSince = 0;
    const m = this.inbox.shift();
    if (m) {
      this.inboxBytes -= m.length;
      this.localError(m[0], err.severity === 'FATAL' ? new PgError('ERROR', err.code, err.message, err.detail, err.hint) : err);
    }
    this.pump();
  }

  /** Sends a FATAL error and closes the client. */
  fatal(err: PgError): void {
    if (this.state === 'closed') return;
    this.count('client_fatal');
    this.log.debug({ code: err.code, msg: err.message }, 'closing client with error');
    this.out.add(errorResponse(err.severity === 'FATAL' ? err : new PgError('FATAL', err.code, err.message, err.detail, err.hint)));
    this.flush();
    this.close();
  }

  // --- server connections ------------------------------------------------------------------

  private needServer(): boolean {
    if (this.server) return true;
    if (this.svc.shuttingDown) throw new PgError('FATAL', SQLSTATE.ADMIN_SHUTDOWN, 'terminating connection due to administrator command');
    const s = this.pool.acquire(this, this.working.fp, this.onAcquired);
    if (s) return this.prepareServer(s);
    this.blocked = true;
    this.waitingSince = Date.now();
    return false;
  }

  private readonly onAcquired = (err: PgError | null, s?: ServerConn): void => {
    this.waitingSince = 0;
    if (this.state === 'closed') {
      if (s) this.pool.release(s);
      return;
    }
    if (err || !s) {
      this.count('acquire');
      this.failBlocked(err ?? new PgError('ERROR', SQLSTATE.INTERNAL_ERROR, 'no server connection'));
      return;
    }
    if (this.prepareServer(s)) {
      this.blocked = false;
      this.pump();
    }
  };

  /** Brings the server connection's settings to ours (one batch, responses swallowed), then attaches. */
  private prepareServer(s: ServerConn): boolean {
    const delta = settingsDelta(s.applied, this.working);
    if (!delta) {
      this.attach(s);
      return true;
    }
    this.blocked = true;
    s.ownerLabel = String(this.pid);
    const desired = this.working;
    s.runInternal([delta]).then((r) => {
      if (r.error) {
        s.applied = null;
        this.pool.release(s);
        this.log.warn({ err: r.error.message, code: r.error.code }, 'could not apply session settings');
        this.fatal(new PgError('FATAL', r.error.code, `could not restore this session's settings on a pooled server connection: ${r.error.message}`));
        return;
      }
      s.applied = desired;
      if (this.state === 'closed') {
        this.pool.release(s);
        return;
      }
      this.attach(s);
      this.blocked = false;
      this.pump();
    }, () => {
      // The connection died meanwhile; the pool has dropped it. Try again.
      if (this.state === 'closed') return;
      this.blocked = false;
      this.pump();
    });
    return false;
  }

  private attach(s: ServerConn): void {
    s.owner = this;
    s.ownerLabel = String(this.pid);
    this.server = s;
    this.xactStart = 0;
    if (s.paramsKey !== this.reportedKey) {
      for (const [k, v] of s.params) {
        if (this.reported.get(k) !== v) {
          this.reported.set(k, v);
          this.send(message('S', Buffer.from(`${k}\0${v}\0`, 'utf8')));
        }
      }
      this.reportedKey = s.paramsKey;
    }
  }

  private startBatch(): void {
    if (this.batchStart === 0) {
      this.batchStart = performance.now();
      if (this.xactStart === 0) this.xactStart = this.batchStart;
    }
  }

  private maybeRelease(): void {
    const s = this.server;
    if (!s || this.pendingCount > 0 || this.txnStatus !== 'I' || this.pins.size > 0 || this.blocked) return;
    if (this.dirtyNames.size > 0) {
      this.resolveDirty(s);
      return;
    }
    this.detach(s);
    this.pool.release(s);
  }

  private detach(s: ServerConn): void {
    this.server = null;
    s.owner = null;
    if (this.touched || this.divergent) s.applied = this.divergent ? null : this.committed;
    this.touched = false;
    this.divergent = false;
    if (this.serverPaused) {
      this.serverPaused = false;
      s.socket.resume();
    }
    this.svc.counters.xacts++;
    this.pool.stats.xacts++;
    if (this.xactStart > 0) this.pool.stats.xactTimeUs += Math.round((this.lastReady - this.xactStart) * 1000);
  }

  /** set_config calls we could not evaluate: read the values back before the connection goes. */
  private resolveDirty(s: ServerConn): void {
    const names = [...this.dirtyNames];
    this.dirtyNames.clear();
    this.blocked = true;
    s.runInternal([`SELECT ${names.map((n) => `pg_catalog.current_setting(${quoteLiteral(n)}, true)`).join(', ')}`]).then((r) => {
      const row = r.rows[0];
      if (r.error || !row) {
        this.divergent = true;
      } else {
        let w = this.working;
        names.forEach((n, i) => {
          const v = row[i];
          w = v === null ? w.without(n) : w.with(n, setConfigSql(n, v));
        });
        this.working = w;
        this.committed = w;
        this.touched = true;
      }
      this.blocked = false;
      this.maybeRelease();
      this.pump();
    }, () => {
      this.blocked = false;
      this.pump();
    });
  }

  // --- output from the server --------------------------------------------------------------

  onServerMessage(buf: Buffer, start: number, len: number): void {
    const type = buf[start];
    if (type === T.DataRow) {
      this.out.range(buf, start, start + len);
      this.scheduleFlush();
      return;
    }
    const e = this.q[this.qh];
    switch (type) {
      case T.ParseComplete:
        if (!e || e.k !== K_PARSE) return this.desync(type);
        this.pop();
        if (!e.swallow) this.out.range(buf, start, start + len);
        break;
      case T.BindComplete:
        if (!e || e.k !== K_BIND) return this.desync(type);
        this.pop();
        this.out.range(buf, start, start + len);
        break;
      case T.CloseComplete:
        if (!e || e.k !== K_CLOSE) return this.desync(type);
        this.pop();
        if (!e.swallow) this.out.range(buf, start, start + len);
        break;
      case T.RowDescription:
      case T.NoData:
        this.out.range(buf, start, start + len);
        if (e?.k === K_DESCRIBE) this.pop();
        break;
      case T.NoticeResponse:
        if (SYNC_WAIT_CANCELLED.test(errorFieldsAt(buf, start, len).M ?? '')) this.commitUnconfirmed = true;
        this.out.range(buf, start, start + len);
        break;
      case T.CommandComplete:
        if (this.commitUnconfirmed) {
          this.commitUnconfirmed = false;
          this.out.add(errorResponse(COMMIT_UNCONFIRMED));
        } else {
          this.out.range(buf, start, start + len);
        }
        if (e?.k === K_EXECUTE) {
          this.completed(e.effects, buf, start, len);
          this.pop();
        } else if (e?.k === K_QUERY) {
          this.completed(e.stmts?.[e.idx++]?.effects ?? null, buf, start, len);
        }
        break;
      case T.EmptyQuery:
      case T.PortalSuspended:
        this.out.range(buf, start, start + len);
        if (e?.k === K_EXECUTE) this.pop();
        else if (e?.k === K_QUERY) e.idx++;
        break;
      case T.ErrorResponse:
        this.onServerError(e, buf, start, len);
        break;
      case T.ReadyForQuery:
        this.onReady(e, buf, start, len);
        return;
      case T.ParameterStatus: {
        this.out.range(buf, start, start + len);
        const nul = buf.indexOf(0, start + 5);
        this.reported.set(buf.toString('utf8', start + 5, nul), buf.toString('utf8', nul + 1, start + len - 1));
        this.reportedKey = this.server?.paramsKey ?? '';
        break;
      }
      default:
        // ParameterDescription, NoticeResponse, NotificationResponse, COPY messages, FunctionCallResponse
        this.out.range(buf, start, start + len);
    }
    const h = this.q[this.qh];
    if (h && h.k === K_SYNTH) this.drainSynth();
    this.scheduleFlush();
  }

  private onServerError(e: Entry | undefined, buf: Buffer, start: number, len: number): void {
    this.txErr = true;
    this.count('server_error');
    if (!e) {
      this.out.range(buf, start, start + len);
      return;
    }
    if (e.k === K_ERROR) this.out.add(errorResponse(e.rewrite!));
    else this.out.range(buf, start, start + len);
    if (e.k === K_QUERY || e.k === K_FN || e.k === K_SYNC) return; // ReadyForQuery follows
    // An extended-protocol message failed: Postgres skips everything up to Sync.
    this.pop();
    e.undo?.(true);
    let j = this.qh;
    while (j < this.q.length && this.q[j]!.k !== K_SYNC) j++;
    const syncQueued = j < this.q.length;
    for (let i = j - 1; i >= this.qh; i--) this.q[i]!.undo?.(false);
    this.q.splice(this.qh, j - this.qh);
    if (this.qh === this.q.length) {
      this.q.length = 0;
      this.qh = 0;
    }
    // The client has not sent its Sync yet: drop what it sends until then, as the server will.
    if (!syncQueued) this.skipTillSync = true;
  }

  private onReady(e: Entry | undefined, buf: Buffer, start: number, len: number): void {
    if (!e || (e.k !== K_SYNC && e.k !== K_QUERY && e.k !== K_FN)) return this.desync(T.ReadyForQuery);
    this.pop();
    const status = buf[start + 5];
    this.txnStatus = status === 0x49 ? 'I' : status === 0x54 ? 'T' : 'E';
    if (this.txnStatus === 'I') {
      this.endOfTransaction();
      for (const report of this.sessionReport()) this.out.add(report);
    }
    this.out.range(buf, start, start + len);
    this.svc.counters.queries++;
    this.pool.stats.queries++;
    if (this.batchStart) {
      this.lastReady = performance.now();
      this.pool.stats.queryTimeUs += Math.round((this.lastReady - this.batchStart) * 1000);
      this.batchStart = 0;
    }
    const h = this.q[this.qh];
    if (h && h.k === K_SYNTH) this.drainSynth();
    this.scheduleFlush();
    this.maybeRelease();
  }

  /** A statement completed: its session effects are now real (until a rollback says otherwise). */
  private completed(effects: Effect[] | null, buf: Buffer, start: number, len: number): void {
    const c0 = buf[start + 5];
    // COMMIT, ROLLBACK and PREPARE TRANSACTION end a transaction block.
    if ((c0 === 0x43 || c0 === 0x52 || c0 === 0x50) && len <= 26) {
      const tag = buf.toString('latin1', start + 5, start + len - 1);
      if (tag === 'COMMIT' || tag === 'PREPARE TRANSACTION') {
        this.committed = this.working;
        this.txErr = false;
        this.savepoints.length = 0;
      } else if (tag === 'ROLLBACK' && !effects?.some((x) => x.t === 'rollbackTo')) {
        this.working = this.committed;
        this.txErr = false;
        this.savepoints.length = 0;
      }
    }
    if ((c0 === 0x43 || c0 === 0x41 || c0 === 0x44) && isSchemaChange(buf, start + 5, effects)) this.svc.schemaChanged(this.database);
    if (effects) for (const ef of effects) this.apply(ef);
  }

  private apply(ef: Effect): void {
    const s = this.server;
    switch (ef.t) {
      case 'set':
        this.working = this.working.with(ef.name, ef.sql);
        this.touched = true;
        break;
      case 'reset': {
        const st = this.startup.map.get(ef.name);
        if (st !== undefined) {
          this.working = this.working.with(ef.name, st);
          this.divergent = true;
        } else {
          this.working = this.working.without(ef.name);
        }
        this.touched = true;
        break;
      }
      case 'resetAll':
        this.working = afterResetAll(this.working, this.startup);
        if (this.startup.size > 0) this.divergent = true;
        this.touched = true;
        break;
      case 'dynamic':
        this.dirtyNames.add(ef.name);
        break;
      case 'pin':
        if (this.pins.size === 0) this.log.debug({ reason: ef.reason }, 'client pinned to its server connection');
        this.pins.add(ef.reason);
        if (s) s.needsReset = true;
        break;
      case 'unpin':
        this.pins.delete(ef.reason);
        break;
      case 'listen':
        this.pins.add('listen');
        if (s) s.needsReset = true;
        break;
      case 'unlisten':
        if (ef.channel === null) this.pins.delete('listen');
        break;
      case 'discardAll':
        this.discardAllLocal();
        this.touched = true;
        if (s) {
          // The server connection itself is now clean.
          s.prepared.clear();
          s.unnamedOwner = null;
          s.needsReset = false;
          s.applied = Settings.EMPTY;
          this.touched = false;
          if (this.startup.size > 0) this.divergent = true;
        }
        break;
      case 'deallocate':
        if (ef.name === null) {
          this.stmts.clear();
          this.unnamed = null;
          this.pins.delete('prepare');
          if (s) {
            s.prepared.clear();
            s.unnamedOwner = null;
          }
        }
        break;
      case 'savepoint':
        this.savepoints.push({ name: ef.name, snap: this.working });
        break;
      case 'release': {
        const i = this.findSavepoint(ef.name);
        if (i >= 0) this.savepoints.length = i;
        break;
      }
      case 'rollbackTo': {
        const i = this.findSavepoint(ef.name);
        if (i >= 0) {
          this.working = this.savepoints[i].snap;
          this.savepoints.length = i + 1;
        }
        break;
      }
    }
  }

  private findSavepoint(name: string): number {
    for (let i = this.savepoints.length - 1; i >= 0; i--) if (this.savepoints[i].name === name) return i;
    return -1;
  }

  /** ReadyForQuery for a reply the pooler makes itself, with the session report when idle. */
  private readyNow(): Buffer {
    if (this.txnStatus !== 'I') return readyForQuery(this.txnStatus);
    const report = this.sessionReport();
    return report.length ? Buffer.concat([...report, readyForQuery('I')]) : readyForQuery('I');
  }

  /**
   * A gateway client hears of its committed settings and of whether the
   * session could move to another pooler, when they change, just before the
   * ReadyForQuery that follows.
   */
  private sessionReport(): Buffer[] {
    if (this.reportedSession === null) return [];
    const out: Buffer[] = [];
    if (this.reportedSession !== this.committed.fp) {
      this.reportedSession = this.committed.fp;
      out.push(parameterStatus(SESSION_STATE_PARAM, encodeSessionState(this.committed)));
    }
    const portable = this.pins.size === 0 && this.stmts.size === 0 && this.listens.size === 0;
    if (portable !== this.reportedPortable) {
      this.reportedPortable = portable;
      out.push(parameterStatus(PORTABLE_PARAM, portable ? 'on' : 'off'));
    }
    return out;
  }

  /** Settings after the transaction: kept if it committed, dropped if it failed or rolled back. */
  private endOfTransaction(): void {
    if (this.working !== this.committed) {
      if (this.txErr) this.working = this.committed;
      else this.committed = this.working;
    }
    this.txErr = false;
    this.savepoints.length = 0;
    this.portals.clear();
  }

  /** What DISCARD ALL does to the session as the pooler keeps it. */
  private discardAllLocal(): void {
    this.pins.clear();
    this.working = this.startup;
    this.committed = this.startup;
    this.stmts.clear();
    this.unnamed = null;
    this.portals.clear();
    this.dirtyNames.clear();
    this.savepoints.length = 0;
    if (this.listens.size) {
      this.svc.listener(this.database, this.user).unlisten(this, null);
      this.listens.clear();
    }
  }

  /** LISTEN/UNLISTEN through the shared listener; the answer comes once the listener has done it. */
  private sharedListen(effects: Effect[], simple: boolean): void {
    this.blocked = true;
    const listener = this.svc.listener(this.database, this.user);
    const run = async (): Promise<string[]> => {
      const tags: string[] = [];
      for (const ef of effects) {
        if (ef.t === 'listen') {
          await listener.listen(this, ef.channel);
          this.listens.add(ef.channel);
          tags.push('LISTEN');
        } else if (ef.t === 'unlisten') {
          listener.unlisten(this, ef.channel);
          if (ef.channel === null) this.listens.clear();
          else this.listens.delete(ef.channel);
          tags.push('UNLISTEN');
        }
      }
      return tags;
    };
    run().then((tags) => {
      if (this.state === 'closed') {
        listener.unlisten(this, null);
        return;
      }
      const frames = tags.map(commandComplete);
      this.pushSynth(simple ? () => Buffer.concat([...frames, this.readyNow()]) : Buffer.concat(frames));
    }, (err: Error) => {
      const pgErr = err instanceof PgError ? new PgError('ERROR', err.code, err.message) : new PgError('ERROR', SQLSTATE.INTERNAL_ERROR, err.message);
      if (simple) this.pushSynth(() => Buffer.concat([errorResponse(pgErr), this.readyNow()]));
      else this.errorInBatch(T.Execute, pgErr);
    }).finally(() => {
      this.blocked = false;
      this.scheduleFlush();
      this.pump();
      this.maybeRelease();
    });
  }

  deliverNotification(frame: Buffer): void {
    if (this.state === 'closed') return;
    this.out.add(frame);
    this.scheduleFlush();
  }

  // --- the response queue ------------------------------------------------------------------

  private push(e: Entry): void {
    this.q.push(e);
  }

  private pushSynth(frames: Buffer | (() => Buffer), undo?: (failed: boolean) => void): void {
    if (this.pendingCount === 0) {
      this.send(typeof frames === 'function' ? frames() : frames);
      return;
    }
    const e = new Entry(K_SYNTH);
    e.frames = frames;
    e.undo = undo ?? null;
    this.q.push(e);
  }

  private pop(): void {
    this.q[this.qh++] = undefined;
    if (this.qh === this.q.length) {
      this.q.length = 0;
      this.qh = 0;
    } else if (this.qh > 1024) {
      this.q.splice(0, this.qh);
      this.qh = 0;
    }
  }

  private drainSynth(): void {
    for (let e = this.q[this.qh]; e && e.k === K_SYNTH; e = this.q[this.qh]) {
      this.pop();
      this.out.add(typeof e.frames === 'function' ? e.frames() : e.frames!);
    }
  }

  private desync(type: number): void {
    const head = this.q[this.qh];
    this.log.error({ type: String.fromCharCode(type), expecting: head?.k }, 'lost protocol synchronization with the server connection');
    this.count('desync');
    const s = this.server;
    if (s) {
      this.detach(s);
      s.destroy();
    }
    this.fatal(new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, 'pooler lost protocol synchronization with the server connection'));
  }

  onServerLost(s: ServerConn, fatal: PgError): void {
    if (this.server !== s || this.state === 'closed') return;
    this.server = null;
    this.serverPaused = false;
    this.count('server_lost');
    this.log.info({ code: fatal.code, msg: fatal.message, pinned: [...this.pins] }, 'server connection lost under a client');
    // Nothing of the session was on it: the next statement takes another connection.
    if (this.pins.size === 0 && this.qh === this.q.length && this.txnStatus === 'I') return;
    // Its transaction, or its pinned state, died with it. Postgres ends the session then,
    // and clients and pools rely on that to discard the connection (PgBouncer does the same).
    this.fatal(new PgError('FATAL', fatal.code, fatal.message, fatal.detail, fatal.hint));
  }

  onServerDrain(): void {
    this.maybeResumeClient();
  }

  // --- output to the client ----------------------------------------------------------------

  private send(b: Buffer): void {
    this.out.add(b);
    this.scheduleFlush();
  }

  private scheduleFlush(): void {
    requestFlush(this);
  }

  flush(): void {
    if (this.out.empty) return;
    if (this.state === 'closed' && this.socket.destroyed) {
      this.out.clear();
      return;
    }
    this.pool.stats.sent += this.out.writeTo(this.socket);
    if (this.socket.writableLength > HIGH_WATER && this.server && !this.serverPaused) {
      // A slow client: stop reading its server until it catches up.
      this.serverPaused = true;
      this.server.socket.pause();
    }
  }

  private onClientDrain(): void {
    if (this.serverPaused) {
      this.serverPaused = false;
      this.server?.socket.resume();
    }
  }

  private maybeResumeClient(): void {
    if (this.clientPaused && this.inboxBytes < INBOX_MAX / 2 && !(this.server?.congested ?? false)) {
      this.clientPaused = false;
      this.socket.resume();
    }
  }

  // --- lifecycle ---------------------------------------------------------------------------

  /** CancelRequest with this client's key. */
  cancel(): void {
    if (this.server && (this.pendingCount > 0 || this.server.busyInternal)) {
      this.server.cancel();
    } else if (this.waitingSince > 0 && this.pool.cancelWait(this)) {
      this.failBlocked(new PgError('ERROR', SQLSTATE.QUERY_CANCELED, 'canceling statement due to user request'));
    }
  }

  close(): void {
    if (this.state === 'closed') return;
    this.flush();
    this.socket.end();
    this.onClientClosed();
  }

  private onClientClosed(): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.pool.cancelWait(this);
    if (this.listens.size) this.svc.listener(this.database, this.user).unlisten(this, null);
    const s = this.server;
    if (s) {
      this.server = null;
      s.owner = null;
      if (this.pendingCount > 0 || s.busyInternal) {
        // Mid-query: Postgres rolls back when the connection goes; tell it to stop first.
        s.cancel();
        s.destroy();
      } else {
        if (this.pins.size > 0) s.needsReset = true;
        if (this.touched || this.divergent || this.txnStatus !== 'I') s.applied = null;
        if (this.txnStatus !== 'I') {
          s.state = 'resetting';
          s.runInternal(['ROLLBACK']).then((r) => {
            if (r.error) s.destroy();
            else this.pool.release(s);
          }, () => undefined);
        } else {
          this.pool.release(s);
        }
      }
    }
    this.pool.clients--;
    this.svc.sessionClosed(this);
    if (!this.socket.destroyed) this.socket.destroySoon();
  }

  private count(kind: string): void {
    const m = this.svc.counters.errors;
    m.set(kind, (m.get(kind) ?? 0) + 1);
  }

  /** For SHOW CLIENTS. */
  get stateLabel(): string {
    if (this.waitingSince > 0) return 'waiting';
    return this.server ? 'active' : 'idle';
  }
}

function parseMessage(def: StmtDef): Buffer {
  if (def.parseMsg) return def.parseMsg;
  const nameLen = Buffer.byteLength(def.serverName);
  const out = Buffer.allocUnsafe(5 + nameLen + 1 + def.rest.length);
  out[0] = T.Parse;
  out.writeInt32BE(out.length - 1, 1);
  out.write(def.serverName, 5, 'latin1');
  out[5 + nameLen] = 0;
  def.rest.copy(out, 6 + nameLen);
  def.parseMsg = out;
  return out;
}

