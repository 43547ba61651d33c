/** `mg replica add|remove`: replicas at run time, through the admin API (the orchestrator runs the local provisioner). */
import { callOrchestrator } from '../orchestrators.ts';
import type { ClusterSpec } from '../spec.ts';
import { fail, follow } from './follow.ts';

/** Prints each step as it happens; returns the exit code (0 done, 1 refused or failed). */
export async function runReplicaCommand(spec: ClusterSpec, command: 'add' | 'remove', target: string, opts: { cell?: string; instance?: string }): Promise<number> {
  const [database, shard] = target.split('/');
  const base = `/v1/shards/${encodeURIComponent(database)}/${encodeURIComponent(shard)}/replicas`;
  const r = command === 'add'
    ? await callOrchestrator(spec, 'POST', base, opts.cell === undefined ? {} : { cell: opts.cell })
    : await callOrchestrator(spec, 'DELETE', `${base}/${encodeURIComponent(opts.instance!)}`);
  if (r.status !== 202) return fail(r);
  return follow(spec, r.body.operation.id);
}
