/**
 * Splits the data of a COPY FROM STDIN into rows, as Postgres reads them, so the
 * gateway can send each row to its shard: CopyData messages break rows anywhere,
 * text-format rows end at a newline (a newline inside a value is written `\n`),
 * CSV rows at a newline outside quotes. For each row it decodes the one column
 * that places it (text escapes, CSV quoting, the NULL string).
 */
import type { CopyInPlan } from './plan.ts';

const NL = 0x0a;
const CR = 0x0d;
const BACKSLASH = 0x5c;

export interface CopyRow {
  /** The row's bytes with its line end, to pass on unchanged. */
  bytes: Buffer;
  /** The placing column's value (null: NULL or missing); undefined when the plan places nothing (a reference table). */
  value?: string | null;
  /** The CSV header line: every shard's COPY says HEADER too, so each gets it to skip. */
  header?: true;
}

export class CopyRowSplitter {
  private carry: Buffer = Buffer.alloc(0);
  private headerLeft: boolean;
  private ended = false;
  private readonly delimiter: number;
  private readonly quote: number;
  private readonly escape: number;

  constructor(private readonly plan: CopyInPlan) {
    this.headerLeft = plan.header;
    this.delimiter = plan.delimiter.charCodeAt(0);
    this.quote = plan.quote.charCodeAt(0);
    this.escape = plan.escape.charCodeAt(0);
  }

  /** The complete rows in `chunk` (with what earlier chunks left); the rest waits for the next chunk. */
  push(chunk: Buffer): CopyRow[] {
    if (this.ended) return [];
    const data = this.carry.length ? Buffer.concat([this.carry, chunk]) : chunk;
    const rows: CopyRow[] = [];
    let start = 0;
    for (let end = this.rowEnd(data, start); end >= 0; end = this.rowEnd(data, start)) {
      const bytes = data.subarray(start, end + 1);
      start = end + 1;
      if (this.take(bytes, rows)) break;
    }
    this.carry = this.ended ? Buffer.alloc(0) : Buffer.from(data.subarray(start));
    return rows;
  }

  /** At CopyDone: a last row without a line end. */
  finish(): CopyRow[] {
    const last = this.carry;
    this.carry = Buffer.alloc(0);
    const rows: CopyRow[] = [];
    if (last.length && !this.ended) this.take(Buffer.concat([last, Buffer.from('\n')]), rows);
    return rows;
  }

  /** Adds a row (or the header) unless it is the end marker; true at the end marker (`\.`), after which nothing counts. */
  private take(bytes: Buffer, rows: CopyRow[]): boolean {
    if (this.headerLeft) {
      this.headerLeft = false;
      rows.push({ bytes, header: true });
      return false;
    }
    const line = trimLineEnd(bytes);
    if (this.plan.format === 'text' && line.length === 2 && line[0] === BACKSLASH && line[1] === 0x2e) {
      this.ended = true;
      return true;
    }
    rows.push(this.plan.place ? { bytes, value: this.field(line, this.plan.place.column) } : { bytes });
    return false;
  }

  /** Where the row starting at `from` ends (its newline), or -1 when the data ends first. */
  private rowEnd(data: Buffer, from: number): number {
    if (this.plan.format === 'text') return data.indexOf(NL, from);
    let quoted = false;
    for (let i = from; i < data.length; i++) {
      const b = data[i];
      if (quoted) {
        if (b === this.escape && this.escape !== this.quote && i + 1 < data.length && (data[i + 1] === this.quote || data[i + 1] === this.escape)) i++;
        else if (b === this.quote) {
          if (this.escape === this.quote && data[i + 1] === this.quote) i++;
          else if (this.escape === this.quote && i + 1 === data.length) return -1; // a doubled quote may continue in the next chunk
          else quoted = false;
        }
      } else if (b === this.quote) quoted = true;
      else if (b === NL) return i;
    }
    return -1;
  }

  /** The decoded value of field `n` of a row (without its line end). */
  private field(line: Buffer, n: number): string | null {
    return this.plan.format === 'text' ? this.textField(line, n) : this.csvField(line, n);
  }

  private textField(line: Buffer, n: number): string | null {
    let index = 0;
    let start = 0;
    for (let i = 0; i <= line.length; i++) {
      if (i < line.length && line[i] === BACKSLASH) {
        i++;
        continue;
      }
      if (i === line.length || line[i] === this.delimiter) {
        if (index === n) {
          const raw = line.toString('utf8', start, i);
          return raw === this.plan.null ? null : unescapeText(raw);
        }
        index++;
        start = i + 1;
      }
    }
    return null; // fewer fields: Postgres rejects the row at the shard
  }

  private csvField(line: Buffer, n: number): string | null {
    let index = 0;
    let value = '';
    let quotedAny = false;
    let i = 0;
    for (;;) {
      const bytes: number[] = [];
      let quoted = false;
      while (i < line.length && (quoted || line[i] !== this.delimiter)) {
        const b = line[i];
        if (quoted && b === this.escape && i + 1 < line.length && (line[i + 1] === this.quote || line[i + 1] === this.escape) && (this.escape !== this.quote || line[i + 1] === this.quote)) {
          bytes.push(line[i + 1]);
          i += 2;
          continue;
        }
        if (b === this.quote) {
          quoted = !quoted;
          quotedAny = true;
        } else bytes.push(b);
        i++;
      }
      if (index === n) {
        value = Buffer.from(bytes).toString('utf8');
        return !quotedAny && value === this.plan.null ? null : value;
      }
      if (i >= line.length) return null;
      i++; // the delimiter
      index++;
      quotedAny = false;
    }
  }
}

function trimLineEnd(bytes: Buffer): Buffer {
  let end = bytes.length;
  if (end && bytes[end - 1] === NL) end--;
  if (end && bytes[end - 1] === CR) end--;
  return bytes.subarray(0, end);
}

const ESCAPES: Record<string, string> = { b: '\b', f: '\f', n: '\n', r: '\r', t: '\t', v: '\v' };

/** A text-format value with its backslash escapes decoded (`\t`, `\\`, octal `\123`, hex `\x7f`). */
function unescapeText(raw: string): string {
  if (!raw.includes('\\')) return raw;
  return raw.replace(/\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|(.))/gs, (_, octal, hex, other) => {
    if (octal) return String.fromCharCode(parseInt(octal, 8));
    if (hex) return String.fromCharCode(parseInt(hex, 16));
    return ESCAPES[other] ?? other;
  });
}
