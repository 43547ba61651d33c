/**
 * One MoveTables workflow run: copy (resumable per page) then catch-up from
 * the source's change topics, VDiff on demand, the write switches, and after
 * a switch reverse replication from the target's change topics to the source
 * (decision 0046). Its state lives in Kafka (WorkflowStatus events) and in the
 * applying shards (positions): a new run after a crash or a stop picks up
 * from both. A sharded source is read shard by shard: a snapshot of each in
 * the copy, and each shard's changes (one stream per shard, with its own
 * positions) in catch-up, both filtered by the keyspace ids the shard's range
 * holds; switches freeze every source shard.
 */
import type pg from 'pg';
import type { EventLog, Tail } from '../common/eventlog.ts';
import type { Logger } from '../common/log.ts';
import { gauge, counter } from '../common/metrics.ts';
import { tableTopic } from '../schemas/cdc.ts';
import type { KeyRange, PartitionOffset, RoutingState, VDiffTable, WorkflowEvent, WorkflowRecord, WorkflowStatus } from '../schemas/index.ts';
import { Barrier, dropPositions, ensurePositionsTable, TableApplier } from './apply.ts';
import type { ChangeDecoder, Row } from './changes.ts';
import { copyTable, heldByStandby } from './copy.ts';
import { reopenAfter, reopenLost, type Reconnecting } from './reconnect.ts';
import type { ShardMap } from './shards.ts';
import { createTableSql, describeTable, shardOfRow, WorkflowError, type MovedTable } from './tables.ts';
import { freezeWrites, thawWrites, type Frozen } from './switch.ts';
import { diffTable, type SourceSnapshot } from './vdiff.ts';
import { applyDeltas, copyMarkerTopic, describeMaterialization, diffGroups, groupedSql, MaterializeShape, projectionRelation, type Materialization } from './materialize.ts';

export interface RunnerContext {
  eventLog: EventLog;
  shards: ShardMap;
  decoder: ChangeDecoder;
  log: Logger;
  /** The CDC topic prefix of a source database: the cluster's Kafka prefix plus the stream's. */
  cdcTopicPrefix(database: string): string;
  pageRows: number;
  vdiffRows: number;
  publish(workflow: string, payload: WorkflowEvent['payload']): Promise<void>;
  /** The latest confirmed LSN of a source shard's change stream (everything committed before it is in Kafka). */
  confirmedLsn(database: string, shard: string): bigint | undefined;
  /** The workflow's routing rule state (undefined before the first), and a change of it published on the topology log. */
  routing(workflow: string): RoutingState | undefined;
  setRouting(workflow: string, state: RoutingState, tables?: string[]): Promise<void>;
}

const rowsCopied = gauge('mg_materializer_rows_copied', 'Rows copied so far by the workflow', ['workflow']);
const copyRate = gauge('mg_materializer_copy_rows_per_second', 'Copy rate of the workflow (rows/s)', ['workflow']);
const copyEta = gauge('mg_materializer_copy_eta_seconds', 'Estimated time left in the copy phase', ['workflow']);
const lag = gauge('mg_materializer_lag_seconds', 'Age of the oldest change not applied yet (0 when caught up)', ['workflow']);
const applied = counter('mg_materializer_events_applied_total', 'Change events applied to target shards', ['workflow']);
const vdiffRows = counter('mg_materializer_vdiff_rows_total', 'Source rows compared by VDiff', ['workflow']);
const writeGap = gauge('mg_materializer_switch_write_gap_seconds', 'How long the last switch-traffic held the moved tables\' writes', ['workflow']);

const PROGRESS_MS = 1_000;
/** How long a write switch waits for the side taking over to apply the other side's last changes (writes are held meanwhile). */
const CATCH_UP_MS = 30_000;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The applying direction: the source's changes to the target (catch-up), or the target's to the source (after the writes switched). */
type Direction = 'forward' | 'reverse';

export class MoveTablesRunner {
  status: WorkflowStatus;
  private stopping = false;
  private tails: Tail[] = [];
  private appliers: TableApplier[] = [];
  private tables: MovedTable[] = [];
  /** The source's table topics (catch-up reads them), and the target's (reverse replication reads them). */
  private topics: string[] = [];
  private reverseTopics: string[] = [];
  /** The source's shards (one for an unsharded source), and a session on each shard's primary. */
  private sourceRanges: KeyRange[] = [];
  private shardedSource = false;
  private sources = new Map<string, pg.Client>();
  private ranges: KeyRange[] = [];
  private targets = new Map<string, pg.Client>();
  private timer: NodeJS.Timeout | undefined;
  private lastCommitMs = new Map<string, number>();
  private behind = new Set<string>();
  private vdiffRunning = false;
  private switching = false;
  /** Set while the tails are down to open sessions lost with a primary again (decision 0069). */
  private recovering = false;
  /** When the apply stopped on a lost session: the changes waiting since count in the lag until it applies again. */
  private stalledSince: number | undefined;
  /** A Materialize's query and target table (decision 0058); undefined for MoveTables and Reshard. */
  private mat: Materialization | undefined;
  /** Settles when the run has ended (stopped or failed). */
  readonly done: Promise<void>;
  private finish!: () => void;

