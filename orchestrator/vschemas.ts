/**
 * VSchemas of sharded databases: validated and published as the next version
 * of VSchemaApplied on the topology log, where every gateway folds it. The
 * admin API's /v1/databases/:name/vschema routes run this, and `mg vschema`
 * calls those routes, so both validate and publish the same way.
 */
import { randomUUID } from 'node:crypto';
import type { EventLog } from '../common/eventlog.ts';
import { applyTopologyEvent, emptyTopology, parseVSchema, payload, topologyKey, type TopologyEvent, type TopologyState, type VSchemaRecord } from '../schemas/index.ts';
import { OperationError } from './operations.ts';

/** The topology as the log has it now (not this orchestrator's view, which may lag another one's apply). */
async function readTopology(eventLog: EventLog): Promise<TopologyState> {
  const state = emptyTopology();
  const sub = await eventLog.subscribe('topology', (e) => void applyTopologyEvent(state, e));
  await sub.caughtUp;
  await sub.stop();
  return state;
}

/**
 * Validates and publishes; throws VSchemaError (every fault, naming its
 * table/column/vindex), or OperationError 404 (no such database) or 409 (not sharded).
 */
export async function applyVSchema(eventLog: EventLog, database: string, raw: unknown, source: string): Promise<VSchemaRecord> {
  const vschema = parseVSchema(raw);
  const state = await readTopology(eventLog);
  const db = state.databases.get(database);
  if (!db || db.dropped) throw new OperationError(404, `database ${database} does not exist`);
  if (!db.sharded) throw new OperationError(409, `database ${database} is not sharded (sharded: true in the cluster spec)`);
  const version = (state.vschemas.get(database)?.version ?? 0n) + 1n;
  const event: TopologyEvent = {
    eventId: randomUUID(), ts: new Date(), source,
    payload: payload('VSchemaApplied', { database, version, vschema: JSON.stringify(vschema) }),
  };
  await eventLog.publisher('topology')([{ key: topologyKey(event), value: event }]);
  return { version, vschema, appliedAt: event.ts };
}

export async function showVSchema(eventLog: EventLog, database: string): Promise<VSchemaRecord | undefined> {
  return (await readTopology(eventLog)).vschemas.get(database);
}
