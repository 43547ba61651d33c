/**
 * `mg backup create|list|verify|check|expire|restore`: backups through the
 * orchestrators' REST API, which has the right agent run pgBackRest; a
 * restore runs here, into a new data directory started as a new instance.
 */
import path from 'node:path';
import { backupConfigOf, eventLogFor } from '../cluster.ts';
import type { Logger } from '../../common/log.ts';
import { PgBackRest } from '../../ingest/backup/pgbackrest.ts';
import { PostgresInstance } from '../../ingest/postgres/instance.ts';
import { formatLsn } from '../../ingest/postgres/lsn.ts';
import { stanzaOf, type BackupEvent } from '../../schemas/index.ts';
import { callOrchestrator, orchestratorStatus } from '../orchestrators.ts';
import type { ClusterSpec } from '../spec.ts';
import { fail } from './follow.ts';

export interface BackupOptions {
  type?: string;
  label?: string;
  time?: string;
  lsn?: string;
  toDir?: string;
  port?: string;
  wait: boolean;
}

const RESTORE_PROMOTE_TIMEOUT_MS = 30 * 60_000;

export class BackupUsageError extends Error {}

/** Runs one backup command for `target` (<db> or <db>/<shard>); returns the exit code. */
export async function runBackupCommand(spec: ClusterSpec, command: string, target: string, opts: BackupOptions, log: Logger): Promise<number> {
  const [database, shard] = target.split('/');
  if (command === 'restore') return restore(spec, database, shard, opts, log);
  const shards = shard ? [shard] : (await orchestratorStatus(spec)).shards.filter((s) => s.database === database).map((s) => s.shard);
  if (!shards.length) throw new BackupUsageError(`no database ${database}`);
  let code = 0;
  for (const s of shards) {
    const base = `/v1/backups/${encodeURIComponent(database)}/${encodeURIComponent(s)}`;
    if (command === 'create') code = Math.max(code, await create(spec, base, `${database}/${s}`, opts, log));
    else if (command === 'list') code = Math.max(code, await list(spec, base, `${database}/${s}`));
    else {
      const r = await callOrchestrator(spec, 'POST', `${base}/${command}`, command === 'expire' && opts.label ? { label: opts.label } : {});
      if (r.status !== 200) code = fail(r);
      else console.log(`${database}/${s}: ${command === 'check' ? 'ok: ' : ''}${r.body.report}`);
    }
  }
  return code;
}

async function create(spec: ClusterSpec, base: string, name: string, opts: BackupOptions, log: Logger): Promise<number> {
  // Events are read from before the request on, so the subscription (made only for a request that was accepted) misses none.
  const asked = new Date(Date.now() - 1_000);
  const r = await callOrchestrator(spec, 'POST', base, opts.type ? { type: opts.type } : {});
  if (r.status !== 202) return fail(r);
  console.log(`${name}: ${r.body.message} (instance ${r.body.instanceId})`);
  if (!opts.wait) return 0;
  console.log(`${name}: waiting for backup ${r.body.backupId} to complete (events on mg.backups.v1) ...`);
  const eventLog = eventLogFor(spec, 'mg-cli', log);
  try {
    let done!: (e: BackupEvent) => void;
    const outcome = new Promise<BackupEvent>((resolve) => (done = resolve));
    const sub = await eventLog.subscribe('backups', (ev) => {
      if (ev.backupId !== r.body.backupId) return;
      if (ev.state === 'COMPLETED' || ev.state === 'FAILED') done(ev);
      else if (ev.state === 'PROGRESS' && ev.sizeBytes) console.log(`  ${name}: ${mb(ev.doneBytes)} of ${mb(ev.sizeBytes)} copied`);
    }, { since: asked });
    const e = await outcome.finally(() => sub.stop());
    if (e.state === 'FAILED') {
      console.error(`mg: ${name}: backup failed: ${e.error}`);
      return 1;
    }
    console.log(`${name}: ${e.type.toLowerCase()} backup ${e.label} completed in ${Number(e.durationMs) / 1000} s: ` +
      `database ${mb(e.sizeBytes)}, repository +${mb(e.repoSizeBytes)}, WAL ${lsn(e.startLsn)} .. ${lsn(e.stopLsn)}${e.fromStandby ? ', from a replica' : ''}`);
    return 0;
  } finally {
    await eventLog.close();
  }
}