  constructor(private readonly rec: WorkflowRecord, private readonly ctx: RunnerContext) {
    this.status = rec.status ?? freshStatus();
    this.done = new Promise((resolve) => (this.finish = resolve));
  }

  get name(): string {
    return this.rec.name;
  }

  /** Whether a stream is being applied and no switch or VDiff is under way: a switch may begin. */
  get ready(): boolean {
    return this.tails.length > 0 && !this.switching && !this.vdiffRunning;
  }

  start(): void {
    this.run().catch((err) => this.fail(err as Error));
  }

  /** Stops copying or applying; the status becomes `phase` (STOPPED, or CANCELLED by the caller). */
  async stop(phase: 'STOPPED' | 'CANCELLED', message: string | null = null): Promise<void> {
    this.stopping = true;
    await this.halt();
    if (this.status.phase !== 'FAILED' || phase === 'CANCELLED') await this.publishStatus({ phase, message });
    this.finish();
  }

  /** The target shards' sessions (for the caller's cleanup), opened if the run has none. */
  async targetSessions(): Promise<Map<string, pg.Client>> {
    if (this.targets.size === 0) await this.connectTargets();
    return this.targets;
  }

  async close(): Promise<void> {
    this.stopping = true; // no progress event after this
    await this.halt();
    await Promise.all([...this.sources.values(), ...this.targets.values()].map((c) => c.end().catch(() => {})));
    this.sources.clear();
    this.targets.clear();
  }

  private async run(): Promise<void> {
    const def = this.rec.definition;
    const log = this.ctx.log.child({ workflow: this.name });
    this.sourceRanges = this.ctx.shards.rangesOf(def.sourceDatabase, def.sourceShards);
    this.shardedSource = this.ctx.shards.state.databases.get(def.sourceDatabase)?.sharded ?? false;
    for (const r of this.sourceRanges) this.sources.set(r.shard, await this.ctx.shards.connect(def.sourceDatabase, r.shard, `mg-materializer-${this.name}`));
    await this.connectTargets();
    const side = (database: string) => ({ database, vschema: this.ctx.shards.state.vschemas.get(database)?.vschema });
    const first = this.sources.get(this.sourceRanges[0].shard)!;
    if (def.type === 'MATERIALIZE') {
      // Checked on every source shard (each must have the columns, and REPLICA IDENTITY FULL for an aggregate).
      for (const client of this.sources.values()) {
        this.mat = await describeMaterialization(client, def.query!, def.tables[0], side(def.targetDatabase), this.shardedSource ? side(def.sourceDatabase) : undefined);
      }
      this.tables.push(this.mat!.target);
    } else {
      for (const name of def.tables) this.tables.push(await describeTable(first, name, side(def.targetDatabase), this.shardedSource ? side(def.sourceDatabase) : undefined));
    }
    for (const client of this.targets.values()) {
      await ensurePositionsTable(client);
      for (const t of this.tables) await client.query(createTableSql(t));
    }
    // The rule exists from the start (serving from the source), so clients' sessions route by it before any switch; a Materialize switches nothing.
    if (!this.mat && this.ctx.routing(this.name) === undefined) await this.ctx.setRouting(this.name, 'SOURCE');
    const topicsOf = (database: string) => (this.mat ? [this.mat.source] : this.tables).map((t) => tableTopic({ topicPrefix: this.ctx.cdcTopicPrefix(database), database }, t.schema, t.table));
    this.topics = topicsOf(def.sourceDatabase);
    this.reverseTopics = topicsOf(def.targetDatabase);

    const routing = this.ctx.routing(this.name);
    if (routing === 'TARGET' || (routing === 'WRITES_HELD' && this.status.phase === 'SWITCHED')) {
      // The writes are switched (a restart, maybe during reverse-traffic, or a start after reverse replication failed): the source follows the target.
      if (this.status.reverseOffsets.length === 0) throw new WorkflowError('the writes are switched but the workflow has no reverse replication position');
      for (const client of this.sources.values()) await ensurePositionsTable(client);
      if (this.status.phase !== 'SWITCHED') await this.publishStatus({ phase: 'SWITCHED', message: null });
      log.info('reverse replication resumes');
      await this.startTails('reverse');
      return;
    }
    if (this.status.startOffsets.length === 0) {
      // Catch-up starts at the topics' ends as they are before any snapshot: every later change is replayed.
      for (const topic of this.topics) {
        await this.waitForTopic(topic, def.sourceDatabase);
        this.status.startOffsets.push(...await this.endOffsetsOf([topic]));
      }
      // One entry per table and source shard: each shard's copy resumes on its own.
      this.status.tables = this.sourceRanges.flatMap((r) => this.tables.map((t) => ({
        table: `${t.schema}.${t.table}`, rowsCopied: 0n, rowsEstimated: 0n, lastKey: null, done: false, shard: this.shardedSource ? r.shard : null,
      })));
      await this.publishStatus({ phase: 'COPYING', message: null });
      log.info({ startOffsets: this.status.startOffsets.length }, 'copy phase begins');
    }
    if (this.status.tables.some((t) => !t.done)) await this.copy();
    if (this.stopping) return;
    await this.publishStatus({ phase: 'RUNNING', message: null, etaSeconds: null });
    log.info('catch-up begins');
    await this.startTails();
  }

