import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import { databaseDdl, loadDdlParser } from '../../router/gateway/database-ddl.ts';
import { foldTopology, payload, shardGroupOf, topologyKey, type TopologyEvent } from '../../schemas/index.ts';

let n = 0;
const ev = (p: TopologyEvent['payload']): TopologyEvent => ({ eventId: `e${++n}`, ts: new Date(1_700_000_000_000 + n), source: 'test', payload: p });
const created = (database: string, hostedOn: string | null = null) => ev(payload('DatabaseCreated', { database, durabilityPolicy: null, hostedOn, sharded: false, transactionMode: null }));
const dropped = (database: string) => ev(payload('DatabaseDropped', { database }));
const activation = (database: string, active: boolean, held = false) => ev(payload('DatabaseActivationChanged', { database, active, reason: 'test', held }));

before(() => loadDdlParser());

test('CREATE / DROP DATABASE are recognized with Postgres\'s name rules; anything else is not', () => {
  assert.deepEqual(databaseDdl('CREATE DATABASE Shop'), { op: 'create', name: 'shop' });
  assert.deepEqual(databaseDdl('/* hi */ create database "Mixed Case" TEMPLATE template0;'), { op: 'create', name: 'Mixed Case' });
  assert.deepEqual(databaseDdl('-- note\nDROP DATABASE IF EXISTS shop WITH (FORCE)'), { op: 'drop', name: 'shop' });
  for (const sql of ['SELECT 1', 'CREATE TABLE database (a int)', 'CREATE DATABASE a; SELECT 1', 'DROP DATABASE', "SELECT 'create database x'"]) {
    assert.equal(databaseDdl(sql), undefined, sql);
  }
});

test('a hosted database is served by its host\'s shard group, and only while both exist', () => {
  let state = foldTopology([created('main'), created('tenant', 'main')]);
  assert.equal(shardGroupOf(state, 'main'), 'main');
  assert.equal(shardGroupOf(state, 'tenant'), 'main');
  assert.equal(shardGroupOf(state, 'nosuch'), undefined);
  state = foldTopology([created('main'), created('tenant', 'main'), dropped('main')]);
  assert.equal(shardGroupOf(state, 'tenant'), undefined);
  state = foldTopology([created('main'), created('tenant', 'main'), dropped('tenant')]);
  assert.equal(shardGroupOf(state, 'tenant'), undefined);
});

test('activation: the latest wish per database holds, and a database made again under an old name starts active', () => {
  const e = activation('main', false);
  assert.equal(topologyKey(e), 'database/main/activation');
  assert.equal(foldTopology([created('main'), e]).inactive.get('main')?.reason, 'test');
  assert.equal(foldTopology([created('main'), e, activation('main', true)]).inactive.has('main'), false);
  assert.equal(foldTopology([created('main'), e, dropped('main'), created('main')]).inactive.has('main'), false);
});

test('a held deactivation outlasts an idle one that comes after it, and ends with an activation', () => {
  const hold = activation('main', false, true);
  assert.equal(foldTopology([created('main'), hold]).inactive.get('main')?.held, true);
  assert.equal(foldTopology([created('main'), hold, activation('main', false)]).inactive.get('main')?.held, true);
  assert.equal(foldTopology([created('main'), activation('main', false)]).inactive.get('main')?.held, false);
  assert.equal(foldTopology([created('main'), hold, activation('main', true)]).inactive.has('main'), false);
  assert.equal(foldTopology([created('main'), hold, activation('main', true), activation('main', false)]).inactive.get('main')?.held, false);
});
