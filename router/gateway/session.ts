/**
 * One client of the gateway after authentication: picks the pooler of the
 * shard (primary, or a replica when asked), relays messages both ways, and at
 * idle points (no transaction open, nothing in flight) follows the shard's
 * primary when it moves. While the shard has no serving primary, the client's
 * next query waits (buffering) instead of failing. A session caught mid-work
 * on a primary the cluster has replaced is ended at once with what the client
 * needs to know (see leaveReplacedPrimary). With read-only routing on, a
 * transaction that begins READ ONLY runs on a replica.
 */
import net from 'node:net';
import { counter, histogram } from '../../common/metrics.ts';
import { PgError, SQLSTATE } from '../protocol/errors.ts';
import { DEFAULT_MAX_MESSAGE, MessageScanner, type MessageSink } from '../protocol/frames.ts';
import { backendKeyData, encodeCancel, encodeErrorFields, errorFieldsAt, errorResponse, parameterStatus, PORTABLE_PARAM, readyForQuery, SESSION_STATE_PARAM, T } from '../protocol/messages.ts';
import { inEvent, keep, OutBatch, ReadThrottle, requestFlush, type Flushable } from '../protocol/output.ts';
import { Upstream } from '../protocol/upstream.ts';
import { databaseDdl, type DatabaseDdl } from './database-ddl.ts';
import type { Discovery, Endpoint, PrimaryMove } from './discovery.ts';

export type Target = 'primary' | 'replica';
/** What a session was doing on a replaced primary when it was ended. */
export type FailoverOutcome = 'in_flight' | 'in_transaction';

const buffered = counter('mg_gateway_buffered_queries_total', 'Queries that waited for a shard primary');
const bufferWait = histogram('mg_gateway_buffer_wait_seconds', 'Time queries waited for a shard primary', [], [0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30]);
const sessionErrors = counter('mg_gateway_session_errors_total', 'Errors the gateway reported to clients', ['sqlstate']);
const switches = counter('mg_gateway_upstream_switches_total', 'Times a session moved to another pooler (primary change, reconnect, read-only routing)');
const linksReleased = counter('mg_gateway_idle_links_released_total', 'Pooler connections closed under idle sessions (reopened at their next query)');
const failedOver = counter('mg_gateway_sessions_failed_over_total', 'Sessions ended because their shard primary was replaced while they were mid-work on it, by what they were doing', ['outcome']);
export const readOnlyRouted = counter('mg_gateway_read_only_transactions_routed_total', 'READ ONLY transactions sent to a replica, by outcome', ['outcome']);

const TARGET_SET = /^\s*set\s+(?:session\s+)?mg\.target\s*(?:=|to)\s*'?(primary|replica)'?\s*;?\s*$/i;
/** BEGIN / START TRANSACTION whose first statement asks for READ ONLY (not READ WRITE). */
export const READ_ONLY_BEGIN = /^\s*(?:begin|start\s+transaction)\b[^;]*\bread\s+only\b/i;
/** Messages of an extended-protocol batch, which ends with Sync. */
const EXTENDED = new Set<number>([T.Parse, T.Bind, T.Describe, T.Execute, T.Close, T.Flush]);

export interface SessionOptions {
  discovery: Discovery;
  bufferWindowMs: number;
  key: { pid: number; secret: number };
  /** Send transactions that begin READ ONLY to a replica (the primary when none is usable). */
  readOnlyToReplicas?: boolean;
  /** Keeps the topology's databases in step with CREATE / DROP DATABASE run through the session. */
  databases?: DatabaseRegistry;
  /** Told once the session is idle again after DDL completed (the REST schema cache reloads). */
  onSchemaChange?: (database: string) => void;
}

/** Command tags of statements that may change what the REST API's schema cache holds. */
const SCHEMA_TAGS = ['CREATE ', 'ALTER ', 'DROP ', 'COMMENT', 'GRANT', 'REVOKE'].map((t) => Buffer.from(t));
const SCHEMA_TAG_FIRST_BYTES = new Set(SCHEMA_TAGS.map((t) => t[0]));

