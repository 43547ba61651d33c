/**
 * MultiOrch's REST API (fastify): status, switchover, a shard's history, its
 * OpenAPI document, and Prometheus /metrics. Route schemas validate input
 * (400 with the reason) and are the source of the OpenAPI document.
 */
import Fastify, { type FastifyInstance, type RouteShorthandOptions } from 'fastify';
import { metrics } from '../common/metrics.ts';
import { shardKey } from '../schemas/index.ts';
import { backupRoutes } from './api/backups.ts';
import type { Backups } from './backups.ts';
import type { OrchConfig } from './config.ts';
import { ElectionError } from './election.ts';
import type { Journal } from './journal.ts';
import type { Keeper } from './keeper.ts';
import type { ClusterWatch } from './view.ts';

const shardParams = {
  type: 'object',
  required: ['database', 'shard'],
  properties: { database: { type: 'string', minLength: 1 }, shard: { type: 'string', minLength: 1 } },
} as const;

const routes: Array<{ method: 'GET' | 'POST'; url: string; summary: string; schema: Record<string, unknown> }> = [
  { method: 'GET', url: '/v1/status', summary: 'Every shard: term, rule, primary, policy, lease, and each instance as its agent last reported it', schema: {} },
  {
    method: 'POST', url: '/v1/shards/:database/:shard/switchover', summary: 'Planned switchover: drain writes (gateways buffer), hand over to a caught-up replica',
    schema: {
      params: shardParams,
      body: { type: ['object', 'null'], additionalProperties: false, properties: { to: { type: 'string', minLength: 1, description: 'instance to hand over to' } } },
    },
  },
  {
    method: 'GET', url: '/v1/shards/:database/:shard/history', summary: 'What orchestrators saw, decided and did for the shard, oldest first',
    schema: { params: shardParams, querystring: { type: 'object', properties: { limit: { type: 'integer', minimum: 1, maximum: 500, default: 100 } } } },
  },
];

function openApi(): object {
  const paths: Record<string, Record<string, object>> = {};
  for (const r of routes) {
    const path = r.url.replace(/:(\w+)/g, '{$1}');
    const s = r.schema as { params?: { properties: Record<string, object> }; querystring?: { properties: Record<string, object> }; body?: object };
    const parameters = [
      ...Object.entries(s.params?.properties ?? {}).map(([name, schema]) => ({ name, in: 'path', required: true, schema })),
      ...Object.entries(s.querystring?.properties ?? {}).map(([name, schema]) => ({ name, in: 'query', schema })),
    ];
    (paths[path] ??= {})[r.method.toLowerCase()] = {
      summary: r.summary, parameters,
      ...(s.body ? { requestBody: { content: { 'application/json': { schema: s.body } } } } : {}),
      responses: { 200: { description: 'OK' }, 400: { description: 'bad input (body, unknown target instance)' }, 404: { description: 'no such shard' }, 409: { description: 'refused or busy' }, 503: { description: 'could not complete' } },
    };
  }
  return { openapi: '3.0.3', info: { title: 'MultiOrch', version: '1' }, paths };
}

const json = (v: unknown) => JSON.parse(JSON.stringify(v, (_k, x) => (typeof x === 'bigint' ? x.toString() : x)));

export async function serveApi(cfg: OrchConfig, watch: ClusterWatch, keeper: Keeper, journal: Journal, backups: Backups): Promise<FastifyInstance> {
  const app = Fastify({ logger: false });
  const opts = (url: string): RouteShorthandOptions => ({ schema: routes.find((r) => r.url === url)!.schema });

  app.get('/metrics', async (_req, reply) => reply.type(metrics.contentType).send(await metrics.metrics()));
  app.get('/healthz', async () => ({ ok: true }));
  app.get('/openapi.json', async () => openApi());

  app.get('/v1/status', opts('/v1/status'), async () => json({
    orchestrator: cfg.id,
    shards: watch.shards().map((s) => ({
      database: s.database, shard: s.shard, policy: s.policyText, policyProblem: s.policyProblem ?? null,
      term: s.primary?.term ?? null, ruleNumber: s.primary?.ruleNumber ?? null, primary: s.primary?.instanceId ?? null,
      lease: journal.lease(s.key) ?? null, bootstrapped: keeper.bootstrapped(s),
      instances: s.cohort.map((i) => {
        const h = watch.fresh(i.instanceId);
        return {
          instanceId: i.instanceId, cell: i.cell, port: i.port, serving: watch.topology.serving.get(i.instanceId) ?? 'NOT_SERVING',
          role: h ? (h.reachable ? h.role : 'UNREACHABLE') : 'NO_HEARTBEAT', upstream: h?.upstream ?? null,
          walReceiverStatus: h?.walReceiverStatus ?? null, lagBytes: h?.replayLagBytes ?? null,
        };
      }),
    })),
  }));

  app.post<{ Params: { database: string; shard: string }; Body: { to?: string } | null }>('/v1/shards/:database/:shard/switchover', opts('/v1/shards/:database/:shard/switchover'), async (req, reply) => {
    const { database, shard } = req.params;
    if (!watch.shard(database, shard)) return reply.code(404).send({ error: `no shard ${database}/${shard}` });
    try {
      return json(await keeper.switchover(database, shard, req.body?.to));
    } catch (err) {
      if (!(err instanceof ElectionError)) throw err;
      return reply.code({ invalid: 400, busy: 409, refused: 409, failed: 503 }[err.status]).send({ error: err.message });
    }
  });

  app.get<{ Params: { database: string; shard: string }; Querystring: { limit: number } }>('/v1/shards/:database/:shard/history', opts('/v1/shards/:database/:shard/history'), async (req, reply) => {
    const { database, shard } = req.params;
    if (!watch.shard(database, shard)) return reply.code(404).send({ error: `no shard ${database}/${shard}` });
    return json({ events: journal.historyOf(shardKey(database, shard)).slice(-req.query.limit) });
  });

  await app.register(backupRoutes, { backups });
  await app.listen({ host: '127.0.0.1', port: cfg.port });
  return app;
}
