/**
 * Catch-up: change events of one database's table topics applied to the
 * shards of another: the source's changes to the target shards, or, after the
 * writes switched (reverse replication), the target's changes to the source.
 * Idempotent by stream position: each applying shard keeps, per workflow and
 * topic partition, the last applied (epoch, commit LSN, position) of each
 * streaming shard and the Kafka offset, in mg_materializer.positions, written
 * in the same transaction as the rows. Anything at or below that tuple (a
 * redelivery, or a replay after a crash) is skipped on that shard. The apply
 * runs with session_replication_role = replica, so the trigger that refuses
 * clients' writes on the side not serving (decision 0040) lets it through.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type pg from 'pg';
import type { RawMessage } from '../common/eventlog.ts';
import type { KeyRange } from '../schemas/index.ts';
import type { Change, ChangeDecoder, Row } from './changes.ts';
import { deleteSql, describeColumns, keyText, quoteIdent, shardOfRow, upsertSql, vindexInKey, WorkflowError, type MovedTable, type Vindex } from './tables.ts';

/** How long a column new in the change stream is waited for on the target, and how often it is looked for. */
const COLUMN_WAIT_MS = 10_000;
const COLUMN_WAIT_STEP_MS = 250;

export type Tuple = [epoch: bigint, commitLsn: bigint, position: bigint];

const after = (a: Tuple, b: Tuple | undefined) => !b || a[0] > b[0] || (a[0] === b[0] && (a[1] > b[1] || (a[1] === b[1] && a[2] > b[2])));

export const POSITIONS_DDL = `CREATE SCHEMA IF NOT EXISTS mg_materializer;
CREATE TABLE IF NOT EXISTS mg_materializer.positions (
  workflow text NOT NULL, topic text NOT NULL, kafka_partition int NOT NULL,
  kafka_offset bigint NOT NULL,
  applied jsonb NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (workflow, topic, kafka_partition))`;

/** A target shard's position in one topic partition. */
interface ShardPosition { offset: bigint; applied: Map<string, Tuple> }

/**
 * Where catch-up stops for a VDiff: each streaming shard's changes committed
 * at or after its LSN wait. Shards share a topic partition, so the changes of
 * a shard that reached its barrier are held back while the others' go on; the
 * partition's recorded offset stays before the first held change, and when
 * catch-up reads again from there, the per-shard positions skip what was
 * applied past it.
 */
export class Barrier {
  /** Per partition: the streaming shards that reached their barrier, and the offset of the first change held back. */
  private held = new Map<number, { shards: Set<string>; first: bigint }>();

  constructor(readonly lsn: Map<string, bigint>) {}

  /** Whether the change waits (its shard's later changes in the partition then wait too: they are in commit order). */
  holds(partition: number, change: Change, offset: bigint): boolean {
    const h = this.held.get(partition);
    if (h?.shards.has(change.sourceShard)) return true;
    const at = this.lsn.get(change.sourceShard);
    if (at === undefined || change.commitLsn < at) return false;
    if (h) h.shards.add(change.sourceShard);
    else this.held.set(partition, { shards: new Set([change.sourceShard]), first: offset });
    return true;
  }

  /** The highest offset of the partition that may be recorded as applied: before the first held change. */
  cap(partition: number, offset: bigint): bigint {
    const first = this.held.get(partition)?.first;
    return first !== undefined && first - 1n < offset ? first - 1n : offset;
  }

  /** Every streaming shard reached its barrier in the partition: nothing more of it is applied. */
  reached(partition: number): boolean {
    return (this.held.get(partition)?.shards.size ?? 0) >= this.lsn.size;
  }
}

/** The streaming database's shards when it is sharded, and the vindex that places its rows on them. */
export interface StreamShards { ranges: KeyRange[]; vindex: Vindex }

export interface BatchResult {
  applied: number;
  /** Commit time of the last change applied (ms), if any. */
  lastCommitMs: number | undefined;
  /** The batch reached a change at or past the barrier: this partition is done. */
  reachedBarrier: boolean;
}

/**
 * What a change does to the applying table: a whole row written, a row deleted by key, or (an aggregate
 * Materialize, decision 0058) a group's count and sums moved by a signed contribution.
 */
export type Op = { kind: 'upsert'; row: Row } | { kind: 'delete'; key: Row } | { kind: 'delta'; row: Row; sign: 1 | -1 };

/**
 * How a Materialize turns source changes into ops on its target table (decision 0058); MoveTables applies
 * each change as it is (changeOps).
 */
