/**
 * JWTs in `Authorization: Bearer`, HS256 with the configured secret: the role
 * claim becomes the transaction's role, the claims `request.jwt.claims`.
 * Hand-written (a dozen lines over node:crypto) so the failures carry
 * PostgREST's PGRST301 messages, which clients and tests match on.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
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
  if (header.alg !== 'HS256') throw invalid('JWSError (JWSInvalidAlgorithm)');
  const expected = createHmac('sha256', opts.secret).update(`${parts[0]}.${parts[1]}`).digest();
  const given = Buffer.from(parts[2], 'base64url');
  if (given.length !== expected.length || !timingSafeEqual(given, expected)) throw invalid('JWSError JWSInvalidSignature');
  const nowS = Math.floor(now / 1000);
  if (typeof claims.exp === 'number' && nowS > claims.exp + 30) throw invalid('JWT expired');
  if (typeof claims.nbf === 'number' && nowS < claims.nbf - 30) throw invalid('JWTNotYetValid');
  const role = claims[opts.roleClaim ?? 'role'];
  if (role !== undefined && typeof role !== 'string') throw invalid('JWSError JWSInvalidSignature');
  const chosen = role ?? opts.anonRole;
  if (!chosen) throw new RestError(401, 'PGRST302', 'Anonymous access is disabled', null, null, { 'WWW-Authenticate': 'Bearer' });
  return { role: chosen, claims, authenticated: true };
}
