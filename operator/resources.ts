/**
 * The custom resources and the Kubernetes objects they become. Pure: a MultigresCluster and
 * its MultigresDatabases go through the same cluster spec and plan as `mg cluster up`
 * (compose/spec.ts, decision 0045), and the plan becomes objects here. No I/O.
 */
import type { KubernetesObject } from '@kubernetes/client-node';
import { instanceGroups, parseSpec, type ClusterSpec, type InstanceGroup } from '../compose/spec.ts';

export const GROUP = 'multigres.io';
export const VERSION = 'v1alpha1';
export const API_VERSION = `${GROUP}/${VERSION}`;
export const FINALIZER = 'multigres.io/drain';
export const MANAGER = 'multigres-operator';

/** Labels every object the operator owns carries (pruning and watches select on them). */
export const LABEL_CLUSTER = 'multigres.io/cluster';
export const LABEL_MANAGED_BY = 'app.kubernetes.io/managed-by';

export interface Condition {
  /** A cluster's Ready, Progressing, Degraded and TopologyPublished; a database's VSchemaApplied. */
  type: 'Ready' | 'Progressing' | 'Degraded' | 'TopologyPublished' | 'VSchemaApplied';
  status: 'True' | 'False' | 'Unknown';
  reason: string;
  message: string;
  observedGeneration?: number;
  lastTransitionTime?: string;
}

type Resources = Record<string, unknown>;

/** A Kubernetes object as sent to the API server (any kind: spec, data, ...). */
export type Manifest = KubernetesObject & { spec?: unknown; data?: Record<string, string>; stringData?: Record<string, string>; type?: string };

export interface MultigresCluster extends KubernetesObject {
  spec: {
    image: string;
    kafka: { bootstrap: string; topicPrefix?: string };
    registry: { url: string };
    cells: Array<{ name: string; zone?: string }>;
    gateway?: { replicas?: number; port?: number; httpPort?: number; resources?: Resources };
    orchestrator?: { port?: number; resources?: Resources };
  };
  status?: { observedGeneration?: number; databases?: number; conditions?: Condition[] };
}

export interface MultigresDatabase extends KubernetesObject {
  spec: {
    cluster: string;
    shards?: number;
    sharded?: boolean;
    instancesPerShard?: number;
    durability?: string;
    transactionMode?: 'single' | 'multi' | 'twopc';
    deactivated?: boolean;
    storage?: { size?: string; storageClassName?: string };
    resources?: Resources;
    backup?: { fullEveryMinutes?: number; diffEveryMinutes?: number; incrEveryMinutes?: number; retentionFull?: number };
    cdc?: { enabled?: boolean; tables?: string[] };
    vschemaRef?: { name: string; key?: string };
  };
  status?: { observedGeneration?: number; shards?: Array<{ shard: string; primary: string; term: number }>; conditions?: Condition[]; vschema?: VSchemaStatus };
}

/** The VSchema content last sent to the orchestrator (operator/vschema.ts): applied as `version`, or refused with `error`. */
export interface VSchemaStatus {
  configMap: string;
  key: string;
  /** sha256 of the ConfigMap value. */
  hash: string;
  version?: number;
  error?: string;
}

/** Ports inside every pod: each pod has its own address, so they are fixed, unlike locally. */
export const PORTS = { postgres: 5432, pooler: 6432, agentMetrics: 9100, poolerMetrics: 9200, gatewayMetrics: 9300 } as const;

/** The data directory on the pod's volume, the agent's (compose/pod-config.ts). */
export const PGDATA = '/var/lib/postgresql/data/pgdata';

/**
 * The cluster spec the resources describe, validated by the same schema as a local cluster's
 * spec file, so the same values are refused with the same messages. Throws SpecError.
 */
