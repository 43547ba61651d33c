/**
 * A gateway of several processes sharing one port (node:cluster): each worker
 * is a whole Gateway (its own discovery, sessions and file-descriptor limit);
 * the primary only hands out connections, restarts a worker that dies, serves
 * the workers' metrics summed, and drains them all on SIGTERM. Cancels find
 * their session across workers the way they do across gateways (see gateway.ts).
 */
import cluster, { type Worker } from 'node:cluster';
import { AggregatorRegistry } from 'prom-client';
import { onShutdown } from '../../common/lifecycle.ts';
import type { Logger } from '../../common/log.ts';
import { metrics, serveMetrics } from '../../common/metrics.ts';

/** In a worker: lets the primary collect this process's registry. */
export function reportMetricsToPrimary(): void {
  AggregatorRegistry.setRegistries(metrics);
  // prom-client answers the primary's requests only once an AggregatorRegistry exists in the worker too.
  new AggregatorRegistry();
}

export async function runWorkers(count: number, metricsPort: number, log: Logger): Promise<void> {
  let stopping = false;
  const fork = (): Worker => cluster.fork();
  cluster.on('exit', (worker, code, signal) => {
    if (stopping) return;
    log.error({ worker: worker.process.pid, code, signal }, 'gateway worker died; starting another');
    fork();
  });
  const workers = Array.from({ length: count }, fork);
  await Promise.all(workers.map((w) => new Promise<void>((resolve, reject) => {
    w.once('listening', () => resolve());
    w.once('exit', (code) => reject(new Error(`gateway worker exited with code ${code} before listening`)));
  })));
  const aggregate = new AggregatorRegistry();
  const metricsServer = await serveMetrics(metricsPort, () => true, () => aggregate.clusterMetrics());
  log.info({ workers: count }, 'gateway workers listening');
  onShutdown(log, async () => {
    stopping = true;
    const all = Object.values(cluster.workers ?? {}).filter((w): w is Worker => w !== undefined);
    await Promise.all(all.map((w) => new Promise<void>((resolve) => {
      if (w.isDead()) return resolve();
      w.once('exit', () => resolve());
      w.process.kill('SIGTERM');
    })));
    await metricsServer.close();
  });
}
