/**
 * The two-phase-commit coordinator (router/twopc/coordinator.ts) against fake
 * participants that share one fake decision table: the order of the phases,
 * what is rolled back when a PREPARE fails, the race with the resolver's
 * presumed abort, and what the caller sees in each case. The first participant
 * (the decision shard) never prepares: its own COMMIT carries the decision.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { pino } from 'pino';
import { TwoPhaseCoordinator, type Participant } from '../../router/twopc/coordinator.ts';
import { formatGid, parseGid } from '../../schemas/index.ts';

const sqlError = (code: string, message: string) => Object.assign(new Error(message), { code });

interface World {
  /** Every statement in the order the participants received them: `<shard>: <sql>`. */
  log: string[];
  decisions: Map<string, string>;
  tableExists: boolean;
  /** Every statement's whole text, in the same order. */
  full: string[];
}

/** A participant on `shard`; `fail` may reject a statement (by returning an error) before it "runs". */
function participant(world: World, shard: string, fail: (sql: string) => Error | undefined = () => undefined): Participant {
  return {
    shard,
    async query(sql: string) {
      await new Promise((r) => setImmediate(r));
      world.log.push(`${shard}: ${sql.trim().split('\n')[0]}`);
      world.full.push(`${shard}: ${sql}`);
      const err = fail(sql);
      if (err) throw err;
      if (sql.includes('CREATE TABLE IF NOT EXISTS mg_twopc.decisions')) world.tableExists = true;
      const insert = /INSERT INTO mg_twopc\.decisions .* VALUES \('([^']+)', '(\w+)'/.exec(sql);
      if (insert) {
        if (!world.tableExists) throw sqlError('42P01', 'relation "mg_twopc.decisions" does not exist');
        if (world.decisions.has(insert[1])) throw sqlError('23505', 'duplicate key value violates unique constraint "decisions_pkey"');
        world.decisions.set(insert[1], insert[2]);
      }
    },
  };
}

const newWorld = (): World => ({ log: [], decisions: new Map(), tableExists: true, full: [] });
const coordinator = () => new TwoPhaseCoordinator({ id: 'gw-test', log: pino({ level: 'silent' }) });
const kinds = (world: World) => world.log.map((l) => l.replace(/'[^']*'.*$/s, '').replace(/ \(gid.*$/, '').trim());
const gidOf = (world: World) => /PREPARE TRANSACTION '([^']+)'/.exec(world.log.find((l) => l.includes('PREPARE TRANSACTION'))!)![1];

const first = (sql: string, prefix: string) => sql.startsWith(prefix) || sql.includes(`\n${prefix}`);

test('prepares the others, then the decision shard commits with the decision row, then COMMIT PREPARED on the others', async () => {
  const world = newWorld();
  const c = coordinator();
  await c.commit('bank', [participant(world, '-80'), participant(world, '80-'), participant(world, 'c0-')]);
  assert.deepEqual(kinds(world), [
    '80-: PREPARE TRANSACTION', 'c0-: PREPARE TRANSACTION',
    '-80: CREATE SCHEMA IF NOT EXISTS mg_twopc;',
    '80-: COMMIT PREPARED', 'c0-: COMMIT PREPARED',
  ]);
  const gid = gidOf(world);
  assert.deepEqual(parseGid(gid), { database: 'bank', decisionShard: '-80', coordinator: 'gw-test', txn: parseGid(gid)!.txn });
  assert.equal(world.decisions.get(gid), 'commit');
  assert.match(world.full[2], /INSERT INTO mg_twopc\.decisions .*;\nCOMMIT$/s, 'the decision shard commits in the same round trip as its decision row');
  // The table is known now: the next commit sends only the row and COMMIT.
  world.log = [];
  await c.commit('bank', [participant(world, '-80'), participant(world, '80-')]);
  assert.deepEqual(kinds(world), ['80-: PREPARE TRANSACTION', '-80: INSERT INTO mg_twopc.decisions', '80-: COMMIT PREPARED']);
});

test('a failed PREPARE rolls back everywhere and the caller gets the participant\'s error', async () => {
  const world = newWorld();
  const deferred = (sql: string) => (sql.startsWith('PREPARE') ? sqlError('23505', 'duplicate key value violates unique constraint "accounts_pkey"') : undefined);
  await assert.rejects(coordinator().commit('bank', [participant(world, '-80'), participant(world, '80-'), participant(world, 'c0-', deferred)]), (err: any) => {
    assert.equal(err.code, '23505');
    assert.match(err.message, /could not prepare the transaction on shard c0-: duplicate key/);
    assert.match(err.detail, /rolled back on every shard/);
    return true;
  });
  assert.deepEqual(kinds(world).slice(2), ['-80: ROLLBACK', '80-: ROLLBACK PREPARED', 'c0-: ROLLBACK']);
  assert.equal(world.decisions.size, 0, 'no decision: presumed abort');
});

test('a PREPARE lost with its connection is a 40001 and nothing commits', async () => {
  const world = newWorld();
  const lost = (sql: string) => (sql.startsWith('PREPARE') ? sqlError('08006', 'connection terminated') : undefined);
  await assert.rejects(coordinator().commit('bank', [participant(world, '-80'), participant(world, '80-', lost)]), { code: '40001' });
  assert.ok(!world.log.some((l) => l.includes('COMMIT')));
});

