// Generated from schemas/avro/*.avsc by `npm run schemas:generate`. Do not edit.

export type CommandStatus = 'SUCCEEDED' | 'FAILED' | 'REJECTED';

export interface AgentCommandResult {
  commandId: string;
  instanceId: string;
  ts: Date;
  status: CommandStatus;
  message: string;
  durationMs: bigint;
}

export type AgentAction = 'START_POSTGRES' | 'STOP_POSTGRES' | 'RESTART_POSTGRES' | 'REPORT_HEALTH' | 'CDC_START' | 'CDC_STOP' | 'CDC_STATUS' | 'RECRUIT' | 'PROMOTE' | 'REPOINT' | 'BOOTSTRAP' | 'BACKUP_CREATE' | 'BACKUP_INFO' | 'BACKUP_VERIFY' | 'BACKUP_EXPIRE' | 'BACKUP_CHECK' | 'CREATE_DATABASE' | 'DROP_DATABASE' | 'RESTORE_IN_PLACE';

/** A request to the agent of one instance. Agents act on commands addressed to them and answer with an AgentCommandResult carrying the same commandId. */
export interface AgentCommand {
  commandId: string;
  instanceId: string;
  issuedAt: Date;
  issuedBy: string;
  action: AgentAction;
  args: Record<string, string>;
}

export type BackupState = 'STARTED' | 'PROGRESS' | 'COMPLETED' | 'FAILED';

export type BackupType = 'FULL' | 'DIFF' | 'INCR';

/** One step of one pgBackRest backup of a shard (its stanza), published by the agent that runs it. Keyed by <database>/<shard>; every backup's events share backupId. */
export interface BackupEvent {
  /** Links the events of one backup (the agent command's id). */
  backupId: string;
  database: string;
  shard: string;
  stanza: string;
  /** The instance whose agent runs the backup. */
  instanceId: string;
  /** Files copied from a replica (backup-standby); the primary only starts and stops the backup. */
  fromStandby: boolean;
  ts: Date;
  state: BackupState;
  type: BackupType;
  /** pgBackRest's backup label, once completed. */
  label: null | string;
  startLsn: null | bigint;
  stopLsn: null | bigint;
  /** Database size the backup covers. */
  sizeBytes: null | bigint;
  /** What this backup added to the repository (compressed, only changed files for diff/incr). */
  repoSizeBytes: null | bigint;
  /** PROGRESS: bytes copied so far. */
  doneBytes: null | bigint;
  durationMs: null | bigint;
  /** FAILED: the reason. */
  error: null | string;
}

export type CdcStreamState = 'STARTING' | 'SNAPSHOTTING' | 'STREAMING' | 'STOPPED' | 'FAILED';

export interface CdcSnapshotProgress {
  tablesTotal: number;
  tablesDone: number;
  rows: bigint;
  rowsPerSecond: number;
  currentTable: null | string;
  startedAt: Date;
  finishedAt: null | Date;
}

/** The state of one change stream (one database shard), published by the agent of the shard's primary every second and on every state change. Keyed by <database>/<shard>; the topic is compacted, so the latest status per stream stays. */
export interface CdcStreamStatus {
  database: string;
  shard: string;
  /** The primary whose WAL the stream reads. */
  instanceId: string;
  /** The primary's term when the stream started. */
  term: bigint;
  ts: Date;
  state: CdcStreamState;
  slot: string;
  topicPrefix: string;
  /** Increases each time the stream starts over with a new slot and snapshot. */
  epoch: bigint;
  /** Confirmed to the slot: every change before it is acknowledged by Kafka. */
  confirmedLsn: null | bigint;
  receivedLsn: null | bigint;
  /** pg_current_wal_lsn() - confirmed_flush_lsn of the slot. */
  slotLagBytes: null | bigint;
  /** Age of the oldest commit not yet acknowledged by Kafka (0 when caught up). */
  slotLagSeconds: null | number;
  eventsTotal: bigint;
  eventsPerSecond: number;
  snapshot: null | CdcSnapshotProgress;
  /** Set while the slot lag exceeds maxSlotLagBytes. */
  alert: null | string;
  /** Why the stream failed (it retries). */
  error: null | string;
  /** When this instance took the stream over from another (failover, switchover): 'slot carried over from <instance> at <lsn>', or 're-snapshot: <why the slot could not be used>'. */
  resumedFrom: null | string;
}

