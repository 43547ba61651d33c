/**
 * One online migration (decision 0060): an ALTER TABLE run on a shadow table
 * in schema mg_materializer (never streamed by CDC), which is filled on every
 * shard of the database from a snapshot of the table in pages, then kept in
 * step from the table's change topic in Kafka (MoveTables' copy and apply,
 * with the column mapping of alter.ts). Once caught up it cuts over as a write
 * switch does (decision 0040): gateways hold the table's statements, the table
 * refuses writes and leaves a marker, the shadow applies up to it, and one
 * transaction per shard swaps the tables' names; the old table then follows
 * the new one from the same topic (decision 0046) until `complete` or the
 * revert window's end drops it, or `revert` swaps back the same way.
 * A session lost with the shard's primary (a failover) in the copy or while
 * following is opened again on the new primary, and the migration goes on
 * (decision 0079): the copy from its last page recorded, the apply from the
 * positions the shard holds. During a cut-over or a revert, their own rollback.
 */
import type pg from 'pg';
import type { Tail } from '../common/eventlog.ts';
import { counter, gauge } from '../common/metrics.ts';
import { tableTopic } from '../schemas/cdc.ts';
import type { KeyRange, PartitionOffset, WorkflowRecord, WorkflowStatus } from '../schemas/index.ts';
import { forTable, mappedColumns, type ParsedAlter } from './alter.ts';
import { dropPositions, ensurePositionsTable, TableApplier } from './apply.ts';
import { copyTable, heldByStandby } from './copy.ts';
import { freshStatus, offsetsOf, type RunnerContext } from './movetables.ts';
import { lostSessions, reopenAfter, reopenLost, type Reconnecting } from './reconnect.ts';
import { FREEZE_TRIGGER, freezeWrites, thawWrites, type Frozen } from './switch.ts';
import { describeColumns, keyed, primaryVindex, quoteIdent, shardOfRow, splitName, WorkflowError, type MovedTable, type Vindex } from './tables.ts';

const rowsCopied = gauge('mg_materializer_rows_copied', 'Rows copied so far by the workflow', ['workflow']);
const lag = gauge('mg_materializer_lag_seconds', 'Age of the oldest change not applied yet (0 when caught up)', ['workflow']);
const applied = counter('mg_materializer_events_applied_total', 'Change events applied to target shards', ['workflow']);
const writeGap = gauge('mg_materializer_switch_write_gap_seconds', 'How long the last switch-traffic held the moved tables\' writes', ['workflow']);
const throttled = counter('mg_materializer_migration_throttled_seconds_total', 'Time a migration\'s copy waited for replicas to catch up', ['workflow']);

/** Where the shadow and the old table live: an internal schema, which CDC never streams. */
export const MIGRATION_SCHEMA = 'mg_materializer';
const PROGRESS_MS = 1_000;
const CATCH_UP_MS = 30_000;
/** The copy pauses while a replica of the shard replays more than this behind its primary. */
const MAX_REPLICA_LAG_S = 1;
const LOCK_TIMEOUT = '3s';
/** A cut-over that failed, or a cut-over or revert rolled back after a failover, is tried again after this time. */
const RETRY_MS = 10_000;
/** While a switch waits for the apply to reach the marker, its control sessions are probed this often (a failover ends them). */
const PROBE_MS = 1_000;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Where a shard's primary has the migration's tables (decision 0080): the shadow and the old table in MIGRATION_SCHEMA, the freeze's trigger on the table. */
interface SwapState { shadow: boolean; old: boolean; frozen: boolean }

/** How long each step of a cut-over took (logged: where the hold goes). */
function stepTimer(began: number) {
  let last = began;
  const ms: Record<string, number> = {};
  return { ms, mark: (step: string) => { const now = performance.now(); ms[step] = Math.round(now - last); last = now; } };
}

/** The shadow table's and the old table's names (in MIGRATION_SCHEMA) for a migration of `table`. */
export function migrationTables(table: string, workflow: string): { shadow: string; old: string } {
  const base = `_mg_${table.slice(0, 40)}_${workflow.replace(/^mig_/, '')}`;
  return { shadow: base, old: `${base}_old` };
}

/**
 * Creates the shadow table on a shard (in the caller's transaction): the table's
 * columns, defaults, constraints and indexes, then the ALTER; refuses what a
 * shadow cannot carry (foreign keys, user triggers, identity columns, a key
 * changed by the ALTER). Returns the columns and keys of both tables.
 */
