/** The event contract: schemas, codecs, topic catalog and the topology fold. */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { topics, valueSubject, type TopicName } from './catalog.ts';
import { AvroCodec } from './codec/confluent.ts';
import type { SchemaRegistryClient } from './codec/registry.ts';
import type { AgentCommand, AgentCommandResult, BackupEvent, CdcStreamStatus, GatewayCancel, HealthEvent, OrchEvent, SchemaChange, TopologyEvent, WorkflowEvent } from './generated/types.ts';

export * from './catalog.ts';
export * from './topology.ts';
export * from './durability.ts';
export * from './consensus.ts';
export * from './twopc.ts';
export * from './backup.ts';
export * from './vschema/index.ts';
export * from './workflow.ts';
export * from './internal.ts';
export * from './generated/types.ts';
export { AvroCodec, DecodeError, EncodeError } from './codec/confluent.ts';
export { SchemaRegistryClient, RegistryError } from './codec/registry.ts';
export { parseAvro } from './codec/avro.ts';

const avroDir = path.join(path.dirname(fileURLToPath(import.meta.url)), 'avro');

export function schemaText(file: string): string {
  return fs.readFileSync(path.join(avroDir, file), 'utf8');
}

/** The value type carried by each Avro topic of the catalog. */
export interface TopicValues {
  topology: TopologyEvent;
  health: HealthEvent;
  agentCommands: AgentCommand;
  agentResults: AgentCommandResult;
  gatewayCancels: GatewayCancel;
  cdcStatus: CdcStreamStatus;
  orchEvents: OrchEvent;
  backups: BackupEvent;
  workflows: WorkflowEvent;
  schemaChanges: SchemaChange;
}

/** The codec of a catalog topic's values; `topicName` is the topic's actual (maybe prefixed) name. */
export function codecFor<K extends keyof TopicValues>(
  registry: SchemaRegistryClient, topic: K, topicName: string = topics[topic].name,
): AvroCodec<TopicValues[K]> {
  return new AvroCodec<TopicValues[K]>(registry, valueSubject(topicName), schemaText(topics[topic as TopicName].valueSchema!));
}
