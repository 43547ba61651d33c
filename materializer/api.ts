/**
 * The materializer's REST API and /metrics on its own port (decision 0038):
 * workflows listed, shown, created, started, stopped, cancelled, and VDiff
 * requested and read; lookup vindex backfills started and followed (decision 0059). Every change is an event on the workflows topic; the
 * answers come from the fold of that topic.
 */
import Fastify, { type FastifyError, type FastifyInstance } from 'fastify';
import { metrics } from '../common/metrics.ts';
import type { RoutingState, WorkflowAction, WorkflowRecord } from '../schemas/index.ts';
import { RequestError, type Materializer } from './service.ts';

/** JSON with 64-bit integers (offsets, row counts) as strings. */
const json = (v: unknown) => JSON.parse(JSON.stringify(v, (_k, x) => (typeof x === 'bigint' ? x.toString() : x)));

/** A workflow as the API and the CLI show it; `routing`: the state of its routing rule (decision 0039). */
export function workflowView(rec: WorkflowRecord, routing: RoutingState | undefined) {
  const s = rec.status;
  return json({
    name: rec.name, type: rec.definition.type, source: rec.definition.sourceDatabase, target: rec.definition.targetDatabase,
    sourceShards: rec.definition.sourceShards, targetShards: rec.definition.targetShards,
    tables: rec.definition.tables, query: rec.definition.query, createdAt: rec.createdAt, command: rec.action, routing: routing ?? null,
    phase: s?.phase ?? 'PENDING', message: s?.message ?? null, updatedAt: rec.statusAt ?? null,
    progress: {
      rowsCopied: s?.rowsCopied ?? 0n, rowsPerSecond: s?.copyRowsPerSecond ?? 0, etaSeconds: s?.etaSeconds ?? null,
      eventsApplied: s?.eventsApplied ?? 0n, lagSeconds: s?.lagSeconds ?? null,
      tables: s?.tables ?? [],
    },
    vdiff: rec.vdiff ?? (rec.vdiffRequest ? { id: rec.vdiffRequest.id, state: 'REQUESTED' } : null),
    ...(rec.definition.type === 'MIGRATION' ? { ddl: rec.definition.ddl, revertSeconds: rec.definition.revertSeconds, postponeCutOver: rec.definition.postponeCutOver, switchedAt: s?.switchedAt ?? null } : {}),
  });
}

/** POST /v1/workflows: a MoveTables (source, target, tables), a Reshard (database, toShards) or a Materialize (source, target, table, query). */
type Create = {
  name: string; type?: 'movetables' | 'reshard' | 'materialize'; source?: string; target?: string; tables?: string[]; database?: string; toShards?: number;
  table?: string; query?: string;
};

const nameParams = { type: 'object', properties: { name: { type: 'string' } }, required: ['name'] };

