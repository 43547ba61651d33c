/**
 * One change stream: the shard primary's WAL (pgoutput) into per-table Kafka
 * topics, after an initial snapshot that is exactly consistent with where
 * streaming begins.
 *
 * The one rule that matters: the slot's confirmed LSN moves only to the end of
 * a transaction whose events Kafka has acknowledged (acks=all), or to a
 * heartbeat message behind which everything is acknowledged. Keep-alives are
 * answered with that position, never with what was merely received. After a
 * crash, Postgres resends everything after it; redelivered events carry the
 * same (epoch, commit_lsn, position).
 */
import pg from 'pg';
import type { BulkSender, EventLog, RawBatch } from '../../common/eventlog.ts';
import type { Logger } from '../../common/log.ts';
import { counter, gauge, histogram } from '../../common/metrics.ts';
import {
  CDC_FORMAT_VERSION, CONNECTOR, OPS, TRANSACTION_KEY_SCHEMA, TRANSACTION_VALUE_SCHEMA, keySubject, topicPart, transactionTopic, valueSubjectOf,
  type CdcNaming, type NumericMode, type Op, type PgType, type TableDescription,
} from '../../schemas/cdc.ts';
import { INTERNAL_SCHEMAS, parseAvro } from '../../schemas/index.ts';
import { formatLsn, parseLsn } from '../postgres/lsn.ts';
import { Catalog, qualified, quoteIdent, sqlClient, STATE_SCHEMA } from './catalog.ts';
import { TableEncoder, type Row } from './encoder.ts';
import { decodeCopyData, decodePgOutput, ProtocolError, type PgOutputMessage, type TupleValue } from './pgoutput.ts';
import { ReplicationSession, type CreatedSlot } from './replication.ts';
import { lastDelivered, ResendFilter, type Delivered } from './resume.ts';
import { readMarker, removeMarker } from './standby-slot.ts';

export interface StreamSettings {
  database: string;
  shard: string;
  instanceId: string;
  host: string;
  port: number;
  /** The instance's data directory (where a standby's copy of the slot keeps its marker). */
  dataDir: string;
  /** Full topic prefix (the cluster's Kafka prefix plus the stream's). */
  topicPrefix: string;
  /** 'schema.table' or 'table' (public); empty: every user table. */
  tables: string[];
  tombstones: boolean;
  transactionEvents: boolean;
  numeric: NumericMode;
  maxSlotLagBytes: number;
  heartbeatMs: number;
  partitions: number;
  retentionMs: number;
  snapshotChunkRows: number;
  maxBatchEvents: number;
}

export type StreamState = 'STARTING' | 'SNAPSHOTTING' | 'STREAMING' | 'STOPPED' | 'FAILED';

export interface SnapshotProgress {
  tablesTotal: number;
  tablesDone: number;
  rows: number;
  rowsPerSecond: number;
  currentTable: string | null;
  startedAt: Date;
  finishedAt: Date | null;
}

export interface StreamStatus {
  state: StreamState;
  slot: string;
  publication: string;
  epoch: bigint;
  confirmedLsn: bigint | null;
  receivedLsn: bigint | null;
  slotLagBytes: bigint | null;
  slotLagSeconds: number | null;
  eventsTotal: bigint;
  eventsPerSecond: number;
  snapshot: SnapshotProgress | null;
  alert: string | null;
  error: string | null;
  /** How the stream started on this instance after another one ran it: the slot carried over, or why it re-snapshotted. */
  resumedFrom: string | null;
}

const HEARTBEAT_PREFIX = 'mg.cdc.heartbeat';
const INBOX_HIGH = 20_000;
const INBOX_LOW = 2_000;
/** Kept under the broker's default message.max.bytes (1 MiB), which bounds one partition's share of a send. */
const MAX_BATCH_BYTES = 900_000;

const eventsProduced = counter('mg_cdc_events_total', 'Change events acknowledged by Kafka', ['database', 'shard']);
const snapshotRows = counter('mg_cdc_snapshot_rows_total', 'Rows read by snapshots', ['database', 'shard']);
const batchSize = histogram('mg_cdc_batch_events', 'Events per Kafka send', ['database', 'shard'], [10, 100, 1000, 5000, 10000, 20000]);
const lagBytesGauge = gauge('mg_cdc_slot_lag_bytes', 'WAL between the current position and the slot\'s confirmed LSN', ['database', 'shard']);
const lagSecondsGauge = gauge('mg_cdc_slot_lag_seconds', 'Age of the oldest commit not yet acknowledged by Kafka', ['database', 'shard']);
const lagAlert = gauge('mg_cdc_slot_lag_alert', '1 while the slot lag exceeds maxSlotLagBytes', ['database', 'shard']);
const resumes = counter('mg_cdc_takeovers_total', 'Streams taken over from another instance (a failover or switchover): how = slot (the standby\'s copy of the slot) or resnapshot (a new epoch)', ['database', 'shard', 'how']);
const resendsDropped = counter('mg_cdc_resent_events_dropped_total', 'Events Postgres resent after a restart or takeover that Kafka already held', ['database', 'shard']);
const protocolErrors = counter('mg_cdc_protocol_errors_total', 'Malformed or unexpected replication messages', ['database', 'shard']);