/** A CancelRequest that reached a gateway which does not hold the session it names. Every gateway reads these; the one that gave out the key cancels the session's running query. */
export interface GatewayCancel {
  /** BackendKeyData process id the gateway gave the client. */
  pid: number;
  /** BackendKeyData secret key. */
  secret: number;
  /** Id of the gateway the CancelRequest arrived at. */
  receivedBy: string;
  ts: Date;
}

export type Role = 'PRIMARY' | 'REPLICA' | 'UNKNOWN';

/** A heartbeat from the ingest agent beside one Postgres instance. */
export interface HealthEvent {
  instanceId: string;
  database: string;
  shard: string;
  cell: string;
  ts: Date;
  /** Increases by one per heartbeat of this agent run. */
  sequence: bigint;
  /** False when the agent could not query Postgres within the probe timeout (down or hung). */
  reachable: boolean;
  /** From pg_is_in_recovery(); UNKNOWN when unreachable. */
  role: Role;
  /** pg_current_wal_lsn() on a primary. */
  currentLsn: null | bigint;
  /** Primary: WAL flushed locally. Replica: WAL received and flushed. */
  flushLsn: null | bigint;
  replayLsn: null | bigint;
  replayLagBytes: null | bigint;
  replayLagSeconds: null | number;
  /** host:port the replica streams from. */
  upstream: null | string;
  connections: number;
  maxConnections: number;
  postgresPid: null | number;
  agentVersion: string;
  /** Why Postgres is unreachable, when it is. */
  error: null | string;
  /** Added in version 2: pg_stat_wal_receiver.status on a replica. */
  walReceiverStatus: null | string;
  /** Added in version 3: on a primary running a change stream, the CDC slot's lag in bytes. */
  cdcSlotLagBytes: null | bigint;
  /** Added in version 3: age of the oldest commit the change stream has not yet had acknowledged by Kafka. */
  cdcSlotLagSeconds: null | number;
}

export type OrchEventKind = 'CLAIMED' | 'RELEASED' | 'OBSERVED' | 'DECIDED' | 'ACTED' | 'COMPLETED' | 'FAILED';

/** One thing an orchestrator saw, decided or did about a shard; the log of a failover can be replayed from these. */
export interface OrchEvent {
  eventId: string;
  ts: Date;
  /** Id of the orchestrator that wrote the event (orch-<cell>). */
  orchestrator: string;
  database: string;
  shard: string;
  /** CLAIMED/RELEASED: the shard's recovery lease; OBSERVED: what was seen; DECIDED: what was chosen; ACTED: a step done; COMPLETED/FAILED: the end of an operation. */
  kind: OrchEventKind;
  /** failover, switchover, bootstrap, repoint, policy. */
  operation: string;
  term: null | bigint;
  summary: string;
  details: Record<string, string>;
  /** Time the step or operation took. */
  durationMs: null | bigint;
  /** CLAIMED only: when the lease lapses unless released earlier. */
  leaseUntil: null | Date;
}

export type SchemaChangeOutcome = 'APPLIED' | 'FAILED';

/** DDL a gateway ran on every shard of a sharded database: what ran, where, and how it ended. A failed shard is named, so schema drift between shards is never silent. */
export interface SchemaChange {
  /** Unique id (UUID) of this event. */
  eventId: string;
  ts: Date;
  /** The gateway that ran it: gateway/<id>. */
  source: string;
  database: string;
  /** The session's user. */
  user: string;
  /** The statement's text as the client sent it. */
  statement: string;
  /** APPLIED: committed on every shard. FAILED: outside a transaction, an error on the shards in failedShards while the others ran it (the shards now differ). DDL in a transaction that fails or rolls back changes nothing and is not recorded. */
  outcome: SchemaChangeOutcome;
  /** The shards it ran on. */
  shards: Array<string>;
  failedShards: Array<string>;
  /** The first shard error, as the client was told. */
  error: null | string;
}

