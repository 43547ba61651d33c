/** `mg database list|create|drop|activate|deactivate`: databases at run time, through the admin API. */
import type { Logger } from '../../common/log.ts';
import { clusterUp } from '../cluster.ts';
import { callOrchestrator } from '../orchestrators.ts';
import { fail, follow } from './follow.ts';
import { parseSpec, SpecError, withAddedShardSet, type ClusterSpec } from '../spec.ts';

export interface DatabaseArgs {
  name: string | undefined;
  on: string | undefined;
  yes: boolean;
  /** deactivate: held stopped, clients refused until an activation (decision 0084). */
  hold: boolean;
}

/** Prints the answer; returns the exit code (0 done, 1 refused or failed). */
export async function runDatabaseCommand(spec: ClusterSpec, command: string, args: DatabaseArgs): Promise<number> {
  if (command === 'list') {
    const r = await callOrchestrator(spec, 'GET', '/v1/databases');
    if (r.status !== 200) return fail(r);
    for (const d of r.body.databases) {
      const where = d.hostedOn ? `on ${d.hostedOn}` : d.shards.map((s: { shard: string; instances: string[] }) => `${s.shard}: ${s.instances.join(', ')}`).join('; ');
      console.log(`${d.name.padEnd(20)} ${(d.active ? 'active' : `${d.held ? 'inactive, held' : 'inactive'} (${d.inactiveReason})`).padEnd(40)} ${where}`);
    }
    return 0;
  }
  const name = encodeURIComponent(args.name!);
  let r: { status: number; body: any };
  if (command === 'create') r = await callOrchestrator(spec, 'POST', '/v1/databases', { name: args.name, on: args.on });
  else if (command === 'drop') r = await callOrchestrator(spec, 'DELETE', `/v1/databases/${name}`);
  else r = await callOrchestrator(spec, 'POST', `/v1/databases/${name}/${command}${args.hold ? '?hold=true' : ''}`);
  if (r.status !== 202) return fail(r);
  return follow(spec, r.body.operation.id);
}

/**
 * A database with instances of its own, at run time: the saved spec gains it
 * and `mg cluster up` starts what is missing (its agents and poolers on this
 * machine; nothing that runs is restarted). Its topology events are published,
 * MultiOrch elects each shard's first primary, and the gateways serve it.
 */
export async function createWithInstances(spec: ClusterSpec, name: string, shape: { shards: number; replicas: number; durability?: string }, log: Logger): Promise<number> {
  return addDatabase(spec, {
    name, shards: shape.shards, instancesPerShard: shape.replicas + 1, ...(shape.durability ? { durability: shape.durability } : {}),
  }, log);
}

/**
 * Adds `entry` (a database of the spec) to the saved spec and starts what it
 * needs; 1 when the name is taken, 2 when the spec refuses the entry.
 */
export async function addDatabase(spec: ClusterSpec, entry: { name: string } & Record<string, unknown>, log: Logger): Promise<number> {
  const known = await callOrchestrator(spec, 'GET', `/v1/databases/${encodeURIComponent(entry.name)}`);
  if (known.status === 200) {
    console.error(`mg: database "${entry.name}" already exists`);
    return 1;
  }
  const raw = JSON.parse(JSON.stringify(spec)) as Record<string, any>;
  raw.databases = [...spec.databases, entry];
  let next: ClusterSpec;
  try {
    next = parseSpec(raw, `database ${entry.name}`);
  } catch (err) {
    if (!(err instanceof SpecError)) throw err;
    console.error(`mg: ${err.message.replace(/databases\.\d+\.(instancesPerShard)/, 'replicas').replace(/databases\.\d+\./g, '')}`);
    return 2;
  }
  await clusterUp(next, log);
  return 0;
}

/**
 * A second shard set beside a sharded database's (decision 0056), the first step of a reshard: the saved spec
 * gains it (its instances in run-time port slots), the serving set is pinned to the shards serving now before the
 * new shards are defined, and `mg cluster up` starts their agents and poolers; MultiOrch elects each new shard's
 * primary. Clients keep being served by the old set until a reshard switches to the new one. 2 when the spec refuses it.
 */
export async function addShardSet(spec: ClusterSpec, name: string, shards: number, log: Logger): Promise<number> {
  let next: ClusterSpec;
  try {
    next = withAddedShardSet(spec, name, shards).spec;
  } catch (err) {
    if (!(err instanceof SpecError)) throw err;
    console.error(`mg: ${err.message}`);
    return 2;
  }
  await clusterUp(next, log);
  return 0;
}
