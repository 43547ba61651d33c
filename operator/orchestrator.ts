/**
 * The operator's side of the orchestrators' REST API (docs/admin-api.md): the same requests
 * `mg shard switchover` and `mg replica remove` make, with the cluster's API token. In a
 * cluster it reaches each cell's orchestrator Service in turn; MG_OPERATOR_ORCHESTRATOR_URL
 * replaces them when the operator runs outside the cluster (and in the tests).
 */
import type { MultigresCluster } from './resources.ts';
import { names } from './resources.ts';

/** An HTTP answer: the status and the JSON body (an `error` field on refusals). */
export interface Answer {
  status: number;
  body: any;
}

/** What a roll or a scale-down asks of a cluster's orchestrators (a fake in unit tests). */
export interface OrchestratorApi {
  switchover(database: string, shard: string): Promise<Answer>;
  removeReplica(database: string, shard: string, instanceId: string): Promise<Answer>;
  operation(id: string): Promise<Answer>;
  operations(): Promise<Answer>;
}

/** A switchover drains writes and hands over: seconds, not minutes. */
const REQUEST_TIMEOUT_MS = 60_000;

/** Base URLs of the cluster's orchestrators: the override, else each cell's Service. */
export function orchestratorUrls(cluster: MultigresCluster, override: string | undefined): string[] {
  if (override) return [override.replace(/\/$/, '')];
  const c = cluster.metadata!.name!;
  const port = cluster.spec.orchestrator?.port ?? 9400;
  return cluster.spec.cells.map((cell) => `http://${names.orchestrator(c, cell.name)}.${cluster.metadata!.namespace}.svc:${port}`);
}

export class OrchestratorClient implements OrchestratorApi {
  constructor(private readonly urls: string[], private readonly token: string) {}

  switchover(database: string, shard: string): Promise<Answer> {
    return this.call('POST', `${shardPath(database, shard)}/switchover`, {});
  }

  /** Starts the removal operation (202 and the operation; 404 when the instance is not in the shard's cohort). */
  removeReplica(database: string, shard: string, instanceId: string): Promise<Answer> {
    return this.call('DELETE', `${shardPath(database, shard)}/replicas/${encodeURIComponent(instanceId)}`);
  }

  operation(id: string): Promise<Answer> {
    return this.call('GET', `/v1/operations/${encodeURIComponent(id)}`);
  }

  operations(): Promise<Answer> {
    return this.call('GET', '/v1/operations');
  }

  /** The first orchestrator that answers; throws when none does. */
  private async call(method: string, path: string, body?: unknown): Promise<Answer> {
    const headers: Record<string, string> = { authorization: `Bearer ${this.token}` };
    if (body !== undefined) headers['content-type'] = 'application/json';
    let lastError: unknown;
    for (const url of this.urls) {
      try {
        const res = await fetch(`${url}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) });
        const text = await res.text();
        return { status: res.status, body: text ? JSON.parse(text) : {} };
      } catch (err) {
        lastError = err;
      }
    }
    throw new Error(`no orchestrator answers (${this.urls.join(', ')}): ${(lastError as Error)?.message}`);
  }
}

const shardPath = (database: string, shard: string) => `/v1/shards/${encodeURIComponent(database)}/${encodeURIComponent(shard)}`;