  private async connectTargets(): Promise<void> {
    const def = this.rec.definition;
    this.ranges = this.ctx.shards.rangesOf(def.targetDatabase, def.targetShards);
    for (const r of this.ranges) this.targets.set(r.shard, await this.ctx.shards.connect(def.targetDatabase, r.shard, `mg-materializer-${this.name}`));
  }

  private async waitForTopic(topic: string, database: string): Promise<void> {
    for (let i = 0; i < 120; i++) {
      if (await this.ctx.eventLog.topicExists(topic)) return;
      if (this.stopping) return;
      await new Promise((r) => setTimeout(r, 500));
    }
    throw new WorkflowError(`the source's change topic ${topic} does not exist: enable CDC on ${database} (cdc.enabled in the spec, or the CDC_START agent command)`);
  }

  /**
   * The copy phase: every source shard from its own snapshot, the shards in
   * parallel. A copy that loses a session with a primary (a failover, decision
   * 0073) goes on once the session is open again on the new primary: after the
   * last page written, from a new snapshot, as after a restart (decision 0037).
   */
  private async copy(): Promise<void> {
    const started = Date.now();
    let copiedNow = 0;
    // Progress events go out one at a time, in order; a page's is published while the next page is copied.
    let published = Promise.resolve();
    const publish = (change: () => Partial<WorkflowStatus>) => {
      const prev = published;
      published = prev.then(() => this.publishStatus(change()));
      return prev;
    };
    const copyShard = async (shard: string) => {
      const source = this.sources.get(shard)!;
      await source.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
      try {
        await heldByStandby(source); // takes the snapshot, and waits until a failover would keep all it sees
        for (const entry of this.status.tables.filter((e) => (e.shard ?? shard) === shard)) {
          if (entry.done) continue;
          const t = this.tables.find((x) => `${x.schema}.${x.table}` === entry.table)!;
          // A Materialize reads its query's rows: a projection's page by page, an aggregate's groups at once.
          const relation = this.mat && !this.mat.aggregate ? projectionRelation(this.mat) : t;
          const counted = this.mat?.aggregate ? `(${groupedSql(this.mat)}) AS _mg_groups` : relation.sql;
          entry.rowsEstimated = BigInt((await source.query<{ n: string }>(`SELECT count(*) AS n FROM ${counted}`)).rows[0].n);
          if (this.mat?.aggregate) {
            const groups = await this.copyGroups(source, shard);
            entry.rowsCopied = BigInt(groups);
            copiedNow += groups;
            await publish(() => ({ rowsCopied: this.status.rowsCopied + BigInt(groups) }));
          } else await copyTable(source, this.targets, this.ranges, t, {
            lastKey: entry.lastKey ? JSON.parse(entry.lastKey) : null, rowsCopied: Number(entry.rowsCopied),
          }, this.ctx.pageRows, async (pos, rows) => {
            copiedNow += rows;
            entry.lastKey = JSON.stringify(pos.lastKey);
            entry.rowsCopied = BigInt(pos.rowsCopied);
            await publish(() => {
              const rate = copiedNow / Math.max(0.001, (Date.now() - started) / 1000);
              const left = this.status.tables.reduce((n, e) => n + Math.max(0, Number(e.rowsEstimated - e.rowsCopied)), 0);
              return { rowsCopied: this.status.rowsCopied + BigInt(rows), copyRowsPerSecond: rate, etaSeconds: rate > 0 ? left / rate : null };
            });
            return !this.stopping;
          }, this.belongs(relation, shard), { read: relation });
          await published;
          if (this.stopping) return;
          entry.done = true;
          await publish(() => ({}));
          await published;
        }
      } finally {
        published.catch(() => undefined); // a failed publish fails the copy through the awaits above
        await source.query('COMMIT').catch(() => {});
      }
    };
    while (!this.stopping) {
      // Every shard's copy settles before a failure is handled: none goes on writing behind it.
      const copies = await Promise.allSettled(this.sourceRanges.map((r) => copyShard(r.shard)));
      const failed = copies.find((c): c is PromiseRejectedResult => c.status === 'rejected');
      if (!failed) return;
      if (!(await this.reopenAfter(failed.reason as Error))) throw failed.reason;
    }
  }

