// Detached process supervision: services started by `mg` outlive the CLI, so the
// only link back to them is a pid file in the run directory.
import { spawn } from 'node:child_process';
import net from 'node:net';
import { closeSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export interface SpawnDetachedOptions {
  name: string;
  command: string;
  args: string[];
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  runDir: string;
  logFile: string;
  uid?: number;
  gid?: number;
}

export type StopResult = 'stopped' | 'not-running' | 'killed';

export function pidFilePath(runDir: string, name: string): string {
  return join(runDir, `${name}.pid`);
}

/** Fields of /proc/<pid>/stat after the command name (which may itself contain spaces and parens). */
function procStat(pid: number): string[] | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  } catch {
    return undefined;
  }
}

/** Kernel start time of the process (clock ticks since boot): with the pid it identifies one process for good. */
function startTime(pid: number): string | undefined {
  return procStat(pid)?.[19];
}

export async function spawnDetached(opts: SpawnDetachedOptions): Promise<number> {
  const running = readPid(opts.runDir, opts.name);
  if (running !== undefined && isAlive(running)) {
    // Overwriting the pid file would orphan a live service.
    throw new Error(`${opts.name} is already running as pid ${running}`);
  }
  mkdirSync(opts.runDir, { recursive: true });
  mkdirSync(dirname(opts.logFile), { recursive: true });
  const out = openSync(opts.logFile, 'a');
  try {
    const child = spawn(opts.command, opts.args, {
      detached: true, // own session and process group: no SIGHUP/SIGINT from the CLI's terminal
      stdio: ['ignore', out, out],
      env: opts.env ?? process.env,
      cwd: opts.cwd,
      uid: opts.uid,
      gid: opts.gid,
    });
    const pid = await new Promise<number>((resolve, reject) => {
      child.once('error', reject);
      child.once('spawn', () => resolve(child.pid!));
    });
    child.unref();
    // Record the start time too, so a recycled pid is never mistaken for (or signalled as) this service.
    const file = pidFilePath(opts.runDir, opts.name);
    writeFileSync(`${file}.tmp`, `${pid} ${startTime(pid) ?? ''}\n`);
    renameSync(`${file}.tmp`, file); // readers never see a half-written file
    return pid;
  } finally {
    closeSync(out); // the child holds its own copy of the descriptor
  }
}

/** The recorded pid, or undefined if there is no pid file or the pid now belongs to another process. */
export function readPid(runDir: string, name: string): number | undefined {
  let text: string;
  try {
    text = readFileSync(pidFilePath(runDir, name), 'utf8');
  } catch {
    return undefined;
  }
  const [pidText, recorded] = text.trim().split(' ');
  const pid = Number(pidText);
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  const current = startTime(pid);
  if (recorded && current && recorded !== current) return undefined;
  return pid;
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    // EPERM: it exists but belongs to another user.
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  // A zombie still answers kill(0) until its parent (often init, for detached services) reaps it.
  return procStat(pid)?.[0] !== 'Z';
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(-pid, sig); // the whole group, so helpers the service forked go too
  } catch {
    try {
      process.kill(pid, sig);
    } catch {
      // already gone
    }
  }
}

async function waitDead(pid: number, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (isAlive(pid)) {
    if (Date.now() >= deadline) return false;
    await sleep(50);
  }
  return true;
}

export async function stopProcess(runDir: string, name: string, opts: { graceMs?: number } = {}): Promise<StopResult> {
  const pid = readPid(runDir, name);
  let result: StopResult = 'not-running';
  if (pid !== undefined && isAlive(pid)) {
    signal(pid, 'SIGTERM');
    result = 'stopped';
    if (!(await waitDead(pid, opts.graceMs ?? 10_000))) {
      signal(pid, 'SIGKILL');
      result = 'killed';
      if (!(await waitDead(pid, 5_000))) throw new Error(`${name} (pid ${pid}) survived SIGKILL`);
    }
  }
  rmSync(pidFilePath(runDir, name), { force: true });
  return result;
}

/** Polls `check` until it returns true; a check that throws counts as "not yet". */
export async function waitFor(
  check: () => Promise<boolean>,
  opts: { timeoutMs: number; intervalMs?: number; what: string },
): Promise<void> {
  const deadline = Date.now() + opts.timeoutMs;
  let lastError: unknown;
  for (;;) {
    const left = deadline - Date.now();
    if (left <= 0) break;
    let timer: NodeJS.Timeout | undefined;
    try {
      // A hung check must not stretch the deadline.
      const attempt = check();
      attempt.catch(() => {}); // it may reject after losing the race below
      const expired = new Promise<false>((resolve) => (timer = setTimeout(resolve, left, false)));
      if (await Promise.race([attempt, expired])) return;
    } catch (err) {
      lastError = err;
    } finally {
      clearTimeout(timer);
    }
    await sleep(Math.min(opts.intervalMs ?? 200, Math.max(0, deadline - Date.now())));
  }
  const cause = lastError instanceof Error ? `: last error: ${lastError.message}` : '';
  throw new Error(`timed out after ${opts.timeoutMs} ms waiting for ${opts.what}${cause}`);
}

/** Whether something accepts TCP connections on 127.0.0.1:port. */
export function portAnswers(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port }, () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}