/** Whether a CommandComplete (at `start`) is DDL's, without decoding the tag of every statement. */
function changesSchema(buf: Buffer, start: number, len: number): boolean {
  const tag = start + 5;
  if (!SCHEMA_TAG_FIRST_BYTES.has(buf[tag])) return false;
  return SCHEMA_TAGS.some((t) => t.length <= len - 5 && buf.compare(t, 0, t.length, tag, tag + t.length) === 0);
}

/** What the gateway does around a CREATE / DROP DATABASE that a session (connected to `from`) runs. */
export interface DatabaseRegistry {
  /** An error when the statement must not run through the gateway. */
  refuse(ddl: DatabaseDdl, from: string): PgError | undefined;
  /** After Postgres did it: the topology says so, and this gateway's view has it. */
  record(ddl: DatabaseDdl, from: string): Promise<void>;
}

let links = 0;
/** Pooler connections open in this process (each is a file descriptor). */
export const openLinks = () => links;

/** A connection to one pooler, and the session settings it holds. */
interface Link {
  up: Upstream;
  ep: Endpoint;
  target: Target;
  /** The committed settings the pooler last reported for this session on this link. */
  state: string;
  /** The pooler sent a FATAL on it: it is about to close, and the client has heard why. */
  endedWithFatal?: boolean;
}

export class GatewaySession implements Flushable {
  readonly database: string;
  /** Where the session's transactions go: set by `db@replica` or SET mg.target. */
  target: Target;
  /** Where the current (or next) transaction goes: the target, or a replica for a READ ONLY one. */
  private txTarget: Target;
  private link: Link | undefined;
  /** With read-only routing: the other target's link, idle, kept for the next switch. */
  private parked: Link | undefined;
  private readonly fromClient = new MessageScanner(DEFAULT_MAX_MESSAGE);
  /** What this socket event relays each way; written once when the event's handler returns. */
  private readonly toServer = new OutBatch();
  private readonly toClient = new OutBatch();
  /** A client slower than its results stops the link's reads (the gateway holds a bounded part of any result). */
  private readonly throttle: ReadThrottle;
  flushQueued = false;
  private readonly clientSink: MessageSink = { onMessage: (buf, start, len) => this.onClientMessage(buf, start, len) };
  /** Transaction status from the last ReadyForQuery. */
  private status: 'I' | 'T' | 'E' = 'I';
  /** Queries, Syncs and function calls sent whose ReadyForQuery has not come back: the session may move only at 0. */
  private inflight = 0;
  /** An extended-protocol batch (Parse, Bind, ...) has begun and its Sync has not been sent yet. */
  private inBatch = false;
  /** Client messages held while an upstream is being (re)connected. */
  private held: Buffer[] = [];
  private connecting: Promise<void> | undefined;
  private ended = false;
  private shardName: string | undefined;
  /** The session's committed settings as its pooler last reported them ('' until then); handed to the next pooler on a move. */
  private sessionState = '';
  /** Whether the pooler last said the session holds nothing that cannot move (see PORTABLE_PARAM). */
  private portable = true;
  /** When the session last became idle (performance.now()), or 0 while busy. */
  private idleSince = performance.now();
  /** A CREATE / DROP DATABASE sent, and whether Postgres said it completed. */
  private ddl: { ddl: DatabaseDdl; completed: boolean } | undefined;
  /** DDL completed since the session was last idle (onSchemaChange is told once it is). */
  private schemaChanged = false;
  /** Replies held from the client until the topology records a completed CREATE / DROP DATABASE. */
  private repliesHeld: Buffer[] | undefined;
  /** Set when the session's database is going away: the session ends at its next idle point, with this. */
  private endAtIdle: PgError | undefined;

  constructor(private readonly socket: net.Socket, readonly params: Record<string, string>, private readonly opts: SessionOptions) {
    const [database, suffix] = (params.database ?? params.user).split('@');
    this.database = database;
    this.target = suffix === 'replica' ? 'replica' : 'primary';
    this.txTarget = this.target;
    this.throttle = new ReadThrottle(socket);
  }

