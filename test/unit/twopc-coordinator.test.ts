/**
 * The two-phase-commit coordinator (router/twopc/coordinator.ts) against fake
 * participants that share one fake decision table: the order of the phases,
 * what is rolled back when a PREPARE fails, the race with the resolver's
 * presumed abort, and what the caller sees in each case.
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
}

/** A participant on `shard`; `fail` may reject a statement (by returning an error) before it "runs". */
function participant(world: World, shard: string, fail: (sql: string) => Error | undefined = () => undefined): Participant {
  return {
    shard,
    async query(sql: string) {
      await new Promise((r) => setImmediate(r));
      world.log.push(`${shard}: ${sql.trim().split('\n')[0]}`);
      const err = fail(sql);
      if (err) throw err;
      const insert = /^INSERT INTO mg_twopc\.decisions .* VALUES \('([^']+)', '(\w+)'/.exec(sql);
      if (insert) {
        if (!world.tableExists) throw sqlError('42P01', 'relation "mg_twopc.decisions" does not exist');
        if (world.decisions.has(insert[1])) throw sqlError('23505', 'duplicate key value violates unique constraint "decisions_pkey"');
        world.decisions.set(insert[1], insert[2]);
      } else if (sql.includes('CREATE TABLE IF NOT EXISTS mg_twopc.decisions')) {
        world.tableExists = true;
      }
    },
  };
}

const newWorld = (): World => ({ log: [], decisions: new Map(), tableExists: true });
const coordinator = () => new TwoPhaseCoordinator({ id: 'gw-test', log: pino({ level: 'silent' }) });
const kinds = (world: World) => world.log.map((l) => l.replace(/'[^']*'.*$/s, '').replace(/ \(gid.*$/, '').trim());
const gidOf = (world: World) => /PREPARE TRANSACTION '([^']+)'/.exec(world.log.find((l) => l.includes('PREPARE TRANSACTION'))!)![1];

test('prepares everywhere, then records the decision, then commits everywhere', async () => {
  const world = newWorld();
  await coordinator().commit('bank', [participant(world, '-80'), participant(world, '80-')]);
  assert.deepEqual(kinds(world), [
    '-80: PREPARE TRANSACTION', '80-: PREPARE TRANSACTION',
    '-80: INSERT INTO mg_twopc.decisions',
    '-80: COMMIT PREPARED', '80-: COMMIT PREPARED',
  ]);
  const gid = gidOf(world);
  assert.deepEqual(parseGid(gid), { database: 'bank', decisionShard: '-80', coordinator: 'gw-test', txn: parseGid(gid)!.txn });
  assert.equal(world.decisions.get(gid), 'commit');
  assert.equal(world.log.filter((l) => l.includes(gid)).length, 5, 'one gid for the whole transaction');
});

test('a failed PREPARE rolls back everywhere and the caller gets the participant\'s error', async () => {
  const world = newWorld();
  const deferred = (sql: string) => (sql.startsWith('PREPARE') ? sqlError('23505', 'duplicate key value violates unique constraint "accounts_pkey"') : undefined);
  await assert.rejects(coordinator().commit('bank', [participant(world, '-80'), participant(world, '80-', deferred)]), (err: any) => {
    assert.equal(err.code, '23505');
    assert.match(err.message, /could not prepare the transaction on shard 80-: duplicate key/);
    assert.match(err.detail, /rolled back on every shard/);
    return true;
  });
  assert.deepEqual(kinds(world).slice(2), ['-80: ROLLBACK PREPARED', '80-: ROLLBACK']);
  assert.equal(world.decisions.size, 0, 'no decision: presumed abort');
});

test('a PREPARE lost with its connection is a 40001 and nothing commits', async () => {
  const world = newWorld();
  const lost = (sql: string) => (sql.startsWith('PREPARE') ? sqlError('08006', 'connection terminated') : undefined);
  await assert.rejects(coordinator().commit('bank', [participant(world, '-80', lost), participant(world, '80-')]), { code: '40001' });
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
  assert.deepEqual(kinds(world).slice(3), ['-80: ROLLBACK PREPARED', '80-: ROLLBACK PREPARED']);
  assert.equal(world.decisions.get(gidOf(world)), 'abort');
});

test('the decision table is created on a shard\'s first two-phase commit', async () => {
  const world = { ...newWorld(), tableExists: false };
  await coordinator().commit('bank', [participant(world, '-80'), participant(world, '80-')]);
  assert.equal(world.decisions.get(gidOf(world)), 'commit');
  assert.deepEqual(kinds(world).slice(2, 5), [
    '-80: INSERT INTO mg_twopc.decisions',
    '-80: CREATE SCHEMA IF NOT EXISTS mg_twopc;',
    '-80: INSERT INTO mg_twopc.decisions',
  ]);
  assert.equal(world.log.filter((l) => l.includes('COMMIT PREPARED')).length, 2);
});

test('a COMMIT PREPARED that fails after the decision does not fail the commit', async () => {
  const world = newWorld();
  const down = (sql: string) => (sql.startsWith('COMMIT PREPARED') ? sqlError('57P01', 'terminating connection due to administrator command') : undefined);
  await coordinator().commit('bank', [participant(world, '-80'), participant(world, '80-', down)]);
  assert.equal(world.decisions.get(gidOf(world)), 'commit');
});

test('a decision that cannot be confirmed is 08007 and nothing is committed or rolled back by the coordinator', async () => {
  const world = newWorld();
  const gone = (sql: string) => (sql.startsWith('INSERT') ? sqlError('08006', 'connection terminated unexpectedly') : undefined);
  await assert.rejects(coordinator().commit('bank', [participant(world, '-80', gone), participant(world, '80-')]), (err: any) => {
    assert.equal(err.code, '08007');
    assert.match(err.detail, /committed on every shard or on none/);
    return true;
  });
  assert.ok(!world.log.some((l) => /COMMIT PREPARED|ROLLBACK/.test(l)), 'left for the resolver');
});

test('a decision insert that Postgres refuses rolls back everywhere with its SQLSTATE', async () => {
  const world = newWorld();
  const denied = (sql: string) => (sql.startsWith('INSERT') ? sqlError('42501', 'permission denied for table decisions') : undefined);
  await assert.rejects(coordinator().commit('bank', [participant(world, '-80', denied), participant(world, '80-')]), (err: any) => {
    assert.equal(err.code, '42501');
    assert.match(err.message, /could not record the commit decision on shard -80: permission denied/);
    return true;
  });
  assert.deepEqual(kinds(world).slice(3), ['-80: ROLLBACK PREPARED', '80-: ROLLBACK PREPARED']);
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