export async function createShadow(client: pg.Client, alter: ParsedAlter, shadow: string) {
  const table = `${quoteIdent(alter.schema)}.${quoteIdent(alter.table)}`;
  const into = `${MIGRATION_SCHEMA}.${quoteIdent(shadow)}`;
  const old = keyed(await describeColumns(client, `${alter.schema}.${alter.table}`));
  const { rows: [info] } = await client.query<{ owner: string; fks: string; triggers: string; identity: string }>(`
    SELECT pg_get_userbyid(c.relowner) AS owner,
           (SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND (conrelid = c.oid OR confrelid = c.oid)) AS fks,
           (SELECT count(*) FROM pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal AND tgname <> 'mg_moved_writes') AS triggers,
           (SELECT count(*) FROM pg_attribute WHERE attrelid = c.oid AND attidentity <> '' AND NOT attisdropped) AS identity
      FROM pg_class c WHERE c.oid = $1::regclass`, [table]);
  const refused = [[info.fks, 'foreign keys'], [info.triggers, 'triggers'], [info.identity, 'identity columns']].filter(([n]) => n !== '0').map(([, what]) => what);
  if (refused.length) throw new WorkflowError(`table ${alter.schema}.${alter.table} has ${refused.join(', ')}: an online migration does not carry them to the new table yet`);
  await client.query(`CREATE SCHEMA IF NOT EXISTS ${MIGRATION_SCHEMA}`);
  await client.query(`CREATE TABLE ${into} (LIKE ${table} INCLUDING ALL)`);
  await client.query(forTable(alter, into));
  await client.query(`ALTER TABLE ${into} OWNER TO ${quoteIdent(info.owner)}`);
  const created = keyed(await describeColumns(client, `${MIGRATION_SCHEMA}.${shadow}`));
  if (created.key.join() !== old.key.join()) throw new WorkflowError(`the ALTER changes the primary key of ${alter.table} (${old.key.join(', ')}): not supported online`);
  return { old, shadow: created };
}

export class MigrationRunner {
  status: WorkflowStatus;
  private stopping = false;
  private switching = false;
  private tail: Tail | undefined;
  private applier: TableApplier | undefined;
  /** Per shard: the apply's session, and one for the freezes and swaps (whose transactions must not interleave with the apply's). */
  private clients = new Map<string, pg.Client>();
  private control = new Map<string, pg.Client>();
  private ranges: KeyRange[] = [];
  private sharded = false;
  private vindex!: Vindex;
  private topic = '';
  /** The table under its own name (what clients use), the shadow, and the old table after the cut-over. */
  private table!: MovedTable;
  private shadow!: MovedTable;
  private old!: MovedTable;
  private timer: NodeJS.Timeout | undefined;
  private lastCommitMs = new Map<number, number>();
  private behind = new Set<number>();
  /** A failed cut-over is tried again after this time. */
  private retryAt = 0;
  /** Set while the apply is down to open sessions lost with a primary again (decision 0079). */
  private recovering = false;
  /** When the apply stopped on a lost session: the changes waiting since count in the lag until it applies again. */
  private stalledSince: number | undefined;
  /** The apply's error when it stopped during a cut-over or a revert (handled by them, decision 0080). */
  private tailError: Error | undefined;
  /** A revert rolled back after a failover is tried again (as a cut-over is) while the command is still revert. */
  revertAgain = false;
  /** What the apply follows into (the shadow, or the old table after the cut-over) and from which offsets when the shard holds no positions. */
  private following: { into: MovedTable; offsets: PartitionOffset[] } | undefined;
  readonly done: Promise<void>;
  private finish!: () => void;

  constructor(private readonly rec: WorkflowRecord, private readonly alter: ParsedAlter, private readonly ctx: RunnerContext) {
    this.status = rec.status ?? freshStatus();
    this.done = new Promise((resolve) => (this.finish = resolve));
  }

  get name(): string {
    return this.rec.name;
  }

  /** Following the table's stream with nothing left to read, no switch under way, and no failed cut-over to wait out. */
  get caughtUp(): boolean {
    return this.tail !== undefined && !this.switching && !this.recovering && this.behind.size === 0 && Date.now() >= this.retryAt;
  }

  start(): void {
    this.run().catch((err) => this.fail(err as Error));
  }

  private get database(): string {
    return this.rec.definition.sourceDatabase;
  }

