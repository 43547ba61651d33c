/**
 * The HTTP side of the REST API (fastify): `/<db>/<table>` and `/<db>/rpc/<fn>`
 * when the server fronts several databases (the gateway), `/<table>` when it
 * fronts one; each request becomes one transaction (handler.ts).
 */
import Fastify, { type FastifyInstance } from 'fastify';
import type { Logger } from '../../common/log.ts';
import { counter, histogram } from '../../common/metrics.ts';
import type { RestDatabase } from './database.ts';
import { errorResponse, handleRest, type RestConfig, type RestResponse } from './handler.ts';
import { RestError } from './errors.ts';

const requests = counter('mg_rest_requests_total', 'REST requests, by method, route kind (table, rpc) and status', ['method', 'route', 'status']);
const seconds = histogram('mg_rest_request_seconds', 'REST request time, by method', ['method'], [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5]);

/** What routing reads of a request (the path within its database). */
export interface RoutedRequest { path: string; method: string; headers: Record<string, string | undefined> }

/** Runs a request where routing says (`attempt` runs it in one database): the gateway's routing rules. */
export type RestRoute = (database: string, req: RoutedRequest, attempt: (database: string) => Promise<RestResponse>) => Promise<RestResponse>;

export interface RestServerOptions {
  host?: string;
  port: number;
  config: RestConfig;
  /** The database a request names (undefined: unknown); `single` serves one database without a path prefix. */
  database: (name: string) => RestDatabase | undefined;
  single?: string;
  /** Where a request on `/<database>/...` runs (default: that database). */
  route?: RestRoute;
  log: Logger;
  /** Request bodies above this are refused (413). */
  bodyLimit?: number;
}

export async function startRestServer(opts: RestServerOptions): Promise<FastifyInstance> {
  const app = Fastify({ logger: false, bodyLimit: opts.bodyLimit ?? 10 * 1024 * 1024 });
  // Bodies reach the handler raw: it parses JSON itself so that errors carry PostgREST's codes.
  app.removeAllContentTypeParsers();
  app.addContentTypeParser('*', { parseAs: 'string' }, (_req, body, done) => done(null, body));
  // the argument of a function taking one unnamed bytea parameter
  app.addContentTypeParser('application/octet-stream', { parseAs: 'buffer' }, (_req, body, done) => done(null, body));
  app.route({
    method: ['GET', 'HEAD', 'POST', 'PATCH', 'DELETE', 'PUT', 'OPTIONS'],
    url: '/*',
    exposeHeadRoute: false,
    handler: async (req, reply) => {
      const started = performance.now();
      const url = new URL(req.url, 'http://x');
      let dbName = opts.single;
      let path = url.pathname;
      if (dbName === undefined) {
        const m = /^\/([^/]+)(\/.*)?$/.exec(path);
        dbName = m ? decodeURIComponent(m[1]) : '';
        path = m?.[2] ?? '/';
      }
      const headers: Record<string, string | undefined> = {};
      for (const [k, v] of Object.entries(req.headers)) headers[k] = Array.isArray(v) ? v.join(', ') : v;
      const attempt = async (name: string): Promise<RestResponse> => {
        const db = opts.database(name);
        if (!db) return errorResponse(new RestError(404, 'PGRST125', `Invalid path specified in request URL: no database "${name}"`));
        try {
          const cache = await db.schemaCache();
          return await handleRest({
            method: req.method, path, fullPath: url.pathname, query: [...url.searchParams.entries()], headers,
            body: typeof req.body === 'string' || Buffer.isBuffer(req.body) ? req.body : undefined,
          }, cache, opts.config, db);
        } catch (err) {
          if (err instanceof RestError) return errorResponse(err);
          opts.log.warn({ err: (err as Error).message, method: req.method, url: req.url }, 'rest request failed');
          const code = (err as { code?: string }).code;
          return errorResponse(new RestError(503, code && code.length === 5 ? code : 'PGRST000', `Database unavailable: ${(err as Error).message}`));
        }
      };
      const res = opts.route ? await opts.route(dbName, { path, method: req.method, headers }, attempt) : await attempt(dbName);
      requests.inc({ method: req.method, route: path.startsWith('/rpc/') ? 'rpc' : 'table', status: String(res.status) });
      seconds.observe({ method: req.method }, (performance.now() - started) / 1000);
      reply.code(res.status).headers(res.headers);
      if (res.status === 416) reply.raw.statusMessage = 'Requested Range Not Satisfiable'; // PostgREST's wording
      return res.body === '' ? reply.send() : reply.send(res.body);
    },
  });
  await app.listen({ host: opts.host ?? '127.0.0.1', port: opts.port });
  opts.log.info({ port: opts.port }, 'rest api listening');
  return app;
}
