/**
 * Merging the rows of a scatter SELECT at the gateway: partial aggregates
 * combined per group, HAVING, DISTINCT, ORDER BY, then OFFSET/LIMIT (mergeRows, on
 * gathered rows); or, for ORDER BY and for groups the shards sort, the order,
 * the fold of a group and a heap of the shards' sorted streams, merged as the
 * rows arrive (router/gateway/scatter-read.ts). Values are the column values
 * as the shards sent them (null for NULL), in text or binary format; order
 * follows Postgres: numbers by value, text by bytes (instances use the C.UTF-8
 * collation), dates and timestamps by the instant their ISO text names,
 * intervals by their span (a month of 30 days, as Postgres compares them), NULLs
 * last ascending and first descending unless asked.
 */
import { countValue, resolveValue, type BoundParam, type Comparison, type Having, type Merge } from './plan.ts';
import { binaryFloat, binaryInteger, binaryIntervalSpan, binaryNumeric, isBinaryInteger, numericText, readBinaryFloat, readBinaryInteger } from './binary-values.ts';
import { RefusedError } from './planner.ts';

export type Row = Array<Buffer | null>;
/** A column of the shards' rows: `binary` when its values come in Postgres's binary format (binary-values.ts). */
export interface Field { name: string; typeOid: number; binary?: boolean }

const INTEGER = new Set([20, 21, 23, 26]);
const FLOAT = new Set([700, 701]);
const NUMERIC = 1700;
const INTERVAL = 1186;
/**
 * Types whose text must be read to be ordered: date, timestamp, timestamptz (offsets, BC, years past
 * 9999, infinity) by the instant they name, interval by its span. Text in another DateStyle or
 * IntervalStyle than the default is not read: it is ordered as text (docs/sharding.md).
 */
const READ_FOR_ORDER = new Map<number, (text: string) => bigint | undefined>([
  [1082, instantOf], [1114, instantOf], [1184, instantOf], [INTERVAL, intervalSpan],
]);

/** Compares two values (non-null) of one column. */
function compareValues(a: Buffer, b: Buffer, field: Field): number {
  return field.binary ? compareBinary(a, b, field.typeOid) : compareText(a, b, field.typeOid);
}

