/** Plumbing for control-plane SQL: one statement on one short-lived connection, never hanging. */
import pg from 'pg';

export interface PostgresAddress {
  host: string;
  port: number;
}

/**
 * One statement on `postgres` at `at`, on its own connection. Past timeoutMs the
 * socket is destroyed (a hung server never answers), and the call rejects.
 */
export async function queryAt<T extends pg.QueryResultRow>(at: PostgresAddress, sql: string, params: unknown[] = [], timeoutMs = 5_000): Promise<T[]> {
  const client = new pg.Client({ host: at.host, port: at.port, user: 'postgres', database: 'postgres', application_name: 'mg-control' });
  client.on('error', () => {});
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer from ${at.host}:${at.port} within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    return await Promise.race([
      (async () => {
        await client.connect();
        const { rows } = await client.query<T>(sql, params);
        await client.end();
        return rows;
      })(),
      timeout,
    ]);
  } finally {
    clearTimeout(timer);
    client.connection.stream.destroy();
  }
}

