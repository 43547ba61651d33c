/** Long operations' progress. */
import type { ApiPlugin } from '../api.ts';

export const operationsApi: ApiPlugin = async (app, { operations }) => {
  app.get('/v1/operations', { schema: { summary: 'Operations this orchestrator ran or runs, newest first, with their steps', tags: ['operations'] } },
    async () => ({ operations: operations.list() }));

  app.get<{ Params: { id: string } }>('/v1/operations/:id', {
    schema: {
      summary: 'One operation: state (running, succeeded, failed), its steps so far (what it did, what it waits for), the error',
      tags: ['operations'], params: { type: 'object', required: ['id'], properties: { id: { type: 'string', format: 'uuid' } } },
    },
  }, async (req, reply) => operations.get(req.params.id) ?? reply.code(404).send({ error: `no operation ${req.params.id} on this orchestrator` }));
};
