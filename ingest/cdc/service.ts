/**
 * The agent's change-data-capture part: runs the database shard's stream
 * while this instance is the primary (by the latest term in topology), stops
 * it when another instance takes over, answers CDC_START / CDC_STOP /
 * CDC_STATUS, and publishes the stream's status to `mg.cdc.status.v1`.
 */
import type pg from 'pg';
import type { EventLog, Subscription } from '../../common/eventlog.ts';
import type { Logger } from '../../common/log.ts';
import { applyTopologyEvent, emptyTopology, shardKey, type AgentAction, type AgentCommand, type CdcStreamStatus } from '../../schemas/index.ts';
import type { AgentConfig } from '../config.ts';
import { quoteIdent, STATE_SCHEMA, withSqlClient } from './catalog.ts';
import { StandbySlotSync } from './standby-slot.ts';
import { CdcStream, publicationName, slotName, type StreamStatus } from './stream.ts';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const STATUS_INTERVAL_MS = 1_000;

type Handle = (action: AgentAction, handler: (cmd: AgentCommand) => Promise<string>) => void;

/** What the standby side needs from the agent: its physical slot on the primary, and a restart around installing the slot's copy. */
export interface StandbyHooks {
  physicalSlot: string;
  whileStopped: (install: () => void) => Promise<void>;
}

export class CdcService {
  private readonly topology = emptyTopology();
  private topologySub: Subscription | undefined;
  private following: Promise<void> | undefined;
  private readonly publishStatus;
  private statusInflight: Promise<void> | undefined;
  private statusTimer: NodeJS.Timeout | undefined;

  /** The term under which this instance is the primary, or null. */
  private primaryTerm: bigint | null = null;
  /**
   * Whether the stream should run: the last CDC_START/CDC_STOP, kept in
   * `mg_cdc.commands` (so it survives agent restarts and replicates to the
   * next primary), else the spec. Null until read from the primary.
   */
  private requested: boolean | null = null;
  private deciding = false;
  private stream: CdcStream | undefined;
  /** The last stream, kept after it stops: its slot may still hold WAL back, which is watched. */
  private last: CdcStream | undefined;
  private ticks = 0;
  private streamTerm = 0n;
  private running: Promise<void> | undefined;
  private closed = false;
  /** While a standby: keeps a copy of the primary's slot (cdc.failoverSlots). */
  private readonly standbySlot: StandbySlotSync | undefined;
  private standbySyncing = false;
  private standbySyncError: string | undefined;

  constructor(private readonly cfg: AgentConfig, private readonly eventLog: EventLog, private readonly log: Logger, standby?: StandbyHooks) {
    this.publishStatus = eventLog.publisher('cdcStatus');
    if (standby && cfg.cdc.failoverSlots) {
      this.standbySlot = new StandbySlotSync({
        database: cfg.database, shard: cfg.shard, instanceId: cfg.instanceId, host: cfg.host, port: cfg.port, dataDir: cfg.dataDir,
        slot: slotName(cfg.database), ...standby,
      }, log.child({ component: 'cdc-standby-slot' }));
    }
  }

  register(handle: Handle): void {
    handle('CDC_START', async (cmd) => {
      if (this.primaryTerm === null) throw new Error(`${this.cfg.instanceId} is not the primary of ${this.cfg.database}/${this.cfg.shard}`);
      await this.persistRequested(true);
      const resnapshot = cmd.args.resnapshot === 'true';
      if (this.stream && resnapshot) await this.stopStream();
      if (this.stream) return `already ${this.stream.status().state.toLowerCase()}`;
      this.startStream(resnapshot);
      return resnapshot ? 'started with a new snapshot' : 'started';
    });
    handle('CDC_STOP', async (cmd) => {
      if (this.primaryTerm !== null) await this.persistRequested(false);
      else this.requested = false;
      const wasRunning = await this.stopStream();
      if (cmd.args.drop === 'true') {
        await this.dropSlot();
        return 'stopped; slot and publication dropped';
      }
      return wasRunning ? 'stopped; the slot keeps its position' : 'not running';
    });
    handle('CDC_STATUS', async () => JSON.stringify(
      this.stream ? this.stream.status() : { state: 'STOPPED', standbySlot: this.primaryTerm === null ? this.standbySlot?.status() ?? null : null },
      (_k, v) => (typeof v === 'bigint' ? v.toString() : v)));
  }

