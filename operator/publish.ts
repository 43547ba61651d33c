/**
 * The cluster's topology on its event log (decision 0078): the cells, databases and shards the custom
 * resources plan, published the way `mg cluster up` publishes them for the same spec (topologyToPublish,
 * compose/topology.ts: one function for both provisioners), so the orchestrators elect each new shard's first
 * primary on Kubernetes as they do locally. Level-triggered: only what the log does not hold yet is published,
 * and only once the log was read to its end; a database resource added later publishes its database and shards.
 * Nothing is published from a spec that does not validate (the reconcile stops before). A database resource's
 * `deactivated` is published as a held deactivation, and its clearing as an activation (decision 0084).
 */
import { topologyToPublish } from '../compose/topology.ts';
import type { ClusterSpec } from '../compose/spec.ts';
import { kindOf, payload, type TopologyEvent, type TopologyState } from '../schemas/index.ts';
import type { Condition } from './resources.ts';
import type { LogAddress } from './topology.ts';

/** The topology log as the operator reads and writes it (operator/topology.ts; a fake in unit tests). */
export interface TopologyLog {
  held(clusterKey: string, where: LogAddress): { caughtUp: boolean; state: TopologyState; failure?: string };
  publish(clusterKey: string, where: LogAddress, payloads: Array<TopologyEvent['payload']>): Promise<void>;
}

export interface TopologyOutcome {
  condition: Condition;
  /** Published this time (the payloads' kinds and names), for the log line. */
  published: string[];
  /** Not done (the log unread or unreachable, a publish failed): look again after this long. */
  retryMs?: number;
}

/** A failure in a row waits 1 s, then doubles up to 30 s; a success starts again from 1 s. */
const RETRY_BASE_MS = 1_000;
const RETRY_MAX_MS = 30_000;
const failuresInARow = new Map<string, number>();

function retryAfter(clusterKey: string): number {
  const n = (failuresInARow.get(clusterKey) ?? 0) + 1;
  failuresInARow.set(clusterKey, n);
  return Math.min(RETRY_MAX_MS, RETRY_BASE_MS * 2 ** (n - 1));
}

/** The cluster is gone: its backoff with it. */
export function forgetTopologyRetries(clusterKey: string): void {
  failuresInARow.delete(clusterKey);
}

const published = (message: string): Condition => ({ type: 'TopologyPublished', status: 'True', reason: 'Published', message });

/**
 * The activations the resources declare that the log lacks (decision 0084): `deactivated: true` is a deactivation
 * held (the pods are scaled to zero: no client can wake it, so the gateways refuse clients with 57P03); clearing
 * it activates a database the log holds stopped. An idle scale to zero (not held) is the gateways' and is left alone.
 */
export function activationsToPublish(spec: ClusterSpec, deactivated: ReadonlySet<string>, held: TopologyState): Array<TopologyEvent['payload']> {
  const out: Array<TopologyEvent['payload']> = [];
  for (const { name } of spec.databases) {
    const holding = held.inactive.get(name)?.held ?? false;
    if (deactivated.has(name) && !holding) {
      out.push(payload('DatabaseActivationChanged', { database: name, active: false, held: true, reason: `deactivated: true on MultigresDatabase ${name}` }));
    } else if (!deactivated.has(name) && holding) {
      out.push(payload('DatabaseActivationChanged', { database: name, active: true, held: false, reason: `deactivated: false on MultigresDatabase ${name}` }));
    }
  }
  return out;
}

/** One reconcile's step: publish what the log lacks of the spec's topology and declared activations, and say where that stands. */
export async function reconcileTopology(log: TopologyLog, clusterKey: string, where: LogAddress, spec: ClusterSpec, deactivated: ReadonlySet<string> = new Set()): Promise<TopologyOutcome> {
  const held = log.held(clusterKey, where);
  const at = `the topology log (${where.bootstrap}${where.topicPrefix ? `, prefix ${where.topicPrefix}` : ''})`;
  if (!held.caughtUp) {
    // Reading it to its end wakes the reconcile; a reader that failed is opened again by the next one.
    if (held.failure) return { condition: { type: 'TopologyPublished', status: 'False', reason: 'LogUnreachable', message: `cannot read ${at}: ${held.failure}; retrying` }, published: [], retryMs: retryAfter(clusterKey) };
    return { condition: { type: 'TopologyPublished', status: 'Unknown', reason: 'ReadingLog', message: `reading ${at} to its end before publishing` }, published: [], retryMs: RETRY_MAX_MS };
  }
  // The fold has read back what publish() wrote by the time it returns, so this counts it too.
  const summary = () => `${spec.cells.length} cells, ${spec.databases.length} databases, ${spec.databases.reduce((n, d) => n + shardsOf(held.state, d.name), 0)} shards on ${at}`;
  // A database created now starts active in the fold: its held deactivation follows its DatabaseCreated.
  const missing = [...topologyToPublish(spec, held.state), ...activationsToPublish(spec, deactivated, held.state)];
  if (!missing.length) {
    failuresInARow.delete(clusterKey);
    return { condition: published(summary()), published: [] };
  }
  const names = missing.map(describe);
  try {
    await log.publish(clusterKey, where, missing);
  } catch (err) {
    return {
      condition: { type: 'TopologyPublished', status: 'False', reason: 'PublishFailed', message: `publishing ${names.join(', ')} to ${at}: ${(err as Error).message}; retrying` },
      published: [], retryMs: retryAfter(clusterKey),
    };
  }
  failuresInARow.delete(clusterKey);
  return { condition: published(summary()), published: names };
}