  /** Connects upstream and tells the client it is ready; throws PgError when it cannot. */
  async start(pending: Buffer): Promise<void> {
    if (!this.opts.discovery.hasDatabase(this.database)) {
      throw new PgError('FATAL', SQLSTATE.INVALID_CATALOG_NAME, `database "${this.database}" does not exist`);
    }
    this.link = await this.connect(this.target, await this.pickEndpoint(this.target));
    const greeting = [...this.link.up.parameters].map(([k, v]) => parameterStatus(k, v));
    this.socket.write(Buffer.concat([...greeting, backendKeyData(this.opts.key.pid, this.opts.key.secret), readyForQuery('I')]));
    this.socket.on('data', (chunk: Buffer) => inEvent(this.onClientData, chunk));
    this.socket.on('close', () => this.end());
    this.socket.on('error', () => this.end());
    if (pending.length) inEvent(this.onClientData, pending);
  }

  /** Forwards a cancel request to the pooler the session is using now. */
  cancel(): void {
    const link = this.link;
    if (!link) return;
    const s = net.connect({ host: link.ep.host, port: link.ep.port }, () => s.end(encodeCancel(link.up.pid, link.up.secret)));
    s.on('error', () => s.destroy());
  }

  /**
   * Closes the pooler connection of a session idle for at least `afterMs` that
   * holds nothing that cannot move; its next query reconnects, with its
   * settings. Idle clients then cost the gateway one descriptor and the pooler none.
   */
  releaseIdleLink(now: number, afterMs: number): boolean {
    if (!this.link || !this.portable || this.idleSince === 0 || now - this.idleSince < afterMs || this.connecting || this.held.length) return false;
    this.link.up.end();
    this.link = undefined;
    this.parked?.up.end();
    this.parked = undefined;
    linksReleased.inc();
    return true;
  }

  /**
   * The shard's primary moved to `move.to` under a newer term. A session whose
   * link to the old primary is mid-work would wait on it forever (a partitioned
   * or frozen primary never answers) and could not trust an answer anyway, so
   * it is ended now: a statement in flight with 08007 (it may or may not have
   * committed there), an open transaction with 57P01 (it did not commit), as
   * FATAL, the way Postgres ends a backend. Idle sessions are left alone: they
   * move at their next query. Returns what the ended session was doing.
   */
  leaveReplacedPrimary(move: PrimaryMove): FailoverOutcome | undefined {
    if (this.ended || this.opts.discovery.group(this.database) !== move.database || this.shardName !== move.shard) return undefined;
    if (this.parked?.target === 'primary' && this.parked.ep.instanceId !== move.to) {
      this.parked.up.destroy(); // idle on the old primary, and never usable again
      this.parked = undefined;
    }
    const link = this.link;
    // Replica links are not affected; a session already moving has its messages held for the new link.
    if (!link || link.target !== 'primary' || link.ep.instanceId === move.to || this.connecting) return undefined;
    const where = `${move.database}/${move.shard}`;
    let err: PgError;
    let outcome: FailoverOutcome;
    if (this.inflight > 0 || this.inBatch) {
      outcome = 'in_flight';
      err = new PgError('FATAL', SQLSTATE.TRANSACTION_RESOLUTION_UNKNOWN,
        `the primary of ${where} was replaced (term ${move.term}) while a statement was in flight: it may or may not have committed`,
        `${link.ep.instanceId} is no longer the primary; ${move.to} is.`, 'Reconnect, check whether the statement took effect, then retry it.');
    } else if (this.status !== 'I') {
      outcome = 'in_transaction';
      err = new PgError('FATAL', SQLSTATE.ADMIN_SHUTDOWN,
        `terminating connection because the primary of ${where} was replaced (term ${move.term}): the open transaction did not commit`,
        `${link.ep.instanceId} is no longer the primary; ${move.to} is.`, 'Reconnect and run the transaction again.');
    } else {
      return undefined;
    }
    // Its protocol state is unknown and its pooler may never answer: drop it rather than say goodbye.
    link.up.destroy();
    failedOver.inc({ outcome });
    this.fail(err);
    return outcome;
  }

  /**
   * The session's database was dropped or deactivated: an idle session ends
   * now, a busy one when its transaction is over (drain), the way Postgres
   * ends a backend (57P01, FATAL).
   */
  leaveDatabase(err: PgError): void {
    if (this.ended) return;
    this.endAtIdle = err;
    if (this.status === 'I' && this.inflight === 0 && !this.inBatch && !this.connecting) this.fail(err);
  }

