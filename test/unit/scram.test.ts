// SCRAM-SHA-256 server side: the RFC 7677 test vector, verifiers made by Postgres 15
// itself, the mock exchange, protocol errors, and tls-server-end-point binding.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { generate } from 'selfsigned';
import { PgError } from '../../router/protocol/errors.ts';
import {
  buildScramVerifier, certificateBindingHash, formatScramVerifier, parseScramVerifier, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
  scramKeys, ScramServer, tlsServerEndPoint, type ScramServerOptions,
} from '../../router/gateway/scram.ts';

// Produced by Postgres 15: SET password_encryption = 'scram-sha-256';
// CREATE ROLE app LOGIN PASSWORD 'secret'; CREATE ROLE u2 LOGIN PASSWORD 'pässwörd Ⅸ';
// SELECT rolpassword FROM pg_authid WHERE rolname = ...
const PG_APP = 'SCRAM-SHA-256$4096:rqsNhr7gVDjYdyFIBDtj9A==$HL0G/VWiTJIVSqkjADd1Hz9Em1sev41zR35Jl9ZlOq0=:OghczXwmt2EgT6XeihEAJXYd8CUn/NMh99WNprq+Byo=';
const PG_U2 = 'SCRAM-SHA-256$4096:0wWjcv+rXS3IK60ipW10rA==$OxNuEJ0BUMPmgXI+iEzeIKMmOQ1rmAHaa/0FAB0YMPI=:q5kW0azsnplhK1qK8WhDza5GkotHLX4ndai4G1171l0=';

const mockKey = crypto.randomBytes(32);

function server(verifier: string | null, extra: Partial<ScramServerOptions> = {}): ScramServer {
  return new ScramServer({ verifier: parseScramVerifier(verifier), user: 'app', mockKey, mechanism: SCRAM_SHA_256, channelBinding: null, ...extra });
}

/** A SCRAM client as RFC 5802 describes it (what libpq, pg and postgres.js do). */
function scramClient(password: string, opts: { gs2?: string; cbind?: Buffer; nonce?: string } = {}) {
  const gs2 = opts.gs2 ?? 'n,,';
  const nonce = opts.nonce ?? crypto.randomBytes(18).toString('base64');
  const bare = `n=,r=${nonce}`;
  let expectedServerFinal = '';
  return {
    first: Buffer.from(gs2 + bare),
    final(serverFirst: string): Buffer {
      const attrs = Object.fromEntries(serverFirst.split(',').map((a) => [a[0], a.slice(2)]));
      assert.ok(attrs.r.startsWith(nonce), 'server nonce extends the client nonce');
      const keys = scramKeys(password, Buffer.from(attrs.s, 'base64'), Number(attrs.i));
      const withoutProof = `c=${Buffer.concat([Buffer.from(gs2), opts.cbind ?? Buffer.alloc(0)]).toString('base64')},r=${attrs.r}`;
      const auth = `${bare},${serverFirst},${withoutProof}`;
      const sig = crypto.createHmac('sha256', keys.storedKey).update(auth).digest();
      const proof = Buffer.from(keys.clientKey.map((b, i) => b ^ sig[i]));
      expectedServerFinal = `v=${crypto.createHmac('sha256', keys.serverKey).update(auth).digest('base64')}`;
      return Buffer.from(`${withoutProof},p=${proof.toString('base64')}`);
    },
    get expectedServerFinal() {
      return expectedServerFinal;
    },
  };
}

function exchange(s: ScramServer, password: string, opts: Parameters<typeof scramClient>[1] = {}) {
  const c = scramClient(password, opts);
  const result = s.clientFinal(c.final(s.clientFirst(c.first)));
  return { result, expected: c.expectedServerFinal };
}

function assertPgError(fn: () => unknown, code: string, message: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof PgError, String(err));
    assert.equal(err.severity, 'FATAL');
    assert.equal(err.code, code);
    assert.match(err.message + (err.detail ? ` ${err.detail}` : ''), message);
    return true;
  });
}

test('RFC 7677 test vector (user "user", password "pencil")', () => {
  const verifier = buildScramVerifier('pencil', { salt: Buffer.from('W22ZaJ0SNY7soEsUEjb6gQ==', 'base64'), iterations: 4096 });
  const s = server(verifier, { serverNonce: '%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0' });
  const serverFirst = s.clientFirst(Buffer.from('n,,n=user,r=rOprNGfwEbeRWgbNEkqO'));
  assert.equal(serverFirst, 'r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096');
  const result = s.clientFinal(Buffer.from(
    'c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ='));
  assert.deepEqual(result, { ok: true, serverFinal: 'v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=' });
});

test('RFC 7677 vector with one bit of the proof flipped fails', () => {
  const verifier = buildScramVerifier('pencil', { salt: Buffer.from('W22ZaJ0SNY7soEsUEjb6gQ==', 'base64'), iterations: 4096 });
  const s = server(verifier, { serverNonce: '%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0' });
  s.clientFirst(Buffer.from('n,,n=user,r=rOprNGfwEbeRWgbNEkqO'));
  const proof = Buffer.from('dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=', 'base64');
  proof[0] ^= 1;
  const result = s.clientFinal(Buffer.from(`c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=${proof.toString('base64')}`));
  assert.deepEqual(result, { ok: false });
});

