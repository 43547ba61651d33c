// A local single-node Apache Kafka (KRaft, broker+controller in one JVM) run from the
// official jars on Maven Central. Maven is the only fetcher; jars are cached per version.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describeBroker } from '../../common/eventlog.ts';
import type { Logger } from '../../common/log.ts';
import { isAlive, readPid, spawnDetached, stopProcess, waitFor, type StopResult } from '../supervise.ts';

export const KAFKA_VERSION = '3.9.1';
const NAME = 'kafka';
const MARKER = '.complete';
// A broker that has not exited is still starting: at load averages of 30-40 on 2 cores, its JVM took over 60 s.
const START_TIMEOUT_MS = 180_000;

// The binding matches what the Kafka 3.9 distribution ships in libs/ (slf4j 1.7 + reload4j);
// kafka_2.13's pom brings slf4j-api only, so without these the broker logs nothing.
const POM = `<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.multigres</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>${KAFKA_VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>${KAFKA_VERSION}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-reload4j</artifactId><version>1.7.36</version></dependency>
    <dependency><groupId>ch.qos.reload4j</groupId><artifactId>reload4j</artifactId><version>1.2.25</version></dependency>
  </dependencies>
</project>
`;

/** Runs a command to completion; rejects with its output when it fails. */
function run(command: string, args: string[], cwd: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (d: Buffer) => (output += d));
    child.stderr.on('data', (d: Buffer) => (output += d));
    child.once('error', reject);
    child.once('close', (code) =>
      code === 0 ? resolve(output) : reject(new Error(`${command} ${args.join(' ')} exited with ${code}:\n${output.trim()}`)),
    );
  });
}

/** Returns the directory holding every jar the broker needs, fetching them on first use. */
export async function ensureKafkaJars(cacheDir: string, log: Logger): Promise<string> {
  const home = join(cacheDir, `kafka-${KAFKA_VERSION}`);
  const lib = join(home, 'lib');
  if (existsSync(join(lib, MARKER))) return lib;

  const started = Date.now();
  log.info({ home }, 'fetching Kafka jars with Maven');
  mkdirSync(home, { recursive: true });
  writeFileSync(join(home, 'pom.xml'), POM);
  // Copy into a private directory and rename it into place: an interrupted or concurrent
  // fetch never leaves a half-filled lib/ that looks usable.
  const staging = `lib.tmp-${process.pid}`;
  try {
    await run('mvn', ['-q', '-B', 'dependency:copy-dependencies', `-DoutputDirectory=${staging}`], home);
  } catch (err) {
    rmSync(join(home, staging), { recursive: true, force: true });
    throw err;
  }
  log.info({ ms: Date.now() - started }, 'Maven copied Kafka jars');
  writeFileSync(join(home, staging, MARKER), `${new Date().toISOString()}\n`);
  if (!existsSync(join(lib, MARKER))) rmSync(lib, { recursive: true, force: true }); // incomplete: unused
  try {
    renameSync(join(home, staging), lib); // fails if lib/ exists, so a finished lib/ is never replaced
  } catch (err) {
    if (!existsSync(join(lib, MARKER))) throw err;
    rmSync(join(home, staging), { recursive: true, force: true }); // a concurrent fetch finished first
  }
  log.info({ lib, ms: Date.now() - started }, 'Kafka jars ready');
  return lib;
}

export interface StartKafkaOptions {
  cacheDir: string;
  dataDir: string;
  runDir: string;
  port: number;
  controllerPort: number;
  heapMb?: number;
  log: Logger;
}

/**
 * True when the broker on `bootstrap` is the one formatted with `clusterId` (another broker may
 * hold the port) and answers metadata requests, which it does only once unfenced.
 */
async function brokerAnswers(bootstrap: string, clusterId: string | undefined): Promise<boolean> {
  const cluster = await describeBroker(bootstrap);
  return cluster.clusterId === clusterId && cluster.brokers > 0;
}

/** The cluster id the storage in `metaDir` was formatted with, if it was. */
function formattedClusterId(metaDir: string): string | undefined {
  try {
    return /^cluster\.id=(.+)$/m.exec(readFileSync(join(metaDir, 'meta.properties'), 'utf8'))?.[1]?.trim();
  } catch {
    return undefined;
  }
}

function tail(file: string, bytes = 4_000): string {
  try {
    return readFileSync(file, 'utf8').slice(-bytes);
  } catch {
    return '';
  }
}

function serverProperties(opts: StartKafkaOptions): string {
  return `# Written by mg on every start; edits are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:${opts.controllerPort}
listeners=PLAINTEXT://127.0.0.1:${opts.port},CONTROLLER://127.0.0.1:${opts.controllerPort}
advertised.listeners=PLAINTEXT://127.0.0.1:${opts.port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=${join(opts.dataDir, 'kraft')}
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
num.partitions=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
# After a kill -9 the controller refuses the restarted broker (DUPLICATE_BROKER_REGISTRATION)
# until the old incarnation's session expires: 9 s by default, needlessly long on one node.
broker.session.timeout.ms=2000
broker.heartbeat.interval.ms=500
`;
}

