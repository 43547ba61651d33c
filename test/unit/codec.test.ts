import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { AvroCodec, DecodeError, parseAvro, schemaText, type HealthEvent, type SchemaRegistryClient } from '../../schemas/index.ts';
import { generatedFile, generateTypes } from '../../schemas/codegen/generate.ts';

/** An in-memory stand-in for the registry (unit tests only; the real one is tested in integration). */
function fakeRegistry(): SchemaRegistryClient {
  const schemas: string[] = [];
  return {
    async register(_subject: string, schema: string) {
      const i = schemas.indexOf(schema);
      return i >= 0 ? i + 1 : schemas.push(schema);
    },
    async schemaById(id: number) {
      if (!schemas[id - 1]) throw new Error('not found');
      return schemas[id - 1];
    },
  } as unknown as SchemaRegistryClient;
}

const fixtures = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'fixtures');

const health = (over: Partial<HealthEvent> = {}): HealthEvent => ({
  instanceId: 'i1', database: 'db', shard: '-', cell: 'zone1', ts: new Date(1_764_000_000_123), sequence: 1n,
  reachable: true, role: 'PRIMARY', currentLsn: 0x7fff_ffff_ffff_fff0n, flushLsn: 2n ** 53n + 1n, replayLsn: null,
  replayLagBytes: null, replayLagSeconds: null, upstream: null, connections: 3, maxConnections: 200, postgresPid: 42,
  agentVersion: '0.1.0', error: null, walReceiverStatus: 'streaming', cdcSlotLagBytes: null, cdcSlotLagSeconds: null, ...over,
});

test('Confluent wire format: magic byte, 4-byte schema id, Avro body; 64-bit LSNs exact', async () => {
  const codec = new AvroCodec<HealthEvent>(fakeRegistry(), 'h-value', schemaText('health.avsc'));
  const buf = await codec.encode(health());
  assert.equal(buf[0], 0);
  assert.equal(buf.readUInt32BE(1), await codec.schemaId());
  const back = await codec.decode(buf);
  assert.equal(back.currentLsn, 0x7fff_ffff_ffff_fff0n);
  assert.equal(back.flushLsn, 2n ** 53n + 1n);
  assert.equal(back.ts.getTime(), 1_764_000_000_123);
  assert.deepEqual({ ...back }, health());
});

test('an event written with the old health schema (v1) decodes with the current one', async () => {
  const registry = fakeRegistry();
  const v1Text = fs.readFileSync(path.join(fixtures, 'health-v1.avsc'), 'utf8');
  const writer = new AvroCodec<Omit<HealthEvent, 'walReceiverStatus'>>(registry, 'h-value', v1Text);
  const { walReceiverStatus: _, ...old } = health();
  const bytes = await writer.encode(old);
  const reader = new AvroCodec<HealthEvent>(registry, 'h-value', schemaText('health.avsc'));
  const decoded = await reader.decode(bytes);
  assert.equal(decoded.walReceiverStatus, null); // the new field's default
  assert.equal(decoded.currentLsn, old.currentLsn);
});

test('bytes that are not in the wire format, or do not match the schema, are DecodeErrors', async () => {
  const codec = new AvroCodec<HealthEvent>(fakeRegistry(), 'h-value', schemaText('health.avsc'));
  await assert.rejects(codec.decode(Buffer.from('garbage')), DecodeError);
  const good = await codec.encode(health());
  await assert.rejects(codec.decode(good.subarray(0, 12)), DecodeError);
  const unknownId = Buffer.from(good);
  unknownId.writeUInt32BE(999, 1);
  await assert.rejects(codec.decode(unknownId), /unknown schema id 999/);
});

test('encoding a value that breaks the schema throws instead of writing garbage', async () => {
  const codec = new AvroCodec<HealthEvent>(fakeRegistry(), 'h-value', schemaText('health.avsc'));
  await assert.rejects(codec.encode(health({ currentLsn: 12 as unknown as bigint })));
  await assert.rejects(codec.encode(health({ currentLsn: 2n ** 63n })), /currentLsn = 9223372036854775808n is not a valid/);
});

test('generated TypeScript types are up to date with the .avsc files', () => {
  assert.equal(fs.readFileSync(generatedFile, 'utf8'), generateTypes(), 'run npm run schemas:generate');
});

test('every schema parses with the project type mappings', () => {
  for (const f of ['topology.avsc', 'health.avsc', 'agent-command.avsc', 'agent-command-result.avsc']) {
    assert.ok(parseAvro(schemaText(f)));
  }
});