  /** Follows topology in the background, so the agent's own start does not wait for it. */
  start(): void {
    this.following = (async () => {
      for (let attempt = 1; !this.closed; attempt++) {
        try {
          this.topologySub = await this.eventLog.subscribe('topology', (e) => {
            applyTopologyEvent(this.topology, e);
            this.reconcile();
          });
          break;
        } catch (err) {
          this.log.warn({ err, attempt }, 'CDC cannot follow topology yet; retrying');
          await sleep(Math.min(10_000, 250 * 2 ** attempt));
        }
      }
      await this.topologySub?.caughtUp;
      this.reconcile();
    })();
    this.statusTimer = setInterval(() => this.tick(), STATUS_INTERVAL_MS);
  }

  async stop(): Promise<void> {
    this.closed = true;
    clearInterval(this.statusTimer);
    await this.following;
    await this.topologySub?.stop();
    await this.stopStream();
    await this.statusInflight;
  }

  /** Slot lag for the heartbeat, while a stream runs here. */
  lag(): { bytes: bigint | null; seconds: number | null } | null {
    const st = this.stream?.status();
    return st ? { bytes: st.slotLagBytes, seconds: st.slotLagSeconds } : null;
  }

  /** Follows topology: the primary by the latest term streams, any other instance does not. */
  private reconcile(): void {
    if (this.closed) return;
    const primary = this.topology.primaries.get(shardKey(this.cfg.database, this.cfg.shard));
    this.primaryTerm = primary?.instanceId === this.cfg.instanceId ? primary.term : null;
    if (this.primaryTerm === null && this.stream) {
      this.log.info({ primary: primary?.instanceId, term: primary?.term }, 'no longer the primary: stopping the change stream');
      void this.stopStream();
    } else if (this.primaryTerm !== null && this.requested === null && !this.deciding) {
      this.deciding = true;
      this.readRequested()
        .then((wanted) => {
          this.requested ??= wanted;
          this.reconcile();
        }, (err) => this.log.warn({ err }, 'could not read the CDC command state; retrying'))
        .finally(() => (this.deciding = false));
    } else if (this.primaryTerm !== null && this.requested && !this.stream) {
      this.log.info({ term: this.primaryTerm }, 'primary: starting the change stream');
      this.startStream(false);
    }
  }

  private async withSql<T>(work: (sql: pg.Client) => Promise<T>): Promise<T> {
    return withSqlClient({ host: this.cfg.host, port: this.cfg.port, database: this.cfg.database, applicationName: 'mg-cdc-control' }, work);
  }

  /** The last command's wish, or the spec's when no command was ever given. */
  private readRequested(): Promise<boolean> {
    return this.withSql(async (sql) => {
      const { rows } = await sql.query<{ wanted: string }>(
        `SELECT wanted::text FROM ${STATE_SCHEMA}.commands WHERE database = $1`, [this.cfg.database]).catch((err) => {
        if ((err as { code?: string }).code === '42P01' || (err as { code?: string }).code === '3F000') return { rows: [] }; // never written
        throw err;
      });
      return rows[0] ? rows[0].wanted === 'true' : this.cfg.cdc.enabled;
    });
  }

  private async persistRequested(wanted: boolean): Promise<void> {
    await this.withSql(async (sql) => {
      await sql.query(`CREATE SCHEMA IF NOT EXISTS ${STATE_SCHEMA}`);
      await sql.query(`CREATE TABLE IF NOT EXISTS ${STATE_SCHEMA}.commands (database text PRIMARY KEY, wanted boolean NOT NULL, at timestamptz NOT NULL DEFAULT now())`);
      await sql.query(
        `INSERT INTO ${STATE_SCHEMA}.commands (database, wanted) VALUES ($1, $2)
         ON CONFLICT (database) DO UPDATE SET wanted = EXCLUDED.wanted, at = now()`, [this.cfg.database, wanted]);
    });
    this.requested = wanted;
  }

  private startStream(resnapshot: boolean): void {
    const stream = this.newStream();
    this.stream = stream;
    this.last = stream;
    this.streamTerm = this.primaryTerm ?? 0n;
    this.running = this.keepRunning(stream, resnapshot);
  }

  private newStream(): CdcStream {
    const c = this.cfg.cdc;
    return new CdcStream({
      database: this.cfg.database, shard: this.cfg.shard, instanceId: this.cfg.instanceId, host: this.cfg.host, port: this.cfg.port,
      dataDir: this.cfg.dataDir, topicPrefix: `${this.cfg.topicPrefix}${c.topicPrefix}`, tables: c.tables, tombstones: c.tombstones,
      transactionEvents: c.transactionEvents, numeric: c.numeric, maxSlotLagBytes: c.maxSlotLagBytes, heartbeatMs: c.heartbeatMs,
      partitions: c.partitions, retentionMs: c.retentionMs, snapshotChunkRows: c.snapshotChunkRows, maxBatchEvents: c.maxBatchEvents,
    }, this.eventLog, this.log.child({ component: 'cdc' }));
  }

