/**
 * SCRAM-SHA-256 and SCRAM-SHA-256-PLUS, server side (RFC 5802, RFC 7677; channel
 * binding type tls-server-end-point, RFC 5929), verifying against the verifier text
 * Postgres keeps in pg_authid.rolpassword:
 *
 *     SCRAM-SHA-256$<iterations>:<salt base64>$<StoredKey base64>:<ServerKey base64>
 *
 * The server never sees or keeps a password: the client proves it knows the key whose
 * hash is StoredKey, and the server proves it holds ServerKey. Protocol errors are
 * PgErrors with the SQLSTATEs and texts Postgres uses (auth/scram.c); a wrong proof is a
 * result, not an exception, so the caller reports every failure the same way.
 */
import crypto from 'node:crypto';
import { PgError, SQLSTATE } from '../protocol/errors.ts';

export const SCRAM_SHA_256 = 'SCRAM-SHA-256';
export const SCRAM_SHA_256_PLUS = 'SCRAM-SHA-256-PLUS';
/** Postgres's default scram_iterations, used for the mock exchange of unknown roles. */
export const DEFAULT_ITERATIONS = 4096;
const KEY_LEN = 32; // SHA-256 output
const SALT_LEN = 16; // Postgres's SCRAM_DEFAULT_SALT_LEN
const RAW_NONCE_LEN = 18; // Postgres's SCRAM_RAW_NONCE_LEN

export interface ScramVerifier {
  iterations: number;
  salt: Buffer;
  storedKey: Buffer;
  serverKey: Buffer;
}

const B64 = /^[A-Za-z0-9+/]*={0,2}$/;

/** Parses a pg_authid.rolpassword value; null for anything that is not a SCRAM-SHA-256 verifier (md5, NULL, garbage). */
export function parseScramVerifier(text: string | null | undefined): ScramVerifier | null {
  if (!text) return null;
  const m = /^SCRAM-SHA-256\$(\d{1,10}):([^$:]+)\$([^$:]+):([^$:]+)$/.exec(text);
  if (!m) return null;
  const iterations = Number(m[1]);
  if (!Number.isSafeInteger(iterations) || iterations < 1) return null;
  if (![m[2], m[3], m[4]].every((s) => B64.test(s) && s.length % 4 === 0)) return null;
  const salt = Buffer.from(m[2], 'base64');
  const storedKey = Buffer.from(m[3], 'base64');
  const serverKey = Buffer.from(m[4], 'base64');
  if (salt.length === 0 || storedKey.length !== KEY_LEN || serverKey.length !== KEY_LEN) return null;
  return { iterations, salt, storedKey, serverKey };
}

export const formatScramVerifier = (v: ScramVerifier) =>
  `SCRAM-SHA-256$${v.iterations}:${v.salt.toString('base64')}$${v.storedKey.toString('base64')}:${v.serverKey.toString('base64')}`;

const hmac = (key: Buffer, data: string | Buffer) => crypto.createHmac('sha256', key).update(data).digest();
const sha256 = (data: Buffer) => crypto.createHash('sha256').update(data).digest();

/**
 * SASLprep as libpq and node-postgres apply it (RFC 4013 mapping + NFKC, no
 * prohibition checks); ASCII passwords are unchanged.
 */
export function saslprep(password: string): string {
  return password
    .replace(/[\u00A0\u1680\u2000-\u200B\u202F\u205F\u3000]/g, ' ')
    // eslint-disable-next-line no-misleading-character-class
    .replace(/[\u00AD\u034F\u1806\u180B\u180C\u180D\u200C\u200D\u2060\uFE00-\uFE0F\uFEFF]/g, '')
    .normalize('NFKC');
}

/** SaltedPassword = Hi(password, salt, i), and the keys derived from it. */
export function scramKeys(password: string, salt: Buffer, iterations: number): { clientKey: Buffer; storedKey: Buffer; serverKey: Buffer } {
  const salted = crypto.pbkdf2Sync(saslprep(password), salt, iterations, KEY_LEN, 'sha256');
  const clientKey = hmac(salted, 'Client Key');
  return { clientKey, storedKey: sha256(clientKey), serverKey: hmac(salted, 'Server Key') };
}

/**
 * Builds a verifier from a password, as `SET password_encryption = 'scram-sha-256'`
 * would. The gateway never needs this (it only verifies); it is for tools and tests.
 */