  end(): void {
    if (this.ended) return;
    this.ended = true;
    this.link?.up.end();
    this.parked?.up.end();
    this.socket.destroy();
  }

  /** The database's only shard (looked up once: the shard set changes only by resharding). */
  private shard(): string {
    if (this.shardName !== undefined) return this.shardName;
    const shards = this.opts.discovery.shards(this.database);
    if (shards.length !== 1) {
      throw new PgError('FATAL', SQLSTATE.FEATURE_NOT_SUPPORTED, `database "${this.database}" has ${shards.length} shards; sharded routing is not supported yet`);
    }
    return (this.shardName = shards[0].shard);
  }

  /** A pooler for the target, waiting for a primary up to the buffer window. */
  private async pickEndpoint(target: Target): Promise<Endpoint> {
    const shard = this.shard();
    const d = this.opts.discovery;
    if (target === 'replica') {
      const replicas = d.replicas(this.database, shard);
      if (replicas.length) return replicas[Math.floor(Math.random() * replicas.length)];
      throw new PgError('ERROR', SQLSTATE.CANNOT_CONNECT_NOW, `no healthy replica of ${this.database}/${shard} within the lag threshold`);
    }
    const now = d.primary(this.database, shard);
    if (now) return now;
    buffered.inc();
    const end = bufferWait.startTimer();
    const ep = await d.waitForPrimary(this.database, shard, this.opts.bufferWindowMs);
    end();
    if (!ep) {
      throw new PgError('ERROR', SQLSTATE.CANNOT_CONNECT_NOW, `no serving primary for ${this.database}/${shard} after waiting ${this.opts.bufferWindowMs} ms`);
    }
    return ep;
  }

  private async connect(target: Target, ep: Endpoint): Promise<Link> {
    const params = { ...this.params, database: this.database, [SESSION_STATE_PARAM]: this.sessionState };
    const up = await Upstream.connect({ host: ep.host, port: ep.port, params, ownReads: true });
    links++;
    up.socket.once('close', () => links--);
    const link: Link = { up, ep, target, state: this.sessionState };
    up.handle({ onMessage: (buf, start, len) => this.onServerMessage(link, buf, start, len) }, () => this.onUpstreamClosed(link));
    return link;
  }

  private readonly onClientData = (chunk: Buffer): void => {
    try {
      this.fromClient.push(chunk, this.clientSink);
    } catch (err) {
      this.fail(err);
    }
  };

  private onClientMessage(buf: Buffer, start: number, len: number): void {
    const type = buf[start];
    if (type === T.Terminate) return this.end();
    const idle = this.status === 'I' && this.inflight === 0 && !this.inBatch;
    this.idleSince = 0;
    if (type === T.Query || type === T.FunctionCall) this.inflight++;
    else if (type === T.Sync) {
      this.inflight++;
      this.inBatch = false;
    } else if (EXTENDED.has(type)) this.inBatch = true;
    if (idle) {
      this.txTarget = this.target;
      if (type === T.Query) {
        const sql = buf.toString('utf8', start + 5, start + len - 1);
        const refused = this.watchDatabaseDdl(sql);
        if (refused) {
          this.inflight--;
          this.sendError(refused);
          this.socket.write(readyForQuery('I'));
          return;
        }
        this.routeQuery(sql);
      }
    }
    if (this.connecting || this.held.length) {
      this.held.push(keep(buf, start, start + len));
      return;
    }
    if (idle && !this.usable(this.link, this.txTarget)) {
      this.held.push(keep(buf, start, start + len));
      this.reroute();
      return;
    }
    this.toServer.range(buf, start, start + len);
    requestFlush(this);
  }

  /** At an idle point: notes a CREATE / DROP DATABASE to record once it completes, or says why it may not run. */
  private watchDatabaseDdl(sql: string): PgError | undefined {
    const registry = this.opts.databases;
    const ddl = registry && databaseDdl(sql);
    if (!ddl) return undefined;
    const refused = registry.refuse(ddl, this.database);
    if (!refused) this.ddl = { ddl, completed: false };
    return refused;
  }

