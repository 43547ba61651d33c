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
import { stanzaOf } from '../schemas/backup.ts';
import { backupScheduleSchema } from '../orchestrator/config.ts';
import { parsePolicy } from '../schemas/durability.ts';

const port = z.number().int().min(1024).max(65535);
/**
 * Port slot (offset from each base port) of the first replica added at run time; later ones take the next lower
 * free slot. The spec's own instances fill slots upwards from 0, so neither moves the other (decision 0034).
 */
export const ADDED_SLOT_TOP = 99;
const shardCount = z.number().int().min(1).max(256).refine((n) => (n & (n - 1)) === 0, 'must be a power of two');
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
    /** Pooler processes per instance sharing its port, for more cores; poolSize stays per instance (decision 0057). */
    workers: z.number().int().min(1).max(64).default(1),
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
    /** PostgREST's jwt-secret: the HS256 secret REST JWTs are signed with (32+ characters), or a JWK / JWKS as JSON (RS256, ES256, ...). */
    restJwtSecret: z.string().min(32).optional(),
    /** A function (`schema.name`) every REST request calls first, in its transaction (PostgREST's db-pre-request). */
    restPreRequest: z.string().min(1).optional(),
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
    /** A replica is put in service (gateways send it reads) once its replay is this close to the primary's WAL. */
    servingLagBytes: z.number().int().min(0).default(16 * 1024 * 1024),
    /** Where the admin API listens when it has a token. */
    apiHost: z.string().min(1).default('0.0.0.0'),
  }).strict().default({}),
  /** The materializer (MoveTables, VDiff; docs/materializer.md): its REST API and /metrics. */
  materializer: z.object({
    port: port.default(19500),
    /** Rows per copy page (each page is one event, the unit a restart resumes from). */
    pageRows: z.number().int().min(1).max(1_000_000).default(5_000),
    /** Source rows per VDiff range (one range scan per target shard each). */
    vdiffRows: z.number().int().min(1).max(1_000_000).default(10_000),
    /** How long after an online migration's cut-over its old table is kept in step for a revert, unless the submit says (docs/migrations.md). */
    migrationRevertSeconds: z.number().int().min(0).default(86_400),
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
    shards: shardCount.default(1),
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
    /** Written by `mg backup restore <db> --as <name>`: each shard's first primary is <db>'s shard restored to this point. */
    restoredFrom: z.object({
      database: name,
      /** ISO 8601; neither time nor lsn: the end of the archive. */
      time: z.string().datetime({ offset: true }).optional(),
      lsn: z.string().regex(/^[0-9A-Fa-f]{1,8}\/[0-9A-Fa-f]{1,8}$/, 'must look like 0/16B3748').optional(),
    }).strict().optional(),
    /** Replicas added at run time (`mg replica add`): shard, cell and the port slot each was given (decision 0034). */
    addedInstances: z.array(z.object({
      shard: z.string().min(1),
      cell: name,
      slot: z.number().int().min(0).max(ADDED_SLOT_TOP),
    }).strict()).default([]),
    /** Instances of the instancesPerShard layout removed at run time (`mg replica remove`); their port slots stay unused. */
    removedInstances: z.array(z.string().min(1)).default([]),
    /**
     * Shard sets brought up at run time beside the database's own for a reshard (`mg database add-shard-set`,
     * decision 0056): the shard count of each. Their instances are addedInstances, so no other instance's port moves.
     */
    shardSets: z.array(shardCount).default([]),
    /**
     * The database's own `shards` set was retired by a reshard's complete (decision 0061): its instances are not
     * run and their port slots stay unused; the shard sets in shardSets serve the database.
     */
    shardsRetired: z.boolean().default(false),
    /**
     * The pgBackRest stanza of each shard whose `<db>-<shard>` the repository already held when the shard was
     * defined (an earlier system's): `<db>-<shard>-g<n>`, chosen by `mg cluster up` (decision 0064). Others: `<db>-<shard>`.
     */
    stanzas: z.record(z.string(), z.string().min(1)).default({}),
  }).strict().refine((d) => (policyN(d.durability ?? '') ?? 0) <= d.instancesPerShard, {
    message: 'durability needs more instances per shard than the database has', path: ['durability'],
  }).refine((d) => d.sharded || d.shards === 1, {
    message: 'more than one shard needs sharded: true (and a VSchema: mg vschema apply)', path: ['shards'],
  }).refine((d) => d.sharded || d.shardSets.length === 0, {
    message: 'another shard set needs sharded: true (and a VSchema: mg vschema apply)', path: ['shardSets'],
  }).refine((d) => new Set(shardSetsOf(d)).size === shardSetsOf(d).length, {
    message: 'each shard set needs a shard count of its own (the shard names are the key ranges)', path: ['shardSets'],
  }).refine((d) => shardSetsOf(d).length > 0, {
    message: 'a database needs a shard set that is not retired', path: ['shardsRetired'],
  })).min(1).default([{ name: 'postgres', shards: 1, instancesPerShard: 3, sharded: false, transactionMode: 'multi' }])
    .refine((d) => new Set(d.map((x) => x.name)).size === d.length, 'database names must be unique'),
  /** Databases dropped at run time (`mg database drop`): the port slots they held stay unused, so no other instance's port moves. */
  droppedDatabases: z.array(z.object({
    name,
    firstSlot: z.number().int().min(0),
    slots: z.number().int().min(1),
  }).strict()).default([]),
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
  take(spec.materializer.port, 'materializer.port');
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
  const at = (slot: number, instanceId: string, database: string, shard: string, cell: string): PlannedInstance => ({
    instanceId, database, shard, cell,
    port: spec.postgres.basePort + slot,
    metricsPort: spec.agent.metricsBasePort + slot,
    poolerPort: spec.pooler.basePort + slot,
    poolerMetricsPort: spec.pooler.metricsBasePort + slot,
    dataDir: path.join(spec.dataDir, 'postgres', instanceId),
  });
  let slot = 0;
  for (const db of spec.databases) {
    slot = pastDroppedSlots(spec, slot);
    for (const range of shardRanges(db.shards)) {
      for (let i = 0; i < db.instancesPerShard; i++, slot++) {
        const cell = spec.cells[i % spec.cells.length];
        const instanceId = instanceIdOf(db.name, range.shard, cell, i);
        // A removed instance, or a retired set's, keeps its slot: the ports of every other instance stay where they are.
        if (!db.shardsRetired && !db.removedInstances.includes(instanceId)) out.push(at(slot, instanceId, db.name, range.shard, cell));
      }
    }
  }
  for (const db of spec.databases) {
    for (const a of db.addedInstances) out.push(at(a.slot, instanceIdOf(db.name, a.shard, a.cell, a.slot), db.name, a.shard, a.cell));
  }
  return out;
}

