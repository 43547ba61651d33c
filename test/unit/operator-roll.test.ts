/**
 * The state machine of a shard's planned changes (operator/roll.ts) against in-memory pods and a
 * fake orchestrator; test/integration/operator.test.ts runs it against a real API server.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { V1Pod } from '@kubernetes/client-node';
import { createLogger } from '../../common/log.ts';
import type { Answer, OrchestratorApi } from '../../operator/orchestrator.ts';
import { ShardRoller, SWITCHOVER_WAIT_MS, type ShardContext, type ShardSet } from '../../operator/roll.ts';

const log = createLogger('test');
log.level = 'silent';
const cells = ['z1', 'z2', 'z3'];

/** One shard of 4 instances: z1 holds orders-0-z1-0 and orders-0-z1-3, z2 and z3 one each. */
class Shard {
  sets: ShardSet[] = [['c-orders-0-z1', 'z1', 2], ['c-orders-0-z2', 'z2', 1], ['c-orders-0-z3', 'z3', 1]].map(([name, cell, replicas]) => ({
    metadata: { name: name as string, generation: 2, labels: { 'multigres.io/cell': cell as string } },
    spec: { replicas: replicas as number }, status: { observedGeneration: 2, updateRevision: 'new' },
  }));
  pods: V1Pod[] = this.sets.flatMap((s) => Array.from({ length: s.spec!.replicas! }, (_, i) => pod(`${s.metadata!.name}-${i}`, s.metadata!.name!, 'old', true)));
  deleted: string[] = [];

  /** Plays the StatefulSet controller: a deleted pod comes back on the new revision, not ready yet. */
  async delete(p: V1Pod): Promise<void> {
    this.deleted.push(p.metadata!.name!);
    this.pods = this.pods.map((x) => (x.metadata!.name === p.metadata!.name ? pod(p.metadata!.name!, setOf(p), 'new', false) : x));
  }

  /** Plays the kubelet. */
  readyAll(): void {
    this.pods = this.pods.map((p) => pod(p.metadata!.name!, setOf(p), p.metadata!.labels!['controller-revision-hash'], true));
  }
}

const setOf = (p: V1Pod) => p.metadata!.ownerReferences![0].name;
function pod(name: string, set: string, revision: string, ready: boolean): V1Pod {
  return {
    metadata: { name, namespace: 'ns', uid: `${name}-${revision}`, labels: { 'controller-revision-hash': revision }, ownerReferences: [{ kind: 'StatefulSet', name: set, apiVersion: 'apps/v1', uid: set }] },
    status: { conditions: [{ type: 'Ready', status: ready ? 'True' : 'False' }] },
  };
}

/** Records every request; answers as told (default: accepted). */
class FakeOrchestrator implements OrchestratorApi {
  calls: string[] = [];
  switchoverAnswer: Answer = { status: 200, body: { primary: 'next', term: '6' } };
  removeAnswer: Answer = { status: 202, body: { operation: { id: 'op-1', state: 'running' } } };
  op: Answer = { status: 200, body: { id: 'op-1', state: 'running', steps: [{ message: 'draining' }] } };
  running: Array<{ id: string; kind: string; target: string; state: string }> = [];

  async switchover(database: string, shard: string): Promise<Answer> {
    this.calls.push(`switchover ${database}/${shard}`);
    return this.switchoverAnswer;
  }
  async removeReplica(database: string, shard: string, instanceId: string): Promise<Answer> {
    this.calls.push(`remove ${database}/${shard} ${instanceId}`);
    return this.removeAnswer;
  }
  async operation(id: string): Promise<Answer> {
    this.calls.push(`operation ${id}`);
    return this.op;
  }
  async operations(): Promise<Answer> {
    return { status: 200, body: { operations: this.running } };
  }
  async applyVSchema(): Promise<Answer> {
    throw new Error('a roll never applies a VSchema');
  }
}

function context(orch: FakeOrchestrator, primary: { primary: string; term: number } | undefined): ShardContext {
  return { key: 'ns/c/orders/-', database: 'orders', shard: '-', cells, primary: primary && { shard: '-', ...primary }, orchestrator: async () => orch, log };
}

