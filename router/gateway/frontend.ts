/**
 * The client-facing front of the gateway: everything between a client's TCP connect
 * and AuthenticationOk. SSLRequest / GSSENCRequest negotiation, TLS (also Postgres
 * 17's direct TLS), the startup packet, CancelRequest, and SCRAM-SHA-256(-PLUS)
 * against the role's verifier from pg_authid. The caller (the gateway core) takes the
 * socket from there: it sends ParameterStatus, BackendKeyData and ReadyForQuery.
 *
 * Every bad input ends in one ErrorResponse with Postgres's SQLSTATE and text, then
 * the connection closes; nothing here throws to the caller or touches other clients.
 */
import crypto from 'node:crypto';
import type net from 'node:net';
import tls from 'node:tls';
import { PgError, SQLSTATE } from '../protocol/errors.ts';
import { BodyReader, cstr, int32, message } from '../protocol/frames.ts';
import {
  authenticationOk, authenticationSasl, authenticationSaslContinue, authenticationSaslFinal,
  CANCEL_REQUEST, errorResponse, GSSENC_REQUEST, PROTOCOL_3, SSL_REQUEST,
} from '../protocol/messages.ts';
import { parseScramVerifier, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramServer, tlsServerEndPoint } from './scram.ts';

export interface FrontendTls {
  key: string | Buffer;
  cert: string | Buffer;
}

/** The few logger methods used (a pino Logger fits). */
export interface FrontendLogger {
  debug(obj: object, msg?: string): void;
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
}

export interface FrontendOptions {
  /** When set, SSLRequest is answered 'S' and the socket upgraded (and direct TLS is accepted); else 'N'. */
  tls?: FrontendTls;
  /** Refuse clients that did not negotiate TLS (FATAL 28000, after their startup packet). */
  requireTls?: boolean;
  /**
   * The role's SCRAM verifier (pg_authid.rolpassword text) for (user, database); null
   * when the role does not exist or cannot log in. Anything that is not a SCRAM-SHA-256
   * verifier (md5, NULL) fails authentication like a wrong password.
   */
  lookupVerifier: (user: string, database: string) => Promise<string | null>;
  /**
   * Why the database takes no clients now (held stopped, decision 0084), if it does not: refused right
   * after the startup packet, before authentication, as Postgres refuses while it is shut down (57P03).
   */
  refusal?: (database: string) => PgError | undefined;
  /** A CancelRequest arrived (pid and secret as signed int32s, as BackendKeyData carries them). */
  onCancel: (pid: number, secret: number) => void;
  /** Clients that have not finished startup and authentication by then are dropped (default 10 s). */
  maxStartupMs?: number;
  /** Offer SCRAM-SHA-256-PLUS (tls-server-end-point) on TLS connections (default true). */
  channelBinding?: boolean;
  /**
   * Key for the salts of mock exchanges (unknown roles). Gateways that share it answer
   * an unknown role with the same salt, so whether a role exists cannot be told by
   * asking two gateways. Default: random per process.
   */
  mockAuthKey?: Buffer;
  log?: FrontendLogger;
}

export interface AuthenticatedClient {
  /**
   * Ready for the next phase: not flowing, no data listener attached (attaching one
   * starts the flow, as on a fresh socket); only a no-op 'error' listener is left, so
   * an error before the caller attaches its own cannot crash the process.
   */
  socket: net.Socket | tls.TLSSocket;
  /** Startup parameters (user, database, options, application_name, ...), `database` defaulting to `user`; `_pq_.*` removed. */
  params: Record<string, string>;
  /** Bytes already received after the last authentication message. */
  pending: Buffer;
  tls: boolean;
  /** The SASL mechanism the client authenticated with. */
  mechanism: typeof SCRAM_SHA_256 | typeof SCRAM_SHA_256_PLUS;
  /** Minor protocol version the client asked for (we speak 3.0; NegotiateProtocolVersion was sent if > 0). */
  protocolMinor: number;
}

/** Postgres's MAX_STARTUP_PACKET_LENGTH. */
const MAX_STARTUP_PACKET = 10_000;
/** Postgres's PG_MAX_AUTH_TOKEN_LENGTH: the largest SASL message accepted. */
const MAX_AUTH_MESSAGE = 65_535;
/** Above this many unread bytes we stop reading (backpressure; no client sends much before AuthenticationOk). */
const MAX_BUFFERED = 256 * 1024;
const DEFAULT_MAX_STARTUP_MS = 10_000;
/** How long a refused client gets to read its ErrorResponse before the socket is destroyed. */
const LINGER_MS = 2_000;
const TLS_RECORD_HANDSHAKE = 0x16;
const EMPTY = Buffer.alloc(0);