async function list(spec: ClusterSpec, base: string, name: string): Promise<number> {
  const r = await callOrchestrator(spec, 'GET', base);
  if (r.status !== 200) return fail(r);
  const info = r.body as { stanza: string | null; status?: string; archiveMin?: string; archiveMax?: string; backups: Array<{ label: string; type: string; startedAt: string; stoppedAt: string; startLsn: string; stopLsn: string; sizeBytes: number; repoDeltaBytes: number }> };
  console.log(`${name}  stanza ${info.stanza ?? '-'}  ${info.status ?? 'no backups yet'}  WAL archive ${info.archiveMin ?? '-'} .. ${info.archiveMax ?? '-'}`);
  for (const b of info.backups) {
    console.log(`  ${b.label.padEnd(34)} ${b.type.padEnd(5)} ${b.startedAt} .. ${b.stoppedAt}  LSN ${b.startLsn} .. ${b.stopLsn}  size ${mb(b.sizeBytes)}  repo +${mb(b.repoDeltaBytes)}`);
  }
  return 0;
}

/**
 * Restores the shard into a new, empty data directory and starts it on its own
 * port as a new primary (not part of the cluster): to a time, an LSN, or the
 * end of the archive. The shard's primary first archives its current WAL, so
 * a target of a moment ago is in the repository.
 */
async function restore(spec: ClusterSpec, database: string, shard: string | undefined, opts: BackupOptions, log: Logger): Promise<number> {
  if (!shard) throw new BackupUsageError('backup restore needs <db>/<shard>');
  if (!opts.toDir || !opts.port) throw new BackupUsageError('backup restore needs --to-dir <new data dir> and --port <port>');
  if (opts.time && opts.lsn) throw new BackupUsageError('give --time or --lsn, not both');
  const port = Number(opts.port);
  if (!Number.isInteger(port) || port < 1024 || port > 65535) throw new BackupUsageError(`--port must be 1024..65535, not ${opts.port}`);
  let target: Parameters<PgBackRest['restore']>[1] = { type: 'default' };
  if (opts.time) {
    const t = new Date(opts.time);
    if (Number.isNaN(t.getTime())) throw new BackupUsageError(`--time must be a date and time (ISO 8601, e.g. 2026-12-04T16:05:00Z), not ${opts.time}`);
    target = { type: 'time', value: t.toISOString().replace('T', ' ').replace('Z', '+00') };
  } else if (opts.lsn) {
    if (!/^[0-9A-Fa-f]{1,8}\/[0-9A-Fa-f]{1,8}$/.test(opts.lsn)) throw new BackupUsageError(`--lsn must look like 0/16B3748, not ${opts.lsn}`);
    target = { type: 'lsn', value: opts.lsn };
  }
  const name = `${database}/${shard}`;
  const checked = await callOrchestrator(spec, 'POST', `/v1/backups/${encodeURIComponent(database)}/${encodeURIComponent(shard)}/check`, {}).catch((err: Error) => ({ status: 0, body: { error: err.message } }));
  if (checked.status !== 200) console.log(`${name}: could not archive the primary's current WAL first (${checked.body.error}); restoring from what the archive holds`);

  const dataDir = path.resolve(opts.toDir);
  const pg = new PostgresInstance({ name: `restore-${stanzaOf(database, shard)}`, dataDir, port, binDir: spec.postgres.binDir, log });
  const started = Date.now();
  const pgbackrest = new PgBackRest(backupConfigOf(spec), stanzaOf(database, shard), { dataDir, port, socketDir: pg.runDir });
  pgbackrest.writeConfig();
  pg.prepareEmpty();
  console.log(`${name}: restoring ${target.type === 'default' ? 'to the end of the archive' : `to ${target.type} ${target.value}`} into ${dataDir} ...`);
  await pgbackrest.restore(dataDir, target);
  pg.writeConfig(); // node-local settings of the new instance; no archive_command, so the shard's stanza stays the shard's
  await pg.start(RESTORE_PROMOTE_TIMEOUT_MS / 1000);
  console.log(`${name}: replaying archived WAL ...`);
  await pg.watch('recovery to end and promote', 'SELECT pg_is_in_recovery() AS rec', [], (rows) => !rows[0].rec, RESTORE_PROMOTE_TIMEOUT_MS, 200);
  console.log(`${name}: restored in ${((Date.now() - started) / 1000).toFixed(1)} s; a new primary on port ${port}: psql -h 127.0.0.1 -p ${port} -U postgres ${database === 'postgres' ? '' : database}`.trimEnd());
  console.log(`  stop it with: ${path.join(spec.postgres.binDir, 'pg_ctl')} stop -D ${dataDir}`);
  return 0;
}

const mb = (n: bigint | number | null) => (n === null ? '-' : `${(Number(n) / 1024 / 1024).toFixed(1)} MB`);
const lsn = (n: bigint | null) => (n === null ? '-' : formatLsn(n));