export function clusterSpecOf(cluster: MultigresCluster, databases: MultigresDatabase[]): ClusterSpec {
  const s = cluster.spec;
  return parseSpec({
    name: cluster.metadata!.name!.replace(/-/g, '_'),
    dataDir: '/var/lib/multigres',
    kafka: { bootstrap: s.kafka.bootstrap, topicPrefix: s.kafka.topicPrefix ?? '' },
    registry: { url: s.registry.url },
    cells: s.cells.map((c) => c.name),
    gateway: { port: s.gateway?.port ?? 5432, ...(s.gateway?.httpPort ? { httpPort: s.gateway.httpPort } : {}) },
    orchestrator: { basePort: s.orchestrator?.port ?? 9400 },
    databases: databases.map((d) => ({
      name: d.metadata!.name!,
      shards: d.spec.shards ?? 1,
      sharded: d.spec.sharded ?? false,
      instancesPerShard: d.spec.instancesPerShard ?? 3,
      transactionMode: d.spec.transactionMode ?? 'multi',
      ...(d.spec.durability ? { durability: d.spec.durability } : {}),
      cdc: { enabled: d.spec.cdc?.enabled ?? false, tables: d.spec.cdc?.tables ?? [] },
      backupSchedule: {
        ...(d.spec.backup?.fullEveryMinutes ? { fullEveryMinutes: d.spec.backup.fullEveryMinutes } : {}),
        ...(d.spec.backup?.diffEveryMinutes ? { diffEveryMinutes: d.spec.backup.diffEveryMinutes } : {}),
        ...(d.spec.backup?.incrEveryMinutes ? { incrEveryMinutes: d.spec.backup.incrEveryMinutes } : {}),
      },
    })),
  }, `MultigresCluster ${cluster.metadata!.namespace}/${cluster.metadata!.name}`);
}

/** A DNS-1123 form of a key-range shard name: '-' is '0', '-80' is '00-80', '80-' is '80-ff'. */
export function shardLabel(shard: string): string {
  if (shard === '-') return '0';
  const [start, end] = shard.split('-');
  return `${start || '00'}-${end || 'ff'}`;
}

export const names = {
  spec: (c: string) => `${c}-spec`,
  credentials: (c: string) => `${c}-credentials`,
  gateway: (c: string) => `${c}-gateway`,
  orchestrator: (c: string, cell: string) => `${c}-orch-${cell}`,
  shard: (c: string, db: string, shard: string) => `${c}-${db}-${shardLabel(shard)}`,
  group: (c: string, g: InstanceGroup) => `${c}-${g.database}-${shardLabel(g.shard)}-${g.cell}`,
};

function ownerRef(owner: KubernetesObject) {
  return { apiVersion: owner.apiVersion!, kind: owner.kind!, name: owner.metadata!.name!, uid: owner.metadata!.uid!, controller: true, blockOwnerDeletion: true };
}

function meta(name: string, owner: KubernetesObject, clusterName: string, extra: Record<string, string> = {}) {
  return {
    name, namespace: owner.metadata!.namespace!,
    labels: { [LABEL_MANAGED_BY]: MANAGER, [LABEL_CLUSTER]: clusterName, 'app.kubernetes.io/name': 'multigres', 'app.kubernetes.io/instance': clusterName, ...extra },
    ownerReferences: [ownerRef(owner)],
  };
}

const zoneOf = (cluster: MultigresCluster, cell: string) => cluster.spec.cells.find((c) => c.name === cell)?.zone ?? cell;

function inZone(zone: string) {
  return { nodeAffinity: { requiredDuringSchedulingIgnoredDuringExecution: { nodeSelectorTerms: [{ matchExpressions: [{ key: 'topology.kubernetes.io/zone', operator: 'In', values: [zone] }] }] } } };
}

/** Environment every Multigres container reads: where the event log is, and who it is. */
function commonEnv(cluster: MultigresCluster, cell?: string) {
  const c = cluster.metadata!.name!;
  return [
    { name: 'MG_KAFKA_BOOTSTRAP', value: cluster.spec.kafka.bootstrap },
    { name: 'MG_KAFKA_TOPIC_PREFIX', value: cluster.spec.kafka.topicPrefix ?? '' },
    { name: 'MG_REGISTRY_URL', value: cluster.spec.registry.url },
    { name: 'MG_SPEC_FILE', value: '/etc/multigres/spec.json' },
    { name: 'MG_POD_NAME', valueFrom: { fieldRef: { fieldPath: 'metadata.name' } } },
    { name: 'MG_POD_IP', valueFrom: { fieldRef: { fieldPath: 'status.podIP' } } },
    ...(cell ? [{ name: 'MG_CELL', value: cell }] : []),
    { name: 'MG_PASSWORD', valueFrom: { secretKeyRef: { name: names.credentials(c), key: 'postgres-password' } } },
  ];
}

const specVolume = (c: string) => ({ name: 'spec', configMap: { name: names.spec(c) } });
const specMount = { name: 'spec', mountPath: '/etc/multigres', readOnly: true };