const noop = () => undefined;
const processMockKey = crypto.randomBytes(32);

export interface PreparedTls {
  context: tls.SecureContext;
  /** tls-server-end-point data, or null when the certificate's signature hash cannot be bound. */
  binding: Buffer | null;
}
const preparedTls = new WeakMap<FrontendTls, PreparedTls>();

/**
 * Builds the TLS context (and channel-binding data) for a certificate once; acceptClient
 * does this lazily, call it at start-up to fail early on a bad key or certificate.
 */
export function prepareFrontendTls(material: FrontendTls): PreparedTls {
  let p = preparedTls.get(material);
  if (!p) {
    const context = tls.createSecureContext({ key: material.key, cert: material.cert, minVersion: 'TLSv1.2' });
    const binding = tlsServerEndPoint(new crypto.X509Certificate(material.cert).raw);
    p = { context, binding };
    preparedTls.set(material, p);
  }
  return p;
}

/**
 * Runs the startup phase on a freshly accepted socket. Resolves with the authenticated
 * client, or null when the client went away, was refused (it got an ErrorResponse),
 * timed out, or sent a CancelRequest. Never rejects.
 */
export function acceptClient(socket: net.Socket, opts: FrontendOptions): Promise<AuthenticatedClient | null> {
  return new Handshake(socket, opts).run();
}

class Handshake {
  private socket: net.Socket | tls.TLSSocket;
  private buf: Buffer = EMPTY;
  /** The client is gone, or we are closing. */
  private closed = false;
  /** We have closed (refused or finished a cancel request); nothing more is sent. */
  private ended = false;
  private wake: () => void = noop;
  private tls = false;
  private directTls = false;
  private readonly timer: NodeJS.Timeout;
  /** Moves what the socket has into `buf`, up to MAX_BUFFERED (beyond that it stays in the socket: backpressure). */
  private readonly pull = () => {
    let got = false;
    while (this.buf.length <= MAX_BUFFERED) {
      const chunk = this.socket.read() as Buffer | null;
      if (chunk === null) break;
      this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
      got = true;
    }
    if (got) this.wake();
  };
  private readonly onGone = () => {
    this.closed = true;
    this.wake();
  };

  constructor(raw: net.Socket, private readonly opts: FrontendOptions) {
    this.socket = raw;
    raw.setNoDelay(true);
    this.listen(raw);
    this.timer = setTimeout(() => {
      this.opts.log?.info({ remote: raw.remoteAddress }, 'client did not finish startup in time');
      this.refuse(new PgError('FATAL', SQLSTATE.QUERY_CANCELED, 'canceling authentication due to timeout'));
    }, opts.maxStartupMs ?? DEFAULT_MAX_STARTUP_MS);
    this.timer.unref();
  }

  async run(): Promise<AuthenticatedClient | null> {
    try {
      const client = await this.handshake();
      if (!client) this.abandon();
      return client;
    } catch (err) {
      if (err instanceof PgError) {
        this.opts.log?.debug({ code: err.code, message: err.message, remote: this.socket.remoteAddress }, 'client refused');
        this.refuse(err);
      } else {
        this.opts.log?.warn({ err, remote: this.socket.remoteAddress }, 'client startup failed');
        this.refuse(new PgError('FATAL', SQLSTATE.INTERNAL_ERROR, 'internal error during connection startup'));
      }
      return null;
    }
  }