  private async run(): Promise<void> {
    const { schema, table } = splitName(this.rec.definition.tables[0]);
    const names = migrationTables(table, this.name);
    this.ranges = this.ctx.shards.ranges(this.database);
    this.sharded = this.ctx.shards.state.databases.get(this.database)?.sharded ?? false;
    for (const r of this.ranges) {
      this.clients.set(r.shard, await this.ctx.shards.connect(this.database, r.shard, `mg-migration-${this.name}`));
      this.control.set(r.shard, await this.ctx.shards.connect(this.database, r.shard, `mg-migration-switch-${this.name}`));
    }
    this.topic = tableTopic({ topicPrefix: this.ctx.cdcTopicPrefix(this.database), database: this.database }, schema, table);
    const first = this.clients.get(this.ranges[0].shard)!;
    const switched = this.status.phase === 'SWITCHED' || (this.status.phase === 'FAILED' && this.status.switchedAt !== null);
    if (!switched) {
      for (const client of this.clients.values()) {
        await ensurePositionsTable(client);
        const exists = (await client.query<{ t: string | null }>('SELECT to_regclass($1)::text AS t', [`${MIGRATION_SCHEMA}.${quoteIdent(names.shadow)}`])).rows[0].t;
        if (exists) continue;
        await client.query('BEGIN');
        await createShadow(client, this.alter, names.shadow).then(() => client.query('COMMIT'), async (err) => {
          await client.query('ROLLBACK');
          throw err;
        });
      }
    }
    const described = async (s: string, t: string) => {
      const { columns, key } = keyed(await describeColumns(first, `${s}.${t}`));
      this.vindex ??= this.vindexOf(key);
      return { schema: s, table: t, sql: `${quoteIdent(s)}.${quoteIdent(t)}`, columns, key, vindex: this.vindex };
    };
    this.table = await described(schema, table);
    if (switched) {
      // After the cut-over (a restart, or a retry of a failed reverse apply): the old table follows the new one.
      this.old = await described(MIGRATION_SCHEMA, names.old);
      this.old.columns = mappedColumns(this.table.columns, this.old.columns);
      if (this.status.phase !== 'SWITCHED') await this.publishStatus({ phase: 'SWITCHED', message: null });
      await this.follow(this.old, this.status.reverseOffsets);
      return;
    }
    this.shadow = await described(MIGRATION_SCHEMA, names.shadow);
    this.shadow.columns = mappedColumns(this.table.columns, this.shadow.columns);
    if (this.status.startOffsets.length === 0) {
      await this.waitForTopic();
      this.status.startOffsets = await this.endOffsets();
      this.status.tables = this.ranges.map((r) => ({ table: `${schema}.${table}`, rowsCopied: 0n, rowsEstimated: 0n, lastKey: null, done: false, shard: r.shard }));
      await this.publishStatus({ phase: 'COPYING', message: null });
    }
    if (this.ctx.routing(this.name) === undefined) await this.ctx.setRouting(this.name, 'SOURCE');
    await this.copy();
    if (this.stopping) return;
    await this.publishStatus({ phase: 'RUNNING', message: null, etaSeconds: null });
    await this.follow(this.shadow, this.status.startOffsets);
  }

  /** The vindex that places rows on the shards: a sharded database's, or on the one shard of an unsharded one, any column of the key. */
  private vindexOf(key: string[]): Vindex {
    if (!this.sharded) return { column: key[0], type: 'hash' };
    const table = splitName(this.rec.definition.tables[0]).table;
    const v = primaryVindex(this.ctx.shards.state.vschemas.get(this.database)?.vschema, table);
    if (!v) throw new WorkflowError(`table ${table} needs a primary vindex in the VSchema of ${this.database}: the migration applies each row on the shard it names`);
    return v;
  }

  private async waitForTopic(): Promise<void> {
    for (let i = 0; i < 120 && !this.stopping; i++) {
      if (await this.ctx.eventLog.topicExists(this.topic)) return;
      await sleep(500);
    }
    throw new WorkflowError(`the change topic ${this.topic} does not exist: an online migration follows the table's changes, enable CDC on ${this.database} (cdc.enabled in the spec, or the CDC_START agent command)`);
  }

  private async endOffsets(): Promise<PartitionOffset[]> {
    return [...await this.ctx.eventLog.endOffsets(this.topic)].map(([partition, offset]) => ({ topic: this.topic, partition, offset }));
  }

  /**
   * Every shard's rows into its shadow, each shard from its own snapshot, in pages; a page waits while the
   * shard's replicas lag. A copy that loses its sessions with the shard's primary (a failover, decision 0079)
   * goes on once they are open again on the new primary: after the last page recorded, from a new snapshot,
   * as MoveTables' copy does (decision 0073).
   */
  private async copy(): Promise<void> {
    const began = Date.now();
    let copiedNow = 0;
    const copyShard = async (entry: WorkflowStatus['tables'][number]) => {
      if (entry.done) return;
      const shard = entry.shard!;
      let published = Promise.resolve();
      const reader = await this.ctx.shards.connect(this.database, shard, `mg-migration-copy-${this.name}`);
      try {
        await reader.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
        await heldByStandby(reader); // takes the snapshot, and waits until a failover would keep all it sees (decision 0073)
        entry.rowsEstimated = BigInt((await reader.query<{ n: string }>(`SELECT count(*) AS n FROM ${this.table.sql}`)).rows[0].n);
        const keep = this.sharded ? (row: Record<string, string | null>) => shardOfRow(this.table, row, this.ranges) === shard : undefined;
        await copyTable(reader, this.clients, this.ranges, this.table, {
          lastKey: entry.lastKey ? JSON.parse(entry.lastKey) : null, rowsCopied: Number(entry.rowsCopied),
        }, this.ctx.pageRows, async (pos, rows) => {
          copiedNow += rows;
          entry.lastKey = JSON.stringify(pos.lastKey);
          entry.rowsCopied = BigInt(pos.rowsCopied);
          const rate = copiedNow / Math.max(0.001, (Date.now() - began) / 1000);
          const left = this.status.tables.reduce((n, e) => n + Math.max(0, Number(e.rowsEstimated - e.rowsCopied)), 0);
          published = published.then(() => this.publishStatus({ rowsCopied: this.status.rowsCopied + BigInt(rows), copyRowsPerSecond: rate, etaSeconds: rate > 0 ? left / rate : null }));
          await published;
          await this.throttle(shard);
          return !this.stopping;
        }, keep, { into: this.shadow });
        if (!this.stopping) entry.done = true;
      } finally {
        await reader.end().catch(() => {});
      }
    };
    while (!this.stopping) {
      // Every shard's copy settles before a failure is handled: none goes on writing behind it.
      const copies = await Promise.allSettled(this.status.tables.map(copyShard));
      const failed = copies.find((c): c is PromiseRejectedResult => c.status === 'rejected');
      if (!failed) break;
      if (!(await this.reopenAfter(failed.reason as Error))) throw failed.reason;
    }
    await this.publishStatus({});
  }

