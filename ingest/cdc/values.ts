/**
 * Postgres text values (what pgoutput sends, and what the snapshot reads with
 * text output) to the Avro values of schemas/cdc.ts. One converter per column
 * is compiled when a relation is seen, so the hot path is a plain call.
 * The replication and snapshot sessions run with DateStyle=ISO, TimeZone=UTC,
 * extra_float_digits=3 and bytea_output=hex, which these parsers expect.
 */
import { numericPrecision, type ColumnDescription, type NumericMode, type PgType } from '../../schemas/cdc.ts';

export type Converter = (text: string) => unknown;

const INT_MAX = 2147483647;
const INT_MIN = -2147483648;
const LONG_MAX = 9223372036854775807n;
const LONG_MIN = -9223372036854775808n;
const US_PER_DAY = 86_400_000_000n;

export class ValueError extends Error {}

/** The converter of one column's non-null text values. */
export function converterFor(c: ColumnDescription, numeric: NumericMode): Converter {
  return typeConverter(c.type, c.typmod, numeric);
}

function typeConverter(t: PgType, typmod: number, numeric: NumericMode): Converter {
  if (t.category === 'A' && t.element) {
    const element = typeConverter(t.element, typmod, numeric);
    return (text) => parseArrayLiteral(text).map((e) => (e === null ? null : element(e)));
  }
  if (t.category === 'E') return (text) => text;
  switch (t.name) {
    case 'bool': return (text) => text === 't';
    case 'int2': case 'int4': return (text) => parseInt(text, 10);
    case 'int8': case 'oid': return (text) => BigInt(text);
    case 'float4': case 'float8': return (text) => Number(text);
    case 'bytea': return parseBytea;
    case 'date': return parseDate;
    case 'time': return parseTime;
    case 'timestamp': return parseTimestamp;
    case 'timestamptz': return isoTimestamptz;
    case 'numeric': {
      if (numeric === 'string') return (text) => text;
      const p = numericPrecision(typmod);
      if (p) return (text) => fixedDecimal(text, p.scale);
      return variableDecimal;
    }
    default: return (text) => text;
  }
}

function parseBytea(text: string): Buffer {
  if (!text.startsWith('\\x')) throw new ValueError(`bytea value not in hex format: ${text.slice(0, 20)}`);
  return Buffer.from(text.slice(2), 'hex');
}

