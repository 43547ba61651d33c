/**
 * A connection the proxy opens to a Postgres-speaking server (Postgres itself,
 * or a pooler): startup, authentication, then raw frames in both directions.
 */
import net from 'node:net';
import { PgError, SQLSTATE } from './errors.ts';
import { DEFAULT_MAX_MESSAGE, frameAt, MessageScanner, type MessageSink } from './frames.ts';
import { decodeAuthentication, decodeBackendKey, decodeErrorFields, decodeParameterStatus, encodeStartup, TERMINATE } from './messages.ts';
import { inEvent, ownReads } from './output.ts';

export interface UpstreamOptions {
  host: string;
  port: number;
  /** Startup parameters: user, database, application_name, options, ... */
  params: Record<string, string>;
  connectTimeoutMs?: number;
  /**
   * Read into the process's reused read buffer (output.ts ownReads) instead of 'data' events:
   * the sink's messages are then views valid only during onMessage. Only for owners that copy
   * what they keep (the pooler's server connections, the gateway's unsharded session);
   * sharded sessions keep views of DataRows across reads.
   */
  ownReads?: boolean;
}

export class Upstream {
  /** ParameterStatus values the server reported at startup and since. */
  readonly parameters = new Map<string, string>();
  pid = 0;
  secret = 0;
  private readonly scanner = new MessageScanner(DEFAULT_MAX_MESSAGE);
  private sink: MessageSink = { onMessage: () => undefined };
  private onClose: (err?: Error) => void = () => undefined;
  closed = false;
  private notified = false;

  private constructor(readonly socket: net.Socket, readonly opts: UpstreamOptions) {}

  /** Connects and completes startup (trust authentication only: upstreams are on loopback). */
  static connect(opts: UpstreamOptions): Promise<Upstream> {
    return new Promise((resolve, reject) => {
      let up: Upstream | undefined;
      const socket = net.connect({
        host: opts.host, port: opts.port, noDelay: true,
        ...(opts.ownReads ? { onread: ownReads((buf, end) => up!.feedRange(buf, end)) } : {}),
      });
      up = new Upstream(socket, opts);
      const timer = setTimeout(() => fail(new PgError('FATAL', SQLSTATE.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        `timeout connecting to ${opts.host}:${opts.port}`)), opts.connectTimeoutMs ?? 5_000);
      const fail = (err: Error) => {
        clearTimeout(timer);
        socket.destroy();
        reject(err);
      };
      socket.once('error', (err) => fail(new PgError('FATAL', SQLSTATE.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        `could not connect to ${opts.host}:${opts.port}: ${err.message}`)));
      socket.once('close', () => fail(new PgError('FATAL', SQLSTATE.CONNECTION_FAILURE, 'server closed the connection during startup')));
      socket.on('connect', () => socket.write(encodeStartup(opts.params)));
      up.sink = { onMessage: (buf, start, len) => {
        const f = frameAt(buf, start, len);
        switch (String.fromCharCode(f.type)) {
          case 'R': {
            const { code } = decodeAuthentication(f);
            if (code !== 0) fail(new PgError('FATAL', SQLSTATE.INVALID_AUTHORIZATION_SPECIFICATION, `upstream asked for authentication method ${code}; only trust is supported between proxy tiers`));
            break;
          }
          case 'S': {
            const p = decodeParameterStatus(f);
            up.parameters.set(p.name, p.value);
            break;
          }
          case 'K': ({ pid: up.pid, secret: up.secret } = decodeBackendKey(f)); break;
          case 'E': {
            const e = decodeErrorFields(f);
            fail(new PgError((e.S as 'FATAL') ?? 'FATAL', e.C ?? SQLSTATE.CONNECTION_FAILURE, e.M ?? 'startup failed', e.D, e.H));
            break;
          }
          case 'Z':
            clearTimeout(timer);
            socket.removeAllListeners('error');
            socket.removeAllListeners('close');
            up.attach();
            resolve(up);
            break;
          default: break; // NoticeResponse during startup: nothing to do
        }
      } };
      if (!opts.ownReads) socket.on('data', (chunk) => inEvent(up!.feed, chunk));
    });
  }

  /**
   * Where messages go once startup is done. They arrive inside a socket event
   * (see output.ts inEvent), so what the sink writes goes out once per event.
   */
  handle(sink: MessageSink, onClose: (err?: Error) => void): void {
    this.sink = sink;
    this.onClose = onClose;
  }

  write(buf: Buffer): void {
    if (!this.closed) this.socket.write(buf);
  }

  /** Polite close: Terminate, then end. */
  end(): void {
    if (this.closed) return;
    this.closed = true;
    this.socket.end(TERMINATE);
  }

  destroy(): void {
    this.closed = true;
    this.socket.destroy();
  }

  private attach(): void {
    this.socket.on('error', (err) => this.close(err));
    this.socket.on('close', () => this.close());
  }

  /** Tells the owner once, with the error if there was one ('error' comes before 'close'). */
  private close(err?: Error): void {
    this.closed = true;
    if (this.notified) return;
    this.notified = true;
    this.onClose(err);
  }

  private readonly feed = (chunk: Buffer): void => this.feedRange(chunk, chunk.length);

  private feedRange(buf: Buffer, end: number): void {
    try {
      this.scanner.push(buf, this.sink, end);
    } catch (err) {
      this.socket.destroy();
      this.close(err as Error);
    }
  }
}