export function buildScramVerifier(password: string, opts: { salt?: Buffer; iterations?: number } = {}): string {
  const salt = opts.salt ?? crypto.randomBytes(SALT_LEN);
  const iterations = opts.iterations ?? DEFAULT_ITERATIONS;
  const { storedKey, serverKey } = scramKeys(password, salt, iterations);
  return formatScramVerifier({ iterations, salt, storedKey, serverKey });
}

/**
 * A verifier for a role that does not exist or cannot use SCRAM, so that the exchange
 * looks the same as for a real role (Postgres's "mock authentication"): the salt is
 * stable per user name and key, the keys are random, so the proof can never match.
 * Gateways that share `mockKey` give the same salt for the same unknown name.
 */
export function mockScramVerifier(user: string, mockKey: Buffer, iterations = DEFAULT_ITERATIONS): ScramVerifier {
  return {
    iterations,
    salt: hmac(mockKey, `mock-salt:${user}`).subarray(0, SALT_LEN),
    storedKey: crypto.randomBytes(KEY_LEN),
    serverKey: crypto.randomBytes(KEY_LEN),
  };
}

// --- tls-server-end-point (RFC 5929 section 4.1) -------------------------------------------

const SIGNATURE_HASHES: Record<string, string> = {
  // RSA PKCS#1 v1.5; MD5 and SHA-1 are replaced by SHA-256 as RFC 5929 says
  '1.2.840.113549.1.1.4': 'sha256',
  '1.2.840.113549.1.1.5': 'sha256',
  '1.2.840.113549.1.1.14': 'sha224',
  '1.2.840.113549.1.1.11': 'sha256',
  '1.2.840.113549.1.1.12': 'sha384',
  '1.2.840.113549.1.1.13': 'sha512',
  // ECDSA
  '1.2.840.10045.4.1': 'sha256',
  '1.2.840.10045.4.3.1': 'sha224',
  '1.2.840.10045.4.3.2': 'sha256',
  '1.2.840.10045.4.3.3': 'sha384',
  '1.2.840.10045.4.3.4': 'sha512',
};

/** Reads one DER TLV header at `at`: its tag, where its content starts and how long it is. */
function derHeader(der: Buffer, at: number): { tag: number; start: number; len: number } {
  if (at + 2 > der.length) throw new Error('truncated DER');
  const tag = der[at];
  let len = der[at + 1];
  let start = at + 2;
  if (len & 0x80) {
    const n = len & 0x7f;
    if (n < 1 || n > 4 || start + n > der.length) throw new Error('bad DER length');
    len = 0;
    for (let i = 0; i < n; i++) len = len * 256 + der[start + i];
    start += n;
  }
  if (start + len > der.length) throw new Error('truncated DER');
  return { tag, start, len };
}

function derOid(bytes: Buffer): string {
  const parts = [Math.floor(bytes[0] / 40), bytes[0] % 40];
  let v = 0;
  for (let i = 1; i < bytes.length; i++) {
    v = v * 128 + (bytes[i] & 0x7f);
    if (!(bytes[i] & 0x80)) {
      parts.push(v);
      v = 0;
    }
  }
  return parts.join('.');
}

/**
 * The hash a certificate's tls-server-end-point binding uses (that of its signature
 * algorithm), or null when Postgres could not bind to it either (RSASSA-PSS, EdDSA, ...).
 */
export function certificateBindingHash(der: Buffer): string | null {
  try {
    const cert = derHeader(der, 0); // Certificate ::= SEQUENCE {
    if (cert.tag !== 0x30) return null;
    const tbs = derHeader(der, cert.start); //   tbsCertificate SEQUENCE,
    const alg = derHeader(der, tbs.start + tbs.len); //   signatureAlgorithm SEQUENCE { OID, params }
    if (tbs.tag !== 0x30 || alg.tag !== 0x30) return null;
    const oid = derHeader(der, alg.start);
    if (oid.tag !== 0x06) return null;
    return SIGNATURE_HASHES[derOid(der.subarray(oid.start, oid.start + oid.len))] ?? null;
  } catch {
    return null;
  }
}

/** The channel-binding data for a server certificate (DER), or null if it has none. */
export function tlsServerEndPoint(der: Buffer): Buffer | null {
  const hash = certificateBindingHash(der);
  return hash ? crypto.createHash(hash).update(der).digest() : null;
}

// --- the exchange ---------------------------------------------------------------------------

