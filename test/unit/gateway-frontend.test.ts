// Unit test of the gateway's client-facing front (router/gateway/frontend.ts), not of the
// whole gateway: real clients (psql, node-postgres, postgres.js), TLS and not, SCRAM-SHA-256(-PLUS)
// with verifiers made by a real Postgres 15, wrong passwords compared with what Postgres itself
// says, cancel requests and malformed input; behind acceptClient is a stub server that answers
// every query with one fixed row (the whole path is in test/integration/gateway.test.ts).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import pg from 'pg';
import postgres from 'postgres';
import { createLogger } from '../../common/log.ts';
import { PostgresInstance } from '../../ingest/postgres/instance.ts';
import { acceptClient, type AuthenticatedClient, type FrontendOptions } from '../../router/gateway/frontend.ts';
import { scramKeys } from '../../router/gateway/scram.ts';
import { loadOrCreateTls, type TlsMaterial } from '../../router/gateway/tls.ts';
import { FrameReader, int16, int32, message, type Frame } from '../../router/protocol/frames.ts';
import {
  backendKeyData, BIND_COMPLETE, CLOSE_COMPLETE, commandComplete, dataRow, decodeBindNames, decodeErrorFields, decodeParse,
  decodeQuery, decodeTarget, EMPTY_QUERY_RESPONSE, encodeCancel, encodeStartup, errorResponse, parameterStatus, PARSE_COMPLETE,
  readyForQuery, rowDescription, SSL_REQUEST, GSSENC_REQUEST,
} from '../../router/protocol/messages.ts';
import { PgError } from '../../router/protocol/errors.ts';
import { freePort } from '../support/wait.ts';

process.env.MG_LOG_LEVEL ??= 'warn';
const log = createLogger('gateway-frontend-test');
/** The frontend logs an expected 'verifier lookup failed' warning in one test; keep the run quiet. */
const frontendLog = createLogger('gateway-frontend-test');
frontendLog.level = 'error';
const PSQL = '/usr/lib/postgresql/15/bin/psql';

let dir: string;
let pgInst: PostgresInstance;
let material: TlsMaterial;
const verifiers = new Map<string, string | null>();
const servers: TestServer[] = [];
let plain: TestServer; // TLS offered, not required
let strict: TestServer; // TLS required
let noTls: TestServer; // TLS not configured; short startup timeout

// --- the test server: acceptClient, then one fixed answer for every query ----------------

interface Session {
  pid: number;
  secret: number;
  /** Set while a pg_sleep query waits for a cancel. */
  cancel?: () => void;
}

interface TestServer {
  port: number;
  /** One entry per authenticated client, keyed by application_name. */
  authed: Map<string, Pick<AuthenticatedClient, 'tls' | 'mechanism' | 'params'> & { pid: number; secret: number }>;
  cancels: Array<{ pid: number; secret: number }>;
  refused: number;
  close(): Promise<void>;
}

