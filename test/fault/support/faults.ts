/** Fault injectors and "back to full strength" for the fault suite, on a real local cluster. */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { orchestratorStatus, type ShardStatus } from '../../../compose/orchestrators.ts';
import { isAlive, portAnswers, readPid, spawnDetached } from '../../../compose/supervise.ts';
import type { TestCluster } from '../../support/cluster.ts';
import { until } from '../../support/wait.ts';
import { nodeArgs } from '../../../compose/launch.ts';

export const postmasterPid = (c: TestCluster, id: string) =>
  Number(fs.readFileSync(path.join(c.dataDir, 'postgres', id, 'postmaster.pid'), 'utf8').split('\n')[0]);

/** The postmaster and every process it forked. */
export function postgresPids(c: TestCluster, id: string): number[] {
  const pm = postmasterPid(c, id);
  const children = execFileSync('ps', ['-o', 'pid=', '--ppid', String(pm)], { encoding: 'utf8' }).split('\n').map((s) => Number(s.trim())).filter(Boolean);
  return [pm, ...children];
}

export const servicePid = (c: TestCluster, name: string) => {
  const pid = readPid(path.join(c.dataDir, 'run'), name);
  if (pid === undefined) throw new Error(`${name} has no pid file`);
  return pid;
};

/** A shard of a cluster: its database and shard label. */
export interface ShardRef { database: string; shard: string }

/** A shard's status as MultiOrch has it now: the named shard's, or the cluster's first. */
export async function shardStatus(c: TestCluster, which?: ShardRef): Promise<ShardStatus> {
  const { shards } = await orchestratorStatus(c.spec);
  if (!which) return shards[0];
  const s = shards.find((x) => x.database === which.database && x.shard === which.shard);
  if (!s) throw new Error(`no shard ${which.database}/${which.shard} in the orchestrator's status`);
  return s;
}

/**
 * Full strength: the term's primary is healthy, every other instance streams
 * from it and serves, and the rule and policy of the term are in place.
 */
export async function fullStrength(c: TestCluster, timeoutMs = 90_000, stableMs = 1_500, which?: ShardRef): Promise<ShardStatus> {
  let last: ShardStatus | undefined;
  let since: number | undefined;
  try {
    return await until('full strength', timeoutMs, async () => {
      const s = (last = await shardStatus(c, which).catch(() => undefined));
      const primary = s?.instances.find((i) => i.instanceId === s.primary);
      const ok = !!s?.bootstrapped && !!primary && s.instances.every((i) => i.serving === 'SERVING' && (i.instanceId === s.primary
        ? i.role === 'PRIMARY'
        : i.role === 'REPLICA' && i.walReceiverStatus === 'streaming' && i.upstream === `127.0.0.1:${primary.port}`));
      // A diverged standby can look streaming for a moment before its WAL is refused: it must hold.
      since = ok ? since ?? Date.now() : undefined;
      return ok && Date.now() - since! >= stableMs ? s : undefined;
    });
  } catch (err) {
    throw new Error(`${(err as Error).message}; last status: ${JSON.stringify(last)}`);
  }
}

/** Waits for a term above `term`; returns the new status. */
export async function newTerm(c: TestCluster, term: bigint, timeoutMs = 60_000, which?: ShardRef): Promise<ShardStatus> {
  return until(`a term above ${term}`, timeoutMs, async () => {
    const s = await shardStatus(c, which).catch(() => undefined);
    return s && s.term !== null && BigInt(s.term) > term ? s : undefined;
  });
}

/** Undo actions of faults still in force (a continue, a heal), run by the suite's teardown if a test failed midway. */
export const pendingRepairs = new Set<() => void>();

/** Freezes processes for `ms`, then continues them (also at teardown, if that comes first). */
export function freeze(pids: number[], ms: number): void {
  signalAll(pids, 'SIGSTOP');
  const thaw = () => {
    pendingRepairs.delete(thaw);
    signalAll(pids, 'SIGCONT');
  };
  pendingRepairs.add(thaw);
  setTimeout(thaw, ms);
}

export function signalAll(pids: number[], sig: NodeJS.Signals): void {
  for (const pid of pids) {
    try {
      process.kill(pid, sig);
    } catch {
      // gone already
    }
  }
}

/**
 * A network partition of one Postgres on loopback (iptables): every packet to
 * or from its port is dropped, so its replicas, its pooler, the orchestrators
 * and its own agent all lose it while it keeps running. Returns the healing.
 */
export function partitionPort(port: number): () => void {
  const rules = [['--dport', String(port)], ['--sport', String(port)]].map((m) =>
    ['INPUT', '-i', 'lo', '-p', 'tcp', ...m, '-m', 'comment', '--comment', `mg-fault-${port}`, '-j', 'DROP']);
  for (const r of rules) execFileSync('iptables', ['-w', '-I', ...r]);
  const heal = () => {
    if (!pendingRepairs.delete(heal)) return;
    for (const r of rules) execFileSync('iptables', ['-w', '-D', ...r]);
  };
  pendingRepairs.add(heal);
  return heal;
}

/**
 * Starts a killed agent, orchestrator or the gateway again from the config file
 * `mg cluster up` wrote for it, the way `up` does (it is what `up` would start;
 * `up` itself also walks every other step, 15-20 s here, too slow for 20 runs
 * of a fault). `env` adds variables (e.g. a test hook) to the process's.
 */
export async function restartService(c: TestCluster, name: string, env: Record<string, string> = {}): Promise<void> {
  const [entry, config] = name.startsWith('agent-')
    ? ['ingest/main.ts', path.join(c.dataDir, 'agents', `${name.slice('agent-'.length)}.json`)]
    : name === 'gateway' ? ['router/gateway/main.ts', path.join(c.dataDir, 'config', 'gateway.json')]
      : ['orchestrator/main.ts', path.join(c.dataDir, 'config', `${name}.json`)];
  const old = readPid(path.join(c.dataDir, 'run'), name);
  await until(`${name} gone`, 10_000, () => old === undefined || !isAlive(old));
  await spawnDetached({
    name, command: process.execPath, args: [...nodeArgs(entry), '--config', config], env: { ...process.env, ...env },
    cwd: path.resolve(path.dirname(new URL(import.meta.url).pathname), '..', '..', '..'),
    runDir: path.join(c.dataDir, 'run'), logFile: path.join(c.dataDir, 'logs', `${name}.log`),
  });
  // Up once it listens: an agent on its metrics port, an orchestrator or the gateway on its own port.
  const cfg = JSON.parse(fs.readFileSync(config, 'utf8')) as { metricsPort?: number; port: number };
  const port = name.startsWith('agent-') ? cfg.metricsPort! : cfg.port;
  await until(`${name} listening on ${port}`, 60_000, () => portAnswers(port));
}