  /** Waits while a replica of the shard replays more than MAX_REPLICA_LAG_S behind (pg_stat_replication on its primary). */
  private async throttle(shard: string): Promise<void> {
    const client = this.clients.get(shard)!;
    for (;;) {
      const { rows: [{ s }] } = await client.query<{ s: string | null }>('SELECT max(extract(epoch FROM replay_lag))::text AS s FROM pg_stat_replication');
      if (s === null || Number(s) <= MAX_REPLICA_LAG_S || this.stopping) return;
      throttled.inc({ workflow: this.name }, 0.2);
      await sleep(200);
    }
  }

  /** Applies the table's changes from `offsets` (or the shards' positions) to `into`: the shadow before the cut-over, the old table after. */
  private async follow(into: MovedTable, offsets: PartitionOffset[]): Promise<void> {
    this.behind.clear();
    this.following = { into, offsets };
    this.applier = new TableApplier(this.name, into, this.topic, this.clients, this.ranges, this.ctx.decoder, this.sharded ? { ranges: this.ranges, vindex: this.vindex } : undefined);
    const start = await this.applier.load(offsetsOf(offsets, this.topic));
    const applier = this.applier;
    this.tail = await this.ctx.eventLog.tail(this.topic, start, async (messages, info) => {
      const r = await applier.applyBatch(info.partition, messages);
      if (r.lastCommitMs !== undefined) this.lastCommitMs.set(info.partition, r.lastCommitMs);
      if (BigInt(messages[messages.length - 1].offset) + 1n < info.highWatermark) this.behind.add(info.partition);
      else this.behind.delete(info.partition);
      this.status.eventsApplied += BigInt(r.applied);
      applied.inc({ workflow: this.name }, r.applied);
    });
    this.tailError = undefined;
    const tail = this.tail;
    void tail.ended.then((err) => {
      if (!err || this.stopping || this.tail !== tail) return;
      this.tailError = err;
      if (!this.switching) void this.recover(err); // during a switch the switch handles it
    });
    clearInterval(this.timer);
    this.timer = setInterval(() => void this.progress(), PROGRESS_MS);
  }

  private async progress(): Promise<void> {
    if (this.stopping || this.switching) return;
    let worst = this.stalledSince === undefined ? 0 : (Date.now() - this.stalledSince) / 1000;
    for (const p of this.behind) worst = Math.max(worst, (Date.now() - (this.lastCommitMs.get(p) ?? Date.now())) / 1000);
    await this.publishStatus({ lagSeconds: worst }).catch((err) => this.ctx.log.warn({ err, workflow: this.name }, 'progress event not published'));
  }

  /**
   * The apply failed. When a session was lost with the shard's primary (a failover or a restart of that
   * Postgres, decision 0079), the apply stops, the lost sessions (apply and control) are opened again on
   * the primary the topology names (waiting out the election, up to RECONNECT_MS), and the apply starts
   * again from the positions the shard holds, which went with their rows: no change is lost or applied
   * twice. Any other error fails the migration, as does a primary not back in time. During a cut-over or
   * a revert the switch handles it (afterLostSwitch, decision 0080).
   */
  private async recover(err: Error): Promise<void> {
    if (this.stopping || this.recovering || this.switching) return;
    this.recovering = true;
    try {
      const reopened = await this.reopenAfter(err, async () => {
        await this.halt();
        this.stalledSince = Date.now();
        this.timer = setInterval(() => void this.progress(), PROGRESS_MS); // the lag goes on growing in the status meanwhile
      });
      if (!reopened) return await this.fail(err);
      if (!this.stopping && this.following) await this.follow(this.following.into, this.following.offsets);
    } catch (e) {
      await this.fail(e as Error);
    } finally {
      this.recovering = false;
      this.stalledSince = undefined;
    }
  }

  /** Whether `err` came with sessions lost with the shard's primary; if so they are open again on the new one (reconnect.ts). */
  private async reopenAfter(err: Error, pause?: () => Promise<void>): Promise<boolean> {
    return reopenAfter(this.reconnecting(), err, pause);
  }

  private reconnecting(prefix = ''): Reconnecting {
    return {
      workflow: this.name, log: this.ctx.log, shards: this.ctx.shards,
      groups: () => [
        { database: this.database, clients: this.clients, application: `mg-migration-${this.name}` },
        { database: this.database, clients: this.control, application: `mg-migration-switch-${this.name}` },
      ],
      stopping: () => this.stopping,
      phase: () => this.status.phase,
      say: (message) => this.publishStatus({ message: `${prefix}${message}` }),
    };
  }

