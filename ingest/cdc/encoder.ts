/**
 * The encoder of one table's change events: its topic, its key and value
 * schemas registered under `<topic>-key` / `<topic>-value`, compiled avsc
 * types, and a converter per column. A new Relation message (ALTER TABLE)
 * builds a new encoder, which registers the new schema version.
 */
import type avro from 'avsc';
import {
  keySchema, keySubject, tableTopic, unavailableMarker, valueSchema, valueSubjectOf, fieldNames,
  type CdcNaming, type NumericMode, type TableDescription,
} from '../../schemas/cdc.ts';
import { parseAvro, type SchemaRegistryClient } from '../../schemas/index.ts';
import { ProtocolError, UNCHANGED_TOAST, type TupleValue } from './pgoutput.ts';
import { converterFor, type Converter } from './values.ts';

export type Row = Record<string, unknown>;

/** Confluent wire-format header: magic byte 0 and the schema id. */
function header(id: number): Buffer {
  const b = Buffer.alloc(5);
  b.writeUInt32BE(id, 1);
  return b;
}

/** Which fields of a value break its schema (only computed once encoding has failed). */
function problems(type: avro.Type, value: unknown): string {
  const out: string[] = [];
  type.isValid(value, {
    errorHook: (path: string[], v: unknown, t: avro.Type) => {
      out.push(`${path.join('.')} = ${typeof v === 'bigint' ? `${v}n` : String(v)} is not a valid ${t.typeName}`);
    },
  });
  return out.join('; ') || 'value does not match the schema';
}

/**
 * Encodes header + Avro body straight into a shared slab and hands out views
 * of it: one allocation per 1 MiB instead of two per message. A view keeps
 * its slab alive until Kafka has it; a full slab is simply replaced.
 */
const SLAB_BYTES = 1 << 20;
let slab = Buffer.allocUnsafe(SLAB_BYTES);
let slabPos = 0;

function encodeFramed(type: avro.Type, header: Buffer, value: unknown): Buffer {
  for (let attempt = 0; attempt < 2; attempt++) {
    if (slab.length - slabPos > 5) {
      const start = slabPos;
      header.copy(slab, start);
      const end = type.encode(value, slab, start + 5);
      if (end > 0) {
        slabPos = end;
        return slab.subarray(start, end);
      }
    }
    slab = Buffer.allocUnsafe(SLAB_BYTES);
    slabPos = 0;
  }
  // Larger than a slab: encoded on its own.
  return Buffer.concat([header, type.toBuffer(value)]);
}

export class TableEncoder {
  readonly topic: string;
  private readonly fields: string[];
  private readonly converters: Converter[];
  private readonly keyIndexes: number[];
  /** Text and bytea fields carry the unavailable marker; other types are null. */
  private readonly markers: unknown[];

  private constructor(
    readonly description: TableDescription,
    naming: CdcNaming,
    numeric: NumericMode,
    private readonly keyType: avro.Type | null,
    private readonly valueType: avro.Type,
    private readonly keyHeader: Buffer | null,
    private readonly valueHeader: Buffer,
  ) {
    this.topic = tableTopic(naming, description.schema, description.table);
    this.fields = fieldNames(description.columns);
    this.converters = description.columns.map((c) => converterFor(c, numeric));
    this.keyIndexes = description.columns.flatMap((c, i) => (c.key ? [i] : []));
    this.markers = description.columns.map((c) => unavailableMarker(c, numeric));
  }

  /** Builds the encoder and registers its schemas (the registry rejects a change that is not BACKWARD compatible). */
  static async create(d: TableDescription, naming: CdcNaming, numeric: NumericMode, registry: SchemaRegistryClient): Promise<TableEncoder> {
    const topic = tableTopic(naming, d.schema, d.table);
    const ks = keySchema(naming, d, numeric);
    const k = ks && JSON.stringify(ks);
    const v = JSON.stringify(valueSchema(naming, d, numeric));
    const [keyId, valueId] = await Promise.all([
      k ? registry.register(keySubject(topic), k) : Promise.resolve(null),
      registry.register(valueSubjectOf(topic), v),
    ]);
    return new TableEncoder(d, naming, numeric, k ? parseAvro(k) : null, parseAvro(v), keyId === null ? null : header(keyId), header(valueId));
  }

  get hasKey(): boolean {
    return this.keyType !== null;
  }

  private checkWidth(tuple: TupleValue[]): void {
    if (tuple.length !== this.fields.length) {
      throw new ProtocolError(`tuple of ${tuple.length} columns for ${this.description.schema}.${this.description.table}, whose relation has ${this.fields.length}`);
    }
  }

  /**
   * A row image. Unchanged TOASTed values come from `previous` (the old image
   * of a REPLICA IDENTITY FULL table) when it has them; otherwise they get the
   * marker and their field names are returned in `unavailable`.
   */
  row(tuple: TupleValue[], previous?: TupleValue[] | null): { row: Row; unavailable: string[] } {
    this.checkWidth(tuple);
    const row: Row = {};
    const unavailable: string[] = [];
    for (let i = 0; i < tuple.length; i++) {
      let v = tuple[i];
      if (v === UNCHANGED_TOAST && previous && typeof previous[i] === 'string') v = previous[i];
      if (v === UNCHANGED_TOAST) {
        row[this.fields[i]] = this.markers[i];
        unavailable.push(this.fields[i]);
      } else {
        row[this.fields[i]] = v === null ? null : this.converters[i](v);
      }
    }
    return { row, unavailable };
  }

  /** The key columns' values of a tuple, in the key's field order; a stable string for comparing keys. */
  keyText(tuple: TupleValue[]): string {
    return JSON.stringify(this.keyIndexes.map((i) => (typeof tuple[i] === 'string' ? tuple[i] : null)));
  }

  encodeKey(tuple: TupleValue[]): Buffer | null {
    if (!this.keyType) return null;
    this.checkWidth(tuple);
    const key: Row = {};
    for (const i of this.keyIndexes) {
      const v = tuple[i];
      if (typeof v !== 'string') {
        throw new ProtocolError(`key column ${this.description.columns[i].name} of ${this.description.schema}.${this.description.table} has no value`);
      }
      key[this.fields[i]] = this.converters[i](v);
    }
    try {
      return encodeFramed(this.keyType, this.keyHeader!, key);
    } catch {
      throw new Error(`cannot encode a key of ${this.topic}: ${problems(this.keyType, key)}`);
    }
  }

  encodeValue(envelope: Row): Buffer {
    try {
      return encodeFramed(this.valueType, this.valueHeader, envelope);
    } catch {
      throw new Error(`cannot encode a change event of ${this.topic}: ${problems(this.valueType, envelope)}`);
    }
  }
}
