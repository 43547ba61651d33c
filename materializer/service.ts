/**
 * The materializer process's core: folds the workflows topic, and reconciles
 * what runs with what the operator asked (START / STOP / CANCEL, the traffic
 * switches, COMPLETE, VDiff requests). One materializer per cluster runs every
 * workflow (decision 0037).
 */
import { randomUUID } from 'node:crypto';
import type { EventLog, Subscription } from '../common/eventlog.ts';
import type { Logger } from '../common/log.ts';
import {
  applyTopologyEvent, applyWorkflowEvent, FUNCTIONAL_VINDEXES, INTERNAL_SCHEMAS, payload, shardsOf, topologyKey, WORKFLOW_NAME, workflowKey, workflowPayload,
  type CdcStreamState, type KeyRange, type RoutingState, type TopologyEvent, type WorkflowAction, type WorkflowEvent, type WorkflowRecord, type WorkflowState,
} from '../schemas/index.ts';
import { AlterError, loadParser, parseAlter } from './alter.ts';
import { dropPositions } from './apply.ts';
import { findLookup, runBackfill, type Backfill } from './backfill.ts';
import { ChangeDecoder } from './changes.ts';
import type { MaterializerConfig } from './config.ts';
import { createShadow, migrationTables, MigrationRunner } from './migration.ts';
import { freshStatus, MoveTablesRunner, type RunnerContext } from './movetables.ts';
import { ShardMap } from './shards.ts';
import { retireSource } from './switch.ts';
import { describeMaterialization, type Materialization } from './materialize.ts';
import { primaryVindex, quoteIdent, splitName, WorkflowError } from './tables.ts';

/** A request the API refuses: the HTTP status and why. */
export class RequestError extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

const RECONCILE_MS = 250;

export class Materializer {
  readonly workflows: WorkflowState = new Map();
  readonly shards: ShardMap;
  private runners = new Map<string, MoveTablesRunner>();
  private migrations = new Map<string, MigrationRunner>();
  private subs: Subscription[] = [];
  /** The latest confirmed LSN of each source stream (`<database>/<shard>`), from mg.cdc.status.v1. */
  private confirmed = new Map<string, bigint>();
  /** The latest state of each change stream (`<database>/<shard>`), from the same topic. */
  private streams = new Map<string, CdcStreamState>();
  private timer: NodeJS.Timeout | undefined;
  private busy = false;
  /** Events this process published and already folded: their echo from the topic is skipped, so it never rolls state back. */
  private ownEvents = new Set<string>();
  /** VDiff requests this process took on. */
  private vdiffsTaken = new Set<string>();
  /** Per workflow: the command (by its time) whose switch or completion was tried, so a failed one is not retried until asked again. */
  private readonly tried = new Map<string, number>();
  private readonly publishEvents: (events: Array<{ key: string; value: WorkflowEvent }>) => Promise<void>;
  private readonly publishTopology: (events: Array<{ key: string; value: TopologyEvent }>) => Promise<void>;
  private readonly decoder: ChangeDecoder;
  /** Lookup backfills by `<database>/<vindex>`, the latest run of each (decision 0059). */
  private readonly backfills = new Map<string, Backfill>();

  constructor(private readonly cfg: MaterializerConfig, private readonly eventLog: EventLog, private readonly log: Logger) {
    this.shards = new ShardMap(eventLog);
    this.publishEvents = eventLog.publisher('workflows');
    this.publishTopology = eventLog.publisher('topology');
    this.decoder = new ChangeDecoder(eventLog.registry);
  }

  async start(): Promise<void> {
    const topology = this.shards.start();
    const workflows = await this.eventLog.subscribe('workflows', (e) => {
      if (!this.ownEvents.delete(e.eventId)) applyWorkflowEvent(this.workflows, e);
    });
    // Streams publish their status every second: the last minute holds the latest of each live one.
    const cdc = await this.eventLog.subscribe('cdcStatus', (s) => {
      if (s.confirmedLsn !== null) this.confirmed.set(`${s.database}/${s.shard}`, s.confirmedLsn);
      this.streams.set(`${s.database}/${s.shard}`, s.state);
    }, { since: new Date(Date.now() - 60_000) });
    this.subs = [workflows, cdc];
    await Promise.all([topology, ...this.subs.map((s) => s.caughtUp)]);
    this.timer = setInterval(() => void this.reconcile(), RECONCILE_MS);
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    await Promise.all([...this.runners.values(), ...this.migrations.values()].map((r) => r.close()));
    await Promise.all(this.subs.map((s) => s.stop()));
    await this.shards.stop();
  }