export interface CellRegistered {
  cell: string;
  region: null | string;
}

export interface DatabaseCreated {
  database: string;
  /** e.g. ANY_2, MULTI_CELL_ANY_2; null means the cluster default. */
  durabilityPolicy: null | string;
  /** The database whose shard group (instances) holds this one as a Postgres database of its own; null when it has instances of its own. */
  hostedOn: null | string;
  /** Rows are spread over the shards by the database's VSchema; the gateway plans every statement. */
  sharded: boolean;
  /** Default of SET mg.transaction_mode for its sessions: single, multi or twopc; null means multi. */
  transactionMode: null | string;
}

export interface DatabaseDropped {
  database: string;
}

export interface ShardDefined {
  database: string;
  /** Vitess-style name of the key range, e.g. '-' or '-80' or '80-'. */
  shard: string;
  /** Inclusive start of the keyspace-id range, lower-case hex; empty means unbounded. */
  keyRangeStart: string;
  /** Exclusive end, lower-case hex; empty means unbounded. */
  keyRangeEnd: string;
}

export type InstanceType = 'PRIMARY' | 'REPLICA' | 'RDONLY';

export interface InstanceRegistered {
  instanceId: string;
  database: string;
  shard: string;
  cell: string;
  host: string;
  port: number;
  /** The type the instance was created as; who is primary now is decided by PrimaryChanged. */
  type: InstanceType;
  agentMetricsPort: null | number;
  /** Port of the MultiPooler beside this instance, where the gateway connects; null when it has none. */
  poolerPort: null | number;
}

export interface InstanceDeregistered {
  instanceId: string;
  reason: string;
}

export type ServingState = 'SERVING' | 'NOT_SERVING' | 'DRAINED';

export interface ServingStateChanged {
  instanceId: string;
  state: ServingState;
  /** The shard's term the orchestrator acted in; consumers ignore a change older than the shard's primary term. Null from agents (start, stop), which know no term. */
  term: null | bigint;
}

export interface PrimaryChanged {
  database: string;
  shard: string;
  primaryInstanceId: string;
  /** Consensus term; consumers ignore events with a term older than the one they hold. */
  term: bigint;
  /** Number of the shard rule stored inside Postgres that made this primary. */
  ruleNumber: bigint;
  reason: string;
}

/** Whether a database with instances of its own should run (scale to zero). Its agents stop Postgres when it is inactive and start it when it is active again; its data and topology stay. Databases hosted on it follow it. */
export interface DatabaseActivationChanged {
  database: string;
  active: boolean;
  /** e.g. 'mg database deactivate', 'idle for 600000 ms', 'a client connected'. */
  reason: string;
  /** An inactive database held stopped by a declaration (mg database deactivate --hold, a MultigresDatabase's deactivated: true): the gateways refuse its clients (57P03) instead of waking it; only an activation runs it again. False for an idle scale to zero, which the next client wakes. */
  held: boolean;
}

/** The whole VSchema of a sharded database (docs/sharding.md); a newer version replaces the older. */
export interface VSchemaApplied {
  database: string;
  /** Grows by one per apply; consumers ignore an event older than the version they hold. */
  version: bigint;
  /** The validated VSchema as JSON (schemas/vschema/vschema.ts). */
  vschema: string;
}

export type RoutingState = 'SOURCE' | 'READS_TARGET' | 'WRITES_HELD' | 'TARGET';

