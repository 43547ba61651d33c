/** Routing rules (decision 0039): the fold of RoutingRuleChanged, and where the gateway sends each statement of a source database. */
import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import { Planner, plannerReady } from '../../router/planner/planner.ts';
import { routeStatements, type Routed } from '../../router/gateway/routing.ts';
import { applyTopologyEvent, emptyTopology, movedTablesOf, parseVSchema, payload, type RoutingState, type TopologyState } from '../../schemas/index.ts';

const target = new Planner(parseVSchema({ vindexes: { hash: { type: 'hash' } }, tables: { orders: { column_vindexes: [{ column: 'id', name: 'hash' }] } } }));
const sessionPlanner = new Planner(parseVSchema({}));
before(() => plannerReady);

function rule(state: TopologyState, version: bigint, s: RoutingState, tables = ['public.orders']): void {
  applyTopologyEvent(state, {
    eventId: `e${version}`, ts: new Date(), source: 'test',
    payload: payload('RoutingRuleChanged', { workflow: 'mt', version, sourceDatabase: 'src', targetDatabase: 'dst', tables, state: s }),
  });
}

function route(state: TopologyState, sql: string, inTransaction = false, sharded?: Planner): Routed[] {
  return routeStatements(sql, {
    source: 'src', rules: movedTablesOf(state, 'src')!, inTransaction, sessionPlanner: sharded ?? sessionPlanner, sourceSharded: sharded !== undefined, targetPlanner: () => target,
  });
}
const where = (r: Routed) => (r.held ? 'held' : `${r.database}:${r.plan.kind}`);

test('the fold keeps the newest version of a rule; a rule with no tables moves nothing', () => {
  const state = emptyTopology();
  assert.equal(movedTablesOf(state, 'src'), undefined);
  rule(state, 2n, 'TARGET');
  rule(state, 1n, 'SOURCE'); // older: ignored
  assert.equal(movedTablesOf(state, 'src')!.get('public.orders')!.state, 'TARGET');
  assert.equal(movedTablesOf(state, 'dst'), undefined);
  rule(state, 3n, 'SOURCE', []);
  assert.equal(movedTablesOf(state, 'src'), undefined);
});

test('statements follow the rule: source, reads to the target, held during the switch, then everything to the target', () => {
  const state = emptyTopology();
  rule(state, 1n, 'SOURCE');
  assert.deepEqual(route(state, 'SELECT * FROM orders WHERE id = 1; UPDATE orders SET note = 1 WHERE id = 2').map(where), ['src:reference', 'src:all']);
  rule(state, 2n, 'READS_TARGET');
  assert.equal(where(route(state, 'SELECT * FROM orders WHERE id = 1')[0]), 'dst:select');
  assert.equal(where(route(state, 'SELECT * FROM orders WHERE id = 1', true)[0]), 'src:reference', 'reads in a transaction stay with its writes');
  assert.equal(where(route(state, 'SELECT * FROM orders WHERE id = 1 FOR UPDATE')[0]), 'src:all');
  assert.equal(where(route(state, 'WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT * FROM d')[0]), 'src:all');
  rule(state, 3n, 'WRITES_HELD');
  assert.equal(where(route(state, 'INSERT INTO orders (id) VALUES (1)')[0]), 'held');
  assert.equal(where(route(state, 'INSERT INTO orders (id) VALUES (1)', true)[0]), 'src:all', 'a transaction is not held: it may hold the locks the switch waits for');
  assert.equal(where(route(state, 'SELECT * FROM customers')[0]), 'src:reference', 'tables that stay are never held');
  rule(state, 4n, 'TARGET');
  assert.equal(where(route(state, 'INSERT INTO public.orders (id) VALUES (1)')[0]), 'dst:insert');
  assert.deepEqual(route(state, 'BEGIN; SET work_mem = 1000; SELECT 1').map(where), ['src:begin', 'src:set', 'src:reference']);
});

test('a statement mixing moved tables with tables that stay is refused, naming both', () => {
  const state = emptyTopology();
  rule(state, 1n, 'TARGET');
  const [r] = route(state, 'SELECT * FROM orders o JOIN customers c ON c.name = o.customer');
  assert.equal(r.held, undefined);
  assert.equal(r.held === undefined && r.plan.kind, 'refused');
  assert.match(r.held === undefined && r.plan.kind === 'refused' ? r.plan.message : '', /served by dst \(public\.orders\) with tables of src \(public\.customers\)/);
  // Before the switch nothing is refused: the source has both.
  rule(state, 2n, 'SOURCE');
  assert.equal(where(route(state, 'SELECT * FROM orders o JOIN customers c ON c.name = o.customer')[0]), 'src:reference');
});

test('a sharded source: its statements are planned with its own VSchema until the switch, then with the target\'s', () => {
  const state = emptyTopology();
  rule(state, 1n, 'SOURCE');
  const source = new Planner(parseVSchema({ vindexes: { hash: { type: 'hash' } }, tables: { orders: { column_vindexes: [{ column: 'id', name: 'hash' }] } } }));
  const [r] = route(state, 'SELECT * FROM orders WHERE id = 1', false, source);
  assert.equal(where(r), 'src:select');
  assert.ok(!r.held && r.plan.kind === 'select' && r.plan.pin !== undefined, 'one shard of the source, pinned by the vindex');
  rule(state, 2n, 'TARGET');
  assert.equal(where(route(state, 'SELECT * FROM orders WHERE id = 1', false, source)[0]), 'dst:select');
});