  /** At an idle point: a query may change the session's target, or begin a READ ONLY transaction. */
  private routeQuery(sql: string): void {
    const set = TARGET_SET.exec(sql);
    if (set) this.txTarget = this.target = set[1].toLowerCase() as Target;
    else if (this.opts.readOnlyToReplicas && this.target === 'primary' && READ_ONLY_BEGIN.test(sql)) this.txTarget = 'replica';
  }

  flush(): void {
    const up = this.link?.up;
    if (up && !up.closed) this.toServer.writeTo(up.socket);
    else this.toServer.clear();
    this.toClient.writeTo(this.socket);
    if (up && !up.closed) this.throttle.check([up.socket]);
  }

  /**
   * May the transaction go over this link? Not if it is gone, serves another
   * target, or the target is the primary and the shard's serving primary is
   * elsewhere or missing (then we buffer).
   */
  private usable(link: Link | undefined, target: Target): link is Link {
    if (!link || link.up.closed || link.target !== target) return false;
    if (target === 'replica') return this.opts.discovery.replicaUsable(link.ep.instanceId);
    return this.opts.discovery.primary(this.database, this.shard())?.instanceId === link.ep.instanceId;
  }

  /** Moves to a link for txTarget (the parked one if it still fits), then sends the held messages. */
  private reroute(): void {
    this.connecting = this.switchLink()
      .then(() => {
        const held = this.held;
        this.held = [];
        this.connecting = undefined;
        for (const raw of held) this.link!.up.write(raw);
      })
      .catch((err) => {
        this.connecting = undefined;
        this.ddl = undefined;
        this.held = [];
        this.inflight = 0;
        this.inBatch = false;
        this.sendError(err);
        this.socket.write(readyForQuery('I'));
      });
  }

  private async switchLink(): Promise<void> {
    const target = this.txTarget;
    const parked = this.parked;
    let next: Link;
    if (this.usable(parked, target) && parked.state === this.sessionState) {
      this.parked = undefined;
      next = parked;
    } else {
      const readOnlyFallback = this.opts.readOnlyToReplicas && target === 'replica' && this.target === 'primary';
      let ep: Endpoint;
      try {
        ep = await this.pickEndpoint(target);
      } catch (err) {
        if (!readOnlyFallback) throw err;
        readOnlyRouted.inc({ outcome: 'no_replica' });
        this.txTarget = 'primary';
        if (this.usable(this.link, 'primary')) return;
        ep = await this.pickEndpoint('primary');
      }
      next = await this.connect(this.txTarget, ep);
      switches.inc();
    }
    if (next.target === 'replica' && this.target === 'primary') readOnlyRouted.inc({ outcome: 'replica' });
    const previous = this.link;
    this.link = next;
    if (previous && !previous.up.closed && this.opts.readOnlyToReplicas && previous.target !== next.target) {
      this.parked?.up.end();
      this.parked = previous;
    } else {
      previous?.up.end();
    }
  }

  private onServerMessage(link: Link, buf: Buffer, start: number, len: number): void {
    if (link !== this.link) return; // a parked link is idle; what it says (a shutdown notice) is not for the client now
    const type = buf[start];
    if (type === T.ReadyForQuery) {
      this.status = String.fromCharCode(buf[start + 5]) as 'I' | 'T' | 'E';
      if (this.inflight > 0) this.inflight--;
      if (this.status === 'I' && this.inflight === 0 && !this.inBatch) this.idleSince = performance.now();
      if (this.schemaChanged && this.status === 'I') {
        this.schemaChanged = false;
        this.opts.onSchemaChange?.(this.database);
      }
    } else if (type === T.CommandComplete) {
      if (this.opts.onSchemaChange && changesSchema(buf, start, len)) this.schemaChanged = true;
    } else if (type === T.ErrorResponse && errorFieldsAt(buf, start, len).S === 'FATAL') {
      // The pooler ends the link: its backend was terminated, or it is shutting down. An idle session
      // that holds nothing there goes on unaware (its next query reconnects); any other lost its
      // transaction or session state with it, and ends with the FATAL as Postgres would end it (0048).
      if (this.status === 'I' && this.inflight === 0 && !this.inBatch && this.portable) return;
      link.endedWithFatal = true;
    } else if (type === T.ParameterStatus && isReport(buf, start, SESSION_STATE_BYTES)) {
      this.sessionState = link.state = reportValue(buf, start, len, SESSION_STATE_BYTES);
      return;
    } else if (type === T.ParameterStatus && isReport(buf, start, PORTABLE_BYTES)) {
      this.portable = reportValue(buf, start, len, PORTABLE_BYTES) === 'on';
      return;
    }
    if (this.ddl && this.holdForDdl(type, buf, start, len)) return;
    if (this.repliesHeld) {
      this.repliesHeld.push(Buffer.from(buf.subarray(start, start + len)));
      return;
    }
    this.toClient.range(buf, start, start + len);
    requestFlush(this);
    if (this.endAtIdle && type === T.ReadyForQuery && this.idleSince !== 0) {
      this.flush();
      this.fail(this.endAtIdle);
    }
  }

