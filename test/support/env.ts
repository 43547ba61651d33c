/** What integration tests share: the run's broker and registry, and isolated topic prefixes. */
import { randomUUID } from 'node:crypto';
import { EventLog } from '../../common/eventlog.ts';
import { createLogger } from '../../common/log.ts';

function required(name: string): string {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run integration tests through npm test (test/run.sh)`);
  return v;
}

export const bootstrap = () => required('MG_TEST_BOOTSTRAP');
export const registryUrl = () => required('MG_TEST_REGISTRY_URL');
export const testLog = createLogger('test');
testLog.level = process.env.MG_LOG_LEVEL ?? 'warn';

/** A topic prefix no other test uses, so tests sharing the broker never see each other's events. */
export const uniquePrefix = (label: string) => `t-${label}-${randomUUID().slice(0, 8)}.`;

export async function testEventLog(topicPrefix: string, clientId = 'test'): Promise<EventLog> {
  const log = new EventLog({ brokers: [bootstrap()], registryUrl: registryUrl(), clientId, log: testLog, topicPrefix });
  await log.ensureTopics();
  return log;
}
