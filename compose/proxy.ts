/** The proxy tier of a local cluster: one MultiPooler beside each instance, and the MultiGateway. */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import type { Progress } from './progress.ts';
import { instancesOf, type ClusterSpec } from './spec.ts';
import { isAlive, portAnswers, readPid, spawnDetached, stopProcess, waitFor } from './supervise.ts';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const poolerName = (id: string) => `pooler-${id}`;
const GATEWAY = 'gateway';

export interface Paths { runDir: string; logDir: string; bootstrap: string; registryUrl: string }

/** Starts (if not running) a service from this repository and waits until its port answers. */
export async function startService(name: string, entry: string, config: object, port: number, paths: Paths, spec: ClusterSpec): Promise<string> {
  const pid = readPid(paths.runDir, name);
  if (pid !== undefined && isAlive(pid)) return `${name}: already running (pid ${pid})`;
  const dir = path.join(spec.dataDir, 'config');
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${name}.json`);
  fs.writeFileSync(file, JSON.stringify(config, null, 2));
  const started = await spawnDetached({
    name, command: process.execPath, args: ['--import', 'tsx', entry, '--config', file],
    cwd: repoRoot, runDir: paths.runDir, logFile: path.join(paths.logDir, `${name}.log`),
  });
  await waitFor(async () => !isAlive(started) || portAnswers(port), { timeoutMs: 60_000, intervalMs: 100, what: `${name} on port ${port}` });
  if (!isAlive(started)) throw new Error(`${name} exited during startup; see ${path.join(paths.logDir, `${name}.log`)}`);
  return `${name}: pid ${started}, port ${port}`;
}

export async function startPoolers(spec: ClusterSpec, paths: Paths, progress: Progress): Promise<void> {
  for (const inst of instancesOf(spec)) {
    progress.note(await startService(poolerName(inst.instanceId), 'router/pooler/main.ts', {
      instanceId: inst.instanceId, listenPort: inst.poolerPort, postgres: { host: '127.0.0.1', port: inst.port },
      poolSize: spec.pooler.poolSize, metricsPort: inst.poolerMetricsPort,
    }, inst.poolerPort, paths, spec));
  }
}

export async function startGateway(spec: ClusterSpec, paths: Paths, progress: Progress): Promise<void> {
  progress.note(await startService(GATEWAY, 'router/gateway/main.ts', {
    port: spec.gateway.port, metricsPort: spec.gateway.metricsPort, brokers: paths.bootstrap.split(','), registryUrl: paths.registryUrl,
    topicPrefix: spec.kafka.topicPrefix, bufferWindowMs: spec.gateway.bufferWindowMs, tlsDir: path.join(spec.dataDir, 'tls'),
  }, spec.gateway.port, paths, spec));
}

/**
 * Clients authenticate with SCRAM at the gateway, so the login role needs a
 * password. On a new cluster the `postgres` role gets MG_PASSWORD (default
 * "postgres"); Postgres stores only its SCRAM verifier.
 */
export async function ensureLoginPassword(spec: ClusterSpec, progress: Progress): Promise<void> {
  for (const p of instancesOf(spec).filter((i) => i.initialPrimary)) {
    const client = new pg.Client({ host: '127.0.0.1', port: p.port, user: 'postgres', database: 'postgres' });
    await client.connect();
    try {
      const { rows } = await client.query(`SELECT rolpassword IS NOT NULL AS set FROM pg_authid WHERE rolname = 'postgres'`);
      if (rows[0]?.set) continue;
      const password = process.env.MG_PASSWORD ?? 'postgres';
      await client.query(`SET password_encryption = 'scram-sha-256'`);
      await client.query(`ALTER ROLE postgres PASSWORD ${client.escapeLiteral(password)}`);
      progress.note(`${p.database}/${p.shard}: role postgres has password ${process.env.MG_PASSWORD ? 'from MG_PASSWORD' : '"postgres"'} (stored as a SCRAM verifier)`);
    } finally {
      await client.end();
    }
  }
}

export async function stopProxyTier(spec: ClusterSpec, runDir: string, progress: Progress): Promise<void> {
  progress.note(`gateway: ${await stopProcess(runDir, GATEWAY)}`);
  await Promise.all(instancesOf(spec).map(async (inst) => progress.note(`${poolerName(inst.instanceId)}: ${await stopProcess(runDir, poolerName(inst.instanceId))}`)));
}