const DATE = /^(\d{4,})-(\d\d)-(\d\d)( BC)?$/;
const TIME = /^(\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?$/;
const TIMESTAMP = /^(\d{4,})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?( BC)?$/;

/** Days since 1970-01-01 of a proleptic Gregorian date (BC year n is year 1-n). */
function epochDays(y: string, m: string, d: string, bc: string | undefined): number {
  const year = bc ? 1 - Number(y) : Number(y);
  const date = new Date(0);
  date.setUTCFullYear(year, Number(m) - 1, Number(d));
  date.setUTCHours(0, 0, 0, 0);
  return Math.round(date.getTime() / 86_400_000);
}

/** Avro date: days since the epoch; Postgres's ±infinity map to the int range's ends. */
export function parseDate(text: string): number {
  if (text === 'infinity') return INT_MAX;
  if (text === '-infinity') return INT_MIN;
  const m = DATE.exec(text);
  if (!m) throw new ValueError(`unexpected date text ${JSON.stringify(text)}`);
  return epochDays(m[1], m[2], m[3], m[4]);
}

const micros = (frac: string | undefined) => BigInt((frac ?? '').padEnd(6, '0'));

/** Avro time-micros: microseconds since midnight (24:00:00 is allowed, as in Postgres). */
export function parseTime(text: string): bigint {
  const m = TIME.exec(text);
  if (!m) throw new ValueError(`unexpected time text ${JSON.stringify(text)}`);
  return ((BigInt(m[1]) * 60n + BigInt(m[2])) * 60n + BigInt(m[3])) * 1_000_000n + micros(m[4]);
}

/** Avro timestamp-micros of a timestamp without time zone (its wall-clock reading as if UTC); ±infinity map to the long range's ends. */
export function parseTimestamp(text: string): bigint {
  if (text === 'infinity') return LONG_MAX;
  if (text === '-infinity') return LONG_MIN;
  const m = TIMESTAMP.exec(text);
  if (!m) throw new ValueError(`unexpected timestamp text ${JSON.stringify(text)}`);
  const days = BigInt(epochDays(m[1], m[2], m[3], m[8]));
  return days * US_PER_DAY + ((BigInt(m[4]) * 60n + BigInt(m[5])) * 60n + BigInt(m[6])) * 1_000_000n + micros(m[7]);
}

/** ISO-8601 in UTC ('2024-05-06T07:08:09.123456Z'); infinity and BC values keep Postgres's text. */
export function isoTimestamptz(text: string): string {
  const m = /^(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d(?:\.\d{1,6})?)\+00$/.exec(text);
  return m ? `${m[1]}T${m[2]}Z` : text;
}

/** A big-endian two's-complement integer, as Avro's decimal logical type stores the unscaled value. */
export function twosComplement(n: bigint): Buffer {
  let width = 1;
  while (n >= 1n << BigInt(8 * width - 1) || n < -(1n << BigInt(8 * width - 1))) width++;
  const v = n < 0n ? (1n << BigInt(8 * width)) + n : n;
  return Buffer.from(v.toString(16).padStart(width * 2, '0'), 'hex');
}

/** Inverse of twosComplement (used by consumers and tests). */
export function fromTwosComplement(buf: Buffer): bigint {
  if (buf.length === 0) return 0n;
  const v = BigInt(`0x${buf.toString('hex')}`);
  return buf[0] & 0x80 ? v - (1n << BigInt(buf.length * 8)) : v;
}

const NUMERIC = /^(-?)(\d+)(?:\.(\d+))?$/;

/** numeric(p, s) as the unscaled integer's bytes; NaN and ±Infinity have no decimal form and become null. */
function fixedDecimal(text: string, scale: number): Buffer | null {
  const m = NUMERIC.exec(text);
  if (!m) return null;
  const frac = (m[3] ?? '').padEnd(scale, '0');
  if (frac.length > scale) throw new ValueError(`numeric ${text} has more than ${scale} decimals`);
  return twosComplement(BigInt(`${m[1]}${m[2]}${frac}`));
}

/** Unconstrained numeric: its own scale plus the unscaled integer's bytes; NaN and ±Infinity become null. */
function variableDecimal(text: string): { scale: number; value: Buffer } | null {
  const m = NUMERIC.exec(text);
  if (!m) return null;
  const frac = m[3] ?? '';
  return { scale: frac.length, value: twosComplement(BigInt(`${m[1]}${m[2]}${frac}`)) };
}

/**
 * Elements of a Postgres array literal ('{1,NULL,"a \"b\""}'), multi-dimensional
 * arrays flattened in row-major order; null for NULL elements.
 */
export function parseArrayLiteral(text: string): Array<string | null> {
  let i = 0;
  if (text[0] === '[') {
    // Explicit bounds ('[0:1]={...}'): skip them.
    i = text.indexOf('=') + 1;
    if (i === 0) throw new ValueError(`malformed array literal ${JSON.stringify(text.slice(0, 40))}`);
  }
  const out: Array<string | null> = [];
  if (text[i] !== '{') throw new ValueError(`malformed array literal ${JSON.stringify(text.slice(0, 40))}`);
  for (; i < text.length; i++) {
    const ch = text[i];
    if (ch === '{' || ch === '}' || ch === ',') continue;
    if (ch === '"') {
      let s = '';
      for (i++; i < text.length && text[i] !== '"'; i++) s += text[i] === '\\' ? text[++i] : text[i];
      if (i >= text.length) throw new ValueError(`unterminated quoted array element in ${JSON.stringify(text.slice(0, 40))}`);
      out.push(s);
      continue;
    }
    let j = i;
    while (j < text.length && text[j] !== ',' && text[j] !== '}') j++;
    const raw = text.slice(i, j).trim();
    out.push(raw === 'NULL' ? null : raw);
    i = j - 1;
  }
  return out;
}