/** Kafka messages of one send, and how far the slot may be confirmed once Kafka acknowledges them. */
class Batch {
  readonly topics = new Map<string, RawBatch['messages']>();
  events = 0;
  confirmLsn = 0n;
  firstCommitMs: number | null = null;

  /** Approximate size on the wire: a send must stay under Kafka's message.max.bytes (1 MB by default) per partition. */
  bytes = 0;

  add(topic: string, key: Buffer | null, value: Buffer | null, partition?: number): void {
    let list = this.topics.get(topic);
    if (!list) this.topics.set(topic, (list = []));
    list.push(partition === undefined ? { key, value } : { key, value, partition });
    if (value !== null) this.events++;
    this.bytes += (key?.length ?? 0) + (value?.length ?? 0) + 24;
  }

  get empty(): boolean {
    return this.topics.size === 0;
  }

  toSend(): RawBatch[] {
    return [...this.topics].map(([topic, messages]) => ({ topic, messages }));
  }
}

interface OpenTx {
  xid: number;
  finalLsn: bigint;
  commitTimeMs: number;
  position: number;
  perTopic: Map<string, number>;
  id: string;
}

interface Relation {
  encoder: TableEncoder;
  full: boolean;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The logical slot and the publication of a database's stream (names allow [a-z0-9_], 63 characters). */
export function slotName(database: string): string {
  return `mg_cdc_${database.toLowerCase().replace(/[^a-z0-9_]/g, '_')}`.slice(0, 63);
}
export const publicationName = slotName;

export class CdcStream {
  readonly slot: string;
  readonly publication: string;
  private readonly naming: CdcNaming;
  private readonly labels: { database: string; shard: string };
  /** STOPPED until run(): a stream object also watches the slot of a stream that is not running. */
  private state: StreamState = 'STOPPED';
  private epoch = 0n;
  private error: string | null = null;
  private alert: string | null = null;
  private snapshotProgress: SnapshotProgress | null = null;
  private resumedFrom: string | null = null;
  /** Drops what Postgres resends that Kafka already holds, after a restart on an existing slot. */
  private resent: ResendFilter | undefined;

  private sql: pg.Client | undefined;
  /** A second session for the lag measurement and heartbeats, so they never queue behind the stream's catalog queries. */
  private monitor: pg.Client | undefined;
  private monitorTask: Promise<unknown> = Promise.resolve();
  private catalog: Catalog | undefined;
  private session: ReplicationSession | undefined;
  private sender: BulkSender | undefined;
  private stopping = false;
  private failure: Error | undefined;

  private inbox: Buffer[] = [];
  private inboxHead = 0;
  private paused = false;
  private wake: (() => void) | undefined;

  private batch = new Batch();
  private inflight: Promise<void> | undefined;
  private inflightFirstCommitMs: number | null = null;
  private acked = 0n;
  private received: bigint | null = null;
  private tx: OpenTx | undefined;
  private relations = new Map<number, Relation>();
  private skipped = new Set<number>();
  private encoders = new Map<string, Promise<TableEncoder>>();
  private partitions = new Map<string, number>();
  private txEncoder: { topic: string; key: (id: string) => Buffer; value: (v: Row) => Buffer } | undefined;

  private eventsTotal = 0n;
  private rate = { at: Date.now(), events: 0n, perSecond: 0 };
  private slotLagBytes: bigint | null = null;

  constructor(private readonly settings: StreamSettings, private readonly eventLog: EventLog, private readonly log: Logger) {
    this.slot = slotName(settings.database);
    this.publication = publicationName(settings.database);
    this.naming = { topicPrefix: settings.topicPrefix, database: settings.database };
    this.labels = { database: settings.database, shard: settings.shard };
  }

  status(): StreamStatus {
    const oldest = this.inflightFirstCommitMs ?? this.batch.firstCommitMs ?? this.tx?.commitTimeMs ?? null;
    return {
      state: this.state, slot: this.slot, publication: this.publication, epoch: this.epoch,
      confirmedLsn: this.acked || null, receivedLsn: this.received, slotLagBytes: this.slotLagBytes,
      slotLagSeconds: this.state === 'STREAMING' ? (oldest === null ? 0 : Math.max(0, (Date.now() - oldest) / 1000)) : null,
      eventsTotal: this.eventsTotal, eventsPerSecond: this.rate.perSecond,
      snapshot: this.snapshotProgress && { ...this.snapshotProgress }, alert: this.alert, error: this.error, resumedFrom: this.resumedFrom,
    };
  }

