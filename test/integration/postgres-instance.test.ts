// Real Postgres 15 instances in a temp dir: primary, streaming replica, kill -9, SIGSTOP.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { createLogger } from '../../common/log.ts';
import { PostgresInstance, type Probe } from '../../ingest/postgres/instance.ts';
import { freePort, until } from '../support/wait.ts';

process.env.MG_LOG_LEVEL ??= 'warn';
const log = createLogger('postgres-instance-test');

let dir: string;
let primary: PostgresInstance;
let replica: PostgresInstance;
const instances: PostgresInstance[] = [];

async function instance(name: string): Promise<PostgresInstance> {
  const inst = new PostgresInstance({ name, dataDir: path.join(dir, name), port: await freePort(), log });
  instances.push(inst);
  return inst;
}

async function sql<R extends pg.QueryResultRow>(inst: PostgresInstance, text: string): Promise<R[]> {
  const client = new pg.Client({ host: inst.host, port: inst.port, user: 'postgres', database: 'postgres' });
  await client.connect();
  try {
    return (await client.query<R>(text)).rows;
  } finally {
    await client.end();
  }
}

/** The postmaster and its children (backends, walreceiver, checkpointer, ...). */
function processTree(postmaster: number): number[] {
  const children = fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d)).flatMap((d) => {
    try {
      const stat = fs.readFileSync(`/proc/${d}/stat`, 'utf8');
      // Field 4 (ppid) follows the parenthesised command name.
      return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[2]) === postmaster ? [Number(d)] : [];
    } catch {
      return [];
    }
  });
  return [postmaster, ...children];
}

const streamingAndCaughtUp = (target: bigint) => async (): Promise<Probe | undefined> => {
  const p = await replica.probe(1000);
  return p && p.walReceiverStatus === 'streaming' && p.replayLsn !== null && p.replayLsn >= target ? p : undefined;
};

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-pg-'));
  // mkdtemp makes it 0700; the postgres OS user must be able to enter it.
  fs.chmodSync(dir, 0o755);
  primary = await instance('primary');
  replica = await instance('replica1');
});

after(async () => {
  for (const inst of instances) await inst.stop('immediate').catch(() => {});
  fs.rmSync(dir, { recursive: true, force: true });
});

test('primary and streaming replica', async () => {
  assert.equal(primary.isInitialized(), false);
  await primary.initPrimary();
  assert.equal(primary.isInitialized(), true);
  await primary.start();
  assert.equal(primary.isRunning(), true);
  await primary.start(); // already running: no-op

  const p = await primary.probe(2000);
  assert.ok(p);
  assert.equal(p.inRecovery, false);
  assert.ok(p.currentLsn !== null && p.currentLsn > 0n);
  assert.ok(p.flushLsn !== null && p.flushLsn <= p.currentLsn);
  assert.equal(p.replayLsn, null);
  assert.equal(p.replayLagBytes, null);
  assert.equal(p.upstream, null);
  assert.equal(p.maxConnections, 200);
  assert.match(p.serverVersion, /^15\./);

  await replica.initReplica({ host: primary.host, port: primary.port });
  assert.ok(fs.existsSync(path.join(replica.dataDir, 'standby.signal')));
  await replica.start();

  await sql(primary, 'CREATE TABLE t (id int PRIMARY KEY, v text)');
  await sql(primary, "INSERT INTO t VALUES (1, 'one')");
  const target = (await primary.probe(2000))!.currentLsn!;
  const r = await until('replica to stream and replay', 15_000, streamingAndCaughtUp(target));
  assert.equal(r.inRecovery, true);
  assert.equal(r.currentLsn, null);
  assert.equal(r.upstream, `127.0.0.1:${primary.port}`);
  assert.equal(r.replayLagBytes, 0n);
  assert.equal(r.replayLagSeconds, 0);
  assert.deepEqual(await sql(replica, 'SELECT id, v FROM t'), [{ id: 1, v: 'one' }]);

  const slots = await sql<{ active: boolean }>(primary,
    `SELECT active FROM pg_replication_slots WHERE slot_name = '${replica.slotName}'`);
  assert.deepEqual(slots, [{ active: true }]);
  const standbys = await sql(primary, 'SELECT application_name FROM pg_stat_replication');
  assert.deepEqual(standbys, [{ application_name: 'replica1' }]);
});

test('replica killed with -9 is seen down and comes back streaming', async () => {
  const pid = replica.postmasterPid();
  assert.ok(pid);
  process.kill(pid, 'SIGKILL');
  await until('replica to be seen down', 2000, async () => !replica.isRunning());
  assert.equal(replica.postmasterPid(), undefined);
  const t0 = Date.now();
  assert.equal(await replica.probe(1000), null);
  assert.ok(Date.now() - t0 < 1000);

  await replica.start();
  assert.notEqual(replica.postmasterPid(), pid);
  await sql(primary, "INSERT INTO t VALUES (2, 'two')");
  const target = (await primary.probe(2000))!.currentLsn!;
  await until('replica to stream again', 15_000, streamingAndCaughtUp(target));
  assert.deepEqual(await sql(replica, 'SELECT count(*)::int AS n FROM t'), [{ n: 2 }]);
});

test('probe of a hung (SIGSTOPped) instance returns null within its timeout', async () => {
  const hung = await instance('hung');
  await hung.initPrimary();
  await hung.start();
  assert.ok(await hung.probe(2000));
  const pids = processTree(hung.postmasterPid()!);
  for (const pid of pids) process.kill(pid, 'SIGSTOP');
  try {
    const timeoutMs = 500;
    const t0 = Date.now();
    assert.equal(await hung.probe(timeoutMs), null);
    const elapsed = Date.now() - t0;
    assert.ok(elapsed <= timeoutMs + 200, `probe took ${elapsed} ms`);
    assert.equal(hung.isRunning(), true);
  } finally {
    for (const pid of pids) process.kill(pid, 'SIGCONT');
  }
  assert.ok(await hung.probe(2000));
  await hung.stop();
  assert.equal(hung.isRunning(), false);
});