test('a transaction the resolver already aborted is rolled back, never committed', async () => {
  const world = newWorld();
  // The resolver's ABORT lands between the PREPAREs and the coordinator's decision.
  const slowPrepare = (sql: string) => {
    if (sql.startsWith('PREPARE')) world.decisions.set(/'([^']+)'/.exec(sql)![1], 'abort');
    return undefined;
  };
  await assert.rejects(coordinator().commit('bank', [participant(world, '-80'), participant(world, '80-', slowPrepare)]), (err: any) => {
    assert.equal(err.code, '40001');
    assert.match(err.message, /in-doubt resolver aborted it/);
    return true;
  });
  assert.deepEqual(kinds(world).slice(2), ['-80: ROLLBACK', '80-: ROLLBACK PREPARED']);
  assert.equal(world.decisions.get(gidOf(world)), 'abort');
});

test('the decision table is created in the decision shard\'s transaction until this coordinator has seen it', async () => {
  const world = { ...newWorld(), tableExists: false };
  await coordinator().commit('bank', [participant(world, '-80'), participant(world, '80-')]);
  assert.equal(world.decisions.get(gidOf(world)), 'commit');
  assert.equal(kinds(world)[1], '-80: CREATE SCHEMA IF NOT EXISTS mg_twopc;');
  assert.equal(world.log.filter((l) => l.includes('COMMIT PREPARED')).length, 1);
});

test('a COMMIT PREPARED that fails after the decision does not fail the commit', async () => {
  const world = newWorld();
  const down = (sql: string) => (sql.startsWith('COMMIT PREPARED') ? sqlError('57P01', 'terminating connection due to administrator command') : undefined);
  await coordinator().commit('bank', [participant(world, '-80'), participant(world, '80-', down)]);
  assert.equal(world.decisions.get(gidOf(world)), 'commit');
});

test('a decision that cannot be confirmed is 08007 and nothing is committed or rolled back by the coordinator', async () => {
  const world = newWorld();
  const gone = (sql: string) => (first(sql, 'INSERT') ? sqlError('08006', 'connection terminated unexpectedly') : undefined);
  await assert.rejects(coordinator().commit('bank', [participant(world, '-80', gone), participant(world, '80-')]), (err: any) => {
    assert.equal(err.code, '08007');
    assert.match(err.detail, /committed on every shard or on none/);
    return true;
  });
  assert.ok(!world.log.some((l) => /COMMIT PREPARED|ROLLBACK/.test(l)), 'left for the resolver');
});

test('a decision shard that refuses its COMMIT (a deferred constraint, a permission) rolls back everywhere with its SQLSTATE', async () => {
  const world = newWorld();
  const denied = (sql: string) => (first(sql, 'INSERT') ? sqlError('42501', 'permission denied for table decisions') : undefined);
  await assert.rejects(coordinator().commit('bank', [participant(world, '-80', denied), participant(world, '80-')]), (err: any) => {
    assert.equal(err.code, '42501');
    assert.match(err.message, /could not commit the transaction on shard -80, which records the decision: permission denied/);
    return true;
  });
  assert.deepEqual(kinds(world).slice(2), ['-80: ROLLBACK', '80-: ROLLBACK PREPARED']);
});

test('fault points stop the commit at their step for good', async () => {
  for (const [faultPoint, expected] of [
    ['before-decision', ['80-: PREPARE TRANSACTION', 'c0-: PREPARE TRANSACTION']],
    ['after-decision', ['80-: PREPARE TRANSACTION', 'c0-: PREPARE TRANSACTION', '-80: CREATE SCHEMA IF NOT EXISTS mg_twopc;']],
    ['during-commit-prepared', ['80-: PREPARE TRANSACTION', 'c0-: PREPARE TRANSACTION', '-80: CREATE SCHEMA IF NOT EXISTS mg_twopc;', '80-: COMMIT PREPARED']],
  ] as const) {
    const world = newWorld();
    const c = new TwoPhaseCoordinator({ id: 'gw-test', log: pino({ level: 'silent' }), faultPoint });
    const outcome = await Promise.race([
      c.commit('bank', [participant(world, '-80'), participant(world, '80-'), participant(world, 'c0-')]).then(() => 'finished'),
      new Promise((r) => setTimeout(() => r('stopped'), 100)),
    ]);
    assert.equal(outcome, 'stopped', faultPoint);
    assert.deepEqual(kinds(world), expected, faultPoint);
  }
});

test('one participant commits plainly; a shard twice is refused', async () => {
  const world = newWorld();
  await coordinator().commit('bank', [participant(world, '-80')]);
  assert.deepEqual(world.log, ['-80: SELECT; COMMIT']);
  const failed = (sql: string) => (sql.startsWith('SELECT') ? sqlError('25P02', 'current transaction is aborted, commands ignored until end of transaction block') : undefined);
  await assert.rejects(coordinator().commit('bank', [participant(world, '-80', failed)]), { code: '25P02' });
  assert.deepEqual(world.log.slice(1), ['-80: SELECT; COMMIT', '-80: ROLLBACK']);
  await assert.rejects(coordinator().commit('bank', [participant(world, '-80'), participant(world, '-80')]), /shard twice/);
});

test('gids: formatted and parsed back, other gids and unsafe parts refused', () => {
  const g = { database: 'bank', decisionShard: '80-c0', coordinator: 'gw-1', txn: 'a1b2' };
  assert.deepEqual(parseGid(formatGid(g)), g);
  assert.equal(parseGid('some-other-app:1'), undefined);
  assert.equal(parseGid('mg2pc:bank:-80:gw'), undefined);
  assert.throws(() => formatGid({ ...g, coordinator: "x'; DROP TABLE t; --" }), /invalid gid part coordinator/);
});