  private async handshake(): Promise<AuthenticatedClient | null> {
    let sslDone = false;
    let gssDone = false;
    let params: Record<string, string>;
    let minor: number;
    for (;;) {
      // Postgres 17 clients with sslnegotiation=direct start TLS at once, without SSLRequest.
      if (!sslDone && !gssDone && this.opts.tls && (await this.peek()) === TLS_RECORD_HANDSHAKE) {
        this.upgrade(true);
        sslDone = gssDone = true;
        continue;
      }
      const body = await this.startupPacket();
      if (!body) return null;
      if (this.directTls && this.socket instanceof tls.TLSSocket && this.socket.alpnProtocol !== 'postgresql') {
        throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, 'received direct SSL connection request without ALPN protocol negotiation extension');
      }
      const code = body.readInt32BE(0);
      if (code === SSL_REQUEST && !sslDone) {
        this.noPlaintextAfter('SSL');
        if (this.opts.tls) {
          this.upgrade(false);
          gssDone = true;
        } else {
          this.socket.write('N');
        }
        sslDone = true;
        continue;
      }
      if (code === GSSENC_REQUEST && !gssDone) {
        this.noPlaintextAfter('GSSAPI encryption');
        this.socket.write('N');
        gssDone = true;
        continue;
      }
      if (code === CANCEL_REQUEST) {
        // Malformed cancels are dropped silently, as Postgres does.
        if (body.length === 12) {
          const pid = body.readInt32BE(4);
          const secret = body.readInt32BE(8);
          try {
            this.opts.onCancel(pid, secret);
          } catch (err) {
            this.opts.log?.warn({ err }, 'cancel handler failed');
          }
        }
        this.close();
        return null;
      }
      const major = code >>> 16;
      minor = code & 0xffff;
      if (major !== 3) {
        throw new PgError('FATAL', SQLSTATE.FEATURE_NOT_SUPPORTED, `unsupported frontend protocol ${major}.${minor}: server supports 3.0 to 3.0`);
      }
      params = startupParams(body);
      break;
    }

    // Protocol options (_pq_.*) we do not know, and a newer minor version, are
    // answered with NegotiateProtocolVersion, as Postgres does.
    const unknownOptions = Object.keys(params).filter((k) => k.startsWith('_pq_.'));
    for (const k of unknownOptions) delete params[k];
    if (minor > 0 || unknownOptions.length > 0) {
      this.socket.write(message('v', int32(PROTOCOL_3), int32(unknownOptions.length), ...unknownOptions.map(cstr)));
    }
    const user = params.user;
    params.database ||= user;
    const database = params.database;

    if (this.opts.requireTls && !this.tls) {
      throw new PgError('FATAL', SQLSTATE.INVALID_AUTHORIZATION_SPECIFICATION,
        `connection without SSL/TLS refused for user "${user}", database "${database}"`, undefined,
        'This server accepts only encrypted connections: connect with sslmode=require (or verify-full).');
    }
    const refused = this.opts.refusal?.(database);
    if (refused) throw refused;

    // The lookup runs while the client reads AuthenticationSASL and answers it.
    const lookup = Promise.resolve().then(() => this.opts.lookupVerifier(user, database)).then(
      (text) => ({ ok: true as const, verifier: parseScramVerifier(text) }),
      (err: unknown) => ({ ok: false as const, err }),
    );
    const binding = this.tls && this.opts.channelBinding !== false ? prepareFrontendTls(this.opts.tls!).binding : null;
    const mechanisms = binding ? [SCRAM_SHA_256_PLUS, SCRAM_SHA_256] : [SCRAM_SHA_256];
    this.socket.write(authenticationSasl(mechanisms));

