/** Following an admin API operation from the CLI: its steps as they happen, then the outcome as the exit code. */
import { callOrchestrator } from '../orchestrators.ts';
import type { ClusterSpec } from '../spec.ts';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Prints an operation's steps as they happen (what it did, what it waits for) until it is over. */
export async function follow(spec: ClusterSpec, id: string): Promise<number> {
  let printed = 0;
  for (;;) {
    const r = await callOrchestrator(spec, 'GET', `/v1/operations/${id}`);
    if (r.status !== 200) return fail(r);
    const op = r.body;
    const origin = Date.parse(op.startedAt);
    for (const s of op.steps.slice(printed)) console.log(`  ${((Date.parse(s.at) - origin) / 1000).toFixed(1).padStart(5)} s  ${s.message}`);
    printed = op.steps.length;
    if (op.state === 'succeeded') {
      console.log(`${op.kind} ${op.target}: done in ${((Date.parse(op.finishedAt) - origin) / 1000).toFixed(1)} s`);
      return 0;
    }
    if (op.state === 'failed') {
      console.error(`mg: ${op.kind} ${op.target} failed: ${op.error}`);
      return 1;
    }
    await sleep(100);
  }
}

export function fail(r: { status: number; body: { error?: string } }): number {
  console.error(`mg: ${r.body.error ?? `HTTP ${r.status}`}`);
  return 1;
}
