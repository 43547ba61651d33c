/**
 * Topology as a pure fold of topology events. Every consumer (gateway,
 * orchestrator, CLI) builds its view with this one function, so they agree.
 *
 * The topology topic is compacted by key, so after compaction only the latest
 * event per key survives, in offset order. The fold therefore keeps each key's
 * aspect in its own map (no aspect depends on having seen another first), and
 * views join them when asked.
 */
import { parseVSchema, type VSchema } from './vschema/vschema.ts';
import type {
  CellRegistered, InstanceRegistered, InstanceType, PrimaryChanged, RoutingRuleChanged, ServingShardsChanged, ServingState, ServingStateChanged, ShardDefined, TopologyEvent,
} from './generated/types.ts';

type Payload = TopologyEvent['payload'];
type Unwrap<U> = U extends Record<string, infer V> ? V : never;
export type TopologyPayload = Unwrap<Payload>;

const NS = 'io.multigres.topology.';

/** Builds the wrapped-union payload avsc expects from a kind and its body. */
export function payload<K extends PayloadKind>(kind: K, body: PayloadBody<K>): Payload {
  return { [NS + kind]: body } as unknown as Payload;
}

export type PayloadKind =
  | 'CellRegistered' | 'DatabaseCreated' | 'DatabaseDropped' | 'ShardDefined'
  | 'InstanceRegistered' | 'InstanceDeregistered' | 'ServingStateChanged' | 'PrimaryChanged' | 'DatabaseActivationChanged' | 'VSchemaApplied'
  | 'RoutingRuleChanged' | 'ServingShardsChanged' | 'ShardDropped';
export type PayloadBody<K extends PayloadKind> = Extract<Payload, Record<`${typeof NS}${K}`, unknown>>[`${typeof NS}${K}`];

/** The kind and body of an event's payload. */
export function kindOf(event: TopologyEvent): { kind: PayloadKind; body: TopologyPayload } {
  const [name, body] = Object.entries(event.payload)[0] as [string, TopologyPayload];
  return { kind: name.slice(NS.length) as PayloadKind, body };
}

/** The Kafka key of an event: one key per aspect of one entity (see the module comment). */
export function topologyKey(event: TopologyEvent): string {
  const { kind, body } = kindOf(event);
  const b = body as any;
  switch (kind) {
    case 'CellRegistered': return `cell/${b.cell}`;
    case 'DatabaseCreated': case 'DatabaseDropped': return `database/${b.database}`;
    case 'ShardDefined': case 'ShardDropped': return `shard/${b.database}/${b.shard}`;
    case 'InstanceRegistered': case 'InstanceDeregistered': return `instance/${b.instanceId}`;
    case 'ServingStateChanged': return `instance/${b.instanceId}/serving`;
    case 'PrimaryChanged': return `shard/${b.database}/${b.shard}/primary`;
    case 'DatabaseActivationChanged': return `database/${b.database}/activation`;
    case 'VSchemaApplied': return `vschema/${b.database}`;
    case 'RoutingRuleChanged': return `routing/${b.workflow}`;
    case 'ServingShardsChanged': return `database/${b.database}/serving-shards`;
  }
}

export interface PrimaryRecord { instanceId: string; term: bigint; ruleNumber: bigint; since: Date; reason: string }

/** A database: with instances of its own (hostedOn null), or a Postgres database inside another database's instances. */
export interface DatabaseRecord {
  durabilityPolicy: string | null;
  hostedOn: string | null;
  dropped: boolean;
  sharded: boolean;
  /** Default of mg.transaction_mode for the database's sessions (null: multi). */
  transactionMode: string | null;
  /** When this system of the database was created (its DatabaseCreated event); null once dropped. */
  createdAt: Date | null;
}

/** `appliedAt`: when the version was published (a lookup backfill waits for gateways to have folded it, decision 0059). */
export interface VSchemaRecord { version: bigint; vschema: VSchema; appliedAt: Date }

export interface TopologyState {
  cells: Map<string, CellRegistered>;
  databases: Map<string, DatabaseRecord>;
  shards: Map<string, ShardDefined>; // key: db/shard
  instances: Map<string, InstanceRegistered>;
  serving: Map<string, ServingState>;
  primaries: Map<string, PrimaryRecord>; // key: db/shard
  /** Databases asked to be inactive (scaled to zero), with why, since when and whether a declaration holds them stopped (no wake); absent = active. */
  inactive: Map<string, { reason: string; since: Date; held: boolean }>;
  vschemas: Map<string, VSchemaRecord>; // key: database
  routingRules: Map<string, RoutingRuleChanged>; // key: workflow
  /** The shards that serve a database while a reshard holds two shard sets (decision 0056); absent = every shard. */
  servingShards: Map<string, ServingShardsChanged>; // key: database
  /**
   * The last primary term of a shard whose Postgres system is gone (its database dropped, the shard retired): a
   * shard defined again under the name is a new system, and what orchestrators completed before is below this.
   */
  retiredTerms: Map<string, bigint>; // key: db/shard
  /** Events applied, including ignored stale ones. */
  applied: number;
}

