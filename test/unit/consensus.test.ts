/** The quorum arithmetic of elections, policy text, ranking of voters, and the voter's durable pledge. */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { parseSpec, SpecError } from '../../compose/spec.ts';
import { PledgeFile } from '../../ingest/consensus/pledge.ts';
import {
  canAcknowledge, comparePositions, decodePosition, encodePosition, parsePolicy, pledgedTermIn, recruitmentSuffices, refusal,
  syncStandbyNames, type Member, type VoterPosition,
} from '../../schemas/index.ts';

const m = (instanceId: string, cell: string): Member => ({ instanceId, cell });
const three = [m('a', 'z1'), m('b', 'z2'), m('c', 'z3')];

test('policies parse, and bad ones are refused with the expected forms', () => {
  assert.deepEqual(parsePolicy('ANY_2'), { n: 2, multiCell: false });
  assert.deepEqual(parsePolicy('MULTI_CELL_ANY_3'), { n: 3, multiCell: true });
  for (const bad of ['ANY_0', 'ANY_10', 'any_2', 'ALL', '']) assert.throws(() => parsePolicy(bad), /expected ANY_<n> or MULTI_CELL_ANY_<n>/);
});

test('ANY_2 of 3: two recruited voters suffice, one does not', () => {
  const p = parsePolicy('ANY_2');
  assert.equal(recruitmentSuffices(p, three, new Set(['a'])), false); // b and c could still acknowledge for the old primary
  assert.equal(recruitmentSuffices(p, three, new Set(['b', 'c'])), true);
  assert.equal(recruitmentSuffices(p, three, new Set(['a', 'b', 'c'])), true);
});

test('ANY_3 of 3: one recruited voter revokes, but a majority is still required (one primary per term)', () => {
  const p = parsePolicy('ANY_3');
  assert.equal(canAcknowledge(p, [m('b', 'z2'), m('c', 'z3')]), false);
  assert.equal(recruitmentSuffices(p, three, new Set(['a'])), false);
  assert.equal(recruitmentSuffices(p, three, new Set(['a', 'b'])), true);
});

test('multi-cell policies count cells, not nodes', () => {
  const p = parsePolicy('MULTI_CELL_ANY_2');
  const cohort = [m('a', 'z1'), m('b', 'z1'), m('c', 'z2'), m('d', 'z2'), m('e', 'z3')];
  // Unrecruited c, d (one cell) cannot acknowledge under 2 cells; a, b, e are a majority.
  assert.equal(recruitmentSuffices(p, cohort, new Set(['a', 'b', 'e'])), true);
  // Unrecruited b and c span two cells: they could.
  assert.equal(recruitmentSuffices(p, cohort, new Set(['a', 'd', 'e'])), false);
});

test('synchronous_standby_names lists the other members, quoted, ANY n-1; multi-cell leaves out the primary cell', () => {
  assert.equal(syncStandbyNames(parsePolicy('ANY_2'), three, three[0]), 'ANY 1 ("b", "c")');
  assert.equal(syncStandbyNames(parsePolicy('ANY_3'), three, three[1]), 'ANY 2 ("a", "c")');
  assert.equal(syncStandbyNames(parsePolicy('ANY_1'), three, three[0]), '');
  const cohort = [m('a', 'z1'), m('b', 'z1'), m('c', 'z2')];
  assert.equal(syncStandbyNames(parsePolicy('MULTI_CELL_ANY_2'), cohort, cohort[0]), 'ANY 1 ("c")');
  assert.equal(syncStandbyNames(parsePolicy('ANY_2'), [m('x"y', 'z1'), m('p', 'z2')], m('p', 'z2')), 'ANY 1 ("x""y")');
});

test('voters rank by the newest rule first, then by WAL; positions survive the JSON of a command result', () => {
  const pos = (ruleTerm: bigint, lsn: bigint): VoterPosition => ({ term: 9n, lsn, ruleTerm, ruleNumber: ruleTerm, timeline: 1, inRecovery: true, empty: false });
  const oldPrimaryWithMoreWal = pos(1n, 900n);
  const replicaOfNewerTerm = pos(2n, 500n);
  assert.ok(comparePositions(replicaOfNewerTerm, oldPrimaryWithMoreWal) > 0);
  assert.ok(comparePositions(pos(2n, 600n), replicaOfNewerTerm) > 0);
  assert.equal(comparePositions(pos(2n, 600n), pos(2n, 600n)), 0);
  const big = pos(3n, (1n << 60n) + 7n);
  assert.deepEqual(decodePosition(encodePosition(big)), big);
  assert.equal(pledgedTermIn(refusal(4n, 7n)), 7n);
});

test('the pledge is durable, beside (not inside) the data directory, and starts at term 0', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pledge-'));
  const dataDir = path.join(dir, 'inst');
  const pledge = new PledgeFile(dataDir);
  assert.deepEqual(pledge.read(), { term: 0n, orchestrator: '' });
  pledge.write({ term: 12n, orchestrator: 'orch-zone2' });
  assert.deepEqual(new PledgeFile(dataDir).read(), { term: 12n, orchestrator: 'orch-zone2' });
  assert.equal(path.dirname(pledge.file), dir);
  fs.rmSync(dir, { recursive: true, force: true });
});

test('the spec validates durability per database', () => {
  assert.equal(parseSpec({ databases: [{ name: 'db', durability: 'ANY_3' }] }).databases[0].durability, 'ANY_3');
  assert.throws(() => parseSpec({ databases: [{ name: 'db', durability: 'ALL' }] }), (e: Error) => e instanceof SpecError && /databases\.0\.durability: must be ANY_<n>/.test(e.message));
  assert.throws(() => parseSpec({ databases: [{ name: 'db', instancesPerShard: 2, durability: 'ANY_3' }] }), /durability needs more instances/);
});
