// The primary's lease table of a pooler with several workers (router/pooler/leases.ts,
// decision 0057): the bound per Postgres, first come first served, and who is asked to
// give a connection back. Workers are simulated: each holds connections that are
// either all busy (clients always queued: sustained load) or idle.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { aboveFairShare, LeaseArbiter, type LeaseMessage } from '../../router/pooler/leases.ts';

const KEY = 'postgres\u0000postgres';

/** A worker as the arbiter sees it through its messages. */
class SimWorker {
  held = 0;
  /** Connections with no client: given back when asked, whatever the kind of ask. */
  idle = 0;
  /** Clients queued with no connection: each granted lease becomes a busy connection. */
  wants = 0;
  givenBack = 0;
  asked = { next: 0, idle: 0 };
  /** Asked for a connection it leaves idle and had none: the next one that goes idle goes (the reaper's check). */
  private flagged = false;

  constructor(readonly id: number, private readonly sim: Sim) {}

  /** Asks for `n` more connections (its clients queue for them). */
  want(n: number): void {
    this.wants += n;
    for (let i = 0; i < n; i++) this.sim.post(this.id, { mg: 'lease', key: KEY, poolSize: this.sim.poolSize });
  }

  receive(msg: LeaseMessage): void {
    if (msg.mg === 'granted') {
      // A lease its clients no longer wait for goes straight back, as a pool does.
      if (this.wants === 0) return this.sim.post(this.id, { mg: 'unlease', key: KEY });
      this.held++;
      this.wants--;
    } else if (msg.mg === 'wanted') {
      this.asked[msg.only]++;
      if (this.idle > 0) this.giveBack(() => this.idle--);
      // Busy and above its share: its next freed connection goes, and its clients still queue for one.
      else if (msg.only === 'next' && this.held > 0) this.giveBack(() => this.want(1));
      else this.flagged = true;
    }
  }

  /** `n` of its clients leave (their lease requests still queued stay queued): their connections go idle. */
  leave(n: number): void {
    const fromQueue = Math.min(n, this.wants);
    this.wants -= fromQueue;
    this.idle += n - fromQueue;
    if (this.flagged && this.idle > 0) {
      this.flagged = false;
      this.giveBack(() => this.idle--);
    }
  }

  private giveBack(then: () => void): void {
    this.held--;
    this.givenBack++;
    this.sim.post(this.id, { mg: 'unlease', key: KEY });
    then();
  }
}

/** The arbiter and its workers, with messages delivered one at a time in order (as over IPC). */
class Sim {
  readonly workers = new Map<number, SimWorker>();
  private readonly inbox: Array<{ to: 'primary' | number; from: number; msg: LeaseMessage }> = [];
  readonly arbiter = new LeaseArbiter((worker, msg) => {
    if (!this.workers.has(worker)) return false;
    this.inbox.push({ to: worker, from: 0, msg });
    return true;
  });

  constructor(readonly poolSize: number, workers: number) {
    for (let id = 1; id <= workers; id++) this.workers.set(id, new SimWorker(id, this));
  }

  w(id: number): SimWorker {
    return this.workers.get(id)!;
  }

  post(from: number, msg: LeaseMessage): void {
    this.inbox.push({ to: 'primary', from, msg });
  }

  /** Delivers until nothing moves; fails if connections never settle. */
  run(maxMessages = 10_000): number {
    let n = 0;
    while (this.inbox.length) {
      assert.ok(++n <= maxMessages, `still exchanging messages after ${maxMessages}: leases never settle`);
      const { to, from, msg } = this.inbox.shift()!;
      if (to === 'primary') this.arbiter.handle(from, msg);
      else this.workers.get(to)?.receive(msg);
      assert.ok(this.arbiter.total(KEY) <= this.poolSize, `bound exceeded: ${this.arbiter.total(KEY)} leases of ${this.poolSize}`);
    }
    return n;
  }

  /** Leases each worker holds, in worker order. */
  held(): number[] {
    return [...this.workers.values()].map((w) => w.held);
  }

  givenBack(): number {
    return [...this.workers.values()].reduce((n, w) => n + w.givenBack, 0);
  }
}

