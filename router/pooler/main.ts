/**
 * MultiPooler process: `node --import tsx router/pooler/main.ts --config pooler.json`.
 * With `workers` > 1 this process becomes the primary of that many pooler
 * processes sharing the port, and lends them the server connections (leases.ts).
 * SIGTERM/SIGINT drain and stop; SIGHUP re-reads the config (as RELOAD does).
 */
import cluster from 'node:cluster';
import { createLogger } from '../../common/log.ts';
import { onShutdown } from '../../common/lifecycle.ts';
import { liveWorkers, runWorkers } from '../cluster/workers.ts';
import { ConfigError, loadConfigFile } from './config.ts';
import { LeaseArbiter } from './leases.ts';
import { startPooler } from './pooler.ts';

function usage(msg: string): never {
  process.stderr.write(`${msg}\nusage: router/pooler/main.ts --config <file.json>\n`);
  process.exit(2);
}

const args = process.argv.slice(2);
const at = args.indexOf('--config');
const file = at >= 0 ? args[at + 1] : undefined;
if (!file) usage('missing --config');

let config;
try {
  config = loadConfigFile(file);
} catch (err) {
  if (err instanceof ConfigError) usage(`invalid config ${file}: ${err.message}`);
  throw err;
}

const log = createLogger('pooler', { instance: config.instanceId });
process.on('unhandledRejection', (err) => log.error({ err }, 'unhandled rejection'));
if (config.workers > 1 && cluster.isPrimary) {
  const leases = new LeaseArbiter((id, msg) => {
    const worker = cluster.workers?.[id];
    // A worker that is stopping has closed its channel before it exits; a send that loses that race must not end the primary.
    if (!worker?.isConnected()) return false;
    worker.send(msg, (err: Error | null) => {
      if (err) log.debug({ worker: worker.process.pid, err: err.message }, 'lease message not delivered: worker stopping');
    });
    return true;
  });
  await runWorkers({
    service: 'pooler', count: config.workers, metricsPort: config.metricsPort, metricsHost: config.listenHost, log, graceMs: config.shutdownGraceMs + 6_000,
    onMessage: (worker, msg) => leases.handle(worker.id, msg),
    onExit: (worker) => leases.forget(worker.id),
  });
  process.on('SIGHUP', () => {
    for (const w of liveWorkers()) w.process.kill('SIGHUP');
  });
} else {
  const pooler = await startPooler(config, log, { configPath: file });
  onShutdown(log, () => pooler.close(), config.shutdownGraceMs + 5_000);
  process.on('SIGHUP', () => {
    pooler.reload().then(
      (notes) => log.info({ notes }, 'reloaded on SIGHUP'),
      (err) => log.error({ err: (err as Error).message }, 'reload failed'),
    );
  });
}