async function startServer(opts: Omit<FrontendOptions, 'lookupVerifier' | 'onCancel'>): Promise<TestServer> {
  const sessions = new Map<number, Session>();
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    void acceptClient(socket, {
      ...opts,
      log: frontendLog,
      lookupVerifier: async (user) => {
        if (user === 'explode') throw new Error('catalog unreachable');
        if (user === 'slow') return new Promise<never>(() => undefined);
        return verifiers.get(user) ?? null;
      },
      onCancel: (pid, secret) => {
        ts.cancels.push({ pid, secret });
        const s = sessions.get(pid);
        if (s && s.secret === secret) s.cancel?.();
      },
    }).then((client) => {
      if (!client) {
        ts.refused++;
        return;
      }
      const session: Session = { pid: 1000 + sessions.size, secret: crypto.randomInt(-(2 ** 31), 2 ** 31 - 1) };
      sessions.set(session.pid, session);
      ts.authed.set(client.params.application_name ?? '', { tls: client.tls, mechanism: client.mechanism, params: client.params, pid: session.pid, secret: session.secret });
      serve(client, session);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const ts: TestServer = {
    port: (server.address() as net.AddressInfo).port,
    authed: new Map(),
    cancels: [],
    refused: 0,
    close: () => new Promise((resolve) => {
      for (const s of sockets) s.destroy();
      server.close(() => resolve());
    }),
  };
  servers.push(ts);
  return ts;
}

const ANSWER = [rowDescription([{ name: 'answer' }]), dataRow(['42'])];

function serve(client: AuthenticatedClient, session: Session): void {
  const { socket } = client;
  // Handed over clean: nobody else reads it.
  assert.equal(socket.listenerCount('data') + socket.listenerCount('readable'), 0);
  socket.on('error', () => socket.destroy());
  socket.write(Buffer.concat([
    parameterStatus('server_version', '15.0 (mg test)'), parameterStatus('server_encoding', 'UTF8'),
    parameterStatus('client_encoding', 'UTF8'), parameterStatus('DateStyle', 'ISO, MDY'),
    parameterStatus('integer_datetimes', 'on'), parameterStatus('standard_conforming_strings', 'on'),
    parameterStatus('TimeZone', 'UTC'), backendKeyData(session.pid, session.secret), readyForQuery('I'),
  ]));
  const reader = new FrameReader();
  const statements = new Map<string, string>();
  const portals = new Map<string, string>();
  let skipUntilSync = false;
  let blocked = false;
  const canceled = () => errorResponse(new PgError('ERROR', '57014', 'canceling statement due to user request'));
  const handle = (f: Frame) => {
    const type = String.fromCharCode(f.type);
    if (skipUntilSync && type !== 'S') return;
    switch (type) {
      case 'Q': {
        const sql = decodeQuery(f);
        if (/pg_sleep/.test(sql)) {
          blocked = true;
          session.cancel = () => {
            session.cancel = undefined;
            socket.write(Buffer.concat([canceled(), readyForQuery('I')]));
            blocked = false;
            pump();
          };
          return;
        }
        socket.write(Buffer.concat(sql.trim() === '' ? [EMPTY_QUERY_RESPONSE, readyForQuery('I')] : [...ANSWER, commandComplete('SELECT 1'), readyForQuery('I')]));
        return;
      }
      case 'P': {
        const p = decodeParse(f);
        statements.set(p.name, p.sql);
        socket.write(PARSE_COMPLETE);
        return;
      }
      case 'B': {
        const b = decodeBindNames(f);
        portals.set(b.portal, statements.get(b.statement) ?? '');
        socket.write(BIND_COMPLETE);
        return;
      }
      case 'D':
        socket.write(decodeTarget(f).target === 'S' ? Buffer.concat([message('t', int16(0)), ANSWER[0]]) : ANSWER[0]);
        return;
      case 'E': {
        const sql = portals.get(f.body.toString('utf8', 0, f.body.indexOf(0))) ?? '';
        if (/pg_sleep/.test(sql)) {
          blocked = true;
          session.cancel = () => {
            session.cancel = undefined;
            socket.write(canceled());
            skipUntilSync = true;
            blocked = false;
            pump();
          };
          return;
        }
        socket.write(Buffer.concat([ANSWER[1], commandComplete('SELECT 1')]));
        return;
      }
      case 'C':
        socket.write(CLOSE_COMPLETE);
        return;
      case 'S':
        skipUntilSync = false;
        socket.write(readyForQuery('I'));
        return;
      case 'H':
        return;
      case 'X':
        socket.end();
        return;
      default:
        socket.end(errorResponse(new PgError('FATAL', '08P01', `unexpected message ${type}`)));
    }
  };
  const pump = () => {
    for (let f = reader.next(); f && !blocked; f = blocked ? undefined : reader.next()) handle(f);
  };
  reader.push(client.pending);
  // No resume(): acceptClient hands the socket over so that a 'data' listener starts it.
  socket.on('data', (chunk: Buffer) => {
    reader.push(chunk);
    if (!blocked) pump();
  });
  pump();
}

// --- raw wire helpers ------------------------------------------------------------------------

class Wire {
  private buf = Buffer.alloc(0);
  closed = false;
  private waiter: (() => void) | undefined;
  private readonly onData = (c: Buffer) => {
    this.buf = Buffer.concat([this.buf, c]);
    this.waiter?.();
  };
  private readonly onClose = () => {
    this.closed = true;
    this.waiter?.();
  };

  constructor(readonly socket: net.Socket) {
    socket.on('data', this.onData);
    socket.on('close', this.onClose);
    socket.on('error', () => undefined);
  }

  static connect(port: number): Promise<Wire> {
    return new Promise((resolve, reject) => {
      const s = net.connect(port, '127.0.0.1', () => resolve(new Wire(s)));
      s.once('error', reject);
    });
  }

  write(...bufs: Buffer[]): this {
    this.socket.write(Buffer.concat(bufs));
    return this;
  }

  /** Until n bytes are buffered, or the connection closes (null), or the timeout throws. */
  private async need(n: number, timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (this.buf.length < n) {
      if (this.closed) return false;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.buf.length})`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.waiter = undefined;
    }
    return true;
  }

  async byte(timeoutMs = 3000): Promise<string> {
    assert.ok(await this.need(1, timeoutMs), 'connection closed while waiting for a byte');
    const b = this.buf[0];
    this.buf = this.buf.subarray(1);
    return String.fromCharCode(b);
  }

  async message(timeoutMs = 3000): Promise<Frame> {
    assert.ok(await this.need(5, timeoutMs), 'connection closed while waiting for a message');
    const len = this.buf.readInt32BE(1);
    assert.ok(await this.need(len + 1, timeoutMs), 'connection closed inside a message');
    const raw = this.buf.subarray(0, len + 1);
    this.buf = this.buf.subarray(len + 1);
    return { type: raw[0], body: raw.subarray(5), raw };
  }

  /** The ErrorResponse the server must send next, then the close that must follow. */
  async fatal(timeoutMs = 3000): Promise<Record<string, string>> {
    const m = await this.message(timeoutMs);
    assert.equal(String.fromCharCode(m.type), 'E', `expected ErrorResponse, got ${String.fromCharCode(m.type)}`);
    const fields = decodeErrorFields(m);
    assert.equal(fields.S, 'FATAL');
    assert.equal(await this.need(1, timeoutMs), false, 'connection should close after a FATAL');
    return fields;
  }

  /** True if the server closes the connection within ms (whatever it sent before). */
  /** Bytes received and not read yet. */
  get pending(): number {
    return this.buf.length;
  }

  async closedWithin(ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.closed && Date.now() < deadline) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, deadline - Date.now());
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.waiter = undefined;
    }
    return this.closed;
  }

  /** Everything received so far. */
  get received(): Buffer {
    return this.buf;
  }

  /** Stops reading (to hand the socket to TLS) and returns what was not read. */
  detach(): Buffer {
    this.socket.removeListener('data', this.onData);
    this.socket.removeListener('close', this.onClose);
    return this.buf;
  }
}

const startupPacket = (params: Record<string, string>, version = 196608) => {
  const p = encodeStartup(params);
  p.writeInt32BE(version, 4);
  return p;
};
const request = (code: number) => Buffer.concat([int32(8), int32(code)]);
const saslInitial = (mechanism: string, data: string) =>
  message('p', Buffer.from(`${mechanism}\0`), int32(Buffer.byteLength(data)), Buffer.from(data));
const authCode = (f: Frame) => f.body.readInt32BE(0);
const mechanismsOf = (f: Frame) => f.body.subarray(4).toString().split('\0').filter(Boolean);

async function tlsWire(w: Wire, opts: tls.ConnectionOptions = {}): Promise<Wire> {
  const rest = w.detach();
  assert.equal(rest.length, 0);
  const s = tls.connect({ socket: w.socket, rejectUnauthorized: false, ...opts });
  await new Promise<void>((resolve, reject) => {
    s.once('secureConnect', resolve);
    s.once('error', reject);
  });
  return new Wire(s);
}

// --- clients ---------------------------------------------------------------------------------

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

const cleanEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('PG')));

function psql(port: number, conn: string, password: string, host = '127.0.0.1'): Promise<Run> {
  return new Promise((resolve) => {
    execFile(PSQL, ['-X', '-A', '-t', '-c', 'select 1', `host=${host} port=${port} ${conn}`], {
      env: { ...cleanEnv, PGPASSWORD: password, PGCONNECT_TIMEOUT: '5' },
      timeout: 10_000,
    }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout: stdout.trim(), stderr: stderr.trim() });
    });
  });
}

/** psql's message without the address part, which differs between servers. */
const psqlError = (r: Run) => r.stderr.replace(/^psql: error: connection to server at "[^"]+" \([^)]*\), port \d+ failed: |^psql: error: connection to server at "[^"]+", port \d+ failed: /, '');

async function pgQuery(port: number, cfg: Partial<pg.ClientConfig>): Promise<unknown[]> {
  const client = new pg.Client({ host: '127.0.0.1', port, database: 'app', user: 'app', password: 'secret', connectionTimeoutMillis: 5000, ...cfg });
  await client.connect();
  try {
    return (await client.query('select 1')).rows;
  } finally {
    await client.end();
  }
}

// --- setup -----------------------------------------------------------------------------------

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-gw-front-'));
  fs.chmodSync(dir, 0o755); // the postgres OS user must reach the data dir below
  pgInst = new PostgresInstance({ name: 'authsrc', dataDir: path.join(dir, 'authsrc'), port: await freePort(), log });
  await pgInst.initPrimary();
  await pgInst.start();
  const admin = new pg.Client({ host: pgInst.host, port: pgInst.port, user: 'postgres', database: 'postgres' });
  await admin.connect();
  try {
    await admin.query("SET password_encryption = 'scram-sha-256'");
    await admin.query("CREATE ROLE app LOGIN PASSWORD 'secret'");
    await admin.query("SET password_encryption = 'md5'");
    await admin.query("CREATE ROLE md5user LOGIN PASSWORD 'secret'");
    await admin.query('CREATE ROLE nopass LOGIN');
    await admin.query('CREATE DATABASE app');
    const { rows } = await admin.query<{ rolname: string; rolpassword: string | null }>(
      "SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN ('app', 'md5user', 'nopass')");
    for (const r of rows) verifiers.set(r.rolname, r.rolpassword);
    // So that Postgres itself can be asked what it answers a wrong password: SCRAM for
    // these roles on TCP (the agent's pg_hba trusts loopback otherwise).
    const hba = path.join(pgInst.dataDir, 'pg_hba.conf');
    fs.writeFileSync(hba, `host all app,md5user,nopass,ghost 127.0.0.1/32 scram-sha-256\n${fs.readFileSync(hba, 'utf8')}`);
    await admin.query('SELECT pg_reload_conf()');
  } finally {
    await admin.end();
  }
  assert.match(verifiers.get('app')!, /^SCRAM-SHA-256\$4096:/);
  assert.match(verifiers.get('md5user')!, /^md5/);
  assert.equal(verifiers.get('nopass'), null);

  material = loadOrCreateTls(path.join(dir, 'tls'));
  plain = await startServer({ tls: material });
  strict = await startServer({ tls: material, requireTls: true });
  noTls = await startServer({ maxStartupMs: 400 });
});

after(async () => {
  for (const s of servers) await s.close();
  await pgInst?.stop('immediate').catch(() => undefined);
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

// --- real clients ----------------------------------------------------------------------------

test('psql: right password with TLS (channel binding), without TLS, and verify-full against the generated certificate', async () => {
  const tlsRun = await psql(plain.port, 'user=app dbname=app sslmode=require channel_binding=require application_name=psql-tls', 'secret');
  assert.deepEqual(tlsRun, { code: 0, stdout: '42', stderr: '' });
  assert.equal(plain.authed.get('psql-tls')?.tls, true);
  assert.equal(plain.authed.get('psql-tls')?.mechanism, 'SCRAM-SHA-256-PLUS');

  const clear = await psql(plain.port, 'user=app dbname=app sslmode=disable application_name=psql-clear', 'secret');
  assert.deepEqual(clear, { code: 0, stdout: '42', stderr: '' });
  assert.equal(plain.authed.get('psql-clear')?.tls, false);
  assert.equal(plain.authed.get('psql-clear')?.mechanism, 'SCRAM-SHA-256');

  // The certificate names localhost: libpq checks the chain and the host name.
  const verified = await psql(plain.port, `user=app dbname=app sslmode=verify-full sslrootcert=${material.certFile} application_name=psql-verify`, 'secret', 'localhost');
  assert.deepEqual(verified, { code: 0, stdout: '42', stderr: '' });

  // sslmode=disable to a server without TLS, and prefer falling back to clear text after 'N'.
  assert.equal((await psql(noTls.port, 'user=app dbname=app sslmode=prefer application_name=psql-prefer', 'secret')).stdout, '42');
  assert.equal(noTls.authed.get('psql-prefer')?.tls, false);
});

test('psql: wrong password, md5 role, role without password and unknown role get exactly what Postgres says', async () => {
  const cases: Array<[string, string]> = [['app', 'wrong'], ['md5user', 'secret'], ['nopass', 'secret'], ['ghost', 'secret']];
  for (const [user, password] of cases) {
    for (const ssl of ['disable', 'require']) {
      const conn = `user=${user} dbname=postgres sslmode=${ssl}`;
      const ours = await psql(plain.port, conn, password);
      assert.equal(ours.code, 2, ours.stderr);
      assert.equal(psqlError(ours), `FATAL:  password authentication failed for user "${user}"`);
      if (ssl === 'disable') {
        // The agent's Postgres has no TLS: compare the clear-text run with it.
        const theirs = await psql(pgInst.port, conn, password);
        assert.equal(psqlError(ours), psqlError(theirs), `${user}: ours vs Postgres`);
      }
    }
  }
});

test('node-postgres: password over TLS, with SCRAM-SHA-256-PLUS, without TLS; wrong password is 28P01', async () => {
  assert.deepEqual(await pgQuery(plain.port, { ssl: { rejectUnauthorized: false }, application_name: 'pg-tls' }), [{ answer: '42' }]);
  assert.deepEqual(plain.authed.get('pg-tls')?.tls, true);
  assert.equal(plain.authed.get('pg-tls')?.mechanism, 'SCRAM-SHA-256');

  assert.deepEqual(await pgQuery(plain.port, { ssl: { rejectUnauthorized: false }, enableChannelBinding: true, application_name: 'pg-plus' } as pg.ClientConfig), [{ answer: '42' }]);
  assert.equal(plain.authed.get('pg-plus')?.mechanism, 'SCRAM-SHA-256-PLUS');

  assert.deepEqual(await pgQuery(plain.port, { application_name: 'pg-clear', options: '-c search_path=s1' }), [{ answer: '42' }]);
  assert.equal(plain.authed.get('pg-clear')?.tls, false);
  assert.equal(plain.authed.get('pg-clear')?.params.options, '-c search_path=s1');
  assert.equal(plain.authed.get('pg-clear')?.params.database, 'app');

  for (const cfg of [{}, { ssl: { rejectUnauthorized: false } }, { user: 'ghost' }, { user: 'md5user', password: 'secret' }]) {
    await assert.rejects(pgQuery(plain.port, { password: 'wrong', ...cfg }), (err: pg.DatabaseError) => {
      assert.equal(err.code, '28P01');
      assert.equal(err.severity, 'FATAL');
      assert.equal(err.message, `password authentication failed for user "${(cfg as { user?: string }).user ?? 'app'}"`);
      return true;
    });
  }
});

test('postgres.js: TLS, clear text and direct TLS (sslnegotiation=direct, ALPN); wrong password is 28P01', async () => {
  const connect = (extra: Record<string, unknown>) => postgres({
    host: '127.0.0.1', port: plain.port, user: 'app', pass: 'secret', database: 'app', fetch_types: false, max: 1, onnotice: () => undefined, ...extra,
  } as postgres.Options<Record<string, never>>);
  for (const [name, extra, expectTls] of [
    ['pjs-tls', { ssl: 'require' }, true],
    ['pjs-clear', { ssl: false }, false],
    ['pjs-direct', { ssl: 'require', sslnegotiation: 'direct' }, true],
  ] as const) {
    const sql = connect({ ...extra, connection: { application_name: name } });
    try {
      assert.deepEqual([...(await sql`select 1`)], [{ answer: '42' }], name);
      assert.deepEqual([...(await sql`select ${1}::int`)], [{ answer: '42' }], name);
    } finally {
      await sql.end();
    }
    assert.equal(plain.authed.get(name)?.tls, expectTls, name);
  }
  const bad = connect({ pass: 'nope', ssl: 'require' });
  await assert.rejects(bad`select 1`, (err: postgres.PostgresError) => {
    assert.equal(err.code, '28P01');
    assert.equal(err.message, 'password authentication failed for user "app"');
    return true;
  });
  await bad.end();
});

test('requireTls refuses clear-text clients with 28000 and serves TLS ones', async () => {
  const clear = await psql(strict.port, 'user=app dbname=app sslmode=disable', 'secret');
  assert.equal(clear.code, 2);
  assert.match(psqlError(clear), /^FATAL:  connection without SSL\/TLS refused for user "app", database "app"\nHINT:  .*sslmode=require/);
  await assert.rejects(pgQuery(strict.port, {}), (err: pg.DatabaseError) => err.code === '28000');
  assert.equal((await psql(strict.port, 'user=app dbname=app sslmode=require application_name=strict-tls', 'secret')).stdout, '42');
  assert.deepEqual(await pgQuery(strict.port, { ssl: { rejectUnauthorized: false } }), [{ answer: '42' }]);
  // The refusal comes before authentication: a wrong password gets the same 28000.
  await assert.rejects(pgQuery(strict.port, { password: 'wrong' }), (err: pg.DatabaseError) => err.code === '28000');
});

test('cancel requests reach onCancel with the pid and secret from BackendKeyData (postgres.js over TLS, raw)', async () => {
  const sql = postgres({
    host: '127.0.0.1', port: plain.port, user: 'app', pass: 'secret', database: 'app', fetch_types: false, max: 1,
    ssl: 'require', connection: { application_name: 'pjs-cancel' },
  });
  try {
    await sql`select 1`;
    const session = plain.authed.get('pjs-cancel')!;
    const before = plain.cancels.length;
    const q = sql`select pg_sleep(10)`;
    const started = Date.now();
    setTimeout(() => q.cancel(), 100);
    await assert.rejects(q, (err: postgres.PostgresError) => err.code === '57014');
    assert.ok(Date.now() - started < 3000);
    assert.deepEqual(plain.cancels.slice(before), [{ pid: session.pid, secret: session.secret }]);
    assert.deepEqual([...(await sql`select 1`)], [{ answer: '42' }], 'the session goes on after the cancel');
  } finally {
    await sql.end();
  }

  // A raw CancelRequest (negative secret included) is passed on and the connection closed without a word.
  const w = await Wire.connect(noTls.port);
  w.write(encodeCancel(123456, -987654321));
  assert.equal(await w.closedWithin(2000), true);
  assert.deepEqual(noTls.cancels.at(-1), { pid: 123456, secret: -987654321 });
  // A malformed one is dropped.
  const bad = await Wire.connect(noTls.port);
  bad.write(int32(12), int32(80877102), int32(1));
  assert.equal(await bad.closedWithin(2000), true);
  assert.equal(noTls.cancels.length, 1);
});

// --- malformed and hostile input -------------------------------------------------------------

test('a startup packet with an invalid length is closed without an answer, as Postgres does', async () => {
  const cases: Array<{ name: string; send: Buffer }> = [
    { name: 'Terminate before the startup packet', send: Buffer.from([0x58, 0, 0, 0, 4]) },
    { name: 'HTTP', send: Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n') },
    { name: 'short length', send: int32(4) },
    { name: 'oversized', send: Buffer.concat([int32(20_000), int32(196608)]) },
  ];
  await Promise.all(cases.map(async (c) => {
    const w = await Wire.connect(plain.port);
    w.write(c.send);
    assert.equal(await w.closedWithin(2000), true, `${c.name}: closed`);
    assert.equal(w.pending, 0, `${c.name}: nothing was answered`);
  }));
});

test('garbage, bad versions, oversized packets and broken negotiation get a FATAL with a real SQLSTATE; others are served meanwhile', async () => {
  const cases: Array<{ name: string; port: number; send: Buffer[]; code: string; message: RegExp; expectByte?: string }> = [
    { name: 'protocol 2.0', port: plain.port, send: [startupPacket({ user: 'app' }, 2 << 16)], code: '0A000', message: /^unsupported frontend protocol 2\.0: server supports 3\.0 to 3\.0$/ },
    { name: 'protocol 4.0', port: plain.port, send: [startupPacket({ user: 'app' }, 4 << 16)], code: '0A000', message: /^unsupported frontend protocol 4\.0/ },
    { name: 'no terminator', port: plain.port, send: [Buffer.concat([int32(17), int32(196608), Buffer.from('user\0app\0')])], code: '08P01', message: /expected terminator/ },
    { name: 'no user', port: plain.port, send: [startupPacket({ database: 'app' })], code: '28000', message: /no PostgreSQL user name/ },
    { name: 'second SSLRequest', port: noTls.port, send: [request(SSL_REQUEST)], expectByte: 'N', code: '0A000', message: /^unsupported frontend protocol 1234\.5679/ },
    { name: 'data after SSLRequest', port: plain.port, send: [request(SSL_REQUEST), startupPacket({ user: 'app' })], code: '08P01', message: /^received unencrypted data after SSL request$/ },
    { name: 'data after GSSENCRequest', port: plain.port, send: [request(GSSENC_REQUEST), Buffer.from('x')], code: '08P01', message: /after GSSAPI encryption request/ },
  ];
  // A client doing honest work while all that goes on.
  const honest = Promise.all(Array.from({ length: 5 }, (_, i) => pgQuery(plain.port, { application_name: `honest-${i}` })));
  await Promise.all(cases.map(async (c) => {
    const w = await Wire.connect(c.port);
    if (c.expectByte) {
      w.write(request(SSL_REQUEST));
      assert.equal(await w.byte(), c.expectByte, c.name);
    }
    w.write(...c.send); // one write: bytes after a request must arrive with it
    const f = await w.fatal();
    assert.equal(f.C, c.code, `${c.name}: ${f.M}`);
    assert.match(f.M, c.message, c.name);
  }));
  for (const rows of await honest) assert.deepEqual(rows, [{ answer: '42' }]);
});

test('negotiation: GSSENC gets N, a second SSLRequest inside TLS is refused, SASL misuse is refused', async () => {
  // GSSENCRequest → 'N', then SSLRequest → 'S' is still allowed; a second SSLRequest inside TLS is not.
  {
    const w = await Wire.connect(plain.port);
    w.write(request(GSSENC_REQUEST));
    assert.equal(await w.byte(), 'N');
    w.write(request(SSL_REQUEST));
    assert.equal(await w.byte(), 'S');
    const t = await tlsWire(w);
    t.write(request(SSL_REQUEST));
    const f = await t.fatal();
    assert.equal(f.C, '0A000');
    assert.match(f.M, /1234\.5679/);
  }
  const untilSasl = async (port: number, params: Record<string, string> = { user: 'app', database: 'app' }) => {
    const w = await Wire.connect(port);
    w.write(startupPacket(params));
    const r = await w.message();
    assert.equal(String.fromCharCode(r.type), 'R');
    assert.equal(authCode(r), 10);
    return { w, mechanisms: mechanismsOf(r) };
  };
  // Clear text: no PLUS offered, and choosing it is refused.
  {
    const { w, mechanisms } = await untilSasl(plain.port);
    assert.deepEqual(mechanisms, ['SCRAM-SHA-256']);
    w.write(saslInitial('SCRAM-SHA-256-PLUS', 'p=tls-server-end-point,,n=,r=abcdef'));
    const f = await w.fatal();
    assert.deepEqual([f.C, f.M], ['08P01', 'client selected an invalid SASL authentication mechanism']);
  }
  {
    const { w } = await untilSasl(plain.port);
    w.write(message('Q', Buffer.from('select 1\0')));
    const f = await w.fatal();
    assert.deepEqual([f.C, f.M], ['08P01', 'expected SASL response, got message type 81']);
  }
  {
    const { w } = await untilSasl(plain.port);
    w.write(Buffer.from('p'), int32(1_000_000));
    assert.deepEqual((await w.fatal()).C, '08P01');
  }
  {
    const { w } = await untilSasl(plain.port);
    w.write(saslInitial('SCRAM-SHA-256', 'n,,n=,r=abc'));
    const cont = await w.message();
    assert.equal(authCode(cont), 11);
    assert.match(cont.body.subarray(4).toString(), /^r=abc[^,]+,s=[^,]+,i=4096$/);
    w.write(message('p', Buffer.from('c=biws,r=not-the-nonce,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=')));
    const f = await w.fatal();
    assert.deepEqual([f.C, f.M, f.D], ['08P01', 'invalid SCRAM response', 'Nonce does not match.']);
  }
  // Over TLS both are offered, PLUS first (as Postgres does).
  {
    const w = await Wire.connect(plain.port);
    w.write(request(SSL_REQUEST));
    assert.equal(await w.byte(), 'S');
    const t = await tlsWire(w);
    t.write(startupPacket({ user: 'app', database: 'app' }));
    assert.deepEqual(mechanismsOf(await t.message()), ['SCRAM-SHA-256-PLUS', 'SCRAM-SHA-256']);
    t.socket.destroy();
  }
  // Direct TLS needs ALPN "postgresql", as in Postgres 17.
  {
    const s = tls.connect({ host: '127.0.0.1', port: plain.port, rejectUnauthorized: false });
    await new Promise((resolve, reject) => s.once('secureConnect', resolve).once('error', reject));
    const t = new Wire(s);
    t.write(startupPacket({ user: 'app' }));
    const f = await t.fatal();
    assert.deepEqual([f.C, f.M], ['08P01', 'received direct SSL connection request without ALPN protocol negotiation extension']);
  }
  // A newer minor version and unknown _pq_ options get NegotiateProtocolVersion, then SASL.
  {
    const w = await Wire.connect(plain.port);
    w.write(startupPacket({ user: 'app', '_pq_.compression': 'on' }, (3 << 16) | 2));
    const v = await w.message();
    assert.equal(String.fromCharCode(v.type), 'v');
    assert.equal(v.body.readInt32BE(0), 196608);
    assert.equal(v.body.readInt32BE(4), 1);
    assert.equal(v.body.subarray(8).toString(), '_pq_.compression\0');
    assert.equal(authCode(await w.message()), 10);
    w.socket.destroy();
  }
});

test('bytes pipelined after the last SCRAM message reach the session (pending), over TLS too', async () => {
  for (const useTls of [false, true]) {
    let w = await Wire.connect(plain.port);
    if (useTls) {
      w.write(request(SSL_REQUEST));
      assert.equal(await w.byte(), 'S');
      w = await tlsWire(w);
    }
    w.write(startupPacket({ user: 'app', database: 'app', application_name: `raw-pipelined-${useTls}` }));
    assert.equal(authCode(await w.message()), 10);
    const clientNonce = crypto.randomBytes(18).toString('base64');
    w.write(saslInitial('SCRAM-SHA-256', `n,,n=,r=${clientNonce}`));
    const cont = await w.message();
    assert.equal(authCode(cont), 11);
    const serverFirst = cont.body.subarray(4).toString();
    const attrs = Object.fromEntries(serverFirst.split(',').map((a) => [a[0], a.slice(2)]));
    const keys = scramKeys('secret', Buffer.from(attrs.s, 'base64'), Number(attrs.i));
    const withoutProof = `c=biws,r=${attrs.r}`;
    const auth = `n=,r=${clientNonce},${serverFirst},${withoutProof}`;
    const sig = crypto.createHmac('sha256', keys.storedKey).update(auth).digest();
    const proof = Buffer.from(keys.clientKey.map((b, i) => b ^ sig[i])).toString('base64');
    // The final SCRAM message and a query in one write, as a pipelining client might.
    w.write(message('p', Buffer.from(`${withoutProof},p=${proof}`)), message('Q', Buffer.from('select 1\0')));
    const final = await w.message();
    assert.equal(authCode(final), 12);
    assert.equal(final.body.subarray(4).toString(), `v=${crypto.createHmac('sha256', keys.serverKey).update(auth).digest('base64')}`);
    assert.equal(authCode(await w.message()), 0);
    const types: string[] = [];
    for (let z = 0; z < 2;) {
      const m = await w.message();
      types.push(String.fromCharCode(m.type));
      if (m.type === 'Z'.charCodeAt(0)) z++;
    }
    assert.deepEqual(types.filter((t) => t !== 'S'), ['K', 'Z', 'T', 'D', 'C', 'Z']);
    assert.equal(plain.authed.get(`raw-pipelined-${useTls}`)?.tls, useTls);
    w.socket.destroy();
  }
});

test('a failing verifier lookup is 57P03; a hanging one ends in the startup timeout', async () => {
  await assert.rejects(pgQuery(plain.port, { user: 'explode' }), (err: pg.DatabaseError) => {
    assert.deepEqual([err.code, err.severity, err.message], ['57P03', 'FATAL', 'the gateway cannot authenticate clients right now']);
    return true;
  });
  const t0 = Date.now();
  await assert.rejects(pgQuery(noTls.port, { user: 'slow' }), (err: pg.DatabaseError) => err.code === '57014');
  assert.ok(Date.now() - t0 < 2000);
  assert.deepEqual(await pgQuery(plain.port, {}), [{ answer: '42' }]);
});

test('slow clients time out; random bytes never crash the server', async () => {
  // Nothing sent, half a startup packet, and stalling in the middle of SCRAM: all dropped after maxStartupMs (400 ms).
  const silent = await Wire.connect(noTls.port);
  const half = await Wire.connect(noTls.port);
  half.write(startupPacket({ user: 'app' }).subarray(0, 10));
  const midAuth = await Wire.connect(noTls.port);
  midAuth.write(startupPacket({ user: 'app' }));
  assert.equal(authCode(await midAuth.message()), 10);
  const t0 = Date.now();
  for (const w of [silent, half, midAuth]) {
    const f = await w.fatal(2000);
    assert.deepEqual([f.C, f.M], ['57014', 'canceling authentication due to timeout']);
  }
  const waited = Date.now() - t0;
  assert.ok(waited < 1500, `timeouts took ${waited} ms`);

  // 300 connections of random bytes (some with plausible lengths), all at once.
  const refusedBefore = noTls.refused;
  const rnd = (seed: number) => {
    const b = crypto.randomBytes(1 + (seed % 64));
    if (seed % 3 === 0 && b.length >= 8) b.writeInt32BE(8 + (seed % 40), 0);
    if (seed % 5 === 0 && b.length >= 8) b.writeInt32BE(b.length, 0);
    return b;
  };
  await Promise.all(Array.from({ length: 300 }, async (_, i) => {
    const w = await Wire.connect(noTls.port);
    w.write(rnd(i));
    assert.equal(await w.closedWithin(3000), true, `connection ${i} was not closed`);
    // Whatever came back is one ErrorResponse or nothing (a cancel request closes silently).
    if (w.received.length > 0) assert.equal(String.fromCharCode(w.received[0]), 'E', `connection ${i}`);
  }));
  assert.ok(noTls.refused - refusedBefore >= 290);
  assert.deepEqual(await pgQuery(noTls.port, {}), [{ answer: '42' }]);
});

test('loadOrCreateTls generates once and reuses; bad files are named in the error', () => {
  const again = loadOrCreateTls(path.join(dir, 'tls'));
  assert.equal(again.generated, false);
  assert.equal(again.fingerprint256, material.fingerprint256);
  assert.match(material.subjectAltName ?? '', /DNS:localhost.*IP Address:127\.0\.0\.1/);
  assert.equal((fs.statSync(path.join(dir, 'tls', 'server.key')).mode & 0o777), 0o600);
  const broken = path.join(dir, 'tls-broken');
  fs.mkdirSync(broken);
  fs.writeFileSync(path.join(broken, 'server.crt'), material.cert);
  fs.writeFileSync(path.join(broken, 'server.key'), crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ type: 'pkcs8', format: 'pem' }));
  assert.throws(() => loadOrCreateTls(broken), /server\.key does not match the certificate in .*server\.crt/);
});
