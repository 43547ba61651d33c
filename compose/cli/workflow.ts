/** `mg workflow create|list|show|start|stop|cancel|vdiff|switch-traffic|reverse-traffic|complete`: materializer workflows, through its REST API. */
import type { Logger } from '../../common/log.ts';
import { callMaterializer } from '../materializer.ts';
import { callOrchestrator } from '../orchestrators.ts';
import { shardSetsOf, type ClusterSpec } from '../spec.ts';
import { addShardSet } from './database.ts';
import { follow } from './follow.ts';

export interface WorkflowArgs {
  name: string | undefined;
  source: string | undefined;
  target: string | undefined;
  tables: string | undefined;
  wait: boolean;
  /** switch-traffic: reads only. */
  readsOnly: boolean;
  /** create --type materialize: the target table and its query. */
  materialize?: { table: string; query: string };
}

/** What the traffic commands wait for (the workflow as GET shows it), unless --no-wait. */
const SETTLED: Record<string, (w: any, readsOnly: boolean) => boolean> = {
  'switch-traffic': (w, readsOnly) => (readsOnly ? w.routing === 'READS_TARGET' : w.phase === 'SWITCHED'),
  'reverse-traffic': (w) => w.routing === 'SOURCE' && w.phase !== 'SWITCHED',
  complete: (w) => w.phase === 'COMPLETED',
};

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Prints the answer; returns the exit code (0 done, 1 refused or failed). */
export async function runWorkflowCommand(spec: ClusterSpec, command: string, args: WorkflowArgs): Promise<number> {
  const path = `/v1/workflows/${encodeURIComponent(args.name ?? '')}`;
  switch (command) {
    case 'list': {
      const r = await callMaterializer(spec, 'GET', '/v1/workflows');
      if (r.status !== 200) return fail(r);
      console.log(['NAME', 'TYPE', 'SOURCE', 'TARGET', 'PHASE', 'ROWS COPIED', 'ROWS/S', 'ETA', 'APPLIED', 'LAG'].map((h, i) => h.padEnd(WIDTHS[i])).join(' '));
      for (const w of r.body.workflows) console.log(row(w));
      return 0;
    }
    case 'show': {
      const r = await callMaterializer(spec, 'GET', path);
      if (r.status !== 200) return fail(r);
      console.log(renderWorkflow(r.body));
      return 0;
    }
    case 'create': {
      const r = await callMaterializer(spec, 'POST', '/v1/workflows', args.materialize
        ? { name: args.name, type: 'materialize', source: args.source, target: args.target, ...args.materialize }
        : { name: args.name, source: args.source, target: args.target, tables: (args.tables ?? '').split(',').map((t) => t.trim()).filter(Boolean) });
      if (r.status !== 201) return fail(r);
      console.log(args.materialize
        ? `workflow ${args.name}: created (Materialize ${args.target} ${r.body.tables[0]} from ${args.source}: ${r.body.query})`
        : `workflow ${args.name}: created (MoveTables ${args.source} -> ${args.target}: ${r.body.tables.join(', ')})`);
      return 0;
    }
    case 'vdiff': {
      const r = await callMaterializer(spec, 'POST', `${path}/vdiff`);
      if (r.status !== 202) return fail(r);
      if (!args.wait) {
        console.log(`vdiff ${r.body.id} requested; see mg workflow show ${args.name}`);
        return 0;
      }
      for (;;) {
        await sleep(500);
        const s = await callMaterializer(spec, 'GET', path);
        const v = s.body.vdiff;
        if (v?.id !== r.body.id || v.state === 'REQUESTED' || v.state === 'RUNNING') continue;
        console.log(renderVDiff(v));
        return v.state === 'COMPLETED' && clean(v) ? 0 : 1;
      }
    }
    case 'complete': {
      // A Reshard completed by an earlier run that failed while retiring its old set: only the retirement is left.
      const held = await callMaterializer(spec, 'GET', path);
      if (held.status !== 200) return fail(held);
      const done = held.body.type === 'RESHARD' && held.body.phase === 'COMPLETED';
      const code = done ? 0 : await commandAndWait(spec, path, command, args);
      return code !== 0 || held.body.type !== 'RESHARD' || !args.wait ? code : retireOldSet(spec, args.name!, held.body.source, held.body.sourceShards);
    }
    default:
      return commandAndWait(spec, path, command, args);
  }
}

/** POSTs a workflow command and, unless --no-wait, waits until the workflow shows it done (or its message says it failed). */
async function commandAndWait(spec: ClusterSpec, path: string, command: string, args: WorkflowArgs): Promise<number> {
  const r = await callMaterializer(spec, 'POST', `${path}/${command}`, command === 'switch-traffic' ? { readsOnly: args.readsOnly } : undefined);
  if (r.status !== 202) return fail(r);
  const settled = SETTLED[command];
  if (!settled || !args.wait) {
    console.log(`workflow ${args.name}: ${command} requested`);
    return 0;
  }
  // A failed switch or completion leaves the phase as it was and says why in the message.
  const before = r.body.message;
  for (;;) {
    await sleep(200);
    const w = (await callMaterializer(spec, 'GET', path)).body;
    if (settled(w, args.readsOnly)) {
      console.log(`workflow ${args.name}: ${command} done: phase ${w.phase}, routing ${w.routing ?? '-'}${w.message ? ` (${w.message})` : ''}`);
      return 0;
    }
    if (w.message && w.message !== before && /failed/.test(w.message)) {
      console.error(`mg: ${w.message}`);
      return 1;
    }
  }
}