/** One StatefulSet per instance group: the agent (which runs Postgres) and the pooler in each pod. */
function statefulSet(cluster: MultigresCluster, db: MultigresDatabase, group: InstanceGroup): Manifest {
  const c = cluster.metadata!.name!;
  const shardLabels = { 'multigres.io/database': group.database, 'multigres.io/shard': shardLabel(group.shard) };
  const labels = { ...shardLabels, 'multigres.io/cell': group.cell, 'app.kubernetes.io/component': 'postgres' };
  const selector = { [LABEL_CLUSTER]: c, ...labels };
  const storage = db.spec.storage ?? {};
  const image = cluster.spec.image;
  return {
    apiVersion: 'apps/v1', kind: 'StatefulSet',
    metadata: meta(names.group(c, group), db, c, labels),
    spec: {
      serviceName: names.shard(c, group.database, group.shard),
      replicas: db.spec.deactivated ? 0 : group.instances.length,
      podManagementPolicy: 'Parallel',
      // Pods are replaced only when deleted: a controller-driven roll would restart a shard's
      // primary without a switchover first; the operator rolls them itself (decision 0055).
      updateStrategy: { type: 'OnDelete' },
      selector: { matchLabels: selector },
      template: {
        metadata: { labels: { ...selector, [LABEL_MANAGED_BY]: MANAGER } },
        spec: {
          affinity: {
            ...inZone(zoneOf(cluster, group.cell)),
            // Two instances of one shard never share a node (the cells already keep zones apart).
            podAntiAffinity: { requiredDuringSchedulingIgnoredDuringExecution: [{ labelSelector: { matchLabels: { [LABEL_CLUSTER]: c, ...shardLabels } }, topologyKey: 'kubernetes.io/hostname' }] },
          },
          securityContext: { fsGroup: 999 },
          containers: [
            {
              // The agent runs Postgres itself from the image's binaries (initdb or clone, pg_ctl,
              // pg_rewind), as locally: the one postmaster on the volume (decision 0076).
              name: 'agent', image, args: ['agent'],
              env: [...commonEnv(cluster, group.cell), { name: 'MG_DATABASE', value: group.database }, { name: 'MG_SHARD', value: group.shard }, { name: 'PGDATA', value: PGDATA }],
              ports: [{ name: 'postgres', containerPort: PORTS.postgres }, { name: 'agent-metrics', containerPort: PORTS.agentMetrics }],
              resources: db.spec.resources ?? {},
              volumeMounts: [{ name: 'data', mountPath: '/var/lib/postgresql/data' }, specMount],
            },
            {
              name: 'pooler', image, args: ['pooler'],
              env: [...commonEnv(cluster, group.cell), { name: 'MG_DATABASE', value: group.database }, { name: 'MG_SHARD', value: group.shard }],
              ports: [{ name: 'pooler', containerPort: PORTS.pooler }, { name: 'pooler-metrics', containerPort: PORTS.poolerMetrics }],
              volumeMounts: [specMount],
            },
          ],
          volumes: [specVolume(c)],
        },
      },
      volumeClaimTemplates: [{
        metadata: { name: 'data' },
        spec: {
          accessModes: ['ReadWriteOnce'],
          resources: { requests: { storage: storage.size ?? '10Gi' } },
          ...(storage.storageClassName ? { storageClassName: storage.storageClassName } : {}),
        },
      }],
    },
  };
}

function deployment(cluster: MultigresCluster, name: string, component: string, replicas: number, container: Record<string, unknown>, cell?: string): Manifest {
  const c = cluster.metadata!.name!;
  const labels = { 'app.kubernetes.io/component': component, ...(cell ? { 'multigres.io/cell': cell } : {}) };
  const selector = { [LABEL_CLUSTER]: c, ...labels };
  return {
    apiVersion: 'apps/v1', kind: 'Deployment',
    metadata: meta(name, cluster, c, labels),
    spec: {
      replicas,
      selector: { matchLabels: selector },
      template: {
        metadata: { labels: { ...selector, [LABEL_MANAGED_BY]: MANAGER } },
        spec: {
          ...(cell ? { affinity: inZone(zoneOf(cluster, cell)) } : {}),
          containers: [{ image: cluster.spec.image, env: commonEnv(cluster, cell), volumeMounts: [specMount], ...container }],
          volumes: [specVolume(c)],
        },
      },
    },
  };
}

function service(owner: KubernetesObject, clusterName: string, name: string, selector: Record<string, string>, ports: Array<{ name: string; port: number }>, headless = false): Manifest {
  return {
    apiVersion: 'v1', kind: 'Service',
    metadata: meta(name, owner, clusterName),
    spec: {
      selector: { [LABEL_CLUSTER]: clusterName, ...selector },
      ports: ports.map((p) => ({ ...p, targetPort: p.port, protocol: 'TCP' })),
      ...(headless ? { clusterIP: 'None', publishNotReadyAddresses: true } : {}),
    },
  };
}

