/**
 * The cluster spec: a YAML file plus flags, validated with zod so that a bad
 * value gets an error naming its field. Defaults give the issue's cluster:
 * database `postgres`, 1 shard, 3 instances in cells zone1..zone3.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import YAML from 'yaml';
import { z } from 'zod';
import { backupConfigSchema, cdcConfigSchema } from '../ingest/config.ts';
import { backupScheduleSchema } from '../orchestrator/config.ts';
import { parsePolicy } from '../schemas/durability.ts';

const port = z.number().int().min(1024).max(65535);
const name = z.string().regex(/^[a-z][a-z0-9_]{0,62}$/, 'must be lower-case letters, digits or _, starting with a letter');

export const clusterSpecSchema = z.object({
  name: name.default('local'),
  dataDir: z.string().default(path.resolve('.mg')),
  cacheDir: z.string().default(path.join(os.homedir(), '.cache', 'mg')),
  kafka: z.object({
    /** An existing Kafka to use (a bootstrap list); then no broker is started. */
    bootstrap: z.string().regex(/^[^,\s]+:\d+(,[^,\s]+:\d+)*$/, 'must be host:port[,host:port...]').optional(),
    /** Prefixed to every topic, so several clusters can share one Kafka. */
    topicPrefix: z.string().regex(/^[a-zA-Z0-9._-]*$/, 'may hold only letters, digits, . _ -').default(''),
    port: port.default(19092),
    controllerPort: port.default(19093),
    heapMb: z.number().int().min(128).max(8192).default(512),
  }).strict().default({}),
  registry: z.object({
    /** An existing Confluent-compatible registry to use; then none is started. */
    url: z.string().url().optional(),
    port: port.default(18081),
  }).strict().default({}),
  postgres: z.object({
    basePort: port.default(15432),
    binDir: z.string().default('/usr/lib/postgresql/15/bin'),
  }).strict().default({}),
  pooler: z.object({
    basePort: port.default(16432),
    poolSize: z.number().int().min(1).max(1000).default(20),
    metricsBasePort: port.default(19200),
  }).strict().default({}),
  gateway: z.object({
    port: port.default(16000),
    metricsPort: port.default(19300),
    /** How long a query waits for a shard without a serving primary before it fails. */
    bufferWindowMs: z.number().int().min(0).max(300_000).default(10_000),
    /** Clients beyond this get 53300; default: what the gateway's open-files limit allows. */
    maxClients: z.number().int().min(1).optional(),
    /** Transactions that begin READ ONLY run on a replica (the primary when none is usable). */
    readOnlyToReplicas: z.boolean().default(false),
    /**
     * A session idle this long whose state can move gives back its pooler
     * connection (reopened, with its settings, at its next query); 0 never does.
     */
    releaseIdleLinksAfterMs: z.number().int().min(0).max(86_400_000).default(30_000),
    /** Scale to zero: a database with instances of its own and no session for this long is deactivated (0: never; docs/databases.md). */
    deactivateIdleAfterMs: z.number().int().min(0).max(2_592_000_000).default(0),
    /** Gateway processes sharing the port: more cores, and a file-descriptor limit each. */
    workers: z.number().int().min(1).max(64).default(1),
    /** The REST (PostgREST) API: `http://host:httpPort/<database>/<table>`; off when unset. */
    httpPort: port.optional(),
    /** Schemas the REST API exposes (the first is the default profile). */
    restSchemas: z.array(z.string().min(1)).min(1).default(['public']),
    /** The role of REST requests without a JWT; none refuses them (401). */
    restAnonRole: z.string().min(1).optional(),
    /** HS256 secret REST JWTs are signed with (at least 32 characters, as PostgREST requires). */
    restJwtSecret: z.string().min(32).optional(),
  }).strict().default({}),
  agent: z.object({
    healthIntervalMs: z.number().int().min(50).max(60_000).default(500),
    probeTimeoutMs: z.number().int().min(50).max(60_000).default(1000),
    metricsBasePort: port.default(19100),
  }).strict().default({}),
  orchestrator: z.object({
    /** One MultiOrch per cell, on basePort + the cell's index (REST API and /metrics). */
    basePort: port.default(19400),
    /** How long a primary reported unhealthy is watched before a direct probe can fail it over. */
    detectMs: z.number().int().min(0).max(60_000).default(500),
    /** How long a primary's agent may be silent before its shard fails over. */
    agentDownMs: z.number().int().min(500).max(600_000).default(2_500),
    /** How long a two-phase commit may stay prepared before the resolver finishes it (docs/twopc.md). */
    twopcGraceMs: z.number().int().min(100).max(3_600_000).default(10_000),
    /** How long two-phase-commit decision rows are kept after their transaction finished everywhere. */
    twopcRetentionMs: z.number().int().min(1_000).default(3_600_000),
    /** Bearer token of the admin API (docs/admin-api.md); without one it listens on localhost only. */
    apiToken: z.string().min(16, 'must be at least 16 characters').optional(),
    /** Where the admin API listens when it has a token. */
    apiHost: z.string().min(1).default('0.0.0.0'),
  }).strict().default({}),
  /** WAL archiving and backups through pgBackRest, one stanza per shard (docs/backups.md). */
  backup: backupConfigSchema.omit({ repoPath: true, lockPath: true, logPath: true }).extend({
    /** Default: <dataDir>/backups. */
    repoPath: z.string().optional(),
  }).strict().default({}),
  cells: z.array(name).min(1).default(['zone1', 'zone2', 'zone3'])
    .refine((c) => new Set(c).size === c.length, 'cells must be unique'),
  databases: z.array(z.object({
    name,
    shards: z.number().int().min(1).max(256).refine((n) => (n & (n - 1)) === 0, 'must be a power of two').default(1),
    /** Rows spread over the shards by the database's VSchema (docs/sharding.md); needed for more than one shard. */
    sharded: z.boolean().default(false),
    /** Default of SET mg.transaction_mode for the database's sessions. */
    transactionMode: z.enum(['single', 'multi', 'twopc']).default('multi'),
    instancesPerShard: z.number().int().min(1).max(9).default(3),
    /** Change data capture into Kafka; off unless enabled (docs/cdc.md). */
    cdc: cdcConfigSchema.default({}),
    /** ANY_<n> (n nodes hold each acknowledged commit, the primary included) or MULTI_CELL_ANY_<n> (n cells); default ANY_2 (ANY_1 alone). */
    durability: z.string().refine((p) => policyN(p) !== undefined, 'must be ANY_<n> or MULTI_CELL_ANY_<n> with n from 1 to 9').optional(),
    backupSchedule: backupScheduleSchema.default({}),
  }).strict().refine((d) => (policyN(d.durability ?? '') ?? 0) <= d.instancesPerShard, {
    message: 'durability needs more instances per shard than the database has', path: ['durability'],
  }).refine((d) => d.sharded || d.shards === 1, {
    message: 'more than one shard needs sharded: true (and a VSchema: mg vschema apply)', path: ['shards'],
  })).min(1).default([{ name: 'postgres', shards: 1, instancesPerShard: 3, sharded: false, transactionMode: 'multi' }])
    .refine((d) => new Set(d.map((x) => x.name)).size === d.length, 'database names must be unique'),
}).strict();

