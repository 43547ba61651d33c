/**
 * A read on one or more shards whose rows go to the client as it takes them,
 * holding a bounded part of the result (decision 0065): each shard's rows wait
 * in a small buffer, and a shard whose buffer is full stops being read, so
 * its Postgres waits writing. With ORDER BY the shards' sorted streams are
 * merged through a heap (a row goes out once every shard still sending has
 * one buffered, or has ended); without, rows go out in the order they come.
 * A grouped read the shards sort by its groups is merged the same way and
 * each group's rows folded into one as they pass (decision 0070), and
 * kept only if it passes the HAVING (decision 0072); other grouped reads are
 * gathered, then merged. Columns the merge needed and the client did not
 * select are stripped on the way out (decision 0074).
 * OFFSET and LIMIT apply as rows go out. The rows can be taken in parts (a
 * portal's Executes with a row limit), the shards' requests staying open in
 * between.
 */
import { foldGroup, havingTest, HeadHeap, mergeRows, orderFollowed, rowOrder, type Field, type Row } from '../planner/merge.ts';
import type { BoundParam, Merge } from '../planner/plan.ts';
import { PgError, SQLSTATE } from '../protocol/errors.ts';
import { errorFieldsAt, T } from '../protocol/messages.ts';
import { decodeDataRow, decodeRowDescription, encodeDataRow, shardError, withoutLastColumns, type ShardLink } from './shard-link.ts';

/** Row bytes a shard may have waiting in the gateway before its link stops being read (it is read again below half). */
export const SHARD_BUFFER = 256 * 1024;

export interface ScatterReadOptions {
  /** What each shard is sent: the statement, ending with Sync (its rows in full; this class reads them at the client's pace). */
  request: (link: ShardLink) => Buffer;
  /** The ORDER BY the shards sorted by: their rows are merged in this order. None or empty: rows go out as they come. */
  orderBy?: Merge['orderBy'];
  /**
   * A grouped read: each group's rows are folded into one, as they pass when the shards sorted by the groups
   * (merge.groupOrder is then the `orderBy`). Without that order, or where a group column's type is one whose
   * order the gateway does not follow, every row is gathered and merged at the end instead (mergeRows, with
   * `params` for its HAVING, LIMIT and OFFSET).
   */
  group?: { merge: Merge; params?: readonly BoundParam[] };
  /** How many columns end each row for the merge only (Merge.hidden): stripped from the rows and the RowDescription. */
  hidden: number;
  offset: number;
  limit: number | undefined;
  /** The client gets the (first) RowDescription. */
  describe: boolean;
  /** An error names its shard (more than one shard in the read). */
  named: boolean;
  /** A message for the client other than a row (RowDescription, notices). */
  reply: (msg: Buffer) => void;
  /** A row for the client; the session flushes and applies its client's backpressure to `links`. */
  forward: (row: Buffer, links: ShardLink[]) => void;
}

interface Source {
  link: ShardLink;
  /** DataRow messages waiting, from `at` on. */
  rows: Buffer[];
  at: number;
  bytes: number;
  /** The shard sent its last row (CommandComplete or an error), or its link was lost. */
  ended: boolean;
  /** This read paused the link's socket (its buffer was full); the client's ReadThrottle keeps its own. */
  held: boolean;
  /** The rows are not wanted any more: they are read and dropped until the shard's ReadyForQuery. */
  dropping: boolean;
}

export class ScatterRead {
  private readonly sources: Source[];
  /** Resolves once every shard has answered its request to the end (ReadyForQuery, or a lost link). */
  readonly settled: Promise<void>;
  /** Ordered reads: the shards with a row buffered, by that row; `starving` counts those still sending without one. */
  private heap: HeadHeap | undefined;
  private starving: number;
  private next = 0;
  private skip: number;
  private limit: number | undefined;
  /** Rows sent in all, for LIMIT. */
  private sent = 0;
  /** A grouped read merged as it streams: the group being folded (the next row of another group sends it, if it passes `keeps`: HAVING). */
  private groups: { fields: Field[]; order: (a: Row, b: Row) => number; keeps: (group: Row) => boolean; held?: Row } | undefined;
  /** A grouped read gathered whole (its group types' order not followed): the merged rows, once every shard ended. */
  private gathered: { fields: Field[]; rows?: Buffer[]; at: number } | undefined;
  /** A RowDescription came from a shard. */
  described = false;
  /** The first shard's command tag ("SELECT 12"), the form of the tags this read answers. */
  private shardTag: string | undefined;
  private error: Error | undefined;
  private finished = false;
  /** Keep every row the shards send (gather()): nothing is paused any more. */
  private gathering = false;
  private waiter: { want: number; given: number; resolve: (r: { rows: number; complete: boolean }) => void; reject: (e: Error) => void } | undefined;