  async publish(workflow: string, payload: WorkflowEvent['payload']): Promise<void> {
    const event: WorkflowEvent = { eventId: randomUUID(), ts: new Date(), source: `materializer/${this.cfg.id}`, workflow, payload };
    this.ownEvents.add(event.eventId);
    try {
      await this.publishEvents([{ key: workflowKey(event), value: event }]);
    } catch (err) {
      this.ownEvents.delete(event.eventId);
      throw err;
    }
    applyWorkflowEvent(this.workflows, event); // our own view does not wait for the round trip
  }

  /** Validates and publishes a new MoveTables workflow (from an unsharded or a sharded source). */
  async create(req: { name: string; sourceDatabase: string; targetDatabase: string; tables: string[] }): Promise<WorkflowRecord> {
    this.checkNewName(req.name);
    const state = this.shards.state;
    for (const db of [req.sourceDatabase, req.targetDatabase]) {
      const rec = state.databases.get(db);
      if (!rec || rec.dropped) throw new RequestError(404, `database ${db} does not exist`);
    }
    if (req.sourceDatabase === req.targetDatabase) throw new RequestError(400, 'source and target must be different databases');
    if (req.tables.length === 0) throw new RequestError(400, 'name at least one table');
    // A sharded source's shards are read one by one, each filtered by its key range: its VSchema must place every moved row.
    const placing = state.databases.get(req.sourceDatabase)!.sharded ? [req.targetDatabase, req.sourceDatabase] : [req.targetDatabase];
    for (const name of req.tables) {
      const { schema, table } = splitName(name);
      if (INTERNAL_SCHEMAS.has(schema)) throw new RequestError(400, `table ${name}: schema ${schema} is internal to the project and never moved`);
      for (const db of placing) {
        if (!primaryVindex(state.vschemas.get(db)?.vschema, table)) {
          throw new RequestError(400, `the VSchema of ${db} must name table ${table} with a primary vindex (${FUNCTIONAL_VINDEXES.join(', ')}); see mg vschema apply`);
        }
      }
    }
    const tables = req.tables.map((n) => { const s = splitName(n); return `${s.schema}.${s.table}`; });
    await this.publish(req.name, workflowPayload('WorkflowCreated', {
      type: 'MOVE_TABLES', sourceDatabase: req.sourceDatabase, targetDatabase: req.targetDatabase, tables, sourceShards: null, targetShards: null, ddl: null, revertSeconds: null, postponeCutOver: false, query: null,
    }));
    return this.workflows.get(req.name)!;
  }

  /**
   * Validates and publishes a Materialize (decision 0058): the query is parsed and checked against the source's
   * first shard (its columns, key, functions, replica identity), and the target table against the target's VSchema.
   */
  async createMaterialize(req: { name: string; sourceDatabase: string; targetDatabase: string; table: string; query: string }): Promise<WorkflowRecord> {
    this.checkNewName(req.name);
    const state = this.shards.state;
    for (const db of [req.sourceDatabase, req.targetDatabase]) {
      const rec = state.databases.get(db);
      if (!rec || rec.dropped) throw new RequestError(404, `database ${db} does not exist`);
    }
    const { schema, table } = splitName(req.table);
    if (INTERNAL_SCHEMAS.has(schema)) throw new RequestError(400, `table ${req.table}: schema ${schema} is internal to the project`);
    const side = (database: string) => ({ database, vschema: state.vschemas.get(database)?.vschema });
    const [first] = this.shards.ranges(req.sourceDatabase);
    const source = await this.shards.connect(req.sourceDatabase, first.shard, `mg-materializer-${req.name}`);
    let m: Materialization;
    try {
      m = await describeMaterialization(source, req.query, req.table, side(req.targetDatabase), state.databases.get(req.sourceDatabase)!.sharded ? side(req.sourceDatabase) : undefined);
    } catch (err) {
      if (err instanceof WorkflowError) throw new RequestError(400, err.message);
      throw err;
    } finally {
      await source.end().catch(() => {});
    }
    if (req.sourceDatabase === req.targetDatabase && `${m.source.schema}.${m.source.table}` === `${schema}.${table}`) {
      throw new RequestError(400, 'the target table is the source table: name another table (--table)');
    }
    await this.publish(req.name, workflowPayload('WorkflowCreated', {
      type: 'MATERIALIZE', sourceDatabase: req.sourceDatabase, targetDatabase: req.targetDatabase, tables: [`${schema}.${table}`],
      sourceShards: null, targetShards: null, ddl: null, revertSeconds: null, postponeCutOver: false, query: req.query,
    }));
    return this.workflows.get(req.name)!;
  }

