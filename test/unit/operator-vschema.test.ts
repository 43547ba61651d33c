/**
 * A database's VSchema by reference (operator/vschema.ts): sent once per content to an
 * orchestrator that validates like the real one (the project's parseVSchema and the admin API's
 * 400), refusals and missing ConfigMaps as conditions, the topology log consulted before sending.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Answer, OrchestratorApi } from '../../operator/orchestrator.ts';
import type { MultigresDatabase } from '../../operator/resources.ts';
import { reconcileVSchema, type VSchemaOutcome } from '../../operator/vschema.ts';
import { parseVSchema, VSchemaError, type VSchemaRecord } from '../../schemas/index.ts';
import { vschemaFaults } from '../../orchestrator/api/vschemas.ts';

const GOOD = 'vindexes: { hash: { type: hash } }\ntables: { orders: { column_vindexes: [{ column: tenant_id, name: hash }] } }\n';
const BAD = '{"tables": {"orders": {"column_vindexes": [{"column": "tenant_id", "name": "nope"}]}}}';

/** The admin API's PUT, validated the same way (schemas' parseVSchema; 400 with the faults). */
function orchestrator(calls: unknown[]): () => Promise<OrchestratorApi> {
  const api = {
    async applyVSchema(_db: string, raw: unknown): Promise<Answer> {
      calls.push(raw);
      try {
        parseVSchema(raw);
      } catch (err) {
        if (!(err instanceof VSchemaError)) throw err;
        return { status: 400, body: { error: `invalid VSchema: ${vschemaFaults(err).map((f) => `${f.field}: ${f.message}`).join('; ')}` } };
      }
      return { status: 200, body: { version: String(calls.length) } };
    },
  } as OrchestratorApi;
  return async () => api;
}

function database(spec: Partial<MultigresDatabase['spec']> = {}): MultigresDatabase {
  return { metadata: { name: 'orders', namespace: 'ns' }, spec: { cluster: 'c', sharded: true, shards: 2, vschemaRef: { name: 'vs' }, ...spec } };
}

const kube = (data?: Record<string, string>) => ({ configMapData: async () => data });
const caughtUp = { caughtUp: true };
const condition = (o: VSchemaOutcome) => o.condition && `${o.condition.status}:${o.condition.reason}: ${o.condition.message}`;

test('sent once: the same content again sends nothing and keeps its condition', async () => {
  const calls: unknown[] = [];
  const db = database();
  const first = await reconcileVSchema(kube({ 'vschema.json': GOOD }), db, caughtUp, orchestrator(calls));
  assert.equal(calls.length, 1);
  assert.equal(condition(first), 'True:Applied: ConfigMap vs key vschema.json is version 1 on the topology log');
  db.status = { vschema: first.sent! };
  const again = await reconcileVSchema(kube({ 'vschema.json': GOOD }), db, caughtUp, orchestrator(calls));
  assert.equal(calls.length, 1);
  assert.deepEqual([again.sent, condition(again)], [undefined, condition(first)]);
  const changed = await reconcileVSchema(kube({ 'vschema.json': `${GOOD}# a comment\n` }), db, caughtUp, orchestrator(calls));
  assert.equal(calls.length, 2, 'another text is sent');
  assert.equal(changed.sent!.version, 2);
});

test("a refused VSchema shows the orchestrator's reason, naming the table and the vindex, and is not sent again", async () => {
  const calls: unknown[] = [];
  const db = database({ vschemaRef: { name: 'vs', key: 'v.json' } });
  const refused = await reconcileVSchema(kube({ 'v.json': BAD }), db, caughtUp, orchestrator(calls));
  assert.match(condition(refused)!, /^False:InvalidVSchema: ConfigMap vs key v.json refused by the orchestrator: invalid VSchema: table orders.*nope/);
  assert.equal(refused.retryMs, undefined);
  db.status = { vschema: refused.sent! };
  const again = await reconcileVSchema(kube({ 'v.json': BAD }), db, caughtUp, orchestrator(calls));
  assert.deepEqual([calls.length, condition(again)], [1, condition(refused)]);
});

test('a missing ConfigMap or key, text that is not YAML, an unsharded database: a clear condition, nothing sent', async () => {
  const calls: unknown[] = [];
  const o = orchestrator(calls);
  assert.equal(condition(await reconcileVSchema(kube(undefined), database(), caughtUp, o)), 'False:ConfigMapNotFound: ConfigMap vs (vschemaRef) does not exist in namespace ns');
  assert.equal(condition(await reconcileVSchema(kube({ other: '{}' }), database(), caughtUp, o)), 'False:KeyNotFound: ConfigMap vs has no key vschema.json (it has: other)');
  assert.match(condition(await reconcileVSchema(kube({ 'vschema.json': 'tables: [' }), database(), caughtUp, o))!, /^False:InvalidVSchema: ConfigMap vs key vschema.json is neither YAML nor JSON: /);
  assert.equal(condition(await reconcileVSchema(kube({ 'vschema.json': GOOD }), database({ sharded: false, shards: 1 }), caughtUp, o)),
    'False:NotSharded: database orders is not sharded (sharded: true): a VSchema applies to sharded databases only');
  assert.equal(calls.length, 0);
});

test('a VSchema the topology log already serves is recorded, not published again; nothing is sent before the log is read', async () => {
  const calls: unknown[] = [];
  assert.deepEqual(await reconcileVSchema(kube({ 'vschema.json': GOOD }), database(), { caughtUp: false }, orchestrator(calls)), {});
  const record: VSchemaRecord = { version: 7n, vschema: parseVSchema(JSON.parse(JSON.stringify(parseVSchema({ vindexes: { hash: { type: 'hash' } }, tables: { orders: { column_vindexes: [{ column: 'tenant_id', name: 'hash' }] } } })))), appliedAt: new Date() };
  const held = await reconcileVSchema(kube({ 'vschema.json': GOOD }), database(), { caughtUp: true, record }, orchestrator(calls));
  assert.deepEqual([calls.length, held.sent!.version, held.condition!.status], [0, 7, 'True']);
});

test('no orchestrator answering, or the database not on the log yet: retried, nothing recorded', async () => {
  const down = async () => ({ applyVSchema: async () => { throw new Error('no orchestrator answers (http://x)'); } }) as unknown as OrchestratorApi;
  const failed = await reconcileVSchema(kube({ 'vschema.json': GOOD }), database(), caughtUp, down);
  assert.deepEqual([failed.sent, failed.retryMs, condition(failed)], [undefined, 5_000, 'False:ApplyFailed: ConfigMap vs key vschema.json: no orchestrator answers (http://x); retrying']);
  const missing = async () => ({ applyVSchema: async () => ({ status: 404, body: { error: 'database orders does not exist' } }) }) as unknown as OrchestratorApi;
  assert.equal(condition(await reconcileVSchema(kube({ 'vschema.json': GOOD }), database(), caughtUp, missing)), 'False:ApplyFailed: ConfigMap vs key vschema.json: HTTP 404: database orders does not exist; retrying');
});

test('a reference removed: what was recorded is cleared', async () => {
  const db = database({ vschemaRef: undefined });
  db.status = { vschema: { configMap: 'vs', key: 'vschema.json', hash: 'h', version: 1 } };
  assert.deepEqual(await reconcileVSchema(kube(), db, caughtUp, orchestrator([])), { sent: null });
});