export type ClusterSpec = z.infer<typeof clusterSpecSchema>;

/** n of a durability policy, or undefined when the text is not a policy. */
function policyN(text: string): number | undefined {
  try {
    return parsePolicy(text).n;
  } catch {
    return undefined;
  }
}

export class SpecError extends Error {}

/** Reads a spec from YAML (optional) with flag overrides applied on top, and validates it. */
export function loadSpec(file: string | undefined, overrides: Record<string, unknown> = {}): ClusterSpec {
  let raw: Record<string, unknown> = {};
  if (file) {
    let text: string;
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch (err) {
      throw new SpecError(`cannot read spec file ${file}: ${(err as Error).message}`);
    }
    try {
      raw = (YAML.parse(text) ?? {}) as Record<string, unknown>;
    } catch (err) {
      throw new SpecError(`spec file ${file} is not valid YAML: ${(err as Error).message}`);
    }
    if (typeof raw !== 'object' || Array.isArray(raw)) throw new SpecError(`spec file ${file} must hold a mapping at the top level`);
  }
  for (const [dotted, value] of Object.entries(overrides)) setPath(raw, dotted.split('.'), value);
  return parseSpec(raw, file);
}

export function parseSpec(raw: unknown, origin = 'spec'): ClusterSpec {
  const result = clusterSpecSchema.safeParse(raw);
  if (!result.success) {
    const lines = result.error.issues.map((i) => `  ${i.path.join('.') || '(top level)'}: ${i.message}`);
    throw new SpecError(`invalid cluster spec (${origin}):\n${lines.join('\n')}`);
  }
  const spec = result.data;
  spec.dataDir = path.resolve(spec.dataDir);
  spec.cacheDir = path.resolve(spec.cacheDir);
  spec.backup.repoPath = path.resolve(spec.backup.repoPath ?? path.join(spec.dataDir, 'backups'));
  checkPortClashes(spec);
  return spec;
}

