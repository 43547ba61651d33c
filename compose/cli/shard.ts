/** `mg shard status|switchover|history`: the orchestrators' REST API from the command line. */
import { callOrchestrator, orchestratorStatus } from '../orchestrators.ts';
import type { ClusterSpec } from '../spec.ts';
import { fail } from './follow.ts';

function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  return [header, ...rows].map((r) => r.map((c, i) => c.padEnd(widths[i])).join('  ').trimEnd()).join('\n');
}

/** Prints the answer; returns the exit code (0 done, 1 refused or failed). */
export async function runShardCommand(spec: ClusterSpec, command: 'status' | 'switchover' | 'history', target: string | undefined, to: string | undefined): Promise<number> {
  if (command === 'status') {
    const status = await orchestratorStatus(spec);
    for (const s of status.shards) {
      console.log(`${s.database}/${s.shard}  term ${s.term ?? '-'}  rule ${s.ruleNumber ?? '-'}  primary ${s.primary ?? '-'}  policy ${s.policy}` +
        `${s.lease ? `  lease: ${s.lease.orchestrator}` : ''}${s.bootstrapped ? '' : '  (not bootstrapped)'}`);
      console.log(table(['INSTANCE', 'CELL', 'ROLE', 'SERVING', 'UPSTREAM', 'WAL RECEIVER', 'LAG'], s.instances.map((i) => [
        i.instanceId, i.cell, i.role, i.serving, i.upstream ?? '-', i.walReceiverStatus ?? '-', i.lagBytes === null ? '-' : `${i.lagBytes}B`,
      ])));
    }
    return 0;
  }
  const [database, shard] = target!.split('/');
  const base = `/v1/shards/${encodeURIComponent(database)}/${encodeURIComponent(shard)}`;
  if (command === 'history') {
    const r = await callOrchestrator(spec, 'GET', `${base}/history?limit=500`);
    if (r.status !== 200) return fail(r);
    for (const e of r.body.events) {
      console.log(`${e.ts}  ${e.orchestrator.padEnd(12)} ${e.kind.padEnd(9)} ${e.operation.padEnd(10)} ${e.term ?? '-'}`.padEnd(80) +
        ` ${e.summary}${e.durationMs !== null ? ` (${e.durationMs} ms)` : ''}`);
    }
    return 0;
  }
  const r = await callOrchestrator(spec, 'POST', `${base}/switchover`, to ? { to } : {});
  if (r.status !== 200) return fail(r);
  console.log(`${database}/${shard}: ${r.body.previous} -> ${r.body.primary}, term ${r.body.term}, rule ${r.body.ruleNumber}, in ${r.body.durationMs} ms`);
  return 0;
}