    const initial = await this.saslMessage();
    if (!initial) return null;
    const r = new BodyReader(initial);
    const mechanism = r.cstr();
    const len = r.int32();
    if (len < -1) throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, 'invalid message format');
    const data = len === -1 ? null : r.bytes(len);
    if (r.at !== initial.length) throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, 'invalid message format');
    if (mechanism !== SCRAM_SHA_256 && !(mechanism === SCRAM_SHA_256_PLUS && binding)) {
      throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, 'client selected an invalid SASL authentication mechanism');
    }

    const found = await lookup;
    if (this.closed) return null;
    if (!found.ok) {
      this.opts.log?.warn({ err: found.err, user, database }, 'verifier lookup failed');
      throw new PgError('FATAL', SQLSTATE.CANNOT_CONNECT_NOW, 'the gateway cannot authenticate clients right now', 'Looking up the role failed; try again.');
    }
    const scram = new ScramServer({
      verifier: found.verifier,
      user,
      mockKey: this.opts.mockAuthKey ?? processMockKey,
      mechanism,
      channelBinding: binding,
    });
    this.socket.write(authenticationSaslContinue(scram.clientFirst(data)));

    const final = await this.saslMessage();
    if (!final) return null;
    const verdict = scram.clientFinal(final);
    if (!verdict.ok) {
      // One answer for a wrong password, an unknown role and a role without a SCRAM
      // verifier, so none can be told apart (Postgres logs the reason, never sends it).
      this.opts.log?.info({ user, database, remote: this.socket.remoteAddress, reason: found.verifier ? 'wrong password' : 'no SCRAM verifier' }, 'password authentication failed');
      throw new PgError('FATAL', SQLSTATE.INVALID_PASSWORD, `password authentication failed for user "${user}"`);
    }
    this.socket.write(Buffer.concat([authenticationSaslFinal(verdict.serverFinal), authenticationOk()]));
    this.opts.log?.debug({ user, database, tls: this.tls, mechanism }, 'client authenticated');

    const socket = this.socket;
    const pending = this.buf;
    this.detach();
    return { socket, params, pending, tls: this.tls, mechanism, protocolMinor: minor };
  }

  // --- reading ---------------------------------------------------------------------------

  /** Resolves when more bytes arrived (true) or the client is gone (false). */
  private more(): Promise<boolean> {
    if (this.closed) return Promise.resolve(false);
    const p = new Promise<boolean>((resolve) => {
      this.wake = () => {
        this.wake = noop;
        resolve(!this.closed);
      };
    });
    this.pull();
    return p;
  }

  /** The first byte that will be read, or undefined if the client went away. */
  private async peek(): Promise<number | undefined> {
    while (this.buf.length === 0) if (!(await this.more())) return undefined;
    return this.buf[0];
  }

  /** The next startup-phase packet's body (after its length), or null if the client went away. */
  private async startupPacket(): Promise<Buffer | null> {
    for (;;) {
      if (this.buf.length >= 4) {
        const len = this.buf.readInt32BE(0);
        if (len < 8 || len > MAX_STARTUP_PACKET) {
          // Postgres logs this and closes without answering (COMMERROR): a client that sends its
          // Terminate before its startup packet must not read an error it never asked for.
          this.opts.log?.info({ length: len, remote: this.socket.remoteAddress }, 'invalid length of startup packet');
          return null;
        }
        if (this.buf.length >= len) return this.take(len).subarray(4);
      }
      if (!(await this.more())) return null;
    }
  }

  /** The body of the next SASLInitialResponse / SASLResponse ('p'), or null if the client went away. */
  private async saslMessage(): Promise<Buffer | null> {
    for (;;) {
      if (this.buf.length >= 5) {
        const type = this.buf[0];
        if (type === 'X'.charCodeAt(0)) return null; // Terminate: psql does this to go and ask for a password
        if (type !== 'p'.charCodeAt(0)) throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, `expected SASL response, got message type ${type}`);
        const len = this.buf.readInt32BE(1);
        if (len < 4 || len > MAX_AUTH_MESSAGE) throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, 'invalid message length');
        if (this.buf.length >= len + 1) return this.take(len + 1).subarray(5);
      }
      if (!(await this.more())) return null;
    }
  }

  private take(n: number): Buffer {
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.length === n ? EMPTY : this.buf.subarray(n);
    return out;
  }

  /**
   * Bytes that arrived with an SSLRequest/GSSENCRequest, before our answer, were not
   * protected by the encryption about to start and may have been injected by a
   * man in the middle (CVE-2021-23214): refuse them as Postgres does.
   */
  private noPlaintextAfter(what: string): void {
    if (this.buf.length > 0) {
      throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, `received unencrypted data after ${what} request`,
        'This could be either a client-software bug or evidence of an attempted man-in-the-middle attack.');
    }
  }

  // --- the socket -----------------------------------------------------------------------------

  // The socket is read in paused mode ('readable' + read()), so that when the listener
  // goes, the socket is left as a fresh one is: not flowing, unread bytes kept, and the
  // next owner's 'data' listener starts the flow (Node's updateReadableListening).
  private listen(s: net.Socket): void {
    s.on('readable', this.pull);
    s.on('end', this.onGone);
    s.on('close', this.onGone);
    s.on('error', this.onGone);
  }

  private unlisten(s: net.Socket): void {
    s.removeListener('readable', this.pull);
    s.removeListener('end', this.onGone);
    s.removeListener('close', this.onGone);
    s.removeListener('error', this.onGone);
    s.on('error', noop);
  }

  /**
   * Hands the TCP socket to TLS. For SSLRequest, 'S' goes out first (Node writes it
   * before any TLS record). For direct TLS, the ClientHello bytes already read go back
   * into the socket, where TLSSocket picks them up.
   */
  private upgrade(direct: boolean): void {
    const { context } = prepareFrontendTls(this.opts.tls!);
    const raw = this.socket as net.Socket;
    this.unlisten(raw);
    if (direct) {
      raw.unshift(this.buf);
      this.buf = EMPTY;
    } else {
      raw.write('S');
    }
    const secure = new tls.TLSSocket(raw, {
      isServer: true,
      secureContext: context,
      requestCert: false,
      rejectUnauthorized: false,
      ALPNProtocols: ['postgresql'],
    });
    this.socket = secure;
    this.tls = true;
    this.directTls = direct;
    this.listen(secure);
  }

  private detach(): void {
    clearTimeout(this.timer);
    this.wake = noop;
    this.unlisten(this.socket);
  }

  /** The client went away (or timed out and was told): make sure the socket is gone too. */
  private abandon(): void {
    if (this.ended) return;
    this.ended = this.closed = true;
    this.detach();
    this.socket.destroy();
  }

  /** Closes without a word (cancel requests). */
  private close(): void {
    if (this.ended) return;
    this.ended = this.closed = true;
    this.detach();
    const s = this.socket;
    s.end();
    setTimeout(() => s.destroy(), LINGER_MS).unref();
  }

  /** Sends the error and closes (the client gets LINGER_MS to read it); just closes if the client is gone. */
  private refuse(err: PgError): void {
    if (this.ended) return;
    this.ended = true;
    const gone = this.closed;
    this.closed = true;
    this.wake();
    this.detach();
    const s = this.socket;
    if (!gone && !s.destroyed && s.writable) {
      s.end(errorResponse(new PgError('FATAL', err.code, err.message, err.detail, err.hint)));
      setTimeout(() => s.destroy(), LINGER_MS).unref();
    } else {
      s.destroy();
    }
  }
}

