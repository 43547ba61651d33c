/**
 * One Kafka broker and one schema registry for a whole test run (test/run.sh):
 * `up` starts them in $MG_TEST_DIR and writes infra.env; `down` stops them.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createLogger } from '../../common/log.ts';
import { startKafka, stopKafka } from '../../compose/infra/kafka.ts';
import { startRegistry, stopRegistry } from '../../compose/infra/registry.ts';

const dir = process.env.MG_TEST_DIR;
if (!dir) throw new Error('MG_TEST_DIR is not set (run the tests with npm test)');
const runDir = path.join(dir, 'run');
const port = Number(process.env.MG_TEST_KAFKA_PORT ?? 28092);
const registryPort = Number(process.env.MG_TEST_REGISTRY_PORT ?? 28081);
const log = createLogger('test-infra');
log.level = process.env.MG_LOG_LEVEL ?? 'warn';

if (process.argv[2] === 'up') {
  const t0 = Date.now();
  const kafka = await startKafka({
    cacheDir: path.join(os.homedir(), '.cache', 'mg'), dataDir: path.join(dir, 'kafka'), runDir,
    port, controllerPort: port + 1, heapMb: 512, log,
  });
  const brokerMs = Date.now() - t0;
  const registry = await startRegistry({ runDir, logDir: path.join(dir, 'logs'), bootstrap: kafka.bootstrap, port: registryPort, topicPrefix: '' });
  fs.writeFileSync(path.join(dir, 'infra.env'), `MG_TEST_BOOTSTRAP=${kafka.bootstrap}\nMG_TEST_REGISTRY_URL=${registry.url}\n`);
  console.log(`test infra: Kafka ${kafka.bootstrap} ready in ${(brokerMs / 1000).toFixed(1)}s, registry ${registry.url}, total ${((Date.now() - t0) / 1000).toFixed(1)}s`);
} else if (process.argv[2] === 'down') {
  await stopRegistry(runDir);
  await stopKafka(runDir);
} else {
  throw new Error('usage: infra.ts up|down');
}