export interface ChangeShape {
  /** Each change's ops, in order ('truncate': the table empties); a whole batch at once (its filter is one query). */
  opsOf(changes: Change[]): Promise<Array<Array<Op | 'truncate'>>>;
  /** Whether a change still applies on a target shard (an aggregate's copy counted it there already: not). */
  appliesOn(shard: string, change: Change): boolean;
  /** The ops of one run on a target shard, after the run's deletes and upserts (an aggregate's deltas). */
  applyDeltas(client: pg.Client, deltas: Array<Extract<Op, { kind: 'delta' }>>): Promise<void>;
}

/**
 * Upserts grouped by the columns their rows carry: a row from before a DDL that added a column lacks it,
 * and its upsert must leave the target's value (a default, or what a newer change wrote) alone.
 */
function byColumns(rows: Row[]): Row[][] {
  const groups = new Map<string, Row[]>();
  for (const row of rows) {
    const signature = Object.keys(row).join(',');
    const group = groups.get(signature);
    if (group) group.push(row);
    else groups.set(signature, [row]);
  }
  return [...groups.values()];
}

/** A change as MoveTables applies it: creates, updates and snapshot reads upsert the whole row, deletes by key. */
export function changeOps(change: Change): Array<Op | 'truncate'> {
  switch (change.op) {
    case 't': return ['truncate'];
    case 'd': return [{ kind: 'delete', key: change.before! }];
    default: return [{ kind: 'upsert', row: change.after! }];
  }
}

/**
 * A shard's ops in order, as runs between truncates; within a run only each key's last op matters, except
 * deltas, which add up.
 * `truncate`: the run starts by emptying the table (true), or only of the rows a streaming shard held (its name).
 */
type Segment = { truncate: boolean | string; ops: Map<string, Op>; deltas: Array<Extract<Op, { kind: 'delta' }>> };

export class TableApplier {
  /** Per target shard, per partition. */
  private positions = new Map<string, Map<number, ShardPosition>>();
  /** Where reading began in each partition (load's answer). */
  private start = new Map<number, bigint>();
  /** Per streaming shard, the highest commit LSN applied on every applying shard (a switch waits for its marker with it). */
  readonly appliedLsn = new Map<string, bigint>();
  /** The columns of the last change row seen (with a streamSide): the table's columns are looked up again when they change. */
  private streamColumns = '';
  /** (streaming shard, txId, commit LSN) of recent applied changes, for VDiff's snapshot check. */
  readonly recent: Array<{ shard: string; txId: bigint; commitLsn: bigint }> = [];

  constructor(
    readonly workflow: string,
    readonly table: MovedTable,
    readonly topic: string,
    private readonly targets: Map<string, pg.Client>,
    private readonly ranges: KeyRange[],
    private readonly decoder: ChangeDecoder,
    /**
     * The streaming database's shards when it is sharded: a truncate then concerns one shard's rows,
     * and a change of a row outside its shard's key range (keyspace-id filter) is not applied.
     */
    private readonly stream?: StreamShards,
    private readonly shape?: ChangeShape,
    /**
     * Sessions on the shards the stream comes from, when the table is the same on both sides (MoveTables,
     * Reshard): a column the change stream carries and the table does not know came from DDL run while the
     * workflow runs. Its values are applied once the target has the column too (the gateway runs a sharded
     * database's DDL on every shard set); a target without it stops the workflow rather than lose them,
     * unless the stream's side no longer has it either (dropped on both: changes from before the DROP).
     */
    private readonly streamSide?: Map<string, pg.Client>,
  ) {}

  /** Loads the shards' positions; returns where to start reading each partition (the earliest any shard needs). */
  async load(startOffsets: Map<number, bigint>): Promise<Map<number, bigint>> {
    const start = new Map(startOffsets);
    const perShard = await Promise.all([...this.targets].map(async ([shard, client]) => {
      const { rows } = await client.query<{ kafka_partition: string; kafka_offset: string; applied: string }>(
        'SELECT kafka_partition, kafka_offset, applied::text FROM mg_materializer.positions WHERE workflow = $1 AND topic = $2',
        [this.workflow, this.topic]);
      const byPartition = new Map<number, ShardPosition>();
      for (const r of rows) {
        const applied = new Map(Object.entries(JSON.parse(r.applied) as Record<string, string[]>).map(([s, t]) => [s, t.map(BigInt) as Tuple]));
        byPartition.set(Number(r.kafka_partition), { offset: BigInt(r.kafka_offset), applied });
      }
      this.positions.set(shard, byPartition);
      return byPartition;
    }));
    for (const partition of start.keys()) {
      const next = perShard.map((p) => p.get(partition)?.offset);
      // Only when every shard has applied past a point can reading begin after it.
      if (next.every((o) => o !== undefined)) start.set(partition, next.reduce((a, b) => (b! < a! ? b : a))! + 1n);
    }
    this.start = start;
    return start;
  }

