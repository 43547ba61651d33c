/** The proxy tier of a local cluster: one MultiPooler beside each instance, and the MultiGateway. */
import fs from 'node:fs';
import path from 'node:path';
import pg from 'pg';
import { setLoginPassword } from '../common/postgres.ts';
import type { Progress } from './progress.ts';
import { nodeArgs, REPO_ROOT } from './launch.ts';
import { instancesOf, type ClusterSpec, type PlannedInstance } from './spec.ts';
import { isAlive, portAnswers, readPid, spawnDetached, stopProcess, waitFor } from './supervise.ts';

export const poolerName = (id: string) => `pooler-${id}`;
const GATEWAY = 'gateway';

export interface Paths { runDir: string; logDir: string; bootstrap: string; registryUrl: string }

/** Starts (if not running) a service from this repository and waits until its port answers. */
export async function startService(name: string, entry: string, config: object, port: number, paths: Paths, spec: ClusterSpec): Promise<string> {
  const pid = readPid(paths.runDir, name);
  if (pid !== undefined && isAlive(pid)) return `${name}: already running (pid ${pid})`;
  const dir = path.join(spec.dataDir, 'config');
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${name}.json`);
  fs.writeFileSync(file, JSON.stringify(config, null, 2), { mode: 0o600 }); // may hold the admin API token
  const started = await spawnDetached({
    name, command: process.execPath, args: [...nodeArgs(entry), '--config', file],
    cwd: REPO_ROOT, runDir: paths.runDir, logFile: path.join(paths.logDir, `${name}.log`),
  });
  await waitFor(async () => !isAlive(started) || portAnswers(port), { timeoutMs: 60_000, intervalMs: 100, what: `${name} on port ${port}` });
  if (!isAlive(started)) throw new Error(`${name} exited during startup; see ${path.join(paths.logDir, `${name}.log`)}`);
  return `${name}: pid ${started}, port ${port}`;
}

/** The MultiPooler's configuration for one instance (a local cluster's and a pod's, compose/pod-config.ts). */
export function poolerConfig(spec: ClusterSpec, inst: PlannedInstance) {
  return {
    instanceId: inst.instanceId, listenPort: inst.poolerPort, postgres: { host: '127.0.0.1', port: inst.port },
    poolSize: spec.pooler.poolSize, metricsPort: inst.poolerMetricsPort, workers: spec.pooler.workers,
  };
}

/** Starts the MultiPooler of each instance (default: every instance of the spec) that is not running, side by side. */
export async function startPoolers(spec: ClusterSpec, paths: Paths, progress: Progress, instances = instancesOf(spec)): Promise<void> {
  const started = await Promise.all(instances.map((inst) =>
    startService(poolerName(inst.instanceId), 'router/pooler/main.ts', poolerConfig(spec, inst), inst.poolerPort, paths, spec)));
  for (const note of started) progress.note(note);
}

/** The MultiGateway's configuration (a local cluster's and a pod's, compose/pod-config.ts). */
export function gatewayConfig(spec: ClusterSpec, paths: Pick<Paths, 'bootstrap' | 'registryUrl'>) {
  return {
    port: spec.gateway.port, metricsPort: spec.gateway.metricsPort, brokers: paths.bootstrap.split(','), registryUrl: paths.registryUrl,
    topicPrefix: spec.kafka.topicPrefix, tlsDir: path.join(spec.dataDir, 'tls'), bufferWindowMs: spec.gateway.bufferWindowMs,
    maxClients: spec.gateway.maxClients, readOnlyToReplicas: spec.gateway.readOnlyToReplicas, releaseIdleLinksAfterMs: spec.gateway.releaseIdleLinksAfterMs,
    deactivateIdleAfterMs: spec.gateway.deactivateIdleAfterMs,
    workers: spec.gateway.workers, httpPort: spec.gateway.httpPort,
    rest: { schemas: spec.gateway.restSchemas, anonRole: spec.gateway.restAnonRole, jwtSecret: spec.gateway.restJwtSecret, preRequest: spec.gateway.restPreRequest },
  };
}

export async function startGateway(spec: ClusterSpec, paths: Paths, progress: Progress): Promise<void> {
  progress.note(await startService(GATEWAY, 'router/gateway/main.ts', gatewayConfig(spec, paths), spec.gateway.port, paths, spec));
}

/**
 * Clients authenticate with SCRAM at the gateway, so the login role needs a
 * password. On a new cluster the `postgres` role gets MG_PASSWORD (default
 * "postgres"); Postgres stores only its SCRAM verifier. Any instance of the
 * shard can tell whether the password is set (it replicates), and only the
 * current primary (not in recovery, whichever MultiOrch elected) can set it.
 */
/** Sets the login role's password on each shard's primary; databases scaled to zero (`inactive`) had theirs set when they ran. */
export async function ensureLoginPassword(spec: ClusterSpec, progress: Progress, inactive: ReadonlySet<string> = new Set()): Promise<void> {
  const shards = new Map<string, ReturnType<typeof instancesOf>>();
  for (const i of instancesOf(spec).filter((x) => !inactive.has(x.database))) shards.set(`${i.database}/${i.shard}`, [...(shards.get(`${i.database}/${i.shard}`) ?? []), i]);
  for (const [shard, members] of shards) {
    await waitFor(async () => {
      for (const m of members) {
        const client = new pg.Client({ host: '127.0.0.1', port: m.port, user: 'postgres', database: 'postgres', connectionTimeoutMillis: 2_000 });
        client.on('error', () => {});
        try {
          await client.connect();
          const { rows: [r] } = await client.query(`SELECT rolpassword IS NOT NULL AS set, pg_is_in_recovery() AS rec FROM pg_authid WHERE rolname = 'postgres'`);
          if (r.set) return true;
          if (r.rec) continue;
          const password = process.env.MG_PASSWORD ?? 'postgres';
          await setLoginPassword(client, password);
          progress.note(`${shard}: role postgres has password ${process.env.MG_PASSWORD ? 'from MG_PASSWORD' : '"postgres"'} (stored as a SCRAM verifier)`);
          return true;
        } catch {
          // down or restarting: ask the next one
        } finally {
          await client.end().catch(() => {});
        }
      }
      return false;
    }, { timeoutMs: 60_000, intervalMs: 250, what: `an instance of ${shard} to set or show the login password` });
  }
}

export async function stopProxyTier(spec: ClusterSpec, runDir: string, progress: Progress): Promise<void> {
  progress.note(`gateway: ${await stopProcess(runDir, GATEWAY)}`);
  await Promise.all(instancesOf(spec).map(async (inst) => progress.note(`${poolerName(inst.instanceId)}: ${await stopProcess(runDir, poolerName(inst.instanceId))}`)));
}
