// Where a REST request's transaction runs through the gateway (router/rest/gateway.ts), with a stub discovery.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { RestError } from '../../router/rest/errors.ts';
import { restEndpoint, type RestDiscovery } from '../../router/rest/gateway.ts';

const primary = { instanceId: 'p', cell: 'z1', host: '127.0.0.1', port: 1 };
const replica = { instanceId: 'r', cell: 'z2', host: '127.0.0.1', port: 2, lagBytes: 0n, lagSeconds: 0 };

function discovery(over: Partial<Record<keyof RestDiscovery, unknown>> = {}): RestDiscovery {
  return {
    hasDatabase: () => true,
    keyRanges: () => [{ shard: '-', start: '', end: '' }],
    replicas: () => [replica],
    waitForPrimary: async () => primary,
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
