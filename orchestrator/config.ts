/** MultiOrch's configuration: one JSON file per orchestrator, written by `mg cluster up`. */
import { z } from 'zod';
import { readJsonConfig } from '../common/config.ts';

/** Backups MultiOrch takes on its own, per shard of a database: the interval of each type in minutes (none: only on demand). */
export const backupScheduleSchema = z.object({
  fullEveryMinutes: z.number().int().min(1).optional(),
  diffEveryMinutes: z.number().int().min(1).optional(),
  incrEveryMinutes: z.number().int().min(1).optional(),
}).strict();

export type BackupSchedule = z.infer<typeof backupScheduleSchema>;

export const orchConfigSchema = z.object({
  /** Unique among orchestrators, e.g. orch-zone1; it signs pledges and events. */
  id: z.string().regex(/^[a-zA-Z0-9._-]+$/),
  cell: z.string().min(1),
  /** REST API, OpenAPI document and /metrics. */
  port: z.number().int().min(0).max(65535),
  /** The admin API's bearer token; without one the API listens on localhost only. */
  apiToken: z.string().min(16).optional(),
  /** Where the API listens when it has a token. */
  apiHost: z.string().min(1).default('0.0.0.0'),
  brokers: z.array(z.string()).min(1),
  registryUrl: z.string().url(),
  topicPrefix: z.string().default(''),
  /** How often each shard is checked. */
  tickMs: z.number().int().min(20).default(200),
  /** A primary reported unreachable (or not primary) this long, and confirmed by a direct probe, is failed over. */
  detectMs: z.number().int().min(0).default(500),
  /** A primary whose agent sends no heartbeat this long is failed over (gateways route only on fresh heartbeats). */
  agentDownMs: z.number().int().min(500).default(2_500),
  /** A heartbeat older than this is stale. */
  staleMs: z.number().int().min(100).default(1_500),
  /**
   * How long a shard's recovery lease lasts unless renewed (every leaseMs/3 while its holder works) or
   * released: what the others wait when the holder dies. Orchestrators' clocks must agree within leaseMs/4.
   */
  leaseMs: z.number().int().min(1_000).default(2_000),
  /** Timeout of one agent command (rewinds and clones take longer: see the callers). */
  commandTimeoutMs: z.number().int().min(500).default(8_000),
  /** A two-phase commit prepared this long without finishing is in doubt: the resolver finishes it from its decision (none: abort). */
  twopcGraceMs: z.number().int().min(100).default(10_000),
  /** How often every shard primary is scanned for in-doubt prepared transactions. */
  twopcScanMs: z.number().int().min(50).default(1_000),
  /** Decision rows are kept this long (and while their transaction is prepared anywhere), then deleted. */
  twopcRetentionMs: z.number().int().min(1_000).default(3_600_000),
  /** A replica is put in service (the gateways send it reads) once its replay is this close to the primary's WAL (decision 0034). */
  servingLagBytes: z.number().int().min(0).default(16 * 1024 * 1024),
  /**
   * Starts and stops instances for `mg replica add|remove` (decision 0034): a command, to which `add <db> <shard> <cell>`
   * or `remove <instanceId>` is appended; run in `cwd`. None: the API answers 501 (instances are provisioned elsewhere).
   */
  provisioner: z.object({ command: z.array(z.string().min(1)).min(1), cwd: z.string().min(1) }).strict().optional(),
  /** Per database: the backup schedule (the spec's databases[].backupSchedule). */
  backupSchedules: z.record(backupScheduleSchema).default({}),
}).strict();

export type OrchConfig = z.infer<typeof orchConfigSchema>;

export const readOrchConfig = (file: string): OrchConfig => readJsonConfig(file, orchConfigSchema, 'orchestrator');