/**
 * The last step of a Reshard's complete (decision 0061): the old shard set, serving nothing now, is retired through
 * the orchestrator (ShardDropped, its instances stopped and deleted, deregistered), its steps printed as they happen.
 * Run again, it finishes what a failed run left; once nothing is left the orchestrator knows none of the shards.
 */
async function retireOldSet(spec: ClusterSpec, workflow: string, database: string, shards: string[]): Promise<number> {
  console.log(`retiring the old shard set ${shards.join(', ')} of ${database}`);
  const r = await callOrchestrator(spec, 'POST', `/v1/databases/${encodeURIComponent(database)}/retire-shards`, { shards, reason: `retired by reshard ${workflow}` });
  if (r.status === 404 && (await callOrchestrator(spec, 'GET', `/v1/databases/${encodeURIComponent(database)}`)).status === 200) {
    console.log(`shards ${shards.join(', ')} of ${database}: retired already`);
    return 0;
  }
  if (r.status !== 202) return fail(r);
  return follow(spec, r.body.operation.id);
}

/**
 * `mg workflow create <name> --type reshard --database <db> --to-shards N` (decision 0056): brings up the new
 * shard set first when the database has none of N shards yet (mg database add-shard-set), then creates the workflow.
 */
export async function createReshard(spec: ClusterSpec, name: string, database: string, toShards: number, log: Logger): Promise<number> {
  const db = spec.databases.find((d) => d.name === database);
  if (db && !shardSetsOf(db).includes(toShards)) {
    const code = await addShardSet(spec, database, toShards, log);
    if (code !== 0) return code;
  }
  const r = await callMaterializer(spec, 'POST', '/v1/workflows', { name, type: 'reshard', database, toShards });
  if (r.status !== 201) return fail(r);
  console.log(`workflow ${name}: created (Reshard ${database}: ${r.body.sourceShards.join(', ')} -> ${r.body.targetShards.join(', ')}; tables ${r.body.tables.join(', ')})`);
  return 0;
}

const WIDTHS = [16, 12, 12, 12, 10, 12, 10, 8, 10, 8];

const secs = (s: number | null) => (s === null ? '-' : `${s.toFixed(1)}s`);

function row(w: any): string {
  const p = w.progress;
  return [w.name, w.type, w.source, w.target, w.phase, p.rowsCopied, Math.round(p.rowsPerSecond), secs(p.etaSeconds), p.eventsApplied, secs(p.lagSeconds)]
    .map((v, i) => String(v).padEnd(WIDTHS[i])).join(' ');
}

export function renderWorkflow(w: any): string {
  const p = w.progress;
  const lines = [
    w.sourceShards
      ? `workflow ${w.name} (${w.type}): ${w.source} shards ${w.sourceShards.join(', ')} -> ${w.targetShards.join(', ')}, tables ${w.tables.join(', ')}`
      : w.query
        ? `workflow ${w.name} (${w.type}): ${w.target} ${w.tables[0]} = ${w.query} (on ${w.source})`
        : `workflow ${w.name} (${w.type}): ${w.source} -> ${w.target}, tables ${w.tables.join(', ')}`,
    `  phase ${w.phase}${w.message ? ` (${w.message})` : ''}, command ${w.command}, routing ${w.routing ?? '-'}, updated ${w.updatedAt ?? '-'}`,
    `  copy: ${p.rowsCopied} rows, ${Math.round(p.rowsPerSecond)} rows/s, ETA ${secs(p.etaSeconds)}`,
    ...p.tables.map((t: any) => `    ${t.table}${t.shard ? ` from ${t.shard}` : ''}: ${t.rowsCopied}/${t.rowsEstimated} rows${t.done ? ', done' : ''}`),
    `  ${w.phase === 'SWITCHED' ? 'reverse replication (target to source)' : 'catch-up'}: ${p.eventsApplied} changes applied, lag ${secs(p.lagSeconds)}`,
  ];
  if (w.vdiff) lines.push(renderVDiff(w.vdiff));
  return lines.join('\n');
}

const clean = (v: any) => v.tables.every((t: any) => t.missing === '0' && t.extra === '0' && t.different === '0');

function renderVDiff(v: any): string {
  if (v.state !== 'COMPLETED') return `  vdiff ${v.id}: ${v.state}${v.error ? `: ${v.error}` : ''}`;
  const lines = [`  vdiff ${v.id}: ${clean(v) ? 'clean' : 'DIFFERENCES'} (${v.durationMs} ms)`];
  for (const t of v.tables) {
    lines.push(`    ${t.table}: source ${t.sourceRows} rows, target ${t.targetRows}; missing ${t.missing}, extra ${t.extra}, different ${t.different}`);
    for (const e of t.examples) lines.push(`      ${e}`);
  }
  return lines.join('\n');
}

export function fail(r: { status: number; body: any }): number {
  console.error(`mg: ${r.body?.error ?? `HTTP ${r.status}`}`);
  return 1;
}
