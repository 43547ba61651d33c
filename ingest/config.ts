/** The ingest agent's configuration: one JSON file per agent, written by `mg cluster up`. */
import { z } from 'zod';
import { readJsonConfig } from '../common/config.ts';

/**
 * Change data capture of one database (the cluster spec's `databases[].cdc`,
 * handed to every agent of the database; the primary's agent runs it).
 */
export const cdcConfigSchema = z.object({
  enabled: z.boolean().default(false),
  /** 'schema.table' or 'table' (schema public); empty: every user table, including ones created later. */
  tables: z.array(z.string().regex(/^[^.]+(\.[^.]+)?$/, 'must be table or schema.table')).default([]),
  /** Topics are <kafka.topicPrefix><topicPrefix>.<database>.<schema>.<table>. */
  topicPrefix: z.string().regex(/^[a-zA-Z0-9_-]+$/, 'may hold only letters, digits, _ and -').default('mg'),
  /** A null-valued message after each delete (so compaction can drop the key). */
  tombstones: z.boolean().default(true),
  /** BEGIN/END events with event counts on <prefix>.<database>.transaction. */
  transactionEvents: z.boolean().default(false),
  numeric: z.enum(['decimal', 'string']).default('decimal'),
  /** Slot lag above which the stream raises an alert (status, health, metric, log). */
  maxSlotLagBytes: z.number().int().positive().default(1024 ** 3),
  /** How often an idle stream emits a heartbeat through the WAL so the slot keeps moving. */
  heartbeatMs: z.number().int().min(100).max(600_000).default(5_000),
  partitions: z.number().int().min(1).max(1024).default(1),
  retentionMs: z.number().int().min(-1).default(7 * 24 * 3_600_000),
  snapshotChunkRows: z.number().int().min(1).max(1_000_000).default(10_000),
  maxBatchEvents: z.number().int().min(1).max(100_000).default(10_000),
}).strict();

export type CdcConfig = z.infer<typeof cdcConfigSchema>;

export const agentConfigSchema = z.object({
  instanceId: z.string().min(1),
  database: z.string().min(1),
  shard: z.string().min(1),
  cell: z.string().min(1),
  host: z.literal('127.0.0.1').default('127.0.0.1'),
  port: z.number().int().min(1).max(65535),
  dataDir: z.string().min(1),
  binDir: z.string().optional(),
  brokers: z.array(z.string()).min(1),
  registryUrl: z.string().url(),
  topicPrefix: z.string().default(''),
  healthIntervalMs: z.number().int().positive().default(500),
  probeTimeoutMs: z.number().int().positive().default(1000),
  metricsPort: z.number().int().min(0).max(65535),
  /** The MultiPooler beside this instance, announced in topology for the gateways. */
  poolerPort: z.number().int().min(1).max(65535).nullable().default(null),
  cdc: cdcConfigSchema.default({}),
}).strict();

export type AgentConfig = z.infer<typeof agentConfigSchema>;

export const readAgentConfig = (file: string): AgentConfig => readJsonConfig(file, agentConfigSchema, 'agent');
