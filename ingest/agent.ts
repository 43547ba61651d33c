/**
 * The ingest agent beside one Postgres instance: owns its lifecycle, registers
 * it in topology, publishes health, restarts Postgres when it dies, and acts on
 * agent commands addressed to it.
 */
import { randomUUID } from 'node:crypto';
import { EventLog, type Subscription } from '../common/eventlog.ts';
import type { Logger } from '../common/log.ts';
import { counter, gauge, histogram } from '../common/metrics.ts';
import { setLoginPassword, withConnection } from '../common/postgres.ts';
import { kindOf, payload, topologyKey, type AgentAction, type AgentCommand, type CommandStatus, type HealthEvent, type TopologyEvent } from '../schemas/index.ts';
import { BackupService } from './backup/service.ts';
import { PgBackRest } from './backup/pgbackrest.ts';
import { quoteIdent } from './cdc/catalog.ts';
import { CdcService } from './cdc/service.ts';
import { stanzaOfAgent, type AgentConfig } from './config.ts';
import { PostgresInstance, type Probe } from './postgres/instance.ts';

export const AGENT_VERSION = '0.1.0';

const postgresUp = gauge('mg_agent_postgres_up', 'Whether the last probe reached Postgres (1) or not (0)');
const probeSeconds = histogram('mg_agent_probe_duration_seconds', 'Time of one health probe', [], [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2]);
const restarts = counter('mg_agent_postgres_restarts_total', 'Times the agent restarted a Postgres it found dead');
const heartbeats = counter('mg_agent_heartbeats_total', 'Health events published');
const heartbeatsDropped = counter('mg_agent_heartbeats_dropped_total', 'Heartbeats skipped because the previous one was still being published');
const commandsHandled = counter('mg_agent_commands_total', 'Agent commands handled', ['action', 'status']);
const replayLag = gauge('mg_agent_replay_lag_bytes', 'Replica replay lag in bytes');

/** Acts on one command addressed to this agent; returns the result message. */
export type CommandHandler = (cmd: AgentCommand) => Promise<string>;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The health error of an instance that waits to be bootstrapped or cloned. */
const NO_DATA_YET = 'no data directory yet: waiting for MultiOrch to bootstrap or clone it';

export class Agent {
  readonly postgres: PostgresInstance;
  private readonly eventLog: EventLog;
  private readonly publishHealth;
  private readonly publishTopology;
  private readonly publishResult;
  private sequence = 0n;
  private stopped = false;
  /** Set by a STOP command or shutdown: a stopped Postgres is then not restarted. */
  private wantRunning = true;
  /** The lifecycle operation in progress (start, stop, restart); one at a time. */
  private lifecycleOp: Promise<void> | undefined;
  private inflight: Promise<void> | undefined;
  private commands: Subscription | undefined;
  private activation: Subscription | undefined;
  /** Why the database is scaled to zero (Postgres stays stopped), or undefined while it is active. */
  private inactive: string | undefined;
  /** Caught up with the topology: activation changes seen from here on are acted on. */
  private followingActivation = false;
  private loop: Promise<void> | undefined;
  private readonly handlers = new Map<AgentAction, CommandHandler>();
  private readonly cdc: CdcService;
  /** WAL archiving and backups (absent when the spec turns them off). */
  readonly backups: BackupService | undefined;
  /** Runs before the agent restarts a Postgres that died (the voter makes a dead primary come back fenced). */
  beforeRestart: (() => void) | undefined;

  constructor(private readonly cfg: AgentConfig, private readonly log: Logger) {
    const settings = cfg.backup ? PgBackRest.archiveSettingsFor(stanzaOfAgent(cfg), cfg.dataDir) : {};
    this.postgres = new PostgresInstance({ name: cfg.instanceId, dataDir: cfg.dataDir, host: cfg.host, port: cfg.port, binDir: cfg.binDir, log, settings });
    this.eventLog = new EventLog({ brokers: cfg.brokers, registryUrl: cfg.registryUrl, clientId: `agent.${cfg.instanceId}`, log, topicPrefix: cfg.topicPrefix });
    this.publishHealth = this.eventLog.publisher('health');
    this.publishTopology = this.eventLog.publisher('topology');
    this.publishResult = this.eventLog.publisher('agentResults');
    this.lifecycleCommands();
    this.cdc = new CdcService(cfg, this.eventLog, log, {
      physicalSlot: this.postgres.slotName,
      // Postgres loads logical slots only at startup: a standby installs its copy of the CDC slot around a restart.
      whileStopped: (install) => this.exclusive(async () => {
        // Queued behind a promotion, it must not stop the new primary.
        const [state] = await this.postgres.query<{ standby: boolean }>('SELECT pg_is_in_recovery() AS standby');
        if (!state?.standby) throw new Error('no longer a standby: the slot copy is not installed');
        await this.postgres.stop('fast');
        install();
        await this.postgres.start();
      }, true),
    });
    this.cdc.register((action, handler) => this.handle(action, handler));
    if (cfg.backup) {
      this.backups = new BackupService({ ...cfg, backup: cfg.backup }, this.postgres, this.eventLog, log.child({ part: 'backup' }));
      this.backups.register((action, handler) => this.handle(action, handler), (op, keepRunning) => this.exclusive(op, keepRunning));
    }
  }

