/** The ingest agent's configuration: one JSON file per agent, written by `mg cluster up`. */
import { z } from 'zod';
import { readJsonConfig } from '../common/config.ts';
import { stanzaOf } from '../schemas/backup.ts';
import { INTERNAL_SCHEMAS } from '../schemas/internal.ts';

/**
 * Change data capture of one database (the cluster spec's `databases[].cdc`,
 * handed to every agent of the database; the primary's agent runs it).
 */
export const cdcConfigSchema = z.object({
  enabled: z.boolean().default(false),
  /** 'schema.table' or 'table' (schema public); empty: every user table, including ones created later. */
  tables: z.array(z.string().regex(/^[^.]+(\.[^.]+)?$/, 'must be table or schema.table')
    .refine((t) => !t.includes('.') || !INTERNAL_SCHEMAS.has(t.split('.')[0]), 'is in an internal schema of the project, never streamed')).default([]),
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
  /**
   * Standbys keep a copy of the primary's slot (Patroni's way on Postgres 15), so a failover resumes the
   * stream instead of re-snapshotting; costs a restart of each standby when it copies the slot (decision 0052).
   */
  failoverSlots: z.boolean().default(true),
}).strict();

export type CdcConfig = z.infer<typeof cdcConfigSchema>;

/**
 * WAL archiving and backups through pgBackRest (the cluster spec's `backup`,
 * the same for every agent; docs/backups.md). One stanza per shard.
 */
export const backupConfigSchema = z.object({
  /** archive_mode on, archive_command through pgBackRest, stanza-create at bootstrap, replicas restored from backups. */
  enabled: z.boolean().default(true),
  /** repo1-path: a local directory by default; with repo1-type=s3 in `options`, the path inside the bucket. */
  repoPath: z.string().min(1),
  /** Shared by every agent of the cluster, so only one backup of a stanza runs at a time. */
  lockPath: z.string().min(1),
  logPath: z.string().min(1),
  /** Full backups kept (older ones, with the diff/incr backups and WAL that depend on them, are expired). */
  retentionFull: z.number().int().min(1).max(9999).default(2),
  /** Differential backups kept per full backup; default: every one. */
  retentionDiff: z.number().int().min(1).max(9999).optional(),
  /** Further pgBackRest options of the [global] section, e.g. repo1-type: s3, repo1-s3-bucket: ... */
  options: z.record(z.string().regex(/^[a-z0-9-]+$/, 'must be a pgBackRest option name'), z.string()).default({}),
  /** Compression of the repository (pgBackRest compress-type). */
  compressType: z.enum(['none', 'gz', 'lz4', 'zst', 'bz2']).default('lz4'),
  /** Parallel processes of backup and restore (pgBackRest process-max). */
  processMax: z.number().int().min(1).max(64).default(2),
}).strict();

export type BackupConfig = z.infer<typeof backupConfigSchema>;

export const agentConfigSchema = z.object({
  instanceId: z.string().min(1),
  database: z.string().min(1),
  shard: z.string().min(1),
  cell: z.string().min(1),
  /** Where Postgres listens and what the instance registers: 127.0.0.1 locally, the pod's address in a pod. */
  host: z.string().ip().default('127.0.0.1'),
  /**
   * The `postgres` role's password, set on a new shard's first primary by its agent (a pod's:
   * MG_PASSWORD); locally `mg cluster up` sets it instead. Stored as a SCRAM verifier.
   */
  loginPassword: z.string().min(1).optional(),
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
  /** Absent: no archiving, no backups. */
  backup: backupConfigSchema.optional(),
  /** The shard's pgBackRest stanza, given when it is not `<database>-<shard>` (a name used before by another system, decision 0064). */
  stanza: z.string().regex(/^[A-Za-z0-9_.-]+$/).optional(),
  /**
   * A database restored from another one's backups (`mg backup restore --as`):
   * the shard's first primary is that database's shard restored to the target
   * instead of a new initdb.
   */
  restoreFrom: z.object({
    database: z.string().min(1),
    stanza: z.string().min(1),
    target: z.union([z.object({ type: z.enum(['time', 'lsn']), value: z.string().min(1) }).strict(), z.object({ type: z.literal('default') }).strict()]),
  }).strict().optional(),
}).strict();

export type AgentConfig = z.infer<typeof agentConfigSchema>;

/** The stanza this instance archives into and backs up to. */
export const stanzaOfAgent = (cfg: AgentConfig): string => cfg.stanza ?? stanzaOf(cfg.database, cfg.shard);

export const readAgentConfig = (file: string): AgentConfig => readJsonConfig(file, agentConfigSchema, 'agent');