test('verifiers made by Postgres: parsed, reproduced from the password, and verified', () => {
  const v = parseScramVerifier(PG_APP);
  assert.ok(v);
  assert.equal(v.iterations, 4096);
  assert.equal(v.salt.length, 16);
  assert.equal(formatScramVerifier(v), PG_APP);
  assert.equal(buildScramVerifier('secret', { salt: v.salt, iterations: v.iterations }), PG_APP);
  // Non-ASCII: Postgres applies SASLprep (NFKC turns U+2168 into "IX"), and so do we.
  const u2 = parseScramVerifier(PG_U2)!;
  assert.equal(buildScramVerifier('pässwörd Ⅸ', { salt: u2.salt, iterations: u2.iterations }), PG_U2);

  const ok = exchange(server(PG_APP), 'secret');
  assert.equal(ok.result.ok, true);
  assert.equal(ok.result.ok && ok.result.serverFinal, ok.expected);
  assert.equal(exchange(server(PG_U2), 'pässwörd Ⅸ').result.ok, true);
  assert.deepEqual(exchange(server(PG_APP), 'Secret').result, { ok: false });
  assert.deepEqual(exchange(server(PG_APP), '').result, { ok: false });
  // 'y' (client could bind, thinks we cannot) is fine when we did not offer PLUS.
  assert.equal(exchange(server(PG_APP), 'secret', { gs2: 'y,,' }).result.ok, true);
});

test('anything but a SCRAM-SHA-256 verifier is refused by the parser', () => {
  for (const bad of [
    null, undefined, '', 'md5a3556571e93b0d20722ba62be61e8c2d', 'secret', 'SCRAM-SHA-256$4096:abc',
    'SCRAM-SHA-256$0:rqsNhr7gVDjYdyFIBDtj9A==$HL0G/VWiTJIVSqkjADd1Hz9Em1sev41zR35Jl9ZlOq0=:OghczXwmt2EgT6XeihEAJXYd8CUn/NMh99WNprq+Byo=',
    'SCRAM-SHA-256$4096:rqsNhr7gVDjYdyFIBDtj9A==$HL0G/VWiTJIVSqkjADd1Hz9Em1sev41zR35Jl9ZlOq0=:AAAA',
    'SCRAM-SHA-256$4096:r!sNhr7gVDjYdyFIBDtj9A==$HL0G/VWiTJIVSqkjADd1Hz9Em1sev41zR35Jl9ZlOq0=:OghczXwmt2EgT6XeihEAJXYd8CUn/NMh99WNprq+Byo=',
    `${PG_APP}$extra`,
  ]) {
    assert.equal(parseScramVerifier(bad), null, String(bad));
  }
});

test('mock exchange (unknown role, md5 or no password): looks real, always fails', () => {
  const a = server(null);
  const c = scramClient('secret');
  const first = a.clientFirst(c.first);
  assert.match(first, /^r=[^,]+,s=[A-Za-z0-9+/]{22}==,i=4096$/);
  assert.deepEqual(a.clientFinal(c.final(first)), { ok: false });
  // The salt is stable for a name (as a real role's is) and differs between names.
  const salt = (s: ScramServer) => /s=([^,]+)/.exec(s.clientFirst(Buffer.from('n,,n=,r=abc')))![1];
  assert.equal(salt(server(null)), salt(server(null)));
  assert.notEqual(salt(server(null)), salt(server(null, { user: 'other' })));
  assert.notEqual(salt(server(null)), salt(server(null, { mockKey: crypto.randomBytes(32) })));
});

test('client-first protocol errors carry Postgres SQLSTATEs', () => {
  const first = (msg: string | null, extra: Partial<ScramServerOptions> = {}) => () => server(PG_APP, extra).clientFirst(msg === null ? null : Buffer.from(msg));
  assertPgError(first(null), '08P01', /malformed SCRAM message The message is empty/);
  assertPgError(first(''), '08P01', /The message is empty/);
  assertPgError(first('n'), '08P01', /Comma expected/);
  assertPgError(first('x,,n=,r=abc'), '08P01', /Unexpected channel-binding flag "x"/);
  assertPgError(first('p=tls-server-end-point,,n=,r=abc'), '08P01', /selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data/);
  assertPgError(first('n,a=admin,n=,r=abc'), '0A000', /authorization identity/);
  assertPgError(first('n,,m=ext,n=,r=abc'), '0A000', /unsupported SCRAM extension/);
  assertPgError(first('n,,r=abc'), '08P01', /Expected attribute "n"/);
  assertPgError(first('n,,n=app'), '08P01', /Expected attribute "r" but found end of string/);
  assertPgError(first('n,,n=,r='), '08P01', /non-printable/);
  assertPgError(first('n,,n=,r=ab\x01c'), '08P01', /non-printable/);
  assertPgError(first('n,,n=,r=abc,!bad'), '08P01', /Unexpected attribute/);
  assertPgError(first('n,,n=,r=a\0bc'), '08P01', /Invalid characters/);
  // A downgrade: the client could bind, thinks we cannot, but we offered PLUS.
  const binding = crypto.randomBytes(32);
  assertPgError(first('y,,n=,r=abc', { channelBinding: binding }), '08P01', /SCRAM channel binding negotiation error/);
  const plus = { mechanism: SCRAM_SHA_256_PLUS, channelBinding: binding } as const;
  assertPgError(first('n,,n=,r=abc', plus), '08P01', /selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data/);
  assertPgError(first('p=tls-unique,,n=,r=abc', plus), '08P01', /unsupported SCRAM channel-binding type "tls-unique"/);
  assert.throws(() => new ScramServer({ verifier: null, user: 'app', mockKey, mechanism: SCRAM_SHA_256_PLUS, channelBinding: null }));
});

