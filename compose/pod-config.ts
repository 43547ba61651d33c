/**
 * What a container of the Multigres image runs (decision 0076): the component its argument
 * names, configured from the environment the operator gives it (operator/resources.ts) and the
 * cluster spec it mounts, through the same builders `mg cluster up` uses for local processes,
 * so a pod runs what a local cluster runs. What differs in a pod: ports are fixed (each pod has
 * its own address), the instance is named by the pod (its StatefulSet ordinal, as the operator
 * numbers them), and the data directory is on the pod's volume. Pure: compose/entrypoint.ts
 * writes the configuration and starts the component.
 */
import { z } from 'zod';
import { PGDATA, PORTS } from '../operator/resources.ts';
import { agentConfig } from './cluster.ts';
import { orchestratorConfig } from './orchestrators.ts';
import { gatewayConfig, poolerConfig } from './proxy.ts';
import { layoutInstanceId, parseSpec, type PlannedInstance } from './spec.ts';

/** The image's arguments and the entry point each one runs. */
export const COMPONENTS = {
  agent: 'ingest/main.ts', pooler: 'router/pooler/main.ts', gateway: 'router/gateway/main.ts', orchestrator: 'orchestrator/main.ts',
} as const;
export type Component = keyof typeof COMPONENTS;

/** The environment the operator sets (commonEnv, plus the shard's and the API token where they apply). */
const podEnv = z.object({
  MG_SPEC_FILE: z.string().min(1),
  MG_KAFKA_BOOTSTRAP: z.string().min(1),
  MG_KAFKA_TOPIC_PREFIX: z.string().default(''),
  MG_REGISTRY_URL: z.string().url(),
  MG_POD_NAME: z.string().min(1),
  MG_POD_IP: z.string().ip(),
  MG_PASSWORD: z.string().min(1),
  MG_CELL: z.string().min(1).optional(),
  MG_DATABASE: z.string().min(1).optional(),
  MG_SHARD: z.string().min(1).optional(),
  MG_API_TOKEN: z.string().min(16).optional(),
  /** The agent's: the data directory on the pod's volume. */
  PGDATA: z.string().min(1).default(PGDATA),
});
type PodEnv = z.infer<typeof podEnv>;

/**
 * The component's entry point, configuration and the environment it runs with besides the pod's;
 * throws an Error naming what is missing or wrong.
 */
export function podConfig(component: Component, rawEnv: Record<string, string | undefined>, specJson: unknown): { entry: string; config: object; env: Record<string, string> } {
  const parsed = podEnv.safeParse(rawEnv);
  if (!parsed.success) throw new Error(`${component}: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  const env = parsed.data;
  // The environment names the event log (the same values the spec holds; the manifests are the truth).
  const spec = parseSpec({
    ...(specJson as object),
    kafka: { ...(specJson as { kafka?: object }).kafka, bootstrap: env.MG_KAFKA_BOOTSTRAP, topicPrefix: env.MG_KAFKA_TOPIC_PREFIX },
    registry: { ...(specJson as { registry?: object }).registry, url: env.MG_REGISTRY_URL },
  }, env.MG_SPEC_FILE);
  const paths = { bootstrap: env.MG_KAFKA_BOOTSTRAP, registryUrl: env.MG_REGISTRY_URL };
  // Connections to other pods' Postgres (an agent cloning, streaming from and rewinding to the
  // primary; an orchestrator electing) leave loopback, so they authenticate with the login password
  // (SCRAM); libpq and node-postgres read it from PGPASSWORD.
  const started = (config: object) => ({ entry: COMPONENTS[component], config, env: { PGPASSWORD: env.MG_PASSWORD } });
  switch (component) {
    case 'agent':
      // Postgres listens on the pod's address, and the shard's first primary sets the login password.
      return started({ ...agentConfig(spec, instanceOfPod(env, spec.cells)), host: env.MG_POD_IP, loginPassword: env.MG_PASSWORD });
    case 'pooler': {
      // The gateways dial the pooler at the pod's address; Postgres is there too (it trusts the pod's own address).
      const config = poolerConfig(spec, instanceOfPod(env, spec.cells));
      return started({ ...config, listenHost: env.MG_POD_IP, postgres: { ...config.postgres, host: env.MG_POD_IP } });
    }
    case 'gateway':
      // The gateway Service sends clients to the pod's address.
      return started({ ...gatewayConfig(spec, paths), host: env.MG_POD_IP, metricsPort: PORTS.gatewayMetrics });
    case 'orchestrator':
      return started({ ...orchestratorConfig(spec, need(env, 'MG_CELL'), spec.orchestrator.basePort, paths), apiToken: env.MG_API_TOKEN });
  }
}

/** The instance a shard's pod runs: `<cluster>-<db>-<shard>-<cell>-<ordinal>` is the instance the operator numbers so (layoutInstanceId). */
function instanceOfPod(env: PodEnv, cells: string[]): PlannedInstance {
  const ordinal = /-(\d+)$/.exec(env.MG_POD_NAME)?.[1];
  if (ordinal === undefined) throw new Error(`MG_POD_NAME ${env.MG_POD_NAME} is not a StatefulSet pod's name (no ordinal)`);
  const [database, shard, cell] = [need(env, 'MG_DATABASE'), need(env, 'MG_SHARD'), need(env, 'MG_CELL')];
  if (!cells.includes(cell)) throw new Error(`MG_CELL ${cell} is not a cell of the spec (${cells.join(', ')})`);
  return {
    instanceId: layoutInstanceId(cells, database, shard, cell, Number(ordinal)), database, shard, cell,
    port: PORTS.postgres, metricsPort: PORTS.agentMetrics, poolerPort: PORTS.pooler, poolerMetricsPort: PORTS.poolerMetrics, dataDir: env.PGDATA,
  };
}

function need(env: PodEnv, name: 'MG_CELL' | 'MG_DATABASE' | 'MG_SHARD'): string {
  const value = env[name];
  if (!value) throw new Error(`${name} is not set (the operator sets it on a shard's containers and on an orchestrator's)`);
  return value;
}