const malformed = (detail: string) => new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, 'malformed SCRAM message', detail);

/** printable = %x21-2B / %x2D-7E (no comma) */
const isPrintable = (s: string) => s.length > 0 && /^[\x21-\x2b\x2d-\x7e]+$/.test(s);

/** Splits "a=v,b=w" attributes; values contain no commas (RFC 5802 section 5.1). */
function readAttr(parts: string[], i: number, name: string): string {
  const p = parts[i];
  if (p === undefined || p.length < 2 || p[0] !== name || p[1] !== '=') {
    throw malformed(p === undefined ? `Expected attribute "${name}" but found end of string.` : `Expected attribute "${name}" but found "${sanitize(p)}".`);
  }
  return p.slice(2);
}

const sanitize = (s: string) => s.slice(0, 30).replace(/[^\x20-\x7e]/g, '?');

export interface ScramServerOptions {
  /** The role's parsed verifier; null for a mock exchange that always fails (unknown role, md5, no password). */
  verifier: ScramVerifier | null;
  /** Used for the mock salt when `verifier` is null. */
  user: string;
  mockKey: Buffer;
  /** The mechanism the client picked (must be one the server offered). */
  mechanism: typeof SCRAM_SHA_256 | typeof SCRAM_SHA_256_PLUS;
  /**
   * tls-server-end-point data of this connection's certificate when the server offered
   * SCRAM-SHA-256-PLUS (the connection is TLS and the certificate allows binding); null
   * otherwise. Decides how the client's gs2 flag is judged, as in Postgres.
   */
  channelBinding: Buffer | null;
  /** Tests only: a fixed server nonce part instead of a random one. */
  serverNonce?: string;
}

export type ScramResult = { ok: true; serverFinal: string } | { ok: false };

/**
 * One SCRAM exchange: `clientFirst()` returns the server-first-message,
 * `clientFinal()` checks the proof and returns the server-final-message.
 */
export class ScramServer {
  private readonly verifier: ScramVerifier;
  private readonly mock: boolean;
  private state: 'first' | 'final' | 'done' = 'first';
  private gs2Header = '';
  private clientFirstBare = '';
  private serverFirst = '';
  private nonce = '';

  constructor(private readonly opts: ScramServerOptions) {
    this.mock = opts.verifier === null;
    this.verifier = opts.verifier ?? mockScramVerifier(opts.user, opts.mockKey);
    if (opts.mechanism === SCRAM_SHA_256_PLUS && !opts.channelBinding) {
      throw new Error('SCRAM-SHA-256-PLUS needs the channel-binding data');
    }
  }

