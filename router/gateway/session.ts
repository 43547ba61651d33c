/**
 * One client of the gateway after authentication: picks the pooler of the
 * shard (primary, or a replica when asked), relays frames both ways, and at
 * transaction boundaries follows the shard's primary when it moves. While the
 * shard has no serving primary, the client's next query waits (buffering)
 * instead of failing.
 */
import net from 'node:net';
import { counter, histogram } from '../../common/metrics.ts';
import { PgError, SQLSTATE } from '../protocol/errors.ts';
import { DEFAULT_MAX_MESSAGE, MessageScanner, type MessageSink } from '../protocol/frames.ts';
import { backendKeyData, encodeCancel, errorResponse, parameterStatus, readyForQuery, SESSION_STATE_PARAM, T } from '../protocol/messages.ts';
import { inEvent, OutBatch, requestFlush, type Flushable } from '../protocol/output.ts';
import { Upstream } from '../protocol/upstream.ts';
import type { Discovery, Endpoint } from './discovery.ts';

export type Target = 'primary' | 'replica';

const buffered = counter('mg_gateway_buffered_queries_total', 'Queries that waited for a shard primary');
const bufferWait = histogram('mg_gateway_buffer_wait_seconds', 'Time queries waited for a shard primary', [], [0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30]);
const sessionErrors = counter('mg_gateway_session_errors_total', 'Errors the gateway reported to clients', ['sqlstate']);
const switches = counter('mg_gateway_upstream_switches_total', 'Times a session moved to another pooler (primary change, reconnect)');

const TARGET_SET = /^\s*set\s+(?:session\s+)?mg\.target\s*(?:=|to)\s*'?(primary|replica)'?\s*;?\s*$/i;

export interface SessionOptions {
  discovery: Discovery;
  bufferWindowMs: number;
  key: { pid: number; secret: number };
}

export class GatewaySession implements Flushable {
  readonly database: string;
  target: Target;
  private upstream: Upstream | undefined;
  private endpoint: Endpoint | undefined;
  private readonly fromClient = new MessageScanner(DEFAULT_MAX_MESSAGE);
  /** What this socket event relays each way; written once when the event's handler returns. */
  private readonly toServer = new OutBatch();
  private readonly toClient = new OutBatch();
  flushQueued = false;
  private readonly clientSink: MessageSink = { onMessage: (buf, start, len) => this.onClientMessage(buf, start, len) };
  private readonly serverSink: MessageSink = { onMessage: (buf, start, len) => this.onServerMessage(buf, start, len) };
  /** Transaction status from the last ReadyForQuery: only at 'I' may the session move. */
  private status: 'I' | 'T' | 'E' = 'I';
  /** Client frames held while an upstream is being (re)connected. */
  private held: Buffer[] = [];
  private connecting: Promise<void> | undefined;
  private ended = false;
  private shardName: string | undefined;
  /** The session's committed settings as its pooler last reported them ('' until then); handed to the next pooler on a move. */
  private sessionState = '';

  constructor(private readonly socket: net.Socket, readonly params: Record<string, string>, private readonly opts: SessionOptions) {
    const [database, suffix] = (params.database ?? params.user).split('@');
    this.database = database;
    this.target = suffix === 'replica' ? 'replica' : 'primary';
  }

  /** Connects upstream and tells the client it is ready; throws PgError when it cannot. */
  async start(pending: Buffer): Promise<void> {
    if (!this.opts.discovery.hasDatabase(this.database)) {
      throw new PgError('FATAL', SQLSTATE.INVALID_CATALOG_NAME, `database "${this.database}" does not exist`);
    }
    await this.connectUpstream(await this.pickEndpoint());
    const up = this.upstream!;
    const greeting = [...up.parameters].map(([k, v]) => parameterStatus(k, v));
    this.socket.write(Buffer.concat([...greeting, backendKeyData(this.opts.key.pid, this.opts.key.secret), readyForQuery('I')]));
    this.socket.on('data', (chunk: Buffer) => inEvent(this.onClientData, chunk));
    this.socket.on('close', () => this.end());
    this.socket.on('error', () => this.end());
    if (pending.length) inEvent(this.onClientData, pending);
  }

  /** Forwards a cancel request to the pooler the session is using now. */
  cancel(): void {
    const up = this.upstream;
    const ep = this.endpoint;
    if (!up || !ep) return;
    const s = net.connect({ host: ep.host, port: ep.port }, () => s.end(encodeCancel(up.pid, up.secret)));
    s.on('error', () => s.destroy());
  }

