/**
 * How a local cluster starts the project's own processes (decision 0071): the
 * bundles of `compose/build.ts` when MG_DIST says they were just built (the
 * test command and `npm run cluster` build first), else the TypeScript sources
 * through tsx, so an edited source is never shadowed by an old bundle.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** Every program a cluster, the CLI or the operator runs. */
export const ENTRY_POINTS = [
  'ingest/main.ts', 'router/gateway/main.ts', 'router/pooler/main.ts', 'orchestrator/main.ts', 'materializer/main.ts',
  'operator/main.ts', 'compose/cli/mg.ts', 'compose/provision.ts', 'compose/registry/main.ts', 'compose/entrypoint.ts',
];

/** Node's arguments that run `entry` (a path from the repository root), before the program's own arguments. */
export function nodeArgs(entry: string): string[] {
  if (!ENTRY_POINTS.includes(entry)) throw new Error(`${entry} is not an entry point of compose/launch.ts`);
  const dist = process.env.MG_DIST;
  const bundle = dist && path.join(dist, entry.replace(/\.ts$/, '.mjs'));
  if (bundle && fs.existsSync(bundle)) return ['--enable-source-maps', bundle];
  return ['--import', 'tsx', path.join(REPO_ROOT, entry)];
}