  private async halt(): Promise<void> {
    clearInterval(this.timer);
    const tail = this.tail;
    this.tail = undefined;
    await tail?.stop().catch(() => {});
  }

  /**
   * The cut-over: gateways hold the table's statements, every shard's table
   * refuses writes (after those in flight) and leaves a marker, the shadow
   * applies up to it, one transaction per shard swaps the names, and the
   * held statements go on against the new table. Before the swap a failure
   * rolls back (the table takes writes again; tried again later). A failover
   * of the shard's primary meanwhile (decision 0080): the sessions are opened
   * again and the new primary says whether the swap committed; the cut-over
   * then finishes, or it is rolled back there and tried again later.
   */
  async cutOver(): Promise<void> {
    this.switching = true;
    let began = performance.now();
    let held = false;
    let swapped = false;
    let reverseOffsets: PartitionOffset[] | undefined;
    const frozen = new Map<string, Frozen>();
    const source = this.table;
    const names = migrationTables(source.table, this.name);
    try {
      await reopenLost(this.reconnecting(), CATCH_UP_MS); // the control sessions, idle until now, may have gone with a failover
      began = performance.now();
      const steps = stepTimer(began);
      await this.holdAndDrain(frozen, steps, () => (held = true));
      // Nothing writes the table's topic now: every later change in it is the new table's.
      reverseOffsets = await this.endOffsets();
      swapped = true;
      await Promise.all([...this.control.values()].map((c) => this.swap(c, names.old, names.shadow)));
      steps.mark('swap');
      await this.cutOverEnds(source, reverseOffsets, began, 'cut over', steps.ms);
    } catch (err) {
      const handled = await this.afterLostSwitch('cut-over', err as Error, began, held, {
        // Before the swap the shadow is in MIGRATION_SCHEMA and no old table is; after it, the other way round.
        swapped: (s) => (s.old && !s.shadow ? true : s.shadow && !s.old ? false : undefined),
        finish: (how) => this.cutOverEnds(source, reverseOffsets, began, how),
        undo: (how) => this.rollBackLostSwitch(how, source, held, began, this.shadow, this.status.startOffsets),
      });
      if (handled) return;
      if (swapped) return this.fail(new WorkflowError(`cut-over failed after the swap began: ${(err as Error).message}`));
      this.ctx.log.error({ err, workflow: this.name }, 'cut-over failed; the table keeps its old schema');
      for (const [shard] of frozen) await thawWrites(this.control.get(shard)!, [this.table]).catch(() => {});
      if (held) await this.ctx.setRouting(this.name, 'SOURCE');
      if (!this.tail && !this.stopping) await this.follow(this.shadow, this.status.startOffsets);
      this.retryAt = Date.now() + RETRY_MS;
      await this.publishStatus({ message: `cut-over failed (tried again in ${RETRY_MS / 1000} s): ${(err as Error).message}` });
    } finally {
      this.afterSwitch();
    }
  }

  /**
   * The end of a cut-over once every shard swapped: the hold released, the table described with its new
   * schema, and the old table following the new one from the topic's end recorded before the swap. Also
   * what a cut-over interrupted by a failover does when the new primary holds the swap.
   */
  private async cutOverEnds(source: MovedTable, reverseOffsets: PartitionOffset[] | undefined, began: number, how: string, stepsMs?: Record<string, number>): Promise<void> {
    if (!reverseOffsets) throw new WorkflowError('the tables were swapped before the topic\'s end was recorded');
    const names = migrationTables(source.table, this.name);
    await this.ctx.setRouting(this.name, 'SOURCE');
    const gapMs = Math.round(performance.now() - began);
    writeGap.set({ workflow: this.name }, gapMs / 1000);
    this.ctx.log.info({ workflow: this.name, gapMs, stepsMs }, 'migration cut over');
    const columns = (await describeColumns(this.clients.values().next().value!, `${source.schema}.${source.table}`)).columns;
    this.table = { ...this.shadow, schema: source.schema, table: source.table, sql: source.sql, columns };
    this.old = { ...source, schema: MIGRATION_SCHEMA, table: names.old, sql: `${MIGRATION_SCHEMA}.${quoteIdent(names.old)}`, columns: mappedColumns(columns, source.columns) };
    await this.publishStatus({ phase: 'SWITCHED', message: `${how}; writes held ${gapMs} ms`, reverseOffsets, switchedAt: new Date(), eventsApplied: 0n, lagSeconds: 0 });
    await this.follow(this.old, reverseOffsets);
  }

  /**
   * Undoes a switch a failover interrupted before its swap committed: `frozen` thawed on the new primary,
   * the hold released, the apply following `into` again, the switch tried again later (a revert: `revert`).
   */
  private async rollBackLostSwitch(how: string, frozen: MovedTable, held: boolean, began: number, into: MovedTable, offsets: PartitionOffset[], revert = false): Promise<void> {
    for (const c of this.control.values()) await thawWrites(c, [frozen]);
    if (held) await this.ctx.setRouting(this.name, 'SOURCE');
    const gapMs = Math.round(performance.now() - began);
    await this.follow(into, offsets);
    this.retryAt = Date.now() + RETRY_MS;
    if (revert) this.revertAgain = true;
    await this.publishStatus({ message: `${how}; rolled back, writes held ${gapMs} ms: tried again in ${RETRY_MS / 1000} s` });
  }

