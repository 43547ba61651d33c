/**
 * Schema registry state, kept in the compacted `_schemas` topic with
 * Confluent's record layout (JSON keys and values), so the log alone rebuilds it.
 */
import type avro from 'avsc';
import { parseAvro } from '../../schemas/index.ts';

export type Compatibility = 'NONE' | 'BACKWARD' | 'BACKWARD_TRANSITIVE' | 'FORWARD' | 'FORWARD_TRANSITIVE' | 'FULL' | 'FULL_TRANSITIVE';
export const COMPATIBILITY_LEVELS: Compatibility[] = ['NONE', 'BACKWARD', 'BACKWARD_TRANSITIVE', 'FORWARD', 'FORWARD_TRANSITIVE', 'FULL', 'FULL_TRANSITIVE'];

export interface SchemaVersion { subject: string; version: number; id: number; schema: string; deleted: boolean }

export type StoreRecord =
  | { key: { keytype: 'SCHEMA'; subject: string; version: number; magic: 1 }; value: SchemaVersion | null }
  | { key: { keytype: 'CONFIG'; subject: string | null; magic: 0 }; value: { compatibilityLevel: Compatibility } | null };

/** A client error with Confluent's HTTP status and error code. */
export class RegistryHttpError extends Error {
  constructor(readonly status: number, readonly errorCode: number, message: string) {
    super(message);
  }
}

export function normalize(schema: string): string {
  try {
    const text = JSON.stringify(JSON.parse(schema));
    parseAvro(text);
    return text;
  } catch (err) {
    throw new RegistryHttpError(422, 42201, `Invalid schema: ${(err as Error).message}`);
  }
}

export class RegistryStore {
  private versions = new Map<string, SchemaVersion[]>(); // subject -> versions by number
  private schemasById = new Map<number, string>();
  private idsBySchema = new Map<string, number>();
  private config = new Map<string | null, Compatibility>();

  /** Applies one record of the `_schemas` log; replays are idempotent. */
  apply(rec: StoreRecord): void {
    if (rec.key.keytype === 'CONFIG') {
      if (rec.value) this.config.set(rec.key.subject, (rec.value as { compatibilityLevel: Compatibility }).compatibilityLevel);
      else this.config.delete(rec.key.subject);
      return;
    }
    const v = rec.value as SchemaVersion | null;
    if (!v) return;
    const list = this.versions.get(v.subject) ?? [];
    list[v.version - 1] = v;
    this.versions.set(v.subject, list);
    this.schemasById.set(v.id, v.schema);
    this.idsBySchema.set(v.schema, v.id);
  }

  subjects(): string[] {
    return [...this.versions.keys()].filter((s) => this.live(s).length > 0).sort();
  }

  live(subject: string): SchemaVersion[] {
    return (this.versions.get(subject) ?? []).filter((v) => v && !v.deleted);
  }

  version(subject: string, version: string): SchemaVersion {
    const live = this.live(subject);
    if (live.length === 0) throw new RegistryHttpError(404, 40401, `Subject '${subject}' not found.`);
    if (version === 'latest' || version === '-1') return live[live.length - 1];
    const n = Number(version);
    if (!Number.isInteger(n) || n < 1) throw new RegistryHttpError(422, 42202, `The specified version '${version}' is not a valid version id.`);
    const v = live.find((x) => x.version === n);
    if (!v) throw new RegistryHttpError(404, 40402, `Version ${n} not found.`);
    return v;
  }

  schemaById(id: number): string {
    const s = this.schemasById.get(id);
    if (s === undefined) throw new RegistryHttpError(404, 40403, `Schema ${id} not found`);
    return s;
  }

  find(subject: string, normalized: string): SchemaVersion | undefined {
    return this.live(subject).find((v) => v.schema === normalized);
  }

  compatibility(subject: string | null): Compatibility {
    return (subject !== null ? this.config.get(subject) : undefined) ?? this.config.get(null) ?? 'BACKWARD';
  }

  hasConfig(subject: string): boolean {
    return this.config.has(subject);
  }

  /** Reasons the candidate breaks the subject's compatibility level (empty: compatible). */
  incompatibilities(subject: string, candidate: string, against?: SchemaVersion[]): string[] {
    const level = this.compatibility(subject);
    if (level === 'NONE') return [];
    const live = this.live(subject);
    const others = against ?? (level.endsWith('TRANSITIVE') ? live : live.slice(-1));
    const next = parseAvro(candidate);
    const problems: string[] = [];
    for (const old of others) {
      const prev = parseAvro(old.schema);
      if (level.startsWith('BACKWARD') || level.startsWith('FULL')) check(next, prev, `new schema cannot read data written with version ${old.version}`, problems);
      if (level.startsWith('FORWARD') || level.startsWith('FULL')) check(prev, next, `version ${old.version} cannot read data written with the new schema`, problems);
    }
    return problems;
  }

  /** The next version record for a new schema under a subject (ids are shared across subjects). */
  nextVersion(subject: string, normalized: string): SchemaVersion {
    const all = this.versions.get(subject) ?? [];
    const id = this.idsBySchema.get(normalized) ?? Math.max(0, ...this.schemasById.keys()) + 1;
    return { subject, version: all.length + 1, id, schema: normalized, deleted: false };
  }
}

function check(reader: avro.Type, writer: avro.Type, what: string, problems: string[]): void {
  try {
    reader.createResolver(writer);
  } catch (err) {
    problems.push(`${what}: ${(err as Error).message}`);
  }
}
