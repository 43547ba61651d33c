/** Plumbing for control-plane SQL: short-lived connections that never hang. */
import pg from 'pg';

export interface PostgresAddress {
  host: string;
  port: number;
  /** Default `postgres`. */
  database?: string;
}

/**
 * Runs `work` on one connection to the database at `at`. Past timeoutMs the
 * socket is destroyed (a hung server never answers), and the call rejects.
 */
export async function withConnection<T>(at: PostgresAddress, work: (client: pg.Client) => Promise<T>, timeoutMs = 5_000): Promise<T> {
  const client = new pg.Client({ host: at.host, port: at.port, user: 'postgres', database: at.database ?? 'postgres', application_name: 'mg-control' });
  client.on('error', () => {});
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer from ${at.host}:${at.port} within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    return await Promise.race([
      (async () => {
        await client.connect();
        const result = await work(client);
        await client.end();
        return result;
      })(),
      timeout,
    ]);
  } finally {
    clearTimeout(timer);
    client.connection.stream.destroy();
  }
}

/** One statement on its own connection (see withConnection). */
export async function queryAt<T extends pg.QueryResultRow>(at: PostgresAddress, sql: string, params: unknown[] = [], timeoutMs = 5_000): Promise<T[]> {
  return withConnection(at, async (c) => (await c.query<T>(sql, params)).rows, timeoutMs);
}

/**
 * Sets the `postgres` role's password (the login role: the gateway's SCRAM and, in pods, other
 * pods' connections check it). Postgres stores only its SCRAM verifier.
 */
export async function setLoginPassword(client: pg.ClientBase, password: string): Promise<void> {
  await client.query(`SET password_encryption = 'scram-sha-256'`);
  await client.query(`ALTER ROLE postgres PASSWORD ${client.escapeLiteral(password)}`);
}
