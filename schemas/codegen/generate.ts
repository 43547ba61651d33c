/**
 * Generates TypeScript types from the .avsc files, so the types cannot drift
 * from the contract (a unit test regenerates and compares).
 * Mapping follows schemas/codec/avro.ts: long -> bigint, timestamp-millis -> Date,
 * unions unwrapped unless two branches share an avsc bucket (then wrapped as
 * `{ 'full.Name': value }`, avsc's wrapUnions 'auto').
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

type Schema = string | Schema[] | { [k: string]: any };

const here = path.dirname(fileURLToPath(import.meta.url));
export const avroDir = path.join(here, '..', 'avro');
export const generatedFile = path.join(here, '..', 'generated', 'types.ts');

const PRIMITIVES: Record<string, string> = {
  null: 'null', boolean: 'boolean', int: 'number', long: 'bigint',
  float: 'number', double: 'number', bytes: 'Buffer', string: 'string',
};

class Generator {
  private out: string[] = [];
  private named = new Map<string, string>(); // full name -> avsc bucket

  run(schema: Schema, namespace = ''): string {
    return this.typeOf(schema, namespace);
  }

  declarations(): string {
    return this.out.join('\n');
  }

  private fullName(name: string, namespace: string): string {
    return name.includes('.') || !namespace ? name : `${namespace}.${name}`;
  }

  private shortName(full: string): string {
    return full.slice(full.lastIndexOf('.') + 1);
  }

  private bucket(schema: Schema, namespace: string): string {
    if (typeof schema === 'string') {
      if (schema in PRIMITIVES) return { int: 'number', long: 'abstract:long', float: 'number', double: 'number' }[schema] ?? schema;
      return this.named.get(this.fullName(schema, namespace)) ?? 'object';
    }
    if (Array.isArray(schema)) return 'union';
    if (schema.logicalType === 'timestamp-millis') return 'logical';
    switch (schema.type) {
      case 'record': case 'map': case 'error': return 'object';
      case 'enum': return 'string';
      case 'fixed': return 'buffer';
      default: return this.bucket(schema.type, namespace);
    }
  }

  private typeOf(schema: Schema, namespace: string): string {
    if (typeof schema === 'string') {
      if (schema in PRIMITIVES) return PRIMITIVES[schema];
      return this.shortName(this.fullName(schema, namespace));
    }
    if (Array.isArray(schema)) return this.union(schema, namespace);
    if (schema.logicalType === 'timestamp-millis') return 'Date';
    switch (schema.type) {
      case 'record': case 'error': return this.record(schema, namespace);
      case 'enum': return this.enumeration(schema, namespace);
      case 'array': return `Array<${this.typeOf(schema.items, namespace)}>`;
      case 'map': return `Record<string, ${this.typeOf(schema.values, namespace)}>`;
      case 'fixed': return 'Buffer';
      default: return this.typeOf(schema.type, namespace);
    }
  }

  private union(branches: Schema[], namespace: string): string {
    const buckets = branches.map((b) => this.bucket(b, namespace));
    const wrapped = new Set(buckets).size !== buckets.length;
    return branches
      .map((b) => {
        const t = this.typeOf(b, namespace);
        if (!wrapped || t === 'null') return t;
        const name = typeof b === 'object' && !Array.isArray(b) && b.name ? this.fullName(b.name, b.namespace ?? namespace) : String(b);
        return `{ '${name}': ${t} }`;
      })
      .join(' | ');
  }

  private record(schema: { [k: string]: any }, namespace: string): string {
    const full = this.fullName(schema.name, schema.namespace ?? namespace);
    const ns = full.slice(0, full.lastIndexOf('.'));
    this.named.set(full, 'object');
    const fields = schema.fields.map((f: any) => {
      const doc = f.doc ? `  /** ${f.doc} */\n` : '';
      return `${doc}  ${f.name}: ${this.typeOf(f.type, ns)};`;
    });
    const doc = schema.doc ? `/** ${schema.doc} */\n` : '';
    this.out.push(`${doc}export interface ${this.shortName(full)} {\n${fields.join('\n')}\n}\n`);
    return this.shortName(full);
  }

  private enumeration(schema: { [k: string]: any }, namespace: string): string {
    const full = this.fullName(schema.name, schema.namespace ?? namespace);
    this.named.set(full, 'string');
    this.out.push(`export type ${this.shortName(full)} = ${schema.symbols.map((s: string) => `'${s}'`).join(' | ')};\n`);
    return this.shortName(full);
  }
}

export function generateTypes(): string {
  const gen = new Generator();
  for (const file of fs.readdirSync(avroDir).filter((f) => f.endsWith('.avsc')).sort()) {
    gen.run(JSON.parse(fs.readFileSync(path.join(avroDir, file), 'utf8')));
  }
  return `// Generated from schemas/avro/*.avsc by \`npm run schemas:generate\`. Do not edit.\n\n${gen.declarations()}`;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  fs.writeFileSync(generatedFile, generateTypes());
  console.log(`wrote ${path.relative(process.cwd(), generatedFile)}`);
}
