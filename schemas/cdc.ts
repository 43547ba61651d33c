/**
 * The change-event contract (CDC), pure: from a description of a table
 * (columns, Postgres types, key columns, enum labels) build the topic name and
 * the key and value Avro schemas of its change events. The ingest agent
 * produces with these; consumers (the materializer, users' own code with any
 * Confluent Avro deserializer) read them. See docs/cdc.md for the format.
 *
 * The envelope follows Debezium: `before`, `after`, `source`, `op`
 * (c, u, d, r, t), `ts_ms`, an optional `transaction` block. Two additions:
 * `unavailable` names columns whose unchanged TOASTed value was not sent, and
 * `source` carries `epoch`, `commit_lsn` and `position`, the deduplication key.
 */

/** A Postgres type as the catalog describes it (domains already resolved to their base type). */
export interface PgType {
  oid: number;
  /** pg_type.typname, e.g. int4, _int4, timestamptz, or the enum's own name. */
  name: string;
  /** pg_type.typcategory: 'A' array, 'E' enum, ... */
  category: string;
  /** Arrays: the element type. */
  element?: PgType;
  /** Enums: the labels in order. */
  enumLabels?: string[];
}

export interface ColumnDescription {
  name: string;
  type: PgType;
  /** atttypmod: carries numeric precision and scale. */
  typmod: number;
  /** Part of the event key (the primary key, or the replica-identity index). */
  key: boolean;
}

export interface TableDescription {
  schema: string;
  table: string;
  /** In the table's attribute order (dropped and generated columns left out, as pgoutput does). */
  columns: ColumnDescription[];
}

export type NumericMode = 'decimal' | 'string';

export interface CdcNaming {
  /** First part of every topic name (may itself hold dots, e.g. the cluster's topic prefix plus the stream's). */
  topicPrefix: string;
  database: string;
}

export type AvroSchema = string | AvroSchema[] | { [k: string]: unknown };

/** The marker that stands for an unchanged TOASTed value of a text or bytea column (Debezium's, so existing tooling knows it). */
export const UNAVAILABLE_VALUE = '__debezium_unavailable_value';

export const CONNECTOR = 'multigres';
export const CDC_FORMAT_VERSION = '1';

/** Change-event operations, as Debezium spells them. */
export const OPS = { create: 'c', update: 'u', delete: 'd', read: 'r', truncate: 't' } as const;
export type Op = (typeof OPS)[keyof typeof OPS];

/** `<prefix>.<database>.<schema>.<table>`, the per-table topic (Kafka allows [a-zA-Z0-9._-]; other characters become _). */
export function tableTopic(n: CdcNaming, schema: string, table: string): string {
  return [n.topicPrefix, ...[n.database, schema, table].map(topicPart)].join('.');
}

/** `<prefix>.transaction`: BEGIN/END events of transactions, when enabled. */
export function transactionTopic(n: CdcNaming): string {
  return `${n.topicPrefix}.${topicPart(n.database)}.transaction`;
}

export const keySubject = (topic: string) => `${topic}-key`;
export const valueSubjectOf = (topic: string) => `${topic}-value`;

export const topicPart = (s: string) => s.replace(/[^a-zA-Z0-9_-]/g, '_');

/** An Avro name from any identifier: invalid characters become _, a leading digit gets a _ in front. */
export function avroName(s: string): string {
  const n = s.replace(/[^A-Za-z0-9_]/g, '_');
  return /^[A-Za-z_]/.test(n) ? n : `_${n}`;
}

/** Avro field names of the columns, in order: sanitized, and made unique by a numeric suffix when two collide. */
export function fieldNames(columns: Array<{ name: string }>): string[] {
  const used = new Set<string>();
  return columns.map((c) => {
    let name = avroName(c.name);
    for (let i = 2; used.has(name); i++) name = `${avroName(c.name)}_${i}`;
    used.add(name);
    return name;
  });
}

/** numeric(p, s) from atttypmod; null for unconstrained numeric. */
export function numericPrecision(typmod: number): { precision: number; scale: number } | null {
  if (typmod < 4) return null;
  const t = typmod - 4;
  return { precision: (t >> 16) & 0xffff, scale: t & 0xffff };
}

