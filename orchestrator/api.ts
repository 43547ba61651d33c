/**
 * The REST admin API (fastify), served by every MultiOrch: cluster status,
 * shards and switchover, databases at run time, VSchemas, long operations, its OpenAPI
 * document and Prometheus /metrics. Each area is a fastify plugin in `api/`
 * that registers with one line below. Route schemas validate input (400 naming
 * each bad field) and are the source of the OpenAPI document. With a bearer
 * token configured every route but /healthz needs it; without one the API
 * listens on localhost only (docs/admin-api.md).
 */
import { timingSafeEqual } from 'node:crypto';
import Fastify, { type FastifyError, type FastifyInstance, type FastifyPluginAsync, type FastifyReply } from 'fastify';
import type { EventLog } from '../common/eventlog.ts';
import type { Logger } from '../common/log.ts';
import { metrics } from '../common/metrics.ts';
import type { Agents } from './agents.ts';
import { backupsApi } from './api/backups.ts';
import { clusterApi } from './api/cluster.ts';
import { databasesApi } from './api/databases.ts';
import { operationsApi } from './api/operations.ts';
import { vschemasApi } from './api/vschemas.ts';
import { replicasApi } from './api/replicas.ts';
import type { Backups } from './backups.ts';
import type { OrchConfig } from './config.ts';
import type { DatabaseManager } from './databases.ts';
import type { Journal } from './journal.ts';
import type { Keeper } from './keeper.ts';
import { OperationError, type Operations } from './operations.ts';
import type { ReplicaManager } from './replicas.ts';
import type { RestoreManager } from './restores.ts';
import type { ClusterWatch } from './view.ts';

declare module 'fastify' {
  /** What each route says of itself in the OpenAPI document. */
  interface FastifySchema {
    summary?: string;
    tags?: string[];
  }
}

/** What the API's plugins work with. */
export interface ApiContext {
  cfg: OrchConfig;
  watch: ClusterWatch;
  keeper: Keeper;
  journal: Journal;
  agents: Agents;
  eventLog: EventLog;
  databases: DatabaseManager;
  replicas: ReplicaManager;
  backups: Backups;
  restores: RestoreManager;
  operations: Operations;
  log: Logger;
}

/** One area of the API: registers its routes (with `summary` and `tags` in each schema, for the OpenAPI document). */
export type ApiPlugin = FastifyPluginAsync<ApiContext>;

export const waitQuery = {
  type: 'object', additionalProperties: false,
  properties: { wait: { type: 'boolean', default: false, description: 'answer when the operation is over (200, or 503 when it failed) rather than at once (202)' } },
} as const;

/**
 * Starts an operation after its checks (an OperationError answers with its status); answers 202 with it, or
 * waits for it with ?wait=true (200, or 503 with the error).
 */
export async function runOperation(
  operations: Operations, reply: FastifyReply, wait: boolean, kind: string, target: string,
  check: () => void, work: (step: (m: string) => void) => Promise<void>,
): Promise<FastifyReply> {
  try {
    check();
  } catch (err) {
    if (err instanceof OperationError) return reply.code(err.status).send({ error: err.message });
    throw err;
  }
  const { op, done } = operations.start(kind, target, work);
  if (!wait) return reply.code(202).header('location', `/v1/operations/${op.id}`).send({ operation: op });
  await done;
  return reply.code(op.state === 'succeeded' ? 200 : 503).send({ operation: op, ...(op.error ? { error: op.error } : {}) });
}

/** JSON with 64-bit integers (terms, LSNs) as strings. */
export const json = (v: unknown) => JSON.parse(JSON.stringify(v, (_k, x) => (typeof x === 'bigint' ? x.toString() : x)));

interface ValidationIssue { instancePath: string; message?: string; keyword: string; params: Record<string, unknown> }

