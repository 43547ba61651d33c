/**
 * The backup routes of MultiOrch's REST API (a fastify plugin): start a
 * backup of a shard, read the shard's repository (list), verify and expire
 * it, check that the primary's WAL reaches it. Restores run where the target data directory is (`mg backup restore`).
 */
import { BACKUP_TYPES, type BackupKind } from '../../schemas/index.ts';
import { AgentTimeout } from '../agents.ts';
import type { ApiPlugin } from '../api.ts';
import { BackupError } from '../backups.ts';

const shardParams = {
  type: 'object',
  required: ['database', 'shard'],
  properties: { database: { type: 'string', minLength: 1 }, shard: { type: 'string', minLength: 1 } },
} as const;

/** Verifying reads the whole repository; a check waits until a WAL segment is archived. */
const LONG_COMMAND_TIMEOUT_MS = 30 * 60_000;

export const backupsApi: ApiPlugin = async (app, { backups }) => {
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
};