  /**
   * Follows the reply to a CREATE / DROP DATABASE: once it completed, its
   * ReadyForQuery (and anything after) waits until the topology records it, so
   * the client's next connection to that database finds it (or 3D000).
   */
  private holdForDdl(type: number, buf: Buffer, start: number, len: number): boolean {
    const watched = this.ddl!;
    if (type === T.CommandComplete) {
      watched.completed = buf.toString('utf8', start + 5, start + len - 1) === (watched.ddl.op === 'create' ? 'CREATE DATABASE' : 'DROP DATABASE');
      return false;
    }
    if (type !== T.ReadyForQuery) return false;
    this.ddl = undefined;
    if (!watched.completed) return false;
    this.repliesHeld = [Buffer.from(buf.subarray(start, start + len))];
    void this.opts.databases!.record(watched.ddl, this.database)
      .catch((err) => this.socket.write(encodeErrorFields('N', {
        S: 'WARNING', V: 'WARNING', C: SQLSTATE.CONNECTION_FAILURE,
        M: `database "${watched.ddl.name}": ${watched.ddl.op === 'create' ? 'created' : 'dropped'} in Postgres, but the topology could not record it: ${(err as Error).message}`,
      })))
      .finally(() => {
        const held = this.repliesHeld!;
        this.repliesHeld = undefined;
        if (!this.ended) this.socket.write(Buffer.concat(held));
      });
    return true;
  }

  private onUpstreamClosed(link: Link): void {
    if (link === this.parked) this.parked = undefined;
    if (link !== this.link || this.ended) return;
    // Idle: the next query reconnects (buffering if the primary is gone). Mid-transaction:
    // the pooler has told the client why (Postgres's own error); the transaction is lost.
    if (this.status !== 'I' || this.inflight > 0 || link.endedWithFatal) {
      // A FATAL the pooler passed on (a terminated backend, say) already told the client why.
      if (link.endedWithFatal) this.flush();
      else this.sendError(new PgError('FATAL', SQLSTATE.CONNECTION_FAILURE, 'lost the connection to the shard in the middle of a transaction'));
      this.end();
    }
  }

  private sendError(err: unknown): void {
    const e = err instanceof PgError ? err : new PgError('ERROR', SQLSTATE.CONNECTION_FAILURE, (err as Error).message);
    sessionErrors.inc({ sqlstate: e.code });
    this.socket.write(errorResponse(e));
  }

  private fail(err: unknown): void {
    this.sendError(err instanceof PgError ? new PgError('FATAL', err.code, err.message, err.detail, err.hint) : err);
    this.end();
  }
}

const SESSION_STATE_BYTES = Buffer.from(SESSION_STATE_PARAM);
const PORTABLE_BYTES = Buffer.from(PORTABLE_PARAM);
/** Is this ParameterStatus the pooler's report named `name` (name + NUL)? */
function isReport(buf: Buffer, start: number, name: Buffer): boolean {
  const at = start + 5;
  return buf[at + name.length] === 0 && name.equals(buf.subarray(at, at + name.length));
}
const reportValue = (buf: Buffer, start: number, len: number, name: Buffer) => buf.toString('utf8', start + 5 + name.length + 1, start + len - 1);
