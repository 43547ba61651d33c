/**
 * Change events (docs/cdc.md) back into rows: the Confluent-framed Avro value
 * decoded with its writer's schema (fetched by id), and every column turned
 * back into Postgres's text form, which the target parses with the column's
 * own type. The conversion follows the writer's schema alone (logical types,
 * decimal scales), so it needs no catalog lookup on the hot path.
 */
import type avro from 'avsc';
import { decimalText, type AvroSchema } from '../schemas/cdc.ts';
import { parseAvro, type SchemaRegistryClient } from '../schemas/index.ts';

/** One change: the op, the rows as column -> Postgres text (null = SQL NULL), and its place in the source's stream. */
export interface Change {
  op: 'c' | 'u' | 'd' | 'r' | 't';
  before: Row | null;
  after: Row | null;
  unavailable: string[];
  sourceShard: string;
  epoch: bigint;
  commitLsn: bigint;
  position: bigint;
  txId: bigint | null;
  /** Commit time (snapshot: its start), epoch ms. */
  commitMs: number;
}

export type Row = Record<string, string | null>;

export class ChangeFormatError extends Error {}

type ToText = (v: any) => string;
interface Decoder { type: avro.Type; fields: Array<{ field: string; column: string; toText: ToText }> }

const LONG_MAX = 9223372036854775807n;
const LONG_MIN = -9223372036854775808n;
const INT_MAX = 2147483647;
const INT_MIN = -2147483648;

export class ChangeDecoder {
  private decoders = new Map<number, Promise<Decoder>>();

  constructor(private readonly registry: SchemaRegistryClient) {}

  async decode(value: Buffer): Promise<Change> {
    if (value.length < 5 || value[0] !== 0) throw new ChangeFormatError('change event not in Confluent wire format');
    const id = value.readUInt32BE(1);
    let d = this.decoders.get(id);
    if (!d) {
      d = this.registry.schemaById(id).then((text) => decoderOf(JSON.parse(text)));
      d.catch(() => this.decoders.delete(id));
      this.decoders.set(id, d);
    }
    const decoder = await d;
    const e = decoder.type.fromBuffer(value.subarray(5)) as any;
    const row = (r: any): Row | null => {
      if (!r) return null;
      const out: Row = {};
      for (const f of decoder.fields) {
        const v = r[f.field];
        out[f.column] = v === null || v === undefined ? null : f.toText(v);
      }
      return out;
    };
    return {
      op: e.op, before: row(e.before), after: row(e.after), unavailable: e.unavailable ?? [],
      sourceShard: e.source.shard, epoch: e.source.epoch, commitLsn: e.source.commit_lsn, position: e.source.position,
      txId: e.source.txId ?? null, commitMs: Number(e.source.ts_ms),
    };
  }
}

function decoderOf(envelope: any): Decoder {
  const named = new Map<string, any>();
  const before = envelope.fields.find((f: any) => f.name === 'before');
  const rowSchema = (before.type as any[]).find((t) => t !== 'null');
  const fields = (rowSchema.fields as any[]).map((f) => {
    const t = (f.type as any[]).find((x) => x !== 'null');
    return { field: f.name as string, column: (f['pg.column'] as string | undefined) ?? f.name, toText: toTextOf(t, named) };
  });
  return { type: parseAvro(JSON.stringify(envelope)), fields };
}

/** The Postgres text of a decoded Avro value of schema `s` (the inverse of ingest/cdc/values.ts). */
function toTextOf(s: AvroSchema, named: Map<string, any>): ToText {
  if (typeof s === 'string') {
    if (named.has(s) || named.has(s.split('.').pop()!)) return toTextOf(named.get(s) ?? named.get(s.split('.').pop()!), named);
    switch (s) {
      case 'boolean': return (v) => (v ? 't' : 'f');
      case 'int': case 'long': case 'string': return (v) => String(v);
      case 'float': case 'double': return floatText;
      case 'bytes': return (v: Buffer) => `\\x${v.toString('hex')}`;
    }
    throw new ChangeFormatError(`unknown Avro type ${s} in a change event`);
  }
  if (Array.isArray(s)) return toTextOf(s.find((x) => x !== 'null')!, named);
  const o = s as Record<string, any>;
  if (o.type === 'record') {
    named.set(`${o.namespace ? `${o.namespace}.` : ''}${o.name}`, o);
    named.set(o.name, o);
    if (o.name === 'VariableScaleDecimal') return (v) => decimalText(v.value, v.scale);
    throw new ChangeFormatError(`unexpected record ${o.name} in a row`);
  }
  if (o.type === 'array') {
    const element = toTextOf(o.items, named);
    return (v: unknown[]) => `{${v.map((x) => (x === null ? 'NULL' : `"${element(x).replace(/\\/g, '\\\\').replace(/"/g, '\\"')}"`)).join(',')}}`;
  }
  switch (o.logicalType) {
    case 'decimal': return (v: Buffer) => decimalText(v, o.scale ?? 0);
    case 'date': return dateText;
    case 'time-micros': return timeText;
    case 'timestamp-micros': return timestampText;
  }
  return toTextOf(o.type, named);
}

function floatText(v: number): string {
  if (Number.isNaN(v)) return 'NaN';
  if (v === Infinity) return 'Infinity';
  if (v === -Infinity) return '-Infinity';
  return String(v);
}

function dateText(days: number): string {
  if (days === INT_MAX) return 'infinity';
  if (days === INT_MIN) return '-infinity';
  return isoDate(new Date(days * 86_400_000));
}

/** ISO year-month-day, with Postgres's BC suffix for years before 1. */
function isoDate(d: Date): string {
  const y = d.getUTCFullYear();
  const md = `${String(d.getUTCMonth() + 1).padStart(2, '0')}-${String(d.getUTCDate()).padStart(2, '0')}`;
  return y > 0 ? `${String(y).padStart(4, '0')}-${md}` : `${String(1 - y).padStart(4, '0')}-${md} BC`;
}

function clock(us: bigint): string {
  const h = us / 3_600_000_000n;
  const m = (us / 60_000_000n) % 60n;
  const s = (us / 1_000_000n) % 60n;
  const frac = us % 1_000_000n;
  const two = (n: bigint) => n.toString().padStart(2, '0');
  return `${two(h)}:${two(m)}:${two(s)}${frac ? `.${frac.toString().padStart(6, '0')}` : ''}`;
}

function timeText(us: bigint): string {
  return clock(BigInt(us));
}

function timestampText(us: bigint): string {
  if (us === LONG_MAX) return 'infinity';
  if (us === LONG_MIN) return '-infinity';
  const day = 86_400_000_000n;
  const days = us >= 0n ? us / day : -((-us + day - 1n) / day);
  const date = isoDate(new Date(Number(days) * 86_400_000));
  const bc = date.endsWith(' BC');
  return `${bc ? date.slice(0, -3) : date} ${clock(us - days * day)}${bc ? ' BC' : ''}`;
}
