/** Replicas at run time: add one to a shard (restored from the latest backup, serving once caught up), remove one. */
import { runOperation, waitQuery, type ApiPlugin } from '../api.ts';

const shardParams = {
  type: 'object', required: ['database', 'shard'],
  properties: { database: { type: 'string', minLength: 1 }, shard: { type: 'string', minLength: 1 } },
} as const;

export const replicasApi: ApiPlugin = async (app, { replicas, operations }) => {
  app.post<{ Params: { database: string; shard: string }; Body: { cell?: string } | null; Querystring: { wait: boolean } }>('/v1/shards/:database/:shard/replicas', {
    schema: {
      summary: 'Add a replica: a new instance restored from the latest backup plus archived WAL (pg_basebackup when there is none), serving once caught up (operation)',
      tags: ['replicas'], params: shardParams, querystring: waitQuery,
      body: {
        type: ['object', 'null'], additionalProperties: false,
        properties: { cell: { type: 'string', minLength: 1, description: 'the cell to put it in (default: the cell holding fewest of the shard\'s instances)' } },
      },
    },
  }, async (req, reply) => {
    const { database, shard } = req.params;
    let cell = '';
    return runOperation(operations, reply, req.query.wait, 'replica add', `${database}/${shard}`,
      () => void (cell = replicas.checkAdd(database, shard, req.body?.cell)), (step) => replicas.add(database, shard, cell, step));
  });

  app.delete<{ Params: { database: string; shard: string; instance: string }; Querystring: { wait: boolean } }>('/v1/shards/:database/:shard/replicas/:instance', {
    schema: {
      summary: 'Remove a replica: out of routing and out of the durability policy\'s cohort, then stopped, deleted and deregistered (operation); 409 when it is the primary or the policy needs it',
      tags: ['replicas'], querystring: waitQuery,
      params: { ...shardParams, required: [...shardParams.required, 'instance'], properties: { ...shardParams.properties, instance: { type: 'string', minLength: 1 } } },
    },
  }, async (req, reply) => {
    const { database, shard, instance } = req.params;
    return runOperation(operations, reply, req.query.wait, 'replica remove', `${database}/${shard} ${instance}`,
      () => replicas.checkRemove(database, shard, instance), (step) => replicas.remove(database, shard, instance, step));
  });
};