export function emptyTopology(): TopologyState {
  return {
    cells: new Map(), databases: new Map(), shards: new Map(), instances: new Map(),
    serving: new Map(), primaries: new Map(), inactive: new Map(), vschemas: new Map(), routingRules: new Map(), servingShards: new Map(), retiredTerms: new Map(), applied: 0,
  };
}

export const shardKey = (database: string, shard: string) => `${database}/${shard}`;

/** Forgets the primary of shard `key` whose system is gone, keeping its term in retiredTerms. */
function retirePrimary(state: TopologyState, key: string): void {
  const term = state.primaries.get(key)?.term;
  if (term !== undefined) state.retiredTerms.set(key, term);
  state.primaries.delete(key);
}

/** The term of the primary of the instance's shard as folded so far (0 when unknown). */
function primaryTermOf(state: TopologyState, instanceId: string): bigint {
  const inst = state.instances.get(instanceId);
  return (inst && state.primaries.get(shardKey(inst.database, inst.shard))?.term) ?? 0n;
}

/**
 * Applies one event to the state in place and returns it. A PrimaryChanged
 * with an older term than the one held is ignored, and so is a
 * ServingStateChanged whose term is older than the shard's primary term:
 * terms, not log order, decide who is primary and who serves.
 */
export function applyTopologyEvent(state: TopologyState, event: TopologyEvent): TopologyState {
  const { kind, body } = kindOf(event);
  const b = { ...body } as any; // plain data: the state does not depend on the decoder's record classes
  state.applied++;
  switch (kind) {
    case 'CellRegistered': state.cells.set(b.cell, b); break;
    case 'DatabaseCreated':
      state.databases.set(b.database, {
        durabilityPolicy: b.durabilityPolicy, hostedOn: b.hostedOn ?? null, dropped: false, sharded: b.sharded ?? false, transactionMode: b.transactionMode ?? null,
        createdAt: event.ts,
      });
      state.inactive.delete(b.database); // a database made again under an old name starts active
      state.servingShards.delete(b.database); // and served by all its shards
      break;
    case 'DatabaseDropped':
      state.databases.set(b.database, { durabilityPolicy: null, hostedOn: null, dropped: true, sharded: false, transactionMode: null, createdAt: null });
      // Its primaries go with its instances (as a retired shard's), so a database created again under the name elects its first ones.
      for (const key of state.primaries.keys()) if (key.startsWith(`${b.database}/`)) retirePrimary(state, key);
      state.inactive.delete(b.database);
      state.servingShards.delete(b.database);
      break;
    case 'ShardDefined': state.shards.set(shardKey(b.database, b.shard), b); break;
    case 'ShardDropped':
      // Retired (decision 0061): its primary goes too, so a shard defined later under the name starts from no term.
      state.shards.delete(shardKey(b.database, b.shard));
      retirePrimary(state, shardKey(b.database, b.shard));
      break;
    case 'InstanceRegistered': state.instances.set(b.instanceId, b); break;
    case 'InstanceDeregistered': state.instances.delete(b.instanceId); state.serving.delete(b.instanceId); break;
    case 'ServingStateChanged': {
      // An orchestrator's change carries its term: one from a stale orchestrator (older than the
      // shard's primary term) is ignored. Agents' changes (and events written before the field) have none.
      const term = (b as ServingStateChanged).term ?? null;
      if (term !== null && term < primaryTermOf(state, b.instanceId)) break;
      // DRAINED is an orchestrator's (the instance is being removed): its agent stopping or starting does not undo it.
      if (term === null && state.serving.get(b.instanceId) === 'DRAINED') break;
      state.serving.set(b.instanceId, b.state);
      break;
    }
    case 'PrimaryChanged': {
      const p = b as PrimaryChanged;
      const key = shardKey(p.database, p.shard);
      const held = state.primaries.get(key);
      if (held && (p.term < held.term || (p.term === held.term && p.ruleNumber < held.ruleNumber))) break;
      state.primaries.set(key, { instanceId: p.primaryInstanceId, term: p.term, ruleNumber: p.ruleNumber, since: event.ts, reason: p.reason });
      break;
    }
    case 'DatabaseActivationChanged':
      if (b.active) state.inactive.delete(b.database);
      // An idle scale to zero of a held database (a gateway's view behind the hold) keeps the hold.
      else state.inactive.set(b.database, { reason: b.reason, since: event.ts, held: b.held || (state.inactive.get(b.database)?.held ?? false) });
      break;
    case 'VSchemaApplied': {
      const held = state.vschemas.get(b.database);
      if (held && b.version <= held.version) break; // versions, not log order, decide
      let vschema: VSchema;
      try {
        vschema = parseVSchema(JSON.parse(b.vschema));
      } catch {
        break; // publishers validate first; an invalid one never replaces a valid one
      }
      state.vschemas.set(b.database, { version: b.version, vschema, appliedAt: event.ts });
      break;
    }
    case 'RoutingRuleChanged': {
      const held = state.routingRules.get(b.workflow);
      if (held && b.version <= held.version) break;
      state.routingRules.set(b.workflow, b);
      break;
    }
    case 'ServingShardsChanged': {
      const held = state.servingShards.get(b.database);
      if (held && b.version <= held.version) break;
      state.servingShards.set(b.database, b);
      break;
    }
  }
  return state;
}

