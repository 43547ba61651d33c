/** Straight to one Postgres instance of a test cluster (not through the gateway): what an operator checks by hand. */
import pg from 'pg';

/** One statement on the instance's `postgres` database (or `database`) as `postgres` (local trust), on a connection of its own. */
export async function queryInstance<T extends pg.QueryResultRow = any>(port: number, sql: string, params: unknown[] = [], database = 'postgres'): Promise<T[]> {
  const client = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', database });
  await client.connect();
  try {
    return (await client.query<T>(sql, params)).rows;
  } finally {
    await client.end();
  }
}