  /**
   * Runs the stream until stop() or a failure (then it throws; the caller
   * retries, and Postgres resends from the confirmed LSN).
   */
  async run(opts: { resnapshot?: boolean } = {}): Promise<void> {
    this.stopping = false;
    this.state = 'STARTING';
    this.error = null;
    const s = this.settings;
    const applicationName = `mg-cdc-${s.instanceId}`.slice(0, 63);
    const started = Date.now();
    try {
      this.sql = sqlClient({ host: s.host, port: s.port, database: s.database, applicationName });
      this.sql.on('error', (err) => this.fail(err));
      await this.sql.connect();
      this.monitor = sqlClient({ host: s.host, port: s.port, database: s.database, applicationName });
      this.monitor.on('error', () => undefined); // the replication session reports a dead server
      await this.monitor.connect();
      this.catalog = new Catalog(this.sql);
      this.sender = await this.eventLog.bulkSender();
      await this.prepare();
      await this.prepareTransactionEvents();
      this.log.debug({ ms: Date.now() - started }, 'CDC connected to Postgres and Kafka');

      this.session = new ReplicationSession({ host: s.host, port: s.port, database: s.database, applicationName });
      await this.session.connect();
      const from = await this.startPosition(opts.resnapshot ?? false);
      if (this.stopping) return;
      this.acked = from;
      const streaming = this.session.start(this.slot, this.publication, from, (chunk) => this.onData(chunk));
      streaming.then(() => this.fail(new Error('replication ended')), (err) => this.fail(err));
      this.state = 'STREAMING';
      this.log.info({ slot: this.slot, from: formatLsn(from), epoch: this.epoch, ms: Date.now() - started }, 'CDC streaming');
      await this.loop();
      if (this.failure) throw this.failure;
    } catch (err) {
      if (this.stopping) return;
      this.state = 'FAILED';
      this.error = (err as Error).message;
      if (err instanceof ProtocolError) protocolErrors.inc(this.labels);
      throw err;
    } finally {
      await this.teardown();
      if (this.stopping) this.state = 'STOPPED';
    }
  }

  /** Stops after the send in flight is acknowledged (and confirmed); the slot keeps the position. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.wake?.();
  }

  private fail(err: Error): void {
    this.failure ??= err;
    this.wake?.();
  }

  private async teardown(): Promise<void> {
    await this.inflight?.catch(() => undefined);
    await this.session?.close();
    await this.sql?.end().catch(() => undefined);
    await this.monitor?.end().catch(() => undefined);
    this.monitor = undefined;
    await this.sender?.close().catch(() => undefined);
    this.session = undefined;
    this.sql = undefined;
    this.sender = undefined;
    this.inbox = [];
    this.inboxHead = 0;
    this.batch = new Batch();
    this.tx = undefined;
    this.relations.clear();
    this.skipped.clear();
    this.resent = undefined;
    this.failure = undefined;
  }

  /** Our bookkeeping table and the publication (every user table, or the configured ones). */
  private async prepare(): Promise<void> {
    const sql = this.sql!;
    await sql.query(`CREATE SCHEMA IF NOT EXISTS ${STATE_SCHEMA}`);
    await sql.query(`CREATE TABLE IF NOT EXISTS ${STATE_SCHEMA}.streams (
      slot text PRIMARY KEY, epoch bigint NOT NULL, consistent_lsn pg_lsn, snapshot_done_at timestamptz, instance text)`);
    const tables = this.settings.tables.map((t) => {
      const [schema, table] = t.includes('.') ? t.split('.', 2) : ['public', t];
      return qualified(schema, table);
    });
    const want = tables.length ? `FOR TABLE ${tables.join(', ')}` : 'FOR ALL TABLES';
    const { rows } = await sql.query<{ puballtables: string }>('SELECT puballtables FROM pg_publication WHERE pubname = $1', [this.publication]);
    const pub = quoteIdent(this.publication);
    if (rows[0] && (rows[0].puballtables === 't') !== (tables.length === 0)) await sql.query(`DROP PUBLICATION ${pub}`);
    if (!rows[0] || (rows[0].puballtables === 't') !== (tables.length === 0)) await sql.query(`CREATE PUBLICATION ${pub} ${want}`);
    else if (tables.length) await sql.query(`ALTER PUBLICATION ${pub} SET TABLE ${tables.join(', ')}`);
  }

