/**
 * The local side of the provisioning seam for replicas (decision 0034): MultiOrch
 * runs `compose/provision.ts` to start a new instance's agent and pooler on this
 * machine, or to stop an instance's (or a whole database's) and delete its data.
 * The saved spec records each, so a later `mg cluster up` keeps the cluster as it is now.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from '../common/log.ts';
import type { AgentConfig } from '../ingest/config.ts';
import { agentName, eventLogFor, pathsOf, runDir, savedSpec, saveSpec, startAgents, stopAgent } from './cluster.ts';
import type { Progress } from './progress.ts';
import { poolerName, startPoolers } from './proxy.ts';
import { withAddedInstance, withoutDatabase, withoutInstance, withoutShardSet, type ClusterSpec, type PlannedInstance } from './spec.ts';
import { stopProcess } from './supervise.ts';

const INSTANCE_ID = /^[a-z][a-z0-9_-]{0,120}$/;
const LOCK_WAIT_MS = 60_000;
/** A lock older than this was left by a provisioner that died. */
const LOCK_STALE_MS = 300_000;

/** Adds a replica to the saved spec and starts its agent (which registers it, with no data yet) and its pooler. */
export async function provisionReplica(dataDir: string, database: string, shard: string, cell: string, progress: Progress, log: Logger): Promise<PlannedInstance> {
  return withSpecLock(dataDir, async (spec) => {
    const { spec: next, instance } = withAddedInstance(spec, database, shard, cell);
    saveSpec(next);
    progress.note(`${instance.instanceId}: in the saved spec (Postgres port ${instance.port}, pooler port ${instance.poolerPort})`);
    const eventLog = eventLogFor(next, 'mg-provision', log);
    try {
      await startAgents(next, [instance], eventLog, progress);
    } finally {
      await eventLog.close();
    }
    await startPoolers(next, pathsOf(next), progress, [instance]);
    return instance;
  });
}

/** Stops an instance's agent (and with it Postgres) and pooler, deletes its data directory and files, and drops it from the saved spec. */
export async function releaseInstance(dataDir: string, instanceId: string, progress: Progress): Promise<void> {
  if (!INSTANCE_ID.test(instanceId)) throw new Error(`not an instance id: ${JSON.stringify(instanceId)}`);
  await withSpecLock(dataDir, async (spec) => {
    await stopAndDelete(spec, instanceId, progress);
    saveSpec(withoutInstance(spec, instanceId));
  });
}

/**
 * Stops and deletes every instance of `database` (decision 0035) and drops it from the saved spec, its port
 * slots kept unused. Its backups stay in the repository until deleted (decision 0064).
 */
export async function releaseDatabase(dataDir: string, database: string, progress: Progress): Promise<void> {
  await withSpecLock(dataDir, async (spec) => {
    const next = withoutDatabase(spec, database);
    for (const id of startedInstances(spec, (cfg) => cfg.database === database)) await stopAndDelete(spec, id, progress);
    saveSpec(next);
    progress.note(`${database}: out of the saved spec (its port slots stay unused)`);
  });
}

/**
 * Retires a reshard's old shard set of `database` (decision 0061): the saved spec records it first (so a
 * `mg cluster up` meanwhile starts none of it again; no other instance's port moves), then every instance of
 * those shards is stopped and deleted. Run again after a failure part way, it stops what is still there.
 * Their backups stay in the repository until deleted (decision 0064).
 */
export async function releaseShardSet(dataDir: string, database: string, shards: string[], progress: Progress): Promise<void> {
  await withSpecLock(dataDir, async (spec) => {
    const { spec: next, retired } = withoutShardSet(spec, database, shards);
    if (retired) saveSpec(next);
    progress.note(`${database}: shards ${shards.join(', ')} ${retired ? 'retired in the saved spec' : 'were retired in the saved spec already'} (their port slots stay unused)`);
    // All at once: each waits for its agent to stop Postgres (a checkpoint), and they share nothing.
    await Promise.all(startedInstances(spec, (cfg) => cfg.database === database && shards.includes(cfg.shard)).map((id) => stopAndDelete(spec, id, progress)));
  });
}

/** The instances started from the cluster's data directory that `which` picks, by their agents' configs (the spec may no longer plan them). */
function startedInstances(spec: ClusterSpec, which: (cfg: AgentConfig) => boolean): string[] {
  const agents = path.join(spec.dataDir, 'agents');
  return fs.readdirSync(agents).filter((f) => f.endsWith('.json'))
    .map((f) => JSON.parse(fs.readFileSync(path.join(agents, f), 'utf8')) as AgentConfig)
    .filter(which).map((cfg) => cfg.instanceId);
}

/** Stops an instance's agent and pooler and deletes its data directory, config files and pid file. */
async function stopAndDelete(spec: ClusterSpec, instanceId: string, progress: Progress): Promise<void> {
  // Its agent's config says where it runs: also for an instance the spec no longer plans (a lowered instancesPerShard).
  const agentFile = path.join(spec.dataDir, 'agents', `${instanceId}.json`);
  if (!fs.existsSync(agentFile)) throw new Error(`no instance ${instanceId} was started from ${spec.dataDir}`);
  const cfg = JSON.parse(fs.readFileSync(agentFile, 'utf8')) as AgentConfig;
  progress.note(`${instanceId}: agent ${await stopAgent(spec, { instanceId, dataDir: cfg.dataDir, port: cfg.port })}`);
  progress.note(`${instanceId}: pooler ${await stopProcess(runDir(spec), poolerName(instanceId))}`);
  for (const file of [cfg.dataDir, `${cfg.dataDir}.pgbackrest.conf`, agentFile, path.join(spec.dataDir, 'config', `${poolerName(instanceId)}.json`)]) {
    fs.rmSync(file, { recursive: true, force: true });
  }
  fs.rmSync(path.join(runDir(spec), `${agentName(instanceId)}.pid`), { force: true });
  progress.note(`${instanceId}: data directory ${cfg.dataDir} removed`);
}

/** Runs `fn` on the saved spec while holding the cluster's spec lock (two provisioners never lose each other's change). */
async function withSpecLock<T>(dataDir: string, fn: (spec: ClusterSpec) => Promise<T>): Promise<T> {
  const spec = savedSpec(dataDir);
  if (!spec) throw new Error(`no cluster in ${dataDir}`);
  fs.mkdirSync(runDir(spec), { recursive: true });
  const lock = path.join(runDir(spec), 'spec.lock');
  for (const deadline = Date.now() + LOCK_WAIT_MS; ;) {
    try {
      fs.writeFileSync(lock, String(process.pid), { flag: 'wx' });
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const age = Date.now() - (fs.statSync(lock, { throwIfNoEntry: false })?.mtimeMs ?? Date.now());
      if (age > LOCK_STALE_MS) fs.rmSync(lock, { force: true });
      else if (Date.now() > deadline) throw new Error(`the spec of ${dataDir} stays locked by another provisioner (${lock})`);
      else await new Promise((r) => setTimeout(r, 100));
    }
  }
  try {
    return await fn(savedSpec(dataDir)!); // read again under the lock
  } finally {
    fs.rmSync(lock, { force: true });
  }
}
