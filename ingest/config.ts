/** The ingest agent's configuration: one JSON file per agent, written by `mg cluster up`. */
import fs from 'node:fs';
import { z } from 'zod';

export const agentConfigSchema = z.object({
  instanceId: z.string().min(1),
  database: z.string().min(1),
  shard: z.string().min(1),
  cell: z.string().min(1),
  host: z.literal('127.0.0.1').default('127.0.0.1'),
  port: z.number().int().min(1).max(65535),
  dataDir: z.string().min(1),
  binDir: z.string().optional(),
  /** The instance bootstrapped as the shard's primary; the others clone from `upstream`. */
  initialPrimary: z.boolean(),
  upstream: z.object({ host: z.string(), port: z.number().int() }).nullable(),
  brokers: z.array(z.string()).min(1),
  registryUrl: z.string().url(),
  topicPrefix: z.string().default(''),
  healthIntervalMs: z.number().int().positive().default(500),
  probeTimeoutMs: z.number().int().positive().default(1000),
  metricsPort: z.number().int().min(0).max(65535),
  /** The MultiPooler beside this instance, announced in topology for the gateways. */
  poolerPort: z.number().int().min(1).max(65535).nullable().default(null),
}).strict();

export type AgentConfig = z.infer<typeof agentConfigSchema>;

export function readAgentConfig(file: string): AgentConfig {
  const result = agentConfigSchema.safeParse(JSON.parse(fs.readFileSync(file, 'utf8')));
  if (!result.success) {
    throw new Error(`invalid agent config ${file}: ${result.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  }
  return result.data;
}
