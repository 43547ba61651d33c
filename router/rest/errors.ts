/**
 * PostgREST's error bodies ({code, details, hint, message}) and its mapping of
 * SQLSTATE to HTTP status (PostgREST 12 docs, "Errors").
 */
import type { DatabaseError } from 'pg';

/** A request PostgREST would refuse before (or instead of) running SQL: a PGRST code and its status. */
export class RestError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    /** Text, or PostgREST's list of objects (PGRST201's candidate relationships). */
    readonly details: string | object[] | null = null,
    readonly hint: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }

  body(): string {
    return errorBody(this.code, this.message, this.details, this.hint);
  }
}

/** Key order as PostgREST writes it. */
export function errorBody(code: string, message: string, details: string | object[] | null, hint: string | null): string {
  return JSON.stringify({ code, details, hint, message });
}

/** PostgREST's PGRST100: what failed to parse, where (1-based column in the value), and what was expected. */
export const parseError = (what: string, detail: string, column = 1) =>
  new RestError(400, 'PGRST100', `"failed to parse ${what}" (line 1, column ${column})`, detail);

/** The HTTP status PostgREST answers a Postgres error with; 42501 depends on whether the request was authenticated. */
export function statusOfSqlstate(code: string, authenticated: boolean): number {
  if (code === '42501') return authenticated ? 403 : 401;
  if (/^PT\d{3}$/.test(code)) return Number(code.slice(2)); // a function's own HTTP status, as PostgREST reads it
  if (code === '23503' || code === '23505') return 409;
  if (code === '25006') return 405;
  if (code === 'P0001') return 400;
  if (code === '42P01' || code === '42883') return 404;
  if (code === '57014') return 500;
  const cls = code.slice(0, 2);
  if (cls === '08' || cls === '53') return 503;
  if (cls === '0L' || cls === '0P' || cls === '28') return 403;
  if (['09', '25', '2D', '38', '39', '3B', '40', '54', '55', '57', '58', 'F0', 'HV', 'P0', 'XX'].includes(cls)) return 500;
  return 400;
}

export function isDatabaseError(err: unknown): err is DatabaseError {
  return typeof err === 'object' && err !== null && typeof (err as DatabaseError).code === 'string' && (err as DatabaseError).code!.length === 5
    && typeof (err as DatabaseError).severity === 'string';
}

/** A Postgres error as PostgREST reports it. */
export function fromDatabaseError(err: DatabaseError, authenticated: boolean): RestError {
  const status = statusOfSqlstate(err.code!, authenticated);
  const headers: Record<string, string> = status === 401 ? { 'WWW-Authenticate': 'Bearer' } : {};
  return new RestError(status, err.code!, err.message, err.detail ?? null, err.hint ?? null, headers);
}
