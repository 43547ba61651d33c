/**
 * One server connection from the pooler to its Postgres: raw relay of frames to
 * whichever client owns it, plus what the pooler knows about its session state
 * (settings applied, pooler-named prepared statements, who owns the unnamed
 * statement, whether it needs a DISCARD ALL before the next client).
 */
import net from 'node:net';
import type { Logger } from '../../common/log.ts';
import { PgError, SQLSTATE } from '../protocol/errors.ts';
import type { MessageSink } from '../protocol/frames.ts';
import { encodeCancel, encodeQuery, errorFieldsAt, pgErrorFromFields, T } from '../protocol/messages.ts';
import { OutBatch, requestFlush } from '../protocol/output.ts';
import { Upstream } from '../protocol/upstream.ts';
import { intern, Settings } from './settings.ts';

/** Who receives a server connection's frames while it is checked out. */
export interface ServerOwner {
  onServerMessage(buf: Buffer, start: number, len: number): void;
  onServerLost(server: ServerConn, fatal: PgError): void;
  onServerDrain(): void;
}

export interface InternalResult {
  rows: Array<Array<string | null>>;
  error?: PgError;
}

interface InternalOp {
  remaining: number;
  rows: Array<Array<string | null>>;
  error?: PgError;
  resolve: (r: InternalResult) => void;
  reject: (e: Error) => void;
}

export type ServerState = 'idle' | 'active' | 'resetting' | 'closed';

let nextId = 1;
const HIGH_WATER = 1024 * 1024;

/**
 * One clock for the whole pooler: when a statement was prepared on a server connection is
 * compared with when a client parsed it (a copy made before the client's Parse may be planned
 * against a schema since changed), and it orders statements for LRU.
 */
let clock = 0;
export const tick = (): number => ++clock;

export class ServerConn implements MessageSink {
  readonly id = nextId++;
  readonly socket: net.Socket;
  readonly pid: number;
  readonly secret: number;
  readonly params: Map<string, string>;
  readonly createdAt = Date.now();
  lastUsed = Date.now();
  /** Settings established on this connection; null when unknown (then reset before use). */
  applied: Settings | null = Settings.EMPTY;
  /** Pooler-named prepared statements present on this connection: when each was prepared, and last used (LRU). */
  readonly prepared = new Map<string, { at: number; used: number }>();
  /** The client statement definition the server's unnamed statement currently holds. */
  unnamedOwner: object | null = null;
  /** Session state beyond settings may be left (pinned, or unknown): DISCARD ALL before reuse. */
  needsReset = false;
  /** Close instead of reusing (lifetime reached, pool shrinking, shutdown). */
  retire = false;
  owner: ServerOwner | null = null;
  state: ServerState = 'idle';
  /** Label for admin output: the client using it. */
  ownerLabel = '';
  /** A FATAL error the server sent (it closes right after). */
  fatal?: PgError;
  private internal: InternalOp | null = null;
  private paramsKeyCache: string | null = null;
  private readonly out = new OutBatch();
  flushQueued = false;
  private onClosedCb: (s: ServerConn) => void = () => undefined;
  closed = false;
  /** CancelRequests for this backend whose connection to Postgres is still open. */
  private cancelsInFlight = 0;
  /** What runs once the last of them is done (a release waiting for it). */
  private afterCancels: (() => void) | null = null;

  private constructor(private readonly up: Upstream, private readonly log: Logger, private readonly target: { host: string; port: number }) {
    this.socket = up.socket;
    this.pid = up.pid;
    this.secret = up.secret;
    this.params = new Map(up.parameters);
    this.socket.on('drain', () => this.owner?.onServerDrain());
    this.socket.setKeepAlive(true, 30_000);
    up.handle(this, (err) => this.onClose(err));
  }

  static async connect(opts: { host: string; port: number; user: string; database: string; timeoutMs: number; log: Logger }): Promise<ServerConn> {
    const up = await Upstream.connect({
      host: opts.host, port: opts.port, params: { user: opts.user, database: opts.database }, connectTimeoutMs: opts.timeoutMs, ownReads: true,
    });
    return new ServerConn(up, opts.log, { host: opts.host, port: opts.port });
  }

  onClosed(cb: (s: ServerConn) => void): void {
    this.onClosedCb = cb;
  }

  /** ParameterStatus values as one string, to tell cheaply whether a client has seen them all. */
  get paramsKey(): string {
    if (this.paramsKeyCache === null) {
      let k = '';
      for (const [n, v] of this.params) k += `${n}\u0001${v}\u0002`;
      this.paramsKeyCache = intern(k);
    }
    return this.paramsKeyCache;
  }

  /** When `name` was prepared here (a tick), marking it used; undefined when it is not here. */
  preparedAt(name: string): number | undefined {
    const p = this.prepared.get(name);
    if (p) p.used = tick();
    return p?.at;
  }

  addPrepared(name: string): void {
    const now = tick();
    this.prepared.set(name, { at: now, used: now });
  }

  /** Least recently used statements beyond `max`, to close before the next client uses the connection. */
  evictable(max: number): string[] {
    if (this.prepared.size <= max) return [];
    const byAge = [...this.prepared.entries()].sort((a, b) => a[1].used - b[1].used);
    return byAge.slice(0, this.prepared.size - max).map(([n]) => n);
  }

  write(buf: Buffer): void {
    this.out.add(buf);
    this.scheduleFlush();
  }

  writeRange(buf: Buffer, start: number, end: number): void {
    this.out.range(buf, start, end);
    this.scheduleFlush();
  }

  private scheduleFlush(): void {
    requestFlush(this);
  }