test('a roll replaces the replicas one at a time, then switches over, then replaces the old primary', async () => {
  const shard = new Shard();
  const orch = new FakeOrchestrator();
  let now = 0;
  const roller = new ShardRoller((p) => shard.delete(p), () => now);
  let primary = { primary: 'orders-0-z3-2', term: 5 }; // pod c-orders-0-z3-0
  const step = () => roller.roll(context(orch, primary), shard.sets, shard.pods);

  const replaced: string[] = [];
  for (let i = 0; i < 3; i++) {
    const p = await step();
    assert.equal(p?.reason, 'RollingUpdate');
    assert.match(p!.message, /orders\/-: replacing pod c-orders-0-z\d-\d \(orders-0-z\d-\d, replica; \d\/4 pods on the new template\)/);
    replaced.push(shard.deleted.at(-1)!);
    // The replacement is not Ready yet: nothing else is touched.
    assert.match((await step())!.message, /waiting for pod .* to be Ready/);
    assert.equal(shard.deleted.length, i + 1);
    shard.readyAll();
  }
  assert.deepEqual(replaced, ['c-orders-0-z1-0', 'c-orders-0-z1-1', 'c-orders-0-z2-0'], 'the replicas, never the primary\'s pod');
  assert.deepEqual(orch.calls, []);

  let p = await step();
  assert.deepEqual(orch.calls, ['switchover orders/-']);
  assert.match(p!.message, /the primary orders-0-z3-2 is on pod c-orders-0-z3-0 .*waiting for a term above 5/);
  // Until the log shows a higher term the old primary's pod stays, and no second switchover is asked for.
  now += 5_000;
  p = await step();
  assert.deepEqual([shard.deleted.length, orch.calls.length], [3, 1]);
  primary = { primary: 'orders-0-z1-0', term: 6 };
  p = await step();
  assert.deepEqual(shard.deleted, [...replaced, 'c-orders-0-z3-0']);
  assert.match(p!.message, /replacing pod c-orders-0-z3-0 \(orders-0-z3-2, old primary/);
  shard.readyAll();
  assert.equal(await step(), undefined, 'every pod on the new template: nothing left to do');
});

test('a refused switchover leaves the primary alone, degrades, and is retried with a backoff', async () => {
  const shard = new Shard();
  shard.pods = shard.pods.map((p) => (p.metadata!.name === 'c-orders-0-z3-0' ? p : pod(p.metadata!.name!, setOf(p), 'new', true)));
  const orch = new FakeOrchestrator();
  orch.switchoverAnswer = { status: 409, body: { error: 'no caught-up replica to hand over to' } };
  let now = 0;
  const roller = new ShardRoller((p) => shard.delete(p), () => now);
  const ctx = context(orch, { primary: 'orders-0-z3-2', term: 5 });

  let p = await roller.roll(ctx, shard.sets, shard.pods);
  assert.deepEqual([p!.failed, p!.reason, p!.recheckMs], [true, 'SwitchoverFailed', 1_000]);
  assert.match(p!.message, /switchover refused: HTTP 409: no caught-up replica to hand over to; retrying in 1 s/);
  p = await roller.roll(ctx, shard.sets, shard.pods);
  assert.equal(orch.calls.length, 1, 'not asked again during the backoff');
  assert.equal(p!.failed, true);
  now += 1_000;
  p = await roller.roll(ctx, shard.sets, shard.pods);
  assert.equal(orch.calls.length, 2);
  assert.equal(p!.recheckMs, 2_000, 'the backoff doubles');
  assert.deepEqual(shard.deleted, [], 'the primary\'s pod is never deleted without a new term');

  // Accepted, but no new term shows up: reported once the wait is over, then asked again.
  orch.switchoverAnswer = { status: 200, body: {} };
  now += 2_000;
  p = await roller.roll(ctx, shard.sets, shard.pods);
  assert.equal(p!.failed, false);
  now += SWITCHOVER_WAIT_MS + 1;
  p = await roller.roll(ctx, shard.sets, shard.pods);
  assert.match(p!.message, /no new primary on the topology log 30 s after the switchover/);
  assert.deepEqual(shard.deleted, []);
});

test('nothing is deleted before the topology log is read to its end, nor while the controller has not seen the template', async () => {
  const shard = new Shard();
  const orch = new FakeOrchestrator();
  const roller = new ShardRoller((p) => shard.delete(p));
  let p = await roller.roll(context(orch, undefined), shard.sets, shard.pods);
  assert.match(p!.message, /waiting for the shard's primary on the topology log/);
  shard.sets[0].status!.observedGeneration = 1;
  p = await roller.roll(context(orch, { primary: 'orders-0-z3-2', term: 5 }), shard.sets, shard.pods);
  assert.match(p!.message, /waiting for the StatefulSet controller/);
  assert.deepEqual([shard.deleted, orch.calls], [[], []]);
});

test('an operator restarted mid-roll carries on from the pods: a new roller deletes the next replica', async () => {
  const shard = new Shard();
  const orch = new FakeOrchestrator();
  await new ShardRoller((p) => shard.delete(p)).roll(context(orch, { primary: 'orders-0-z3-2', term: 5 }), shard.sets, shard.pods);
  shard.readyAll();
  await new ShardRoller((p) => shard.delete(p)).roll(context(orch, { primary: 'orders-0-z3-2', term: 5 }), shard.sets, shard.pods);
  assert.deepEqual(shard.deleted, ['c-orders-0-z1-0', 'c-orders-0-z1-1']);
});

test('one instance fewer: removed through the orchestrator first, then the StatefulSet shrinks', async () => {
  const orch = new FakeOrchestrator();
  const roller = new ShardRoller(async () => undefined);
  const ctx = context(orch, { primary: 'orders-0-z3-2', term: 5 });
  const sets = [{ name: 'c-orders-0-z1', cell: 'z1', current: 2, desired: 1 }, { name: 'c-orders-0-z2', cell: 'z2', current: 1, desired: 1 }];

  let r = await roller.shrink(ctx, sets);
  assert.deepEqual([...r.replicas], [['c-orders-0-z1', 2]], 'held while the instance is removed');
  assert.deepEqual(orch.calls, ['remove orders/- orders-0-z1-3', 'operation op-1'], 'the instance of the highest ordinal of zone 1');
  assert.match(r.progress!.message, /removing orders-0-z1-3 \(pod c-orders-0-z1-1\): draining \(operation op-1\)/);
  r = await roller.shrink(ctx, sets);
  assert.equal(orch.calls.filter((c) => c.startsWith('remove')).length, 1, 'asked once');
  orch.op = { status: 200, body: { id: 'op-1', state: 'succeeded' } };
  r = await roller.shrink(ctx, sets);
  assert.deepEqual([...r.replicas], [['c-orders-0-z1', 1]]);

  // An instance the orchestrator does not know (never registered): nothing to wait for.
  const fresh = new FakeOrchestrator();
  fresh.removeAnswer = { status: 404, body: { error: 'orders-0-z1-3 is not an instance of orders/-' } };
  r = await new ShardRoller(async () => undefined).shrink(context(fresh, { primary: 'orders-0-z3-2', term: 5 }), sets);
  assert.deepEqual([...r.replicas], [['c-orders-0-z1', 1]]);
  assert.equal((await new ShardRoller(async () => undefined).shrink(ctx, sets.slice(1))).progress, undefined, 'nothing shrinks: nothing to do');
});

test('the instance to go is the primary: a switchover first; a refusal degrades; a running removal is adopted after a restart', async () => {
  const orch = new FakeOrchestrator();
  const roller = new ShardRoller(async () => undefined);
  const sets = [{ name: 'c-orders-0-z3', cell: 'z3', current: 1, desired: 0 }];
  let r = await roller.shrink(context(orch, { primary: 'orders-0-z3-2', term: 5 }), sets);
  assert.deepEqual(orch.calls, ['switchover orders/-']);
  assert.equal(r.replicas.get('c-orders-0-z3'), 1);
  assert.match(r.progress!.message, /removing orders-0-z3-2 \(pod c-orders-0-z3-0\): it is the primary: switchover asked for/);

  orch.removeAnswer = { status: 409, body: { error: 'the durability policy ANY_2 of orders/- needs orders-0-z3-2' } };
  r = await roller.shrink(context(orch, { primary: 'orders-0-z1-0', term: 6 }), sets);
  assert.deepEqual([r.progress!.reason, r.progress!.failed, r.replicas.get('c-orders-0-z3')], ['ReplicaRemovalFailed', true, 1]);
  assert.match(r.progress!.message, /HTTP 409: the durability policy ANY_2/);

  const restarted = new FakeOrchestrator();
  restarted.running = [{ id: 'op-7', kind: 'replica remove', target: 'orders/- orders-0-z3-2', state: 'running' }];
  r = await new ShardRoller(async () => undefined).shrink(context(restarted, { primary: 'orders-0-z1-0', term: 6 }), sets);
  assert.deepEqual(restarted.calls, ['operation op-7'], 'no second removal of the same instance');
});
