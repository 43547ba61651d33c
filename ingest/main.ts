/** Entry point of one ingest agent: `node --import tsx ingest/main.ts --config <file>`. */
import { parseArgs } from 'node:util';
import { onShutdown } from '../common/lifecycle.ts';
import { createLogger } from '../common/log.ts';
import { serveMetrics } from '../common/metrics.ts';
import { Agent } from './agent.ts';
import { readAgentConfig } from './config.ts';
import { Voter } from './consensus/voter.ts';

const { values } = parseArgs({ options: { config: { type: 'string' } } });
if (!values.config) {
  console.error('usage: ingest/main.ts --config <agent.json>');
  process.exit(2);
}
const cfg = readAgentConfig(values.config);
const log = createLogger('ingest-agent', { instance: cfg.instanceId });
const agent = new Agent(cfg, log);
new Voter(agent, log.child({ part: 'voter' })).attach();
try {
  const metricsServer = await serveMetrics(cfg.metricsPort, undefined, undefined, cfg.host); // beside Postgres: a pod's address in a pod
  onShutdown(log, async () => {
    await agent.stop();
    await metricsServer.close();
  });
  await agent.start();
} catch (err) {
  log.fatal({ err }, 'agent failed to start');
  process.exit(1);
}
