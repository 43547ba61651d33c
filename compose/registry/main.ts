/** Entry point of the schema-registry process started by `mg cluster up`. */
import { parseArgs } from 'node:util';
import { EventLog } from '../../common/eventlog.ts';
import { onShutdown } from '../../common/lifecycle.ts';
import { createLogger } from '../../common/log.ts';
import { startRegistry } from './server.ts';

const { values } = parseArgs({ options: { brokers: { type: 'string' }, port: { type: 'string' }, 'topic-prefix': { type: 'string' } } });
const log = createLogger('schema-registry');
const port = Number(values.port ?? 8081);
const eventLog = new EventLog({ brokers: (values.brokers ?? '127.0.0.1:9092').split(','), registryUrl: `http://127.0.0.1:${port}`, clientId: 'schema-registry', log, topicPrefix: values['topic-prefix'] ?? '' });
await eventLog.ensureTopics();
const app = await startRegistry({ eventLog, port, log });
onShutdown(log, async () => {
  await app.close();
  await eventLog.close();
});