  end(): void {
    if (this.ended) return;
    this.ended = true;
    this.upstream?.end();
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

  /** Where the next transaction should go, waiting for a primary up to the buffer window. */
  private async pickEndpoint(): Promise<Endpoint> {
    const shard = this.shard();
    const d = this.opts.discovery;
    if (this.target === 'replica') {
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

  private async connectUpstream(ep: Endpoint): Promise<void> {
    const params = { ...this.params, database: this.database, [SESSION_STATE_PARAM]: this.sessionState };
    const up = await Upstream.connect({ host: ep.host, port: ep.port, params });
    if (this.upstream) switches.inc();
    this.upstream = up;
    this.endpoint = ep;
    up.handle(this.serverSink, () => this.onUpstreamClosed(up));
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
    if (type === T.Query && this.status === 'I') {
      const m = TARGET_SET.exec(buf.toString('utf8', start + 5, start + len - 1));
      if (m) this.target = m[1].toLowerCase() as Target;
    }
    if (this.connecting || this.held.length) {
      this.held.push(buf.subarray(start, start + len));
      return;
    }
    if (this.status === 'I' && !this.routeIsCurrent()) {
      this.held.push(buf.subarray(start, start + len));
      this.reroute();
      return;
    }
    this.toServer.range(buf, start, start + len);
    requestFlush(this);
  }

  flush(): void {
    const up = this.upstream;
    if (up && !up.closed) this.toServer.writeTo(up.socket);
    else this.toServer.clear();
    this.toClient.writeTo(this.socket);
  }

  /**
   * At an idle point: may the next transaction go where the session is
   * connected? Not if the upstream is gone, or the target is the primary and
   * the shard's serving primary is elsewhere or missing (then we buffer).
   */
  private routeIsCurrent(): boolean {
    if (!this.upstream || this.upstream.closed) return false;
    if (this.target === 'replica') return this.endpoint !== undefined && this.opts.discovery.replicaUsable(this.endpoint.instanceId);
    return this.opts.discovery.primary(this.database, this.shard())?.instanceId === this.endpoint?.instanceId;
  }

  /** Connects to where the target is now (waiting for a primary if needed), then sends the held frames. */
  private reroute(): void {
    this.connecting = (async () => {
      const ep = await this.pickEndpoint();
      if (!this.routeIsCurrent() || ep.instanceId !== this.endpoint?.instanceId) {
        this.upstream?.end();
        this.upstream = undefined;
        await this.connectUpstream(ep);
      }
    })()
      .then(() => {
        const held = this.held;
        this.held = [];
        this.connecting = undefined;
        for (const raw of held) this.upstream!.write(raw);
      })
      .catch((err) => {
        this.connecting = undefined;
        this.held = [];
        this.sendError(err);
        this.socket.write(readyForQuery('I'));
      });
  }

  private onServerMessage(buf: Buffer, start: number, len: number): void {
    const type = buf[start];
    if (type === T.ReadyForQuery) this.status = String.fromCharCode(buf[start + 5]) as 'I' | 'T' | 'E';
    else if (type === T.ParameterStatus && isSessionState(buf, start)) {
      const nameEnd = start + 5 + SESSION_STATE_BYTES.length;
      this.sessionState = buf.toString('utf8', nameEnd + 1, start + len - 1);
      return;
    }
    this.toClient.range(buf, start, start + len);
    requestFlush(this);
  }

  private onUpstreamClosed(up: Upstream): void {
    if (up !== this.upstream || this.ended) return;
    // Idle: the next query reconnects (buffering if the primary is gone). Mid-transaction:
    // the pooler has told the client why (Postgres's own error); the transaction is lost.
    if (this.status !== 'I') {
      this.sendError(new PgError('FATAL', SQLSTATE.CONNECTION_FAILURE, 'lost the connection to the shard in the middle of a transaction'));
      this.end();
    }
  }

  private sendError(err: unknown): void {
    const e = err instanceof PgError ? err : new PgError('ERROR', SQLSTATE.CONNECTION_FAILURE, (err as Error).message);
    sessionErrors.inc({ sqlstate: e.code });
    this.socket.write(errorResponse(e));
  }

  private fail(err: unknown): void {
    this.sendError(err instanceof PgError ? new PgError('FATAL', err.code, err.message) : err);
    this.end();
  }
}

const SESSION_STATE_BYTES = Buffer.from(SESSION_STATE_PARAM);
/** Is this ParameterStatus the pooler's report of the session's settings (name + NUL)? */
function isSessionState(buf: Buffer, start: number): boolean {
  const at = start + 5;
  return buf[at + SESSION_STATE_BYTES.length] === 0 && SESSION_STATE_BYTES.equals(buf.subarray(at, at + SESSION_STATE_BYTES.length));
}
