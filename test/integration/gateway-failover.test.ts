/**
 * What clients of the gateway see when their shard's primary is replaced: a
 * session caught mid-work on the old primary is ended at once with a SQLSTATE
 * that says what happened (08007 for a statement in flight, 57P01 for an open
 * transaction), instead of waiting on a primary that never answers; idle
 * sessions move to the new primary; a planned switchover ends nobody.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, test } from 'node:test';
import pg from 'pg';
import type { EventLog, Subscription } from '../../common/eventlog.ts';
import { kindOf, type PrimaryChanged } from '../../schemas/index.ts';
import { testCluster, until } from '../support/cluster.ts';
import { testEventLog } from '../support/env.ts';
import { freeze, fullStrength, pendingRepairs, postgresPids } from '../fault/support/faults.ts';

const cluster = testCluster('gwfailover', 2);
const { spec, flags, mg } = cluster;
const shardName = `${cluster.instances[0].database}/${cluster.instances[0].shard}`;
const instance = (id: string) => cluster.instances.find((i) => i.instanceId === id)!;
/** Far longer than the failover takes: without the gateway's help, a client would wait this long. */
const FREEZE_MS = 25_000;

let eventLog: EventLog;
let topologySub: Subscription;
/** When this test saw each PrimaryChanged (as the gateway does, from Kafka), by term. */
const primaryChangedAt = new Map<string, { at: number; primary: string }>();

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  eventLog = await testEventLog(cluster.prefix);
  topologySub = await eventLog.subscribe('topology', (e) => {
    const { kind, body } = kindOf(e);
    if (kind === 'PrimaryChanged') {
      const p = body as PrimaryChanged;
      primaryChangedAt.set(String(p.term), { at: Date.now(), primary: p.primaryInstanceId });
    }
  });
  await fullStrength(cluster);
  await withClient((c) => c.query('CREATE TABLE IF NOT EXISTS failover_items (id int PRIMARY KEY, note text)'));
});

after(async () => {
  for (const repair of [...pendingRepairs]) repair();
  await topologySub?.stop();
  await eventLog?.close();
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(cluster.dataDir, { recursive: true, force: true });
});

type Tracked = pg.Client & { endedAt?: number; error?: any };

/** A client of the gateway that remembers how it ended (an error outside any query comes as an 'error' event). */
async function connect(database = 'postgres'): Promise<Tracked> {
  const c: Tracked = new pg.Client({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database });
  c.on('error', (e) => (c.error ??= e));
  c.on('end', () => (c.endedAt ??= Date.now()));
  await c.connect();
  return c;
}

async function withClient<T>(fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = await connect();
  try {
    return await fn(c);
  } finally {
    await c.end().catch(() => undefined);
  }
}

const serverPort = async (c: pg.Client) => Number((await c.query("SELECT current_setting('port') AS p")).rows[0].p);

async function failedOverCounts(): Promise<Record<string, number>> {
  const text = await (await fetch(`http://127.0.0.1:${spec.gateway.metricsPort}/metrics`)).text();
  const out: Record<string, number> = { in_flight: 0, in_transaction: 0 };
  for (const m of text.matchAll(/^mg_gateway_sessions_failed_over_total\{outcome="(\w+)"\} (\d+)/gm)) out[m[1]] = Number(m[2]);
  return out;
}