test('client-final protocol errors', () => {
  const started = () => {
    const s = server(PG_APP);
    const serverFirst = s.clientFirst(Buffer.from('n,,n=,r=clientnonce'));
    return { s, nonce: /r=([^,]+)/.exec(serverFirst)![1] };
  };
  const proof = Buffer.alloc(32).toString('base64');
  const cases: Array<[(nonce: string) => string, RegExp]> = [
    [() => '', /The message is empty/],
    [(n) => `r=${n},p=${proof}`, /Expected attribute "c"/],
    [(n) => `c=eSws,r=${n},p=${proof}`, /unexpected SCRAM channel-binding attribute/], // 'y,,' but we got 'n,,'
    [() => `c=biws,r=wrongnonce,p=${proof}`, /invalid SCRAM response Nonce does not match/],
    [(n) => `c=biws,r=${n}`, /Expected attribute "p" but found end of string/],
    [(n) => `c=biws,r=${n},p=AAAA`, /Malformed proof/],
    [(n) => `c=biws,r=${n},p=${proof},x=1`, /Garbage found at the end of client-final-message/],
    [(n) => `c=biws,r=${n},p=not base64!`, /Malformed proof/],
  ];
  for (const [msg, re] of cases) {
    const { s, nonce } = started();
    assertPgError(() => s.clientFinal(Buffer.from(msg(nonce))), '08P01', re);
  }
  // Extensions before the proof are ignored, as Postgres does; the proof is then checked.
  const { s, nonce } = started();
  assert.deepEqual(s.clientFinal(Buffer.from(`c=biws,r=${nonce},x=ext,p=${proof}`)), { ok: false });
  assert.throws(() => s.clientFinal(Buffer.from('c=biws')), /out of order/);
});

test('SCRAM-SHA-256-PLUS with tls-server-end-point', async () => {
  const pems = await generate([{ name: 'commonName', value: 'test' }], { keyType: 'ec', algorithm: 'sha256' });
  const der = new crypto.X509Certificate(pems.cert).raw;
  const binding = tlsServerEndPoint(der)!;
  assert.deepEqual(binding, crypto.createHash('sha256').update(der).digest());
  const plus = { mechanism: SCRAM_SHA_256_PLUS, channelBinding: binding } as const;
  const gs2 = 'p=tls-server-end-point,,';

  const ok = exchange(server(PG_APP, plus), 'secret', { gs2, cbind: binding });
  assert.equal(ok.result.ok && ok.result.serverFinal, ok.expected);
  assert.deepEqual(exchange(server(PG_APP, plus), 'wrong', { gs2, cbind: binding }).result, { ok: false });
  // The client saw another certificate (a man in the middle): refused before the proof counts.
  assertPgError(() => exchange(server(PG_APP, plus), 'secret', { gs2, cbind: crypto.randomBytes(32) }), '08P01', /SCRAM channel binding check failed/);
  assertPgError(() => exchange(server(PG_APP, plus), 'secret', { gs2 }), '08P01', /SCRAM channel binding check failed/);
});

test('tls-server-end-point hash follows the certificate signature (MD5/SHA-1 become SHA-256)', async () => {
  const hashOf = async (opts: Parameters<typeof generate>[1]) =>
    certificateBindingHash(new crypto.X509Certificate((await generate(undefined, opts)).cert).raw);
  assert.equal(await hashOf({ keyType: 'ec', algorithm: 'sha256' }), 'sha256');
  assert.equal(await hashOf({ keyType: 'ec', curve: 'P-384', algorithm: 'sha384' }), 'sha384');
  assert.equal(await hashOf({ keyType: 'rsa', keySize: 1024, algorithm: 'sha1' }), 'sha256');
  assert.equal(await hashOf({ keyType: 'rsa', keySize: 1024, algorithm: 'sha512' }), 'sha512');
  assert.equal(certificateBindingHash(Buffer.from('not a certificate')), null);
  assert.equal(certificateBindingHash(Buffer.alloc(0)), null);
  assert.equal(tlsServerEndPoint(Buffer.from([0x30, 0x82, 0xff])), null);
});
