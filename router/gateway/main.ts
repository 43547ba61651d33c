/**
 * Entry point of the MultiGateway: `node --import tsx router/gateway/main.ts --config <file>`.
 * With `workers` > 1 this process becomes the primary of that many gateway processes.
 */
import cluster from 'node:cluster';
import { parseArgs } from 'node:util';
import { z } from 'zod';
import { readJsonConfig } from '../../common/config.ts';
import { EventLog } from '../../common/eventlog.ts';
import { onShutdown } from '../../common/lifecycle.ts';
import { createLogger } from '../../common/log.ts';
import { serveMetrics } from '../../common/metrics.ts';
import { startGatewayRest } from '../rest/gateway.ts';
import { Gateway } from './gateway.ts';
import { loadOrCreateTls } from './tls.ts';
import { reportMetricsToPrimary, runWorkers } from '../cluster/workers.ts';

const configSchema = z.object({
  /** Where the gateway listens (its port, the HTTP port, metrics): loopback locally, the pod's address in a pod. */
  host: z.string().ip().default('127.0.0.1'),
  port: z.number().int().min(0).max(65535),
  metricsPort: z.number().int().min(0).max(65535),
  brokers: z.array(z.string()).min(1),
  registryUrl: z.string().url(),
  topicPrefix: z.string().default(''),
  bufferWindowMs: z.number().int().min(0).default(10_000),
  authUser: z.string().default('postgres'),
  /** Directory holding (or receiving a generated self-signed) server.crt and server.key. */
  tlsDir: z.string().optional(),
  requireTls: z.boolean().default(false),
  maxClients: z.number().int().min(1).optional(),
  readOnlyToReplicas: z.boolean().default(false),
  releaseIdleLinksAfterMs: z.number().int().min(0).default(30_000),
  deactivateIdleAfterMs: z.number().int().min(0).default(0),
  /** Gateway processes sharing the port (each with its own file-descriptor limit); 1 runs in this process. */
  workers: z.number().int().min(1).max(64).default(1),
  /** The REST (PostgREST) API's HTTP port, if any (router/rest). */
  httpPort: z.number().int().min(0).max(65535).optional(),
  rest: z.object({
    schemas: z.array(z.string().min(1)).min(1).default(['public']),
    anonRole: z.string().min(1).optional(),
    jwtSecret: z.string().min(32).optional(),
    preRequest: z.string().min(1).optional(),
  }).strict().default({}),
}).strict();

const { values } = parseArgs({ options: { config: { type: 'string' } } });
if (!values.config) {
  console.error('usage: router/gateway/main.ts --config <gateway.json>');
  process.exit(2);
}
let cfg: z.infer<typeof configSchema>;
try {
  cfg = readJsonConfig(values.config, configSchema, 'gateway');
} catch (err) {
  console.error((err as Error).message);
  process.exit(2);
}
const log = createLogger('gateway');
if (cfg.workers > 1 && cluster.isPrimary) {
  if (cfg.tlsDir) loadOrCreateTls(cfg.tlsDir); // one certificate, made before the workers read it
  await runWorkers({ service: 'gateway', count: cfg.workers, metricsPort: cfg.metricsPort, metricsHost: cfg.host, log });
} else {
  await runGateway();
}

async function runGateway(): Promise<void> {
  const eventLog = new EventLog({ brokers: cfg.brokers, registryUrl: cfg.registryUrl, clientId: 'gateway', log, topicPrefix: cfg.topicPrefix });
  let rest: Awaited<ReturnType<typeof startGatewayRest>> | undefined;
  const gateway = new Gateway(eventLog, {
    host: cfg.host, port: cfg.port, bufferWindowMs: cfg.bufferWindowMs, authUser: cfg.authUser, requireTls: cfg.requireTls,
    maxClients: cfg.maxClients, readOnlyToReplicas: cfg.readOnlyToReplicas, releaseIdleLinksAfterMs: cfg.releaseIdleLinksAfterMs, deactivateIdleAfterMs: cfg.deactivateIdleAfterMs,
    tls: cfg.tlsDir ? loadOrCreateTls(cfg.tlsDir) : undefined,
    // DDL through any gateway reaches every gateway's REST cache: the NOTIFY goes to the database (decision 0042)
    onSchemaChange: (database) => rest?.schemaChanged(database),
  }, log);
  const metricsServer = cluster.isWorker ? undefined : await serveMetrics(cfg.metricsPort, undefined, undefined, cfg.host);
  if (cluster.isWorker) reportMetricsToPrimary();
  onShutdown(log, async () => {
    await rest?.close();
    await gateway.drain();
    await metricsServer?.close();
    await eventLog.close();
  });
  await gateway.start();
  if (cfg.httpPort !== undefined) {
    rest = await startGatewayRest(gateway.discovery, {
      host: cfg.host, port: cfg.httpPort, ...cfg.rest, authUser: cfg.authUser, bufferWindowMs: cfg.bufferWindowMs, readsToReplicas: cfg.readOnlyToReplicas, twopc: gateway.twopc, log,
    });
  }
}