/** `<db>-<shard label>-<cell>-<index>`; the shard label spells the key range without '-' at the ends ('0' for the unsharded '-'). */
export function instanceIdOf(database: string, shard: string, cell: string, index: number): string {
  const shardLabel = shard === '-' ? '0' : shard.replace('-', '_');
  return `${database}-${shardLabel}-${cell}-${index}`;
}

/**
 * The id of the `ordinal`-th instance of the layout in `cell`, whether or not the spec still asks for it: instance i
 * of a shard goes to cell i mod n (instancesOf), so a cell's instances are its own index, then every n-th after it.
 * On Kubernetes that is the pod of that ordinal in the cell's StatefulSet, and lowering instancesPerShard removes
 * the highest ordinals, the ones a StatefulSet removes first.
 */
export function layoutInstanceId(cells: string[], database: string, shard: string, cell: string, ordinal: number): string {
  return instanceIdOf(database, shard, cell, cells.indexOf(cell) + ordinal * cells.length);
}

/** `slot`, or the first slot after the dropped databases' ranges that start there (a dropped database held its slots in the layout's order). */
function pastDroppedSlots(spec: ClusterSpec, slot: number): number {
  for (let moved = true; moved;) {
    moved = false;
    for (const d of spec.droppedDatabases) {
      if (d.firstSlot === slot) {
        slot += d.slots;
        moved = true;
      }
    }
  }
  return slot;
}

/** Every port slot the spec's own layout takes (removed instances' and dropped databases' included): an added replica takes none of these. */
function layoutSlots(spec: ClusterSpec): number {
  return spec.databases.reduce((n, db) => n + db.shards * db.instancesPerShard, 0) + spec.droppedDatabases.reduce((n, d) => n + d.slots, 0);
}