export async function serveApi(m: Materializer, port: number, healthy: () => boolean): Promise<FastifyInstance> {
  const app = Fastify({ logger: false });
  app.setErrorHandler((err: FastifyError, _req, reply) => {
    if (err instanceof RequestError) return reply.code(err.status).send({ error: err.message });
    if (err.validation) return reply.code(400).send({ error: err.message });
    return reply.code(500).send({ error: err.message });
  });
  app.get('/metrics', async (_req, reply) => reply.type(metrics.contentType).send(await metrics.metrics()));
  app.get('/healthz', async (_req, reply) => reply.code(healthy() ? 200 : 503).send({ ok: healthy() }));
  const view = (rec: WorkflowRecord) => workflowView(rec, m.routing(rec.name));
  app.get('/v1/workflows', async () => ({ workflows: [...m.workflows.values()].map(view) }));
  app.get<{ Params: { name: string } }>('/v1/workflows/:name', { schema: { params: nameParams } }, async (req) => view(m.get(req.params.name)));
  app.post<{ Body: Create }>('/v1/workflows', {
    schema: {
      body: {
        type: 'object', additionalProperties: false, required: ['name'],
        properties: {
          name: { type: 'string' }, type: { enum: ['movetables', 'reshard', 'materialize'] }, table: { type: 'string', minLength: 1 }, query: { type: 'string', minLength: 1 },
          source: { type: 'string' }, target: { type: 'string' }, tables: { type: 'array', items: { type: 'string', minLength: 1 }, minItems: 1 },
          database: { type: 'string' }, toShards: { type: 'integer', minimum: 1 },
        },
      },
    },
  }, async (req, reply) => {
    const { name, type, source, target, tables, database, toShards, table, query } = req.body;
    let rec: WorkflowRecord;
    if (type === 'materialize') {
      if (source === undefined || target === undefined || table === undefined || query === undefined || tables || database || toShards) {
        throw new RequestError(400, 'a Materialize takes source, target, table and query (not tables, database or toShards)');
      }
      rec = await m.createMaterialize({ name, sourceDatabase: source, targetDatabase: target, table, query });
    } else if (table !== undefined || query !== undefined) {
      throw new RequestError(400, 'table and query are for a Materialize (type materialize)');
    } else if (type === 'reshard') {
      if (database === undefined || toShards === undefined || source || target || tables) throw new RequestError(400, 'a reshard takes database and toShards (not source, target or tables)');
      rec = await m.createReshard({ name, database, toShards });
    } else {
      if (source === undefined || target === undefined || tables === undefined) throw new RequestError(400, 'a MoveTables takes source, target and tables');
      rec = await m.create({ name, sourceDatabase: source, targetDatabase: target, tables });
    }
    return reply.code(201).send(view(rec));
  });
  for (const action of ['start', 'stop', 'cancel', 'reverse-traffic', 'complete'] as const) {
    app.post<{ Params: { name: string } }>(`/v1/workflows/:name/${action}`, { schema: { params: nameParams } }, async (req, reply) => {
      const rec = await m.command(req.params.name, action.replace('-', '_').toUpperCase() as WorkflowAction);
      return reply.code(202).send(view(rec));
    });
  }
  app.post<{ Params: { name: string }; Body: { readsOnly?: boolean } | undefined }>('/v1/workflows/:name/switch-traffic', {
    schema: { params: nameParams, body: { type: ['object', 'null'], additionalProperties: false, properties: { readsOnly: { type: 'boolean' } } } },
  }, async (req, reply) => {
    const rec = await m.command(req.params.name, req.body?.readsOnly ? 'SWITCH_READS' : 'SWITCH_TRAFFIC');
    return reply.code(202).send(view(rec));
  });
  // Online migrations (decision 0060): workflows of type MIGRATION, with their own names for the commands.
  const migration = (name: string) => {
    const rec = m.get(name);
    if (rec.definition.type !== 'MIGRATION') throw new RequestError(404, `migration ${name} does not exist (${name} is a workflow)`);
    return rec;
  };
  app.get('/v1/migrations', async () => ({ migrations: [...m.workflows.values()].filter((w) => w.definition.type === 'MIGRATION').map(view) }));
  app.get<{ Params: { name: string } }>('/v1/migrations/:name', { schema: { params: nameParams } }, async (req) => view(migration(req.params.name)));
  app.post<{ Body: { database: string; ddl: string; revertSeconds?: number; postponeCutOver?: boolean } }>('/v1/migrations', {
    schema: {
      body: {
        type: 'object', additionalProperties: false, required: ['database', 'ddl'],
        properties: {
          database: { type: 'string', minLength: 1 }, ddl: { type: 'string', minLength: 1 }, revertSeconds: { type: 'integer', minimum: 0 }, postponeCutOver: { type: 'boolean' },
        },
      },
    },
  }, async (req, reply) => reply.code(201).send(view(await m.createMigration({ database: req.body.database, ddl: req.body.ddl, revertSeconds: req.body.revertSeconds ?? m.migrationRevertSeconds, postponeCutOver: req.body.postponeCutOver ?? false,
  }))));
  for (const [command, action] of [['cutover', 'SWITCH_TRAFFIC'], ['cancel', 'CANCEL'], ['revert', 'REVERSE_TRAFFIC'], ['complete', 'COMPLETE'], ['start', 'START']] as const) {
    app.post<{ Params: { name: string } }>(`/v1/migrations/:name/${command}`, { schema: { params: nameParams } }, async (req, reply) =>
      reply.code(202).send(view(await m.command(migration(req.params.name).name, action))));
  }
  app.post<{ Params: { name: string } }>('/v1/workflows/:name/vdiff', { schema: { params: nameParams } }, async (req, reply) =>
    reply.code(202).send({ id: await m.requestVDiff(req.params.name) }));
  // Lookup backfills (decision 0059): POST starts one (202), GET follows it.
  const backfillParams = { type: 'object', properties: { database: { type: 'string' }, vindex: { type: 'string' } }, required: ['database', 'vindex'] };
  const backfillPath = '/v1/databases/:database/vindexes/:vindex/backfill';
  app.post<{ Params: { database: string; vindex: string } }>(backfillPath, { schema: { params: backfillParams } }, async (req, reply) =>
    reply.code(202).send(m.startBackfill(req.params.database, req.params.vindex)));
  app.get<{ Params: { database: string; vindex: string } }>(backfillPath, { schema: { params: backfillParams } }, async (req) =>
    m.backfill(req.params.database, req.params.vindex));
  await app.listen({ host: '127.0.0.1', port });
  return app;
}
