/** Cluster status, shards, instances, switchover and a shard's history. */
import { instancesOf, shardKey } from '../../schemas/index.ts';
import { json, type ApiPlugin } from '../api.ts';
import { ElectionError } from '../election.ts';

const shardParams = {
  type: 'object',
  required: ['database', 'shard'],
  properties: { database: { type: 'string', minLength: 1 }, shard: { type: 'string', minLength: 1 } },
} as const;

export const clusterApi: ApiPlugin = async (app, { cfg, watch, keeper, journal }) => {
  const shardsNow = () => watch.shards().map((s) => ({
    database: s.database, shard: s.shard, policy: s.policyText, policyProblem: s.policyProblem ?? null,
    term: s.primary?.term ?? null, ruleNumber: s.primary?.ruleNumber ?? null, primary: s.primary?.instanceId ?? null,
    lease: journal.lease(s.key) ?? null, bootstrapped: keeper.bootstrapped(s), inactive: watch.topology.inactive.has(s.database),
    instances: s.cohort.map((i) => {
      const h = watch.fresh(i.instanceId);
      return {
        instanceId: i.instanceId, cell: i.cell, port: i.port, serving: watch.topology.serving.get(i.instanceId) ?? 'NOT_SERVING',
        role: h ? (h.reachable ? h.role : 'UNREACHABLE') : 'NO_HEARTBEAT', upstream: h?.upstream ?? null,
        walReceiverStatus: h?.walReceiverStatus ?? null, lagBytes: h?.replayLagBytes ?? null,
      };
    }),
  }));

  app.get('/v1/status', {
    schema: { summary: 'Every shard: term, rule, primary, policy, lease, and each instance as its agent last reported it', tags: ['cluster'] },
  }, async () => json({ orchestrator: cfg.id, shards: shardsNow() }));

  app.get('/v1/shards', { schema: { summary: 'Every shard (as in /v1/status)', tags: ['shards'] } }, async () => json({ shards: shardsNow() }));

  app.get('/v1/instances', {
    schema: { summary: 'Every registered instance: where it runs, what it is now, and its latest heartbeat', tags: ['instances'] },
  }, async () => json({
    instances: instancesOf(watch.topology).map((i) => {
      const h = watch.latest(i.instanceId);
      return {
        instanceId: i.instanceId, database: i.database, shard: i.shard, cell: i.cell, host: i.host, port: i.port, poolerPort: i.poolerPort,
        type: i.currentType, serving: i.serving, reachable: watch.fresh(i.instanceId)?.reachable ?? false,
        lastHeartbeat: h?.ts ?? null, error: h?.error ?? null, lagBytes: h?.replayLagBytes ?? null,
      };
    }),
  }));

  app.post<{ Params: { database: string; shard: string }; Body: { to?: string } | null }>('/v1/shards/:database/:shard/switchover', {
    schema: {
      summary: 'Planned switchover: drain writes (gateways buffer), hand over to a caught-up replica', tags: ['shards'],
      params: shardParams,
      body: { type: ['object', 'null'], additionalProperties: false, properties: { to: { type: 'string', minLength: 1, description: 'instance to hand over to' } } },
    },
  }, async (req, reply) => {
    const { database, shard } = req.params;
    if (!watch.shard(database, shard)) return reply.code(404).send({ error: `no shard ${database}/${shard}` });
    try {
      return json(await keeper.switchover(database, shard, req.body?.to));
    } catch (err) {
      if (!(err instanceof ElectionError)) throw err;
      return reply.code({ invalid: 400, busy: 409, refused: 409, failed: 503 }[err.status]).send({ error: err.message });
    }
  });

  app.get<{ Params: { database: string; shard: string }; Querystring: { limit: number } }>('/v1/shards/:database/:shard/history', {
    schema: {
      summary: 'What orchestrators saw, decided and did for the shard, oldest first', tags: ['shards'],
      params: shardParams, querystring: { type: 'object', additionalProperties: false, properties: { limit: { type: 'integer', minimum: 1, maximum: 500, default: 100 } } },
    },
  }, async (req, reply) => {
    const { database, shard } = req.params;
    if (!watch.shard(database, shard)) return reply.code(404).send({ error: `no shard ${database}/${shard}` });
    return json({ events: journal.historyOf(shardKey(database, shard)).slice(-req.query.limit) });
  });
};