/**
 * Name/value pairs of a startup packet body (after the version), parsed as Postgres's
 * ProcessStartupPacket does, with its errors.
 */
function startupParams(body: Buffer): Record<string, string> {
  const params: Record<string, string> = {};
  const len = body.length;
  let offset = 4;
  while (offset < len) {
    const nameEnd = body.indexOf(0, offset);
    if (nameEnd === offset) break; // the terminator
    if (nameEnd < 0 || nameEnd + 1 >= len) {
      offset = len;
      break; // a name without a value
    }
    const valueEnd = body.indexOf(0, nameEnd + 1);
    if (valueEnd < 0) {
      offset = len;
      break;
    }
    params[body.toString('utf8', offset, nameEnd)] = body.toString('utf8', nameEnd + 1, valueEnd);
    offset = valueEnd + 1;
  }
  if (offset !== len - 1) {
    throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, 'invalid startup packet layout: expected terminator as last byte');
  }
  if (!params.user) {
    throw new PgError('FATAL', SQLSTATE.INVALID_AUTHORIZATION_SPECIFICATION, 'no PostgreSQL user name specified in startup packet');
  }
  return params;
}

// --- where verifiers come from --------------------------------------------------------------

/**
 * What the privileged connection runs to find a role's verifier. pg_authid is readable
 * by superusers only (pg_shadow too), hence a dedicated privileged connection.
 */
export const VERIFIER_SQL =
  'SELECT rolpassword, rolcanlogin, rolvaliduntil FROM pg_catalog.pg_authid WHERE rolname = $1';

export interface AuthidRow {
  rolpassword: string | null;
  rolcanlogin: boolean;
  rolvaliduntil: Date | string | null;
}

/** The verifier a pg_authid row allows logging in with, or null (no row, NOLOGIN, expired, no password). */
export function verifierFromAuthid(row: AuthidRow | undefined, now = Date.now()): string | null {
  if (!row || !row.rolcanlogin || !row.rolpassword) return null;
  if (row.rolvaliduntil !== null) {
    const until = new Date(row.rolvaliduntil).getTime();
    if (!Number.isNaN(until) && until < now) return null;
  }
  return row.rolpassword;
}

/**
 * Wraps a verifier lookup with a small TTL cache and one lookup in flight per key, so a
 * connection storm costs one catalog query per role; failures are not cached. A changed
 * password takes effect for new connections within `ttlMs`.
 */
export function cachedVerifierLookup(
  fetch: (user: string, database: string) => Promise<string | null>,
  opts: { ttlMs?: number; maxEntries?: number } = {},
): (user: string, database: string) => Promise<string | null> {
  const ttlMs = opts.ttlMs ?? 5_000;
  const maxEntries = opts.maxEntries ?? 10_000;
  const cache = new Map<string, { at: number; value: Promise<string | null> }>();
  return (user, database) => {
    const key = `${user}\0${database}`;
    const hit = cache.get(key);
    if (hit && Date.now() - hit.at < ttlMs) return hit.value;
    if (cache.size >= maxEntries) cache.delete(cache.keys().next().value!);
    const value = fetch(user, database);
    cache.set(key, { at: Date.now(), value });
    value.catch(() => {
      if (cache.get(key)?.value === value) cache.delete(key);
    });
    return value;
  };
}
