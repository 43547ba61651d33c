/**
 * `mg vschema apply|show`: validates a database's VSchema and publishes it
 * as the next version on the topology log, where every gateway folds it.
 */
import { randomUUID } from 'node:crypto';
import type { EventLog } from '../common/eventlog.ts';
import { applyTopologyEvent, emptyTopology, parseVSchema, payload, topologyKey, type TopologyEvent, type TopologyState, type VSchemaRecord } from '../schemas/index.ts';

async function readTopology(eventLog: EventLog): Promise<TopologyState> {
  const state = emptyTopology();
  const sub = await eventLog.subscribe('topology', (e) => void applyTopologyEvent(state, e));
  await sub.caughtUp;
  await sub.stop();
  return state;
}

/** Validates and publishes; throws VSchemaError (naming table/column/vindex) or Error (unknown or unsharded database). */
export async function applyVSchema(eventLog: EventLog, database: string, raw: unknown): Promise<VSchemaRecord> {
  const vschema = parseVSchema(raw);
  const state = await readTopology(eventLog);
  const db = state.databases.get(database);
  if (!db || db.dropped) throw new Error(`database ${database} does not exist`);
  if (!db.sharded) throw new Error(`database ${database} is not sharded (sharded: true in the cluster spec)`);
  const version = (state.vschemas.get(database)?.version ?? 0n) + 1n;
  const event: TopologyEvent = {
    eventId: randomUUID(), ts: new Date(), source: 'mg-cli',
    payload: payload('VSchemaApplied', { database, version, vschema: JSON.stringify(vschema) }),
  };
  await eventLog.publisher('topology')([{ key: topologyKey(event), value: event }]);
  return { version, vschema };
}

export async function showVSchema(eventLog: EventLog, database: string): Promise<VSchemaRecord | undefined> {
  return (await readTopology(eventLog)).vschemas.get(database);
}