/** Compares two values (non-null) of one column type in text format. */
function compareText(a: Buffer, b: Buffer, typeOid: number): number {
  const read = READ_FOR_ORDER.get(typeOid);
  if (read) {
    const x = read(a.toString('latin1'));
    const y = read(b.toString('latin1'));
    if (x !== undefined && y !== undefined) return x < y ? -1 : x > y ? 1 : 0;
  }
  if (INTEGER.has(typeOid)) {
    const x = BigInt(a.toString('latin1'));
    const y = BigInt(b.toString('latin1'));
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (FLOAT.has(typeOid)) return floatOrder(Number(a.toString('latin1'))) - floatOrder(Number(b.toString('latin1')));
  if (typeOid === NUMERIC) return compareDecimal(a.toString('latin1'), b.toString('latin1'));
  return Buffer.compare(a, b);
}

/** Compares two values (non-null) of one column type in binary format: the types of ORDERABLE. */
function compareBinary(a: Buffer, b: Buffer, typeOid: number): number {
  if (isBinaryInteger(typeOid)) return compareBigints(readBinaryInteger(a, typeOid), readBinaryInteger(b, typeOid));
  if (FLOAT.has(typeOid)) return floatOrder(readBinaryFloat(a)) - floatOrder(readBinaryFloat(b));
  if (typeOid === NUMERIC) return compareDecimal(numericText(a), numericText(b));
  if (typeOid === INTERVAL) return compareBigints(binaryIntervalSpan(a), binaryIntervalSpan(b));
  return Buffer.compare(a, b); // bool, the text types, bytea, uuid: their bytes sort as their values
}

const compareBigints = (x: bigint, y: bigint) => (x < y ? -1 : x > y ? 1 : 0);

const ISO_DATETIME = /^(\d{4,})-(\d\d)-(\d\d)(?: (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?)?(?:([+-])(\d\d)(?::(\d\d))?(?::(\d\d))?)?( BC)?$/;
const INFINITE = 2n ** 80n;

/**
 * Microseconds from 1970-01-01 00:00 UTC of a date, timestamp or timestamptz in ISO DateStyle (a timestamp
 * without zone as if at UTC; the proleptic Gregorian calendar, year 1 BC = 0); undefined when not such text.
 */
function instantOf(text: string): bigint | undefined {
  if (text === 'infinity') return INFINITE;
  if (text === '-infinity') return -INFINITE;
  const m = ISO_DATETIME.exec(text);
  if (!m) return undefined;
  const [, y, mo, d, h = '0', mi = '0', sec = '0', frac = '', sign, oh = '0', om = '0', os = '0', bc] = m;
  const days = daysFromCivil(bc ? 1 - Number(y) : Number(y), Number(mo), Number(d));
  const offset = (Number(oh) * 3600 + Number(om) * 60 + Number(os)) * (sign === '-' ? -1 : 1);
  const seconds = BigInt(days) * 86_400n + BigInt(Number(h) * 3600 + Number(mi) * 60 + Number(sec) - offset);
  return seconds * 1_000_000n + BigInt(frac.padEnd(6, '0') || '0');
}

const POSTGRES_INTERVAL = /^(?:(-?\d+) years? ?)?(?:(-?\d+) mons? ?)?(?:(-?\d+) days? ?)?(?:([+-]?)(\d+):(\d\d):(\d\d)(?:\.(\d{1,6}))?)?$/;

/**
 * An interval in the default IntervalStyle (postgres) as Postgres compares intervals: months of 30 days and
 * days of 24 hours, in microseconds; undefined when not such text.
 */
function intervalSpan(text: string): bigint | undefined {
  const m = POSTGRES_INTERVAL.exec(text);
  if (!m || !text) return undefined;
  const [, years = '0', months = '0', days = '0', sign, h = '0', mi = '0', sec = '0', frac = ''] = m;
  const time = (BigInt(h) * 3600n + BigInt(mi) * 60n + BigInt(sec)) * 1_000_000n + BigInt(frac.padEnd(6, '0') || '0');
  return ((BigInt(years) * 12n + BigInt(months)) * 30n + BigInt(days)) * 86_400_000_000n + (sign === '-' ? -time : time);
}

/** Days from 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil). */
function daysFromCivil(year: number, month: number, day: number): number {
  const y = month <= 2 ? year - 1 : year;
  const era = Math.floor(y / 400);
  const yoe = y - era * 400;
  const doy = Math.floor((153 * (month + (month > 2 ? -3 : 9)) + 2) / 5) + day - 1;
  const doe = yoe * 365 + Math.floor(yoe / 4) - Math.floor(yoe / 100) + doy;
  return era * 146_097 + doe - 719_468;
}

/** Postgres orders NaN above every number. */
const floatOrder = (n: number) => (Number.isNaN(n) ? Infinity : n);

/** numeric's values that are not digits, ranked as Postgres orders them around the numbers (rank 0). */
const SPECIAL_DECIMALS: Record<string, number> = { '-Infinity': -1, Infinity: 1, NaN: 2 };

function compareDecimal(a: string, b: string): number {
  const ra = SPECIAL_DECIMALS[a] ?? 0;
  const rb = SPECIAL_DECIMALS[b] ?? 0;
  if (ra || rb) return Math.sign(ra - rb);
  const [x, y] = alignDecimals(a, b);
  return x.value < y.value ? -1 : x.value > y.value ? 1 : 0;
}

/** Two decimal strings as integers at one scale. */
function alignDecimals(a: string, b: string): [{ value: bigint; scale: number }, { value: bigint; scale: number }] {
  const scale = Math.max(fracDigits(a), fracDigits(b));
  return [{ value: scaled(a, scale), scale }, { value: scaled(b, scale), scale }];
}
const fracDigits = (s: string) => (s.includes('.') ? s.length - s.indexOf('.') - 1 : 0);
function scaled(s: string, scale: number): bigint {
  const [int, frac = ''] = s.split('.');
  const neg = int.startsWith('-');
  const digits = BigInt((neg ? int.slice(1) : int) + frac.padEnd(scale, '0'));
  return neg ? -digits : digits;
}
function formatDecimal(v: bigint, scale: number): string {
  const neg = v < 0n;
  const s = (neg ? -v : v).toString().padStart(scale + 1, '0');
  const out = scale ? `${s.slice(0, -scale)}.${s.slice(-scale)}` : s;
  return neg ? `-${out}` : out;
}

/** The sum of two partial sums of one column (sum's result types: bigint, numeric, floats). */
function addValues(a: Buffer, b: Buffer, { typeOid, binary }: Field): Buffer {
  if (binary) {
    if (isBinaryInteger(typeOid)) return binaryInteger(readBinaryInteger(a, typeOid) + readBinaryInteger(b, typeOid), typeOid);
    if (FLOAT.has(typeOid)) return binaryFloat(readBinaryFloat(a) + readBinaryFloat(b), typeOid);
    if (typeOid !== NUMERIC) throw new RefusedError(`sum of a type the gateway does not add in binary format (type oid ${typeOid}) over all shards`);
    const [p, q] = alignDecimals(numericText(a), numericText(b));
    return binaryNumeric(formatDecimal(p.value + q.value, p.scale));
  }
  const x = a.toString('latin1');
  const y = b.toString('latin1');
  if (FLOAT.has(typeOid)) return Buffer.from(String(Number(x) + Number(y)));
  const [p, q] = alignDecimals(x, y);
  return Buffer.from(formatDecimal(p.value + q.value, p.scale));
}

/** A key equal for rows equal in `columns`: each value length-prefixed, since binary values may hold any byte. */
const rowKey = (row: Row, columns: number[]) => columns.map((c) => (row[c] === null ? 'N' : `${row[c]!.length}:${row[c]!.toString('latin1')}`)).join('|');

/** The 0-based index of a sort column (SortKey: a position, from the end when negative, or a name); -1 when the row has none. */
function columnIndex(column: string | number, fields: readonly Field[]): number {
  if (typeof column === 'string') return fields.findIndex((f) => f.name === column);
  const at = column < 0 ? fields.length + column : column - 1;
  return at >= 0 && at < fields.length ? at : -1;
}

function resolveColumn(column: string | number, fields: readonly Field[]): number {
  const at = columnIndex(column, fields);
  if (at < 0) throw new RefusedError(typeof column === 'number' ? `ORDER BY position ${column} is not in the select list` : `ORDER BY ${column}, which is not in the select list, over all shards`);
  return at;
}

/** Folds another shard's partial aggregates of the same group (`row`) into `held`. */
export function foldGroup(held: Row, row: Row, fields: readonly Field[], aggregates: Merge['aggregates']): void {
  for (const { column, fn } of aggregates ?? []) {
    const i = column - 1;
    const v = row[i];
    if (v === null) continue;
    const h = held[i];
    if (h === null) held[i] = v;
    else if (fn === 'count' || fn === 'sum') held[i] = addValues(h, v, fields[i]);
    else {
      if (!ORDERABLE.has(fields[i].typeOid)) throw new RefusedError(`${fn}(${fields[i].name}), of a type the gateway does not order (type oid ${fields[i].typeOid}), over all shards`);
      const c = compareValues(v, h, fields[i]);
      if ((fn === 'min' && c < 0) || (fn === 'max' && c > 0)) held[i] = v;
    }
  }
}

function aggregate(rows: Row[], fields: readonly Field[], merge: Merge): Row[] {
  const groups = new Map<string, Row>();
  const keyColumns = (merge.groupBy ?? []).map((c) => c - 1);
  for (const row of rows) {
    const key = rowKey(row, keyColumns);
    const held = groups.get(key);
    if (held) foldGroup(held, row, fields, merge.aggregates);
    else groups.set(key, [...row]);
  }
  // An ungrouped aggregate over no rows anywhere still answers one row (each shard sent one).
  return [...groups.values()];
}

/**
 * Types whose text the gateway orders exactly as the shards sort the values (compareValues; text
 * types in the instances' C.UTF-8 collation): a merge of groups relies on it to find each group's
 * rows together. Others (intervals, char(n), arrays, ...) are gathered instead.
 */
const ORDER_FOLLOWED = new Set([16, 19, 20, 21, 23, 25, 26, 700, 701, 1043, 1700, 2950, ...READ_FOR_ORDER.keys()]);
/**
 * Types an ORDER BY over all shards is merged on: those followed, and those whose text sorts as the values do
 * without being read (bytea's hex, time, char(n) padded alike). Others (timetz, arrays, json, ranges, ...)
 * sort by rules the text does not show: refused rather than merged out of order.
 */
const ORDERABLE = new Set([...ORDER_FOLLOWED, 17, 1042, 1083]);

/** Whether every column of `order` is of a type whose order the gateway follows (ORDER_FOLLOWED). */
export function orderFollowed(fields: readonly Field[], order: Merge['orderBy']): boolean {
  return order.every((k) => {
    const at = columnIndex(k.column, fields);
    return at >= 0 && ORDER_FOLLOWED.has(fields[at].typeOid);
  });
}

/**
 * Column types whose values the gateway compares with a HAVING constant as Postgres does (text in the
 * instances' C.UTF-8 collation). Not float4: Postgres compares it promoted to float8 (0.1::real > 0.1),
 * which its shortest text does not show.
 */
const HAVING_COMPARED = new Set([...INTEGER, 701, NUMERIC, 19, 25, 1043]);
const INTEGER_TEXT = /^[-+]?\d+$/;
const HOLDS: Record<Comparison, (c: number) => boolean> = {
  '=': (c) => c === 0, '<>': (c) => c !== 0, '<': (c) => c < 0, '<=': (c) => c <= 0, '>': (c) => c > 0, '>=': (c) => c >= 0,
};

/** A binary value of a type of HAVING_COMPARED in the text the comparison reads. */
function binaryAsText(v: Buffer, typeOid: number): Buffer {
  if (INTEGER.has(typeOid)) return Buffer.from(String(readBinaryInteger(v, typeOid)));
  if (typeOid === NUMERIC) return Buffer.from(numericText(v));
  if (FLOAT.has(typeOid)) return Buffer.from(String(readBinaryFloat(v)));
  return v; // text types: the same bytes
}

/** SQL's three values: null is unknown. */
type Truth = boolean | null;

/**
 * The merge's HAVING as a test of a merged group (undefined: there is none), its constants and
 * parameters read once. A comparison with NULL is unknown, and only a true HAVING keeps a group.
 */
export function havingTest(merge: Merge, fields: readonly Field[], params?: readonly BoundParam[]): ((row: Row) => boolean) | undefined {
  if (!merge.having) return undefined;
  const test = truthOf(merge.having, fields, params);
  return (row) => test(row) === true;
}

function truthOf(h: Having, fields: readonly Field[], params?: readonly BoundParam[]): (row: Row) => Truth {
  switch (h.op) {
    case 'and': case 'or': {
      const args = h.args.map((a) => truthOf(a, fields, params));
      const decides = h.op === 'or'; // one true decides an OR, one false an AND; else unknown beats the other
      return (row) => {
        let out: Truth = !decides;
        for (const a of args) {
          const v = a(row);
          if (v === decides) return decides;
          if (v === null) out = null;
        }
        return out;
      };
    }
    case 'not': {
      const arg = truthOf(h.arg, fields, params);
      return (row) => {
        const v = arg(row);
        return v === null ? null : !v;
      };
    }
    case 'is null': return (row) => row[h.column - 1] === null;
    case 'is not null': return (row) => row[h.column - 1] !== null;
    default: {
      const at = h.column - 1;
      const { name, typeOid } = fields[at];
      if (!HAVING_COMPARED.has(typeOid)) throw new RefusedError(`HAVING comparing ${name}, of a type the gateway does not compare (type OID ${typeOid}), over all shards`);
      let v = resolveValue(h.value, params);
      const n = 'param' in h.value ? h.value.param : 0;
      const param = params?.[n - 1];
      if (param?.binary && Buffer.isBuffer(v)) {
        // Integers come decoded already; numbers and text are read as the comparison reads text (a float4 as the float8 Postgres promotes it to).
        if (!HAVING_COMPARED.has(param.typeOid) && param.typeOid !== 700) {
          throw new RefusedError(`a binary parameter ($${n}, type oid ${param.typeOid}) in HAVING over all shards (send it as text)`);
        }
        v = binaryAsText(v, param.typeOid);
      }
      if (v === null) return () => null;
      // A number's text as Postgres reads it, spaces around it left out (they would count as fraction digits).
      const constant = INTEGER.has(typeOid) || FLOAT.has(typeOid) || typeOid === NUMERIC ? Buffer.from(String(v).trim()) : Buffer.from(v);
      // An integer against a constant with a fraction compares as numeric, as in Postgres (count(*) > 2.5).
      const oid = INTEGER.has(typeOid) && !INTEGER_TEXT.test(constant.toString('latin1')) ? NUMERIC : typeOid;
      try {
        compareText(constant, constant, oid);
      } catch {
        throw new RefusedError(`HAVING compares ${name} with ${constant.toString()}, which the gateway does not read as a number, over all shards`);
      }
      const holds = HOLDS[h.op];
      const text = fields[at].binary ? (x: Buffer) => binaryAsText(x, typeOid) : (x: Buffer) => x;
      return (row) => {
        const x = row[at];
        return x === null ? null : holds(compareText(text(x), constant, oid));
      };
    }
  }
}

/** Merges the shards' rows (in shard order) as the plan says. */
export function mergeRows(rows: Row[], fields: readonly Field[], merge: Merge, params?: readonly BoundParam[]): Row[] {
  let out = merge.aggregates || merge.groupBy ? aggregate(rows, fields, merge) : rows;
  const having = havingTest(merge, fields, params);
  if (having) out = out.filter(having);
  if (merge.distinct) {
    const all = fields.map((_, i) => i);
    const seen = new Set<string>();
    out = out.filter((r) => {
      const k = rowKey(r, all);
      if (seen.has(k)) return false;
      seen.add(k);
      return true;
    });
  }
  if (merge.orderBy.length) out = [...out].sort(rowOrder(fields, merge.orderBy));
  const { offset, limit } = rowWindow(merge, params);
  if (offset || limit !== undefined) out = out.slice(offset, limit === undefined ? undefined : offset + limit);
  return out;
}

/**
 * The ORDER BY of a merge as a comparison of rows of `fields`, as Postgres orders them
 * (see compareValues; NULLs as the clause says). Rows that tie compare 0.
 */
export function rowOrder(fields: readonly Field[], orderBy: Merge['orderBy']): (a: Row, b: Row) => number {
  const keys = orderBy.map((o) => ({ ...o, at: resolveColumn(o.column, fields) }));
  const unordered = keys.find((k) => !ORDERABLE.has(fields[k.at].typeOid));
  if (unordered) throw new RefusedError(`ORDER BY ${fields[unordered.at].name}, of a type the gateway does not order (type oid ${fields[unordered.at].typeOid}), over all shards`);
  return (a, b) => {
    for (const k of keys) {
      const x = a[k.at];
      const y = b[k.at];
      if (x === null || y === null) {
        if (x === y) continue;
        return (x === null) === k.nullsFirst ? -1 : 1;
      }
      const c = compareValues(x, y, fields[k.at]);
      if (c !== 0) return k.desc ? -c : c;
    }
    return 0;
  };
}

/** A merge's OFFSET and LIMIT as numbers (no limit: undefined). */
export function rowWindow(merge: Merge, params?: readonly BoundParam[]): { offset: number; limit: number | undefined } {
  return { offset: countValue(merge.offset, params) ?? 0, limit: countValue(merge.limit, params) };
}

/**
 * The k-way merge of sorted streams: a binary min-heap of the streams by their
 * current head row. A stream ties with another on equal rows; the lower stream
 * number comes first then, so the merge is deterministic.
 */
export class HeadHeap {
  private readonly items: Array<{ stream: number; head: Row }> = [];

  constructor(private readonly order: (a: Row, b: Row) => number) {}

  get size(): number {
    return this.items.length;
  }

  push(stream: number, head: Row): void {
    const items = this.items;
    items.push({ stream, head });
    for (let i = items.length - 1; i > 0;) {
      const parent = (i - 1) >> 1;
      if (!this.before(i, parent)) break;
      [items[i], items[parent]] = [items[parent], items[i]];
      i = parent;
    }
  }

  /** The stream whose head is smallest, taken out of the heap (push it again with its next head). */
  pop(): number | undefined {
    const items = this.items;
    if (!items.length) return undefined;
    const top = items[0].stream;
    const last = items.pop()!;
    if (items.length) {
      items[0] = last;
      for (let i = 0; ;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let min = i;
        if (l < items.length && this.before(l, min)) min = l;
        if (r < items.length && this.before(r, min)) min = r;
        if (min === i) break;
        [items[i], items[min]] = [items[min], items[i]];
        i = min;
      }
    }
    return top;
  }

  private before(i: number, j: number): boolean {
    const c = this.order(this.items[i].head, this.items[j].head);
    return c < 0 || (c === 0 && this.items[i].stream < this.items[j].stream);
  }
}