  /**
   * Validates and publishes a Reshard (decision 0056): every table of the database's VSchema moves from its
   * serving shards to the set of `toShards` shards brought up beside them (mg database add-shard-set); the
   * MoveTables machinery runs with the two sets as source and target, and the switches flip the serving set.
   */
  async createReshard(req: { name: string; database: string; toShards: number }): Promise<WorkflowRecord> {
    this.checkNewName(req.name);
    const state = this.shards.state;
    const db = state.databases.get(req.database);
    if (!db || db.dropped || db.hostedOn !== null) throw new RequestError(404, `database ${req.database} does not exist (or has no shards of its own)`);
    if (!db.sharded) throw new RequestError(400, `database ${req.database} is not sharded: Reshard splits and merges a sharded database's shards`);
    const vschema = state.vschemas.get(req.database)?.vschema;
    const tables = Object.keys(vschema?.tables ?? {}).sort();
    if (tables.length === 0) throw new RequestError(400, `the VSchema of ${req.database} names no table: Reshard moves the tables it names (mg vschema apply)`);
    const unplaced = tables.filter((t) => !primaryVindex(vschema, t));
    if (unplaced.length) {
      throw new RequestError(400, `Reshard moves tables sharded by a primary vindex (${FUNCTIONAL_VINDEXES.join(', ')}) only: ${unplaced.join(', ')} of ${req.database} are not (reference tables and other vindexes are not supported yet)`);
    }
    if (Object.keys(vschema!.sequences).length) throw new RequestError(400, `Reshard does not move sequences yet: the VSchema of ${req.database} has ${Object.keys(vschema!.sequences).join(', ')}`);
    // One serving set at a time: a second reshard of the database waits for the first to end.
    const running = [...this.workflows.values()].find((w) => w.definition.type === 'RESHARD' && w.definition.sourceDatabase === req.database
      && w.status?.phase !== 'CANCELLED' && w.status?.phase !== 'COMPLETED');
    if (running) throw new RequestError(409, `workflow ${running.name} reshards ${req.database} already (complete or cancel it first)`);
    const serving = this.shards.ranges(req.database);
    const servingNames = new Set(serving.map((r) => r.shard));
    // The set beside the serving one (an earlier reshard's old set may be there too, serving nothing).
    const others = shardsOf(state, req.database).filter((s) => !servingNames.has(s.shard)).map((s) => ({ shard: s.shard, start: s.keyRangeStart, end: s.keyRangeEnd }));
    const target = tiling(others, req.toShards);
    if (!target) {
      throw new RequestError(409, `database ${req.database} has no set of ${req.toShards} shards beside its serving ones (${serving.map((r) => r.shard).join(', ')}): bring it up first with mg database add-shard-set ${req.database} --shards ${req.toShards}`);
    }
    await this.publish(req.name, workflowPayload('WorkflowCreated', {
      type: 'RESHARD', sourceDatabase: req.database, targetDatabase: req.database, tables: tables.map((t) => `public.${t}`),
      sourceShards: serving.map((r) => r.shard), targetShards: target.map((r) => r.shard), ddl: null, revertSeconds: null, postponeCutOver: false, query: null,
    }));
    return this.workflows.get(req.name)!;
  }

  /**
   * Starts backfilling a lookup vindex's table for the owner rows that existed before it (decision 0059);
   * it runs in the background, and `backfill()` shows how far it is. One run per vindex at a time.
   */
  startBackfill(database: string, vindex: string): Backfill {
    const db = this.shards.state.databases.get(database);
    if (!db || db.dropped) throw new RequestError(404, `database ${database} does not exist`);
    const record = this.shards.state.vschemas.get(database);
    if (!db.sharded || !record) throw new RequestError(404, `database ${database} has no VSchema (mg vschema apply)`);
    if (!findLookup(record.vschema, vindex)) throw new RequestError(404, `the VSchema of ${database} (version ${record.version}) has no lookup vindex ${vindex} with an owner table`);
    const target = `${database}/${vindex}`;
    if (this.backfills.get(target)?.state === 'running') throw new RequestError(409, `a backfill of ${vindex} in ${database} is running already`);
    const job: Backfill = {
      kind: 'backfill', target, database, vindex, version: String(record.version), state: 'running', startedAt: new Date().toISOString(), finishedAt: null,
      rowsScanned: 0, rowsInserted: 0, lockRetries: 0, shards: [], steps: [], error: null, code: null,
    };
    this.backfills.set(target, job);
    const finish = (err?: Error & { code?: string }) => {
      Object.assign(job, { state: err ? 'failed' : 'succeeded', finishedAt: new Date().toISOString(), error: err?.message ?? null, code: err?.code ?? null });
      this.log[err ? 'warn' : 'info']({ database, vindex, rowsScanned: job.rowsScanned, rowsInserted: job.rowsInserted, err }, `lookup backfill ${job.state}`);
    };
    runBackfill(this.shards, job, record.appliedAt, this.cfg.pageRows).then(() => finish(), finish);
    return job;
  }

  /** The latest backfill of a lookup vindex. */
  backfill(database: string, vindex: string): Backfill {
    const job = this.backfills.get(`${database}/${vindex}`);
    if (!job) throw new RequestError(404, `no backfill of ${vindex} in ${database} since the materializer started`);
    return job;
  }

