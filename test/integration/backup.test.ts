/**
 * Backups end to end, as an operator runs them (the CLI in a subprocess) on a
 * real cluster with pgBackRest: archiving from the bootstrap on, a backup
 * taken from a replica with its events, point-in-time restore of a dropped
 * table, a replica rebuilt from the backup while the primary takes writes and
 * then made primary by a switchover, and archiving still whole after it.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import pg from 'pg';
import type { EventLog, Subscription } from '../../common/eventlog.ts';
import { callOrchestrator } from '../../compose/orchestrators.ts';
import type { PlannedInstance } from '../../compose/spec.ts';
import type { BackupEvent } from '../../schemas/index.ts';
import { sleep, testCluster, until } from '../support/cluster.ts';
import { queryInstance as query } from '../support/postgres.ts';
import { testEventLog } from '../support/env.ts';

// Slot 0 is shared with cluster.test.ts: test files run one at a time. A full backup a day is scheduled.
const cluster = testCluster('backup', 0, { spec: { databases: [{ name: 'postgres', backupSchedule: { fullEveryMinutes: 1440 } }] } });
const { dataDir, prefix, flags, mg } = cluster;
const restorePort = cluster.spec.postgres.basePort + 480;
const restoreDir = path.join(dataDir, 'restored', 'pitr');
const latestDir = path.join(dataDir, 'restored', 'latest');

let eventLog: EventLog;
let sub: Subscription;
const backupEvents: BackupEvent[] = [];

before(async () => {
  eventLog = await testEventLog(prefix);
});

after(async () => {
  await sub?.stop();
  await eventLog.close();
  const pgCtl = path.join(cluster.spec.postgres.binDir, 'pg_ctl');
  for (const dir of [restoreDir, latestDir]) {
    if (fs.existsSync(path.join(dir, 'postmaster.pid'))) execFileSync('su', ['postgres', '-c', `${pgCtl} stop -m immediate -D ${dir}`]);
  }
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});


const ok = (...args: string[]) => cluster.mgOk(...args);

test('up: archiving works from the bootstrap on (pgbackrest check through the primary); the schedule takes the first full backup', cluster.explained(async () => {
  const r = await mg('cluster', 'up', ...flags);
  assert.equal(r.code, 0, r.stderr);
  sub = await eventLog.subscribe('backups', (e) => void backupEvents.push(e));
  assert.match(await ok('backup', 'check', 'postgres/-'), /postgres\/-: ok: archiving works/);
  const full = await until('the scheduled full backup', 90_000, () => backupEvents.find((e) => e.state === 'COMPLETED'));
  assert.equal(full.type, 'FULL');
  assert.ok(backupEvents.some((e) => e.state === 'STARTED' && e.backupId === full.backupId), 'a STARTED event precedes it');
}));

test('backup create: a differential backup from a streaming replica, with STARTED and COMPLETED events', cluster.explained(async () => {
  const { primary, replicas } = await cluster.roles();
  await query(primary.port, 'CREATE TABLE before_backup AS SELECT generate_series(1, 10000) AS i');
  const out = await ok('backup', 'create', 'postgres/-', '--type', 'diff');
  assert.match(out, /diff backup \S+D completed in [\d.]+ s: database [\d.]+ MB.*from a replica/);
  const completed = await until('the COMPLETED event', 10_000, () => backupEvents.find((e) => e.state === 'COMPLETED' && e.type === 'DIFF'));
  const started = backupEvents.find((e) => e.state === 'STARTED' && e.backupId === completed.backupId);
  assert.ok(started, 'a STARTED event precedes it');
  assert.equal(completed.stanza, 'postgres-0');
  assert.ok(replicas.some((r) => r.instanceId === completed.instanceId), `taken by a replica, not ${completed.instanceId}`);
  assert.ok(completed.fromStandby);
  assert.ok(completed.startLsn! > 0n && completed.stopLsn! >= completed.startLsn!, 'an LSN range');
  assert.ok(completed.sizeBytes! > 1_000_000n && completed.repoSizeBytes! > 0n && completed.durationMs! > 0n);

  const list = await ok('backup', 'list', 'postgres/-');
  assert.match(list, /\d{8}-\d{6}F\s+full/);
  assert.match(list, new RegExp(`${completed.label}\\s+diff`));
  assert.match(await ok('backup', 'verify', 'postgres/-'), /postgres\/-:/);
}));

test('REST: a bad backup type is a 400 naming the field, an unknown shard a 404', cluster.explained(async () => {
  const bad = await callOrchestrator(cluster.spec, 'POST', '/v1/backups/postgres/-', { type: 'weekly' });
  assert.equal(bad.status, 400);
  assert.match(bad.body.error, /body\.type: must be equal to one of the allowed values/);
  const missing = await callOrchestrator(cluster.spec, 'GET', '/v1/backups/nodb/-');
  assert.equal(missing.status, 404);
  assert.match(missing.body.error, /no shard nodb\/-/);
}));

test('restore --time: a table dropped by mistake comes back with exactly the rows it had then', cluster.explained(async () => {
  const { primary } = await cluster.roles();
  await query(primary.port, 'CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)');
  await query(primary.port, 'INSERT INTO accounts SELECT i, i * 10 FROM generate_series(1, 500) i');
  await query(primary.port, 'UPDATE accounts SET balance = balance + 1 WHERE id <= 100');
  await sleep(1_100);
  const noted = new Date();
  await sleep(1_100);
  await query(primary.port, 'INSERT INTO accounts SELECT i, 0 FROM generate_series(501, 700) i');
  await query(primary.port, 'DELETE FROM accounts WHERE id BETWEEN 200 AND 300');
  await query(primary.port, 'DROP TABLE accounts');

  const out = await ok('backup', 'restore', 'postgres/-', '--time', noted.toISOString(), '--to-dir', restoreDir, '--port', String(restorePort));
  assert.match(out, /restored in [\d.]+ s; a new primary on port/);
  const [row] = await query(restorePort, 'SELECT count(*)::int AS n, sum(balance)::int AS total, min(id) AS lo, max(id) AS hi FROM accounts');
  const expected = 500 * 501 / 2 * 10 + 100;
  assert.deepEqual(row, { n: 500, total: expected, lo: 1, hi: 500 });
  const [{ rec }] = await query(restorePort, 'SELECT pg_is_in_recovery() AS rec');
  assert.equal(rec, false, 'the restored instance is a primary of its own');
  // The shard itself is untouched: the table is still dropped there.
  const [{ exists }] = await query(primary.port, "SELECT to_regclass('accounts') IS NOT NULL AS exists");
  assert.equal(exists, false);
}));

test('a replica whose data directory is lost is rebuilt from the backup while the primary takes writes, then becomes primary with no lost write', cluster.explained(async () => {
  const { primary, replicas } = await cluster.roles();
  const victim: PlannedInstance = replicas[0];
  await query(primary.port, 'CREATE TABLE writes (n int PRIMARY KEY)');
  let acknowledged = 0;
  let writing = true;
  // Writes until stopped or until the switchover ends its connection to the old primary.
  const writer = (async () => {
    const client = new pg.Client({ host: '127.0.0.1', port: primary.port, user: 'postgres', database: 'postgres' });
    client.on('error', () => undefined);
    await client.connect();
    try {
      while (writing) {
        await client.query('INSERT INTO writes VALUES ($1)', [acknowledged + 1]);
        acknowledged++;
        await sleep(5);
      }
    } catch {
      // 57P01 from the switchover: what was acknowledged before it is what must survive
    } finally {
      await client.end().catch(() => undefined);
    }
  })();

  // The data directory is lost: agent and Postgres gone, directory removed; `up` starts the agent again.
  const agentPid = Number(fs.readFileSync(path.join(dataDir, 'run', `agent-${victim.instanceId}.pid`), 'utf8').split(' ')[0]);
  process.kill(agentPid, 'SIGKILL');
  const pgPid = Number(fs.readFileSync(path.join(victim.dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
  process.kill(pgPid, 'SIGKILL');
  await sleep(500);
  fs.rmSync(victim.dataDir, { recursive: true, force: true });
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr);

  const agentLog = path.join(dataDir, 'logs', `agent-${victim.instanceId}.log`);
  await until('the replica to be restored from the backup', 120_000, () => fs.readFileSync(agentLog, 'utf8').includes('restored a standby from the latest backup'));
  await until('the rebuilt replica to stream', 60_000, async () => {
    const rows = await query(victim.port, "SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'").catch(() => []);
    return rows.length > 0;
  });
  const [{ restoredFrom }] = await query(victim.port, "SELECT current_setting('restore_command') AS \"restoredFrom\"");
  assert.match(restoredFrom, /pgbackrest .*archive-get/, 'recovery reads the archive');
  assert.ok(acknowledged > 0, 'the primary took writes meanwhile');

  const sw = await ok('shard', 'switchover', 'postgres/-', '--to', victim.instanceId);
  assert.match(sw, new RegExp(`-> ${victim.instanceId}`));
  writing = false;
  await writer;
  const [{ count, max }] = await query(victim.port, 'SELECT count(*)::int AS count, max(n) AS max FROM writes');
  assert.ok(max >= acknowledged, `every acknowledged write is on the new primary (${max} < ${acknowledged})`);
  assert.equal(count, max, 'no gaps');

  // Archiving continues from the new primary with no gap: pgbackrest check passes, and the latest backup (of the
  // old timeline), restored to the end of the archive, holds every write, the ones after the switchover too.
  assert.match(await ok('backup', 'check', 'postgres/-'), /ok: archiving works/);
  await query(victim.port, 'INSERT INTO writes VALUES ($1)', [count + 1]);
  await ok('backup', 'restore', 'postgres/-', '--to-dir', latestDir, '--port', String(restorePort + 1));
  const [restored] = await query(restorePort + 1, 'SELECT count(*)::int AS count, max(n) AS max FROM writes');
  assert.deepEqual(restored, { count: count + 1, max: count + 1 });
  assert.match(await ok('backup', 'create', 'postgres/-', '--type', 'incr'), /incr backup \S+I completed/);
}));
