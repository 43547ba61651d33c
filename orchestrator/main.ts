/** Entry point of one MultiOrch: `node --import tsx orchestrator/main.ts --config <file>`. */
import { parseArgs } from 'node:util';
import { EventLog } from '../common/eventlog.ts';
import { onShutdown } from '../common/lifecycle.ts';
import { createLogger } from '../common/log.ts';
import { Agents } from './agents.ts';
import { InDoubtResolver } from './in-doubt.ts';
import { serveApi } from './api.ts';
import { Backups } from './backups.ts';
import { DatabaseManager } from './databases.ts';
import { Operations } from './operations.ts';
import { Provisioner } from './provisioner.ts';
import { ReplicaManager } from './replicas.ts';
import { RestoreManager } from './restores.ts';
import { readOrchConfig } from './config.ts';
import { Journal } from './journal.ts';
import { Keeper } from './keeper.ts';
import { ClusterWatch } from './view.ts';

const { values } = parseArgs({ options: { config: { type: 'string' } } });
if (!values.config) {
  console.error('usage: orchestrator/main.ts --config <orchestrator.json>');
  process.exit(2);
}
const cfg = readOrchConfig(values.config);
const log = createLogger('orchestrator', { orchestrator: cfg.id });
const eventLog = new EventLog({ brokers: cfg.brokers, registryUrl: cfg.registryUrl, clientId: cfg.id, log, topicPrefix: cfg.topicPrefix });
try {
  const watch = new ClusterWatch(eventLog, cfg.staleMs);
  const agents = new Agents(eventLog, cfg.id);
  const journal = new Journal(eventLog, cfg.id, log);
  await Promise.all([watch.start(), agents.start(), journal.start()]);
  const keeper = new Keeper(cfg, eventLog, watch, agents, journal, log);
  const backups = new Backups(eventLog, watch, agents, cfg.cell, cfg.backupSchedules, log.child({ part: 'backups' }));
  await backups.start();
  const provisioner = new Provisioner(cfg.provisioner);
  const databases = new DatabaseManager(watch, agents, provisioner, eventLog, cfg.id);
  const replicas = new ReplicaManager(watch, keeper, journal, provisioner);
  const restores = new RestoreManager(watch, keeper, journal, agents, backups, cfg.leaseMs);
  const api = await serveApi({ cfg, watch, keeper, journal, agents, eventLog, databases, replicas, backups, restores, operations: new Operations(), log });
  const resolver = new InDoubtResolver(cfg, watch, journal, log);
  keeper.start();
  resolver.start();
  onShutdown(log, async () => {
    await Promise.all([keeper.stop(), resolver.stop(), backups.stop()]);
    await api.close();
    await eventLog.close();
  });
  log.info({ port: cfg.port }, 'orchestrator started');
} catch (err) {
  log.fatal({ err }, 'orchestrator failed to start');
  process.exit(1);
}