/** A decimal's unscaled value (big-endian two's complement, as Avro's decimal carries it) with its scale, as text. */
export function decimalText(unscaled: Buffer, scale: number): string {
  let v = unscaled.length ? BigInt(`0x${unscaled.toString('hex')}`) : 0n;
  if (unscaled.length && unscaled[0] & 0x80) v -= 1n << BigInt(unscaled.length * 8);
  const neg = v < 0n;
  const digits = (neg ? -v : v).toString().padStart(scale + 1, '0');
  const text = scale ? `${digits.slice(0, -scale)}.${digits.slice(-scale)}` : digits;
  return neg ? `-${text}` : text;
}

const SOURCE: AvroSchema = {
  type: 'record', name: 'Source', namespace: 'io.multigres.cdc',
  doc: 'Where and when a change happened. (epoch, commit_lsn, position) orders the events of one stream and identifies redelivered ones.',
  fields: [
    { name: 'version', type: 'string' },
    { name: 'connector', type: 'string' },
    { name: 'name', type: 'string', doc: 'The topic prefix.' },
    { name: 'ts_ms', type: 'long', doc: 'Commit time (snapshot: when the snapshot began), epoch milliseconds.' },
    { name: 'snapshot', type: 'string', doc: '"true" for snapshot reads (and the truncate event that opens each table snapshot), "false" for streamed changes.' },
    { name: 'db', type: 'string' },
    { name: 'shard', type: 'string' },
    { name: 'schema', type: 'string' },
    { name: 'table', type: 'string' },
    { name: 'instance', type: 'string', doc: 'The Postgres instance (the primary) the change was read from.' },
    { name: 'txId', type: ['null', 'long'], default: null },
    { name: 'lsn', type: ['null', 'long'], default: null, doc: "The change's own WAL position (null for snapshot reads)." },
    { name: 'commit_lsn', type: 'long', doc: "The transaction's commit LSN; for snapshot reads the LSN the snapshot is consistent with." },
    { name: 'position', type: 'long', doc: 'Position of the event within its transaction (or within the table snapshot), from 0.' },
    { name: 'epoch', type: 'long', doc: 'Increases each time the stream starts over with a new slot and snapshot (first start, failover).' },
  ],
};

const TRANSACTION_BLOCK: AvroSchema = {
  type: 'record', name: 'TransactionBlock', namespace: 'io.multigres.cdc',
  fields: [
    { name: 'id', type: 'string' },
    { name: 'total_order', type: 'long' },
    { name: 'data_collection_order', type: 'long' },
  ],
};

/**
 * Builds Avro types for columns. A named type (the variable-scale decimal)
 * may be defined only once per schema, so later uses refer to it by name.
 */
class TypeBuilder {
  private defined = new Set<string>();
  constructor(private readonly numeric: NumericMode) {}

  column(c: ColumnDescription): AvroSchema {
    return this.type(c.type, c.typmod);
  }

  private named(name: string, schema: () => AvroSchema): AvroSchema {
    if (this.defined.has(name)) return name;
    this.defined.add(name);
    return schema();
  }

  private type(t: PgType, typmod: number): AvroSchema {
    if (t.category === 'A' && t.element) return { type: 'array', items: ['null', this.type(t.element, typmod)] };
    if (t.category === 'E') return { type: 'string', 'pg.type': t.name, 'pg.enum': t.enumLabels ?? [] };
    switch (t.name) {
      case 'bool': return 'boolean';
      case 'int2': case 'int4': return 'int';
      case 'int8': case 'oid': return 'long';
      case 'float4': return 'float';
      case 'float8': return 'double';
      case 'bytea': return 'bytes';
      case 'uuid': return { type: 'string', logicalType: 'uuid' };
      case 'json': case 'jsonb': return { type: 'string', 'connect.name': 'io.debezium.data.Json', 'pg.type': t.name };
      case 'date': return { type: 'int', logicalType: 'date' };
      case 'time': return { type: 'long', logicalType: 'time-micros' };
      case 'timestamp': return { type: 'long', logicalType: 'timestamp-micros', 'pg.type': 'timestamp' };
      case 'timestamptz': return { type: 'string', 'connect.name': 'io.debezium.time.ZonedTimestamp', 'pg.type': 'timestamptz' };
      case 'numeric': {
        if (this.numeric === 'string') return { type: 'string', 'pg.type': 'numeric' };
        const p = numericPrecision(typmod);
        if (p) return { type: 'bytes', logicalType: 'decimal', precision: p.precision, scale: p.scale };
        return this.named('io.multigres.cdc.VariableScaleDecimal', () => ({
          type: 'record', name: 'VariableScaleDecimal', namespace: 'io.multigres.cdc',
          doc: 'An unconstrained numeric: the unscaled value as a big-endian two\'s-complement integer, and its scale.',
          fields: [{ name: 'scale', type: 'int' }, { name: 'value', type: 'bytes' }],
        }));
      }
      // text, varchar, bpchar, name, timetz, interval, inet, money, ...: their Postgres text form.
      default: return { type: 'string', 'pg.type': t.name };
    }
  }
}

