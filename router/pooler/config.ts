/** MultiPooler configuration: a JSON file, validated field by field. */
import fs from 'node:fs';
import { isIP } from 'node:net';
import { z } from 'zod';

const port = z.number().int().min(0).max(65535);
/**
 * The pooler sits beside its Postgres and behind the gateway: locally on loopback, in a pod on the
 * pod's address (the gateways dial it; Postgres trusts that address as the pod's own, decision 0076).
 */
const address = z.string().refine((h) => h === 'localhost' || isIP(h) !== 0, 'must be an IP address (127.0.0.1 locally, the pod\'s in a pod)');

export const PoolerConfigSchema = z.object({
  instanceId: z.string().min(1),
  /** 0 picks a free port (tests). */
  listenPort: port,
  /**
   * The gateway in front authenticates; the pooler trusts its callers. In a pod, its address is
   * reachable from other pods: the network must keep everything but the gateways away (decision 0076).
   */
  listenHost: address.default('127.0.0.1'),
  postgres: z.object({
    host: address.default('127.0.0.1'),
    port: port.min(1),
  }).strict(),
  /** Server connections per (user, database). */
  poolSize: z.number().int().min(1).max(10_000).default(20),
  maxClients: z.number().int().min(1).default(10_000),
  queueTimeoutMs: z.number().int().min(1).default(10_000),
  serverIdleTimeoutMs: z.number().int().min(100).default(60_000),
  serverLifetimeMs: z.number().int().min(1000).default(3_600_000),
  serverConnectTimeoutMs: z.number().int().min(100).default(5_000),
  /** Protocol-level prepared statements kept per server connection (LRU). */
  maxPreparedStatements: z.number().int().min(1).default(500),
  /** Largest client message accepted (Postgres's own limit is 1 GiB). */
  maxMessageBytes: z.number().int().min(1024).max(1024 * 1024 * 1024 - 1).default(256 * 1024 * 1024),
  /** Prometheus /metrics and /healthz; 0 picks a free port; omit to serve none. */
  metricsPort: port.optional(),
  /**
   * Processes sharing the port (node:cluster), for more cores: poolSize stays the
   * bound per (user, database) for the whole Postgres (decision 0057). 1 runs in this process.
   */
  workers: z.number().int().min(1).max(64).default(1),
  /** How long SIGTERM waits for active transactions before closing everything. */
  shutdownGraceMs: z.number().int().min(0).default(10_000),
}).strict();

export type PoolerConfig = z.infer<typeof PoolerConfigSchema>;
export type PoolerConfigInput = z.input<typeof PoolerConfigSchema>;

export class ConfigError extends Error {}

/** Validates a parsed config; the error names each bad field (`poolSize: Expected number, received string`). */
export function parseConfig(raw: unknown): PoolerConfig {
  const r = PoolerConfigSchema.safeParse(raw);
  if (!r.success) {
    const msg = r.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ');
    throw new ConfigError(msg);
  }
  return r.data;
}

export function loadConfigFile(file: string): PoolerConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(`cannot read config ${file}: ${(err as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`${file} is not valid JSON: ${(err as Error).message}`);
  }
  return parseConfig(raw);
}