  constructor(private readonly links: ShardLink[], private readonly opts: ScatterReadOptions) {
    this.sources = links.map((link) => ({ link, rows: [], at: 0, bytes: 0, ended: false, held: false, dropping: false }));
    this.starving = links.length;
    this.skip = opts.offset;
    this.limit = opts.limit;
    this.settled = Promise.all(this.sources.map((s, i) => s.link.request(opts.request(s.link), (type, buf, start, len) => this.onMessage(i, type, buf, start, len))
      .then(() => this.ended(i), (err: Error) => {
        this.fail(s, err);
        this.ended(i);
      }))).then(() => undefined);
  }

  /**
   * Sends up to `max` more rows (Infinity: all). Resolves with the rows sent and whether the read is
   * complete (then once every shard has answered to the end); rejects with the first shard error.
   */
  take(max: number): Promise<{ rows: number; complete: boolean }> {
    if (this.waiter) throw new Error('a ScatterRead is taken from by one caller at a time');
    return new Promise((resolve, reject) => {
      this.waiter = { want: max, given: 0, resolve, reject };
      this.advance();
    });
  }

  /** "SELECT 12": a tag for `rows` rows as the shards name their command. */
  tag(rows: number): string {
    const counted = /^(.*?)\d+$/.exec(this.shardTag ?? 'SELECT 0');
    return counted ? `${counted[1]}${rows}` : this.shardTag!;
  }

  /**
   * Reads every shard to the end, keeping the rows that were not taken yet (the client's next
   * statement needs these links): memory is no longer bounded for this read.
   */
  gather(): Promise<void> {
    this.gathering = true;
    for (const s of this.sources) if (!s.dropping) this.release(s, true);
    return this.settled;
  }

  /** The rows are not wanted (the portal closed, its transaction ended): the shards' rest is read and dropped. */
  abandon(): Promise<void> {
    this.finished = true;
    for (const s of this.sources) this.drop(s);
    const w = this.waiter;
    this.waiter = undefined;
    w?.resolve({ rows: w.given, complete: true });
    return this.settled;
  }

  private onMessage(i: number, type: number, buf: Buffer, start: number, len: number): void {
    const s = this.sources[i];
    if (s.dropping) return;
    switch (type) {
      case T.DataRow: return this.buffered(i, buf.subarray(start, start + len)); // a view: a socket's read buffer is never reused
      case T.RowDescription: return this.rowDescription(Buffer.from(buf.subarray(start, start + len)));
      case T.CommandComplete:
        this.shardTag ??= buf.toString('utf8', start + 5, start + len - 1);
        return this.ended(i);
      case T.ErrorResponse: return this.fail(s, shardError(s.link.shard, errorFieldsAt(buf, start, len), this.opts.named));
      case T.NoticeResponse: return this.opts.reply(Buffer.from(buf.subarray(start, start + len)));
      default: return; // ParseComplete, BindComplete, EmptyQueryResponse: the session answers those itself
    }
  }

  private rowDescription(msg: Buffer): void {
    if (this.described) return;
    this.described = true;
    const fields = decodeRowDescription(msg);
    const group = this.opts.group;
    if (group && !(group.merge.groupOrder && orderFollowed(fields, group.merge.groupOrder))) {
      // mergeRows applies the OFFSET and LIMIT itself.
      this.gathered = { fields, at: 0 };
      this.gathering = true;
      this.skip = 0;
      this.limit = undefined;
    } else if (this.opts.orderBy?.length) {
      try {
        const order = rowOrder(fields, this.opts.orderBy);
        this.heap = new HeadHeap(order);
        if (group) this.groups = { fields, order, keeps: havingTest(group.merge, fields, group.params) ?? (() => true) };
      } catch (err) {
        return this.fail(undefined, err as Error);
      }
    }
    if (this.opts.describe) this.opts.reply(this.visible(msg));
  }

  /** A RowDescription or DataRow as the client sees it: without the hidden columns. */
  private visible(msg: Buffer): Buffer {
    return this.opts.hidden ? withoutLastColumns(msg, this.opts.hidden) : msg;
  }

  private buffered(i: number, row: Buffer): void {
    const s = this.sources[i];
    if (this.finished) return;
    const wasEmpty = s.at === s.rows.length;
    s.rows.push(row);
    s.bytes += row.length;
    if (wasEmpty && this.heap) {
      this.heap.push(i, decodeDataRow(row));
      this.starving--;
    }
    if (s.bytes > SHARD_BUFFER && !this.gathering && !s.link.up.socket.isPaused()) {
      s.link.up.socket.pause();
      s.held = true;
    }
    this.advance();
  }

  private ended(i: number): void {
    const s = this.sources[i];
    if (s.ended) return;
    s.ended = true;
    if (s.at === s.rows.length) this.starving--; // a shard with rows still buffered stays in the heap until they are taken
    this.advance();
  }

  /** The first error ends the read: it is what the waiting (or next) take() gets; the other shards' rows are dropped. */
  private fail(s: Source | undefined, err: Error): void {
    if (s?.dropping) return;
    this.error ??= err;
    if (s) this.ended(this.sources.indexOf(s));
    this.finished = true;
    for (const other of this.sources) this.drop(other);
    this.advance();
  }

  private drop(s: Source): void {
    if (s.dropping) return;
    s.dropping = true;
    s.rows = [];
    s.at = 0;
    s.bytes = 0;
    this.release(s, true);
  }

