import assert from 'node:assert/strict';
import { test } from 'node:test';
import { normalize, RegistryHttpError, RegistryStore, type SchemaVersion } from '../../compose/registry/store.ts';

const rec = (fields: unknown[]) => normalize(JSON.stringify({ type: 'record', name: 'R', fields }));
const add = (store: RegistryStore, subject: string, schema: string): SchemaVersion => {
  const v = store.nextVersion(subject, schema);
  store.apply({ key: { keytype: 'SCHEMA', subject, version: v.version, magic: 1 }, value: v });
  return v;
};

test('BACKWARD (the default): adding a field needs a default, removing a field is fine', () => {
  const store = new RegistryStore();
  add(store, 's', rec([{ name: 'a', type: 'int' }]));
  assert.deepEqual(store.incompatibilities('s', rec([{ name: 'a', type: 'int' }, { name: 'b', type: ['null', 'string'], default: null }])), []);
  assert.equal(store.incompatibilities('s', rec([{ name: 'a', type: 'int' }, { name: 'b', type: 'string' }])).length, 1);
  assert.deepEqual(store.incompatibilities('s', rec([])), []);
});

test('ids are shared across subjects for the same schema; versions count per subject', () => {
  const store = new RegistryStore();
  const schema = rec([{ name: 'a', type: 'int' }]);
  const v1 = add(store, 'x', schema);
  const v2 = add(store, 'y', schema);
  assert.equal(v1.id, v2.id);
  const v3 = add(store, 'x', rec([{ name: 'a', type: 'long' }])); // int -> long is a legal promotion
  assert.deepEqual([v3.version, v3.id], [2, v1.id + 1]);
  assert.equal(store.version('x', 'latest').id, v3.id);
  assert.throws(() => store.version('x', '7'), (e: RegistryHttpError) => e.errorCode === 40402);
  assert.throws(() => store.version('nope', '1'), (e: RegistryHttpError) => e.errorCode === 40401);
});

test('per-subject config overrides the global level; NONE accepts anything', () => {
  const store = new RegistryStore();
  add(store, 's', rec([{ name: 'a', type: 'int' }]));
  store.apply({ key: { keytype: 'CONFIG', subject: 's', magic: 0 }, value: { compatibilityLevel: 'NONE' } });
  assert.deepEqual(store.incompatibilities('s', rec([{ name: 'a', type: 'string' }])), []);
  assert.equal(store.compatibility('other'), 'BACKWARD');
});

test('an invalid schema is a 422 with error code 42201', () => {
  assert.throws(() => normalize('{"type": "record"'), (e: RegistryHttpError) => e.status === 422 && e.errorCode === 42201);
  assert.throws(() => normalize('{"type": "nosuchtype"}'), (e: RegistryHttpError) => e.errorCode === 42201);
});