  /** After a cut-over or a revert: an apply that stopped during it and was not followed again is handled as any lost apply. */
  private afterSwitch(): void {
    this.switching = false;
    const err = this.tailError;
    if (err && this.tail && !this.stopping) void this.recover(err);
  }

  /**
   * A cut-over or a revert that failed with sessions lost with the shard's primary (a failover, or a
   * restart of its Postgres; decision 0080). The apply stops, the lost sessions are opened again on the
   * primary the topology names (up to RECONNECT_MS, the status message saying what the migration waits
   * for), what is left of the migration's earlier sessions there is ended, and each shard's primary says
   * where the tables are: the swap committed (`finish`: the switch ends as it would have) or not (`undo`:
   * the freeze's trigger dropped, the hold released, the apply following again, the switch tried again
   * later). A session lost again meanwhile starts it over (three times at most). Whatever fails here, the
   * hold is released, and the migration is FAILED with the reason. False when no session was lost: the
   * error is the switch's own.
   */
  private async afterLostSwitch(kind: 'cut-over' | 'revert', err: Error, began: number, held: boolean, then: {
    swapped: (s: SwapState) => boolean | undefined; finish: (how: string) => Promise<void>; undo: (how: string) => Promise<void>;
  }): Promise<boolean> {
    if (this.stopping) return false;
    for (let attempt = 1; ; attempt++) {
      try {
        const reopened = await reopenAfter(this.reconnecting(`${kind} interrupted: `), err, () => this.halt());
        if (!reopened) {
          if (attempt === 1) return false;
          throw err;
        }
        if (this.stopping) return true;
        const states = await Promise.all([...this.control.keys()].map(async (shard) => ({ shard, ...await this.swapState(shard) })));
        const swapped = states.map((s) => then.swapped(s));
        const what = states.map((s) => `${this.database}/${s.shard}${s.frozen ? ' (the freeze\'s trigger on it)' : ''}`).join(', ');
        this.ctx.log.warn({ workflow: this.name, kind, states, ms: Math.round(performance.now() - began) }, `${kind} interrupted by lost sessions: the shards' primaries say where the tables are`);
        if (swapped.every((s) => s === true)) await then.finish(`${kind === 'cut-over' ? 'cut over' : 'reverted'} (interrupted by a failover of ${what}: the swap had committed)`);
        else if (swapped.every((s) => s === false)) await then.undo(`${kind} interrupted by a failover of ${what}: the swap had not committed`);
        else throw new WorkflowError(`the shards are in different states after the failover (${states.map((s) => `${s.shard}: ${JSON.stringify(s)}`).join('; ')}): not handled`);
        return true;
      } catch (e) {
        if (attempt < 3 && !this.stopping && !(e instanceof WorkflowError)) {
          err = e as Error;
          continue;
        }
        if (held) await this.ctx.setRouting(this.name, 'SOURCE').catch((x) => this.ctx.log.error({ err: x, workflow: this.name }, 'the hold was not released'));
        await this.fail(new WorkflowError(`${kind} interrupted by lost sessions and not recovered: ${(e as Error).message}`));
        return true;
      }
    }
  }

  /**
   * Where a shard's primary has the migration's tables (after a failover during a switch): the shadow and
   * the old table in MIGRATION_SCHEMA, and the freeze's trigger on the table under its name. What is left
   * of the migration's earlier sessions on the shard is ended first (one lost without a failover may still
   * have a backend in its transaction), so that the answer is final.
   */
  private async swapState(shard: string): Promise<SwapState> {
    const control = this.control.get(shard)!;
    const apply = this.clients.get(shard)!;
    const pid = async (c: pg.Client) => (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0].pid;
    const mine = [await pid(control), await pid(apply)];
    const apps = [`mg-migration-${this.name}`, `mg-migration-switch-${this.name}`];
    for (let i = 0; ; i++) {
      const { rows } = await control.query('SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ANY($1) AND NOT pid = ANY($2::int[])', [apps, mine]);
      if (rows.length === 0) break;
      if (i === 100) throw new WorkflowError(`sessions of the migration from before the failover are still on ${this.database}/${shard} after 10 s`);
      await sleep(100);
    }
    const names = migrationTables(this.table.table, this.name);
    const { rows: [s] } = await control.query<Record<keyof SwapState, string>>(`SELECT (to_regclass($1) IS NOT NULL)::text AS shadow, (to_regclass($2) IS NOT NULL)::text AS old,
        EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($3) AND tgname = $4)::text AS frozen`,
      [`${MIGRATION_SCHEMA}.${quoteIdent(names.shadow)}`, `${MIGRATION_SCHEMA}.${quoteIdent(names.old)}`, this.table.sql, FREEZE_TRIGGER]);
    return { shadow: s.shadow === 'true', old: s.old === 'true', frozen: s.frozen === 'true' };
  }

