/**
 * Failover slots on Postgres 15, the way Patroni keeps them: a standby holds a
 * copy of the primary's logical slot and advances it to the primary's confirmed
 * position, so the instance promoted next resumes the change stream from that
 * slot instead of a new snapshot (decision 0052).
 *
 * Postgres 15 cannot create a logical slot on a standby, but it loads every slot
 * under pg_replslot/ at startup and can fast-forward (pg_replication_slot_advance)
 * a logical slot while in recovery. So the copy is the primary's slot file (and
 * the serialized snapshots from the slot's restart point on), installed while the
 * standby is stopped; hot_standby_feedback through the standby's physical slot
 * then holds the catalog rows the copy needs on the primary.
 *
 * A marker file beside the slot's state says which stream (epoch) the copy
 * belongs to and whether it is ready: advanced at least once after the primary's
 * physical slot for this standby reported a catalog_xmin no newer than the
 * copy's. The new primary resumes from the slot only with a ready marker of its
 * current epoch; the marker lives and dies with the slot's directory (Postgres
 * removes it with the slot; pg_basebackup and pg_rewind copy no slot contents).
 */
import fs from 'node:fs';
import path from 'node:path';
import type pg from 'pg';
import type { Logger } from '../../common/log.ts';
import { counter, gauge } from '../../common/metrics.ts';
import { formatLsn, parseLsn } from '../postgres/lsn.ts';
import { chownToPostgres } from '../postgres/instance.ts';
import { STATE_SCHEMA, withSqlClient } from './catalog.ts';

export const MARKER_FILE = 'mg-standby-copy.json';
/** A copy that cannot be decoded on this standby is replaced after this long (each copy restarts the standby). */
const COPY_AGAIN_AFTER_MS = 30_000;

export interface CopyMarker {
  epoch: string;
  /** The primary the slot was copied from. */
  from: string;
  ready: boolean;
}

export function markerPath(dataDir: string, slot: string): string {
  return path.join(dataDir, 'pg_replslot', slot, MARKER_FILE);
}

export function readMarker(dataDir: string, slot: string): CopyMarker | undefined {
  try {
    return JSON.parse(fs.readFileSync(markerPath(dataDir, slot), 'utf8')) as CopyMarker;
  } catch {
    return undefined;
  }
}

/** The slot is this primary's own from now on: a later demotion must not pass it off as a copy. */
export function removeMarker(dataDir: string, slot: string): void {
  fs.rmSync(markerPath(dataDir, slot), { force: true });
}

const copies = counter('mg_cdc_standby_slot_copies_total', 'Copies of the primary\'s CDC slot installed on this standby (each restarts the standby)', ['database', 'shard']);
const standbyLag = gauge('mg_cdc_standby_slot_lag_bytes', 'The primary\'s confirmed CDC position minus this standby\'s copy of the slot', ['database', 'shard']);
const standbyReady = gauge('mg_cdc_standby_slot_ready', '1 while this standby\'s copy of the CDC slot is ready to take the stream over', ['database', 'shard']);

export interface StandbySlotStatus {
  epoch: string;
  confirmedLsn: string | null;
  primaryConfirmedLsn: string | null;
  ready: boolean;
}

export interface StandbySlotOptions {
  database: string;
  shard: string;
  instanceId: string;
  host: string;
  port: number;
  dataDir: string;
  slot: string;
  /** This standby's physical slot on the primary, which carries its hot_standby_feedback. */
  physicalSlot: string;
  /** Stops Postgres, runs `install` on the stopped data directory, starts it again (one lifecycle operation of the agent). */
  whileStopped: (install: () => void) => Promise<void>;
}

interface PrimarySlot { confirmed: bigint; restart: bigint; state: Buffer; epoch: string; physicalCatalogXmin: string | null }

export class StandbySlotSync {
  private lastStatus: StandbySlotStatus | null = null;
  /** When a copy that could not be decoded here is replaced. */
  private copyAgainAt: number | undefined;
  private readonly labels: { database: string; shard: string };

  constructor(private readonly o: StandbySlotOptions, private readonly log: Logger) {
    this.labels = { database: o.database, shard: o.shard };
  }

  status(): StandbySlotStatus | null {
    return this.lastStatus;
  }