  /**
   * Where streaming starts: the slot's confirmed LSN when the slot exists and
   * its snapshot completed (also a standby's copy of it, carried over by a
   * failover, when that copy is ready and Kafka holds nothing this instance's
   * history lacks); otherwise a new slot (new epoch) whose exported snapshot is
   * read first, and streaming starts at its consistent point.
   */
  private async startPosition(resnapshot: boolean): Promise<bigint> {
    const sql = this.sql!;
    const me = this.settings.instanceId;
    const slot = (await sql.query<{ active_pid: string | null; confirmed_flush_lsn: string | null }>(
      'SELECT active_pid, confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1', [this.slot])).rows[0];
    const state = (await sql.query<{ epoch: string; snapshot_done_at: string | null; instance: string | null }>(
      `SELECT epoch, snapshot_done_at, instance FROM ${STATE_SCHEMA}.streams WHERE slot = $1`, [this.slot])).rows[0];
    if (slot?.active_pid) {
      // Our own previous session (an agent killed with -9 leaves its walsender behind for a while).
      await sql.query('SELECT pg_terminate_backend($1)', [Number(slot.active_pid)]);
      await this.waitSlotInactive();
    }
    const takeover = state?.snapshot_done_at && state.instance !== me ? state.instance ?? 'an unknown instance' : null;
    let fallback: string | null = null;
    let delivered: Map<string, Delivered> | null = null;
    const readDelivered = async () => {
      const scanStarted = Date.now();
      const found = await lastDelivered(this.eventLog, this.settings.topicPrefix, topicPart(this.settings.database), this.settings.shard);
      this.log.info({ partitions: found.size, ms: Date.now() - scanStarted }, 'read the last event of this shard in each partition');
      return found;
    };
    if (slot && state?.snapshot_done_at && !resnapshot && slot.confirmed_flush_lsn) {
      const epoch = BigInt(state.epoch);
      const from = parseLsn(slot.confirmed_flush_lsn);
      fallback = takeover ? this.copyRefusal(epoch) : null;
      if (!fallback) delivered = await readDelivered();
      fallback ??= await this.notInHistory(delivered!, epoch, takeover !== null);
      if (!fallback) {
        this.epoch = epoch;
        this.resent = new ResendFilter(delivered!, epoch);
        if (takeover) {
          await sql.query(`UPDATE ${STATE_SCHEMA}.streams SET instance = $2 WHERE slot = $1`, [this.slot, me]);
          removeMarker(this.settings.dataDir, this.slot);
          this.resumedFrom = `slot carried over from ${takeover} at ${formatLsn(from)}`;
          resumes.inc({ ...this.labels, how: 'slot' });
          this.log.info({ slot: this.slot, from: formatLsn(from), epoch, previous: takeover }, 'CDC takes the stream over from the slot copied to this standby: no snapshot');
        }
        return from;
      }
    } else if (takeover && !resnapshot) {
      fallback = `this instance has no copy of slot ${this.slot}`;
    }
    if (fallback) {
      this.resumedFrom = `re-snapshot: ${fallback}`;
      resumes.inc({ ...this.labels, how: 'resnapshot' });
      this.log.warn({ slot: this.slot, previous: takeover, reason: fallback }, 'CDC cannot resume from the slot: a new epoch and a full snapshot');
    }
    if (slot) await sql.query('SELECT pg_drop_replication_slot($1)', [this.slot]);
    // Above every epoch Kafka holds for this shard, not only the state table's: after an in-place restore that table is
    // as of the restored time, and an epoch used again would let consumers deduplicating by (epoch, LSN) skip the new history.
    delivered ??= await readDelivered();
    this.epoch = [...delivered.values()].reduce((high, d) => (d.epoch > high ? d.epoch : high), BigInt(state?.epoch ?? 0)) + 1n;
    await sql.query(
      `INSERT INTO ${STATE_SCHEMA}.streams (slot, epoch, instance) VALUES ($1, $2, $3)
       ON CONFLICT (slot) DO UPDATE SET epoch = EXCLUDED.epoch, instance = EXCLUDED.instance, consistent_lsn = NULL, snapshot_done_at = NULL`,
      [this.slot, this.epoch.toString(), me]);
    const created = await this.session!.createSlot(this.slot);
    this.log.info({ slot: this.slot, consistentPoint: formatLsn(created.consistentPoint), epoch: this.epoch }, 'CDC slot created; snapshot starts');
    await this.snapshot(created);
    if (this.stopping) return created.consistentPoint;
    await sql.query(`UPDATE ${STATE_SCHEMA}.streams SET consistent_lsn = $2, snapshot_done_at = now() WHERE slot = $1`,
      [this.slot, formatLsn(created.consistentPoint)]);
    return created.consistentPoint;
  }

  /** Why a slot found after a takeover is not a usable copy of the stream's (null: it is one). */
  private copyRefusal(epoch: bigint): string | null {
    const marker = readMarker(this.settings.dataDir, this.slot);
    if (!marker) return `slot ${this.slot} on this instance is not a copy made as a standby`;
    if (marker.epoch !== epoch.toString()) return `the copy of slot ${this.slot} belongs to epoch ${marker.epoch}, the stream is at ${epoch}`;
    if (!marker.ready) return `the copy of slot ${this.slot} was not ready (the primary had not confirmed holding the catalog rows it needs)`;
    return null;
  }

  /**
   * Why Kafka holds events this instance cannot continue after (null: none).
   * After a takeover, what the previous primary delivered must be part of this
   * instance's history: committed before the point where this instance's
   * timeline left the previous one. Transactions after it were lost by the
   * failover (asynchronous replication), and their events are already in Kafka.
   */
  private async notInHistory(delivered: Map<string, Delivered>, epoch: bigint, takeover: boolean): Promise<string | null> {
    for (const [where, d] of delivered) {
      if (d.epoch > epoch) return `${where} holds events of epoch ${d.epoch}, newer than this slot's ${epoch}`;
    }
    if (!takeover) return null;
    const { rows: [{ tli }] } = await this.sql!.query<{ tli: string }>('SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) AS tli');
    if (tli === '00000001') return null;
    const history = (await this.sql!.query<{ text: string }>('SELECT pg_read_file($1) AS text', [`pg_wal/${tli}.history`])).rows[0].text;
    const lines = history.split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#'));
    const switchpoint = parseLsn(lines.at(-1)!.split(/\s+/)[1]);
    for (const [where, d] of delivered) {
      if (d.epoch === epoch && d.instance !== this.settings.instanceId && d.commitLsn >= switchpoint) {
        return `${where} holds a transaction committed at ${formatLsn(d.commitLsn)} on ${d.instance}, after this instance's history left it at ${formatLsn(switchpoint)} (lost in the failover)`;
      }
    }
    return null;
  }

  private async waitSlotInactive(): Promise<void> {
    for (let i = 0; i < 100; i++) {
      const { rows } = await this.sql!.query('SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL', [this.slot]);
      if (rows.length === 0) return;
      await sleep(100);
    }
    throw new Error(`replication slot ${this.slot} stays active`);
  }