  /**
   * Validates and publishes an online migration (decision 0060): the ALTER TABLE is parsed, and tried on a
   * shadow table of the database's first shard in a transaction that is rolled back, so whatever Postgres
   * or the migration refuses is answered now (400). Named mig_<id>; the runner then applies it on every shard.
   */
  async createMigration(req: { database: string; ddl: string; revertSeconds: number; postponeCutOver: boolean }): Promise<WorkflowRecord> {
    const db = this.shards.state.databases.get(req.database);
    if (!db || db.dropped) throw new RequestError(404, `database ${req.database} does not exist`);
    await loadParser();
    let alter;
    try {
      alter = parseAlter(req.ddl);
    } catch (err) {
      if (err instanceof AlterError) throw new RequestError(400, err.message);
      throw err;
    }
    const table = `${alter.schema}.${alter.table}`;
    const busy = [...this.workflows.values()].find((w) => w.definition.type === 'MIGRATION' && w.definition.sourceDatabase === req.database
      && w.definition.tables[0] === table && !['CANCELLED', 'COMPLETED', 'REVERTED'].includes(w.status?.phase ?? ''));
    if (busy) throw new RequestError(409, `migration ${busy.name} of ${table} has not ended (complete, revert or cancel it first)`);
    const name = `mig_${randomUUID().replace(/-/g, '').slice(0, 12)}`;
    const [first] = this.shards.ranges(req.database);
    const client = await this.shards.connect(req.database, first.shard, 'mg-migration-check');
    try {
      await client.query('BEGIN');
      await createShadow(client, alter, migrationTables(alter.table, name).shadow);
    } catch (err) {
      const e = err as Error & { code?: string };
      if (err instanceof WorkflowError || e.code !== undefined) throw new RequestError(400, `${table}: ${e.message}`);
      throw err;
    } finally {
      await client.query('ROLLBACK').catch(() => {});
      await client.end().catch(() => {});
    }
    await this.publish(name, workflowPayload('WorkflowCreated', {
      type: 'MIGRATION', sourceDatabase: req.database, targetDatabase: req.database, tables: [table], sourceShards: null, targetShards: null,
      ddl: req.ddl, revertSeconds: BigInt(req.revertSeconds), postponeCutOver: req.postponeCutOver, query: null,
    }));
    // The rule exists from the submit on: sessions opened from now on are planned, so the cut-over can hold their statements.
    await this.setRouting(this.workflows.get(name)!, 'SOURCE');
    return this.workflows.get(name)!;
  }

  private checkNewName(name: string): void {
    if (!WORKFLOW_NAME.test(name)) throw new RequestError(400, `workflow name ${JSON.stringify(name)}: must be lower-case letters, digits or _, starting with a letter`);
    const held = this.workflows.get(name);
    if (held && held.status?.phase !== 'CANCELLED') throw new RequestError(409, `workflow ${name} exists (cancel it first)`);
  }

  /** An online migration's revert window when its submit names none (seconds). */
  get migrationRevertSeconds(): number {
    return this.cfg.migrationRevertSeconds;
  }

  /** The state of the workflow's routing rule (undefined before it runs). */
  routing(name: string): RoutingState | undefined {
    return this.shards.state.routingRules.get(name)?.state;
  }

  /**
   * Publishes the workflow's routing rule in `state` (a new version) on the topology log, folded here at once.
   * A Reshard's rule only holds statements during a switch (its source and target are one database): what
   * routes is the database's serving shard set, published just before the rule in the same batch, so a
   * gateway releasing held statements already routes them by the new set (decision 0056).
   */
  async setRouting(rec: WorkflowRecord, state: RoutingState, tables = rec.definition.tables): Promise<void> {
    const def = rec.definition;
    const held = this.shards.state.routingRules.get(rec.name);
    const events: TopologyEvent[] = [];
    const event = (p: TopologyEvent['payload']) => events.push({ eventId: randomUUID(), ts: new Date(), source: `materializer/${this.cfg.id}`, payload: p });
    const serving = def.type === 'RESHARD' && (state === 'TARGET' ? def.targetShards : state === 'SOURCE' ? def.sourceShards : null);
    if (serving) {
      const version = (this.shards.state.servingShards.get(def.sourceDatabase)?.version ?? 0n) + 1n;
      event(payload('ServingShardsChanged', { database: def.sourceDatabase, version, shards: serving }));
    }
    event(payload('RoutingRuleChanged', {
      workflow: rec.name, version: (held?.version ?? 0n) + 1n, sourceDatabase: def.sourceDatabase, targetDatabase: def.targetDatabase, tables, state,
    }));
    await this.publishTopology(events.map((e) => ({ key: topologyKey(e), value: e })));
    for (const e of events) applyTopologyEvent(this.shards.state, e); // their echoes are older-or-equal versions then, and ignored
    this.log.info({ workflow: rec.name, state, version: String((held?.version ?? 0n) + 1n), ...(serving ? { serving } : {}) }, 'routing rule changed');
  }

