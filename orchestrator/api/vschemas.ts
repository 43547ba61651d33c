/** The VSchema of a sharded database: read it, or apply a new version (JSON or YAML), as `mg vschema` does through these routes. */
import YAML from 'yaml';
import { VSchemaError } from '../../schemas/index.ts';
import { json, type ApiPlugin } from '../api.ts';
import { OperationError } from '../operations.ts';
import { applyVSchema, showVSchema } from '../vschemas.ts';

const params = { type: 'object', required: ['name'], properties: { name: { type: 'string', pattern: '^[a-z_][a-z0-9_]{0,62}$' } } } as const;
const YAML_TYPES = ['application/yaml', 'application/x-yaml', 'text/yaml', 'text/x-yaml'];

/** `table orders, column tenant_id: vindex nope is not defined` -> the field and what is wrong with it. */
export function vschemaFaults(err: VSchemaError): Array<{ field: string; message: string }> {
  return err.message.split('\n').map((line) => {
    const at = line.indexOf(': ');
    return at < 0 ? { field: '(vschema)', message: line } : { field: line.slice(0, at), message: line.slice(at + 2) };
  });
}

export const vschemasApi: ApiPlugin = async (app, { eventLog, cfg }) => {
  app.addContentTypeParser(YAML_TYPES, { parseAs: 'string' }, (_req, body, done) => {
    try {
      done(null, YAML.parse(body as string));
    } catch (err) {
      done(Object.assign(new Error(`body: not YAML: ${(err as Error).message}`), { statusCode: 400 }), undefined);
    }
  });

  app.get<{ Params: { name: string } }>('/v1/databases/:name/vschema', {
    schema: { summary: 'The VSchema a sharded database serves with, and its version', tags: ['vschema'], params },
  }, async (req, reply) => {
    const held = await showVSchema(eventLog, req.params.name);
    if (!held) return reply.code(404).send({ error: `database ${req.params.name} has no VSchema` });
    return json({ database: req.params.name, version: held.version, vschema: held.vschema });
  });

  app.put<{ Params: { name: string }; Body: unknown }>('/v1/databases/:name/vschema', {
    schema: {
      summary: 'Apply a VSchema (JSON, or YAML with content-type application/yaml): validated, then published as the next version for every gateway',
      tags: ['vschema'], params,
      body: { type: 'object', description: 'vindexes, tables, sequences, routines (docs/sharding.md); validated by the VSchema contract, not here' },
    },
  }, async (req, reply) => {
    try {
      const { version } = await applyVSchema(eventLog, req.params.name, req.body, `orchestrator/${cfg.id}`);
      return json({ database: req.params.name, version });
    } catch (err) {
      if (err instanceof VSchemaError) {
        const fields = vschemaFaults(err);
        return reply.code(400).send({ error: `invalid VSchema: ${fields.map((f) => `${f.field}: ${f.message}`).join('; ')}`, fields });
      }
      if (err instanceof OperationError) return reply.code(err.status).send({ error: err.message });
      throw err;
    }
  });
};