  /** Applies one fetched batch of a partition on every target shard (one transaction each, with the position). */
  async applyBatch(partition: number, messages: RawMessage[], barrier?: Barrier): Promise<BatchResult> {
    const segments = new Map<string, Segment[]>([...this.targets.keys()].map((s) => [s, [{ truncate: false, ops: new Map(), deltas: [] }]]));
    const newApplied = new Map<string, Map<string, Tuple>>([...this.targets.keys()].map((s) => [s, new Map()]));
    let lastOffset: bigint | undefined;
    let applied = 0;
    let lastCommitMs: number | undefined;
    const maxLsn = new Map<string, bigint>();
    const changes: Change[] = [];
    for (const m of messages) {
      let change: Change | undefined;
      if (barrier?.reached(partition)) break;
      if (m.value !== null) change = await this.decoder.decode(m.value);
      lastOffset = BigInt(m.offset);
      if (!change) continue; // a tombstone: the delete before it did the work
      if (barrier?.holds(partition, change, lastOffset)) continue;
      if (change.unavailable.length) {
        throw new WorkflowError(`${this.table.table} at offset ${m.offset}: an update left TOASTed columns (${change.unavailable.join(', ')}) unsent; set REPLICA IDENTITY FULL on the source table`);
      }
      if (this.streamSide && change.after) await this.followColumnsOf(change.after);
      changes.push(change);
    }
    const inShard = changes.filter((c) => !this.outsideItsShard(c));
    const ops = this.shape ? await this.shape.opsOf(inShard) : inShard.map(changeOps);
    const opsOf = new Map(inShard.map((c, i) => [c, ops[i]]));
    for (const change of changes) {
      if (change.commitLsn > (maxLsn.get(change.sourceShard) ?? 0n)) maxLsn.set(change.sourceShard, change.commitLsn);
      const tuple: Tuple = [change.epoch, change.commitLsn, change.position];
      let taken = false;
      for (const [shard, op] of (opsOf.get(change) ?? []).flatMap((o) => this.place(o))) {
        const held = newApplied.get(shard)!.get(change.sourceShard) ?? this.positions.get(shard)?.get(partition)?.applied.get(change.sourceShard);
        if (!after(tuple, held)) continue; // applied before (a redelivery or a replay)
        if (this.shape && !this.shape.appliesOn(shard, change)) continue;
        taken = true;
        const runs = segments.get(shard)!;
        if (op === 'truncate') runs.push({ truncate: this.stream ? change.sourceShard : true, ops: new Map(), deltas: [] });
        else if (op.kind === 'delta') runs[runs.length - 1].deltas.push(op);
        else {
          const row = op.kind === 'upsert' ? op.row : op.key;
          runs[runs.length - 1].ops.set(keyText(this.table, row), op);
        }
      }
      // Every shard moves past it (a change concerns one shard, but all record the position).
      for (const shard of this.targets.keys()) {
        const map = newApplied.get(shard)!;
        const held = map.get(change.sourceShard) ?? this.positions.get(shard)?.get(partition)?.applied.get(change.sourceShard);
        if (after(tuple, held)) map.set(change.sourceShard, tuple);
      }
      lastCommitMs = change.commitMs;
      if (!taken) continue;
      applied++;
      if (change.txId !== null) {
        this.recent.push({ shard: change.sourceShard, txId: change.txId, commitLsn: change.commitLsn });
        if (this.recent.length > 10_000) this.recent.splice(0, this.recent.length - 5_000);
      }
    }
    const reachedBarrier = barrier?.reached(partition) ?? false;
    if (lastOffset !== undefined) {
      const offset = barrier ? barrier.cap(partition, lastOffset) : lastOffset;
      await Promise.all([...this.targets].map(([shard, client]) =>
        this.commit(shard, client, partition, offset, segments.get(shard)!, newApplied.get(shard)!)));
      for (const [shard, lsn] of maxLsn) if (lsn > (this.appliedLsn.get(shard) ?? 0n)) this.appliedLsn.set(shard, lsn);
    }
    return { applied, lastCommitMs, reachedBarrier };
  }

