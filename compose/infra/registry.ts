/** Starts our schema-registry process (compose/registry) detached, idempotently. */
import path from 'node:path';
import { nodeArgs, REPO_ROOT } from '../launch.ts';
import { isAlive, readPid, spawnDetached, stopProcess, waitFor, type StopResult } from '../supervise.ts';

const NAME = 'schema-registry';

export interface StartRegistryOptions {
  runDir: string;
  logDir: string;
  bootstrap: string;
  port: number;
  topicPrefix: string;
}

export async function startRegistry(opts: StartRegistryOptions): Promise<{ url: string; alreadyRunning: boolean }> {
  const url = `http://127.0.0.1:${opts.port}`;
  const pid = readPid(opts.runDir, NAME);
  const alreadyRunning = pid !== undefined && isAlive(pid);
  if (!alreadyRunning) {
    await spawnDetached({
      name: NAME,
      command: process.execPath,
      args: [
        ...nodeArgs('compose/registry/main.ts'),
        '--brokers', opts.bootstrap, '--port', String(opts.port), '--topic-prefix', opts.topicPrefix,
      ],
      cwd: REPO_ROOT,
      runDir: opts.runDir,
      logFile: path.join(opts.logDir, `${NAME}.log`),
    });
  }
  await waitFor(async () => (await fetch(`${url}/subjects`).catch(() => null))?.ok === true, {
    timeoutMs: 60_000, intervalMs: 200, what: `schema registry on ${url}`,
  });
  return { url, alreadyRunning };
}

export function stopRegistry(runDir: string): Promise<StopResult> {
  return stopProcess(runDir, NAME);
}
