import assert from 'node:assert/strict';
import { test } from 'node:test';
import { dueType, ofCurrentSystem } from '../../orchestrator/backups.ts';
import { stanzaOf, stanzaPartsOf, type BackupEvent } from '../../schemas/index.ts';

const MIN = 60_000;
const now = Date.parse('2026-12-04T12:00:00Z');

function event(type: BackupEvent['type'], state: BackupEvent['state'], minutesAgo: number): BackupEvent {
  return {
    backupId: `${type}-${minutesAgo}`, database: 'db', shard: '-', stanza: 'db-0', instanceId: 'i', fromStandby: true,
    ts: new Date(now - minutesAgo * MIN), state, type, label: null, startLsn: null, stopLsn: null,
    sizeBytes: null, repoSizeBytes: null, doneBytes: null, durationMs: null, error: null,
  };
}

const lastOf = (...events: BackupEvent[]) => (t: BackupEvent['type']) => events.filter((e) => e.type === t).at(-1);

test('stanza names: <database>-<shard> with the key range spelt as in instance ids', () => {
  assert.equal(stanzaOf('postgres', '-'), 'postgres-0');
  assert.equal(stanzaOf('app', '-80'), 'app-_80');
  assert.equal(stanzaOf('app', '80-'), 'app-80_');
  assert.equal(stanzaOf('app', '40-80'), 'app-40_80');
  // A later system under a name the repository still holds (decision 0064).
  assert.equal(stanzaOf('app', '-80', 2), 'app-_80-g2');
  assert.equal(stanzaOf('postgres', '-', 1), 'postgres-0');
});

test('stanza names read back: shard and generation of a database\'s stanzas, none of another database\'s', () => {
  assert.deepEqual(stanzaPartsOf('app-_80', 'app'), { shard: '-80', generation: 1 });
  assert.deepEqual(stanzaPartsOf('app-80_-g3', 'app'), { shard: '80-', generation: 3 });
  assert.deepEqual(stanzaPartsOf('app-0-g2', 'app'), { shard: '-', generation: 2 });
  assert.deepEqual(stanzaPartsOf('app-0-0', 'app-0'), { shard: '-', generation: 1 });
  assert.equal(stanzaPartsOf('app-0-0', 'app'), undefined);
  assert.equal(stanzaPartsOf('app-0-g2', 'app-0'), undefined);
  assert.equal(stanzaPartsOf('apple-0', 'app'), undefined);
  assert.equal(stanzaPartsOf('app-0-g0', 'app'), undefined);
});

test('schedule: the first backup of a shard is a full one, whatever else is scheduled', () => {
  assert.equal(dueType({ fullEveryMinutes: 1440, incrEveryMinutes: 60 }, lastOf(), now), 'full');
});

test('schedule: a full backup renews the diff and incr clocks; each type comes due on its own interval', () => {
  const schedule = { fullEveryMinutes: 1440, diffEveryMinutes: 240, incrEveryMinutes: 60 };
  assert.equal(dueType(schedule, lastOf(event('FULL', 'COMPLETED', 30)), now), undefined);
  assert.equal(dueType(schedule, lastOf(event('FULL', 'COMPLETED', 61)), now), 'incr');
  assert.equal(dueType(schedule, lastOf(event('FULL', 'COMPLETED', 241), event('INCR', 'COMPLETED', 10)), now), 'diff');
  assert.equal(dueType(schedule, lastOf(event('FULL', 'COMPLETED', 1441), event('DIFF', 'COMPLETED', 5)), now), 'full');
});

test('schedule: nothing starts while a backup runs or shortly after one failed; a lost one does not block forever', () => {
  const schedule = { fullEveryMinutes: 60 };
  assert.equal(dueType(schedule, lastOf(event('FULL', 'STARTED', 2)), now), undefined);
  assert.equal(dueType(schedule, lastOf(event('FULL', 'FAILED', 2)), now), undefined);
  assert.equal(dueType(schedule, lastOf(event('FULL', 'FAILED', 6)), now), 'full');
  assert.equal(dueType(schedule, lastOf(event('FULL', 'STARTED', 7 * 60)), now), 'full');
});

test('schedule: none configured, none due', () => {
  assert.equal(dueType({}, lastOf(), now), undefined);
});

test('schedule: a database created again under its name starts its clocks anew; the earlier system\'s backups do not count (decision 0064)', () => {
  const schedule = { fullEveryMinutes: 1440, incrEveryMinutes: 60 };
  const earlier = lastOf(event('FULL', 'COMPLETED', 30), event('INCR', 'COMPLETED', 5));
  assert.equal(dueType(schedule, ofCurrentSystem(earlier, null), now), undefined, 'never dropped: they count');
  assert.equal(dueType(schedule, ofCurrentSystem(earlier, new Date(now - 60 * MIN)), now), undefined, 'created before them: they count');
  assert.equal(dueType(schedule, ofCurrentSystem(earlier, new Date(now - 2 * MIN)), now), 'full', 'created after them: its first backup is due');
  const since = new Date(now - 20 * MIN);
  assert.equal(dueType(schedule, ofCurrentSystem(lastOf(event('FULL', 'COMPLETED', 30), event('FULL', 'COMPLETED', 10)), since), now), undefined, 'its own full counts');
});