  /**
   * Takes the target's columns again when the stream's columns change (a column added or dropped by
   * DDL). A column the target does not have yet is waited for: its DDL may commit a moment after the
   * source's (the gateway runs it on every shard at once).
   */
  private async followColumnsOf(row: Row): Promise<void> {
    const names = Object.keys(row);
    const signature = names.join(',');
    if (signature === this.streamColumns) return;
    const t = this.table;
    for (let waited = 0; ; waited += COLUMN_WAIT_STEP_MS) {
      await this.takeTargetColumns(names);
      const lacking = names.filter((name) => !t.columns.some((c) => c.name === name));
      const missing = lacking.length ? await this.stillOnStreamSide(lacking) : [];
      if (!missing.length) break;
      if (waited >= COLUMN_WAIT_MS) {
        throw new WorkflowError(`the change stream of ${t.table} carries column${missing.length > 1 ? 's' : ''} ${missing.join(', ')} that the target table lacks `
          + '(DDL ran on the source only): run the same DDL on the target, then start the workflow again');
      }
      await sleep(COLUMN_WAIT_STEP_MS);
    }
    this.streamColumns = signature;
  }

  /**
   * The target's columns that `carried` names or the table already has (one only the target has keeps its
   * values), in place: the workflow's other views of the table (VDiff, the appliers of other source shards
   * and of the other direction) share this array, and a stream still behind a DDL must not take away the
   * column another stream has begun to carry (its rows simply leave it alone, see upsertSql).
   */
  private async takeTargetColumns(carried: string[]): Promise<void> {
    const t = this.table;
    const [target] = this.targets.values();
    const fresh = (await describeColumns(target, `${t.schema}.${t.table}`)).columns
      .filter((c) => carried.includes(c.name) || t.columns.some((known) => known.name === c.name));
    t.columns.splice(0, t.columns.length, ...fresh);
  }

  /**
   * After a write refused for an unknown column (42703). The gateway runs DDL on every shard at once, but
   * each shard commits it a moment apart: a column the rows carry and this target shard lacks was either
   * dropped (the stream's side no longer has it: rows from before the DROP still carry it, so it leaves
   * the table's columns) or added and not yet committed here (the stream's side has it: the caller waits).
   */
  private async settleColumns(client: pg.Client, runs: Segment[]): Promise<void> {
    const carried = new Set(runs.flatMap((run) => [...run.ops.values()].flatMap((o) => (o.kind === 'upsert' ? Object.keys(o.row) : []))));
    const here = (await describeColumns(client, `${this.table.schema}.${this.table.table}`)).columns;
    const lacking = this.table.columns.filter((c) => carried.has(c.name) && !here.some((h) => h.name === c.name)).map((c) => c.name);
    if (!lacking.length) return;
    const kept = await this.stillOnStreamSide(lacking);
    const dropped = lacking.filter((name) => !kept.includes(name));
    const t = this.table;
    t.columns.splice(0, t.columns.length, ...t.columns.filter((c) => !dropped.includes(c.name)));
  }

  /** Which of `columns` the table on the stream's side still has (DDL runs on all of a database's shards at once: one tells). */
  private async stillOnStreamSide(columns: string[]): Promise<string[]> {
    const [side] = this.streamSide!.values();
    const there = (await describeColumns(side, `${this.table.schema}.${this.table.table}`)).columns;
    return columns.filter((name) => there.some((c) => c.name === name));
  }

  /** Which shards an op touches, and how. */
  private place(op: Op | 'truncate'): Array<[string, Op | 'truncate']> {
    const t = this.table;
    const all = [...this.targets.keys()];
    // From the unsharded source: the table empties everywhere. From a target shard (reverse): that shard's rows (see commit).
    if (op === 'truncate') return all.map((s) => [s, op]);
    switch (op.kind) {
      case 'delete':
        if (vindexInKey(t)) return [[shardOfRow(t, op.key, this.ranges), op]];
        return all.map((s) => [s, op]);
      case 'delta':
        return [[shardOfRow(t, op.row, this.ranges), op]];
      case 'upsert': {
        const home = shardOfRow(t, op.row, this.ranges);
        const out: Array<[string, Op]> = [[home, op]];
        // A vindex column outside the key can change in an update: the row's old copy may be on another shard.
        if (!vindexInKey(t)) for (const s of all) if (s !== home) out.push([s, { kind: 'delete', key: op.row }]);
        return out;
      }
    }
  }

