import Fastify, { type FastifyInstance } from 'fastify';
import client from 'prom-client';

export const metrics = new client.Registry();
client.collectDefaultMetrics({ register: metrics, prefix: 'mg_' });

/** `collect`, when given, runs at scrape time (e.g. to add counts kept in plain numbers on a hot path). */
export function counter(name: string, help: string, labelNames: string[] = [], collect?: (this: client.Counter) => void) {
  return (metrics.getSingleMetric(name) as client.Counter) ?? new client.Counter({ name, help, labelNames, registers: [metrics], collect });
}

/** `collect`, when given, computes the value at scrape time (nothing to keep up to date meanwhile). */
export function gauge(name: string, help: string, labelNames: string[] = [], collect?: (this: client.Gauge) => void) {
  return (metrics.getSingleMetric(name) as client.Gauge) ?? new client.Gauge({ name, help, labelNames, registers: [metrics], collect });
}

export function histogram(name: string, help: string, labelNames: string[] = [], buckets?: number[]) {
  return (metrics.getSingleMetric(name) as client.Histogram) ?? new client.Histogram({ name, help, labelNames, buckets, registers: [metrics] });
}

/**
 * Serves /metrics (Prometheus text) and /healthz on host:port (0 picks a
 * free port); returns the server so callers can add routes and learn the port.
 * `render` replaces this process's registry (e.g. with a cluster aggregate).
 * In a pod, `host` is the pod's address: the kubelet and Prometheus come from outside.
 */
export async function serveMetrics(
  port: number, healthy: () => boolean = () => true, render: () => Promise<string> = () => metrics.metrics(), host = '127.0.0.1',
): Promise<FastifyInstance> {
  const app = Fastify({ logger: false });
  app.get('/metrics', async (_req, reply) => reply.type(metrics.contentType).send(await render()));
  app.get('/healthz', async (_req, reply) => reply.code(healthy() ? 200 : 503).send({ ok: healthy() }));
  await app.listen({ host, port });
  return app;
}

export function listeningPort(app: FastifyInstance): number {
  const addr = app.server.address();
  return typeof addr === 'object' && addr ? addr.port : 0;
}