const shardsOf = (state: TopologyState, database: string) => [...state.shards.keys()].filter((k) => k.startsWith(`${database}/`)).length;

/** `ShardDefined orders/-80`, `CellRegistered zone1`: what the log line and a failure's message name. */
function describe(p: TopologyEvent['payload']): string {
  const { kind, body } = kindOf({ payload: p } as TopologyEvent);
  const b = body as { cell?: string; database?: string; shard?: string };
  const activation = kind === 'DatabaseActivationChanged' ? ((body as { active: boolean }).active ? ' active' : ' held') : '';
  return `${kind} ${b.cell ?? ''}${b.database ?? ''}${b.shard ? `/${b.shard}` : ''}${activation}`;
}

/** Holds a deleted MultigresDatabase until its database is dropped on the topology log and its instances deregistered. */
export const DATABASE_FINALIZER = 'multigres.io/deregister';

export interface Retirement {
  /** Its objects are kept from pruning (its pods keep running) until DatabaseDropped is on the log. */
  hold: boolean;
  /** The finalizer was removed: the resource goes. */
  done: boolean;
  message: string;
  retryMs?: number;
}

/**
 * One step of a deleted database resource's way out, in `mg database drop`'s order (decision 0035, done by the
 * orchestrator there; its provisioner is the operator here): DatabaseDropped first (the gateways drain its
 * sessions and answer 3D000, the orchestrators stop electing and repairing its shards), then its objects go
 * (pruned: StatefulSets, headless Services, PDBs), then, once none of its pods is left, InstanceDeregistered for
 * each of its instances on the log, and only then is the finalizer removed. Each step is decided from what is
 * (the log read to its end, the pods), so a restarted operator carries on. Backups, PVCs and the data stay.
 */
export async function retireDatabase(
  log: TopologyLog & { deregister(clusterKey: string, where: LogAddress, instanceIds: string[], reason: string): Promise<void> },
  clusterKey: string, where: LogAddress, database: string, podsLeft: () => Promise<number>, removeFinalizer: () => Promise<void>,
): Promise<Retirement> {
  const held = log.held(clusterKey, where);
  if (!held.caughtUp) return { hold: true, done: false, message: `${database}: deleting; reading the topology log before dropping it`, retryMs: held.failure ? retryAfter(clusterKey) : RETRY_MAX_MS };
  const onLog = held.state.databases.get(database);
  // As `mg database drop` refuses (409): databases created on this one (CREATE DATABASE through a gateway) go first.
  const hosted = [...held.state.databases].filter(([, d]) => !d.dropped && d.hostedOn === database).map(([n]) => n);
  if (onLog && !onLog.dropped && hosted.length) {
    return { hold: true, done: false, message: `${database}: deleting waits: databases ${hosted.join(', ')} are hosted on it (drop them first, DROP DATABASE through a gateway)`, retryMs: RETRY_MAX_MS };
  }
  if (onLog && !onLog.dropped) {
    try {
      await log.publish(clusterKey, where, [payload('DatabaseDropped', { database })]);
    } catch (err) {
      return { hold: true, done: false, message: `${database}: deleting; publishing DatabaseDropped failed: ${(err as Error).message}; retrying`, retryMs: retryAfter(clusterKey) };
    }
  }
  const pods = await podsLeft();
  if (pods > 0) return { hold: false, done: false, message: `${database}: dropped on the topology log; waiting for its ${pods} pods to stop`, retryMs: 1_000 };
  const instances = [...held.state.instances.values()].filter((i) => i.database === database).map((i) => i.instanceId);
  if (instances.length) {
    try {
      await log.deregister(clusterKey, where, instances, `MultigresDatabase ${clusterKey.split('/')[0]}/${database} deleted`);
    } catch (err) {
      return { hold: false, done: false, message: `${database}: deleting; deregistering its instances failed: ${(err as Error).message}; retrying`, retryMs: retryAfter(clusterKey) };
    }
  }
  await removeFinalizer();
  return { hold: false, done: true, message: `${database}: dropped, ${instances.length} instances deregistered` };
}