/** Routing rule of a MoveTables workflow (decision 0039): which database serves the moved tables that clients name in the source database. A newer version replaces the older. */
export interface RoutingRuleChanged {
  workflow: string;
  /** Grows by one per change; consumers ignore an event older than the version they hold. */
  version: bigint;
  sourceDatabase: string;
  targetDatabase: string;
  /** schema.table names. */
  tables: Array<string>;
  /** SOURCE: everything to the source; READS_TARGET: reads outside transactions to the target, writes to the source; WRITES_HELD: gateways hold statements on the tables (the switch is in progress); TARGET: everything to the target. */
  state: RoutingState;
}

/** The shards of a database that serve its clients (decision 0056): while a reshard brings up a second shard set beside the first, gateways, the REST API and the materializer route by this set only. No event: every shard of the database serves. A newer version replaces the older. */
export interface ServingShardsChanged {
  database: string;
  /** Grows by one per change; consumers ignore an event older than the version they hold. */
  version: bigint;
  /** Shard names; together their key ranges cover the keyspace exactly once. */
  shards: Array<string>;
}

/** A shard retired (decision 0061): a reshard's old shard set after complete. Keyed like ShardDefined, so compaction keeps only this; consumers forget the shard and its primary, orchestrators stop managing it, and its instances are deregistered once their processes stopped. A ShardDefined of the same name later defines a new shard. */
export interface ShardDropped {
  database: string;
  shard: string;
  /** e.g. 'retired by reshard split'. */
  reason: string;
}

/** One change to the cluster's topology. The topology topic is compacted by key (see the catalog), so each event states the whole of one aspect of one entity. */
export interface TopologyEvent {
  /** Unique id (UUID) of this event, for deduplication. */
  eventId: string;
  ts: Date;
  /** Who emitted it: agent/<instance>, orchestrator/<cell>, mg-cli. */
  source: string;
  payload: { 'io.multigres.topology.CellRegistered': CellRegistered } | { 'io.multigres.topology.DatabaseCreated': DatabaseCreated } | { 'io.multigres.topology.DatabaseDropped': DatabaseDropped } | { 'io.multigres.topology.ShardDefined': ShardDefined } | { 'io.multigres.topology.InstanceRegistered': InstanceRegistered } | { 'io.multigres.topology.InstanceDeregistered': InstanceDeregistered } | { 'io.multigres.topology.ServingStateChanged': ServingStateChanged } | { 'io.multigres.topology.PrimaryChanged': PrimaryChanged } | { 'io.multigres.topology.DatabaseActivationChanged': DatabaseActivationChanged } | { 'io.multigres.topology.VSchemaApplied': VSchemaApplied } | { 'io.multigres.topology.RoutingRuleChanged': RoutingRuleChanged } | { 'io.multigres.topology.ServingShardsChanged': ServingShardsChanged } | { 'io.multigres.topology.ShardDropped': ShardDropped };
}

export type WorkflowType = 'MOVE_TABLES' | 'RESHARD' | 'MIGRATION' | 'MATERIALIZE';

export interface WorkflowCreated {
  /** RESHARD (decision 0056): source and target are one database, sourceShards its serving shard set and targetShards the set that takes over. MIGRATION (decision 0060): an online ALTER TABLE of the one table in tables, source and target its database. MATERIALIZE (decision 0058): tables names the one target table, query defines it. */
  type: WorkflowType;
  sourceDatabase: string;
  targetDatabase: string;
  /** schema.table names (public. when unqualified). */
  tables: Array<string>;
  /** RESHARD: the shards read from; null: the source database's serving shards. */
  sourceShards: null | Array<string>;
  /** RESHARD: the shards applied to; null: the target database's serving shards. */
  targetShards: null | Array<string>;
  /** MIGRATION: the ALTER TABLE statement as submitted. */
  ddl: null | string;
  /** MIGRATION: how long after the cut-over the old table is kept in step for a revert; then it is dropped. */
  revertSeconds: null | bigint;
  /** MIGRATION: cut over on the operator's SWITCH_TRAFFIC (mg migration cutover) rather than as soon as the shadow is caught up. */
  postponeCutOver: boolean;
  /** MATERIALIZE: the SELECT over one source table that defines the target table (decision 0058). */
  query: null | string;
}

