/**
 * Confluent wire format: magic byte 0, a 4-byte big-endian schema id, then the
 * Avro body. Decoding resolves the writer's schema (fetched by id) against the
 * reader's, which is how an event written with an older schema version is read
 * with the newer one.
 */
import type avro from 'avsc';
import { parseAvro } from './avro.ts';
import type { SchemaRegistryClient } from './registry.ts';

export class DecodeError extends Error {}
export class EncodeError extends Error {}

const MAGIC = 0;

export class AvroCodec<T> {
  readonly type: avro.Type;
  private id: Promise<number> | undefined;
  private resolvers = new Map<number, Promise<avro.Resolver | null>>();

  constructor(private readonly registry: SchemaRegistryClient, readonly subject: string, readonly schema: string) {
    this.type = parseAvro(schema);
  }

  /** The id of our schema, registered on first use. */
  schemaId(): Promise<number> {
    this.id ??= this.registry.register(this.subject, this.schema);
    this.id.catch(() => (this.id = undefined));
    return this.id;
  }

  async encode(value: T): Promise<Buffer> {
    const id = await this.schemaId();
    const header = Buffer.alloc(5);
    header.writeUInt8(MAGIC, 0);
    header.writeUInt32BE(id, 1);
    let body: Buffer;
    try {
      body = this.type.toBuffer(value);
    } catch {
      throw new EncodeError(`cannot encode a ${this.subject} value: ${this.problems(value).join('; ')}`);
    }
    return Buffer.concat([header, body]);
  }

  async decode(buf: Buffer): Promise<T> {
    if (buf.length < 5 || buf.readUInt8(0) !== MAGIC) throw new DecodeError('not in Confluent wire format (no magic byte 0)');
    const id = buf.readUInt32BE(1);
    const resolver = await this.resolverFor(id);
    try {
      return (resolver ? this.type.fromBuffer(buf.subarray(5), resolver) : this.type.fromBuffer(buf.subarray(5))) as T;
    } catch (err) {
      throw new DecodeError(`Avro body does not match schema id ${id}: ${(err as Error).message}`);
    }
  }

  /** Which fields of a value break the schema (only computed once encoding has failed). */
  private problems(value: unknown): string[] {
    const out: string[] = [];
    this.type.isValid(value, {
      errorHook: (path: string[], v: unknown, t: avro.Type) => {
        const shown = typeof v === 'bigint' ? `${v}n` : JSON.stringify(v) ?? String(v);
        out.push(`${path.join('.') || '(value)'} = ${shown} is not a valid ${t.typeName}`);
      },
    });
    return out.length ? out : ['value does not match the schema'];
  }

  private resolverFor(id: number): Promise<avro.Resolver | null> {
    let r = this.resolvers.get(id);
    if (!r) {
      r = (async () => {
        if (id === (await this.schemaId())) return null;
        const writer = parseAvro(await this.registry.schemaById(id).catch((e) => {
          throw new DecodeError(`unknown schema id ${id}: ${(e as Error).message}`);
        }));
        try {
          return this.type.createResolver(writer);
        } catch (err) {
          throw new DecodeError(`schema id ${id} cannot be read as ${this.subject}: ${(err as Error).message}`);
        }
      })();
      r.catch(() => this.resolvers.delete(id));
      this.resolvers.set(id, r);
    }
    return r;
  }
}
