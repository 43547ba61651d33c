/** The MultiOrch tier of a local cluster: one orchestrator per cell, and waiting for every shard to be bootstrapped. */
import type { Progress } from './progress.ts';
import { startService, type Paths } from './proxy.ts';
import type { ClusterSpec } from './spec.ts';
import { stopProcess, waitFor } from './supervise.ts';
import { nodeArgs, REPO_ROOT } from './launch.ts';

const orchName = (cell: string) => `orch-${cell}`;

export const orchestratorPorts = (spec: ClusterSpec) => spec.cells.map((_, i) => spec.orchestrator.basePort + i);

/** One cell's MultiOrch configuration, without a provisioner (a local cluster's and a pod's, compose/pod-config.ts). */
export function orchestratorConfig(spec: ClusterSpec, cell: string, port: number, paths: Pick<Paths, 'bootstrap' | 'registryUrl'>) {
  return {
    id: orchName(cell), cell, port, brokers: paths.bootstrap.split(','), registryUrl: paths.registryUrl,
    topicPrefix: spec.kafka.topicPrefix, detectMs: spec.orchestrator.detectMs, agentDownMs: spec.orchestrator.agentDownMs,
    twopcGraceMs: spec.orchestrator.twopcGraceMs, twopcRetentionMs: spec.orchestrator.twopcRetentionMs, servingLagBytes: spec.orchestrator.servingLagBytes,
    backupSchedules: spec.backup.enabled ? Object.fromEntries(spec.databases.map((d) => [d.name, d.backupSchedule])) : {},
    apiToken: spec.orchestrator.apiToken, apiHost: spec.orchestrator.apiHost,
  };
}

export async function startOrchestrators(spec: ClusterSpec, paths: Paths, progress: Progress): Promise<void> {
  for (const [i, cell] of spec.cells.entries()) {
    progress.note(await startService(orchName(cell), 'orchestrator/main.ts', {
      ...orchestratorConfig(spec, cell, spec.orchestrator.basePort + i, paths),
      // Replicas added or removed at run time are local processes: compose's provisioner starts and stops them.
      provisioner: { command: [process.execPath, ...nodeArgs('compose/provision.ts'), '--data-dir', spec.dataDir], cwd: REPO_ROOT },
    }, spec.orchestrator.basePort + i, paths, spec));
  }
  // Bootstrap is the orchestrators' job (electing each new shard's first primary, which writes the rule of its
  // term once the policy's quorum of replicas, cloned meanwhile, acknowledges it): wait for it.
  let status: Awaited<ReturnType<typeof orchestratorStatus>> | undefined;
  await waitFor(async () => {
    status = await orchestratorStatus(spec);
    return status.shards.length > 0 && status.shards.every((s) => s.bootstrapped);
  }, { timeoutMs: 180_000, intervalMs: 250, what: 'the orchestrators to bootstrap every shard' });
  for (const s of status!.shards) progress.note(`${s.database}/${s.shard}: primary ${s.primary}, term ${s.term}, policy ${s.policy}`);
}

export interface ShardStatus {
  database: string;
  shard: string;
  policy: string;
  term: string | null;
  ruleNumber: string | null;
  primary: string | null;
  bootstrapped: boolean;
  lease: { orchestrator: string } | null;
  instances: Array<{ instanceId: string; cell: string; port: number; serving: string; role: string; upstream: string | null; walReceiverStatus: string | null; lagBytes: string | null }>;
}

/** A request to the admin API of the first orchestrator that answers (with the spec's bearer token). */
export async function callOrchestrator(spec: ClusterSpec, method: 'GET' | 'POST' | 'PUT' | 'DELETE', path: string, body?: unknown): Promise<{ status: number; body: any }> {
  return callFirstAnswering(orchestratorPorts(spec).map((port) => `http://127.0.0.1:${port}`), spec.orchestrator.apiToken, method, path, body);
}

/** One admin API request to the first of the orchestrators' base URLs that answers (the local CLI's and the operator's); throws when none does. */
export async function callFirstAnswering(urls: string[], token: string | undefined, method: string, path: string, body?: unknown): Promise<{ status: number; body: any }> {
  let lastError: unknown;
  const headers: Record<string, string> = body === undefined ? {} : { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  for (const url of urls) {
    try {
      const res = await fetch(`${url}${path}`, {
        method, headers,
        body: body === undefined ? undefined : JSON.stringify(body), signal: AbortSignal.timeout(60_000),
      });
      const text = await res.text();
      return { status: res.status, body: text ? JSON.parse(text) : {} };
    } catch (err) {
      lastError = err;
    }
  }
  throw new Error(`no orchestrator answers (${urls.join(', ')}): ${(lastError as Error)?.message}`);
}

export async function orchestratorStatus(spec: ClusterSpec): Promise<{ orchestrator: string; shards: ShardStatus[] }> {
  const r = await callOrchestrator(spec, 'GET', '/v1/status');
  if (r.status !== 200) throw new Error(`orchestrator status: HTTP ${r.status}: ${r.body?.error}`);
  return r.body;
}

export async function stopOrchestrators(spec: ClusterSpec, runDir: string, progress: Progress): Promise<void> {
  await Promise.all(spec.cells.map(async (cell) => progress.note(`${orchName(cell)}: ${await stopProcess(runDir, orchName(cell))}`)));
}