  /**
   * Reads every published table in a REPEATABLE READ transaction on the
   * slot's exported snapshot, in chunks through a cursor. Each table's
   * snapshot starts with a truncate event (source.snapshot "true"), so a
   * consumer applying the stream replaces what an earlier epoch left.
   */
  private async snapshot(created: CreatedSlot): Promise<void> {
    const s = this.settings;
    this.state = 'SNAPSHOTTING';
    const snap = sqlClient({ host: s.host, port: s.port, database: s.database, applicationName: `mg-cdc-snapshot-${s.instanceId}`.slice(0, 63) });
    await snap.connect();
    try {
      await snap.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
      await snap.query(`SET TRANSACTION SNAPSHOT '${created.snapshotName}'`);
      const catalog = new Catalog(snap);
      const tables = await catalog.publicationTables(this.publication);
      const progress: SnapshotProgress = {
        tablesTotal: tables.length, tablesDone: 0, rows: 0, rowsPerSecond: 0, currentTable: null, startedAt: new Date(), finishedAt: null,
      };
      this.snapshotProgress = progress;
      const startedMs = BigInt(progress.startedAt.getTime());
      for (const t of tables) {
        if (this.stopping) return;
        progress.currentTable = `${t.schema}.${t.table}`;
        const encoder = await this.encoderFor(await catalog.describe(t.schema, t.table));
        const source = (position: number) => this.source(encoder.description, {
          ts: startedMs, snapshot: 'true', txId: null, lsn: null, commitLsn: created.consistentPoint, position,
        });
        this.truncateEvent(encoder, source(0));
        const cols = encoder.description.columns.map((c) => quoteIdent(c.name)).join(', ');
        await snap.query(`DECLARE mg_cdc_snapshot NO SCROLL CURSOR FOR SELECT ${cols || 'NULL'} FROM ${qualified(t.schema, t.table)}`);
        let position = 1;
        for (;;) {
          const { rows } = await snap.query<TupleValue[]>({ text: `FETCH FORWARD ${s.snapshotChunkRows} FROM mg_cdc_snapshot`, rowMode: 'array' });
          for (const row of rows) {
            const tuple = cols ? row : [];
            const { row: after } = encoder.row(tuple);
            this.batch.add(encoder.topic, encoder.encodeKey(tuple), encoder.encodeValue(this.envelope(null, after, source(position++), OPS.read, [])));
            if (this.batch.bytes >= MAX_BATCH_BYTES) await this.sendWhenFull();
          }
          progress.rows += rows.length;
          snapshotRows.inc(this.labels, rows.length);
          progress.rowsPerSecond = progress.rows / Math.max(0.001, (Date.now() - progress.startedAt.getTime()) / 1000);
          await this.sendWhenFull();
          if (this.failure) throw this.failure;
          if (rows.length < s.snapshotChunkRows) break;
        }
        await snap.query('CLOSE mg_cdc_snapshot');
        progress.tablesDone++;
      }
      await snap.query('COMMIT');
      await this.drain();
      progress.currentTable = null;
      progress.finishedAt = new Date();
      this.log.info({ tables: progress.tablesTotal, rows: progress.rows, rowsPerSecond: Math.round(progress.rowsPerSecond) }, 'CDC snapshot done');
    } finally {
      await snap.end().catch(() => undefined);
    }
  }

  /** Sends what has been gathered and waits until Kafka has acknowledged all of it. */
  private async drain(): Promise<void> {
    while (this.inflight || !this.batch.empty) {
      if (this.inflight) await this.inflight;
      if (this.failure) throw this.failure;
      if (!this.batch.empty) this.send();
    }
    if (this.failure) throw this.failure;
  }

  /** Back-pressure: a full batch waits for the send in flight, then goes. */
  private async sendWhenFull(): Promise<void> {
    if (this.batch.events + this.batch.topics.size < this.settings.maxBatchEvents && this.batch.bytes < MAX_BATCH_BYTES) {
      if (!this.inflight && !this.batch.empty) this.send();
      return;
    }
    if (this.inflight) await this.inflight;
    if (!this.failure && !this.batch.empty) this.send();
  }

  /** Starts sending the current batch (one send in flight at a time keeps per-partition order trivially). */
  private send(): void {
    const batch = this.batch;
    this.batch = new Batch();
    if (batch.empty) {
      this.ack(batch.confirmLsn);
      return;
    }
    batchSize.observe(this.labels, batch.events);
    this.inflightFirstCommitMs = batch.firstCommitMs;
    this.inflight = this.sender!.send(batch.toSend()).then(() => {
      this.inflight = undefined;
      this.inflightFirstCommitMs = null;
      this.eventsTotal += BigInt(batch.events);
      eventsProduced.inc(this.labels, batch.events);
      this.ack(batch.confirmLsn);
      this.wake?.();
    }, (err) => {
      this.inflight = undefined;
      this.fail(new Error(`Kafka did not acknowledge a batch of ${batch.events} events: ${(err as Error).message}`));
    });
  }

  /** Confirms `lsn` to Postgres: everything before it is in Kafka. */
  private ack(lsn: bigint): void {
    if (lsn <= this.acked) return;
    this.acked = lsn;
    this.session?.confirm(lsn);
  }

