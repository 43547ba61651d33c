/**
 * JWTs in `Authorization: Bearer`: the role claim becomes the transaction's
 * role, the claims `request.jwt.claims`. The secret is PostgREST's
 * `jwt-secret`: a shared HS256 secret, or a JWK or JWKS (JSON) whose keys may
 * sign with HS256/384/512, RS256/384/512 or ES256/384/512 (any key that
 * verifies with the token's algorithm will do: PostgREST 12 does not select
 * keys by `kid` or `alg`).
 * Hand-written over node:crypto so the failures carry PostgREST's PGRST301
 * messages, which clients and tests match on.
 */
import { createHmac, createPublicKey, timingSafeEqual, verify, type JsonWebKey, type KeyObject } from 'node:crypto';
import { RestError } from './errors.ts';

export interface Auth {
  role: string;
  claims: Record<string, unknown>;
  /** A token was given (a 42501 is then 403, not 401). */
  authenticated: boolean;
}

const invalid = (message: string) =>
  new RestError(401, 'PGRST301', message, null, null, { 'WWW-Authenticate': `Bearer error="invalid_token", error_description=${JSON.stringify(message)}` });

function decodeJson(part: string): Record<string, unknown> {
  if (!/^[A-Za-z0-9_-]*$/.test(part)) throw invalid('JWSError (JSONDecodeError "Not valid base64url")');
  try {
    const v = JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
    return v;
  } catch {
    throw invalid('JWSError (JSONDecodeError "Not valid base64url")');
  }
}

/** A key that may sign; a JWK's `alg` and `kid` are not consulted (PostgREST 12 does not either). */
type Key = { kind: 'hmac'; secret: Buffer } | { kind: 'public'; key: KeyObject };

const HASHES: Record<string, string> = {
  HS256: 'sha256', HS384: 'sha384', HS512: 'sha512', RS256: 'sha256', RS384: 'sha384', RS512: 'sha512', ES256: 'sha256', ES384: 'sha384', ES512: 'sha512',
};

const parsedKeys = new Map<string, Key[] | null>();

/** The keys of a JWK or JWKS secret (null: a plain shared secret); parsed once per secret. */
function jwkKeys(secret: string): Key[] | null {
  let keys = parsedKeys.get(secret);
  if (keys !== undefined) return keys;
  keys = null;
  if (secret.trimStart().startsWith('{')) {
    try {
      const json = JSON.parse(secret) as { keys?: JsonWebKey[] } & JsonWebKey;
      keys = (json.keys ?? [json]).map((k): Key => (k.kty === 'oct'
        ? { kind: 'hmac', secret: Buffer.from(String(k.k ?? ''), 'base64url') }
        : { kind: 'public', key: createPublicKey({ key: k, format: 'jwk' }) }));
    } catch {
      keys = null; // not a JWK: the text is the shared secret, as for PostgREST
    }
  }
  parsedKeys.set(secret, keys);
  return keys;
}

function verifies(key: Key, alg: string, data: Buffer, signature: Buffer): boolean {
  const hash = HASHES[alg];
  if (!hash) return false;
  if (key.kind === 'hmac') {
    const expected = createHmac(hash, key.secret).update(data).digest();
    return alg.startsWith('HS') && expected.length === signature.length && timingSafeEqual(expected, signature);
  }
  const type = key.key.asymmetricKeyType;
  if (alg.startsWith('RS') && type === 'rsa') return verify(hash, data, key.key, signature);
  if (alg.startsWith('ES') && type === 'ec') return verify(hash, data, { key: key.key, dsaEncoding: 'ieee-p1363' }, signature);
  return false;
}

export function authenticate(authorization: string | undefined, opts: { secret?: string; anonRole?: string; roleClaim?: string }, now = Date.now()): Auth {
  if (!authorization) {
    if (!opts.anonRole) throw new RestError(401, 'PGRST302', 'Anonymous access is disabled', null, null, { 'WWW-Authenticate': 'Bearer' });
    return { role: opts.anonRole, claims: { role: opts.anonRole }, authenticated: false };
  }
  const m = /^Bearer\s+(\S+)\s*$/i.exec(authorization);
  if (!m) throw invalid('JWSError (CompactDecodeError Invalid number of parts: Expected 3 parts; got 1)');
  if (!opts.secret) throw new RestError(500, 'PGRST300', 'Server lacks JWT secret');
  const parts = m[1].split('.');
  if (parts.length !== 3) throw invalid(`JWSError (CompactDecodeError Invalid number of parts: Expected 3 parts; got ${parts.length})`);
  const header = decodeJson(parts[0]);
  const claims = decodeJson(parts[1]);
  const data = Buffer.from(`${parts[0]}.${parts[1]}`);
  const given = Buffer.from(parts[2], 'base64url');
  const keys = jwkKeys(opts.secret);
  if (!keys && header.alg !== 'HS256') throw invalid('JWSError (JWSInvalidAlgorithm)');
  const alg = String(header.alg);
  if (!(keys ?? [{ kind: 'hmac', secret: Buffer.from(opts.secret) } as Key]).some((k) => verifies(k, alg, data, given))) throw invalid('JWSError JWSInvalidSignature');
  const nowS = Math.floor(now / 1000);
  if (typeof claims.exp === 'number' && nowS > claims.exp + 30) throw invalid('JWT expired');
  if (typeof claims.nbf === 'number' && nowS < claims.nbf - 30) throw invalid('JWTNotYetValid');
  const role = claims[opts.roleClaim ?? 'role'];
  if (role !== undefined && typeof role !== 'string') throw invalid('JWSError JWSInvalidSignature');
  const chosen = role ?? opts.anonRole;
  if (!chosen) throw new RestError(401, 'PGRST302', 'Anonymous access is disabled', null, null, { 'WWW-Authenticate': 'Bearer' });
  return { role: chosen, claims, authenticated: true };
}
