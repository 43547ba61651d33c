/**
 * `mg backup create|list|verify|check|expire|restore`: backups through the
 * orchestrators' REST API, which has the right agent run pgBackRest; a
 * restore into a new data directory or a new database runs here, one in
 * place is MultiOrch's operation, followed from here.
 */
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { backupConfigOf, eventLogFor, repositoryConfigOf } from '../cluster.ts';
import type { Logger } from '../../common/log.ts';
import { withConnection, type PostgresAddress } from '../../common/postgres.ts';
import { quoteIdent } from '../../ingest/cdc/catalog.ts';
import { PgBackRest, type StanzaInfo } from '../../ingest/backup/pgbackrest.ts';
import { restorePromoted } from '../../ingest/backup/pitr.ts';
import { PostgresInstance } from '../../ingest/postgres/instance.ts';
import { formatLsn } from '../../ingest/postgres/lsn.ts';
import { recoveryTargetOf, stanzaPartsOf, type BackupEvent, type RecoveryTarget } from '../../schemas/index.ts';
import { finishRestoredTransactions } from '../../orchestrator/in-doubt.ts';
import { callOrchestrator, orchestratorStatus } from '../orchestrators.ts';
import { shardRanges, shardsOfSpec, stanzaOfSpec, type ClusterSpec } from '../spec.ts';
import { addDatabase } from './database.ts';
import { fail, follow } from './follow.ts';

export interface BackupOptions {
  type?: string;
  label?: string;
  time?: string;
  lsn?: string;
  toDir?: string;
  port?: string;
  /** Restore every shard into a new database of the cluster of this name. */
  as?: string;
  /** Restore --to-dir from this stanza of the shard (an earlier system's, as `list` names them) instead of the shard's own. */
  stanza?: string;
  /** Restore the database (or the shard) itself, through MultiOrch (drain, restore, rejoin, elect). */
  inPlace?: boolean;
  wait: boolean;
}

export class BackupUsageError extends Error {}