  private onData(chunk: Buffer): void {
    this.inbox.push(chunk);
    if (!this.paused && this.inbox.length - this.inboxHead > INBOX_HIGH) {
      this.paused = true;
      this.session?.pause();
    }
    this.wake?.();
  }

  private async loop(): Promise<void> {
    let lastHeartbeat = Date.now();
    let lastStatus = 0;
    while (!this.stopping && !this.failure) {
      const now = Date.now();
      if (now - lastStatus >= 1_000) {
        lastStatus = now;
        this.onMonitor(() => this.measure(), 'could not measure the slot lag');
      }
      if (this.inboxHead === this.inbox.length) {
        if (!this.inflight && (!this.batch.empty || this.batch.confirmLsn > this.acked)) this.send();
        if (now - lastHeartbeat >= this.settings.heartbeatMs && !this.inflight && this.batch.empty && !this.tx) {
          lastHeartbeat = now;
          // Goes through the stream like any change: once it arrives, everything before it is acknowledged, so the slot moves on an idle database.
          this.onMonitor(() => this.monitor!.query(`SELECT pg_logical_emit_message(false, '${HEARTBEAT_PREFIX}', '')`), 'CDC heartbeat failed');
        }
        await new Promise<void>((resolve) => {
          this.wake = resolve;
          setTimeout(resolve, 200);
        });
        this.wake = undefined;
        continue;
      }
      const chunk = this.inbox[this.inboxHead++];
      if (this.inboxHead > 10_000 && this.inboxHead * 2 > this.inbox.length) {
        this.inbox = this.inbox.slice(this.inboxHead);
        this.inboxHead = 0;
      }
      if (this.paused && this.inbox.length - this.inboxHead < INBOX_LOW) {
        this.paused = false;
        this.session?.resume();
      }
      const pending = this.handle(chunk);
      if (pending) await pending;
      // A batch goes when everything received so far is in it (above, once the inbox is empty) or when it is full:
      // while a send is in flight the next batch gathers, so batches grow with the load and latency stays low.
      if (this.batch.events >= this.settings.maxBatchEvents || this.batch.bytes >= MAX_BATCH_BYTES) await this.sendWhenFull();
    }
    if (this.failure) return;
    // Stopping: what is in flight gets acknowledged and confirmed; the rest is resent after a restart.
    await this.inflight?.catch(() => undefined);
  }

  /** One CopyData message; returns a promise only when it needs I/O (a new relation). */
  private handle(chunk: Buffer): Promise<void> | void {
    let msg: PgOutputMessage;
    let lsn: bigint;
    try {
      const copy = decodeCopyData(chunk);
      if (copy.kind === 'keepalive') {
        if (this.received === null || copy.walEnd > this.received) this.received = copy.walEnd;
        if (copy.replyRequested) this.session?.confirm(this.acked);
        return;
      }
      lsn = copy.walStart;
      if (this.received === null || copy.walEnd > this.received) this.received = copy.walEnd;
      msg = decodePgOutput(copy.data, copy.walStart);
    } catch (err) {
      this.log.error({ err, bytes: chunk.subarray(0, 64).toString('hex') }, 'malformed replication message; the slot stays where Kafka has acknowledged');
      this.fail(err as Error);
      return;
    }
    try {
      return this.apply(msg, lsn);
    } catch (err) {
      this.fail(err instanceof ProtocolError ? err : new ProtocolError((err as Error).message, { lsn, messageType: msg.tag }));
    }
  }

  private apply(msg: PgOutputMessage, lsn: bigint): Promise<void> | void {
    switch (msg.tag) {
      case 'begin': {
        this.tx = { xid: msg.xid, finalLsn: msg.finalLsn, commitTimeMs: msg.commitTimeMs, position: 0, perTopic: new Map(), id: `${msg.xid}:${msg.finalLsn}` };
        this.batch.firstCommitMs ??= msg.commitTimeMs;
        return;
      }
      case 'commit': {
        const tx = this.requireTx(msg.tag, lsn);
        if (this.settings.transactionEvents && tx.position > 0) this.transactionEvent('END');
        this.batch.confirmLsn = msg.endLsn;
        this.tx = undefined;
        return;
      }
      case 'relation': return this.defineRelation(msg);
      case 'type': this.catalog!.forgetType(msg.typeOid); return;
      case 'origin': return;
      case 'message': {
        if (!msg.transactional && msg.prefix === HEARTBEAT_PREFIX && !this.tx) this.batch.confirmLsn = msg.lsn;
        return;
      }
      case 'insert': {
        const rel = this.relation(msg.relationId, lsn);
        if (rel) this.change(rel, OPS.create, null, msg.after, lsn);
        return;
      }
      case 'update': {
        const rel = this.relation(msg.relationId, lsn);
        if (!rel) return;
        const e = rel.encoder;
        if (msg.before && (msg.beforeIsKeyOnly || e.keyText(msg.before) !== e.keyText(msg.after))) {
          // The key changed: Debezium's way, a delete of the old key then a create of the new one.
          this.change(rel, OPS.delete, msg.before, null, lsn);
          this.change(rel, OPS.create, null, msg.after, lsn, msg.before);
        } else {
          this.change(rel, OPS.update, msg.before, msg.after, lsn);
        }
        return;
      }
      case 'delete': {
        const rel = this.relation(msg.relationId, lsn);
        if (rel) this.change(rel, OPS.delete, msg.before, null, lsn);
        return;
      }
      case 'truncate': {
        const tx = this.requireTx(msg.tag, lsn);
        for (const id of msg.relationIds) {
          const rel = this.relation(id, lsn);
          if (!rel) continue;
          const position = tx.position++;
          this.count(tx, rel.encoder.topic);
          this.truncateEvent(rel.encoder, this.source(rel.encoder.description, {
            ts: BigInt(tx.commitTimeMs), snapshot: 'false', txId: BigInt(tx.xid), lsn, commitLsn: tx.finalLsn, position,
          }), (partition) => this.resent?.hasIn(rel.encoder.topic, partition, tx.finalLsn, position) ?? false);
        }
        return;
      }
    }
  }

