/** Databases at run time: list, create (on an existing database's instances), drop, activate, deactivate, retire a shard set. */
import type { FastifyReply } from 'fastify';
import { runOperation, waitQuery, type ApiPlugin } from '../api.ts';

const NAME = { type: 'string', pattern: '^[a-z_][a-z0-9_]{0,62}$', description: 'lower-case letters, digits and _, not starting with a digit' } as const;
const nameParams = { type: 'object', required: ['name'], properties: { name: NAME } } as const;

export const databasesApi: ApiPlugin = async (app, { databases, operations }) => {
  const run = (reply: FastifyReply, wait: boolean, kind: string, target: string, check: () => void, work: (step: (m: string) => void) => Promise<void>) =>
    runOperation(operations, reply, wait, kind, target, check, work);

  app.get('/v1/databases', {
    schema: { summary: 'Every database: where it is hosted, its shards and instances, whether it is active (scale to zero)', tags: ['databases'] },
  }, async () => ({ databases: databases.list() }));

  app.get<{ Params: { name: string } }>('/v1/databases/:name', {
    schema: { summary: 'One database', tags: ['databases'], params: nameParams },
  }, async (req, reply) => databases.get(req.params.name) ?? reply.code(404).send({ error: `no database "${req.params.name}"` }));

  app.post<{ Body: { name: string; on?: string; shards?: number; replicas?: number; durability?: string }; Querystring: { wait: boolean } }>('/v1/databases', {
    schema: {
      summary: 'Create a database: `on` an existing one (a Postgres database inside its instances, served at once by the gateways)',
      tags: ['databases'], querystring: waitQuery,
      body: {
        type: 'object', additionalProperties: false, required: ['name'],
        properties: {
          name: NAME,
          on: { ...NAME, description: 'the database whose instances hold the new one' },
          shards: { type: 'integer', enum: [1, 2, 4, 8, 16, 32, 64, 128, 256], description: 'for a database with instances of its own' },
          replicas: { type: 'integer', minimum: 0, maximum: 8, description: 'per shard, for a database with instances of its own' },
          durability: { type: 'string', pattern: '^(MULTI_CELL_)?ANY_[1-9]$', description: 'ANY_<n> or MULTI_CELL_ANY_<n>' },
        },
      },
    },
  }, async (req, reply) => {
    const { name, on } = req.body;
    if (on === undefined) {
      return reply.code(501).send({
        error: 'a database with instances of its own is provisioned on this machine by the CLI (mg database create <name> --shards N --replicas M); the API creates databases on an existing one: give "on"',
      });
    }
    const extra = (['shards', 'replicas', 'durability'] as const).filter((f) => req.body[f] !== undefined);
    if (extra.length) {
      return reply.code(400).send({ error: extra.map((f) => `body.${f}: not with on (the database shares the instances, shards and durability of "${on}")`).join('; ') });
    }
    return run(reply, req.query.wait, 'create', name, () => databases.checkCreateOn(name, on), (step) => databases.createOn(name, on, step));
  });

  app.delete<{ Params: { name: string }; Querystring: { wait: boolean } }>('/v1/databases/:name', {
    schema: { summary: 'Drop a database created on another one: the gateways drain its sessions, then DROP DATABASE', tags: ['databases'], params: nameParams, querystring: waitQuery },
  }, async (req, reply) => {
    const { name } = req.params;
    return run(reply, req.query.wait, 'drop', name, () => databases.checkDrop(name), (step) => databases.drop(name, step));
  });

  app.post<{ Params: { name: string }; Body: { shards: string[]; reason?: string }; Querystring: { wait: boolean } }>('/v1/databases/:name/retire-shards', {
    schema: {
      summary: 'Retire a shard set that serves nothing (a reshard\'s old set after complete): ShardDropped, its instances stopped and deleted by the provisioner, then deregistered; backups stay',
      tags: ['databases'], params: nameParams, querystring: waitQuery,
      body: {
        type: 'object', additionalProperties: false, required: ['shards'],
        properties: {
          shards: { type: 'array', minItems: 1, uniqueItems: true, items: { type: 'string', pattern: '^[0-9a-f]*-[0-9a-f]*$' }, description: 'the set\'s shard names, e.g. ["-80", "80-"]' },
          reason: { type: 'string', minLength: 1, maxLength: 200, description: 'recorded on the ShardDropped and InstanceDeregistered events' },
        },
      },
    },
  }, async (req, reply) => {
    const { name } = req.params;
    const { shards, reason = 'retired through the admin API' } = req.body;
    return run(reply, req.query.wait, 'retire-shards', name, () => databases.checkRetireShards(name, shards), (step) => databases.retireShards(name, shards, reason, step));
  });

  app.post<{ Params: { name: string }; Querystring: { wait: boolean } }>('/v1/databases/:name/activate', {
    schema: {
      summary: 'Wake a database scaled to zero, held or not: its agents start Postgres; the gateways route to it as soon as a primary serves',
      tags: ['databases'], params: nameParams, querystring: waitQuery,
    },
  }, async (req, reply) => {
    const { name } = req.params;
    return run(reply, req.query.wait, 'activate', name, () => databases.checkActivation(name), (step) => databases.setActive(name, true, 'mg database activate (admin API)', step));
  });

  app.post<{ Params: { name: string }; Querystring: { wait: boolean; hold: boolean } }>('/v1/databases/:name/deactivate', {
    schema: {
      summary: 'Scale a database to zero: the gateways drain its sessions, its agents checkpoint and stop Postgres; data and topology stay. The next client wakes it, unless hold: then clients are refused (57P03) until an activation',
      tags: ['databases'], params: nameParams,
      querystring: { ...waitQuery, properties: { ...waitQuery.properties, hold: { type: 'boolean', default: false, description: 'keep it stopped: clients are refused, not woken, until POST .../activate (decision 0084)' } } },
    },
  }, async (req, reply) => {
    const { name } = req.params;
    const { hold } = req.query;
    return run(reply, req.query.wait, 'deactivate', name, () => databases.checkActivation(name),
      (step) => databases.setActive(name, false, `mg database deactivate${hold ? ' --hold' : ''} (admin API)`, step, hold));
  });
};