  async command(name: string, action: WorkflowAction): Promise<WorkflowRecord> {
    const rec = this.get(name);
    const phase = rec.status?.phase;
    if (rec.definition.type === 'MIGRATION') return this.commandMigration(rec, action);
    const routing = this.routing(name);
    if (phase === 'CANCELLED') throw new RequestError(409, `workflow ${name} was cancelled`);
    if (phase === 'COMPLETED') throw new RequestError(409, `workflow ${name} is completed`);
    const switched = phase === 'SWITCHED' || routing === 'TARGET' || routing === 'WRITES_HELD';
    if (rec.definition.type === 'MATERIALIZE') {
      // The source stays authoritative: nothing to switch; complete stops following and leaves the target table.
      if (action === 'SWITCH_READS' || action === 'SWITCH_TRAFFIC' || action === 'REVERSE_TRAFFIC') {
        throw new RequestError(409, `workflow ${name} is a Materialize: it has no traffic to switch (the source stays authoritative; complete stops following it)`);
      }
      if (action === 'COMPLETE' && phase !== 'RUNNING' && phase !== 'STOPPED') throw new RequestError(409, `workflow ${name} is ${phase ?? 'not started'}: complete needs its copy done (RUNNING or STOPPED)`);
    } else switch (action) {
      case 'SWITCH_READS': case 'SWITCH_TRAFFIC':
        if (switched) throw new RequestError(409, `workflow ${name} has switched its writes already`);
        if (phase !== 'RUNNING') throw new RequestError(409, `workflow ${name} is ${phase ?? 'not started'}: traffic switches during catch-up (RUNNING)`);
        // One serving set at a time: a Reshard switches reads and writes together.
        if (action === 'SWITCH_READS' && rec.definition.type === 'RESHARD') throw new RequestError(409, `workflow ${name} is a Reshard: it switches reads and writes together (switch-traffic without --reads-only)`);
        if (action === 'SWITCH_TRAFFIC') this.requireStreams(rec.definition.targetDatabase, rec.definition.targetShards);
        break;
      case 'REVERSE_TRAFFIC':
        if (routing === 'WRITES_HELD') throw new RequestError(409, `workflow ${name} is switching its writes: wait until the switch is done`);
        if (switched) {
          if (phase !== 'SWITCHED') throw new RequestError(409, `workflow ${name} is ${phase}: reverse-traffic needs its reverse replication running (mg workflow start resumes it)`);
          break;
        }
        if (routing !== 'READS_TARGET') throw new RequestError(409, `workflow ${name} serves everything from the source already`);
        break;
      case 'COMPLETE':
        if (phase !== 'SWITCHED') throw new RequestError(409, `workflow ${name} is ${phase ?? 'not started'}: complete needs its writes switched (mg workflow switch-traffic)`);
        break;
      case 'START':
        // After the switch, START resumes a reverse replication that failed.
        if (switched && phase !== 'FAILED') throw new RequestError(409, `workflow ${name} has switched its writes: reverse-traffic or complete are left`);
        break;
      default:
        if (switched) throw new RequestError(409, `workflow ${name} has switched its writes: reverse-traffic or complete are left`);
    }
    await this.publish(name, workflowPayload('WorkflowCommanded', { action }));
    return rec;
  }

  /** A migration's commands: cancel before the cut-over, revert or complete after it, start after a failure. */
  private async commandMigration(rec: WorkflowRecord, action: WorkflowAction): Promise<WorkflowRecord> {
    const phase = rec.status?.phase ?? 'PENDING';
    const cutOver = rec.status?.switchedAt != null;
    if (phase === 'CANCELLED' || phase === 'COMPLETED' || phase === 'REVERTED') throw new RequestError(409, `migration ${rec.name} is ${phase} already`);
    const allowed: Partial<Record<WorkflowAction, boolean>> = {
      CANCEL: !cutOver, SWITCH_TRAFFIC: !cutOver && phase !== 'FAILED', REVERSE_TRAFFIC: phase === 'SWITCHED', COMPLETE: phase === 'SWITCHED', START: phase === 'FAILED',
    };
    if (!allowed[action]) {
      const why: Partial<Record<WorkflowAction, string>> = {
        CANCEL: 'it has cut over (revert it instead)', SWITCH_TRAFFIC: 'it has cut over already, or failed (mg migration start)',
        REVERSE_TRAFFIC: 'revert needs it cut over (SWITCHED)', COMPLETE: 'complete needs it cut over (SWITCHED)', START: 'only a FAILED migration is started again',
      };
      throw new RequestError(409, `migration ${rec.name} is ${phase}: ${why[action] ?? 'not a migration command'}`);
    }
    await this.publish(rec.name, workflowPayload('WorkflowCommanded', { action }));
    return rec;
  }