/**
 * The database whose shards and instances serve `database`: itself, or the one
 * it is hosted on. Undefined for a database that does not exist (or was dropped,
 * or whose host was).
 */
export function shardGroupOf(state: TopologyState, database: string): string | undefined {
  const db = state.databases.get(database);
  if (!db || db.dropped) return undefined;
  if (db.hostedOn === null) return database;
  const host = state.databases.get(db.hostedOn);
  return host && !host.dropped && host.hostedOn === null ? db.hostedOn : undefined;
}

/**
 * Every shard defined for the shard group `group` (a database with instances of its own): what
 * manages shards (elections, backups, CDC) works on all of them, both sets during a reshard.
 */
export function shardsOf(state: TopologyState, group: string): ShardDefined[] {
  return [...state.shards.values()].filter((s) => s.database === group);
}

/**
 * The shards of `group` that serve its clients: those its ServingShardsChanged names, or every
 * shard when it has none (decision 0056). What routes (gateways, the REST API, the materializer)
 * reads this, so one event moves every router from one shard set to the other at once.
 */
export function servingShardsOf(state: TopologyState, group: string): ShardDefined[] {
  const all = shardsOf(state, group);
  const serving = state.servingShards.get(group);
  return serving ? all.filter((s) => serving.shards.includes(s.shard)) : all;
}

/**
 * The routing rules that move tables out of `database` (decision 0039): table
 * (schema.table) -> its rule. Undefined when none does, so sessions of
 * databases without rules keep relaying bytes.
 */
export function movedTablesOf(state: TopologyState, database: string): Map<string, RoutingRuleChanged> | undefined {
  let out: Map<string, RoutingRuleChanged> | undefined;
  for (const rule of state.routingRules.values()) {
    if (rule.sourceDatabase !== database || rule.tables.length === 0) continue;
    out ??= new Map();
    for (const t of rule.tables) out.set(t, rule);
  }
  return out;
}

/**
 * The SQLSTATE a source table raises for writes once its workflow has
 * switched (or is switching) them away: the gateway holds the statement and
 * runs it on the target instead of reporting it (decision 0040).
 */
export const MOVED_WRITES_SQLSTATE = '55MG1';

/** state = fold(events). */
export function foldTopology(events: Iterable<TopologyEvent>): TopologyState {
  let state = emptyTopology();
  for (const e of events) state = applyTopologyEvent(state, e);
  return state;
}

export interface InstanceView extends InstanceRegistered {
  serving: ServingState;
  /** What the instance is now: the shard's primary per the latest term, else a replica (RDONLY stays RDONLY). */
  currentType: InstanceType;
}

/** Live instances (of databases not dropped), joined with serving state and current primary. */
export function instancesOf(state: TopologyState): InstanceView[] {
  const out: InstanceView[] = [];
  for (const inst of state.instances.values()) {
    if (state.databases.get(inst.database)?.dropped) continue;
    const primary = state.primaries.get(shardKey(inst.database, inst.shard));
    const currentType: InstanceType = primary?.instanceId === inst.instanceId ? 'PRIMARY' : inst.type === 'RDONLY' ? 'RDONLY' : 'REPLICA';
    out.push({ ...inst, serving: state.serving.get(inst.instanceId) ?? 'NOT_SERVING', currentType });
  }
  return out.sort((a, b) => a.database.localeCompare(b.database) || a.shard.localeCompare(b.shard) || a.instanceId.localeCompare(b.instanceId));
}
