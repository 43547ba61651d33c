/**
 * Backup benchmark (`npm run bench:backup`), one run on one machine, on a
 * pgbench database (scale MG_BENCH_SCALE, default 70, about 1 GB):
 *  1. a full pgBackRest backup (lz4, 2 processes, as the cluster's default),
 *     then an incremental one after 15 s of pgbench load, vs pg_basebackup
 *     (plain format, WAL streamed): time and size;
 *  2. restore: pgBackRest restore into an empty directory plus recovery until
 *     the instance serves as a primary, vs starting pg_basebackup's copy;
 *  3. a new replica until it streams and has replayed what the primary had
 *     when it was asked for: restored from the backup plus archived WAL (what
 *     the agent does) vs cloned with pg_basebackup (the fallback).
 * Prints a Markdown table. Ports MG_BENCH_PORT_BASE (default 27400) to +3, in a temporary directory.
 */
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createLogger } from '../common/log.ts';
import { queryAt } from '../common/postgres.ts';
import { PgBackRest } from '../ingest/backup/pgbackrest.ts';
import { backupConfigSchema } from '../ingest/config.ts';
import { PostgresInstance, runAsPostgres } from '../ingest/postgres/instance.ts';

const BIN = '/usr/lib/postgresql/15/bin';
const SCALE = Number(process.env.MG_BENCH_SCALE ?? 70);
const BASE = Number(process.env.MG_BENCH_PORT_BASE ?? 27400);
const STANZA = 'bench-0';
const LOAD_SECONDS = 15;

const log = createLogger('bench-backup');
log.level = process.env.MG_LOG_LEVEL ?? 'warn';
const work = fs.mkdtempSync(path.join(process.env.MG_BENCH_DIR ?? os.tmpdir(), 'mg-bench-backup-'));
fs.chmodSync(work, 0o755);
const backupCfg = backupConfigSchema.parse({
  repoPath: path.join(work, 'backups'), lockPath: path.join(work, 'run', 'pgbackrest'), logPath: path.join(work, 'logs', 'pgbackrest'),
});

const instance = (name: string, port: number, settings: Record<string, string> = {}) =>
  new PostgresInstance({ name, dataDir: path.join(work, 'postgres', name), port, binDir: BIN, log, settings });
const pgbackrestOf = (pg: PostgresInstance) => new PgBackRest(backupCfg, STANZA, { dataDir: pg.dataDir, port: pg.port, socketDir: pg.runDir });
const duBytes = (dir: string) => Number(execFileSync('du', ['-sb', dir], { encoding: 'utf8' }).split('\t')[0]);
const gb = (n: number) => `${(n / 1024 ** 3).toFixed(2)} GB`;
const secs = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

async function timed(what: string, fn: () => Promise<unknown>): Promise<number> {
  const t = Date.now();
  await fn();
  const ms = Date.now() - t;
  console.error(`  ${what}: ${secs(ms)}`);
  return ms;
}

function pgbench(args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(path.join(BIN, 'pgbench'), ['-h', '127.0.0.1', '-p', String(BASE), '-U', 'postgres', ...args, 'postgres'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d));
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`pgbench ${args.join(' ')}: ${err.slice(-500)}`))));
  });
}

/** A replica is serving once it streams from the primary and has replayed what the primary had when it was asked for. */
async function replicaServes(replica: PostgresInstance, primaryLsn: string): Promise<void> {
  await replica.watch('the replica to stream and catch up', `SELECT 1 FROM pg_stat_wal_receiver
    WHERE status = 'streaming' AND pg_last_wal_replay_lsn() >= $1::pg_lsn`, [primaryLsn], (rows) => rows.length > 0, 30 * 60_000, 100);
}