  /** One round: copy the primary's slot when this standby lacks a current copy, else advance the copy. */
  async sync(primary: { host: string; port: number; instanceId: string }): Promise<void> {
    const local = await this.withLocal(async (sql) => (await sql.query<{ recovery: string; confirmed: string | null; catalog_xmin: string | null; replay: string | null }>(
      `SELECT pg_is_in_recovery()::text AS recovery, pg_last_wal_replay_lsn()::text AS replay,
              (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1) AS confirmed,
              (SELECT catalog_xmin::text FROM pg_replication_slots WHERE slot_name = $1) AS catalog_xmin`, [this.o.slot])).rows[0]);
    if (local.recovery !== 'true') return; // not a standby (yet): an old primary before its demotion
    const remote = await this.readPrimary(primary);
    if (!remote) {
      // No stream on the primary (never started, or dropped): a copy would only hold WAL back here.
      if (local.confirmed) await this.withLocal((sql) => sql.query('SELECT pg_drop_replication_slot($1)', [this.o.slot]));
      this.lastStatus = null;
      standbyReady.set(this.labels, 0);
      return;
    }
    const marker = readMarker(this.o.dataDir, this.o.slot);
    // A copy ahead of the primary's slot is kept: the primary confirmed that position once (a crash-restart of the primary
    // loses the confirmations it had not written to disk yet, and its stream resends from the older one).
    const why = !local.confirmed ? 'no copy yet'
      : !marker || marker.epoch !== remote.epoch ? 'its copy belongs to another stream'
        : this.copyAgainAt !== undefined && Date.now() >= this.copyAgainAt ? 'its copy could not be decoded here' : null;
    if (why) {
      await this.copy(primary, remote, why);
      return;
    }
    const confirmed = parseLsn(local.confirmed!);
    const replay = local.replay ? parseLsn(local.replay) : confirmed;
    const target = remote.confirmed < replay ? remote.confirmed : replay;
    let now = confirmed;
    // Advancing decodes the WAL from the copy's restart point: until one has succeeded, the copy is not known to be usable here.
    let decoded = false;
    if (target > confirmed || (!marker!.ready && replay >= confirmed)) {
      try {
        now = await this.withLocal(async (sql) => parseLsn((await sql.query<{ lsn: string }>(
          'SELECT end_lsn::text AS lsn FROM pg_replication_slot_advance($1, $2::pg_lsn)', [this.o.slot, formatLsn(target > confirmed ? target : confirmed)])).rows[0].lsn));
        decoded = true;
      } catch (err) {
        // A copy that decoded here once keeps its WAL (the slot retains it): only a copy not yet ready can be unusable, typically
        // when its restart point is older than this standby's own WAL (a standby cloned after it). The primary's restart point
        // moves on, so it is copied again later. A session ended by a shutdown (a fence, a restart) says nothing about the copy.
        const code = (err as { code?: string }).code;
        if (!marker!.ready && code && !code.startsWith('57') && !code.startsWith('08')) this.copyAgainAt ??= Date.now() + COPY_AGAIN_AFTER_MS;
        throw new Error(`the copy of slot ${this.o.slot} was not advanced (${(err as Error).message})${this.copyAgainAt ? `; it is copied again within ${COPY_AGAIN_AFTER_MS / 1000} s` : ''}`);
      }
    }
    // Patroni's readiness test: the primary keeps the catalog rows this copy needs only once this standby's feedback reached it.
    const catalogXmin = local.catalog_xmin;
    const ready = marker!.ready || (decoded && catalogXmin !== null && remote.physicalCatalogXmin !== null
      && await this.withPrimary(primary, async (sql) => (await sql.query<{ ok: string }>(
        'SELECT (age($1::text::xid) >= age($2::text::xid))::text AS ok', [remote.physicalCatalogXmin, catalogXmin])).rows[0].ok === 'true'));
    if (ready && !marker!.ready) {
      this.writeMarker({ ...marker!, ready: true });
      this.log.info({ slot: this.o.slot, epoch: marker!.epoch, confirmed: formatLsn(now) }, 'the standby\'s copy of the CDC slot is ready to take the stream over');
    }
    standbyLag.set(this.labels, Number(remote.confirmed - now));
    standbyReady.set(this.labels, ready ? 1 : 0);
    this.lastStatus = { epoch: remote.epoch, confirmedLsn: formatLsn(now), primaryConfirmedLsn: formatLsn(remote.confirmed), ready };
  }

