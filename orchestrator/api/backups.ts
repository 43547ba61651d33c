/**
 * The backup routes of MultiOrch's REST API (a fastify plugin): start a
 * backup of a shard, read the shard's repository (list), verify and expire
 * it, check that the primary's WAL reaches it, restore a shard or a whole
 * database in place (an operation, orchestrator/restores.ts). Restores into a
 * new data directory or database run in the CLI (`mg backup restore --to-dir | --as`).
 */
import { BACKUP_TYPES, type BackupKind } from '../../schemas/index.ts';
import { AgentTimeout } from '../agents.ts';
import { runOperation, waitQuery, type ApiPlugin } from '../api.ts';
import { BackupError } from '../backups.ts';
import type { RestoreRequest } from '../restores.ts';

const shardParams = {
  type: 'object',
  required: ['database', 'shard'],
  properties: { database: { type: 'string', minLength: 1 }, shard: { type: 'string', minLength: 1 } },
} as const;

/** Verifying reads the whole repository; a check waits until a WAL segment is archived. */
const LONG_COMMAND_TIMEOUT_MS = 30 * 60_000;

const restoreBody = {
  type: 'object', additionalProperties: false, required: ['inPlace'],
  properties: {
    inPlace: { type: 'boolean', enum: [true], description: 'required: the database\'s own data is rewritten (clients wait, then get 57P03, until it serves again)' },
    time: { type: 'string', format: 'date-time', description: 'restore to this moment (ISO 8601): the first commit after it is the last one kept' },
    lsn: { type: 'string', pattern: '^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$', description: 'restore to this WAL position (one shard only)' },
  },
} as const;

export const backupsApi: ApiPlugin = async (app, { backups, restores, operations }) => {
  app.setErrorHandler((err: Error, _req, reply) => {
    if (err instanceof BackupError) return reply.code(err.status).send({ error: err.message });
    if (err instanceof AgentTimeout) return reply.code(503).send({ error: err.message });
    throw err; // the API's own handler: each bad field named
  });

  app.post<{ Params: { database: string; shard: string }; Body: { type?: BackupKind } | null }>('/v1/backups/:database/:shard', {
    schema: {
      summary: 'Start a backup of the shard (from a streaming replica when one is healthy); answers with the request, progress is on mg.backups.v1', tags: ['backups'], 
      params: shardParams,
      body: { type: ['object', 'null'], additionalProperties: false, properties: { type: { type: 'string', enum: [...BACKUP_TYPES] } } },
    },
  }, async (req, reply) => reply.code(202).send(await backups.create(req.params.database, req.params.shard, req.body?.type ?? 'incr')));

  app.get<{ Params: { database: string; shard: string } }>('/v1/backups/:database/:shard', { schema: { summary: "The shard's backups as pgBackRest's repository lists them", tags: ['backups'], params: shardParams } }, async (req) =>
    JSON.parse(await backups.repository(req.params.database, req.params.shard, 'BACKUP_INFO')) ?? { stanza: null, backups: [] });

  app.post<{ Params: { database: string; shard: string } }>('/v1/backups/:database/:shard/verify', { schema: { summary: "Verify the shard's repository (every backup and archived WAL file)", tags: ['backups'], params: shardParams } }, async (req) =>
    ({ report: await backups.repository(req.params.database, req.params.shard, 'BACKUP_VERIFY', {}, LONG_COMMAND_TIMEOUT_MS) }));

  app.post<{ Params: { database: string; shard: string } }>('/v1/backups/:database/:shard/check', { schema: { summary: "Check that the primary's WAL reaches the repository", tags: ['backups'], params: shardParams } }, async (req) =>
    ({ report: await backups.repository(req.params.database, req.params.shard, 'BACKUP_CHECK', {}, LONG_COMMAND_TIMEOUT_MS) }));

  app.post<{ Params: { database: string; shard: string }; Body: { label?: string } | null }>('/v1/backups/:database/:shard/expire', {
    schema: {
      summary: 'Expire backups past the retention, or the one labelled', tags: ['backups'], 
      params: shardParams,
      body: { type: ['object', 'null'], additionalProperties: false, properties: { label: { type: 'string', pattern: '^[0-9]{8}-[0-9]{6}F(_[0-9]{8}-[0-9]{6}[DI])?$' } } },
    },
  }, async (req) => ({ report: await backups.repository(req.params.database, req.params.shard, 'BACKUP_EXPIRE', req.body?.label ? { label: req.body.label } : {}) }));

  // In place: drain, restore, rejoin, elect (decision 0047); every shard of the database to one time, or one shard.
  const restoreRoute = (url: string, summary: string) => app.post<{ Params: { database: string; shard?: string }; Body: RestoreRequest & { inPlace: true }; Querystring: { wait: boolean } }>(url, {
    schema: { summary, tags: ['backups'], params: url.includes(':shard') ? shardParams : { type: 'object', required: ['database'], properties: { database: shardParams.properties.database } }, querystring: waitQuery, body: restoreBody },
  }, async (req, reply) => {
    const { database, shard } = req.params;
    const { time, lsn } = req.body;
    let plan!: ReturnType<typeof restores.check>;
    return runOperation(operations, reply, req.query.wait, 'restore in place', shard ? `${database}/${shard}` : database,
      () => void (plan = restores.check(database, shard, { time, lsn })), (step) => restores.restore(database, plan.shards, plan.target, { time, lsn }, step));
  });
  restoreRoute('/v1/backups/:database/restore', 'Restore every shard of the database in place to one time (operation): drain, restore, rejoin, elect');
  restoreRoute('/v1/backups/:database/:shard/restore', 'Restore one shard in place to a time or LSN (operation): drain, restore, rejoin, elect');
};