  /**
   * The start of a cut-over and of a revert: gateways hold the table's statements, every shard's
   * table refuses writes (after those in flight) and leaves a marker, and the table following it
   * applies up to the markers, then stops following.
   */
  private async holdAndDrain(frozen: Map<string, Frozen>, steps: ReturnType<typeof stepTimer>, onHeld: () => void): Promise<void> {
    await this.ctx.setRouting(this.name, 'WRITES_HELD');
    onHeld(); // from here a failure must release the hold
    steps.mark('hold');
    await this.freezeAll(this.table, frozen);
    steps.mark('freeze');
    await this.catchUpTo(frozen);
    await this.halt();
    steps.mark('catchUp');
  }

  /**
   * revert: the cut-over in reverse. The new table refuses writes and leaves
   * a marker, the old table applies up to it, one transaction per shard swaps
   * the names back and drops the new table; the migration is then REVERTED.
   * A failover meanwhile is handled as in the cut-over (decision 0080); a revert
   * rolled back there is tried again while the command is still revert.
   */
  async revert(): Promise<void> {
    if (this.status.phase !== 'SWITCHED' || !this.tail || this.switching) throw new WorkflowError(`revert needs the migration cut over with the old table following (it is ${this.status.phase})`);
    this.switching = true;
    this.revertAgain = false;
    let began = performance.now();
    let held = false;
    let swapped = false;
    const frozen = new Map<string, Frozen>();
    const serving = this.table;
    const names = migrationTables(serving.table, this.name);
    try {
      await reopenLost(this.reconnecting(), CATCH_UP_MS);
      began = performance.now();
      const steps = stepTimer(began);
      await this.holdAndDrain(frozen, steps, () => (held = true));
      swapped = true;
      await Promise.all([...this.control.values()].map((c) => this.swap(c, names.shadow, names.old, true)));
      steps.mark('swap');
      await this.revertEnds(began, 'reverted', steps.ms);
    } catch (err) {
      const handled = await this.afterLostSwitch('revert', err as Error, began, held, {
        // Before the swap back the old table is in MIGRATION_SCHEMA; after it, neither table is (the new one was dropped).
        swapped: (s) => (s.old ? false : !s.shadow ? true : undefined),
        finish: (how) => this.revertEnds(began, how),
        undo: (how) => this.rollBackLostSwitch(how, serving, held, began, this.old, this.status.reverseOffsets, true),
      });
      if (handled) return;
      if (swapped) return this.fail(new WorkflowError(`revert failed after the swap began: ${(err as Error).message}`));
      this.ctx.log.error({ err, workflow: this.name }, 'revert failed; the new table keeps serving');
      for (const [shard] of frozen) await thawWrites(this.control.get(shard)!, [this.table]).catch(() => {});
      if (held) await this.ctx.setRouting(this.name, 'SOURCE');
      if (!this.tail && !this.stopping) await this.follow(this.old, this.status.reverseOffsets);
      await this.publishStatus({ message: `revert failed (run it again): ${(err as Error).message}` });
    } finally {
      this.afterSwitch();
    }
  }

  /** The end of a revert once every shard swapped back: the rule emptied (the hold released), the migration REVERTED. */
  private async revertEnds(began: number, how: string, stepsMs?: Record<string, number>): Promise<void> {
    await this.ctx.setRouting(this.name, 'SOURCE', []);
    const gapMs = Math.round(performance.now() - began);
    writeGap.set({ workflow: this.name }, gapMs / 1000);
    this.ctx.log.info({ workflow: this.name, gapMs, stepsMs }, 'migration reverted');
    await this.end('REVERTED', `${how}: ${this.table.schema}.${this.table.table} has its old schema again; writes held ${gapMs} ms`);
  }

  /** complete (or the revert window's end): the old table is dropped; cancel (before the cut-over): the shadow is. */
  async dropAndEnd(phase: 'COMPLETED' | 'CANCELLED'): Promise<void> {
    this.stopping = true;
    await this.halt();
    const { table } = splitName(this.rec.definition.tables[0]);
    const names = migrationTables(table, this.name);
    const drop = phase === 'COMPLETED' ? names.old : names.shadow;
    if (this.clients.size === 0) {
      for (const r of this.ctx.shards.ranges(this.database)) this.clients.set(r.shard, await this.ctx.shards.connect(this.database, r.shard, `mg-migration-${this.name}`));
    }
    for (const client of this.clients.values()) {
      await client.query(`DROP TABLE IF EXISTS ${MIGRATION_SCHEMA}.${quoteIdent(drop)}`);
      await ensurePositionsTable(client);
      await dropPositions(client, this.name);
    }
    if (this.ctx.routing(this.name) !== undefined) await this.ctx.setRouting(this.name, 'SOURCE', []);
    await this.end(phase, phase === 'COMPLETED' ? `completed: the old table ${MIGRATION_SCHEMA}.${drop} was dropped` : `cancelled: the shadow table ${MIGRATION_SCHEMA}.${drop} was dropped`);
  }

  private async end(phase: WorkflowStatus['phase'], message: string): Promise<void> {
    this.stopping = true;
    await this.halt();
    await this.publishStatus({ phase, message, lagSeconds: null });
    await this.close();
    this.finish();
  }