  /** client-first-message → server-first-message. */
  clientFirst(input: Buffer | null): string {
    if (this.state !== 'first') throw new Error('clientFirst called twice');
    if (!input || input.length === 0) throw malformed('The message is empty.');
    const msg = decodeUtf8(input);
    const plus = this.opts.mechanism === SCRAM_SHA_256_PLUS;

    // gs2-header = gs2-cbind-flag "," [ authzid ] ","
    const c1 = msg.indexOf(',');
    if (c1 < 0) throw malformed('Comma expected, but found end of string.');
    const flag = msg.slice(0, c1);
    if (flag === 'n') {
      if (plus) throw malformed('The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data.');
    } else if (flag === 'y') {
      if (plus) throw malformed('The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data.');
      // The client could bind but believes we cannot: on TLS we offered PLUS, so
      // someone stripped it (a downgrade); refuse like Postgres.
      if (this.opts.channelBinding) {
        throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, 'SCRAM channel binding negotiation error',
          'The client supports SCRAM channel binding but thinks the server does not.  However, this server does support channel binding.');
      }
    } else if (flag.startsWith('p=')) {
      if (!plus) throw malformed('The client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data.');
      if (flag !== 'p=tls-server-end-point') {
        throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, `unsupported SCRAM channel-binding type "${sanitize(flag.slice(2))}"`);
      }
    } else {
      throw malformed(`Unexpected channel-binding flag "${sanitize(flag)}".`);
    }
    const rest = msg.slice(c1 + 1);
    if (rest.startsWith('a=')) throw new PgError('FATAL', SQLSTATE.FEATURE_NOT_SUPPORTED, 'client uses authorization identity, but it is not supported');
    if (!rest.startsWith(',')) throw malformed(`Unexpected attribute "${sanitize(rest.slice(0, 1))}" in client-first-message.`);
    this.gs2Header = msg.slice(0, c1 + 2);
    this.clientFirstBare = rest.slice(1);

    const parts = this.clientFirstBare.split(',');
    if (parts[0]?.startsWith('m=')) throw new PgError('FATAL', SQLSTATE.FEATURE_NOT_SUPPORTED, 'client requires an unsupported SCRAM extension');
    readAttr(parts, 0, 'n'); // the user name in the message is ignored: the startup packet's counts
    const clientNonce = readAttr(parts, 1, 'r');
    if (!isPrintable(clientNonce)) throw malformed('non-printable characters in SCRAM nonce');
    for (const ext of parts.slice(2)) {
      if (!/^[A-Za-z]=/.test(ext)) throw malformed(`Unexpected attribute "${sanitize(ext)}" in client-first-message.`);
    }

    const serverNonce = this.opts.serverNonce ?? crypto.randomBytes(RAW_NONCE_LEN).toString('base64');
    this.nonce = clientNonce + serverNonce;
    this.serverFirst = `r=${this.nonce},s=${this.verifier.salt.toString('base64')},i=${this.verifier.iterations}`;
    this.state = 'final';
    return this.serverFirst;
  }

  /** client-final-message → the verdict, and server-final-message when the proof holds. */
  clientFinal(input: Buffer | null): ScramResult {
    if (this.state !== 'final') throw new Error('clientFinal called out of order');
    this.state = 'done';
    if (!input || input.length === 0) throw malformed('The message is empty.');
    const msg = decodeUtf8(input);
    const parts = msg.split(',');

    // c= base64(gs2-header [ cbind-data ])
    const cbind = readAttr(parts, 0, 'c');
    if (!B64.test(cbind)) throw malformed('Invalid channel binding data.');
    const expected = Buffer.concat([
      Buffer.from(this.gs2Header),
      this.opts.mechanism === SCRAM_SHA_256_PLUS ? this.opts.channelBinding! : Buffer.alloc(0),
    ]);
    if (!safeEqual(Buffer.from(cbind, 'base64'), expected)) {
      if (this.opts.mechanism === SCRAM_SHA_256_PLUS) {
        throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, 'SCRAM channel binding check failed');
      }
      throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, 'unexpected SCRAM channel-binding attribute in client-final-message');
    }
    const nonce = readAttr(parts, 1, 'r');
    // optional extensions, then the proof, which must be last
    let i = 2;
    while (i < parts.length && !parts[i].startsWith('p=')) {
      if (!/^[A-Za-z]=/.test(parts[i])) throw malformed(`Unexpected attribute "${sanitize(parts[i])}" in client-final-message.`);
      i++;
    }
    const proofText = readAttr(parts, i, 'p');
    if (i !== parts.length - 1) throw malformed('Garbage found at the end of client-final-message.');
    if (!B64.test(proofText) || proofText.length % 4 !== 0) throw malformed('Malformed proof in client-final-message.');
    const proof = Buffer.from(proofText, 'base64');
    if (proof.length !== KEY_LEN) throw malformed('Malformed proof in client-final-message.');
    if (!safeEqual(Buffer.from(nonce), Buffer.from(this.nonce))) {
      throw new PgError('FATAL', SQLSTATE.PROTOCOL_VIOLATION, 'invalid SCRAM response', 'Nonce does not match.');
    }

    const withoutProof = msg.slice(0, msg.length - proofText.length - 3); // drop ",p=<proof>"
    const authMessage = `${this.clientFirstBare},${this.serverFirst},${withoutProof}`;
    const clientSignature = hmac(this.verifier.storedKey, authMessage);
    const clientKey = Buffer.alloc(KEY_LEN);
    for (let k = 0; k < KEY_LEN; k++) clientKey[k] = proof[k] ^ clientSignature[k];
    const matches = crypto.timingSafeEqual(sha256(clientKey), this.verifier.storedKey);
    if (!matches || this.mock) return { ok: false };
    return { ok: true, serverFinal: `v=${hmac(this.verifier.serverKey, authMessage).toString('base64')}` };
  }
}

/** Constant time for equal lengths; different lengths are unequal (lengths are not secret here). */
function safeEqual(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}

function decodeUtf8(b: Buffer): string {
  const s = b.toString('utf8');
  if (s.includes('\0')) throw malformed('Invalid characters in SCRAM message.');
  return s;
}