  async start(): Promise<void> {
    this.backups?.writeConfig();
    await this.followActivation();
    await this.ensurePostgres();
    await this.topology(payload('InstanceRegistered', {
      instanceId: this.cfg.instanceId, database: this.cfg.database, shard: this.cfg.shard, cell: this.cfg.cell,
      host: this.cfg.host, port: this.cfg.port, type: 'REPLICA', // which one is primary is MultiOrch's to say (PrimaryChanged)
      agentMetricsPort: this.cfg.metricsPort, poolerPort: this.cfg.poolerPort,
    }));
    const serving = this.postgres.isInitialized() ? 'SERVING' : 'NOT_SERVING';
    await this.topology(payload('ServingStateChanged', { instanceId: this.cfg.instanceId, state: serving, term: null }));
    // Heartbeats first: joining the command group can wait out a dead predecessor's session.
    this.loop = this.healthLoop();
    this.cdc.start();
    this.commands = await this.eventLog.subscribe('agentCommands', (cmd) => this.onCommand(cmd), {
      groupId: `${this.cfg.topicPrefix}agent.${this.cfg.instanceId}`,
      fromBeginning: false,
    });
    this.log.info({ port: this.cfg.port }, 'agent started');
  }

  /** Graceful stop: announce NOT_SERVING, stop Postgres, publish a last heartbeat. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.wantRunning = false;
    await this.loop;
    await this.inflight;
    await this.commands?.stop();
    await this.activation?.stop();
    await this.cdc.stop();
    await this.lifecycleOp;
    await this.topology(payload('ServingStateChanged', { instanceId: this.cfg.instanceId, state: 'NOT_SERVING', term: null })).catch(() => undefined);
    await this.postgres.stop('fast');
    await this.heartbeat(null, 'stopped by its agent').catch(() => undefined);
    await this.eventLog.close();
  }

  /**
   * Starts the Postgres this agent holds. An instance without a data directory
   * waits: MultiOrch decides whether it becomes the shard's first primary
   * (BOOTSTRAP) or a clone of the current one (REPOINT), so an agent never
   * creates a second history for a shard on its own.
   */
  private async ensurePostgres(): Promise<void> {
    if (!this.postgres.isInitialized()) {
      this.wantRunning = false;
      this.log.info(NO_DATA_YET);
      return;
    }
    if (this.inactive !== undefined) {
      this.wantRunning = false;
      this.log.info({ reason: this.inactive }, 'the database is inactive: postgres stays stopped');
      return;
    }
    this.postgres.writeConfig();
    await this.postgres.start();
  }

  private async healthLoop(): Promise<void> {
    while (!this.stopped) {
      const started = Date.now();
      const end = probeSeconds.startTimer();
      const probe = await this.postgres.probe(this.cfg.probeTimeoutMs);
      end();
      postgresUp.set(probe ? 1 : 0);
      const error = probe ? null : this.postgres.isRunning() ? `no answer within ${this.cfg.probeTimeoutMs} ms`
        : this.inactive !== undefined ? `the database is inactive (${this.inactive})`
          : this.postgres.isInitialized() ? 'postgres is not running' : NO_DATA_YET;
      this.sendHeartbeat(probe, error);
      if (!probe && !this.lifecycleOp && this.wantRunning && !this.postgres.isRunning()) this.restartDead();
      await sleep(Math.max(0, this.cfg.healthIntervalMs - (Date.now() - started)));
    }
  }

  /**
   * Scale to zero: Postgres runs only while the topology says the instance's
   * database is active. The decision is the cluster manager's (an event); the
   * agent carries it out on its own instance, with no election: a primary
   * stopped cleanly comes back as the same primary.
   */
  private async followActivation(): Promise<void> {
    this.activation = await this.eventLog.subscribe('topology', (e) => {
      const { kind, body } = kindOf(e);
      const b = body as { database?: string; active?: boolean; reason?: string };
      if (kind !== 'DatabaseActivationChanged' || b.database !== this.cfg.database) return;
      const was = this.inactive;
      this.inactive = b.active ? undefined : b.reason;
      if (this.followingActivation && (was === undefined) !== (this.inactive === undefined)) void this.applyActivation(b.active!);
    });
    await this.activation.caughtUp;
    this.followingActivation = true;
  }