/** The spec without `database`, its layout's port slots kept as a dropped database's (its added replicas' slots are free again). */
export function withoutDatabase(spec: ClusterSpec, database: string): ClusterSpec {
  let slot = 0;
  for (const db of spec.databases) {
    slot = pastDroppedSlots(spec, slot);
    const slots = db.shards * db.instancesPerShard;
    if (db.name === database) {
      if (spec.databases.length === 1) throw new SpecError(`${database} is the cluster's only database`);
      const next = structuredClone(spec);
      next.databases = next.databases.filter((d) => d.name !== database);
      next.droppedDatabases.push({ name: database, firstSlot: slot, slots });
      checkPortClashes(next);
      return next;
    }
    slot += slots;
  }
  throw new SpecError(`the spec has no database ${database}`);
}

/** The shard counts of a database's sets that are not retired: its own layout's (unless retired), then those added for a reshard. */
export function shardSetsOf(db: { shards: number; shardSets: number[]; shardsRetired: boolean }): number[] {
  return [...(db.shardsRetired ? [] : [db.shards]), ...db.shardSets];
}

/** The pgBackRest stanza of a shard of the spec's database `db`. */
export function stanzaOfSpec(db: ClusterSpec['databases'][number], shard: string): string {
  return db.stanzas[shard] ?? stanzaOf(db.name, shard);
}

/** Every shard of a database in the spec: those of each set shardSetsOf names. */
export function shardsOfSpec(db: ClusterSpec['databases'][number]): Array<{ shard: string; start: string; end: string }> {
  return shardSetsOf(db).flatMap(shardRanges);
}

/**
 * The spec with the shard set of `database` that `shards` names retired (decision 0061): the database's own
 * layout is marked retired (its port slots stay unused), an added set leaves shardSets; either way the set's
 * added replicas leave addedInstances (run-time slots are free again, as a dropped database's are). `retired`
 * is false when no set of the spec has those shards any more (retired before: nothing to change); a SpecError
 * when they are not exactly one set, or the database's last one.
 */
export function withoutShardSet(spec: ClusterSpec, database: string, shards: string[]): { spec: ClusterSpec; retired: boolean } {
  const db = spec.databases.find((d) => d.name === database);
  if (!db) throw new SpecError(`the spec has no database ${database}`);
  const names = (n: number) => shardRanges(n).map((r) => r.shard);
  const wanted = [...shards].sort().join(',');
  const count = shardSetsOf(db).find((n) => names(n).sort().join(',') === wanted);
  if (count === undefined) {
    if (shards.some((s) => shardsOfSpec(db).some((r) => r.shard === s))) throw new SpecError(`${shards.join(', ')} are not one shard set of ${database} (its sets: ${shardSetsOf(db).map((n) => names(n).join(', ')).join(' | ')})`);
    return { spec, retired: false };
  }
  if (shardSetsOf(db).length === 1) throw new SpecError(`${shards.join(', ')} are the only shard set of ${database}`);
  const next = structuredClone(spec);
  const nextDb = next.databases.find((d) => d.name === database)!;
  if (count === db.shards && !db.shardsRetired) nextDb.shardsRetired = true;
  else nextDb.shardSets = nextDb.shardSets.filter((n) => n !== count);
  nextDb.addedInstances = nextDb.addedInstances.filter((a) => !shards.includes(a.shard));
  return { spec: next, retired: true };
}

/**
 * The spec with one more replica of `database`/`shard` in `cell`, in the highest port slot no instance uses
 * (from ADDED_SLOT_TOP down), and the planned instance; a SpecError when no slot is left.
 */
export function withAddedInstance(spec: ClusterSpec, database: string, shard: string, cell: string): { spec: ClusterSpec; instance: PlannedInstance } {
  const db = spec.databases.find((d) => d.name === database);
  if (!db) throw new SpecError(`the spec has no database ${database}`);
  if (!shardsOfSpec(db).some((r) => r.shard === shard)) throw new SpecError(`database ${database} has no shard ${shard}`);
  if (!spec.cells.includes(cell)) throw new SpecError(`no cell ${cell} (cells: ${spec.cells.join(', ')})`);
  const next = structuredClone(spec);
  const slot = addInstance(next, database, shard, cell);
  checkPortClashes(next);
  return { spec: next, instance: instancesOf(next).find((i) => i.instanceId === instanceIdOf(database, shard, cell, slot))! };
}

/**
 * The spec with a second shard set of `shards` shards beside `database`'s (decision 0056), each shard with the
 * database's instancesPerShard in the cells in turn, every instance in a run-time port slot as an added
 * replica is (no other instance's port moves); and the new set's planned instances.
 */
