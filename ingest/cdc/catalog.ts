/**
 * What the stream needs from the Postgres catalog: type descriptions (domains
 * resolved to their base type, arrays to their element, enum labels), table
 * descriptions for the snapshot, and key columns. Queries run on an ordinary
 * SQL session; types are cached until pgoutput announces a change ('Y').
 */
import pg from 'pg';
import type { ColumnDescription, PgType, TableDescription } from '../../schemas/cdc.ts';
import { INTERNAL_SCHEMAS } from '../../schemas/internal.ts';

/** Session settings the value parsers (values.ts) rely on; the replication session gets the same. */
export const SESSION_OPTIONS = '-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c bytea_output=hex -c IntervalStyle=postgres';

/** Every value as its Postgres text form: the snapshot parses text exactly as the stream does. */
export const TEXT_TYPES = { getTypeParser: () => (v: string) => v } as unknown as pg.CustomTypesConfig;

/** Our own bookkeeping schema; its tables never appear in the stream. */
export const STATE_SCHEMA = 'mg_cdc';

export function sqlClient(opts: { host: string; port: number; database: string; applicationName: string }): pg.Client {
  return new pg.Client({
    host: opts.host, port: opts.port, database: opts.database, user: 'postgres',
    application_name: opts.applicationName, options: SESSION_OPTIONS, types: TEXT_TYPES,
  });
}

/** `work` on a connection of its own (sqlClient's), closed after it whatever happens. */
export async function withSqlClient<T>(opts: Parameters<typeof sqlClient>[0], work: (sql: pg.Client) => Promise<T>): Promise<T> {
  const sql = sqlClient(opts);
  sql.on('error', () => undefined);
  await sql.connect();
  try {
    return await work(sql);
  } finally {
    await sql.end().catch(() => undefined);
  }
}

export const quoteIdent = (s: string) => `"${s.replace(/"/g, '""')}"`;
export const qualified = (schema: string, table: string) => `${quoteIdent(schema)}.${quoteIdent(table)}`;

interface TypeRow { oid: string; typname: string; typcategory: string; typtype: string; typbasetype: string; typelem: string; labels: string | null }

export class Catalog {
  private types = new Map<number, Promise<PgType>>();

  constructor(private readonly sql: pg.Client) {}

  type(oid: number): Promise<PgType> {
    let t = this.types.get(oid);
    if (!t) {
      t = this.loadType(oid);
      t.catch(() => this.types.delete(oid));
      this.types.set(oid, t);
    }
    return t;
  }

  /** pgoutput sent a Type message: the type (e.g. an enum's labels) may have changed. */
  forgetType(oid: number): void {
    this.types.delete(oid);
  }

  private async loadType(oid: number): Promise<PgType> {
    const { rows } = await this.sql.query<TypeRow>(
      `SELECT t.oid, t.typname, t.typcategory, t.typtype, t.typbasetype, t.typelem,
              (SELECT array_to_json(array_agg(e.enumlabel ORDER BY e.enumsortorder))::text FROM pg_enum e WHERE e.enumtypid = t.oid) AS labels
         FROM pg_type t WHERE t.oid = $1`, [oid]);
    const row = rows[0];
    if (!row) throw new Error(`type oid ${oid} is not in pg_type`);
    if (row.typtype === 'd') return this.type(Number(row.typbasetype));
    const t: PgType = { oid, name: row.typname, category: row.typcategory };
    if (row.typcategory === 'A' && row.typelem !== '0') t.element = await this.type(Number(row.typelem));
    if (row.typtype === 'e') t.enumLabels = JSON.parse(row.labels ?? '[]');
    return t;
  }

  /** Primary-key column names of a table (the key of REPLICA IDENTITY FULL tables, whose pgoutput key is every column). */
  async primaryKey(schema: string, table: string): Promise<string[]> {
    const { rows } = await this.sql.query<{ attname: string }>(
      `SELECT a.attname FROM pg_index i
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
        WHERE i.indrelid = $1::regclass AND i.indisprimary
        ORDER BY array_position(i.indkey::int2[], a.attnum)`, [qualified(schema, table)]);
    return rows.map((r) => r.attname);
  }

  /**
   * A table as pgoutput would describe it (no dropped or generated columns),
   * with its replica-identity key: the primary key for DEFAULT and FULL, the
   * chosen index for USING INDEX, none for NOTHING.
   */
  async describe(schema: string, table: string): Promise<TableDescription> {
    const { rows } = await this.sql.query<{ attname: string; atttypid: string; atttypmod: string; key: 't' | 'f'; relreplident: string }>(
      `SELECT a.attname, a.atttypid, a.atttypmod, c.relreplident,
              EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND a.attnum = ANY (i.indkey) AND
                   CASE c.relreplident WHEN 'i' THEN i.indisreplident WHEN 'n' THEN false ELSE i.indisprimary END) AS key
         FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
        WHERE c.oid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
        ORDER BY a.attnum`, [qualified(schema, table)]);
    const columns: ColumnDescription[] = [];
    for (const r of rows) columns.push({ name: r.attname, type: await this.type(Number(r.atttypid)), typmod: Number(r.atttypmod), key: r.key === 't' });
    return { schema, table, columns };
  }

  /** The tables a publication covers, without the project's internal schemas. */
  async publicationTables(publication: string): Promise<Array<{ schema: string; table: string }>> {
    const { rows } = await this.sql.query<{ schemaname: string; tablename: string }>(
      'SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1 AND schemaname <> ALL($2) ORDER BY 1, 2', [publication, [...INTERNAL_SCHEMAS]]);
    return rows.map((r) => ({ schema: r.schemaname, table: r.tablename }));
  }
}
