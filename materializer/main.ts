/** Entry point of the materializer: `node --import tsx materializer/main.ts --config <file>`. */
import { parseArgs } from 'node:util';
import { EventLog } from '../common/eventlog.ts';
import { onShutdown } from '../common/lifecycle.ts';
import { createLogger } from '../common/log.ts';
import { serveApi } from './api.ts';
import { readMaterializerConfig } from './config.ts';
import { Materializer } from './service.ts';

const { values } = parseArgs({ options: { config: { type: 'string' } } });
if (!values.config) {
  console.error('usage: materializer/main.ts --config <materializer.json>');
  process.exit(2);
}
const cfg = readMaterializerConfig(values.config);
const log = createLogger('materializer', { materializer: cfg.id });
const eventLog = new EventLog({ brokers: cfg.brokers, registryUrl: cfg.registryUrl, clientId: cfg.id, log, topicPrefix: cfg.topicPrefix });
try {
  const materializer = new Materializer(cfg, eventLog, log);
  await materializer.start();
  const api = await serveApi(materializer, cfg.port, () => true);
  onShutdown(log, async () => {
    await api.close();
    await materializer.stop();
    await eventLog.close();
  });
  log.info({ port: cfg.port }, 'materializer started');
} catch (err) {
  log.fatal({ err }, 'materializer failed to start');
  process.exit(1);
}
