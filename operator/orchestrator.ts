/**
 * The operator's side of the orchestrators' REST API (docs/admin-api.md): the same requests
 * `mg shard switchover`, `mg replica remove` and `mg vschema apply` make, with the cluster's API token. In a
 * cluster it reaches each cell's orchestrator Service in turn; MG_OPERATOR_ORCHESTRATOR_URL
 * replaces them when the operator runs outside the cluster (and in the tests).
 */
import { callFirstAnswering } from '../compose/orchestrators.ts';
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
  /** `mg vschema apply`'s request: 200 with the version published, 400 naming what is wrong. */
  applyVSchema(database: string, vschema: unknown): Promise<Answer>;
}

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

  applyVSchema(database: string, vschema: unknown): Promise<Answer> {
    return this.call('PUT', `/v1/databases/${encodeURIComponent(database)}/vschema`, vschema);
  }

  private call(method: string, path: string, body?: unknown): Promise<Answer> {
    return callFirstAnswering(this.urls, this.token, method, path, body);
  }
}

const shardPath = (database: string, shard: string) => `/v1/shards/${encodeURIComponent(database)}/${encodeURIComponent(shard)}`;