  /**
   * The primary's slot (only once its stream's snapshot completed: before that a new primary snapshots anyway).
   * Throws while the instance named primary is not one (in recovery: restarted fenced after a crash, or demoted).
   */
  private readPrimary(primary: { host: string; port: number }): Promise<PrimarySlot | undefined> {
    return this.withPrimary(primary, async (sql) => {
      if ((await sql.query<{ recovery: string }>('SELECT pg_is_in_recovery()::text AS recovery')).rows[0].recovery === 'true') {
        throw new Error('the instance named primary is in recovery: nothing to copy from until a primary is elected');
      }
      const stream = (await sql.query<{ epoch: string }>(
        `SELECT epoch::text FROM ${STATE_SCHEMA}.streams WHERE slot = $1 AND snapshot_done_at IS NOT NULL`, [this.o.slot]).catch((err) => {
        if ((err as { code?: string }).code === '42P01' || (err as { code?: string }).code === '3F000') return { rows: [] };
        throw err;
      })).rows[0];
      if (!stream) return undefined;
      const { rows } = await sql.query<{ confirmed: string; restart: string; state: string; physical: string | null }>(
        `SELECT s.confirmed_flush_lsn::text AS confirmed, s.restart_lsn::text AS restart,
                encode(pg_read_binary_file('pg_replslot/' || s.slot_name || '/state'), 'base64') AS state,
                (SELECT catalog_xmin::text FROM pg_replication_slots WHERE slot_name = $2) AS physical
         FROM pg_replication_slots s WHERE s.slot_name = $1 AND s.slot_type = 'logical' AND s.confirmed_flush_lsn IS NOT NULL`,
        [this.o.slot, this.o.physicalSlot]);
      const r = rows[0];
      return r && { confirmed: parseLsn(r.confirmed), restart: parseLsn(r.restart), state: Buffer.from(r.state, 'base64'), epoch: stream.epoch, physicalCatalogXmin: r.physical };
    });
  }

  /**
   * Installs the primary's slot file and its serialized snapshots from the
   * restart point on (the files decoding from there would read on the primary),
   * with the standby stopped: Postgres loads slots only at startup.
   */
  private async copy(primary: { host: string; port: number; instanceId: string }, remote: PrimarySlot, why: string): Promise<void> {
    const snapshots = await this.withPrimary(primary, async (sql) => {
      const { rows } = await sql.query<{ name: string; data: string }>(
        `SELECT name, encode(pg_read_binary_file('pg_logical/snapshots/' || name), 'base64') AS data
         FROM pg_ls_dir('pg_logical/snapshots') AS name
         WHERE name ~ '^[0-9A-F]+-[0-9A-F]+\\.snap$' AND replace(replace(name, '.snap', ''), '-', '/')::pg_lsn >= $1::pg_lsn`,
        [formatLsn(remote.restart)]);
      return rows;
    });
    const started = Date.now();
    const dir = path.join(this.o.dataDir, 'pg_replslot', this.o.slot);
    await this.o.whileStopped(() => {
      fs.rmSync(dir, { recursive: true, force: true });
      // Postgres's own way: a temporary directory renamed into place, so a crash never leaves half a slot.
      const tmp = `${dir}.tmp`;
      fs.rmSync(tmp, { recursive: true, force: true });
      fs.mkdirSync(tmp, { mode: 0o700 });
      chownToPostgres(tmp);
      this.writeFile(path.join(tmp, 'state'), remote.state);
      this.writeFile(path.join(tmp, MARKER_FILE), JSON.stringify({ epoch: remote.epoch, from: primary.instanceId, ready: false } satisfies CopyMarker));
      fs.renameSync(tmp, dir);
      for (const s of snapshots) this.writeFile(path.join(this.o.dataDir, 'pg_logical', 'snapshots', s.name), Buffer.from(s.data, 'base64'));
    });
    this.copyAgainAt = undefined;
    copies.inc(this.labels);
    standbyReady.set(this.labels, 0);
    this.lastStatus = { epoch: remote.epoch, confirmedLsn: formatLsn(remote.confirmed), primaryConfirmedLsn: formatLsn(remote.confirmed), ready: false };
    this.log.info({ slot: this.o.slot, epoch: remote.epoch, from: primary.instanceId, confirmed: formatLsn(remote.confirmed), snapshots: snapshots.length, ms: Date.now() - started, why },
      'copied the primary\'s CDC slot to this standby (restarted it)');
  }

  private writeMarker(marker: CopyMarker): void {
    const file = markerPath(this.o.dataDir, this.o.slot);
    this.writeFile(`${file}.tmp`, JSON.stringify(marker));
    fs.renameSync(`${file}.tmp`, file);
  }

  private writeFile(file: string, data: Buffer | string): void {
    const fd = fs.openSync(file, 'w', 0o600);
    try {
      fs.writeSync(fd, typeof data === 'string' ? Buffer.from(data) : data);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    chownToPostgres(file);
  }

  private withLocal<T>(work: (sql: pg.Client) => Promise<T>): Promise<T> {
    return withClient({ host: this.o.host, port: this.o.port, database: this.o.database }, work);
  }

  private withPrimary<T>(primary: { host: string; port: number }, work: (sql: pg.Client) => Promise<T>): Promise<T> {
    return withClient({ host: primary.host, port: primary.port, database: this.o.database }, work);
  }
}

async function withClient<T>(at: { host: string; port: number; database: string }, work: (sql: pg.Client) => Promise<T>): Promise<T> {
  return withSqlClient({ ...at, applicationName: 'mg-cdc-standby-slot' }, work);
}