  /** Reads a link again once its buffer has room (`force`: whatever holds it, the client's throttle included). */
  private release(s: Source, force = false): void {
    if (!force && (!s.held || s.bytes > SHARD_BUFFER / 2)) return;
    s.held = false;
    s.link.up.socket.resume();
  }

  /** Sends what the waiting take() may have now; settles it when it has its rows, the read ends, or fails. */
  private advance(): void {
    const w = this.waiter;
    if (!w) return;
    if (this.error) {
      this.waiter = undefined;
      w.reject(this.error);
      return;
    }
    const limit = this.limit;
    if (limit !== undefined && this.sent >= limit) this.finished = true; // LIMIT 0
    while (w.given < w.want && !this.finished) {
      let row: Buffer | null | undefined;
      try {
        row = this.nextRow();
      } catch (err) {
        this.fail(undefined, err as Error); // a merge the rows refuse (RefusedError, a broken group order), or values it cannot read
        break;
      }
      if (row === undefined) break; // a shard still sending has no row buffered: wait for it
      if (row === null) {
        this.finished = true;
        break;
      }
      if (this.skip > 0) {
        this.skip--;
        continue;
      }
      this.opts.forward(this.visible(row), this.links);
      w.given++;
      if (limit !== undefined && ++this.sent >= limit) this.finished = true;
    }
    if (this.finished) {
      // Past the LIMIT, the shards' rest (at most limit + offset rows each) is read and dropped.
      for (const s of this.sources) this.drop(s);
      this.waiter = undefined;
      void this.settled.then(() => (this.error ? w.reject(this.error) : w.resolve({ rows: w.given, complete: true })));
      return;
    }
    if (w.given >= w.want) {
      this.waiter = undefined;
      w.resolve({ rows: w.given, complete: false });
    }
  }

  /** The next row for the client; undefined to wait for a shard; null when there are no more. */
  private nextRow(): Buffer | null | undefined {
    if (this.gathered) return this.nextGathered(this.gathered);
    const groups = this.groups;
    for (;;) {
      const i = this.pick();
      if (i === undefined) return undefined;
      if (i === -1) {
        const last = groups?.held;
        if (groups) groups.held = undefined;
        return last && groups!.keeps(last) ? encodeDataRow(last) : null;
      }
      if (!groups) return this.shift(i);
      const row = decodeDataRow(this.shift(i));
      const held = groups.held;
      const c = held ? groups.order(row, held) : 1;
      if (c === 0) {
        foldGroup(held!, row, groups.fields, this.opts.group!.merge.aggregates);
        continue;
      }
      if (c < 0) {
        // The shards sorted differently from the gateway (a non-C collation, say): a group could come twice.
        throw new PgError('ERROR', SQLSTATE.FEATURE_NOT_SUPPORTED, 'not supported on a sharded database: GROUP BY or DISTINCT over all shards on values the shards order differently from the gateway (a column with a collation other than C?)');
      }
      groups.held = row;
      if (held && groups.keeps(held)) return encodeDataRow(held); // a group HAVING drops is not counted by OFFSET or LIMIT
    }
  }

  /** The gathered read's rows, once every shard has ended. */
  private nextGathered(g: NonNullable<ScatterRead['gathered']>): Buffer | null | undefined {
    if (!g.rows) {
      if (!this.sources.every((s) => s.ended)) return undefined;
      const all = this.sources.flatMap((s) => s.rows.slice(s.at).map(decodeDataRow));
      for (const s of this.sources) s.rows = [];
      g.rows = mergeRows(all, g.fields, this.opts.group!.merge, this.opts.group!.params).map(encodeDataRow);
    }
    return g.at < g.rows.length ? g.rows[g.at++] : null;
  }

  /** The shard whose row goes next; undefined to wait for a shard; -1 when every shard has ended and nothing is buffered. */
  private pick(): number | undefined {
    if (this.heap) {
      if (this.starving > 0) return undefined;
      return this.heap.pop() ?? (this.sources.every((s) => s.ended) ? -1 : undefined);
    }
    const n = this.sources.length;
    for (let k = 0; k < n; k++) {
      const i = (this.next + k) % n;
      const s = this.sources[i];
      if (s.at < s.rows.length) {
        this.next = i;
        return i;
      }
    }
    return this.sources.every((s) => s.ended) ? -1 : undefined;
  }

  /** Takes shard `i`'s next row: its next row goes into the heap, or it starves until one comes (or it ends). */
  private shift(i: number): Buffer {
    const s = this.sources[i];
    const row = s.rows[s.at++];
    s.bytes -= row.length;
    if (s.at === s.rows.length) {
      s.rows = [];
      s.at = 0;
    } else if (s.at > 1024) {
      s.rows = s.rows.slice(s.at);
      s.at = 0;
    }
    if (this.heap) {
      if (s.at < s.rows.length) this.heap.push(i, decodeDataRow(s.rows[s.at]));
      else if (!s.ended) this.starving++;
    }
    this.release(s);
    return row;
  }
}