  private requireTx(tag: string, lsn: bigint): OpenTx {
    if (!this.tx) throw new ProtocolError(`${tag} outside a transaction`, { lsn, messageType: tag });
    return this.tx;
  }

  private relation(id: number, lsn: bigint): Relation | undefined {
    if (this.skipped.has(id)) return undefined;
    const rel = this.relations.get(id);
    if (!rel) throw new ProtocolError(`change for relation ${id} before its Relation message`, { lsn });
    return rel;
  }

  /** Counts an event of the transaction; its first event is preceded by the BEGIN event (empty transactions get none). */
  private count(tx: OpenTx, topic: string): void {
    if (this.settings.transactionEvents && tx.perTopic.size === 0) this.transactionEvent('BEGIN');
    tx.perTopic.set(topic, (tx.perTopic.get(topic) ?? 0) + 1);
  }

  private change(rel: Relation, op: Op, before: TupleValue[] | null, after: TupleValue[] | null, lsn: bigint, previous?: TupleValue[] | null): void {
    const tx = this.requireTx(op, lsn);
    const e = rel.encoder;
    const beforeRow = before ? e.row(before).row : null;
    const afterImage = after ? e.row(after, previous ?? (rel.full ? before : null)) : null;
    const keyTuple = (after ?? before)!;
    const key = e.encodeKey(keyTuple);
    const position = tx.position++;
    if (this.resent?.has(e.topic, this.partitions.get(e.topic) ?? 1, key, tx.finalLsn, position)) {
      resendsDropped.inc(this.labels);
      return;
    }
    this.count(tx, e.topic);
    const source = this.source(e.description, { ts: BigInt(tx.commitTimeMs), snapshot: 'false', txId: BigInt(tx.xid), lsn, commitLsn: tx.finalLsn, position });
    const transaction = this.settings.transactionEvents
      ? { id: tx.id, total_order: BigInt(position + 1), data_collection_order: BigInt(tx.perTopic.get(e.topic)!) }
      : null;
    this.batch.add(e.topic, key, e.encodeValue(this.envelope(beforeRow, afterImage?.row ?? null, source, op, afterImage?.unavailable ?? [], transaction)));
    if (op === OPS.delete && this.settings.tombstones && key) this.batch.add(e.topic, key, null);
  }

  private source(d: TableDescription, f: { ts: bigint; snapshot: string; txId: bigint | null; lsn: bigint | null; commitLsn: bigint; position: number }): Row {
    return {
      version: CDC_FORMAT_VERSION, connector: CONNECTOR, name: this.settings.topicPrefix, ts_ms: f.ts, snapshot: f.snapshot,
      db: this.settings.database, shard: this.settings.shard, schema: d.schema, table: d.table, instance: this.settings.instanceId,
      txId: f.txId, lsn: f.lsn, commit_lsn: f.commitLsn, position: BigInt(f.position), epoch: this.epoch,
    };
  }

  private envelope(before: Row | null, after: Row | null, source: Row, op: Op, unavailable: string[], transaction: Row | null = null): Row {
    return { before, after, source, op, ts_ms: BigInt(Date.now()), transaction, unavailable };
  }

  /** A truncate event goes to every partition (but those that hold it already): it must follow every earlier row event, whatever its key. */
  private truncateEvent(e: TableEncoder, source: Row, delivered: (partition: number) => boolean = () => false): void {
    const value = e.encodeValue(this.envelope(null, null, source, OPS.truncate, []));
    const n = this.partitions.get(e.topic) ?? 1;
    for (let p = 0; p < n; p++) {
      if (delivered(p)) resendsDropped.inc(this.labels);
      else this.batch.add(e.topic, null, value, p);
    }
  }

  private async defineRelation(msg: Extract<PgOutputMessage, { tag: 'relation' }>): Promise<void> {
    if (INTERNAL_SCHEMAS.has(msg.schema)) {
      this.skipped.add(msg.relationId);
      return;
    }
    this.skipped.delete(msg.relationId);
    const types: PgType[] = [];
    for (const c of msg.columns) types.push(await this.catalog!.type(c.typeOid));
    // pgoutput flags every column as key under REPLICA IDENTITY FULL; the event key stays the primary key.
    const pk = msg.replicaIdentity === 'f' ? await this.catalog!.primaryKey(msg.schema, msg.table).catch(() => []) : null;
    const description: TableDescription = {
      schema: msg.schema, table: msg.table,
      columns: msg.columns.map((c, i) => ({ name: c.name, type: types[i], typmod: c.typmod, key: pk ? pk.includes(c.name) : c.key })),
    };
    this.relations.set(msg.relationId, { encoder: await this.encoderFor(description), full: msg.replicaIdentity === 'f' });
  }