  /**
   * An aggregate Materialize's copy from one source shard (decision 0058): its groups in the copy snapshot,
   * added on each target shard in one transaction with a marker holding where the snapshot was taken
   * (catch-up skips the changes it holds). A target shard with the marker already is skipped (a restart).
   */
  private async copyGroups(source: pg.Client, shard: string): Promise<number> {
    const mat = this.mat!;
    const { rows: [point] } = await source.query<{ snapshot: string; lsn: string }>("SELECT pg_current_snapshot()::text AS snapshot, (pg_current_wal_lsn() - '0/0'::pg_lsn)::text AS lsn");
    const groups = (await source.query<Row>(groupedSql(mat))).rows;
    const marker = copyMarkerTopic(shard);
    await Promise.all([...this.targets].map(async ([target, client]) => {
      try {
        await client.query('BEGIN');
        const done = await client.query('SELECT 1 FROM mg_materializer.positions WHERE workflow = $1 AND topic = $2', [this.name, marker]);
        const mine = groups.filter((g) => shardOfRow(mat.target, g, this.ranges) === target);
        if (done.rowCount === 0) {
          if (mine.length) await applyDeltas(client, mat.target, mat.columns, mine.map((row) => ({ kind: 'delta', row, sign: 1 })));
          await client.query(
            'INSERT INTO mg_materializer.positions (workflow, topic, kafka_partition, kafka_offset, applied) VALUES ($1, $2, 0, 0, $3::jsonb)',
            [this.name, marker, JSON.stringify(point)]);
        }
        await client.query('COMMIT');
      } catch (err) {
        await client.query('ROLLBACK').catch(() => {});
        throw new WorkflowError(`copying the groups of ${mat.source.table} from ${shard} to target shard ${target}: ${(err as Error).message}`);
      }
    }));
    return groups.length;
  }

  /** The keyspace-id filter of a sharded source's shard: whether a row of `t` read there is the shard's (a row left behind outside its range is not). */
  private belongs(t: MovedTable, shard: string): (row: Row) => boolean {
    const vindex = t.sourceVindex;
    return vindex ? (row) => shardOfRow(t, row, this.sourceRanges, vindex) === shard : () => true;
  }

  /** A Materialize's keyspace-id filter of a sharded source's shard on target rows: by the output column holding the source vindex column. */
  private belongsTarget(shard: string): (row: Row) => boolean {
    const v = this.mat!.source.sourceVindex;
    if (!v) return () => true;
    const out = this.mat!.columns.find((c) => c.kind === 'column' && c.source === v.column);
    if (!out) throw new WorkflowError(`VDiff of a Materialize from a sharded source needs the source's vindex column ${v.column} in the select list (it tells which source shard a target row comes from)`);
    return (row) => shardOfRow(this.mat!.target, row, this.sourceRanges, { ...v, column: out.name }) === shard;
  }

  /**
   * Catch-up (forward) or reverse replication: one tail per table topic from
   * the applying shards' positions, and a progress event every second.
   */
  private async startTails(direction: Direction = 'forward'): Promise<void> {
    clearInterval(this.timer);
    this.timer = setInterval(() => void this.progress(), PROGRESS_MS);
    this.behind.clear();
    // Forward, a sharded source's rows are filtered by its vindex; reverse, the source's vindex places them on its shards.
    let shape: MaterializeShape | undefined;
    if (this.mat) {
      shape = new MaterializeShape(this.mat, this.sources.get(this.sourceRanges[0].shard)!);
      await shape.loadCopied(this.name, this.targets);
    }
    const sourceVindex = (t: MovedTable) => (this.mat ? this.mat.source.sourceVindex : t.sourceVindex);
    this.appliers = this.tables.map((t, i) => (direction === 'forward'
      ? new TableApplier(this.name, t, this.topics[i], this.targets, this.ranges, this.ctx.decoder,
        sourceVindex(t) && { ranges: this.sourceRanges, vindex: sourceVindex(t)! }, shape, shape ? undefined : this.sources)
      : new TableApplier(this.name, t.sourceVindex ? { ...t, vindex: t.sourceVindex } : t, this.reverseTopics[i], this.sources, this.sourceRanges, this.ctx.decoder,
        { ranges: this.ranges, vindex: t.vindex }, undefined, this.targets)));
    const offsets = direction === 'forward' ? this.status.startOffsets : this.status.reverseOffsets;
    for (const applier of this.appliers) {
      const start = await applier.load(offsetsOf(offsets, applier.topic));
      const tail = await this.ctx.eventLog.tail(applier.topic, start, async (messages, info) => {
        const r = await applier.applyBatch(info.partition, messages);
        this.account(applier.topic, info.partition, r.applied, r.lastCommitMs, BigInt(messages[messages.length - 1].offset) + 1n < info.highWatermark);
      });
      this.tails.push(tail);
      void tail.ended.then((err) => {
        if (err && !this.stopping) void this.recover(err, direction);
      });
    }
  }

  private async endOffsetsOf(topics: string[]): Promise<PartitionOffset[]> {
    const out: PartitionOffset[] = [];
    for (const topic of topics) for (const [partition, offset] of await this.ctx.eventLog.endOffsets(topic)) out.push({ topic, partition, offset });
    return out;
  }

  private account(topic: string, partition: number, n: number, commitMs: number | undefined, stillBehind: boolean): void {
    const key = `${topic}/${partition}`;
    if (commitMs !== undefined) this.lastCommitMs.set(key, commitMs);
    if (stillBehind) this.behind.add(key);
    else this.behind.delete(key);
    this.status.eventsApplied += BigInt(n);
    applied.inc({ workflow: this.name }, n);
  }