/** Runs one backup command for `target` (<db> or <db>/<shard>); returns the exit code. */
export async function runBackupCommand(spec: ClusterSpec, command: string, target: string, opts: BackupOptions, log: Logger): Promise<number> {
  const [database, shard] = target.split('/');
  if (command === 'restore') {
    if (opts.stanza && (opts.as || opts.inPlace)) throw new BackupUsageError('--stanza picks what a restore --to-dir reads (an earlier system of the shard); --as and --in-place restore from the shard\'s own');
    if (opts.inPlace) return restoreInPlace(spec, database, shard, opts);
    return opts.as ? restoreAs(spec, database, shard, opts.as, opts, log) : restore(spec, database, shard, opts, log);
  }
  const shards = shard ? [shard] : (await orchestratorStatus(spec)).shards.filter((s) => s.database === database).map((s) => s.shard);
  if (command === 'list') return list(spec, database, shards, shard);
  if (!shards.length) throw new BackupUsageError(`no database ${database}`);
  let code = 0;
  for (const s of shards) {
    const base = `/v1/backups/${encodeURIComponent(database)}/${encodeURIComponent(s)}`;
    if (command === 'create') code = Math.max(code, await create(spec, base, `${database}/${s}`, opts, log));
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

type ListedStanza = { stanza: string | null; status?: string; archiveMin?: string | null; archiveMax?: string | null; backups: Array<{ label: string; type: string; startedAt: string; stoppedAt: string; startLsn: string; stopLsn: string; sizeBytes: number; repoDeltaBytes: number }> };

/**
 * Each shard's stanza as its primary's agent reads it, then the stanzas of earlier Postgres systems under the
 * same names (a database dropped and created again, a shard set defined again; decision 0064), read from the
 * repository here: also those of a database that no longer exists.
 */
async function list(spec: ClusterSpec, database: string, shards: string[], only: string | undefined): Promise<number> {
  let code = 0;
  const db = spec.databases.find((d) => d.name === database);
  const current = new Set(db ? shards.map((s) => stanzaOfSpec(db, s)) : []);
  for (const s of shards) {
    const r = await callOrchestrator(spec, 'GET', `/v1/backups/${encodeURIComponent(database)}/${encodeURIComponent(s)}`);
    if (r.status !== 200) {
      code = fail(r);
      continue;
    }
    const info = r.body as ListedStanza;
    printStanza(`${database}/${s}  stanza ${info.stanza ?? '-'}`, info);
    if (info.stanza) current.add(info.stanza);
  }
  const earlier = (await repositoryStanzas(spec, database)).filter((e) => !current.has(e.info.stanza) && (!only || e.shard === only));
  for (const { shard, info } of earlier) printStanza(`${database}/${shard}  earlier system: stanza ${info.stanza}`, JSON.parse(JSON.stringify(info)) as ListedStanza);
  if (!shards.length && !earlier.length) throw new BackupUsageError(`no database ${database}, and no backups of one in the repository`);
  return code;
}

function printStanza(title: string, info: ListedStanza): void {
  console.log(`${title}  ${info.status ?? 'no backups yet'}  WAL archive ${info.archiveMin ?? '-'} .. ${info.archiveMax ?? '-'}`);
  for (const b of info.backups) {
    console.log(`  ${b.label.padEnd(34)} ${b.type.padEnd(5)} ${b.startedAt} .. ${b.stoppedAt}  LSN ${b.startLsn} .. ${b.stopLsn}  size ${mb(b.sizeBytes)}  repo +${mb(b.repoDeltaBytes)}`);
  }
}

/** The repository's stanzas of `database`'s shards, current and earlier systems', by shard and generation. */
async function repositoryStanzas(spec: ClusterSpec, database: string): Promise<Array<{ shard: string; generation: number; info: StanzaInfo }>> {
  return (await PgBackRest.repository(backupConfigOf(spec), repositoryConfigOf(spec)))
    .flatMap((info) => {
      const parts = stanzaPartsOf(info.stanza, database);
      return parts ? [{ ...parts, info }] : [];
    })
    .sort((a, b) => a.shard.localeCompare(b.shard) || a.generation - b.generation);
}

/**
 * The stanza a restore of `database`/`shard` reads: `given` when it is one of that shard's (current or
 * earlier system), else the shard's own; a database no longer in the spec: its latest system's in the repository.
 */
async function stanzaToRestore(spec: ClusterSpec, database: string, shard: string, given: string | undefined): Promise<{ stanza: string; current: boolean }> {
  const db = spec.databases.find((d) => d.name === database);
  const own = db && shardsOfSpec(db).some((r) => r.shard === shard) ? stanzaOfSpec(db, shard) : undefined;
  if (given !== undefined) {
    if (stanzaPartsOf(given, database)?.shard !== shard) throw new BackupUsageError(`${given} is not a stanza of ${database}/${shard} (mg backup list ${database} names them)`);
    return { stanza: given, current: given === own };
  }
  if (own) return { stanza: own, current: true };
  const latest = (await repositoryStanzas(spec, database)).filter((e) => e.shard === shard).at(-1);
  if (!latest) throw new BackupUsageError(`no backups of ${database}/${shard} in the repository`);
  return { stanza: latest.info.stanza, current: false };
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
  const port = Number(opts.port);
  if (!Number.isInteger(port) || port < 1024 || port > 65535) throw new BackupUsageError(`--port must be 1024..65535, not ${opts.port}`);
  const target = usableTarget(opts);
  const name = `${database}/${shard}`;
  const { stanza, current } = await stanzaToRestore(spec, database, shard, opts.stanza);
  if (current) {
    const checked = await callOrchestrator(spec, 'POST', `/v1/backups/${encodeURIComponent(database)}/${encodeURIComponent(shard)}/check`, {}).catch((err: Error) => ({ status: 0, body: { error: err.message } }));
    if (checked.status !== 200) console.log(`${name}: could not archive the primary's current WAL first (${checked.body.error}); restoring from what the archive holds`);
  }

  const dataDir = path.resolve(opts.toDir);
  const pg = new PostgresInstance({ name: `restore-${stanza}`, dataDir, port, binDir: spec.postgres.binDir, log });
  const started = Date.now();
  const pgbackrest = new PgBackRest(backupConfigOf(spec), stanza, { dataDir, port, socketDir: pg.runDir });
  pgbackrest.writeConfig();
  console.log(`${name}: restoring stanza ${stanza}${current ? '' : ' (an earlier system of the shard)'} ${describeTarget(target)} into ${dataDir}, then replaying archived WAL ...`);
  // The new instance's node-local settings have no archive_command, so the shard's stanza stays the shard's.
  await restorePromoted(pgbackrest, pg, target);
  console.log(`${name}: restored in ${((Date.now() - started) / 1000).toFixed(1)} s; a new primary on port ${port}: psql -h 127.0.0.1 -p ${port} -U postgres ${database === 'postgres' ? '' : database}`.trimEnd());
  console.log(`  stop it with: ${path.join(spec.postgres.binDir, 'pg_ctl')} stop -D ${dataDir}`);
  return 0;
}

/**
 * Restores every shard of `database` to one point into a new database
 * `name` of the cluster, with the source's shape: its instances start, each
 * shard's first primary is the source shard restored (the agent does it at
 * the bootstrap), replicas clone from it, the gateways serve it. Cross-shard
 * transactions still prepared at that point are then finished as the
 * restored decision shards say, so the shards agree.
 */
async function restoreAs(spec: ClusterSpec, database: string, shard: string | undefined, name: string, opts: BackupOptions, log: Logger): Promise<number> {
  if (shard) throw new BackupUsageError('restore --as restores every shard of a database to one point: give <db>, not <db>/<shard>');
  if (opts.toDir || opts.port) throw new BackupUsageError('restore --as starts instances of the cluster: --to-dir and --port are for a restore outside it');
  if (!spec.backup.enabled) throw new BackupUsageError('backups are off in this cluster (backup.enabled: false)');
  const source = spec.databases.find((d) => d.name === database);
  if (!source) throw new BackupUsageError(`${database} is not a database with instances of its own (one created --on another is restored with its host)`);
  // Its own shards' stanzas end where a reshard moved its rows to another set (decision 0061).
  if (source.shardsRetired) throw new BackupUsageError(`${database}'s own ${source.shards} shard(s) were retired by a reshard: restore --as of a resharded database is not built yet (mg backup restore ${database}/<shard> --to-dir <dir> --port <port> restores one shard of either set)`);
  const target = usableTarget(opts);
  const started = Date.now();
  const elapsed = () => `${((Date.now() - started) / 1000).toFixed(1).padStart(5)} s`;

  for (const { shard: s } of shardRanges(source.shards)) {
    const checked = await callOrchestrator(spec, 'POST', `/v1/backups/${encodeURIComponent(database)}/${encodeURIComponent(s)}/check`, {})
      .catch((err: Error) => ({ status: 0, body: { error: err.message } }));
    console.log(`${elapsed()}  ${database}/${s}: ${checked.status === 200 ? 'current WAL archived' : `could not archive the current WAL (${checked.body.error}); restoring from what the archive holds`}`);
  }
  console.log(`${elapsed()}  starting ${name} (${source.shards} shard(s) x ${source.instancesPerShard} instances); each shard's first primary is ${database}'s restored ${describeTarget(target)}`);
  const code = await addDatabase(spec, {
    name, shards: source.shards, sharded: source.sharded, transactionMode: source.transactionMode,
    instancesPerShard: source.instancesPerShard, ...(source.durability ? { durability: source.durability } : {}),
    restoredFrom: { database, ...(target.type === 'time' ? { time: new Date(opts.time!).toISOString() } : {}), ...(target.type === 'lsn' ? { lsn: target.value } : {}) },
  }, log);
  if (code !== 0) return code;

  if (source.sharded) {
    const held = await callOrchestrator(spec, 'GET', `/v1/databases/${encodeURIComponent(database)}/vschema`);
    if (held.status === 200) {
      const applied = await callOrchestrator(spec, 'PUT', `/v1/databases/${encodeURIComponent(name)}/vschema`, held.body.vschema);
      if (applied.status !== 200) throw new Error(`could not apply ${database}'s VSchema to ${name}: ${applied.body.error}`);
      console.log(`${elapsed()}  ${name}: ${database}'s VSchema (version ${held.body.version}) applied`);
    }
  }
  const shards = (await orchestratorStatus(spec)).shards.filter((s) => s.database === name);
  const primaries = new Map(shards.map((s) => [s.shard, { host: '127.0.0.1', port: s.instances.find((i) => i.instanceId === s.primary)!.port }]));
  // The restored rows are in Postgres database `database` until renamed; a rename waits for its prepared transactions to end.
  const { committed, rolledBack } = await finishRestoredTransactions(database, primaries);
  console.log(`${elapsed()}  ${name}: cross-shard transactions prepared at the target: ${committed} committed, ${rolledBack} rolled back (as the restored decisions say)`);
  for (const at of primaries.values()) await renameDatabase(at, database, name);
  console.log(`${elapsed()}  ${name}: restored from ${database} and served by the gateways`);
  return 0;
}

/**
 * Restores the database (every shard to one time) or one shard in place: an
 * operation of MultiOrch (`POST /v1/backups/{db}[/{shard}]/restore`), whose
 * steps are printed as they happen. Clients of the database wait meanwhile,
 * then get 57P03, until it serves again.
 */
async function restoreInPlace(spec: ClusterSpec, database: string, shard: string | undefined, opts: BackupOptions): Promise<number> {
  if (opts.as || opts.toDir || opts.port) throw new BackupUsageError('restore --in-place rewrites the database itself: --as, --to-dir and --port are for a restore into a copy');
  if (!opts.time && !opts.lsn) throw new BackupUsageError('restore --in-place needs --time or --lsn');
  usableTarget(opts); // a malformed flag is named here rather than as a field of the request
  const route = `/v1/backups/${encodeURIComponent(database)}${shard ? `/${encodeURIComponent(shard)}` : ''}/restore`;
  const r = await callOrchestrator(spec, 'POST', route, { inPlace: true, ...(opts.time ? { time: new Date(opts.time).toISOString() } : {}), ...(opts.lsn ? { lsn: opts.lsn } : {}) });
  if (r.status !== 202) return fail(r);
  console.log(`${shard ? `${database}/${shard}` : database}: restoring in place to ${opts.time ? `time ${new Date(opts.time).toISOString()}` : `LSN ${opts.lsn}`} (operation ${r.body.operation.id})`);
  return follow(spec, r.body.operation.id);
}

/**
 * Renames Postgres database `from` to `to` on the primary at `at` (its
 * replicas follow); a new `postgres` replaces one renamed away. A rename
 * needs the database free of sessions: they are ended, and it retries while
 * one comes back.
 */
async function renameDatabase(at: PostgresAddress, from: string, to: string): Promise<void> {
  await withConnection({ ...at, database: 'template1' }, async (c) => {
    for (let attempt = 1; ; attempt++) {
      await c.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()', [from]);
      try {
        await c.query(`ALTER DATABASE ${quoteIdent(from)} RENAME TO ${quoteIdent(to)}`);
        break;
      } catch (err) {
        if ((err as { code?: string }).code !== OBJECT_IN_USE || attempt === 50) throw err;
        await sleep(100);
      }
    }
    if (from === 'postgres') await c.query('CREATE DATABASE postgres');
  }, 60_000);
}

const OBJECT_IN_USE = '55006';
const describeTarget = (t: RecoveryTarget) => (t.type === 'default' ? 'to the end of the archive' : `to ${t.type} ${t.value}`);

function usableTarget(opts: BackupOptions): RecoveryTarget {
  try {
    return recoveryTargetOf(opts);
  } catch (err) {
    throw new BackupUsageError((err as Error).message);
  }
}

const mb = (n: bigint | number | null) => (n === null ? '-' : `${(Number(n) / 1024 / 1024).toFixed(1)} MB`);
const lsn = (n: bigint | null) => (n === null ? '-' : formatLsn(n));