  flush(): void {
    if (this.closed) {
      this.out.clear();
      return;
    }
    this.out.writeTo(this.socket);
  }

  /** True when the socket has more queued than we like (the owner should stop reading its client). */
  get congested(): boolean {
    return this.socket.writableLength > HIGH_WATER;
  }

  /**
   * Runs simple queries for the pooler itself (settings, DISCARD ALL, reads of
   * current values), one Query message each, pipelined; resolves after the last
   * ReadyForQuery with the rows and the first error, rejects if the connection dies.
   */
  runInternal(queries: string[]): Promise<InternalResult> {
    if (this.closed) return Promise.reject(this.fatal ?? new PgError('ERROR', SQLSTATE.CONNECTION_FAILURE, 'server connection closed'));
    if (this.internal) return Promise.reject(new Error('internal query already running'));
    this.unnamedOwner = null; // a simple Query drops the unnamed statement
    return new Promise((resolve, reject) => {
      this.internal = { remaining: queries.length, rows: [], resolve, reject };
      for (const q of queries) this.out.add(encodeQuery(q));
      this.flush();
    });
  }

  get busyInternal(): boolean {
    return this.internal !== null;
  }

  /** Asks Postgres to cancel whatever this backend runs (a separate connection, as the protocol wants). */
  cancel(): void {
    this.cancelsInFlight++;
    const s = net.connect({ host: this.target.host, port: this.target.port });
    s.on('error', () => undefined);
    s.on('connect', () => s.end(encodeCancel(this.pid, this.secret)));
    s.setTimeout(5_000, () => s.destroy());
    // Postgres closes the connection once it has signalled the backend.
    s.on('close', () => {
      if (--this.cancelsInFlight > 0 || !this.afterCancels) return;
      const then = this.afterCancels;
      this.afterCancels = null;
      then();
    });
  }

  /**
   * Whether a CancelRequest for this backend is still on its way; if so, `then` runs once it is done.
   * A cancel that arrives after its query ended would cancel whatever the backend runs next: another
   * client's statement, were the connection handed on (PgBouncer holds it the same way).
   */
  beingCanceled(then: () => void): boolean {
    if (this.cancelsInFlight === 0) return false;
    this.afterCancels = then;
    return true;
  }

  /** Released, and waiting for a cancel to be done before it serves anyone (SHOW POOLS' sv_being_canceled). */
  get waitsForCancel(): boolean {
    return this.afterCancels !== null;
  }

  /** Polite close (Terminate). */
  close(): void {
    if (this.closed) return;
    this.flush();
    this.up.end();
  }

  destroy(): void {
    this.up.destroy();
  }

  onMessage(buf: Buffer, start: number, len: number): void {
    const type = buf[start];
    if (type === T.ParameterStatus) {
      const nul = buf.indexOf(0, start + 5);
      if (nul > 0) {
        this.params.set(buf.toString('utf8', start + 5, nul), buf.toString('utf8', nul + 1, start + len - 1));
        this.paramsKeyCache = null;
      }
    } else if (type === T.ErrorResponse) {
      const f = errorFieldsAt(buf, start, len);
      const sev = f.V ?? f.S;
      if (sev === 'FATAL' || sev === 'PANIC') {
        this.fatal = pgErrorFromFields(f);
        // Postgres closes right after; nothing more is going to be relayed.
        return;
      }
    }
    if (type === T.Notification && this.owner) {
      this.owner.onServerMessage(buf, start, len);
      return;
    }
    const op = this.internal;
    if (op) {
      if (type === T.DataRow) op.rows.push(decodeDataRow(buf, start, len));
      else if (type === T.ErrorResponse) op.error ??= pgErrorFromFields(errorFieldsAt(buf, start, len), SQLSTATE.INTERNAL_ERROR);
      else if (type === T.ReadyForQuery && --op.remaining === 0) {
        this.internal = null;
        op.resolve({ rows: op.rows, error: op.error });
      }
      return;
    }
    if (this.owner) {
      this.owner.onServerMessage(buf, start, len);
      return;
    }
    // Idle: ParameterStatus was recorded above; notices and stray notifications have no one to go to.
    if (type !== T.ParameterStatus && type !== T.NoticeResponse && type !== T.Notification) {
      this.log.warn({ server: this.id, type: String.fromCharCode(type) }, 'unexpected message on an idle server connection; closing it');
      this.destroy();
    }
  }

  private onClose(err?: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.state = 'closed';
    if (err instanceof PgError && !this.fatal) {
      // The framing failed (Upstream destroyed the socket): nothing after it can be trusted.
      this.log.error({ err, server: this.id }, 'server sent malformed data; closing it');
      this.fatal = new PgError('ERROR', SQLSTATE.PROTOCOL_VIOLATION, `server connection sent malformed data: ${err.message}`);
    }
    const fatal = this.fatal ?? new PgError('ERROR', SQLSTATE.CONNECTION_FAILURE,
      `server connection to Postgres lost${err ? `: ${err.message}` : ''}`);
    const op = this.internal;
    this.internal = null;
    op?.reject(fatal);
    const owner = this.owner;
    this.owner = null;
    owner?.onServerLost(this, fatal);
    this.onClosedCb(this);
  }
}

export function decodeDataRow(buf: Buffer, start: number, len: number): Array<string | null> {
  const n = buf.readInt16BE(start + 5);
  const out: Array<string | null> = [];
  let at = start + 7;
  const end = start + len;
  for (let i = 0; i < n && at + 4 <= end; i++) {
    const l = buf.readInt32BE(at);
    at += 4;
    if (l < 0) out.push(null);
    else {
      out.push(buf.toString('utf8', at, at + l));
      at += l;
    }
  }
  return out;
}
