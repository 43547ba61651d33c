/** Following a long operation from the CLI (the admin API's, a lookup backfill): its steps as they happen, then the outcome as the exit code. */
import { callOrchestrator } from '../orchestrators.ts';
import type { ClusterSpec } from '../spec.ts';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Prints an admin API operation's steps as they happen (what it did, what it waits for) until it is over. */
export function follow(spec: ClusterSpec, id: string): Promise<number> {
  return followRun(() => callOrchestrator(spec, 'GET', `/v1/operations/${id}`));
}

/** The same for anything a GET shows in an operation's shape (kind, target, state, steps, startedAt, finishedAt, error): a lookup backfill too. */
export async function followRun(get: () => Promise<{ status: number; body: any }>): Promise<number> {
  let printed = 0;
  for (;;) {
    const r = await get();
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
