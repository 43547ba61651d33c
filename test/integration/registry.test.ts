/** The schema registry against a standard client (@kafkajs/confluent-schema-registry), as a user's app would use it. */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import { SchemaRegistry, SchemaType } from '@kafkajs/confluent-schema-registry';
import { registryUrl } from '../support/env.ts';

const subject = () => `it-${randomUUID()}-value`;
const order = (extra: object[] = []) => JSON.stringify({
  type: 'record', name: 'Order', namespace: 'shop', fields: [{ name: 'id', type: 'long' }, { name: 'item', type: 'string' }, ...extra],
});

test('a standard client registers, encodes, fetches and decodes', async () => {
  const registry = new SchemaRegistry({ host: registryUrl() });
  const s = subject();
  const { id } = await registry.register({ type: SchemaType.AVRO, schema: order() }, { subject: s });
  assert.ok(id > 0);
  assert.equal(await registry.getLatestSchemaId(s), id);
  assert.equal(await registry.getRegistryId(s, 1), id);
  const bytes = await registry.encode(id, { id: 7, item: 'tea' });
  assert.equal(bytes[0], 0);
  assert.equal(bytes.readUInt32BE(1), id);
  // A fresh client knows nothing cached: it must fetch the schema by id.
  const other = new SchemaRegistry({ host: registryUrl() });
  assert.deepEqual({ ...(await other.decode(bytes)) }, { id: 7, item: 'tea' });
  // Registering the same schema again returns the same id.
  assert.equal((await registry.register({ type: SchemaType.AVRO, schema: order() }, { subject: s })).id, id);
});

test('BACKWARD compatibility is enforced: a field with a default is accepted, one without is refused with 409', async () => {
  const registry = new SchemaRegistry({ host: registryUrl() });
  const s = subject();
  const v1 = await registry.register({ type: SchemaType.AVRO, schema: order() }, { subject: s });
  const v2 = await registry.register({ type: SchemaType.AVRO, schema: order([{ name: 'qty', type: 'int', default: 1 }]) }, { subject: s });
  assert.notEqual(v1.id, v2.id);
  await assert.rejects(
    registry.register({ type: SchemaType.AVRO, schema: order([{ name: 'price', type: 'double' }]) }, { subject: s }),
    /incompatible/i,
  );
  // Data written with v1 decodes with v2 as the reader, taking the default.
  const bytes = await registry.encode(v1.id, { id: 1, item: 'x' });
  const decoded = await registry.decode(bytes, { [SchemaType.AVRO]: { readerSchema: JSON.parse(order([{ name: 'qty', type: 'int', default: 1 }])) } });
  assert.deepEqual({ ...decoded }, { id: 1, item: 'x', qty: 1 });
});

test('REST errors carry Confluent status codes and error codes', async () => {
  const call = async (method: string, path: string, body?: unknown) => {
    const res = await fetch(registryUrl() + path, {
      method, headers: { 'content-type': 'application/vnd.schemaregistry.v1+json' }, body: body === undefined ? undefined : JSON.stringify(body),
    });
    return { status: res.status, body: (await res.json()) as any };
  };
  assert.deepEqual((await call('GET', '/schemas/ids/987654')).body.error_code, 40403);
  assert.equal((await call('GET', `/subjects/${subject()}/versions/latest`)).status, 404);
  const bad = await call('POST', `/subjects/${subject()}/versions`, { schema: '{"type": "record", "name": "X", "fields": [{"name": "a"}]}' });
  assert.deepEqual([bad.status, bad.body.error_code], [422, 42201]);
  const notJson = await fetch(`${registryUrl()}/subjects/x/versions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{oops' });
  assert.equal(notJson.status, 422);
  const level = await call('PUT', '/config/some-subject', { compatibility: 'SIDEWAYS' });
  assert.deepEqual([level.status, level.body.error_code], [422, 42203]);
  const s = subject();
  await call('POST', `/subjects/${s}/versions`, { schema: order() });
  const check = await call('POST', `/compatibility/subjects/${s}/versions/latest`, { schema: order([{ name: 'n', type: 'int' }]) });
  assert.equal(check.body.is_compatible, false);
});