/** What stands for an unchanged TOASTed value of a column: the marker for text-mapped and bytea columns, null for the rest. */
export function unavailableMarker(c: ColumnDescription, numeric: NumericMode): string | Buffer | null {
  const s = new TypeBuilder(numeric).column(c);
  if (s === 'bytes') return Buffer.from(UNAVAILABLE_VALUE);
  if (typeof s === 'object' && !Array.isArray(s) && s.type === 'string') return UNAVAILABLE_VALUE;
  return null;
}

function namespaceOf(n: CdcNaming, d: Pick<TableDescription, 'schema' | 'table'>): string {
  return [...n.topicPrefix.split('.').filter(Boolean), n.database, d.schema, d.table].map(avroName).join('.');
}

/** The key schema: a record of the key columns (non-null), or null for a table without a key (events then have no Kafka key). */
export function keySchema(n: CdcNaming, d: TableDescription, numeric: NumericMode): AvroSchema | null {
  const names = fieldNames(d.columns);
  const types = new TypeBuilder(numeric);
  const fields = d.columns.flatMap((c, i) => (c.key ? [{ name: names[i], type: types.column(c) }] : []));
  if (fields.length === 0) return null;
  return { type: 'record', name: 'Key', namespace: namespaceOf(n, d), fields };
}

/**
 * The value schema: the envelope around `before` and `after` rows. Every
 * column is nullable with a null default, so adding a column keeps the
 * subject BACKWARD compatible, and a `before` image that carries only the key
 * (replica identity DEFAULT) fits the same record.
 */
export function valueSchema(n: CdcNaming, d: TableDescription, numeric: NumericMode): AvroSchema {
  const names = fieldNames(d.columns);
  const types = new TypeBuilder(numeric);
  const ns = namespaceOf(n, d);
  const row = {
    type: 'record', name: 'Value', namespace: ns,
    fields: d.columns.map((c, i) => ({
      name: names[i], type: ['null', types.column(c)], default: null,
      ...(names[i] !== c.name ? { 'pg.column': c.name } : {}),
    })),
  };
  return {
    type: 'record', name: 'Envelope', namespace: ns, 'connect.name': `${ns}.Envelope`,
    fields: [
      { name: 'before', type: ['null', row], default: null },
      { name: 'after', type: ['null', `${ns}.Value`], default: null },
      { name: 'source', type: SOURCE },
      { name: 'op', type: 'string', doc: 'c create, u update, d delete, r snapshot read, t truncate' },
      { name: 'ts_ms', type: ['null', 'long'], default: null, doc: 'When the agent produced the event.' },
      { name: 'transaction', type: ['null', TRANSACTION_BLOCK], default: null },
      {
        name: 'unavailable', type: { type: 'array', items: 'string' }, default: [],
        doc: `Fields of "after" whose value is an unchanged TOASTed value Postgres did not send: text and bytea fields hold "${UNAVAILABLE_VALUE}", others null. Keep the previous value.`,
      },
    ],
  };
}

/** Key and value schemas of the transaction topic (Debezium's transaction metadata). */
export const TRANSACTION_KEY_SCHEMA: AvroSchema = {
  type: 'record', name: 'TransactionKey', namespace: 'io.multigres.cdc', fields: [{ name: 'id', type: 'string' }],
};
export const TRANSACTION_VALUE_SCHEMA: AvroSchema = {
  type: 'record', name: 'TransactionMetadata', namespace: 'io.multigres.cdc',
  fields: [
    { name: 'status', type: 'string', doc: 'BEGIN or END' },
    { name: 'id', type: 'string', doc: '<epoch>:<txId>:<commit_lsn>' },
    { name: 'event_count', type: ['null', 'long'], default: null },
    {
      name: 'data_collections', default: null,
      type: ['null', { type: 'array', items: { type: 'record', name: 'DataCollection', fields: [{ name: 'data_collection', type: 'string' }, { name: 'event_count', type: 'long' }] } }],
    },
    { name: 'ts_ms', type: 'long' },
  ],
};