test('fair share: only above the even split, and only when the move narrows the gap', () => {
  assert.equal(aboveFairShare(20, 0, 20, 2), true);
  assert.equal(aboveFairShare(11, 9, 20, 2), true);
  assert.equal(aboveFairShare(10, 10, 20, 2), false, 'an even split stays');
  assert.equal(aboveFairShare(10, 9, 20, 2), false, 'one apart is the remainder, not a reason to move');
  assert.equal(aboveFairShare(3, 2, 5, 2), false, 'an odd pool split 3/2 stays');
  assert.equal(aboveFairShare(4, 1, 5, 2), true);
  assert.equal(aboveFairShare(7, 6, 20, 3), false);
  assert.equal(aboveFairShare(8, 5, 20, 3), true);
  assert.equal(aboveFairShare(6, 6, 20, 3), false, 'the waiting worker already has as much');
  assert.equal(aboveFairShare(2, 0, 4, 2), false, 'at its share, a worker keeps its busy connections');
});

test('sustained load on two workers: connections settle at an even split, then nothing moves', () => {
  const sim = new Sim(20, 2);
  // Worker 1's clients arrive first and take the whole pool; worker 2's then queue for 20 as well.
  sim.w(1).want(20);
  sim.run();
  assert.equal(sim.w(1).held, 20);
  sim.w(2).want(20);
  sim.run();
  assert.deepEqual(sim.held(), [10, 10]);
  assert.equal(sim.givenBack(), 10, 'exactly the 10 connections that had to move moved');
  assert.equal(sim.w(2).asked.next, 0, 'the worker that gained was never asked to give back at once');
  // More clients on either side change nothing: each is at its share and busy.
  const before = sim.givenBack();
  sim.w(1).want(5);
  sim.w(2).want(5);
  sim.run();
  assert.deepEqual(sim.held(), [10, 10]);
  assert.equal(sim.givenBack(), before);
  assert.equal(sim.arbiter.total(KEY), 20);
});

test('an uneven split settles too: pool 5 on two workers, pool 20 on three', () => {
  const two = new Sim(5, 2);
  two.w(1).want(5);
  two.run();
  two.w(2).want(5);
  two.run();
  assert.deepEqual(two.held().sort(), [2, 3]);

  const three = new Sim(20, 3);
  three.w(1).want(20);
  three.run();
  three.w(2).want(20);
  three.w(3).want(20);
  three.run();
  assert.deepEqual(three.held().sort(), [6, 7, 7]);
});

test('a worker that leaves its connections idle gives every one to a worker that needs them', () => {
  const sim = new Sim(4, 2);
  sim.w(1).want(4);
  sim.run();
  // Worker 1's clients committed: its 4 connections are idle.
  sim.w(1).idle = 4;
  sim.w(1).wants = 0;
  sim.w(2).want(4);
  sim.run();
  assert.deepEqual(sim.held(), [0, 4]);
  assert.ok(sim.w(1).asked.idle > 0, 'below its share, worker 1 was asked only for what it leaves idle');
});

test('a worker at its share keeps busy connections; the one waiting gets only what is idle', () => {
  const sim = new Sim(4, 2);
  sim.w(1).want(2);
  sim.w(2).want(2);
  sim.run();
  sim.w(2).want(2);
  sim.run();
  assert.deepEqual(sim.held(), [2, 2]);
  assert.equal(sim.w(1).asked.next, 0);
  assert.ok(sim.w(1).asked.idle > 0);
  assert.equal(sim.w(1).givenBack, 0);
});

test('requests left queued by clients that went away do not keep another worker waiting', () => {
  const sim = new Sim(4, 2);
  sim.w(1).want(2);
  sim.w(2).want(2);
  sim.run();
  // Both workers' clients queue for more than the pool (4 requests each, 2 granted each).
  sim.w(2).want(2);
  sim.w(1).want(2);
  sim.run();
  assert.deepEqual(sim.held(), [2, 2]);
  // Worker 2's clients all leave: its 2 connections go idle, its 2 requests stay queued ahead of worker 1's.
  sim.w(2).leave(4);
  sim.run();
  assert.deepEqual(sim.held(), [4, 0], 'worker 1\'s waiting clients got worker 2\'s idle connections');
  assert.equal(sim.arbiter.total(KEY), 4);
});

test('a dead worker\'s leases and requests go: the bound is usable again at once', () => {
  const sim = new Sim(4, 2);
  sim.w(1).want(4);
  sim.run();
  sim.w(2).want(3);
  sim.run(); // worker 1 is busy and asked: it gives 2 (down to its share), worker 2 still waits for 1
  assert.deepEqual(sim.held(), [2, 2]);
  sim.workers.delete(1);
  sim.arbiter.forget(1);
  sim.run();
  assert.equal(sim.arbiter.holds(KEY, 1), 0);
  assert.deepEqual([sim.w(2).held, sim.arbiter.total(KEY)], [3, 3]);
});