  /** Runs the stream until stopped; after a failure (Postgres restarting, Kafka away, bad data) it starts again from the slot. */
  private async keepRunning(stream: CdcStream, resnapshot: boolean): Promise<void> {
    let failures = 0;
    while (this.stream === stream) {
      const started = Date.now();
      try {
        await stream.run({ resnapshot });
        resnapshot = false;
      } catch (err) {
        resnapshot = false;
        failures = Date.now() - started > 30_000 ? 1 : failures + 1;
        this.log.error({ err, attempt: failures }, 'change stream failed; it resumes from the slot');
        this.sendStatus();
        const until = Date.now() + Math.min(10_000, 250 * 2 ** failures);
        while (this.stream === stream && Date.now() < until) await sleep(100);
      }
    }
  }

  /** Returns whether a stream was running. */
  private async stopStream(): Promise<boolean> {
    const stream = this.stream;
    if (!stream) return false;
    this.stream = undefined;
    await stream.stop();
    await this.running;
    this.sendStatus(stream);
    return true;
  }

  private async dropSlot(): Promise<void> {
    await this.withSql(async (sql) => {
      await sql.query('SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1', [slotName(this.cfg.database)]);
      await sql.query(`DROP PUBLICATION IF EXISTS ${quoteIdent(publicationName(this.cfg.database))}`);
      await sql.query(`DELETE FROM ${STATE_SCHEMA}.streams WHERE slot = $1`, [slotName(this.cfg.database)]).catch(() => undefined);
    });
  }

  /**
   * Every second the running stream's status; every 5 s, while this instance
   * is the primary, the lag of a slot whose stream is stopped or failing.
   */
  private tick(): void {
    this.syncStandbySlot();
    if (this.requested === null) this.reconcile(); // reading the command state failed before: try again
    // A stream stopped before this agent started still has its slot to watch.
    if (!this.stream && !this.last && this.primaryTerm !== null && this.requested === false) {
      this.last = this.newStream();
      this.streamTerm = this.primaryTerm;
    }
    const stream = this.stream ?? this.last;
    if (!stream) return;
    const state = stream.status().state;
    if (this.primaryTerm !== null && (state === 'STOPPED' || state === 'FAILED') && this.ticks++ % 5 === 0) {
      stream.measureIdle().then(() => this.sendStatus(stream), (err) => this.log.warn({ err }, 'could not check the CDC slot lag'));
      return;
    }
    if (this.stream) this.sendStatus(this.stream);
  }

  /** Once a second while a standby of a shard with a primary: copy or advance the primary's slot (one round at a time). */
  private syncStandbySlot(): void {
    const primary = this.topology.primaries.get(shardKey(this.cfg.database, this.cfg.shard));
    const at = primary && this.topology.instances.get(primary.instanceId);
    if (!this.standbySlot || this.standbySyncing || this.primaryTerm !== null || !at || at.instanceId === this.cfg.instanceId) return;
    this.standbySyncing = true;
    this.standbySlot.sync({ host: at.host, port: at.port, instanceId: at.instanceId })
      .then(() => (this.standbySyncError = undefined), (err) => {
        // Once per distinct error: a primary that is down fails every round.
        if ((err as Error).message !== this.standbySyncError) this.log.warn({ err: (err as Error).message }, 'could not keep the standby\'s copy of the CDC slot in step');
        this.standbySyncError = (err as Error).message;
      })
      .finally(() => (this.standbySyncing = false));
  }

  private sendStatus(stream = this.stream): void {
    if (!stream || this.statusInflight) return;
    const value = this.statusEvent(stream.status());
    this.statusInflight = this.publishStatus([{ key: `${this.cfg.database}/${this.cfg.shard}`, value }])
      .catch((err) => this.log.warn({ err }, 'could not publish the CDC status'))
      .finally(() => (this.statusInflight = undefined));
  }

  private statusEvent(st: StreamStatus): CdcStreamStatus {
    return {
      database: this.cfg.database, shard: this.cfg.shard, instanceId: this.cfg.instanceId, term: this.streamTerm, ts: new Date(),
      state: st.state, slot: st.slot, topicPrefix: `${this.cfg.topicPrefix}${this.cfg.cdc.topicPrefix}`, epoch: st.epoch,
      confirmedLsn: st.confirmedLsn, receivedLsn: st.receivedLsn, slotLagBytes: st.slotLagBytes, slotLagSeconds: st.slotLagSeconds,
      eventsTotal: st.eventsTotal, eventsPerSecond: st.eventsPerSecond,
      snapshot: st.snapshot && { ...st.snapshot, rows: BigInt(st.snapshot.rows) }, alert: st.alert, error: st.error, resumedFrom: st.resumedFrom,
    };
  }
}