  /**
   * A write switch needs the target's change stream on every shard: reverse
   * replication reads it to keep the source in step (decision 0046).
   */
  private requireStreams(database: string, shards: string[] | null): void {
    for (const { shard } of this.shards.rangesOf(database, shards)) {
      const state = this.streams.get(`${database}/${shard}`);
      if (state === undefined || state === 'STOPPED') {
        throw new RequestError(409, `switch-traffic needs the change stream (CDC) of ${database} on every shard, for the reverse replication that keeps the source in step: ${database}/${shard} has ${state === undefined ? 'none' : 'a stopped one'} (set databases[].cdc.enabled for ${database} in the spec, or send CDC_START to its primaries)`);
      }
    }
  }

  async requestVDiff(name: string): Promise<string> {
    const rec = this.get(name);
    if (rec.status?.phase !== 'RUNNING') throw new RequestError(409, `workflow ${name} is ${rec.status?.phase ?? 'not started'}: VDiff runs during catch-up`);
    const id = randomUUID();
    await this.publish(name, workflowPayload('VDiffRequested', { id }));
    return id;
  }

  get(name: string): WorkflowRecord {
    const rec = this.workflows.get(name);
    if (!rec) throw new RequestError(404, `workflow ${name} does not exist`);
    return rec;
  }

