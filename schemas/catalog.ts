/**
 * The topic catalog: every topic the platform uses, how it is partitioned and
 * retained, and which Avro schema its values carry. `mg cluster up` creates
 * these idempotently; components refer to topics only through this table.
 */
export interface TopicSpec {
  name: string;
  partitions: number;
  /** `compact` keeps the latest value per key forever; `delete` drops by age. */
  cleanupPolicy: 'compact' | 'delete';
  retentionMs: number;
  /** The .avsc file (in schemas/avro) of the values, or null for raw bytes. */
  valueSchema: string | null;
  doc: string;
}

const HOUR = 3_600_000;
const DAY = 24 * HOUR;

export const topics = {
  topology: {
    name: 'mg.topology.v1',
    partitions: 1, // one partition: every consumer sees topology changes in one total order
    cleanupPolicy: 'compact',
    retentionMs: -1,
    valueSchema: 'topology.avsc',
    doc: 'Cells, databases, shards, instances, serving states and primaries; keyed by entity aspect (see topologyKey).',
  },
  health: {
    name: 'mg.health.v1',
    partitions: 3,
    cleanupPolicy: 'delete',
    retentionMs: 6 * HOUR,
    valueSchema: 'health.avsc',
    doc: 'Heartbeats of the ingest agents, keyed by instance id.',
  },
  agentCommands: {
    name: 'mg.agent.commands.v1',
    partitions: 3,
    cleanupPolicy: 'delete',
    retentionMs: 7 * DAY,
    valueSchema: 'agent-command.avsc',
    doc: 'Requests to agents, keyed by the instance id they address.',
  },
  agentResults: {
    name: 'mg.agent.results.v1',
    partitions: 3,
    cleanupPolicy: 'delete',
    retentionMs: 7 * DAY,
    valueSchema: 'agent-command-result.avsc',
    doc: 'Outcomes of agent commands, keyed by instance id; commandId links them to the request.',
  },
  gatewayCancels: {
    name: 'mg.gateway.cancels.v1',
    partitions: 1,
    cleanupPolicy: 'delete',
    retentionMs: HOUR,
    valueSchema: 'gateway-cancel.avsc',
    doc: 'CancelRequests forwarded between gateways (a client may cancel through any gateway); short-lived.',
  },
  cdcStatus: {
    name: 'mg.cdc.status.v1',
    partitions: 1,
    cleanupPolicy: 'compact',
    retentionMs: -1,
    valueSchema: 'cdc-status.avsc',
    doc: 'State of each change stream (snapshot progress, confirmed LSN, slot lag, events/s), keyed by <database>/<shard>.',
  },
  orchEvents: {
    name: 'mg.orch.events.v1',
    partitions: 1, // one partition: every orchestrator folds recovery leases in the same order
    cleanupPolicy: 'delete',
    retentionMs: 30 * DAY,
    valueSchema: 'orch-event.avsc',
    doc: 'What orchestrators saw, decided and did per shard (failovers, switchovers, leases), keyed by db/shard.',
  },
  backups: {
    name: 'mg.backups.v1',
    partitions: 1,
    cleanupPolicy: 'delete',
    retentionMs: 90 * DAY,
    valueSchema: 'backup-event.avsc',
    doc: 'Backups of each shard (started, progress, completed with LSN range, size and duration, failed with the reason), keyed by <database>/<shard>.',
  },
  workflows: {
    name: 'mg.workflows.v1',
    partitions: 1, // one partition: a workflow's command, status and VDiff events keep their order
    cleanupPolicy: 'compact',
    retentionMs: -1,
    valueSchema: 'workflow-event.avsc',
    doc: 'Materializer workflows (MoveTables): definition, operator commands, phase and progress, VDiff reports; keyed workflow/<name>[/aspect].',
  },
  schemaChanges: {
    name: 'mg.schema.changes.v1',
    partitions: 1,
    cleanupPolicy: 'delete',
    retentionMs: 90 * DAY,
    valueSchema: 'schema-change.avsc',
    doc: 'DDL run through a gateway on every shard of a sharded database, with its outcome per shard; keyed by database.',
  },
  deadLetter: {
    name: 'mg.dead-letter.v1',
    partitions: 1,
    cleanupPolicy: 'delete',
    retentionMs: 30 * DAY,
    valueSchema: null,
    doc: 'Messages no consumer could decode: the original key and bytes, with headers naming the source topic, partition, offset and error.',
  },
  schemas: {
    name: '_schemas',
    partitions: 1,
    cleanupPolicy: 'compact',
    retentionMs: -1,
    valueSchema: null,
    doc: "The schema registry's storage (Confluent's layout: JSON keys and values).",
  },
} as const satisfies Record<string, TopicSpec>;

export type TopicName = keyof typeof topics;

/** Schema-registry subject of a topic's values (Confluent's TopicNameStrategy). */
export function valueSubject(topic: string): string {
  return `${topic}-value`;
}
