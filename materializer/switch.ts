/**
 * What switch-traffic, reverse-traffic and complete do to the moved tables
 * (decisions 0040, 0046): freeze the writes of the side that stops serving
 * (a statement trigger that raises MOVED_WRITES_SQLSTATE, installed under a
 * lock that waits for the writes in flight), leave a marker change in each
 * table's change stream, let the side that serves take writes again, and at
 * the end retire the source tables by moving them into a schema of their own.
 * The materializer's own apply passes the trigger (session_replication_role).
 */
import type pg from 'pg';
import { MOVED_WRITES_SQLSTATE } from '../schemas/index.ts';
import { quoteIdent, type MovedTable } from './tables.ts';

/** How long the freeze waits for the writes in flight on the source tables before it gives up (the switch then fails, nothing changed). */
const LOCK_TIMEOUT = '3s';

/** The trigger that refuses clients' writes on the side that stops serving (a frozen table). */
export const FREEZE_TRIGGER = 'mg_moved_writes';

const REFUSE_FUNCTION = `CREATE SCHEMA IF NOT EXISTS mg_materializer;
CREATE OR REPLACE FUNCTION mg_materializer.refuse_moved_writes() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
  RAISE EXCEPTION USING ERRCODE = '${MOVED_WRITES_SQLSTATE}',
    MESSAGE = format('writes to %I.%I moved to database %s (workflow %s)', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0], TG_ARGV[1]),
    HINT = 'Write through the gateway: it sends the statement to the database that serves the table now.';
END
$fn$`;

export interface Frozen {
  /** The frozen database's WAL position once the writes stopped: every change before it is one to apply. */
  lsn: bigint;
  /** Per table: whether a marker change (a no-op update of one row, committed after `lsn`) is in its stream; false for an empty table. */
  marked: boolean[];
}

/**
 * One transaction on a shard of the side that stops serving: EXCLUSIVE locks
 * (reads go on, writes wait: those in flight finish first), a no-op update of
 * one row per table as the stream's marker, the trigger refusing writes (its
 * message names `servingDatabase`), and the WAL position.
 */
export async function freezeWrites(client: pg.Client, tables: MovedTable[], servingDatabase: string, workflow: string): Promise<Frozen> {
  await client.query('BEGIN');
  try {
    await client.query(`SET LOCAL lock_timeout = '${LOCK_TIMEOUT}'`);
    await client.query(`LOCK TABLE ${tables.map((t) => t.sql).join(', ')} IN EXCLUSIVE MODE`);
    await client.query(REFUSE_FUNCTION);
    const marked: boolean[] = [];
    for (const t of tables) {
      const k = quoteIdent(t.key[0]);
      await client.query(`DROP TRIGGER IF EXISTS ${FREEZE_TRIGGER} ON ${t.sql}`); // first: a freeze run again replaces it
      const r = await client.query(`UPDATE ${t.sql} SET ${k} = ${k} WHERE ctid = (SELECT ctid FROM ${t.sql} LIMIT 1)`);
      marked.push(r.rowCount === 1);
      await client.query(`CREATE TRIGGER ${FREEZE_TRIGGER} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON ${t.sql}
        FOR EACH STATEMENT EXECUTE FUNCTION mg_materializer.refuse_moved_writes(${literal(servingDatabase)}, ${literal(workflow)})`);
    }
    const { rows: [{ lsn }] } = await client.query<{ lsn: string }>("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::text AS lsn");
    await client.query('COMMIT');
    return { lsn: BigInt(lsn), marked };
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  }
}

/** The shard takes clients' writes again: the side that now serves, or a freeze whose switch could not finish. */
export async function thawWrites(client: pg.Client, tables: MovedTable[]): Promise<void> {
  for (const t of tables) await client.query(`DROP TRIGGER IF EXISTS ${FREEZE_TRIGGER} ON ${t.sql}`);
}

/** complete: the source tables leave for schema mg_moved_<workflow> (kept, still refusing writes, for the operator to drop). */
export async function retireSource(source: pg.Client, tables: Array<Pick<MovedTable, 'sql'>>, workflow: string): Promise<string> {
  const schema = `mg_moved_${workflow}`;
  await source.query('BEGIN');
  try {
    await source.query(`CREATE SCHEMA IF NOT EXISTS ${quoteIdent(schema)}`);
    for (const t of tables) await source.query(`ALTER TABLE IF EXISTS ${t.sql} SET SCHEMA ${quoteIdent(schema)}`);
    await source.query('COMMIT');
  } catch (err) {
    await source.query('ROLLBACK').catch(() => {});
    throw err;
  }
  return schema;
}

const literal = (s: string) => `'${s.replace(/'/g, "''")}'`;
