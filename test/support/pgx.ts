/**
 * The pgx test client (test/clients/pgx, Go): each statement prepared, then bound with one result
 * format code per column, binary for the types pgx reads in binary, as Go applications send them.
 */
import { execFileSync } from 'node:child_process';
import path from 'node:path';

export interface PgxResult { columns?: string[]; rows?: Array<Array<string | null>>; error?: string; code?: string }

let binary: string | undefined;

/** Runs the statements in order on one connection to `url` (string arguments as text, numbers in binary); a failed statement is a result with its error and SQLSTATE. */
export function runPgx(url: string, statements: Array<{ sql: string; args?: Array<string | number> }>): PgxResult[] {
  binary ??= execFileSync('bash', [path.join(import.meta.dirname, '../clients/pgx/build.sh')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] }).trim();
  const out = execFileSync(binary, [url], { input: JSON.stringify(statements.map((s) => ({ sql: s.sql, args: s.args ?? [] }))), encoding: 'utf8' });
  return out.trim().split('\n').map((line) => JSON.parse(line) as PgxResult);
}