async function main(): Promise<void> {
  const started: PostgresInstance[] = [];
  try {
    console.error(`bench:backup: pgbench scale ${SCALE} in ${work}`);
    const primary = instance('primary', BASE, PgBackRest.archiveSettingsFor(STANZA, path.join(work, 'postgres', 'primary')));
    const repo = pgbackrestOf(primary);
    repo.writeConfig();
    await primary.initPrimary();
    await primary.start();
    started.push(primary);
    await repo.stanzaCreate();
    await timed(`pgbench -i -s ${SCALE}`, () => pgbench(['-i', '-q', '-s', String(SCALE)]));
    await queryAt(primary, 'CHECKPOINT', [], 600_000);
    const [{ size }] = await queryAt<{ size: string }>(primary, 'SELECT pg_database_size(current_database())::text AS size');

    const fullMs = await timed('pgBackRest full backup', () => repo.backup('full'));
    const fullRepo = duBytes(path.join(backupCfg.repoPath, 'backup'));
    await timed(`pgbench load, ${LOAD_SECONDS} s`, () => pgbench(['-T', String(LOAD_SECONDS), '-c', '4', '-j', '2']));
    const incrMs = await timed('pgBackRest incremental backup', () => repo.backup('incr'));
    const incrRepo = duBytes(path.join(backupCfg.repoPath, 'backup')) - fullRepo;

    const copy = instance('basebackup', BASE + 1);
    const copyDir = copy.dataDir;
    copy.prepareEmpty();
    const baseMs = await timed('pg_basebackup', () => runAsPostgres(path.join(BIN, 'pg_basebackup'),
      ['-h', '127.0.0.1', '-p', String(BASE), '-U', 'postgres', '-w', '-D', copyDir, '-X', 'stream', '-c', 'fast'], { cwd: work }));
    const baseSize = duBytes(copyDir);

    // Restore: into an empty directory, replayed to the end of the archive, serving as a primary.
    const restored = instance('restored', BASE + 1);
    const restoreMs = await timed('pgBackRest restore until serving', async () => {
      restored.prepareEmpty();
      const r = pgbackrestOf(restored);
      r.writeConfig();
      await r.restore(restored.dataDir, { type: 'default' });
      restored.writeConfig();
      await restored.start(3600);
      started.push(restored);
      await restored.watch('promotion', 'SELECT pg_is_in_recovery() AS rec', [], (rows) => !rows[0].rec, 30 * 60_000, 100);
    });
    await restored.stop();
    fs.rmSync(restored.dataDir, { recursive: true, force: true });
    const copyStartMs = await timed('start of the pg_basebackup copy until serving', async () => {
      copy.writeConfig();
      await copy.start(3600);
      started.push(copy);
    });
    await copy.stop();

    // New replicas, as the agent makes them.
    const [{ lsn: lsn1 }] = await queryAt<{ lsn: string }>(primary, 'SELECT pg_current_wal_lsn()::text AS lsn');
    const fromBackup = instance('replica-backup', BASE + 2);
    const replicaBackupMs = await timed('replica from the backup until streaming and caught up', async () => {
      const r = pgbackrestOf(fromBackup);
      r.writeConfig();
      await fromBackup.initReplica(primary, async () => {
        await r.restore(fromBackup.dataDir, { type: 'standby' });
        return true;
      });
      await fromBackup.start(3600);
      started.push(fromBackup);
      await replicaServes(fromBackup, lsn1);
    });
    await fromBackup.stop();
    const [{ lsn: lsn2 }] = await queryAt<{ lsn: string }>(primary, 'SELECT pg_current_wal_lsn()::text AS lsn');
    const fromBase = instance('replica-basebackup', BASE + 3);
    const replicaBaseMs = await timed('replica from pg_basebackup until streaming and caught up', async () => {
      await fromBase.initReplica(primary);
      await fromBase.start(3600);
      started.push(fromBase);
      await replicaServes(fromBase, lsn2);
    });

    const cores = os.cpus().length;
    console.log(`pgbench scale ${SCALE}: database ${gb(Number(size))}; ${cores} cores, ${Math.round(os.totalmem() / 1024 ** 3)} GiB; ` +
      `pgBackRest ${execFileSync('pgbackrest', ['version'], { encoding: 'utf8' }).trim().replace('pgBackRest ', '')} (compress ${backupCfg.compressType}, process-max ${backupCfg.processMax}); ${new Date().toISOString()}\n`);
    console.log('| | pgBackRest full | pgBackRest incremental (after 15 s of pgbench) | pg_basebackup |');
    console.log('|---|---|---|---|');
    console.log(`| backup time | ${secs(fullMs)} | ${secs(incrMs)} | ${secs(baseMs)} |`);
    console.log(`| size on disk | ${gb(fullRepo)} | ${gb(incrRepo)} | ${gb(baseSize)} |`);
    console.log(`| restore until serving as a primary | ${secs(restoreMs)} (restore + replay of archived WAL) | - | ${secs(copyStartMs)} (start of the copy; it is already a data directory) |`);
    console.log(`| new replica until streaming and caught up | ${secs(replicaBackupMs)} (restore of the latest backup + archived WAL) | - | ${secs(replicaBaseMs)} (clone from the primary) |`);
  } finally {
    for (const pg of started.reverse()) await pg.stop('immediate').catch(() => undefined);
    fs.rmSync(work, { recursive: true, force: true });
  }
}

main().then(() => process.exit(0), (err) => {
  console.error(err);
  process.exit(1);
});