export type WorkflowAction = 'START' | 'STOP' | 'CANCEL' | 'SWITCH_READS' | 'SWITCH_TRAFFIC' | 'REVERSE_TRAFFIC' | 'COMPLETE';

export interface WorkflowCommanded {
  action: WorkflowAction;
}

export type WorkflowPhase = 'COPYING' | 'RUNNING' | 'STOPPED' | 'CANCELLED' | 'FAILED' | 'SWITCHED' | 'COMPLETED' | 'REVERTED';

export interface PartitionOffset {
  topic: string;
  partition: number;
  offset: bigint;
}

export interface TableCopy {
  table: string;
  rowsCopied: bigint;
  /** The source's row estimate when the copy began. */
  rowsEstimated: bigint;
  /** JSON array of the primary-key values (text) of the last copied chunk's last row; the copy resumes after it. */
  lastKey: null | string;
  done: boolean;
  /** The source shard this entry copies from (a sharded source has one entry per table and shard); null: the unsharded source's one shard. */
  shard: null | string;
}

export interface WorkflowStatus {
  /** MIGRATION: SWITCHED once cut over (the old table kept in step), REVERTED after a revert. */
  phase: WorkflowPhase;
  /** FAILED: the reason; otherwise a note. */
  message: null | string;
  /** Where catch-up starts in the source's change topics: their ends, read before the first copy snapshot. */
  startOffsets: Array<PartitionOffset>;
  tables: Array<TableCopy>;
  rowsCopied: bigint;
  copyRowsPerSecond: number;
  /** Copy: time left at the current rate. */
  etaSeconds: null | number;
  /** Changes applied by the current stream: catch-up (source to target) until the writes switch, then reverse replication (target to source); it restarts at 0 at each write switch. */
  eventsApplied: bigint;
  /** Catch-up (RUNNING) or reverse replication (SWITCHED): age of the last applied change's commit (0 when nothing is waiting). */
  lagSeconds: null | number;
  /** SWITCHED: where reverse replication starts in the target's change topics: their ends when the writes switched to the target. */
  reverseOffsets: Array<PartitionOffset>;
  /** MIGRATION: when the cut-over happened (the revert window counts from it). */
  switchedAt: null | Date;
}

export interface VDiffRequested {
  id: string;
}

export type VDiffState = 'RUNNING' | 'COMPLETED' | 'FAILED';

export interface VDiffTable {
  table: string;
  sourceRows: bigint;
  targetRows: bigint;
  /** On the source, not on the target. */
  missing: bigint;
  /** On the target, not on the source (or on a shard its vindex does not name). */
  extra: bigint;
  different: bigint;
  /** A few of the rows found missing, extra or different. */
  examples: Array<string>;
}

export interface VDiffReported {
  id: string;
  state: VDiffState;
  /** The source WAL position both sides were compared at. */
  sourceLsn: null | bigint;
  tables: Array<VDiffTable>;
  durationMs: bigint;
  error: null | string;
}

/** One fact about one materializer workflow (MoveTables, ...). The workflows topic is compacted by key: workflow/<name> (definition), workflow/<name>/command (what the operator asked), workflow/<name>/status (phase and progress, from the materializer), workflow/<name>/vdiff (the last VDiff request or report); each event states the whole of its aspect. */
export interface WorkflowEvent {
  eventId: string;
  ts: Date;
  /** Who emitted it: mg-cli, materializer/<id>. */
  source: string;
  workflow: string;
  payload: { 'io.multigres.workflow.WorkflowCreated': WorkflowCreated } | { 'io.multigres.workflow.WorkflowCommanded': WorkflowCommanded } | { 'io.multigres.workflow.WorkflowStatus': WorkflowStatus } | { 'io.multigres.workflow.VDiffRequested': VDiffRequested } | { 'io.multigres.workflow.VDiffReported': VDiffReported };
}