  private async commit(shard: string, client: pg.Client, partition: number, offset: bigint, runs: Segment[], applied: Map<string, Tuple>): Promise<void> {
    const held = this.positions.get(shard)?.get(partition)?.applied ?? new Map<string, Tuple>();
    const merged = new Map([...held, ...applied]);
    const failed = (err: unknown) => new WorkflowError(`applying changes of ${this.table.table} on target shard ${shard} (up to offset ${offset}): ${(err as Error).message}`);
    for (let waited = 0; ; waited += COLUMN_WAIT_STEP_MS) {
      try {
        await this.write(client, partition, offset, runs, merged);
        break;
      } catch (err) {
        if (!this.streamSide || (err as { code?: string }).code !== '42703' || waited >= COLUMN_WAIT_MS) throw failed(err);
        await this.settleColumns(client, runs);
        await sleep(COLUMN_WAIT_STEP_MS);
      }
    }
    const byPartition = this.positions.get(shard) ?? new Map<number, ShardPosition>();
    byPartition.set(partition, { offset, applied: merged });
    this.positions.set(shard, byPartition);
  }

  /** One shard's part of a batch and its new position, in one transaction (rolled back on error). */
  private async write(client: pg.Client, partition: number, offset: bigint, runs: Segment[], applied: Map<string, Tuple>): Promise<void> {
    try {
      await client.query('BEGIN; SET LOCAL session_replication_role = replica');
      for (const run of runs) {
        if (run.truncate === true) await client.query(`DELETE FROM ${this.table.sql}`);
        else if (run.truncate) await this.deleteRowsOf(client, run.truncate);
        const ops = [...run.ops.values()];
        const deletes = ops.flatMap((o) => (o.kind === 'delete' ? [o.key] : []));
        const upserts = ops.flatMap((o) => (o.kind === 'upsert' ? [o.row] : []));
        if (deletes.length) await client.query(deleteSql(this.table, deletes));
        for (const rows of byColumns(upserts)) await client.query(upsertSql(this.table, rows));
        if (run.deltas.length) await this.shape!.applyDeltas(client, run.deltas);
      }
      await client.query(
        `INSERT INTO mg_materializer.positions (workflow, topic, kafka_partition, kafka_offset, applied) VALUES ($1, $2, $3, $4, $5::jsonb)
         ON CONFLICT (workflow, topic, kafka_partition) DO UPDATE SET kafka_offset = EXCLUDED.kafka_offset, applied = EXCLUDED.applied, updated_at = now()`,
        [this.workflow, this.topic, partition, offset.toString(), JSON.stringify(Object.fromEntries([...applied].map(([s, t]) => [s, t.map(String)])))]);
      await client.query('COMMIT');
    } catch (err) {
      await client.query('ROLLBACK').catch(() => {});
      throw err;
    }
  }

  /** The offset every applying shard has passed in a partition (a shard with no position yet: the one before where reading began). */
  appliedOffset(partition: number): bigint {
    const before = (this.start.get(partition) ?? 0n) - 1n;
    const offsets = [...this.targets.keys()].map((s) => this.positions.get(s)?.get(partition)?.offset ?? before);
    return offsets.reduce((a, b) => (b < a ? b : a));
  }

  /**
   * A change from a shard of a sharded streaming database about a row whose
   * keyspace id that shard's range does not hold (a row left behind there):
   * not the shard's to stream. A delete whose key lacks the vindex column cannot tell, and applies.
   */
  private outsideItsShard(change: Change): boolean {
    const row = change.after ?? change.before;
    const s = this.stream;
    if (!s || !row || row[s.vindex.column] === null || row[s.vindex.column] === undefined) return false;
    return shardOfRow(this.table, row, s.ranges, s.vindex) !== change.sourceShard;
  }

  /** A truncate on one shard of the streaming database: deletes the rows its key range holds (their vindex places them there). */
  private async deleteRowsOf(client: pg.Client, streamShard: string): Promise<void> {
    const t = this.table;
    const { ranges, vindex } = this.stream!;
    const columns = [...new Set([...t.key, vindex.column])].map(quoteIdent).join(', ');
    const { rows } = await client.query<Row>(`SELECT ${columns} FROM ${t.sql}`);
    const gone = rows.filter((r) => shardOfRow(t, r, ranges, vindex) === streamShard);
    if (gone.length) await client.query(deleteSql(t, gone));
  }
}

export async function ensurePositionsTable(client: pg.Client): Promise<void> {
  await client.query(POSITIONS_DDL);
}

export async function dropPositions(client: pg.Client, workflow: string): Promise<void> {
  await client.query('DELETE FROM mg_materializer.positions WHERE workflow = $1', [workflow]);
}
