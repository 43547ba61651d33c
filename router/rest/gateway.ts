/**
 * The REST API on the gateway: `/<database>/<table>`, each request one
 * transaction through the same poolers wire-protocol traffic uses (the
 * primary, waiting out a failover up to the buffer window; reads on a replica
 * when configured), learned from the gateway's discovery of Kafka.
 */
import type { FastifyInstance } from 'fastify';
import type { Logger } from '../../common/log.ts';
import { MOVED_WRITES_SQLSTATE, movedTablesOf } from '../../schemas/index.ts';
import type { Discovery } from '../gateway/discovery.ts';
import { plannerFor } from '../gateway/sharded.ts';
import type { TwoPhaseCoordinator } from '../twopc/coordinator.ts';
import { RestDatabase, type RestEndpoint } from './database.ts';
import { RestError } from './errors.ts';
import { errorResponse } from './handler.ts';
import { startRestServer, type RestRoute } from './server.ts';
import type { ShardRouting } from './sharded.ts';

export interface GatewayRestOptions {
  /** Default 127.0.0.1. */
  host?: string;
  port: number;
  schemas: string[];
  anonRole?: string;
  jwtSecret?: string;
  /** PostgREST's db-pre-request: `schema.function` every request calls first. */
  preRequest?: string;
  /** The role the gateway connects to poolers as; requests switch to their own role inside the transaction. */
  authUser: string;
  bufferWindowMs: number;
  /** GET, HEAD and GET /rpc run on a healthy replica within the lag threshold (the primary when there is none). */
  readsToReplicas: boolean;
  /** Commits a write over several shards of a database whose transaction mode is twopc. */
  twopc: TwoPhaseCoordinator;
  log: Logger;
}

/** What routing needs from the gateway's discovery. */
export type RestDiscovery = Pick<Discovery, 'shards' | 'keyRanges' | 'replicas' | 'waitForPrimary' | 'hasDatabase' | 'topology' | 'waitUntil' | 'holdReason'>;

/**
 * Routing rules (decision 0039) for REST requests, as wire-protocol statements follow them: a request on a
 * table a workflow moves runs in the target database once its writes switched (a read, once its reads
 * switched); while the switch holds writes it waits, up to the buffer window. A write the source refused
 * because its writes moved meanwhile (55MG1, nothing committed) runs again once this gateway sees the rule change.
 */
export function restRouting(discovery: RestDiscovery, opts: Pick<GatewayRestOptions, 'schemas' | 'bufferWindowMs'>): RestRoute {
  return async (database, req, attempt) => {
    const table = /^\/([^/]+)\/?$/.exec(req.path)?.[1];
    if (table === undefined || !movedTablesOf(discovery.topology, database)) return attempt(database);
    const write = !['GET', 'HEAD'].includes(req.method);
    const schema = (write ? req.headers['content-profile'] : req.headers['accept-profile']) ?? opts.schemas[0];
    const key = `${schema}.${decodeURIComponent(table)}`;
    const deadline = Date.now() + opts.bufferWindowMs;
    const changed = (cond: () => boolean) => discovery.waitUntil(cond, Math.max(0, deadline - Date.now()));
    for (;;) {
      const rule = movedTablesOf(discovery.topology, database)?.get(key);
      if (rule?.state === 'WRITES_HELD') {
        if (await changed(() => discovery.topology.routingRules.get(rule.workflow)?.version !== rule.version)) continue;
        return errorResponse(new RestError(503, '57P03', `workflow ${rule.workflow} is switching traffic of ${rule.tables.join(', ')} and did not finish within ${opts.bufferWindowMs} ms`));
      }
      const moved = rule && (rule.state === 'TARGET' || (rule.state === 'READS_TARGET' && !write));
      const res = await attempt(moved ? rule.targetDatabase : database);
      if (res.code !== MOVED_WRITES_SQLSTATE) return res;
      const seen = discovery.topology.applied;
      if (!(await changed(() => discovery.topology.applied !== seen))) return res;
    }
  };
}


/** A sharded database's planner (the wire protocol's, cached per VSchema version) and key ranges. */
export function restSharding(discovery: RestDiscovery, database: string): ShardRouting | undefined {
  if (!discovery.topology.databases.get(database)?.sharded) return undefined;
  const record = discovery.topology.vschemas.get(database);
  return { planner: plannerFor(database, record), vschema: record?.vschema, ranges: discovery.keyRanges(database) };
}

/**
 * Where a transaction on `shard` (the first shard when unnamed) runs: a
 * healthy replica for a read when configured (the primary when none is
 * usable), else the primary, waiting out a failover up to the buffer window
 * like wire-protocol queries.
 */
export async function restEndpoint(discovery: RestDiscovery, database: string, readOnly: boolean,
  opts: Pick<GatewayRestOptions, 'readsToReplicas' | 'bufferWindowMs'>, named?: string): Promise<RestEndpoint> {
  const shard = named ?? discovery.keyRanges(database)[0]?.shard;
  if (shard === undefined) throw new RestError(503, '57P03', `database "${database}" has no shards`);
  const held = discovery.holdReason(database);
  if (held !== undefined) throw new RestError(503, '57P03', `database "${database}" is deactivated and held stopped: ${held}`); // decision 0084: no wait, no wake
  if (readOnly && opts.readsToReplicas) {
    const replicas = discovery.replicas(database, shard);
    if (replicas.length) return replicas[Math.floor(Math.random() * replicas.length)];
  }
  const ep = await discovery.waitForPrimary(database, shard, opts.bufferWindowMs);
  if (!ep) throw new RestError(503, '57P03', `no serving primary for ${database}/${shard} after waiting ${opts.bufferWindowMs} ms`);
  return ep;
}

export async function startGatewayRest(discovery: RestDiscovery, opts: GatewayRestOptions): Promise<{ schemaChanged(database: string): void; close(): Promise<void> }> {
  const databases = new Map<string, RestDatabase>();

  const database = (name: string): RestDatabase | undefined => {
    if (!discovery.hasDatabase(name)) return undefined;
    let db = databases.get(name);
    if (!db) {
      db = new RestDatabase({ name, user: opts.authUser, schemas: opts.schemas, log: opts.log,
        endpoint: (readOnly, shard) => restEndpoint(discovery, name, readOnly, opts, shard), sharding: () => restSharding(discovery, name),
        twopc: () => (discovery.topology.databases.get(name)?.transactionMode === 'twopc' ? opts.twopc : undefined) });
      databases.set(name, db);
    }
    return db;
  };

  const app: FastifyInstance = await startRestServer({
    host: opts.host, port: opts.port, config: { schemas: opts.schemas, anonRole: opts.anonRole, jwtSecret: opts.jwtSecret, preRequest: opts.preRequest }, database,
    route: restRouting(discovery, opts), log: opts.log,
  });
  return {
    /** DDL ran on the database through the wire protocol: every REST schema cache of it reloads. */
    schemaChanged(name: string) {
      database(name)?.announceSchemaChange();
    },
    async close() {
      await app.close();
      await Promise.all([...databases.values()].map((d) => d.close()));
    },
  };
}