  /** One encoder per distinct table shape: its topic exists and its schemas are registered before any event uses it. */
  private encoderFor(d: TableDescription): Promise<TableEncoder> {
    const id = JSON.stringify(d);
    let e = this.encoders.get(id);
    if (!e) {
      e = (async () => {
        const encoder = await TableEncoder.create(d, this.naming, this.settings.numeric, this.eventLog.registry);
        if (!this.partitions.has(encoder.topic)) {
          this.partitions.set(encoder.topic, await this.eventLog.ensureTopic(encoder.topic, {
            partitions: this.settings.partitions, cleanupPolicy: 'delete', retentionMs: this.settings.retentionMs,
          }));
        }
        return encoder;
      })();
      e.catch(() => this.encoders.delete(id));
      this.encoders.set(id, e);
    }
    return e;
  }

  /** Registers the transaction topic's schemas (at start, so events need no I/O). */
  private async prepareTransactionEvents(): Promise<void> {
    if (!this.settings.transactionEvents || this.txEncoder) return;
    {
      const topic = transactionTopic(this.naming);
      const [keyId, valueId] = await Promise.all([
        this.eventLog.registry.register(keySubject(topic), JSON.stringify(TRANSACTION_KEY_SCHEMA)),
        this.eventLog.registry.register(valueSubjectOf(topic), JSON.stringify(TRANSACTION_VALUE_SCHEMA)),
        this.eventLog.ensureTopic(topic, { partitions: 1, cleanupPolicy: 'delete', retentionMs: this.settings.retentionMs }),
      ]);
      const keyType = parseAvro(JSON.stringify(TRANSACTION_KEY_SCHEMA));
      const valueType = parseAvro(JSON.stringify(TRANSACTION_VALUE_SCHEMA));
      const header = (id: number) => Buffer.from([0, (id >>> 24) & 255, (id >>> 16) & 255, (id >>> 8) & 255, id & 255]);
      this.txEncoder = {
        topic,
        key: (id) => Buffer.concat([header(keyId), keyType.toBuffer({ id })]),
        value: (v) => Buffer.concat([header(valueId), valueType.toBuffer(v)]),
      };
    }
  }

  private transactionEvent(status: 'BEGIN' | 'END'): void {
    const tx = this.tx!;
    const end = status === 'END';
    const value = {
      status, id: tx.id, event_count: end ? BigInt(tx.position) : null,
      data_collections: end ? [...tx.perTopic].map(([topic, n]) => ({ data_collection: topic, event_count: BigInt(n) })) : null,
      ts_ms: BigInt(tx.commitTimeMs),
    };
    this.batch.add(this.txEncoder!.topic, this.txEncoder!.key(tx.id), this.txEncoder!.value(value));
  }

  /** Runs a query task on the monitor session after the previous one (pg sessions take one query at a time). */
  private onMonitor(task: () => Promise<unknown>, failure: string): void {
    this.monitorTask = this.monitorTask.then(task).catch((err) => {
      if (!this.stopping) this.log.warn({ err }, failure);
    });
  }

  /**
   * The lag check of a stream that is not running (stopped, or failing and
   * retrying): its slot still holds WAL back, so the alert must still fire.
   */
  async measureIdle(): Promise<void> {
    const s = this.settings;
    const client = sqlClient({ host: s.host, port: s.port, database: s.database, applicationName: `mg-cdc-watch-${s.instanceId}`.slice(0, 63) });
    client.on('error', () => undefined);
    await client.connect();
    try {
      await this.measure(client);
    } finally {
      await client.end().catch(() => undefined);
    }
  }

  /** Slot lag from Postgres's own view of the slot, the event rate, and the lag alert. */
  private async measure(client = this.monitor!): Promise<void> {
    const now = Date.now();
    const dt = (now - this.rate.at) / 1000;
    if (dt > 0) this.rate = { at: now, events: this.eventsTotal, perSecond: Number(this.eventsTotal - this.rate.events) / dt };
    const { rows } = await client.query<{ lag: string | null }>(
      'SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint::text AS lag FROM pg_replication_slots WHERE slot_name = $1', [this.slot]);
    this.slotLagBytes = rows[0]?.lag == null ? null : BigInt(rows[0].lag);
    const st = this.status();
    lagBytesGauge.set(this.labels, Number(this.slotLagBytes ?? 0));
    lagSecondsGauge.set(this.labels, st.slotLagSeconds ?? 0);
    const over = this.slotLagBytes !== null && this.slotLagBytes > BigInt(this.settings.maxSlotLagBytes);
    const alert = over ? `slot ${this.slot} lags ${this.slotLagBytes} bytes, more than maxSlotLagBytes ${this.settings.maxSlotLagBytes}: WAL is piling up on the primary` : null;
    if (alert && !this.alert) this.log.error({ slot: this.slot, lagBytes: this.slotLagBytes?.toString() }, alert);
    if (!alert && this.alert) this.log.info({ slot: this.slot }, 'CDC slot lag back under its limit');
    this.alert = alert;
    lagAlert.set(this.labels, over ? 1 : 0);
  }
}