function disruptionBudget(owner: KubernetesObject, clusterName: string, name: string, selector: Record<string, string>): Manifest {
  return {
    apiVersion: 'policy/v1', kind: 'PodDisruptionBudget',
    metadata: meta(name, owner, clusterName),
    spec: { maxUnavailable: 1, selector: { matchLabels: { [LABEL_CLUSTER]: clusterName, ...selector } } },
  };
}

/**
 * Every object a cluster and its databases need, except the credentials Secret (made once,
 * never re-applied: see credentialsSecret). The spec must have come from clusterSpecOf.
 */
export function desiredObjects(cluster: MultigresCluster, databases: MultigresDatabase[], spec: ClusterSpec): Manifest[] {
  const c = cluster.metadata!.name!;
  const gatewayPort = spec.gateway.port;
  const httpPort = spec.gateway.httpPort;
  const orchPort = spec.orchestrator.basePort;
  const out: Manifest[] = [
    { apiVersion: 'v1', kind: 'ConfigMap', metadata: meta(names.spec(c), cluster, c), data: { 'spec.json': JSON.stringify(spec, null, 2) } },
    deployment(cluster, names.gateway(c), 'gateway', cluster.spec.gateway?.replicas ?? 2, {
      name: 'gateway', args: ['gateway'], resources: cluster.spec.gateway?.resources ?? {},
      ports: [{ name: 'postgres', containerPort: gatewayPort }, ...(httpPort ? [{ name: 'http', containerPort: httpPort }] : []), { name: 'metrics', containerPort: PORTS.gatewayMetrics }],
    }),
    service(cluster, c, names.gateway(c), { 'app.kubernetes.io/component': 'gateway' },
      [{ name: 'postgres', port: gatewayPort }, ...(httpPort ? [{ name: 'http', port: httpPort }] : [])]),
    disruptionBudget(cluster, c, names.gateway(c), { 'app.kubernetes.io/component': 'gateway' }),
  ];
  for (const cell of spec.cells) {
    out.push(deployment(cluster, names.orchestrator(c, cell), 'orchestrator', 1, {
      name: 'orchestrator', args: ['orchestrator'], resources: cluster.spec.orchestrator?.resources ?? {},
      // The admin API's bearer token: the one the operator and `mg` send.
      env: [...commonEnv(cluster, cell), { name: 'MG_API_TOKEN', valueFrom: { secretKeyRef: { name: names.credentials(c), key: 'orchestrator-api-token' } } }],
      ports: [{ name: 'api', containerPort: orchPort }],
    }, cell));
    out.push(service(cluster, c, names.orchestrator(c, cell), { 'app.kubernetes.io/component': 'orchestrator', 'multigres.io/cell': cell }, [{ name: 'api', port: orchPort }]));
  }
  const groups = instanceGroups(spec);
  for (const db of databases) {
    const dbName = db.metadata!.name!;
    const shards = [...new Set(groups.filter((g) => g.database === dbName).map((g) => g.shard))];
    for (const shard of shards) {
      const selector = { 'multigres.io/database': dbName, 'multigres.io/shard': shardLabel(shard) };
      out.push(service(db, c, names.shard(c, dbName, shard), selector, [{ name: 'postgres', port: PORTS.postgres }, { name: 'pooler', port: PORTS.pooler }], true));
      out.push(disruptionBudget(db, c, names.shard(c, dbName, shard), selector));
    }
    for (const group of groups.filter((g) => g.database === dbName)) out.push(statefulSet(cluster, db, group));
  }
  return out;
}

/** The cluster's secrets, generated once: re-applying would change passwords under running pods. */
export function credentialsSecret(cluster: MultigresCluster, random: (bytes: number) => string): Manifest {
  const c = cluster.metadata!.name!;
  return {
    apiVersion: 'v1', kind: 'Secret', metadata: meta(names.credentials(c), cluster, c), type: 'Opaque',
    stringData: { 'postgres-password': random(18), 'orchestrator-api-token': random(24), 'rest-jwt-secret': random(32) },
  };
}

/** The kinds the operator creates, for listing what it owns (pruning, status). */
export const OWNED_KINDS = [
  { apiVersion: 'v1', kind: 'ConfigMap' }, { apiVersion: 'v1', kind: 'Service' }, { apiVersion: 'v1', kind: 'Secret' },
  { apiVersion: 'apps/v1', kind: 'Deployment' }, { apiVersion: 'apps/v1', kind: 'StatefulSet' },
  { apiVersion: 'policy/v1', kind: 'PodDisruptionBudget' },
] as const;