  /** Lag: age of the last applied change in partitions that still have more to read, else 0 (at least the time the apply has been stalled). */
  private lagSeconds(): number {
    let worst = this.stalledSince === undefined ? 0 : (Date.now() - this.stalledSince) / 1000;
    for (const key of this.behind) worst = Math.max(worst, (Date.now() - (this.lastCommitMs.get(key) ?? Date.now())) / 1000);
    return worst;
  }

  private async progress(): Promise<void> {
    if (this.stopping || (this.status.phase !== 'RUNNING' && this.status.phase !== 'SWITCHED')) return;
    await this.publishStatus({ lagSeconds: this.lagSeconds() }).catch((err) => this.ctx.log.warn({ err, workflow: this.name }, 'progress event not published'));
  }

  private async halt(): Promise<void> {
    clearInterval(this.timer);
    this.timer = undefined;
    const tails = this.tails;
    this.tails = [];
    await Promise.all(tails.map((t) => t.stop().catch(() => {})));
  }

  /**
   * A tail's apply failed. When a session of the workflow's was lost with its
   * shard's primary (a failover or a restart of that Postgres, decision 0069),
   * the tails stop, the lost sessions are opened again on the primaries the
   * topology names (waiting out the election), and the tails start again from
   * the positions the applying shards hold, which went with their rows: no
   * change is lost or applied twice. Any other error fails the workflow, as
   * does a primary not back within RECONNECT_MS. During a switch the switch's
   * own rollback runs instead.
   */
  private async recover(err: Error, direction: Direction): Promise<void> {
    if (this.stopping || this.recovering) return;
    this.recovering = true;
    try {
      const reopened = await this.reopenAfter(err, async () => {
        await this.halt();
        this.stalledSince = Date.now();
        this.timer = setInterval(() => void this.progress(), PROGRESS_MS); // the lag goes on growing in the status meanwhile
      });
      if (!reopened) return await this.fail(err);
      if (!this.stopping) await this.startTails(direction);
    } catch (e) {
      await this.fail(e as Error);
    } finally {
      this.recovering = false;
      this.stalledSince = undefined;
    }
  }

  /**
   * Whether `err` came with sessions lost with their primary (none during a
   * switch, whose own rollback runs). If so, `pause` runs, the lost sessions are
   * opened again on the primaries the topology names, and the status message
   * says so; the caller then goes on from what the shards hold (reconnect.ts).
   */
  private async reopenAfter(err: Error, pause: () => Promise<void> = async () => {}): Promise<boolean> {
    if (this.switching) return false;
    return reopenAfter(this.reconnecting(), err, pause);
  }

  /** Opens every lost session (source and target shards) again on its shard's primary, trying until `withinMs` has passed. */
  private async reopenLost(withinMs: number): Promise<void> {
    await reopenLost(this.reconnecting(), withinMs);
  }

  private reconnecting(): Reconnecting {
    const def = this.rec.definition;
    const application = `mg-materializer-${this.name}`;
    return {
      workflow: this.name, log: this.ctx.log, shards: this.ctx.shards,
      groups: () => [{ database: def.sourceDatabase, clients: this.sources, application }, { database: def.targetDatabase, clients: this.targets, application }],
      stopping: () => this.stopping,
      phase: () => this.status.phase,
      say: (message) => this.publishStatus({ message }),
    };
  }