function log4jProperties(logsDir: string): string {
  // Size-capped rolling files: a long-lived local broker must not fill the disk.
  const appender = (name: string, file: string) => `log4j.appender.${name}=org.apache.log4j.RollingFileAppender
log4j.appender.${name}.File=${join(logsDir, file)}
log4j.appender.${name}.MaxFileSize=20MB
log4j.appender.${name}.MaxBackupIndex=3
log4j.appender.${name}.layout=org.apache.log4j.PatternLayout
log4j.appender.${name}.layout.ConversionPattern=[%d] %p %m (%c)%n
`;
  return `log4j.rootLogger=INFO, server
${appender('server', 'server.log')}${appender('stateChange', 'state-change.log')}log4j.logger.state.change.logger=INFO, stateChange
log4j.additivity.state.change.logger=false
log4j.logger.kafka.request.logger=WARN, server
log4j.additivity.kafka.request.logger=false
`;
}

/** Kafka cluster ids are 16 random bytes in unpadded base64url, never starting with '-' (it would parse as a flag). */
function newClusterId(): string {
  for (;;) {
    const id = randomBytes(16).toString('base64url');
    if (!id.startsWith('-')) return id;
  }
}

export async function startKafka(opts: StartKafkaOptions): Promise<{ pid: number; bootstrap: string; alreadyRunning: boolean }> {
  const { dataDir, runDir, log } = opts;
  const bootstrap = `127.0.0.1:${opts.port}`;
  const started = Date.now();

  const metaDir = join(dataDir, 'kraft');
  const existing = readPid(runDir, NAME);
  if (existing !== undefined && isAlive(existing)) {
    const clusterId = formattedClusterId(metaDir);
    try {
      // It may still be starting under another `mg` invocation.
      await waitFor(async () => !isAlive(existing) || (await brokerAnswers(bootstrap, clusterId)), {
        timeoutMs: START_TIMEOUT_MS,
        what: `Kafka on ${bootstrap}`,
      });
      if (isAlive(existing)) {
        log.info({ kafkaPid: existing, bootstrap }, 'Kafka already running');
        return { pid: existing, bootstrap, alreadyRunning: true };
      }
    } catch (err) {
      log.warn({ kafkaPid: existing, err }, 'Kafka process does not answer; restarting it');
      await stopProcess(runDir, NAME);
    }
  }

  const jars = join(await ensureKafkaJars(opts.cacheDir, log), '*');
  const logsDir = join(dataDir, 'logs');
  const config = join(dataDir, 'server.properties');
  const log4j = join(dataDir, 'log4j.properties');
  mkdirSync(metaDir, { recursive: true });
  mkdirSync(logsDir, { recursive: true });
  writeFileSync(config, serverProperties(opts));
  writeFileSync(log4j, log4jProperties(logsDir));
  const log4jFlag = `-Dlog4j.configuration=file:${log4j}`;

  let clusterId = formattedClusterId(metaDir);
  if (clusterId === undefined) {
    // Kept beside the data so a re-format after a partial failure reuses the same id.
    const idFile = join(dataDir, 'cluster-id');
    if (!existsSync(idFile)) writeFileSync(idFile, `${newClusterId()}\n`);
    clusterId = readFileSync(idFile, 'utf8').trim();
    const t = Date.now();
    await run('java', [log4jFlag, '-cp', jars, 'kafka.tools.StorageTool', 'format', '-t', clusterId, '-c', config], dataDir);
    log.info({ clusterId, ms: Date.now() - t }, 'formatted Kafka storage');
  }

  const heap = `${opts.heapMb ?? 512}m`;
  const stdoutLog = join(logsDir, 'kafka.out');
  const pid = await spawnDetached({
    name: NAME,
    command: 'java',
    args: [
      `-Xmx${heap}`,
      `-Xms${heap}`,
      '-XX:+UseG1GC',
      '-XX:MaxGCPauseMillis=20',
      '-XX:+ExitOnOutOfMemoryError', // die visibly instead of limping along
      '-Djava.awt.headless=true',
      log4jFlag,
      '-cp',
      jars,
      'kafka.Kafka',
      config,
    ],
    cwd: dataDir,
    runDir,
    logFile: stdoutLog,
  });
  log.info({ kafkaPid: pid, bootstrap }, 'Kafka process started');

  let exited = false;
  try {
    await waitFor(
      async () => {
        exited = !isAlive(pid);
        return exited || (await brokerAnswers(bootstrap, clusterId));
      },
      { timeoutMs: START_TIMEOUT_MS, intervalMs: 250, what: `Kafka broker on ${bootstrap} (pid ${pid})` },
    );
    if (exited) throw new Error(`Kafka (pid ${pid}) exited during startup`);
  } catch (err) {
    await stopProcess(runDir, NAME, { graceMs: 2_000 }); // a broker that never came up is of no use to anyone
    const logs = [stdoutLog, join(logsDir, 'server.log')].map((f) => `--- ${f}\n${tail(f)}`).join('\n');
    throw new Error(`${(err as Error).message}\n${logs}`);
  }
  log.info({ kafkaPid: pid, bootstrap, ms: Date.now() - started }, 'Kafka ready');
  return { pid, bootstrap, alreadyRunning: false };
}

export function stopKafka(runDir: string): Promise<StopResult> {
  return stopProcess(runDir, NAME);
}