  private async reconcile(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      for (const rec of this.workflows.values()) await this.reconcileOne(rec);
    } catch (err) {
      this.log.error({ err }, 'reconcile failed');
    } finally {
      this.busy = false;
    }
  }

  private async reconcileOne(rec: WorkflowRecord): Promise<void> {
    if (rec.definition.type === 'MIGRATION') return this.reconcileMigration(rec);
    const phase = rec.status?.phase;
    const runner = this.runners.get(rec.name);
    if (phase === 'CANCELLED' || phase === 'COMPLETED') return;
    if (rec.action === 'CANCEL') return this.cancel(rec, runner);
    if (rec.definition.type === 'MATERIALIZE' && rec.action === 'COMPLETE') {
      if (!this.tryOnce(rec)) return;
      this.runners.delete(rec.name);
      await runner?.close();
      return this.completeMaterialize(rec);
    }
    if (phase === 'SWITCHED' && rec.action === 'COMPLETE') {
      if (!this.tryOnce(rec)) return;
      this.runners.delete(rec.name);
      await runner?.close(); // ends reverse replication
      return this.complete(rec);
    }
    if (rec.action === 'STOP') {
      if (runner) {
        this.runners.delete(rec.name);
        await runner.stop('STOPPED');
        await runner.close();
      } else if (phase !== 'STOPPED' && phase !== 'FAILED') {
        await this.publish(rec.name, workflowPayload('WorkflowStatus', { ...(rec.status ?? freshStatus()), phase: 'STOPPED' }));
      }
      return;
    }
    // START and the traffic commands: run it, unless it failed after the last command (a new START retries).
    const routing = this.routing(rec.name);
    if (rec.action === 'SWITCH_READS' && routing === 'SOURCE') await this.setRouting(rec, 'READS_TARGET');
    if (rec.action === 'REVERSE_TRAFFIC' && routing === 'READS_TARGET') await this.setRouting(rec, 'SOURCE');
    if (runner) {
      if (runner.status.phase === 'FAILED') this.runners.delete(rec.name);
      else if (rec.action === 'SWITCH_TRAFFIC' && runner.status.phase === 'RUNNING' && runner.ready && this.tryOnce(rec)) {
        await runner.switchWrites().catch((err) => runner.publishStatus({ message: `switch-traffic failed: ${(err as Error).message}` }));
      } else if (rec.action === 'REVERSE_TRAFFIC' && runner.status.phase === 'SWITCHED' && runner.ready && this.tryOnce(rec)) {
        await runner.reverseWrites().catch((err) => runner.publishStatus({ message: `reverse-traffic failed: ${(err as Error).message}` }));
      } else this.maybeVDiff(rec, runner);
      return;
    }
    if (phase === 'FAILED' && rec.statusAt && rec.statusAt >= rec.commandAt) return;
    const started = this.runner(rec);
    this.runners.set(rec.name, started);
    this.log.info({ workflow: rec.name, phase: phase ?? 'new' }, 'running workflow');
    started.start();
  }

  /**
   * A migration runs until caught up, then cuts over by itself; after the cut-over it ends with revert,
   * complete, or the revert window's end (complete). Cancel drops the shadow.
   */
  private async reconcileMigration(rec: WorkflowRecord): Promise<void> {
    const phase = rec.status?.phase;
    if (phase === 'CANCELLED' || phase === 'COMPLETED' || phase === 'REVERTED') {
      this.migrations.delete(rec.name); // a revert ends its runner itself
      return;
    }
    let runner = this.migrations.get(rec.name);
    const ending = rec.action === 'CANCEL' ? 'CANCELLED' : rec.action === 'COMPLETE' || this.revertWindowOver(rec) ? 'COMPLETED' : undefined;
    // The window's end completes it whatever the last command was; a command is tried once.
    if (ending && (this.revertWindowOver(rec) || this.tryOnce(rec))) {
      this.migrations.delete(rec.name);
      const r = runner ?? this.migrationRunner(rec);
      await r.dropAndEnd(ending).catch((err) => r.publishStatus({ message: `${ending === 'CANCELLED' ? 'cancel' : 'complete'} failed (run it again): ${(err as Error).message}` }));
      return;
    }
    if (runner?.status.phase === 'FAILED') {
      this.migrations.delete(rec.name);
      runner = undefined;
    }
    if (!runner) {
      if (phase === 'FAILED' && rec.statusAt && rec.statusAt >= rec.commandAt) return;
      runner = this.migrationRunner(rec);
      this.migrations.set(rec.name, runner);
      this.log.info({ workflow: rec.name, phase: phase ?? 'new' }, 'running migration');
      runner.start();
      return;
    }
    if (runner.status.phase === 'RUNNING' && runner.caughtUp && (!rec.definition.postponeCutOver || rec.action === 'SWITCH_TRAFFIC')) await runner.cutOver();
    else if (rec.action === 'REVERSE_TRAFFIC' && runner.status.phase === 'SWITCHED' && runner.caughtUp && (runner.revertAgain || this.tryOnce(rec))) {
      await runner.revert().catch((err) => runner.publishStatus({ message: `revert failed: ${(err as Error).message}` }));
    }
  }

  private revertWindowOver(rec: WorkflowRecord): boolean {
    const at = rec.status?.switchedAt;
    return rec.status?.phase === 'SWITCHED' && at != null && Date.now() > at.getTime() + Number(rec.definition.revertSeconds ?? 0n) * 1000;
  }

  private migrationRunner(rec: WorkflowRecord): MigrationRunner {
    return new MigrationRunner(rec, parseAlter(rec.definition.ddl!), this.runnerContext());
  }

  private maybeVDiff(rec: WorkflowRecord, runner: MoveTablesRunner): void {
    const req = rec.vdiffRequest;
    if (!req || rec.vdiff?.id === req.id || this.vdiffsTaken.has(req.id) || runner.status.phase !== 'RUNNING') return;
    this.vdiffsTaken.add(req.id);
    const began = Date.now();
    void (async () => {
      await this.publish(rec.name, workflowPayload('VDiffReported', { id: req.id, state: 'RUNNING', sourceLsn: null, tables: [], durationMs: 0n, error: null }));
      try {
        const tables = await runner.vdiff(req.id);
        await this.publish(rec.name, workflowPayload('VDiffReported', { id: req.id, state: 'COMPLETED', sourceLsn: null, tables, durationMs: BigInt(Date.now() - began), error: null }));
      } catch (err) {
        this.log.error({ err, workflow: rec.name }, 'VDiff failed');
        await this.publish(rec.name, workflowPayload('VDiffReported', { id: req.id, state: 'FAILED', sourceLsn: null, tables: [], durationMs: BigInt(Date.now() - began), error: (err as Error).message }));
      }
    })();
  }

  private runner(rec: WorkflowRecord): MoveTablesRunner {
    return new MoveTablesRunner(rec, this.runnerContext());
  }

  private runnerContext(): RunnerContext {
    return {
      eventLog: this.eventLog, shards: this.shards, decoder: this.decoder, log: this.log, pageRows: this.cfg.pageRows, vdiffRows: this.cfg.vdiffRows,
      cdcTopicPrefix: (db) => `${this.cfg.topicPrefix}${this.cfg.cdcTopicPrefixes[db] ?? 'mg'}`,
      publish: (w, p) => this.publish(w, p),
      confirmedLsn: (db, shard) => this.confirmed.get(`${db}/${shard}`),
      routing: (w) => this.routing(w),
      setRouting: (w, state, tables) => this.setRouting(this.get(w), state, tables),
    };
  }

  /** Whether the workflow's last command has not been tried yet (and marks it tried). */
  private tryOnce(rec: WorkflowRecord): boolean {
    if (this.tried.get(rec.name) === rec.commandAt.getTime()) return false;
    this.tried.set(rec.name, rec.commandAt.getTime());
    return true;
  }

  /** complete: the source tables move away into a schema of their own, both sides forget the positions; the rule keeps serving from the target. */
  private async complete(rec: WorkflowRecord): Promise<void> {
    const def = rec.definition;
    try {
      let schema = '';
      for (const r of this.shards.rangesOf(def.sourceDatabase, def.sourceShards)) {
        const source = await this.shards.connect(def.sourceDatabase, r.shard, `mg-materializer-${rec.name}`);
        try {
          schema = await retireSource(source, def.tables.map((n) => ({ sql: `${quoteIdent(splitName(n).schema)}.${quoteIdent(splitName(n).table)}` })), rec.name);
          await dropPositions(source, rec.name); // reverse replication's
        } finally {
          await source.end().catch(() => {});
        }
      }
      for (const r of this.shards.rangesOf(def.targetDatabase, def.targetShards)) {
        const target = await this.shards.connect(def.targetDatabase, r.shard, `mg-materializer-${rec.name}`);
        await dropPositions(target, rec.name).finally(() => target.end().catch(() => {}));
      }
      // A Reshard's rule has nothing left to hold: with no tables the database's sessions are planned as before it, by the serving set.
      if (def.type === 'RESHARD') await this.setRouting(rec, 'TARGET', []);
      const message = def.type === 'RESHARD'
        ? `shards ${def.targetShards!.join(', ')} serve ${def.targetDatabase}; the tables of the old shards ${def.sourceShards!.join(', ')} are in their schema ${schema} (they serve nothing now: mg workflow complete retires them through the orchestrator, decision 0061)`
        : `${def.targetDatabase} serves ${def.tables.join(', ')}; the source tables are in schema ${schema} of ${def.sourceDatabase} (drop them when done)`;
      await this.publish(rec.name, workflowPayload('WorkflowStatus', { ...rec.status!, phase: 'COMPLETED', message }));
      this.log.info({ workflow: rec.name, schema }, 'workflow completed');
    } catch (err) {
      this.log.error({ err, workflow: rec.name }, 'complete failed');
      await this.publish(rec.name, workflowPayload('WorkflowStatus', { ...rec.status!, message: `complete failed (run it again): ${(err as Error).message}` }));
    }
  }

  /** complete of a Materialize: it stops following the source and forgets its positions; the target table stays as it is. */
  private async completeMaterialize(rec: WorkflowRecord): Promise<void> {
    const def = rec.definition;
    try {
      for (const r of this.shards.rangesOf(def.targetDatabase, def.targetShards)) {
        const target = await this.shards.connect(def.targetDatabase, r.shard, `mg-materializer-${rec.name}`);
        await dropPositions(target, rec.name).finally(() => target.end().catch(() => {}));
      }
      const message = `${def.tables[0]} of ${def.targetDatabase} stays as it is and no longer follows ${def.sourceDatabase}`;
      await this.publish(rec.name, workflowPayload('WorkflowStatus', { ...(rec.status ?? freshStatus()), phase: 'COMPLETED', message, lagSeconds: null }));
      this.log.info({ workflow: rec.name }, 'materialize completed');
    } catch (err) {
      this.log.error({ err, workflow: rec.name }, 'complete failed');
      await this.publish(rec.name, workflowPayload('WorkflowStatus', { ...(rec.status ?? freshStatus()), message: `complete failed (run it again): ${(err as Error).message}` }));
    }
  }

  /** Cancel: stop, and remove the workflow's positions from the target shards (the copied rows stay: drop them yourself). */
  private async cancel(rec: WorkflowRecord, running: MoveTablesRunner | undefined): Promise<void> {
    this.runners.delete(rec.name);
    const r = running ?? this.runner(rec);
    await r.close(); // nothing is applied any more: a tail would write its positions again
    // A rule with no tables routes nothing: the source's new sessions relay unparsed again.
    if (this.routing(rec.name) !== undefined) await this.setRouting(rec, 'SOURCE', []).catch((err) => this.log.warn({ err, workflow: rec.name }, 'routing rule of a cancelled workflow not cleared'));
    try {
      for (const client of (await r.targetSessions()).values()) await dropPositions(client, rec.name);
    } catch (err) {
      this.log.warn({ err, workflow: rec.name }, 'positions of a cancelled workflow not removed');
    }
    // Published last: a workflow shown CANCELLED has its positions removed (a crash before this cancels it again).
    await r.stop('CANCELLED', 'cancelled; rows copied so far are left on the target');
    await r.close();
  }
}

/** `n` of the ranges that tile the keyspace from `from` to its end, each starting where the one before ends, in key order; undefined when none do. */
export function tiling(ranges: KeyRange[], n: number, from = ''): KeyRange[] | undefined {
  if (n < 1) return undefined;
  for (const r of ranges.filter((x) => x.start === from)) {
    if (r.end === '') {
      if (n === 1) return [r];
      continue;
    }
    const rest = tiling(ranges, n - 1, r.end);
    if (rest) return [r, ...rest];
  }
  return undefined;
}