  /**
   * One shard's swap, in one transaction: the table serving now goes to
   * MIGRATION_SCHEMA as `away`, `incoming` comes from there under the table's
   * name (into the publications that named the table), and the positions of
   * the direction that ends are removed. `back` (revert): the incoming old
   * table takes writes again and the new one is dropped.
   */
  private async swap(client: pg.Client, away: string, incoming: string, back = false): Promise<void> {
    const { schema, table, sql } = this.table;
    await client.query('BEGIN');
    try {
      await client.query(`SET LOCAL lock_timeout = '${LOCK_TIMEOUT}'`);
      const { rows: pubs } = await client.query<{ pubname: string }>(
        'SELECT p.pubname FROM pg_publication p JOIN pg_publication_rel r ON r.prpubid = p.oid WHERE r.prrelid = $1::regclass AND NOT p.puballtables', [sql]);
      await client.query(`ALTER TABLE ${sql} RENAME TO ${quoteIdent(away)}`);
      await client.query(`ALTER TABLE ${quoteIdent(schema)}.${quoteIdent(away)} SET SCHEMA ${MIGRATION_SCHEMA}`);
      await client.query(`ALTER TABLE ${MIGRATION_SCHEMA}.${quoteIdent(incoming)} SET SCHEMA ${quoteIdent(schema)}`);
      await client.query(`ALTER TABLE ${quoteIdent(schema)}.${quoteIdent(incoming)} RENAME TO ${quoteIdent(table)}`);
      for (const { pubname } of pubs) await client.query(`ALTER PUBLICATION ${quoteIdent(pubname)} ADD TABLE ${sql}`);
      await dropPositions(client, this.name);
      if (back) {
        await thawWrites(client, [this.table]);
        await client.query(`DROP TABLE ${MIGRATION_SCHEMA}.${quoteIdent(away)}`);
      }
      await client.query('COMMIT');
    } catch (err) {
      await client.query('ROLLBACK').catch(() => {});
      throw err;
    }
  }

  /** Freezes `t` on every shard in parallel; `frozen` gets each shard that froze (every freeze settles before a refusal is thrown). */
  private async freezeAll(t: MovedTable, frozen: Map<string, Frozen>): Promise<void> {
    const freezes = await Promise.allSettled([...this.control].map(async ([shard, client]) => frozen.set(shard, await freezeWrites(client, [t], this.database, this.name))));
    const refused = freezes.find((f) => f.status === 'rejected');
    if (refused) throw refused.reason;
  }

  /** Applies every change the shards committed before their freeze: each shard's marker, or (an empty table) its stream's confirmed position; then the topic to its end. */
  private async catchUpTo(frozen: Map<string, Frozen>): Promise<void> {
    const deadline = Date.now() + CATCH_UP_MS;
    const applier = this.applier!;
    let probeAt = Date.now() + PROBE_MS;
    const until = async (done: () => boolean) => {
      while (!done()) {
        if (this.tailError) throw this.tailError; // a lost session is handled by the switch (afterLostSwitch)
        if (Date.now() >= probeAt) {
          // The apply notices a lost session only once it has something to apply: the idle control sessions say it sooner.
          probeAt = Date.now() + PROBE_MS;
          const lost = await lostSessions([{ database: this.database, clients: this.control, application: `mg-migration-switch-${this.name}` }]);
          if (lost.length) throw new Error(`the control session on ${lost.join(', ')} is no longer on a primary`);
        }
        if (this.stopping || !this.tail) throw new WorkflowError('the change stream stopped being applied during the cut-over');
        if (Date.now() > deadline) throw new WorkflowError(`the changes of ${this.table.table} were not applied within ${CATCH_UP_MS / 1000} s`);
        await sleep(5);
      }
    };
    for (const [shard, f] of frozen) {
      if (f.marked[0]) await until(() => (applier.appliedLsn.get(shard) ?? 0n) >= f.lsn);
      else await until(() => (this.ctx.confirmedLsn(this.database, shard) ?? -1n) >= f.lsn);
    }
    const end = await this.ctx.eventLog.endOffsets(this.topic);
    await until(() => [...end].every(([partition, offset]) => applier.appliedOffset(partition) >= offset - 1n));
  }

  private async fail(err: Error): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    this.ctx.log.error({ err, workflow: this.name }, 'migration failed');
    await this.halt();
    await this.publishStatus({ phase: 'FAILED', message: err.message }).catch(() => {});
    await this.close();
    this.finish();
  }

  async close(): Promise<void> {
    this.stopping = true;
    await this.halt();
    await Promise.all([...this.clients.values(), ...this.control.values()].map((c) => c.end().catch(() => {})));
    this.clients.clear();
    this.control.clear();
  }

  async publishStatus(change: Partial<WorkflowStatus>): Promise<void> {
    this.status = { ...this.status, ...change };
    rowsCopied.set({ workflow: this.name }, Number(this.status.rowsCopied));
    lag.set({ workflow: this.name }, this.status.lagSeconds ?? 0);
    await this.ctx.publish(this.name, { 'io.multigres.workflow.WorkflowStatus': this.status } as never);
  }
}