test('a frozen primary is replaced: the statement in flight gets 08007, the open transaction 57P01, both within about a second of the new term; idle sessions and new ones write to the new primary', cluster.explained(async (t) => {
  const s = await fullStrength(cluster);
  const old = instance(s.primary!);
  const metricsBefore = await failedOverCounts();

  const inTransaction = await connect();
  await inTransaction.query('BEGIN');
  await inTransaction.query("INSERT INTO failover_items VALUES (1, 'never committed')");
  const inFlight = await connect();
  const idle = await connect();
  assert.equal(await serverPort(idle), old.port);
  const onReplica = await connect('postgres@replica');
  await onReplica.query('SELECT 1');

  freeze(postgresPids(cluster, old.instanceId), FREEZE_MS);
  const frozenAt = Date.now();
  try {
    const statement = inFlight.query("INSERT INTO failover_items VALUES (2, 'outcome unknown')");
    const statementError = statement.then(() => assert.fail('the INSERT on the frozen primary succeeded'), (e) => ({ e, at: Date.now() }));

    const changed = await until('a PrimaryChanged to another instance', FREEZE_MS - 5_000, () =>
      [...primaryChangedAt].find(([term, p]) => BigInt(term) > BigInt(s.term!) && p.primary !== old.instanceId)?.[1]);
    const { e: flightErr, at: flightAt } = await statementError;
    assert.equal(flightErr.code, '08007', flightErr.message);
    assert.match(flightErr.message, new RegExp(`the primary of ${shardName} was replaced \\(term \\d+\\) while a statement was in flight`));
    assert.equal(flightErr.severity, 'FATAL');
    assert.ok(flightAt - changed.at < 2_000, `08007 came ${flightAt - changed.at} ms after the PrimaryChanged`);

    // The open transaction was told too, without sending anything: its connection is closed with 57P01.
    await until('the session in a transaction ended', 2_000, () => inTransaction.endedAt);
    assert.equal(inTransaction.error?.code, '57P01', inTransaction.error?.message);
    assert.match(inTransaction.error.message, /terminating connection because the primary of .* was replaced \(term \d+\): the open transaction did not commit/);
    assert.ok(inTransaction.endedAt! - changed.at < 2_000, `the transaction's session ended ${inTransaction.endedAt! - changed.at} ms after the PrimaryChanged`);
    await assert.rejects(inTransaction.query('COMMIT'), (e: any) => /not queryable|terminated|ended/i.test(e.message));
    assert.ok(Date.now() - frozenAt < FREEZE_MS, 'the old primary is still frozen: nothing here waited for it');
    t.diagnostic(`after the freeze: PrimaryChanged ${changed.at - frozenAt} ms, 08007 ${flightAt - frozenAt} ms, 57P01 session closed ${inTransaction.endedAt! - frozenAt} ms`);

    // Idle sessions were left alone and follow the new primary; new connections write there.
    const newPort = instance(changed.primary).port;
    assert.equal(await serverPort(idle), newPort);
    await withClient(async (c) => {
      await c.query("INSERT INTO failover_items VALUES (3, 'after the failover')");
      assert.equal(await serverPort(c), newPort);
      assert.equal((await c.query('SELECT pg_is_in_recovery() AS r')).rows[0].r, false);
    });
    // A replica session is not the old primary's business.
    assert.equal(onReplica.endedAt, undefined);

    const metricsAfter = await failedOverCounts();
    assert.equal(metricsAfter.in_flight - metricsBefore.in_flight, 1);
    assert.equal(metricsAfter.in_transaction - metricsBefore.in_transaction, 1);
  } finally {
    for (const repair of [...pendingRepairs]) repair();
    for (const c of [inTransaction, inFlight, idle, onReplica]) await c.end().catch(() => undefined);
  }
  // The frozen one is fenced and rejoins; what it never committed is nowhere.
  const back = await fullStrength(cluster);
  assert.notEqual(back.primary, old.instanceId);
  const rows = await withClient(async (c) => (await c.query('SELECT id FROM failover_items ORDER BY id')).rows.map((r) => r.id));
  assert.ok(!rows.includes(1), `rows: ${rows}`);
  assert.ok(rows.includes(3), `rows: ${rows}`);
}));

test('a planned switchover ends no session: an idle one and a writer carry on on the new primary', cluster.explained(async () => {
  const s = await fullStrength(cluster);
  const metricsBefore = await failedOverCounts();
  const idle = await connect();
  const writer = await connect();
  let next = 100;
  const errors: string[] = [];
  let writing = true;
  const writes = (async () => {
    while (writing) await writer.query('INSERT INTO failover_items VALUES ($1, $2)', [next++, 'switchover']).catch((e) => errors.push(`${e.code} ${e.message}`));
  })();
  try {
    const r = await mg('shard', 'switchover', shardName, '--data-dir', cluster.dataDir);
    assert.equal(r.code, 0, r.stderr + r.stdout);
    const after = await fullStrength(cluster);
    assert.notEqual(after.primary, s.primary);
    assert.equal(await serverPort(idle), instance(after.primary!).port);
  } finally {
    writing = false;
    await writes;
  }
  assert.deepEqual(errors, []);
  assert.equal(await serverPort(writer), (await serverPort(idle)));
  assert.deepEqual(await failedOverCounts(), metricsBefore);
  await idle.end();
  await writer.end();
}));