/** `body.shards: must be >= 1`, `body.colour: unknown field`, `body.name: is required`. */
function describeIssues(issues: ValidationIssue[], context: string): Array<{ field: string; message: string }> {
  return issues.map((i) => {
    const path = i.instancePath.replace(/^\//, '').split('/').filter(Boolean);
    if (i.keyword === 'required') return { field: [context, ...path, String(i.params.missingProperty)].join('.'), message: 'is required' };
    if (i.keyword === 'additionalProperties') return { field: [context, ...path, String(i.params.additionalProperty)].join('.'), message: 'unknown field' };
    return { field: [context, ...path].join('.'), message: i.message ?? i.keyword };
  });
}

function openApiDocument(routes: Array<{ method: string; url: string; schema: Record<string, any> }>): object {
  const paths: Record<string, Record<string, object>> = {};
  for (const r of routes) {
    const s = r.schema;
    const parameters = [
      ...Object.entries<object>(s.params?.properties ?? {}).map(([name, schema]) => ({ name, in: 'path', required: true, schema })),
      ...Object.entries<object>(s.querystring?.properties ?? {}).map(([name, schema]) => ({ name, in: 'query', schema })),
    ];
    (paths[r.url.replace(/:(\w+)/g, '{$1}')] ??= {})[r.method.toLowerCase()] = {
      summary: s.summary, tags: s.tags, parameters, security: [{ bearer: [] }],
      ...(s.body ? { requestBody: { content: { 'application/json': { schema: s.body } } } } : {}),
      responses: {
        200: { description: 'done' }, 202: { description: 'started: a long operation (follow /v1/operations/{id})' },
        400: { description: 'bad input: each bad field named' }, 401: { description: 'missing or wrong bearer token' },
        404: { description: 'no such database or shard' }, 409: { description: 'refused in the current state, or busy' },
        501: { description: 'not built yet' }, 503: { description: 'could not complete' },
      },
    };
  }
  return {
    openapi: '3.0.3', info: { title: 'multigres-ts admin API', version: '1' }, paths,
    components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer', description: 'orchestrator.apiToken of the cluster spec (none: localhost only)' } } },
  };
}

export async function serveApi(ctx: ApiContext): Promise<FastifyInstance> {
  const { cfg } = ctx;
  const app = Fastify({
    logger: false,
    // Every bad field is reported, and an unknown one is an error rather than silently dropped.
    ajv: { customOptions: { allErrors: true, removeAdditional: false } },
  });
  const documented: Array<{ method: string; url: string; schema: Record<string, any> }> = [];
  app.addHook('onRoute', (r) => {
    const schema = r.schema as Record<string, any> | undefined;
    if (!schema?.summary) return;
    for (const method of [r.method].flat()) if (method !== 'HEAD') documented.push({ method, url: r.url, schema });
  });

  const token = cfg.apiToken ? Buffer.from(`Bearer ${cfg.apiToken}`) : undefined;
  app.addHook('onRequest', async (req, reply) => {
    if (!token || req.url === '/healthz') return;
    const given = Buffer.from(req.headers.authorization ?? '');
    if (given.length !== token.length || !timingSafeEqual(given, token)) {
      return reply.code(401).header('www-authenticate', 'Bearer').send({ error: 'missing or wrong bearer token (Authorization: Bearer <orchestrator.apiToken>)' });
    }
  });

  app.setErrorHandler((err: FastifyError, _req, reply) => {
    if (err.validation) {
      const fields = describeIssues(err.validation as ValidationIssue[], err.validationContext ?? 'request');
      return reply.code(400).send({ error: fields.map((f) => `${f.field}: ${f.message}`).join('; '), fields });
    }
    if (err.statusCode && err.statusCode < 500) return reply.code(err.statusCode).send({ error: err.message });
    ctx.log.error({ err }, 'admin API request failed');
    return reply.code(500).send({ error: err.message });
  });
  app.setNotFoundHandler((req, reply) => reply.code(404).send({ error: `no route ${req.method} ${req.url}` }));

  app.get('/metrics', async (_req, reply) => reply.type(metrics.contentType).send(await metrics.metrics()));
  app.get('/healthz', async () => ({ ok: true }));
  app.get('/openapi.json', async () => openApiDocument(documented));

  await app.register(clusterApi, ctx);
  await app.register(databasesApi, ctx);
  await app.register(operationsApi, ctx);
  await app.register(backupsApi, ctx);
  await app.register(vschemasApi, ctx);
  await app.register(replicasApi, ctx);

  await app.listen({ host: token ? cfg.apiHost : '127.0.0.1', port: cfg.port });
  return app;
}
