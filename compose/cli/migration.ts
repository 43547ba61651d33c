/** `mg migration submit|list|show|cutover|cancel|revert|complete`: online schema migrations (decision 0060), through the materializer's REST API. */
import { callMaterializer } from '../materializer.ts';
import type { ClusterSpec } from '../spec.ts';
import { fail, renderWorkflow } from './workflow.ts';

export interface MigrationArgs {
  /** submit: the database and the ALTER TABLE; the others: the migration's name. */
  target: string | undefined;
  ddl: string | undefined;
  revertSeconds: number | undefined;
  /** submit: wait for `mg migration cutover` once caught up. */
  postponeCutOver: boolean;
  wait: boolean;
}

/** What each command waits for (the migration as GET shows it), unless --no-wait. */
const SETTLED: Record<string, (m: any) => boolean> = {
  submit: (m) => m.phase === 'SWITCHED' || (m.postponeCutOver && m.phase === 'RUNNING'),
  cutover: (m) => m.phase === 'SWITCHED',
  revert: (m) => m.phase === 'REVERTED',
  complete: (m) => m.phase === 'COMPLETED',
  cancel: (m) => m.phase === 'CANCELLED',
};

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Prints the answer; returns the exit code (0 done, 1 refused or failed). */
export async function runMigrationCommand(spec: ClusterSpec, command: string, args: MigrationArgs): Promise<number> {
  if (command === 'list') {
    const r = await callMaterializer(spec, 'GET', '/v1/migrations');
    if (r.status !== 200) return fail(r);
    console.log(['NAME', 'DATABASE', 'TABLE', 'PHASE', 'ROWS COPIED', 'APPLIED', 'LAG', 'DDL'].map((h, i) => h.padEnd(WIDTHS[i] ?? 0)).join(' '));
    for (const m of r.body.migrations) {
      const p = m.progress;
      console.log([m.name, m.source, m.tables[0], m.phase, p.rowsCopied, p.eventsApplied, p.lagSeconds === null ? '-' : `${p.lagSeconds.toFixed(1)}s`, m.ddl]
        .map((v, i) => String(v).padEnd(WIDTHS[i] ?? 0)).join(' '));
    }
    return 0;
  }
  let r;
  if (command === 'submit') {
    r = await callMaterializer(spec, 'POST', '/v1/migrations', { database: args.target, ddl: args.ddl, postponeCutOver: args.postponeCutOver, ...(args.revertSeconds === undefined ? {} : { revertSeconds: args.revertSeconds }) });
    if (r.status !== 201) return fail(r);
    console.log(`migration ${r.body.name}: submitted (${r.body.tables[0]} of ${r.body.source}; revertible for ${r.body.revertSeconds} s after the cut-over${args.postponeCutOver ? '; cut over with mg migration cutover' : ''})`);
  } else {
    r = await callMaterializer(spec, command === 'show' ? 'GET' : 'POST', `/v1/migrations/${encodeURIComponent(args.target ?? '')}${command === 'show' ? '' : `/${command}`}`);
    if (r.status !== (command === 'show' ? 200 : 202)) return fail(r);
    if (command === 'show') {
      console.log(`${renderWorkflow(r.body)}\n  ddl: ${r.body.ddl}\n  cut over: ${r.body.switchedAt ?? '-'}; revert window ${r.body.revertSeconds} s`);
      return 0;
    }
  }
  const name = r.body.name;
  const settled = SETTLED[command];
  if (!settled || !args.wait) {
    if (command !== 'submit') console.log(`migration ${name}: ${command} requested`);
    return 0;
  }
  // Progress while it copies and follows; a failed step says why in the message.
  const before = r.body.message;
  let shown = '';
  for (;;) {
    await sleep(500);
    const m = (await callMaterializer(spec, 'GET', `/v1/migrations/${name}`)).body;
    if (settled(m)) {
      console.log(`migration ${name}: ${m.phase}${m.message ? ` (${m.message})` : ''}`);
      return 0;
    }
    if (m.phase === 'FAILED' || (m.message && m.message !== before && /failed/.test(m.message))) {
      console.error(`mg: migration ${name}: ${m.phase}: ${m.message}`);
      return 1;
    }
    const line = `migration ${name}: ${m.phase}, ${m.progress.rowsCopied} rows copied, ${m.progress.eventsApplied} changes applied`;
    if (line !== shown) console.log(line);
    shown = line;
  }
}

const WIDTHS = [18, 12, 20, 10, 12, 10, 8];
