/**
 * MultiGateway: what clients connect to. Accepts the Postgres wire protocol
 * (TLS, SCRAM-SHA-256 against the cluster's roles), learns the cluster only
 * from Kafka, and hands each client to a session that relays to a pooler.
 */
import { randomInt, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import pg from 'pg';
import type { EventLog, Subscription } from '../../common/eventlog.ts';
import type { Logger } from '../../common/log.ts';
import { counter, gauge } from '../../common/metrics.ts';
import { PgError, SQLSTATE } from '../protocol/errors.ts';
import { errorResponse } from '../protocol/messages.ts';
import { movedTablesOf, payload, topologyKey, type SchemaChange, type TopologyEvent } from '../../schemas/index.ts';
import { loadDdlParser, type DatabaseDdl } from './database-ddl.ts';
import { Discovery, type DatabaseGone, type PrimaryMove } from './discovery.ts';
import { acceptClient, cachedVerifierLookup, prepareFrontendTls, VERIFIER_SQL, verifierFromAuthid } from './frontend.ts';
import { GatewaySession, openLinks, type DatabaseRegistry, type FailoverOutcome } from './session.ts';
import { plannerFor, ShardedSession, type SchemaChangeRecord } from './sharded.ts';
import { plannerReady } from '../planner/planner.ts';
import { FAULT_POINTS, TwoPhaseCoordinator, type FaultPoint } from '../twopc/coordinator.ts';

export interface GatewayOptions {
  /** Default 127.0.0.1. */
  host?: string;
  port: number;
  bufferWindowMs: number;
  tls?: { key: string | Buffer; cert: string | Buffer };
  requireTls?: boolean;
  /** The role the gateway uses to read SCRAM verifiers (pg_authid) through the poolers. */
  authUser: string;
  /** Clients beyond this are refused with 53300, as Postgres words it (default: no limit but descriptors). */
  maxClients?: number;
  /** Transactions that begin READ ONLY run on a replica. */
  readOnlyToReplicas?: boolean;
  /** Close the pooler connection of sessions idle this long (and portable); 0 keeps them. */
  releaseIdleLinksAfterMs?: number;
  /** Scale to zero a database (with instances of its own) that had no session here for this long; 0 never does. */
  deactivateIdleAfterMs?: number;
  /** Told when a session is idle after running DDL on a database (the REST API reloads its schema cache). */
  onSchemaChange?: (database: string) => void;
}

/** Descriptors kept for Kafka, metrics, verifier lookups, the listener, and links that idle sessions reopen. */
const RESERVED_FDS = 512;

/** Descriptors this process may spend on clients and their pooler connections. */
export function descriptorBudget(): number {
  const limits = fs.readFileSync('/proc/self/limits', 'utf8');
  const soft = /^Max open files\s+(\d+|unlimited)/m.exec(limits)?.[1];
  const fds = soft === undefined || soft === 'unlimited' ? 1_048_576 : Number(soft);
  return Math.max(2, fds - RESERVED_FDS);
}

const clientsGauge = gauge('mg_gateway_clients', 'Client connections open');
const accepted = counter('mg_gateway_connections_total', 'Client connections accepted, by outcome', ['outcome']);
const cancels = counter('mg_gateway_cancel_requests_total', 'CancelRequests, by where the session was', ['where']);
const databaseDdl = counter('mg_gateway_database_ddl_total', 'CREATE / DROP DATABASE through the gateway, by what the topology did', ['op', 'outcome']);
const activations = counter('mg_gateway_database_activations_total', 'Activation changes this gateway asked for, by why', ['why']);
const refusedHeld = counter('mg_gateway_held_database_refusals_total', 'Clients refused (57P03) because their database is deactivated and held stopped');
/** What a client of a database held stopped is told to do (decision 0084). */
const HELD_HINT = 'A client does not wake it: it runs again once activated (mg database activate, or deactivated: false on its MultigresDatabase).';
const schemaChanges = counter('mg_gateway_schema_changes_total', 'DDL on sharded databases recorded on mg.schema.changes.v1, by outcome (FAILED: some shards ran it) and whether the event was published', ['outcome', 'published']);
const tooMany = counter('mg_gateway_connections_refused_limit_total', 'Client connections refused at maxClients (53300)');

export class Gateway {
  readonly discovery: Discovery;
  private server: net.Server | undefined;
  private readonly sessions = new Map<number, { session: GatewaySession | ShardedSession; secret: number }>();
  /** SCRAM verifiers by (user, database), cached briefly so password changes apply quickly. */
  private readonly verifier = cachedVerifierLookup((user, database) => this.readVerifier(user, database.split('@')[0]));
  private draining = false;
  /** Client sockets open, authenticated or not. */
  private open = 0;
  private readonly maxClients: number;
  private readonly fdBudget = descriptorBudget();
  /** Names this gateway in forwarded CancelRequests. */
  readonly id = `gateway-${randomUUID()}`;
  /** Commits this gateway's cross-shard transactions in twopc mode (its sessions' and its REST requests'). */
  readonly twopc: TwoPhaseCoordinator;
  private readonly publishCancel;
  private readonly publishTopology;
  private readonly publishSchemaChange;
  private schemaChangesPublished: Promise<void> = Promise.resolve();
  private readonly databases: DatabaseRegistry = {
    refuse: (ddl, from) => this.refuseDatabaseDdl(ddl, from),
    record: (ddl, from) => this.recordDatabaseDdl(ddl, from),
  };
  private peerCancels: Subscription | undefined;
  private peerSchemaChanges: Subscription | undefined;
  private sweeper: NodeJS.Timeout | undefined;
  private idleSweeper: NodeJS.Timeout | undefined;
  /** Per shard group: sessions open here, and when the last one closed (scale to zero). */
  private readonly groupUse = new Map<string, { sessions: number; lastUsed: number }>();
  private readonly startedAt = Date.now();
  /** Shard groups this gateway asked to wake and has not seen awake yet. */
  private readonly waking = new Set<string>();

  constructor(private readonly eventLog: EventLog, private readonly opts: GatewayOptions, private readonly log: Logger) {
    this.discovery = new Discovery(eventLog);
    this.twopc = new TwoPhaseCoordinator({ id: this.id, log, faultPoint: twopcFaultPoint(log) });
    this.discovery.onPrimaryMoved((move) => this.leaveReplacedPrimary(move));
    this.discovery.onDatabaseGone((gone) => this.leaveDatabase(gone));
    this.publishCancel = eventLog.publisher('gatewayCancels');
    this.publishTopology = eventLog.publisher('topology');
    this.publishSchemaChange = eventLog.publisher('schemaChanges');
    this.maxClients = opts.maxClients ?? Infinity;
  }

  async start(): Promise<number> {
    if (this.opts.tls) prepareFrontendTls(this.opts.tls); // a bad certificate fails here, not at the first client
    await Promise.all([this.discovery.start(), loadDdlParser(), plannerReady]);
    this.peerCancels = await this.eventLog.subscribe('gatewayCancels', (c) => {
      if (c.receivedBy !== this.id && this.cancelLocal(c.pid, c.secret)) cancels.inc({ where: 'from_peer' });
    }, { since: new Date() });
    // DDL another gateway ran: the columns this one's planner learnt may be out of date. (The REST schema
    // caches hear of it from the NOTIFY that gateway sends, decision 0042.)
    this.peerSchemaChanges = await this.eventLog.subscribe('schemaChanges', (c) => {
      if (c.source !== `gateway/${this.id}`) plannerFor(c.database, this.discovery.topology.vschemas.get(c.database)).forgetColumns();
    }, { since: new Date() });
    const releaseAfter = this.opts.releaseIdleLinksAfterMs ?? 0;
    if (releaseAfter > 0) {
      this.sweeper = setInterval(() => {
        const now = performance.now();
        for (const { session } of this.sessions.values()) session.releaseIdleLink(now, releaseAfter);
      }, Math.min(1_000, releaseAfter / 2));
      this.sweeper.unref();
    }
    const idleMs = this.opts.deactivateIdleAfterMs ?? 0;
    if (idleMs > 0) {
      this.idleSweeper = setInterval(() => this.deactivateIdle(idleMs), Math.min(1_000, idleMs / 4));
      this.idleSweeper.unref();
    }
    this.server = net.createServer({ noDelay: true }, (socket) => void this.onConnection(socket));
    this.server.maxConnections = 1_000_000;
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen({ host: this.opts.host ?? '127.0.0.1', port: this.opts.port, backlog: 4096 }, resolve);
    });
    const port = (this.server.address() as net.AddressInfo).port;
    this.log.info({ port, maxClients: this.maxClients, descriptors: this.fdBudget }, 'gateway listening');
    return port;
  }

  /** Graceful drain: stop accepting, let sessions finish for up to graceMs, then close them. */
  async drain(graceMs = 10_000): Promise<void> {
    this.draining = true;
    clearInterval(this.sweeper);
    clearInterval(this.idleSweeper);
    this.server?.close();
    const deadline = Date.now() + graceMs;
    while (this.sessions.size && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    for (const { session } of this.sessions.values()) session.end();
    await this.peerCancels?.stop();
    await this.peerSchemaChanges?.stop();
    await this.discovery.stop();
  }

  /**
   * Scale to zero, the way back: a client of a database whose shard group is
   * inactive asks for it to run again (an event its agents act on); the client
   * waits in the buffer (authentication, then its first query) meanwhile.
   */
  private wake(database: string): void {
    const group = this.discovery.group(database);
    if (group === undefined || !this.discovery.inactive(group) || this.discovery.holdReason(group) !== undefined || this.waking.has(group)) return;
    this.waking.add(group);
    activations.inc({ why: 'wake' });
    this.publishActivation(group, true, 'a client connected')
      .then(() => this.discovery.waitUntil(() => !this.discovery.inactive(group), this.opts.bufferWindowMs))
      .catch((err) => this.log.warn({ err, database: group }, 'could not ask for the database to wake'))
      .finally(() => this.waking.delete(group));
  }

  /** Asks for every database (with instances of its own) without a session here for idleMs to scale to zero. */
  private deactivateIdle(idleMs: number): void {
    const now = Date.now();
    for (const [database, db] of this.discovery.topology.databases) {
      if (db.dropped || db.hostedOn !== null || this.discovery.inactive(database) || this.waking.has(database)) continue;
      const use = this.groupUse.get(database);
      if (use?.sessions || now - Math.max(use?.lastUsed ?? 0, this.startedAt) < idleMs) continue;
      activations.inc({ why: 'idle' });
      this.groupUse.set(database, { sessions: 0, lastUsed: now }); // asked once; asked again only after another idle period
      this.publishActivation(database, false, `no session for ${idleMs} ms on ${this.id}`)
        .catch((err) => this.log.warn({ err, database }, 'could not ask for an idle database to scale to zero'));
    }
  }

  private async publishActivation(database: string, active: boolean, reason: string): Promise<void> {
    const e: TopologyEvent = { eventId: randomUUID(), ts: new Date(), source: `gateway/${this.id}`, payload: payload('DatabaseActivationChanged', { database, active, reason, held: false }) };
    await this.publishTopology([{ key: topologyKey(e), value: e }]);
    this.log.info({ database, active, reason }, active ? 'asked for the database to wake' : 'asked for the database to scale to zero');
  }

  /** Publishes DDL a sharded session ran; the DDL is done whatever Kafka says, so a failure is logged and counted, not sent to the client. */
  private recordSchemaChange(change: SchemaChangeRecord): void {
    const e: SchemaChange = { eventId: randomUUID(), ts: new Date(), source: `gateway/${this.id}`, ...change };
    if (change.outcome === 'FAILED') this.log.warn({ database: change.database, failedShards: change.failedShards, statement: change.statement }, 'DDL failed on some shards: they differ now');
    // One chain: the events keep the order the DDL ran in (within a session, and a commit's several).
    this.schemaChangesPublished = this.schemaChangesPublished.then(() => this.publishSchemaChange([{ key: change.database, value: e }])).then(
      () => schemaChanges.inc({ outcome: change.outcome, published: 'yes' }),
      (err: Error) => {
        schemaChanges.inc({ outcome: change.outcome, published: 'no' });
        this.log.error({ err, change }, 'could not record a schema change on Kafka');
      });
  }

  /** Drains the sessions of a dropped database, or of every database of a deactivated shard group. */
  private leaveDatabase(gone: DatabaseGone): void {
    const hint = gone.why !== 'deactivated' ? undefined
      : this.discovery.holdReason(gone.database) !== undefined ? HELD_HINT : 'Reconnect: the database wakes for the next connection.';
    const why = new PgError('FATAL', SQLSTATE.ADMIN_SHUTDOWN, `terminating connection because database "${gone.database}" was ${gone.why}`, undefined, hint);
    let ended = 0;
    for (const { session } of this.sessions.values()) {
      const affected = gone.why === 'dropped' ? session.database === gone.database : this.discovery.group(session.database) === gone.database;
      if (!affected) continue;
      ended++;
      session.leaveDatabase(why);
    }
    this.log.info({ ...gone, sessions: ended }, `database ${gone.why}; its sessions leave at their next idle point`);
  }

  /** Ends the sessions caught mid-work on a primary the cluster has replaced (see GatewaySession.leaveReplacedPrimary). */
  private leaveReplacedPrimary(move: PrimaryMove): void {
    const ended: Record<FailoverOutcome, number> = { in_flight: 0, in_transaction: 0 };
    for (const { session } of this.sessions.values()) {
      const outcome = session.leaveReplacedPrimary(move);
      if (outcome) ended[outcome]++;
    }
    this.log.info({ ...move, term: String(move.term), endedInFlight: ended.in_flight, endedInTransaction: ended.in_transaction },
      'shard primary replaced; sessions mid-work on the old one ended');
  }

  private async onConnection(socket: net.Socket): Promise<void> {
    socket.on('error', () => socket.destroy());
    if (this.draining) {
      socket.end(errorResponse(new PgError('FATAL', SQLSTATE.CANNOT_CONNECT_NOW, 'the gateway is shutting down')));
      return;
    }
    // A new client costs its socket and, until it idles, a pooler connection: refuse it cleanly
    // rather than let the process run out of descriptors (EMFILE) for everyone.
    if (this.open >= this.maxClients || this.open + openLinks() + 2 > this.fdBudget) {
      tooMany.inc();
      socket.end(errorResponse(new PgError('FATAL', SQLSTATE.TOO_MANY_CONNECTIONS, 'sorry, too many clients already')));
      return;
    }
    this.open++;
    socket.once('close', () => this.open--);
    const client = await acceptClient(socket, {
      tls: this.opts.tls,
      requireTls: this.opts.requireTls,
      lookupVerifier: (user, database) => {
        this.wake(database.split('@')[0]);
        return this.verifier(user, database);
      },
      refusal: (database) => {
        const name = database.split('@')[0];
        const held = this.discovery.holdReason(name);
        if (held === undefined) return undefined;
        refusedHeld.inc();
        return new PgError('FATAL', SQLSTATE.CANNOT_CONNECT_NOW, `database "${name}" is deactivated and held stopped: ${held}`, undefined, HELD_HINT);
      },
      onCancel: (pid, secret) => this.cancel(pid, secret),
    }).catch((err) => {
      this.log.warn({ err }, 'client startup failed');
      return null;
    });
    if (!client) {
      accepted.inc({ outcome: 'refused' });
      return;
    }
    const key = this.newKey();
    // A sharded database's sessions plan every statement, and so do those of a database whose tables a
    // workflow moves (routing rules, decision 0039); the others relay bytes (nothing parsed).
    const database = (client.params.database ?? client.params.user).split('@')[0];
    const session = this.discovery.topology.databases.get(database)?.sharded || movedTablesOf(this.discovery.topology, database)
      ? new ShardedSession(client.socket as net.Socket, client.params, {
        discovery: this.discovery, bufferWindowMs: this.opts.bufferWindowMs, key, twopc: this.twopc,
        recordSchemaChange: (c) => this.recordSchemaChange(c), onSchemaChange: this.opts.onSchemaChange, readOnlyToReplicas: this.opts.readOnlyToReplicas,
      })
      : new GatewaySession(client.socket as net.Socket, client.params, {
        discovery: this.discovery, bufferWindowMs: this.opts.bufferWindowMs, key, readOnlyToReplicas: this.opts.readOnlyToReplicas, databases: this.databases,
        onSchemaChange: this.opts.onSchemaChange,
      });
    this.sessions.set(key.pid, { session, secret: key.secret });
    clientsGauge.inc();
    const group = this.discovery.group(session.database);
    const use = group === undefined ? undefined : this.groupUse.get(group) ?? { sessions: 0, lastUsed: 0 };
    if (use) {
      use.sessions++;
      this.groupUse.set(group!, use);
    }
    client.socket.once('close', () => {
      this.sessions.delete(key.pid);
      clientsGauge.dec();
      if (use) {
        use.sessions--;
        use.lastUsed = Date.now();
      }
    });
    try {
      await session.start(client.pending);
      accepted.inc({ outcome: 'ok' });
    } catch (err) {
      accepted.inc({ outcome: 'error' });
      const e = err instanceof PgError ? new PgError('FATAL', err.code, err.message, err.detail, err.hint) : new PgError('FATAL', SQLSTATE.CONNECTION_FAILURE, (err as Error).message);
      client.socket.end(errorResponse(e));
    }
  }

  /**
   * A key this gateway gave out cancels here; any other may belong to another
   * gateway (clients may reach any of them), so it goes to all of them through Kafka.
   */
  private cancel(pid: number, secret: number): void {
    if (this.cancelLocal(pid, secret)) {
      cancels.inc({ where: 'local' });
      return;
    }
    cancels.inc({ where: 'forwarded' });
    this.publishCancel([{ key: String(pid), value: { pid, secret, receivedBy: this.id, ts: new Date() } }])
      .catch((err) => this.log.warn({ err }, 'could not forward a cancel request to the other gateways'));
  }

  private cancelLocal(pid: number, secret: number): boolean {
    const s = this.sessions.get(pid);
    if (!s || s.secret !== secret) return false;
    s.session.cancel();
    return true;
  }

  private newKey(): { pid: number; secret: number } {
    for (;;) {
      const pid = randomInt(1, 2 ** 31 - 1);
      if (!this.sessions.has(pid)) return { pid, secret: randomInt(-(2 ** 31), 2 ** 31 - 1) };
    }
  }

  /**
   * A database the topology already knows cannot be created again (not even on
   * another shard group), and one with instances of its own is not dropped by
   * SQL from inside another: its instances would stay (`mg database drop` removes both).
   */
  private refuseDatabaseDdl(ddl: DatabaseDdl, from: string): PgError | undefined {
    const known = this.discovery.topology.databases.get(ddl.name);
    if (!known || known.dropped) return undefined;
    if (ddl.op === 'create' && this.discovery.hasDatabase(ddl.name)) {
      databaseDdl.inc({ op: ddl.op, outcome: 'refused' });
      return new PgError('ERROR', SQLSTATE.DUPLICATE_DATABASE, `database "${ddl.name}" already exists`,
        known.hostedOn === null ? undefined : `It is hosted on the instances of "${known.hostedOn}".`);
    }
    if (ddl.op === 'drop' && known.hostedOn === null) {
      databaseDdl.inc({ op: ddl.op, outcome: 'refused' });
      return new PgError('ERROR', SQLSTATE.OBJECT_IN_USE, `database "${ddl.name}" has instances of its own and cannot be dropped from "${from}"`,
        undefined, `Use: mg database drop ${ddl.name} --yes`);
    }
    return undefined;
  }

  /**
   * Postgres created or dropped the database on the shard group of `from`: the
   * topology says so (a database hosted on that group), and this gateway waits
   * until its own view has it. Other gateways follow within their topology lag.
   */
  private async recordDatabaseDdl(ddl: DatabaseDdl, from: string): Promise<void> {
    const group = this.discovery.group(from);
    const known = this.discovery.topology.databases.get(ddl.name);
    let event: TopologyEvent['payload'];
    if (ddl.op === 'create') {
      if (group === undefined || this.discovery.hasDatabase(ddl.name)) return;
      event = payload('DatabaseCreated', { database: ddl.name, durabilityPolicy: null, hostedOn: group, sharded: false, transactionMode: null });
    } else {
      // Only a database hosted on this group: a same-named one elsewhere is another database.
      if (!known || known.dropped || known.hostedOn !== group) return;
      event = payload('DatabaseDropped', { database: ddl.name });
    }
    const e: TopologyEvent = { eventId: randomUUID(), ts: new Date(), source: `gateway/${this.id}`, payload: event };
    await this.publishTopology([{ key: topologyKey(e), value: e }]);
    const seen = await this.discovery.waitUntil(() => this.discovery.hasDatabase(ddl.name) === (ddl.op === 'create'), 10_000);
    databaseDdl.inc({ op: ddl.op, outcome: seen ? 'recorded' : 'not_seen' });
    this.log.info({ database: ddl.name, op: ddl.op, group, seen }, 'database recorded in the topology');
  }

  /** The role's verifier from pg_authid on the database's primary (or a replica), through its pooler. */
  private async readVerifier(user: string, requested: string): Promise<string | null> {
    // Like Postgres, authenticate first and report an unknown database after (3D000), so the
    // answer does not reveal which databases exist; roles of an unknown one come from the first.
    const database = this.discovery.hasDatabase(requested) ? requested : this.discovery.databases()[0];
    if (database === undefined) return null;
    const shard = this.discovery.shards(database)[0]?.shard;
    const ep = shard !== undefined
      ? (this.discovery.primary(database, shard) ?? this.discovery.replicas(database, shard)[0]
        ?? (await this.discovery.waitForPrimary(database, shard, this.opts.bufferWindowMs)))
      : undefined;
    if (!ep) throw new PgError('FATAL', SQLSTATE.CANNOT_CONNECT_NOW, `no instance of ${database} can authenticate clients now`);
    const client = new pg.Client({ host: ep.host, port: ep.port, user: this.opts.authUser, database, application_name: 'mg-gateway-auth' });
    await client.connect();
    try {
      const { rows } = await client.query(VERIFIER_SQL, [user]);
      return verifierFromAuthid(rows[0]);
    } finally {
      await client.end();
    }
  }
}

/** MG_TWOPC_FAULT_POINT, the fault tests' hook (docs/twopc.md "Fault points"); an unknown step is refused loudly rather than ignored. */
function twopcFaultPoint(log: Logger): FaultPoint | undefined {
  const step = process.env.MG_TWOPC_FAULT_POINT;
  if (!step) return undefined;
  if (!(FAULT_POINTS as readonly string[]).includes(step)) throw new Error(`MG_TWOPC_FAULT_POINT=${step}: not one of ${FAULT_POINTS.join(', ')}`);
  log.warn({ faultPoint: step }, 'two-phase commits stop at a fault point (test hook MG_TWOPC_FAULT_POINT)');
  return step as FaultPoint;
}
