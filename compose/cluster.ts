/**
 * `mg cluster up|down`: brings a whole local cluster (Kafka, schema registry,
 * Postgres instances with their agents) up from a bare machine, idempotently,
 * and takes it down again.
 */
import { execFileSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { EventLog } from '../common/eventlog.ts';
import type { Logger } from '../common/log.ts';
import type { AgentConfig, BackupConfig } from '../ingest/config.ts';
import { PgBackRest } from '../ingest/backup/pgbackrest.ts';
import { PostgresInstance } from '../ingest/postgres/instance.ts';
import {
  applyTopologyEvent, codecFor, emptyTopology, instancesOf as topologyInstances, recoveryTargetOf, shardKey, stanzaOf, topologyKey,
  type HealthEvent, type TopicValues, type TopologyEvent, type TopologyState,
} from '../schemas/index.ts';
import { startKafka, stopKafka } from './infra/kafka.ts';
import { startRegistry, stopRegistry } from './infra/registry.ts';
import { ensureLoginPassword, startGateway, startPoolers, stopProxyTier, type Paths } from './proxy.ts';
import { nodeArgs, REPO_ROOT } from './launch.ts';
import { startMaterializer, stopMaterializer } from './materializer.ts';
import { callOrchestrator, startOrchestrators, stopOrchestrators } from './orchestrators.ts';
import { Progress } from './progress.ts';
import { topologyToPublish } from './topology.ts';
import { instancesOf, parseSpec, shardsOfSpec, stanzaOfSpec, withRuntimeChanges, type ClusterSpec, type PlannedInstance } from './spec.ts';
import { readClusterView, verdict } from './status.ts';
import { isAlive, readPid, spawnDetached, stopProcess, waitFor } from './supervise.ts';

export const agentName = (id: string) => `agent-${id}`;

export const runDir = (spec: ClusterSpec) => path.join(spec.dataDir, 'run');
export const logDir = (spec: ClusterSpec) => path.join(spec.dataDir, 'logs');
export const bootstrapOf = (spec: ClusterSpec) => spec.kafka.bootstrap ?? `127.0.0.1:${spec.kafka.port}`;
export const registryUrlOf = (spec: ClusterSpec) => spec.registry.url ?? `http://127.0.0.1:${spec.registry.port}`;
const specFile = (dataDir: string) => path.join(dataDir, 'cluster.json');

export function eventLogFor(spec: ClusterSpec, clientId: string, log: Logger): EventLog {
  return new EventLog({ brokers: bootstrapOf(spec).split(','), registryUrl: registryUrlOf(spec), clientId, log, topicPrefix: spec.kafka.topicPrefix });
}

/** The spec a cluster in `dataDir` was brought up with, if any. */
export function savedSpec(dataDir: string): ClusterSpec | undefined {
  const file = specFile(path.resolve(dataDir));
  // Parsed again, so a spec saved before a field existed gets its default.
  return fs.existsSync(file) ? parseSpec(JSON.parse(fs.readFileSync(file, 'utf8')), file) : undefined;
}

/** Saves the spec a later `mg cluster up` (and every other command) starts from. */
export function saveSpec(spec: ClusterSpec): void {
  fs.mkdirSync(spec.dataDir, { recursive: true });
  const file = specFile(spec.dataDir);
  fs.writeFileSync(`${file}.tmp`, JSON.stringify(spec, null, 2));
  fs.renameSync(`${file}.tmp`, file); // readers never see a half-written spec
}

export async function clusterUp(given: ClusterSpec, log: Logger, out: NodeJS.WritableStream = process.stdout): Promise<void> {
  const progress = new Progress(12, out);
  const spec = withRuntimeChanges(savedSpec(given.dataDir), given);
  saveSpec(spec);
  const planned = instancesOf(spec);

  await progress.step('checking prerequisites (Java, Maven, Postgres 15, pgBackRest)', async () => checkPrerequisites(spec));
  await progress.step(`Kafka broker on ${bootstrapOf(spec)} (jars via Maven, KRaft)`, async () => {
    if (spec.kafka.bootstrap) return progress.note('external: not started by mg');
    const kafka = await startKafka({
      cacheDir: spec.cacheDir, dataDir: path.join(spec.dataDir, 'kafka'), runDir: runDir(spec),
      port: spec.kafka.port, controllerPort: spec.kafka.controllerPort, heapMb: spec.kafka.heapMb, log,
    });
    if (kafka.alreadyRunning) progress.note(`already running (pid ${kafka.pid})`);
  });
  await progress.step(`schema registry on ${registryUrlOf(spec)}`, async () => {
    if (spec.registry.url) return progress.note('external: not started by mg');
    const registry = await startRegistry({
      runDir: runDir(spec), logDir: logDir(spec), bootstrap: bootstrapOf(spec), port: spec.registry.port, topicPrefix: spec.kafka.topicPrefix,
    });
    if (registry.alreadyRunning) progress.note('already running');
  });

  const eventLog = eventLogFor(spec, 'mg-cli', log);
  try {
    await progress.step('topics of the catalog', async () => {
      const created = await eventLog.ensureTopics();
      progress.note(created.length ? `created ${created.join(', ')}` : 'all present');
    });
    await progress.step('event schemas in the registry', async () => {
      for (const topic of ['topology', 'health', 'agentCommands', 'agentResults', 'gatewayCancels', 'cdcStatus', 'orchEvents', 'backups', 'workflows'] as Array<keyof TopicValues>) {
        await codecFor(eventLog.registry, topic, eventLog.topic(topic)).schemaId();
      }
    });
    let before = emptyTopology();
    await progress.step('topology: cells, databases, shards', async () => {
      before = await bootstrapTopology(spec, eventLog, progress);
    });
    const inactive: ReadonlySet<string> = new Set(before.inactive.keys());
    await progress.step('an agent beside each Postgres instance', () => startAgents(spec, planned, eventLog, progress));
    const paths = pathsOf(spec);
    await progress.step(`MultiOrch (one per cell, ports ${spec.orchestrator.basePort}+): elects each new shard's primary`,
      () => startOrchestrators(spec, paths, progress));
    await progress.step('replicas cloned from their primary and streaming', () =>
      waitHealthy(eventLog, planned.map((p) => p.instanceId), 180_000, progress, () => agentDied(spec, planned)));
    await progress.step('login role password', () => ensureLoginPassword(spec, progress, inactive));
    // Independent of each other (each waits for what it needs through the event log): started side by side.
    await progress.step(`MultiPoolers (one beside each instance), MultiGateway on port ${spec.gateway.port}, materializer on port ${spec.materializer.port} (workflows: mg workflow)`,
      () => Promise.all([startPoolers(spec, paths, progress), startGateway(spec, paths, progress), startMaterializer(spec, paths, progress)]).then(() => undefined));
    await progress.step('instances the spec no longer has (removed through MultiOrch)', () => removeUnplanned(spec, before, progress));
  } finally {
    await eventLog.close();
  }
  out.write(`\nCluster '${spec.name}' is up in ${(progress.elapsedMs() / 1000).toFixed(1)}s.\n`);
  const db = spec.databases[0].name;
  out.write(`  connect through the gateway:  PGPASSWORD=${process.env.MG_PASSWORD ? '$MG_PASSWORD' : 'postgres'} psql -h 127.0.0.1 -p ${spec.gateway.port} -U postgres ${db}\n`);
  out.write(`  read from a replica:          ... psql -h 127.0.0.1 -p ${spec.gateway.port} -U postgres ${db}@replica\n`);
  out.write(`  Kafka bootstrap: ${bootstrapOf(spec)}    schema registry: ${registryUrlOf(spec)}\n`);
  out.write(`  status: npm run mg -- cluster status --data-dir ${spec.dataDir}\n`);
}

function checkPrerequisites(spec: ClusterSpec): void {
  const missing: string[] = [];
  for (const [cmd, args] of [['java', ['-version']], ['mvn', ['-v']]] as const) {
    try {
      execFileSync(cmd, args, { stdio: 'ignore' });
    } catch {
      missing.push(cmd);
    }
  }
  for (const bin of ['postgres', 'initdb', 'pg_ctl', 'pg_basebackup']) {
    if (!fs.existsSync(path.join(spec.postgres.binDir, bin))) missing.push(path.join(spec.postgres.binDir, bin));
  }
  if (spec.backup.enabled) {
    try {
      execFileSync('pgbackrest', ['version'], { stdio: 'ignore' });
    } catch {
      missing.push('pgbackrest');
    }
  }
  if (missing.length) throw new Error(`missing prerequisites: ${missing.join(', ')} (install Java 17, Maven and Debian's postgresql-15 and pgbackrest; compose/setup.sh does)`);
}

/**
 * Publishes the spec's topology events that the log does not hold yet (topologyToPublish, which the operator
 * publishes from too: decision 0078); returns the topology as it was.
 */
export async function bootstrapTopology(spec: ClusterSpec, eventLog: EventLog, progress: Progress): Promise<TopologyState> {
  const state = emptyTopology();
  const sub = await eventLog.subscribe('topology', (e) => void applyTopologyEvent(state, e));
  await sub.caughtUp;
  await sub.stop();
  // Before the shards are defined: once they are, a later `up` no longer sees them as new.
  await chooseStanzas(spec, state, progress);

  const events: TopologyEvent[] = topologyToPublish(spec, state).map((p) => ({ eventId: randomUUID(), ts: new Date(), source: 'mg-cli', payload: p }));
  // No primary is named here: MultiOrch elects each new shard's first one.
  if (events.length) await eventLog.publisher('topology')(events.map((e) => ({ key: topologyKey(e), value: e })));
  progress.note(events.length ? `published ${events.length} events` : 'already in the log');
  return state;
}

/**
 * Gives each shard of the spec that `known` does not hold (a new database, one created again after a drop, a
 * shard set defined again by a reshard) the first stanza name of `<db>-<shard>`, `<db>-<shard>-g2`, ... that
 * the repository does not hold: an earlier Postgres system's stanza stays its own (decision 0064). Recorded
 * in the saved spec, so the shard keeps its name.
 */
async function chooseStanzas(spec: ClusterSpec, known: TopologyState, progress: Progress): Promise<void> {
  if (!spec.backup.enabled) return;
  const fresh = spec.databases.flatMap((db) => shardsOfSpec(db)
    .filter((r) => known.databases.get(db.name)?.dropped !== false || !known.shards.has(shardKey(db.name, r.shard)))
    .map((r) => ({ db, shard: r.shard })));
  if (!fresh.length) return;
  const repository = await PgBackRest.repository(backupConfigOf(spec), repositoryConfigOf(spec)).catch((err: Error) => {
    throw new Error(`could not list the backup repository's stanzas, which new shards' stanza names depend on: ${err.message}`);
  });
  const held = new Set(repository.map((s) => s.stanza));
  for (const { db, shard } of fresh) {
    let generation = 1;
    while (held.has(stanzaOf(db.name, shard, generation))) generation++;
    if (generation === 1) {
      delete db.stanzas[shard];
      continue;
    }
    db.stanzas[shard] = stanzaOf(db.name, shard, generation);
    progress.note(`${db.name}/${shard}: stanza ${db.stanzas[shard]} (the repository keeps ${stanzaOf(db.name, shard, generation - 1)} of an earlier system)`);
  }
  saveSpec(spec);
}

/** A pgBackRest configuration of the repository alone, for the CLI's looks at it. */
export const repositoryConfigOf = (spec: ClusterSpec) => path.join(spec.dataDir, 'postgres', 'repository.pgbackrest.conf');

/** One instance's agent configuration (a local cluster's and a pod's, compose/pod-config.ts). */
export function agentConfig(spec: ClusterSpec, inst: PlannedInstance): AgentConfig {
  const db = spec.databases.find((d) => d.name === inst.database)!;
  const from = db.restoredFrom;
  // The source's stanza as the spec knows it (a source dropped since then has no use for it: the copy's first primary was restored).
  const source = from && spec.databases.find((d) => d.name === from.database);
  return {
    instanceId: inst.instanceId, database: inst.database, shard: inst.shard, cell: inst.cell, host: '127.0.0.1',
    port: inst.port, dataDir: inst.dataDir, binDir: spec.postgres.binDir,
    brokers: bootstrapOf(spec).split(','), registryUrl: registryUrlOf(spec), topicPrefix: spec.kafka.topicPrefix,
    healthIntervalMs: spec.agent.healthIntervalMs, probeTimeoutMs: spec.agent.probeTimeoutMs, metricsPort: inst.metricsPort,
    poolerPort: inst.poolerPort,
    cdc: db.cdc,
    ...(spec.backup.enabled ? { backup: backupConfigOf(spec), stanza: stanzaOfSpec(db, inst.shard) } : {}),
    ...(from ? { restoreFrom: { database: from.database, stanza: source ? stanzaOfSpec(source, inst.shard) : stanzaOf(from.database, inst.shard), target: recoveryTargetOf(from) } } : {}),
  };
}

export const pathsOf = (spec: ClusterSpec): Paths => ({ runDir: runDir(spec), logDir: logDir(spec), bootstrap: bootstrapOf(spec), registryUrl: registryUrlOf(spec) });

/** pgBackRest settings of every agent and of the CLI's restores: one repository, one lock directory per cluster. */
export function backupConfigOf(spec: ClusterSpec): BackupConfig {
  return { ...spec.backup, repoPath: spec.backup.repoPath!, lockPath: path.join(runDir(spec), 'pgbackrest'), logPath: path.join(logDir(spec), 'pgbackrest') };
}

/**
 * Starts the agents that are not running and waits until each has registered
 * its instance and sends heartbeats (an instance of a new shard has no data
 * yet: MultiOrch bootstraps or clones it).
 */
export async function startAgents(spec: ClusterSpec, instances: PlannedInstance[], eventLog: EventLog, progress: Progress): Promise<void> {
  const configDir = path.join(spec.dataDir, 'agents');
  fs.mkdirSync(configDir, { recursive: true });
  for (const inst of instances) {
    const pid = readPid(runDir(spec), agentName(inst.instanceId));
    if (pid !== undefined && isAlive(pid)) {
      progress.note(`${inst.instanceId}: agent already running (pid ${pid})`);
      continue;
    }
    const file = path.join(configDir, `${inst.instanceId}.json`);
    fs.writeFileSync(file, JSON.stringify(agentConfig(spec, inst), null, 2));
    const started = await spawnDetached({
      name: agentName(inst.instanceId),
      command: process.execPath,
      args: [...nodeArgs('ingest/main.ts'), '--config', file],
      cwd: REPO_ROOT,
      runDir: runDir(spec),
      logFile: path.join(logDir(spec), `${agentName(inst.instanceId)}.log`),
    });
    progress.note(`${inst.instanceId}: agent pid ${started}, Postgres port ${inst.port}, cell ${inst.cell}`);
  }
  await waitHealthy(eventLog, instances.map((i) => i.instanceId), 60_000, progress, () => agentDied(spec, instances), 'heard from');
}

/**
 * Instances of the spec's databases that this cluster started and the spec no longer plans (a lowered
 * instancesPerShard): each removed through the admin API as `mg replica remove` does (refused when the
 * policy needs it or it is the primary: then `up` fails naming why).
 */
async function removeUnplanned(spec: ClusterSpec, topology: TopologyState, progress: Progress): Promise<void> {
  const planned = new Set(instancesOf(spec).map((i) => i.instanceId));
  const unplanned = [...topology.instances.values()].filter((i) => spec.databases.some((d) => d.name === i.database) && !planned.has(i.instanceId) &&
    fs.existsSync(path.join(spec.dataDir, 'agents', `${i.instanceId}.json`)));
  if (!unplanned.length) return progress.note('none');
  for (const inst of unplanned) {
    const at = [inst.database, inst.shard, inst.instanceId].map(encodeURIComponent);
    const r = await callOrchestrator(spec, 'DELETE', `/v1/shards/${at[0]}/${at[1]}/replicas/${at[2]}?wait=true`);
    for (const s of r.body.operation?.steps ?? []) progress.note(s.message);
    if (r.status !== 200) {
      // It runs on: the saved spec says so again, so that `down` stops it and a later `up` tries again.
      const saved = savedSpec(spec.dataDir)!;
      for (const db of saved.databases) db.removedInstances = db.removedInstances.filter((id) => id !== inst.instanceId);
      saveSpec(saved);
      throw new Error(`${inst.instanceId} is no longer in the spec but was not removed: ${r.body.error}`);
    }
  }
}

/** Why `up` cannot go on: an agent it started has exited. */
function agentDied(spec: ClusterSpec, instances: PlannedInstance[]): string | undefined {
  const dead = instances.find((i) => {
    const pid = readPid(runDir(spec), agentName(i.instanceId));
    return pid === undefined || !isAlive(pid);
  });
  return dead && `the agent of ${dead.instanceId} exited; see ${path.join(logDir(spec), `${agentName(dead.instanceId)}.log`)}`;
}

/**
 * Waits until each instance's latest heartbeat says healthy (reachable;
 * replicas streaming), or with `wanted` = 'heard from' only that it is registered and heard.
 */
async function waitHealthy(
  eventLog: EventLog, ids: string[], timeoutMs: number, progress?: Progress, fatal: () => string | undefined = () => undefined,
  wanted: 'healthy' | 'heard from' = 'healthy',
): Promise<void> {
  const topology = emptyTopology();
  const latest = new Map<string, HealthEvent>();
  const subs = await Promise.all([
    eventLog.subscribe('topology', (e) => void applyTopologyEvent(topology, e)),
    eventLog.subscribe('health', (h) => void latest.set(h.instanceId, h), { since: new Date(Date.now() - 1_000) }),
  ]);
  const unhealthy = () => ids.flatMap((id) => {
    const inst = topologyInstances(topology).find((i) => i.instanceId === id);
    if (inst && topology.inactive.has(inst.database)) return []; // scaled to zero: stopped on purpose until a wake
    const state = inst ? verdict(inst, latest.get(id)) : 'not registered';
    const ok = state === 'healthy' || (wanted === 'heard from' && state !== 'not registered' && state !== 'no heartbeat' && state !== 'stale');
    return ok ? [] : [`${id} (${state})`];
  });
  let lastReport = '';
  let failure: string | undefined;
  try {
    await waitFor(async () => {
      failure = fatal();
      if (failure) return true;
      const waiting = unhealthy();
      if (progress && waiting.length && waiting.join() !== lastReport) {
        lastReport = waiting.join();
        progress.note(`waiting for ${waiting.join(', ')}`);
      }
      return waiting.length === 0;
    }, { timeoutMs, intervalMs: 200, what: `healthy heartbeats from ${ids.join(', ')}` });
  } finally {
    await Promise.all(subs.map((s) => s.stop()));
  }
  if (failure) throw new Error(failure);
}

/** Stops everything `up` started: agents (which stop their Postgres), registry, Kafka. */
export async function clusterDown(spec: ClusterSpec, opts: { clean: boolean }, out: NodeJS.WritableStream = process.stdout): Promise<void> {
  const progress = new Progress(opts.clean ? 7 : 6, out);
  const instances = instancesOf(spec);
  await progress.step('materializer', () => stopMaterializer(spec, runDir(spec), progress));
  await progress.step('orchestrators', () => stopOrchestrators(spec, runDir(spec), progress));
  await progress.step('gateway and poolers', () => stopProxyTier(spec, runDir(spec), progress));
  await progress.step('agents and their Postgres instances', async () => {
    await Promise.all(instances.map(async (inst) => progress.note(`${inst.instanceId}: agent ${await stopAgent(spec, inst)}`)));
  });
  await progress.step('schema registry', async () => progress.note(spec.registry.url ? 'external: left running' : await stopRegistry(runDir(spec))));
  await progress.step('Kafka broker', async () => progress.note(spec.kafka.bootstrap ? 'external: left running' : await stopKafka(runDir(spec))));
  if (opts.clean) await progress.step(`removing ${spec.dataDir}`, async () => fs.rmSync(spec.dataDir, { recursive: true, force: true }));
}

/** Stops an instance's agent, which stops its Postgres (and Postgres directly when the agent was gone). */
export async function stopAgent(spec: ClusterSpec, inst: Pick<PlannedInstance, 'instanceId' | 'dataDir' | 'port'>): Promise<string> {
  const result = await stopProcess(runDir(spec), agentName(inst.instanceId), { graceMs: 30_000 });
  // An agent that was gone (killed) leaves its Postgres running: stop it directly.
  const pg = new PostgresInstance({ name: inst.instanceId, dataDir: inst.dataDir, port: inst.port, binDir: spec.postgres.binDir, log: silentLog });
  if (pg.isRunning()) await pg.stop('fast');
  return result;
}

const silentLog = { child: () => silentLog, info() {}, warn() {}, error() {}, debug() {} } as unknown as Logger;

export { readClusterView };
