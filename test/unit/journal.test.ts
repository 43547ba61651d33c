/**
 * The orchestrators' lease (orchestrator/journal.ts) over a faked one-partition
 * log shared by two journals: renewed in the background while held, lapsing
 * within leaseMs when its holder dies, lost (and reported) when renewals fail.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { pino } from 'pino';
import type { EventLog } from '../../common/eventlog.ts';
import { Journal, LeaseLost } from '../../orchestrator/journal.ts';
import type { OrchEvent } from '../../schemas/index.ts';

const LEASE_MS = 300;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One partition: every published event reaches every subscriber, in publish order, a little later. */
function fakeLog() {
  const subscribers: Array<(e: OrchEvent) => void> = [];
  const failing = new Set<string>();
  const log = {
    publisher: () => async (events: Array<{ value: OrchEvent }>) => {
      await sleep(2);
      for (const { value } of events) {
        if (failing.has(value.orchestrator)) throw new Error('broker unavailable');
        for (const s of subscribers) s(value);
      }
    },
    subscribe: async (_topic: string, handler: (e: OrchEvent) => void) => {
      subscribers.push(handler);
      return { caughtUp: Promise.resolve(), stop: async () => undefined };
    },
  } as unknown as EventLog;
  return { log, failing };
}

async function twoJournals() {
  const { log, failing } = fakeLog();
  const quiet = pino({ level: 'silent' });
  const a = new Journal(log, 'orch-a', quiet);
  const b = new Journal(log, 'orch-b', quiet);
  await Promise.all([a.start(), b.start()]);
  return { a, b, failing };
}

test('a held lease is renewed in the background: the holder keeps it through a step longer than the lease', async () => {
  const { a, b } = await twoJournals();
  assert.equal(await a.claim('db', '-', 'failover', 2n, LEASE_MS), true);
  await sleep(LEASE_MS * 3);
  a.assertHeld('db', '-');
  assert.equal(b.heldElsewhere('db/-'), true);
  assert.equal(await b.claim('db', '-', 'failover', 3n, LEASE_MS), false);
  await a.release('db', '-', 'failover');
  await a.stop();
  await b.stop();
});

test('a dead holder\'s lease lapses within leaseMs, and another orchestrator can claim then, not before', async () => {
  const { a, b } = await twoJournals();
  assert.equal(await a.claim('db', '-', 'failover', 2n, LEASE_MS), true);
  await sleep(LEASE_MS / 2);
  await a.stop(); // dies: no renewal, no release
  const died = Date.now();
  assert.equal(b.heldElsewhere('db/-'), true);
  while (b.heldElsewhere('db/-')) await sleep(5);
  const waited = Date.now() - died;
  assert.ok(waited <= LEASE_MS + 20, `the lease outlived its holder by ${waited} ms`);
  assert.equal(await b.claim('db', '-', 'failover', 3n, LEASE_MS), true);
  assert.equal(b.claimedTerm('db/-'), 3n);
  await b.release('db', '-', 'failover');
  await b.stop();
});

test('when renewals fail the holder learns it before the lease lapses for the others, and stops at its next step', async () => {
  const { a, b, failing } = await twoJournals();
  assert.equal(await a.claim('db', '-', 'switchover', 2n, LEASE_MS), true);
  failing.add('orch-a');
  await sleep(LEASE_MS / 2);
  assert.throws(() => a.assertHeld('db', '-'), LeaseLost);
  // The others still see the lease for the remainder: the holder gave up first (the margin for clock skew).
  assert.equal(b.heldElsewhere('db/-'), true);
  await sleep(LEASE_MS);
  assert.equal(await b.claim('db', '-', 'switchover', 3n, LEASE_MS), true);
  await b.release('db', '-', 'switchover');
  await a.stop();
  await b.stop();
});

test('a released lease stays free of renewals; the others hold back briefly, then claim', async () => {
  const { a, b } = await twoJournals();
  assert.equal(await a.claim('db', '-', 'repoint', 1n, LEASE_MS), true);
  await a.release('db', '-', 'repoint');
  assert.throws(() => a.assertHeld('db', '-'), LeaseLost);
  assert.equal(b.heldElsewhere('db/-'), true); // its announcements may still be on their way
  await sleep(1_050);
  assert.equal(a.lease('db/-'), undefined); // no renewal came after the release
  assert.equal(await b.claim('db', '-', 'repoint', 1n, LEASE_MS), true);
  await b.release('db', '-', 'repoint');
  await a.stop();
  await b.stop();
});

test('an operator\'s request outwaits another orchestrator\'s short hold, and says who holds the shard when it cannot', async () => {
  const { a, b } = await twoJournals();
  assert.equal(await a.claim('db', '-', 'repoint', 1n, LEASE_MS), true);
  assert.equal(await b.claim('db', '-', 'switchover', 2n, LEASE_MS), false);
  assert.equal(b.whyNotClaimed('db/-'), `another orchestrator (${a.orchestrator}) holds db/-`);
  assert.equal(await b.awaitFree('db/-', 100), false); // a still renews
  setTimeout(() => void a.release('db', '-', 'repoint'), 200);
  const started = Date.now();
  assert.equal(await b.awaitFree('db/-', 5_000), true);
  assert.ok(Date.now() - started >= 1_000, 'the settle time after a release is waited out too');
  assert.equal(await b.claim('db', '-', 'switchover', 2n, LEASE_MS), true);
  await b.release('db', '-', 'switchover');
  await a.stop();
  await b.stop();
});
