/**
 * A Confluent-compatible schema registry (the REST subset Avro producers and
 * consumers use), backed by the compacted `_schemas` topic. We serve it
 * ourselves because neither Karapace nor Apicurio can be run here (see
 * docs/decisions/0002-schema-registry.md).
 */
import Fastify, { type FastifyInstance } from 'fastify';
import type { EventLog } from '../../common/eventlog.ts';
import type { Logger } from '../../common/log.ts';
import { metrics } from '../../common/metrics.ts';
import { COMPATIBILITY_LEVELS, normalize, RegistryHttpError, RegistryStore, type Compatibility, type StoreRecord } from './store.ts';

const CONTENT_TYPES = ['application/vnd.schemaregistry.v1+json', 'application/vnd.schemaregistry+json', 'application/json', 'application/octet-stream'];

export async function startRegistry(opts: { eventLog: EventLog; port: number; log: Logger }): Promise<FastifyInstance> {
  const { eventLog, log } = opts;
  const store = new RegistryStore();
  const sub = await eventLog.subscribeRaw(eventLog.topic('schemas'), async (msg) => {
    if (!msg.key) return;
    store.apply({ key: JSON.parse(msg.key), value: msg.value ? JSON.parse(msg.value.toString()) : null } as StoreRecord);
  });
  await sub.caughtUp;

  // Writes are serialized so that version numbers and ids are allocated once.
  let writes: Promise<unknown> = Promise.resolve();
  const serialized = <T>(fn: () => Promise<T>): Promise<T> => {
    const next = writes.then(fn, fn);
    writes = next.catch(() => undefined);
    return next;
  };
  const write = async (rec: StoreRecord) => {
    await eventLog.sendRaw(eventLog.topic('schemas'), [{ key: JSON.stringify(rec.key), value: rec.value ? Buffer.from(JSON.stringify(rec.value)) : null }]);
    store.apply(rec);
  };

  const app = Fastify({ logger: false, bodyLimit: 8 * 1024 * 1024 });
  app.removeAllContentTypeParsers();
  app.addContentTypeParser(CONTENT_TYPES, { parseAs: 'string' }, (_req, body, done) => {
    try {
      done(null, body === '' ? {} : JSON.parse(body as string));
    } catch {
      done(new RegistryHttpError(422, 42201, 'Request body is not valid JSON'), undefined);
    }
  });
  app.setErrorHandler((err, _req, reply) => {
    if (err instanceof RegistryHttpError) return reply.code(err.status).send({ error_code: err.errorCode, message: err.message });
    const status = (err as { statusCode?: number }).statusCode ?? 500;
    if (status >= 500) log.error({ err }, 'registry request failed');
    return reply.code(status).send({ error_code: status * 100, message: (err as Error).message });
  });
  app.addHook('onSend', async (_req, reply, payload) => {
    reply.header('content-type', 'application/vnd.schemaregistry.v1+json');
    return payload;
  });

  const schemaOf = (body: any): string => {
    if (typeof body?.schema !== 'string') throw new RegistryHttpError(422, 42201, 'Body must have a "schema" string');
    if (body.schemaType && body.schemaType !== 'AVRO') throw new RegistryHttpError(422, 42201, `Only AVRO schemas are supported, not ${body.schemaType}`);
    return normalize(body.schema);
  };
  type P = { subject: string; version: string; id: string };

  app.get('/', async () => ({}));
  app.get('/metrics', async (_req, reply) => reply.type(metrics.contentType).send(await metrics.metrics()));
  app.get('/subjects', async () => store.subjects());
  app.get<{ Params: P }>('/subjects/:subject/versions', async (req) => {
    const live = store.live(req.params.subject);
    if (live.length === 0) throw new RegistryHttpError(404, 40401, `Subject '${req.params.subject}' not found.`);
    return live.map((v) => v.version);
  });
  app.get<{ Params: P }>('/subjects/:subject/versions/:version', async (req) => {
    const { subject, version, id, schema } = store.version(req.params.subject, req.params.version);
    return { subject, version, id, schema };
  });
  app.get<{ Params: P }>('/subjects/:subject/versions/:version/schema', async (req) => JSON.parse(store.version(req.params.subject, req.params.version).schema));
  app.get<{ Params: P }>('/schemas/ids/:id', async (req) => ({ schema: store.schemaById(Number(req.params.id)) }));

  app.post<{ Params: P }>('/subjects/:subject/versions', async (req) => serialized(async () => {
    const subject = req.params.subject;
    const schema = schemaOf(req.body);
    const existing = store.find(subject, schema);
    if (existing) return { id: existing.id };
    const problems = store.incompatibilities(subject, schema);
    if (problems.length) throw new RegistryHttpError(409, 409, `Schema being registered is incompatible with an earlier schema for subject "${subject}": ${problems.join('; ')}`);
    const next = store.nextVersion(subject, schema);
    await write({ key: { keytype: 'SCHEMA', subject, version: next.version, magic: 1 }, value: next });
    log.info({ subject, version: next.version, id: next.id }, 'schema registered');
    return { id: next.id };
  }));
  app.post<{ Params: P }>('/subjects/:subject', async (req) => {
    const schema = schemaOf(req.body);
    if (store.live(req.params.subject).length === 0) throw new RegistryHttpError(404, 40401, `Subject '${req.params.subject}' not found.`);
    const found = store.find(req.params.subject, schema);
    if (!found) throw new RegistryHttpError(404, 40403, 'Schema not found');
    return { subject: found.subject, version: found.version, id: found.id, schema: found.schema };
  });
  app.delete<{ Params: P }>('/subjects/:subject', async (req) => serialized(async () => {
    const live = store.live(req.params.subject);
    if (live.length === 0) throw new RegistryHttpError(404, 40401, `Subject '${req.params.subject}' not found.`);
    for (const v of live) await write({ key: { keytype: 'SCHEMA', subject: v.subject, version: v.version, magic: 1 }, value: { ...v, deleted: true } });
    return live.map((v) => v.version);
  }));
  app.post<{ Params: P }>('/compatibility/subjects/:subject/versions/:version', async (req) => {
    const schema = schemaOf(req.body);
    if (store.live(req.params.subject).length === 0) return { is_compatible: true };
    const against = [store.version(req.params.subject, req.params.version)];
    const messages = store.incompatibilities(req.params.subject, schema, against);
    return { is_compatible: messages.length === 0, messages };
  });

  const levelOf = (body: any): Compatibility => {
    const level = body?.compatibility;
    if (!COMPATIBILITY_LEVELS.includes(level)) throw new RegistryHttpError(422, 42203, `Invalid compatibility level: ${level}`);
    return level;
  };
  app.get('/config', async () => ({ compatibilityLevel: store.compatibility(null) }));
  app.put('/config', async (req) => serialized(async () => {
    const level = levelOf(req.body);
    await write({ key: { keytype: 'CONFIG', subject: null, magic: 0 }, value: { compatibilityLevel: level } });
    return { compatibility: level };
  }));
  app.get<{ Params: P; Querystring: { defaultToGlobal?: string } }>('/config/:subject', async (req) => {
    if (!store.hasConfig(req.params.subject) && req.query.defaultToGlobal !== 'true') {
      throw new RegistryHttpError(404, 40408, `Subject '${req.params.subject}' does not have subject-level compatibility configured`);
    }
    return { compatibilityLevel: store.compatibility(req.params.subject) };
  });
  app.put<{ Params: P }>('/config/:subject', async (req) => serialized(async () => {
    const level = levelOf(req.body);
    await write({ key: { keytype: 'CONFIG', subject: req.params.subject, magic: 0 }, value: { compatibilityLevel: level } });
    return { compatibility: level };
  }));

  app.addHook('onClose', async () => sub.stop());
  await app.listen({ host: '127.0.0.1', port: opts.port });
  log.info({ port: opts.port }, 'schema registry serving');
  return app;
}
