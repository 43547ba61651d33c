/** Where a point-in-time restore stops, and which backup it starts from (schemas/backup.ts). */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { backupBefore, recoveryTargetOf } from '../../schemas/index.ts';

const backups = [
  { label: '20261205-100000F', stoppedAt: '2026-12-05T10:00:30.000Z', stopLsn: '0/3000100' },
  { label: '20261205-100000F_20261205-110000I', stoppedAt: '2026-12-05T11:00:30.000Z', stopLsn: '0/9A000028' },
  { label: '20261205-120000F', stoppedAt: '2026-12-05T12:00:30.000Z', stopLsn: '1/2000028', error: true },
  { label: '20261205-130000F', stoppedAt: '2026-12-05T13:00:30.000Z', stopLsn: '1/10000028' },
];

test('recoveryTargetOf: pgBackRest\'s time format, an LSN, or the end of the archive; a malformed flag is named', () => {
  assert.deepEqual(recoveryTargetOf({ time: '2026-12-05T18:21:08.101Z' }), { type: 'time', value: '2026-12-05 18:21:08.101+00' });
  assert.deepEqual(recoveryTargetOf({ lsn: '0/16B3748' }), { type: 'lsn', value: '0/16B3748' });
  assert.deepEqual(recoveryTargetOf({}), { type: 'default' });
  assert.throws(() => recoveryTargetOf({ time: 'yesterday' }), /--time must be a date and time/);
  assert.throws(() => recoveryTargetOf({ lsn: '16B3748' }), /--lsn must look like 0\/16B3748/);
  assert.throws(() => recoveryTargetOf({ time: '2026-12-05T18:21:08Z', lsn: '0/1' }), /not both/);
});

test('backupBefore: the latest good backup that ended before the target (a second of margin on times; LSNs compared as numbers)', () => {
  assert.equal(backupBefore(backups, { time: new Date('2026-12-05T11:30:00Z') })?.label, '20261205-100000F_20261205-110000I');
  assert.equal(backupBefore(backups, { time: new Date('2026-12-05T11:00:30.900Z') })?.label, '20261205-100000F', 'listed as ended within the second before: maybe not yet');
  assert.equal(backupBefore(backups, { time: new Date('2026-12-05T12:30:00Z') })?.label, '20261205-100000F_20261205-110000I', 'a backup in error is skipped');
  assert.equal(backupBefore(backups, { time: new Date('2026-12-05T09:00:00Z') }), undefined);
  assert.equal(backupBefore(backups, { lsn: '0/A0000000' })?.label, '20261205-100000F_20261205-110000I', '0/9A000028 < 0/A0000000 though "9A" > "A" as text');
  assert.equal(backupBefore(backups, { lsn: '1/10000028' })?.label, '20261205-130000F');
  assert.equal(backupBefore(backups, { lsn: '0/1' }), undefined);
});
