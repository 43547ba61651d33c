/** The materializer of a local cluster (one per cluster), and requests to its REST API. */
import type { Progress } from './progress.ts';
import { startService, type Paths } from './proxy.ts';
import type { ClusterSpec } from './spec.ts';
import { stopProcess } from './supervise.ts';

const NAME = 'materializer';

export async function startMaterializer(spec: ClusterSpec, paths: Paths, progress: Progress): Promise<void> {
  progress.note(await startService(NAME, 'materializer/main.ts', {
    id: NAME, port: spec.materializer.port, brokers: paths.bootstrap.split(','), registryUrl: paths.registryUrl,
    topicPrefix: spec.kafka.topicPrefix, pageRows: spec.materializer.pageRows, vdiffRows: spec.materializer.vdiffRows,
    migrationRevertSeconds: spec.materializer.migrationRevertSeconds,
    cdcTopicPrefixes: Object.fromEntries(spec.databases.map((d) => [d.name, d.cdc.topicPrefix])),
  }, spec.materializer.port, paths, spec));
}

export async function stopMaterializer(spec: ClusterSpec, runDir: string, progress: Progress): Promise<void> {
  progress.note(`${NAME}: ${await stopProcess(runDir, NAME)}`);
}

/** A request to the materializer's REST API. */
export async function callMaterializer(spec: ClusterSpec, method: 'GET' | 'POST', path: string, body?: unknown): Promise<{ status: number; body: any }> {
  let res: Response;
  try {
    res = await fetch(`http://127.0.0.1:${spec.materializer.port}${path}`, {
      method, headers: body === undefined ? {} : { 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body), signal: AbortSignal.timeout(30_000),
    });
  } catch (err) {
    throw new Error(`the materializer does not answer on port ${spec.materializer.port}: ${(err as Error).message} (mg cluster up starts it)`);
  }
  return { status: res.status, body: await res.json() };
}
