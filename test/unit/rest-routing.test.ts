// Where a REST request's transaction runs through the gateway (router/rest/gateway.ts), with a stub discovery.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { RestError } from '../../router/rest/errors.ts';
import { restEndpoint, restRouting, type RestDiscovery } from '../../router/rest/gateway.ts';
import type { RestResponse } from '../../router/rest/handler.ts';
import { emptyTopology, type RoutingState } from '../../schemas/index.ts';

const primary = { instanceId: 'p', cell: 'z1', host: '127.0.0.1', port: 1 };
const replica = { instanceId: 'r', cell: 'z2', host: '127.0.0.1', port: 2, lagBytes: 0n, lagSeconds: 0 };

function discovery(over: Partial<Record<keyof RestDiscovery, unknown>> = {}): RestDiscovery {
  return {
    hasDatabase: () => true,
    keyRanges: () => [{ shard: '-', start: '', end: '' }],
    replicas: () => [replica],
    waitForPrimary: async () => primary,
    holdReason: () => undefined,
    ...over,
  } as unknown as RestDiscovery;
}

test('reads go to a replica only when configured, writes always to the primary', async () => {
  const on = { readsToReplicas: true, bufferWindowMs: 10 };
  const off = { readsToReplicas: false, bufferWindowMs: 10 };
  assert.equal(await restEndpoint(discovery(), 'db', true, on), replica);
  assert.equal(await restEndpoint(discovery(), 'db', false, on), primary);
  assert.equal(await restEndpoint(discovery(), 'db', true, off), primary);
  // no usable replica: the read runs on the primary
  assert.equal(await restEndpoint(discovery({ replicas: () => [] }), 'db', true, on), primary);
});

test('no primary within the buffer window: 503 57P03; unnamed shard of a sharded database: the first key range', async () => {
  await assert.rejects(restEndpoint(discovery({ waitForPrimary: async () => undefined }), 'db', false, { readsToReplicas: false, bufferWindowMs: 10 }),
    (e: RestError) => e.status === 503 && e.code === '57P03');
  const asked: string[] = [];
  const sharded = discovery({
    keyRanges: () => [{ shard: '-80', start: '', end: '80' }, { shard: '80-', start: '80', end: '' }],
    waitForPrimary: async (_db: string, shard: string) => { asked.push(shard); return primary; },
  });
  assert.equal(await restEndpoint(sharded, 'db', false, { readsToReplicas: false, bufferWindowMs: 10 }), primary);
  assert.equal(await restEndpoint(sharded, 'db', false, { readsToReplicas: false, bufferWindowMs: 10 }, '80-'), primary);
  assert.deepEqual(asked, ['-80', '80-']);
  await assert.rejects(restEndpoint(discovery({ keyRanges: () => [] }), 'db', false, { readsToReplicas: false, bufferWindowMs: 10 }),
    (e: RestError) => e.status === 503 && e.code === '57P03');
});

test('a database held stopped (decision 0084): 503 57P03 with the reason at once, neither a replica read nor a wait for a primary', async () => {
  const held = discovery({ holdReason: () => 'deactivated: true on MultigresDatabase db', waitForPrimary: async () => assert.fail('waited for a primary') });
  await assert.rejects(restEndpoint(held, 'db', true, { readsToReplicas: true, bufferWindowMs: 60_000 }),
    (e: RestError) => e.status === 503 && e.code === '57P03' && e.message === 'database "db" is deactivated and held stopped: deactivated: true on MultigresDatabase db');
});

/** A topology with workflow mt moving public.orders from src to dst in `state`, and a discovery whose waitUntil checks every 5 ms. */
function moving(state: RoutingState) {
  const topology = emptyTopology();
  const rule = (s: RoutingState, version: bigint) => ({ workflow: 'mt', version, sourceDatabase: 'src', targetDatabase: 'dst', tables: ['public.orders'], state: s });
  topology.routingRules.set('mt', rule(state, 1n));
  const d = discovery({
    topology,
    waitUntil: async (cond: () => boolean, ms: number) => {
      for (const end = Date.now() + ms; !cond(); await new Promise((r) => setTimeout(r, 5))) if (Date.now() >= end) return false;
      return true;
    },
  });
  return { d, topology, change: (s: RoutingState) => { topology.routingRules.set('mt', rule(s, topology.routingRules.get('mt')!.version + 1n)); topology.applied++; } };
}

const ok: RestResponse = { status: 200, headers: {}, body: '[]' };
const movedAway: RestResponse = { status: 500, headers: {}, body: '{}', code: '55MG1' };

async function ran(route: ReturnType<typeof restRouting>, method: string, path: string, answer: (db: string) => RestResponse = () => ok, headers: Record<string, string> = {}) {
  const tried: string[] = [];
  const res = await route('src', { method, path, headers }, async (db) => { tried.push(db); return answer(db); });
  return { tried, res };
}

test('REST requests on a moved table follow its routing rule: reads once reads switch, everything once writes switch', async () => {
  const opts = { schemas: ['public', 'api'], bufferWindowMs: 1_000 };
  for (const [state, get, post] of [['SOURCE', 'src', 'src'], ['READS_TARGET', 'dst', 'src'], ['TARGET', 'dst', 'dst']] as const) {
    const route = restRouting(moving(state).d, opts);
    assert.deepEqual((await ran(route, 'GET', '/orders')).tried, [get], `GET in ${state}`);
    assert.deepEqual((await ran(route, 'POST', '/orders')).tried, [post], `POST in ${state}`);
    // Other tables, functions and another schema's orders stay with the database named.
    assert.deepEqual((await ran(route, 'GET', '/customers')).tried, ['src']);
    assert.deepEqual((await ran(route, 'POST', '/rpc/orders')).tried, ['src']);
    assert.deepEqual((await ran(route, 'GET', '/orders', undefined, { 'accept-profile': 'api' })).tried, ['src']);
  }
});

test('a REST write waits out the switch, and one the source refused as moved (55MG1) runs again where the rule then points', async () => {
  const opts = { schemas: ['public'], bufferWindowMs: 1_000 };
  const held = moving('WRITES_HELD');
  setTimeout(() => held.change('TARGET'), 50);
  assert.deepEqual((await ran(restRouting(held.d, opts), 'PATCH', '/orders')).tried, ['dst']);

  const late = moving('SOURCE'); // this gateway has not seen the switch begin when the source refuses the write
  const { tried, res } = await ran(restRouting(late.d, opts), 'DELETE', '/orders', (db) => {
    if (db === 'src') setTimeout(() => late.change('TARGET'), 20);
    return db === 'src' ? movedAway : ok;
  });
  assert.deepEqual(tried, ['src', 'dst']);
  assert.equal(res, ok);

  // A switch that outlasts the buffer window: 503 57P03, nothing run.
  const stuck = await ran(restRouting(moving('WRITES_HELD').d, { schemas: ['public'], bufferWindowMs: 30 }), 'POST', '/orders');
  assert.deepEqual(stuck.tried, []);
  assert.equal(stuck.res.status, 503);
  assert.equal(stuck.res.code, '57P03');
});