function setPath(obj: Record<string, any>, keys: string[], value: unknown): void {
  let o = obj;
  for (const k of keys.slice(0, -1)) o = o[k] ??= {};
  o[keys[keys.length - 1]] = value;
}

function checkPortClashes(spec: ClusterSpec): void {
  const used = new Map<number, string>();
  const take = (p: number, what: string) => {
    const other = used.get(p);
    if (other) throw new SpecError(`invalid cluster spec: port ${p} is used by both ${other} and ${what}`);
    used.set(p, what);
  };
  if (!spec.kafka.bootstrap) {
    take(spec.kafka.port, 'kafka.port');
    take(spec.kafka.controllerPort, 'kafka.controllerPort');
  }
  if (!spec.registry.url) take(spec.registry.port, 'registry.port');
  take(spec.gateway.port, 'gateway.port');
  take(spec.gateway.metricsPort, 'gateway.metricsPort');
  if (spec.gateway.httpPort !== undefined) take(spec.gateway.httpPort, 'gateway.httpPort');
  spec.cells.forEach((cell, i) => take(spec.orchestrator.basePort + i, `orchestrator port of ${cell}`));
  for (const inst of instancesOf(spec)) {
    take(inst.port, `postgres port of ${inst.instanceId}`);
    take(inst.metricsPort, `agent metrics port of ${inst.instanceId}`);
    take(inst.poolerPort, `pooler port of ${inst.instanceId}`);
    take(inst.poolerMetricsPort, `pooler metrics port of ${inst.instanceId}`);
  }
}

/** Vitess-style shard names for n equal key ranges: 1 -> '-', 2 -> '-80','80-'. */
export function shardRanges(n: number): Array<{ shard: string; start: string; end: string }> {
  const bound = (i: number) => (i === 0 || i === n ? '' : (i * (256 / n)).toString(16).padStart(2, '0'));
  return Array.from({ length: n }, (_, i) => ({ shard: `${bound(i)}-${bound(i + 1)}`, start: bound(i), end: bound(i + 1) }));
}

export interface PlannedInstance {
  instanceId: string;
  database: string;
  shard: string;
  cell: string;
  port: number;
  metricsPort: number;
  poolerPort: number;
  poolerMetricsPort: number;
  dataDir: string;
}

/** Every instance the spec asks for, with ports and cells assigned deterministically. */
export function instancesOf(spec: ClusterSpec): PlannedInstance[] {
  const out: PlannedInstance[] = [];
  for (const db of spec.databases) {
    for (const range of shardRanges(db.shards)) {
      const shardLabel = range.shard === '-' ? '0' : range.shard.replace('-', '_');
      for (let i = 0; i < db.instancesPerShard; i++) {
        const n = out.length;
        const cell = spec.cells[i % spec.cells.length];
        const instanceId = `${db.name}-${shardLabel}-${cell}-${i}`;
        out.push({
          instanceId, database: db.name, shard: range.shard, cell,
          port: spec.postgres.basePort + n,
          metricsPort: spec.agent.metricsBasePort + n,
          poolerPort: spec.pooler.basePort + n,
          poolerMetricsPort: spec.pooler.metricsBasePort + n,
          dataDir: path.join(spec.dataDir, 'postgres', instanceId),
        });
      }
    }
  }
  return out;
}

/** The instances of one shard in one cell: what a provisioner places together (one StatefulSet on Kubernetes). */
export interface InstanceGroup {
  database: string;
  shard: string;
  cell: string;
  instances: PlannedInstance[];
}

/** instancesOf grouped by database, shard and cell, in the plan's order. */
export function instanceGroups(spec: ClusterSpec): InstanceGroup[] {
  const groups = new Map<string, InstanceGroup>();
  for (const inst of instancesOf(spec)) {
    const key = `${inst.database}/${inst.shard}/${inst.cell}`;
    const group = groups.get(key) ?? { database: inst.database, shard: inst.shard, cell: inst.cell, instances: [] };
    group.instances.push(inst);
    groups.set(key, group);
  }
  return [...groups.values()];
}