  private async applyActivation(active: boolean): Promise<void> {
    if (!this.postgres.isInitialized() || this.stopped) return;
    const started = Date.now();
    try {
      this.wantRunning = active;
      if (active) {
        await this.lifecycle(async () => {
          if (!this.postgres.isRunning()) await this.postgres.start();
        });
      } else {
        await this.lifecycle(async () => {
          if (!this.postgres.isRunning()) return;
          // Most of the shutdown's work done while the instance still serves; the fast stop then ends its sessions.
          await this.postgres.query('CHECKPOINT', [], 60_000).catch((err) => this.log.warn({ err: err.message }, 'checkpoint before deactivation failed'));
          await this.postgres.stop('fast');
        });
      }
      this.log.info({ active, ms: Date.now() - started }, active ? 'database activated: postgres started' : 'database deactivated: postgres stopped');
      await this.reportNow(); // routing follows at once rather than at the next heartbeat
    } catch (err) {
      this.log.error({ err, active }, 'could not apply the database activation');
    }
  }

  /**
   * A new shard's first primary, running: a new initdb with the Postgres
   * database the gateways connect to for this instance's database (initdb
   * makes only `postgres`), or another database's shard restored from its
   * backup (`mg backup restore --as`).
   */
  async initFirstPrimary(): Promise<void> {
    if (this.cfg.restoreFrom) {
      if (!this.backups) throw new Error('a restored database needs backups enabled (the spec\'s backup.enabled)');
      await this.backups.restorePrimary(this.cfg.restoreFrom);
      return;
    }
    await this.postgres.initPrimary();
    await this.postgres.start();
    const name = this.cfg.database;
    const [exists] = await this.postgres.query('SELECT 1 FROM pg_database WHERE datname = $1', [name]);
    if (!exists) await this.postgres.query(`CREATE DATABASE ${quoteIdent(name)}`, [], 60_000);
    // Before any election: the replicas of other pods clone from this one with the password (SCRAM).
    if (this.cfg.loginPassword) await withConnection({ host: this.cfg.host, port: this.cfg.port }, (c) => setLoginPassword(c, this.cfg.loginPassword!));
  }

  /** Probes and publishes a heartbeat now, besides the regular ones (e.g. right after a promotion, so routing follows at once). */
  async reportNow(): Promise<void> {
    const probe = await this.postgres.probe(this.cfg.probeTimeoutMs);
    await this.inflight;
    this.sendHeartbeat(probe, probe ? null : 'no answer right after a change');
    await this.inflight;
  }

  /**
   * Publishes without blocking the loop: while Kafka is slow or away, probing
   * and restarting go on, and heartbeats that would queue up are dropped (a
   * newer one follows).
   */
  private sendHeartbeat(probe: Probe | null, error: string | null): void {
    if (this.inflight) {
      heartbeatsDropped.inc();
      return;
    }
    this.inflight = this.heartbeat(probe, error)
      .catch((err) => this.log.warn({ err }, 'could not publish health'))
      .finally(() => (this.inflight = undefined));
  }

  /** Restarts a Postgres that died (kill -9, crash) in the background, so heartbeats go on meanwhile. */
  private restartDead(): void {
    this.log.warn('postgres is not running; restarting it');
    restarts.inc();
    this.lifecycle(async () => {
      this.beforeRestart?.();
      await this.postgres.start();
    })
      .then(() => this.log.info('postgres restarted'))
      .catch((err) => this.log.error({ err }, 'postgres restart failed; will retry'));
  }

  /**
   * Runs lifecycle operations one at a time, so a command's stop is never met
   * by the health loop's restart of a "dead" Postgres.
   */
  private lifecycle(op: () => Promise<void>): Promise<void> {
    return this.exclusive(op, this.wantRunning);
  }

  /**
   * Runs a lifecycle operation of another part of the agent (the voter's
   * demote, rewind, rebuild) one at a time with the others; `keepRunning` says
   * whether a Postgres that is found dead afterwards is restarted.
   */
  exclusive(op: () => Promise<void>, keepRunning: boolean): Promise<void> {
    this.wantRunning = keepRunning;
    const run = (this.lifecycleOp ?? Promise.resolve()).then(op);
    const settled = run.catch(() => undefined);
    this.lifecycleOp = settled;
    void settled.then(() => {
      if (this.lifecycleOp === settled) this.lifecycleOp = undefined;
    });
    return run;
  }