export function withAddedShardSet(spec: ClusterSpec, database: string, shards: number): { spec: ClusterSpec; instances: PlannedInstance[] } {
  const db = spec.databases.find((d) => d.name === database);
  if (!db) throw new SpecError(`the spec has no database ${database}`);
  const next = structuredClone(spec);
  const nextDb = next.databases.find((d) => d.name === database)!;
  nextDb.shardSets.push(shards);
  const parsed = clusterSpecSchema.safeParse(next); // the same checks as a spec file's (power of two, a count of its own, sharded)
  if (!parsed.success) throw new SpecError(`a set of ${shards} shards beside ${database}'s: ${parsed.error.issues.map((i) => i.message).join('; ')}`);
  const ids: string[] = [];
  for (const { shard } of shardRanges(shards)) {
    for (let i = 0; i < db.instancesPerShard; i++) {
      const cell = next.cells[i % next.cells.length];
      ids.push(instanceIdOf(database, shard, cell, addInstance(next, database, shard, cell)));
    }
  }
  checkPortClashes(next);
  const planned = instancesOf(next);
  return { spec: next, instances: ids.map((id) => planned.find((i) => i.instanceId === id)!) };
}

/** Records an instance of `database`/`shard` in `cell` in the highest free run-time slot of `spec` (in place); returns the slot. */
function addInstance(spec: ClusterSpec, database: string, shard: string, cell: string): number {
  const used = new Set(spec.databases.flatMap((d) => d.addedInstances.map((a) => a.slot)));
  let slot = ADDED_SLOT_TOP;
  while (used.has(slot)) slot--;
  if (slot < layoutSlots(spec)) throw new SpecError(`no port slot left for another instance (slots 0-${ADDED_SLOT_TOP} are taken)`);
  spec.databases.find((d) => d.name === database)!.addedInstances.push({ shard, cell, slot });
  return slot;
}

/**
 * `next` (from a spec file and flags, which do not record what changed at run time) with the saved spec's run-time
 * changes carried over, for each database both have with the same shards: its added and removed instances and
 * its added shard sets (when `next` names none), and an instancesPerShard lowered since then kept as the saved layout with the instances
 * beyond the new count removed, so that no other instance's port moves.
 */
export function withRuntimeChanges(saved: ClusterSpec | undefined, next: ClusterSpec): ClusterSpec {
  if (!saved) return next;
  const out = structuredClone(next);
  // Dropped at run time and not named again: its slots stay reserved.
  if (out.droppedDatabases.length === 0) out.droppedDatabases = saved.droppedDatabases.filter((d) => !out.databases.some((db) => db.name === d.name));
  for (const db of out.databases) {
    const was = saved.databases.find((d) => d.name === db.name && d.shards === db.shards);
    if (!was) continue;
    if (db.addedInstances.length === 0) db.addedInstances = structuredClone(was.addedInstances);
    if (db.removedInstances.length === 0) db.removedInstances = [...was.removedInstances];
    if (db.shardSets.length === 0) db.shardSets = [...was.shardSets];
    db.shardsRetired ||= was.shardsRetired;
    db.stanzas = { ...was.stanzas, ...db.stanzas };
    if (db.instancesPerShard >= was.instancesPerShard) continue;
    for (const range of shardRanges(db.shards)) {
      for (let i = db.instancesPerShard; i < was.instancesPerShard; i++) {
        const id = instanceIdOf(db.name, range.shard, out.cells[i % out.cells.length], i);
        if (!db.removedInstances.includes(id)) db.removedInstances.push(id);
      }
    }
    db.instancesPerShard = was.instancesPerShard;
  }
  checkPortClashes(out);
  return out;
}

/** The spec without the instance: an added one leaves addedInstances, one of the layout joins removedInstances. */
export function withoutInstance(spec: ClusterSpec, instanceId: string): ClusterSpec {
  const planned = instancesOf(spec).find((i) => i.instanceId === instanceId);
  if (!planned) return spec;
  const next = structuredClone(spec);
  const db = next.databases.find((d) => d.name === planned.database)!;
  const added = db.addedInstances.findIndex((a) => instanceIdOf(db.name, a.shard, a.cell, a.slot) === instanceId);
  if (added >= 0) db.addedInstances.splice(added, 1);
  else db.removedInstances.push(instanceId);
  return next;
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