  private async fail(err: Error): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    this.ctx.log.error({ err, workflow: this.name }, 'workflow failed');
    await this.halt();
    await this.publishStatus({ phase: 'FAILED', message: err.message }).catch(() => {});
    await this.close();
    this.finish();
  }

  async publishStatus(change: Partial<WorkflowStatus>): Promise<void> {
    this.status = { ...this.status, ...change };
    rowsCopied.set({ workflow: this.name }, Number(this.status.rowsCopied));
    copyRate.set({ workflow: this.name }, this.status.copyRowsPerSecond);
    copyEta.set({ workflow: this.name }, this.status.etaSeconds ?? 0);
    lag.set({ workflow: this.name }, this.status.lagSeconds ?? 0);
    await this.ctx.publish(this.name, { 'io.multigres.workflow.WorkflowStatus': this.status } as WorkflowEvent['payload']);
  }

  /**
   * VDiff: pause catch-up, take a source snapshot at WAL position L, apply
   * every change committed before L and none after, snapshot the target
   * shards, resume catch-up, then compare the snapshots.
   */
  async vdiff(id: string): Promise<VDiffTable[]> {
    // `stopping`: failing or being stopped, its appliers closing, while the phase still says RUNNING.
    if (this.status.phase !== 'RUNNING' || this.stopping || this.vdiffRunning || this.recovering) {
      throw new WorkflowError(`VDiff needs the workflow in catch-up (it is ${this.stopping ? 'stopping' : this.status.phase}${this.vdiffRunning ? ', with a VDiff running' : ''}${this.recovering ? ', reconnecting after a failover' : ''})`);
    }
    this.vdiffRunning = true;
    const opened: pg.Client[] = [];
    const def = this.rec.definition;
    const began = Date.now();
    try {
      await this.halt();
      let sourceSnaps: Map<string, pg.Client> | undefined;
      for (let attempt = 1; !sourceSnaps; attempt++) {
        // A snapshot of every source shard, each at its own WAL position: the barrier of that shard's changes.
        const snaps = new Map<string, { client: pg.Client; snapshot: string; lsn: bigint }>();
        for (const { shard } of this.sourceRanges) {
          const s = await this.ctx.shards.connect(def.sourceDatabase, shard, `mg-vdiff-${id}`);
          opened.push(s);
          await s.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
          const { rows: [snap] } = await s.query<{ snapshot: string; lsn: string }>('SELECT pg_current_snapshot()::text AS snapshot, (pg_current_wal_lsn() - \'0/0\'::pg_lsn)::text AS lsn');
          snaps.set(shard, { client: s, snapshot: snap.snapshot, lsn: BigInt(snap.lsn) });
        }
        for (const [shard, snap] of snaps) await this.waitConfirmed(def.sourceDatabase, shard, snap.lsn);
        const barrier = new Barrier(new Map([...snaps].map(([shard, snap]) => [shard, snap.lsn])));
        for (const applier of this.appliers) await this.applyUpTo(applier, barrier);
        if ([...snaps].every(([shard, snap]) => this.consistent(shard, snap.snapshot, snap.lsn))) sourceSnaps = new Map([...snaps].map(([shard, snap]) => [shard, snap.client]));
        else if (attempt >= 5) throw new WorkflowError('no consistent source snapshot after 5 attempts');
        else for (const snap of snaps.values()) await snap.client.query('ROLLBACK');
      }
      const targetSnaps = new Map<string, pg.Client>();
      for (const r of this.ranges) {
        const c = await this.ctx.shards.connect(def.targetDatabase, r.shard, `mg-vdiff-${id}`);
        opened.push(c);
        await c.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
        await c.query('SELECT 1'); // takes the snapshot now, while catch-up is paused
        targetSnaps.set(r.shard, c);
      }
      await this.startTails();
      const snapshotsMs = Date.now() - began;
      const out: VDiffTable[] = [];
      for (const t of this.tables) {
        if (this.mat?.aggregate) {
          out.push(await diffGroups(this.mat, [...sourceSnaps.values()], targetSnaps, this.ranges));
          continue;
        }
        // A Materialize's projection compares its query's rows on the source; the target's rows carry the source vindex column under its output name.
        const relation = this.mat ? projectionRelation(this.mat) : t;
        const sources: SourceSnapshot[] = [...sourceSnaps].map(([shard, client]) => ({
          client, keep: this.belongs(relation, shard), ...(this.mat ? { keepTarget: this.belongsTarget(shard) } : {}),
        }));
        out.push(await diffTable(sources, targetSnaps, this.ranges, t, this.ctx.vdiffRows, (n) => vdiffRows.inc({ workflow: this.name }, n), relation));
      }
      this.ctx.log.info({ workflow: this.name, vdiff: id, snapshotsMs, compareMs: Date.now() - began - snapshotsMs }, 'VDiff compared');
      return out;
    } finally {
      if (this.tails.length === 0 && !this.stopping && !this.recovering) await this.startTails().catch((err) => this.fail(err as Error));
      await Promise.all(opened.map((c) => c.end().catch(() => {})));
      this.vdiffRunning = false;
    }
  }

  /**
   * switch-traffic, writes (decision 0040): gateways hold the tables'
   * statements, the source refuses writes (after those in flight), the target
   * catches up to the source's position, the rule flips to the target and the
   * held statements go on there; reverse replication then keeps the source in
   * step from the target's change topics, from their ends at the flip
   * (decision 0046). On any failure the source takes writes again and the
   * rule goes back: traffic stays on the source.
   */
  async switchWrites(): Promise<void> {
    if (!this.ready || this.status.phase !== 'RUNNING') {
      throw new WorkflowError(`switch-traffic needs the workflow in catch-up (it is ${this.status.phase}${this.vdiffRunning ? ', with a VDiff running' : ''})`);
    }
    this.switching = true;
    const def = this.rec.definition;
    const before = this.ctx.routing(this.name);
    let held = false;
    const frozen = new Map<string, Frozen>();
    try {
      await this.reopenLost(CATCH_UP_MS); // the source's sessions, idle in catch-up, may have gone with a failover
      await this.readyToReverse();
      const began = performance.now();
      await this.ctx.setRouting(this.name, 'WRITES_HELD');
      held = true;
      await this.freezeAll(this.sources, def.targetDatabase, frozen);
      await this.catchUpTo(def.sourceDatabase, frozen);
      await this.halt();
      // Everything the target holds now (the copy, catch-up) is before these offsets: it never goes back to the source.
      const reverseOffsets = await this.endOffsetsOf(this.reverseTopics);
      for (const client of this.targets.values()) await thawWrites(client, this.tables); // frozen by an earlier reverse-traffic
      await this.ctx.setRouting(this.name, 'TARGET');
      const gapMs = Math.round(performance.now() - began);
      writeGap.set({ workflow: this.name }, gapMs / 1000);
      this.ctx.log.info({ workflow: this.name, gapMs, lsn: Object.fromEntries([...frozen].map(([shard, f]) => [shard, String(f.lsn)])) }, 'writes switched');
      await this.publishStatus({ phase: 'SWITCHED', message: `writes switched to ${def.targetDatabase}; held ${gapMs} ms`, reverseOffsets, eventsApplied: 0n, lagSeconds: 0 });
      await this.startTails('reverse');
    } catch (err) {
      this.ctx.log.error({ err, workflow: this.name }, 'switch-traffic failed; traffic stays on the source');
      for (const shard of frozen.keys()) {
        await thawWrites(this.sources.get(shard)!, this.tables).catch((e) => this.ctx.log.error({ err: e, workflow: this.name, shard }, 'could not let a source shard take writes again'));
      }
      if (held) await this.ctx.setRouting(this.name, before === 'READS_TARGET' ? 'READS_TARGET' : 'SOURCE');
      if (this.tails.length === 0 && !this.stopping) await this.startTails();
      await this.publishStatus({ message: `switch-traffic failed, traffic stays on ${def.sourceDatabase}: ${(err as Error).message}` });
    } finally {
      this.switching = false;
    }
  }

  /**
   * Before the writes switch: reverse replication will need the target's
   * change stream on every shard (decision 0046), its table topics, and the
   * stream past everything the target holds now, so that the copy and
   * catch-up writes are all before the offsets recorded at the flip. Checked
   * before the writes are held (an idle stream confirms within cdc.heartbeatMs).
   */
  private async readyToReverse(): Promise<void> {
    const def = this.rec.definition;
    for (const client of this.sources.values()) await ensurePositionsTable(client);
    for (const [shard, client] of this.targets) {
      const { rows: [{ lsn }] } = await client.query<{ lsn: string }>("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::text AS lsn");
      await this.waitConfirmed(def.targetDatabase, shard, BigInt(lsn));
    }
    for (const topic of this.reverseTopics) {
      if (!(await this.ctx.eventLog.topicExists(topic))) {
        throw new WorkflowError(`the target's change topic ${topic} does not exist: reverse replication needs CDC on ${def.targetDatabase} for the moved tables (an empty table has no topic until its first change)`);
      }
    }
  }

  /**
   * reverse-traffic after the writes switched: the mirror of switchWrites.
   * Gateways hold the tables' statements, every target shard refuses writes
   * (after those in flight) and leaves a marker, the source applies each
   * shard's changes up to it, the source takes writes again, the rule flips
   * back, and catch-up resumes from the source's stream as it is then (the
   * target tables keep refusing clients' writes; the apply passes). On any
   * failure the target shards take writes again and the rule goes back.
   */
  async reverseWrites(): Promise<void> {
    if (!this.ready || this.status.phase !== 'SWITCHED') {
      throw new WorkflowError(`reverse-traffic needs the writes switched with reverse replication running (the workflow is ${this.status.phase})`);
    }
    this.switching = true;
    const def = this.rec.definition;
    const began = performance.now();
    let held = false;
    let sourceThawed = false;
    const frozen = new Map<string, Frozen>();
    try {
      await this.reopenLost(CATCH_UP_MS); // the target's sessions, idle in reverse replication, may have gone with a failover
      await this.ctx.setRouting(this.name, 'WRITES_HELD');
      held = true;
      await this.freezeAll(this.targets, def.sourceDatabase, frozen);
      await this.catchUpTo(def.targetDatabase, frozen);
      await this.halt();
      // Catch-up starts afresh at the source stream's ends: the reverse apply's own writes there need not go back to the target.
      const startOffsets = await this.endOffsetsOf(this.topics);
      for (const client of [...this.targets.values(), ...this.sources.values()]) await dropPositions(client, this.name);
      sourceThawed = true;
      for (const client of this.sources.values()) await thawWrites(client, this.tables);
      await this.ctx.setRouting(this.name, 'SOURCE');
      const gapMs = Math.round(performance.now() - began);
      writeGap.set({ workflow: this.name }, gapMs / 1000);
      this.ctx.log.info({ workflow: this.name, gapMs }, 'writes switched back to the source');
      await this.publishStatus({ phase: 'RUNNING', message: `writes switched back to ${def.sourceDatabase}; held ${gapMs} ms`, startOffsets, reverseOffsets: [], eventsApplied: 0n, lagSeconds: 0 });
      await this.startTails();
    } catch (err) {
      this.ctx.log.error({ err, workflow: this.name }, 'reverse-traffic failed; traffic stays on the target');
      const undo = async (what: string, step: () => Promise<unknown>) => step().catch((e) => this.ctx.log.error({ err: e, workflow: this.name }, what));
      if (sourceThawed) await undo('could not make the source refuse writes again', () => this.freezeAll(this.sources, def.targetDatabase, new Map()));
      for (const shard of frozen.keys()) await undo(`could not let target shard ${shard} take writes again`, () => thawWrites(this.targets.get(shard)!, this.tables));
      if (held) await this.ctx.setRouting(this.name, 'TARGET');
      if (this.tails.length === 0 && !this.stopping) await this.startTails('reverse');
      await this.publishStatus({ message: `reverse-traffic failed, traffic stays on ${def.targetDatabase}: ${(err as Error).message}` });
    } finally {
      this.switching = false;
    }
  }

  /**
   * Freezes the writes of every shard of the side that stops serving, in
   * parallel; `frozen` gets each shard that froze (what a rollback thaws).
   * Every freeze settles before a refusal is thrown, so none is left in place
   * behind the rollback.
   */
  private async freezeAll(clients: Map<string, pg.Client>, servingDatabase: string, frozen: Map<string, Frozen>): Promise<void> {
    const freezes = await Promise.allSettled([...clients].map(async ([shard, client]) => frozen.set(shard, await freezeWrites(client, this.tables, servingDatabase, this.name))));
    const refused = freezes.find((f) => f.status === 'rejected');
    if (refused) throw refused.reason;
  }

  /**
   * Applies every change the frozen shards of `database` committed before
   * their freeze, with the tails running. A table's marker from a shard (its
   * no-op update after the freeze position) shows that shard's stream has
   * delivered them all; where the table is empty on a shard there is none,
   * so that stream's confirmed position is waited for (up to cdc.heartbeatMs
   * when idle). The topic is then applied to its end as it is (a marker is in
   * one partition: the others may still be behind it).
   */
  private async catchUpTo(database: string, frozen: Map<string, Frozen>): Promise<void> {
    const deadline = Date.now() + CATCH_UP_MS;
    const until = async (done: () => boolean) => {
      while (!done()) {
        if (this.stopping) throw new WorkflowError('the workflow stopped during the switch');
        if (this.tails.length === 0) throw new WorkflowError('the change stream stopped being applied during the switch');
        if (Date.now() > deadline) throw new WorkflowError(`the changes of ${database} were not applied within ${CATCH_UP_MS / 1000} s`);
        await sleep(5);
      }
    };
    for (const [i, applier] of this.appliers.entries()) {
      for (const [shard, f] of frozen) {
        if (f.marked[i]) await until(() => (applier.appliedLsn.get(shard) ?? 0n) >= f.lsn);
        else await this.waitConfirmed(database, shard, f.lsn);
      }
      const end = await this.ctx.eventLog.endOffsets(applier.topic);
      await until(() => [...end].every(([partition, offset]) => applier.appliedOffset(partition) >= offset - 1n));
    }
  }

  /** Waits until a shard's change stream has everything before `lsn` in Kafka (its confirmed LSN, from mg.cdc.status.v1). */
  private async waitConfirmed(database: string, shard: string, lsn: bigint): Promise<void> {
    for (let i = 0; i < 600; i++) {
      if ((this.ctx.confirmedLsn(database, shard) ?? -1n) >= lsn) return;
      await sleep(50);
    }
    throw new WorkflowError(`the change stream of ${database}/${shard} has not confirmed LSN ${lsn} within 30 s (is CDC on for ${database}?)`);
  }

  /** Applies a topic's changes committed before the barrier (everything before it is below the topic's current end). */
  private async applyUpTo(applier: TableApplier, barrier: Barrier): Promise<void> {
    const end = await this.ctx.eventLog.endOffsets(applier.topic);
    const start = await applier.load(offsetsOf(this.status.startOffsets, applier.topic));
    const open = new Set([...end].filter(([p, e]) => (start.get(p) ?? 0n) < e).map(([p]) => p));
    if (open.size === 0) return;
    let finished!: () => void;
    const allDone = new Promise<void>((resolve) => (finished = resolve));
    const tail = await this.ctx.eventLog.tail(applier.topic, start, async (messages, info) => {
      if (!open.has(info.partition)) return;
      const r = await applier.applyBatch(info.partition, messages, barrier);
      this.account(applier.topic, info.partition, r.applied, r.lastCommitMs, false);
      if (r.reachedBarrier || BigInt(messages[messages.length - 1].offset) + 1n >= end.get(info.partition)!) open.delete(info.partition);
      if (open.size === 0) finished();
    });
    try {
      const err = await Promise.race([allDone.then(() => undefined), tail.ended]);
      if (err) throw err;
    } finally {
      await tail.stop();
    }
  }

  /** Whether every change of a source shard applied before its L belongs to a transaction the shard's snapshot sees (a commit racing the snapshot does not). */
  private consistent(shard: string, snapshot: string, lsn: bigint): boolean {
    const [, xmax, xip] = snapshot.split(':');
    const low32 = (x: string) => BigInt(x) & 0xffffffffn;
    const inProgress = new Set((xip ? xip.split(',') : []).map(low32));
    const max = low32(xmax);
    return this.appliers.every((a) => a.recent.every((r) => r.shard !== shard || r.commitLsn >= lsn || (!inProgress.has(r.txId) && r.txId < max)));
  }
}

export function freshStatus(): WorkflowStatus {
  return {
    phase: 'COPYING', message: null, startOffsets: [], tables: [], rowsCopied: 0n, copyRowsPerSecond: 0, etaSeconds: null,
    eventsApplied: 0n, lagSeconds: null, reverseOffsets: [], switchedAt: null,
  };
}

export const offsetsOf = (offsets: PartitionOffset[], topic: string) => new Map(offsets.filter((o) => o.topic === topic).map((o) => [o.partition, o.offset]));