  private async heartbeat(probe: Probe | null, error: string | null): Promise<void> {
    const cdcLag = this.cdc.lag();
    const event: HealthEvent = {
      instanceId: this.cfg.instanceId, database: this.cfg.database, shard: this.cfg.shard, cell: this.cfg.cell,
      ts: new Date(), sequence: ++this.sequence,
      reachable: probe !== null,
      role: probe ? (probe.inRecovery ? 'REPLICA' : 'PRIMARY') : 'UNKNOWN',
      currentLsn: probe?.currentLsn ?? null,
      flushLsn: probe?.flushLsn ?? null,
      replayLsn: probe?.replayLsn ?? null,
      replayLagBytes: probe?.replayLagBytes ?? null,
      replayLagSeconds: probe?.replayLagSeconds ?? null,
      upstream: probe?.upstream ?? null,
      connections: probe?.connections ?? 0,
      maxConnections: probe?.maxConnections ?? 0,
      postgresPid: this.postgres.postmasterPid() ?? null,
      agentVersion: AGENT_VERSION,
      error,
      walReceiverStatus: probe?.walReceiverStatus ?? null,
      cdcSlotLagBytes: cdcLag?.bytes ?? null,
      cdcSlotLagSeconds: cdcLag?.seconds ?? null,
    };
    if (probe?.replayLagBytes != null) replayLag.set(Number(probe.replayLagBytes));
    await this.publishHealth([{ key: this.cfg.instanceId, value: event }]);
    heartbeats.inc();
  }

  private topology(p: TopologyEvent['payload']): Promise<void> {
    const event: TopologyEvent = { eventId: randomUUID(), ts: new Date(), source: `agent/${this.cfg.instanceId}`, payload: p };
    return this.publishTopology([{ key: topologyKey(event), value: event }]);
  }

  /**
   * Adds the handler of one command action. Parts of the agent beyond the
   * lifecycle (CDC streams, the consensus voter) plug in here; a handler's
   * string is the result message, a throw makes the command FAILED.
   */
  handle(action: AgentAction, handler: CommandHandler): void {
    if (this.handlers.has(action)) throw new Error(`agent command ${action} already has a handler`);
    this.handlers.set(action, handler);
  }

  private lifecycleCommands(): void {
    this.handle('START_POSTGRES', async () => {
      this.wantRunning = true;
      await this.lifecycle(() => this.postgres.start());
      return 'started';
    });
    this.handle('STOP_POSTGRES', async (cmd) => {
      this.wantRunning = false;
      await this.lifecycle(() => this.postgres.stop(cmd.args.mode === 'immediate' ? 'immediate' : 'fast'));
      return 'stopped';
    });
    this.handle('RESTART_POSTGRES', async () => {
      this.wantRunning = true;
      await this.lifecycle(() => this.postgres.restart());
      return 'restarted';
    });
    // A database hosted on this instance's shard group (`mg database create --on`, `drop`): run on the primary, replicated from there.
    this.handle('CREATE_DATABASE', async (cmd) => {
      const name = cmd.args.name;
      const [exists] = await this.postgres.query('SELECT 1 FROM pg_database WHERE datname = $1', [name]);
      if (!exists) await this.postgres.query(`CREATE DATABASE ${quoteIdent(name)}`, [], 60_000);
      return exists ? `database "${name}" exists` : `database "${name}" created`;
    });
    this.handle('DROP_DATABASE', async (cmd) => {
      // FORCE: the gateways have drained its sessions already; what is left (pooled connections) goes.
      await this.postgres.query(`DROP DATABASE IF EXISTS ${quoteIdent(cmd.args.name)} WITH (FORCE)`, [], 60_000);
      return `database "${cmd.args.name}" dropped`;
    });
    this.handle('REPORT_HEALTH', async () =>
      JSON.stringify(await this.postgres.probe(this.cfg.probeTimeoutMs), (_k, v) => (typeof v === 'bigint' ? v.toString() : v)));
  }

  private async onCommand(cmd: AgentCommand): Promise<void> {
    if (cmd.instanceId !== this.cfg.instanceId) return;
    const started = Date.now();
    let status: CommandStatus = 'SUCCEEDED';
    let message: string;
    const handler = this.handlers.get(cmd.action);
    try {
      if (handler) message = await handler(cmd);
      else {
        status = 'REJECTED';
        message = `this agent does not handle ${String(cmd.action)}`;
      }
    } catch (err) {
      status = 'FAILED';
      message = (err as Error).message;
    }
    commandsHandled.inc({ action: cmd.action, status });
    this.log.info({ commandId: cmd.commandId, action: cmd.action, status, message }, 'agent command handled');
    await this.publishResult([{ key: this.cfg.instanceId, value: {
      commandId: cmd.commandId, instanceId: this.cfg.instanceId, ts: new Date(), status, message, durationMs: BigInt(Date.now() - started),
    } }]);
  }
}
