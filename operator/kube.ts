/**
 * The operator's few API calls, behind one small surface: server-side apply of owned objects,
 * listing and deleting them, merge patches of custom resources and their status, the pods and
 * the API token a rolling update needs, and the ConfigMap a database's VSchema is in.
 */
import {
  ApiException, CoreV1Api, CustomObjectsApi, KubernetesObjectApi, PatchStrategy, setHeaderOptions,
  type KubeConfig, type KubernetesObject, type V1Pod,
} from '@kubernetes/client-node';
import { GROUP, LABEL_CLUSTER, LABEL_MANAGED_BY, MANAGER, VERSION } from './resources.ts';

export const PLURALS = { MultigresCluster: 'multigresclusters', MultigresDatabase: 'multigresdatabases' } as const;
type CustomKind = keyof typeof PLURALS;

/** The HTTP status of a failed API call, or undefined when it never got an answer. */
export function statusOf(err: unknown): number | undefined {
  return err instanceof ApiException ? err.code : undefined;
}

/** What a reconcile needs of the API (a fake in unit tests). */
export type KubeClient = Pick<Kube, 'apply' | 'scale' | 'createIfMissing' | 'listOwned' | 'delete' | 'listCustom' | 'getCustom' | 'patchCustom' | 'patchStatus' | 'listPods' | 'deletePod' | 'secretValue' | 'configMapData'>;

export class Kube {
  private readonly objects: KubernetesObjectApi;
  private readonly custom: CustomObjectsApi;
  private readonly core: CoreV1Api;

  constructor(kc: KubeConfig) {
    this.objects = KubernetesObjectApi.makeApiClient(kc);
    this.custom = kc.makeApiClient(CustomObjectsApi);
    this.core = kc.makeApiClient(CoreV1Api);
  }

  async listPods(namespace: string, labels: Record<string, string>): Promise<V1Pod[]> {
    const labelSelector = Object.entries(labels).map(([k, v]) => `${k}=${v}`).join(',');
    return (await this.core.listNamespacedPod({ namespace, labelSelector })).items;
  }

  /** Deletes exactly this pod: a newer one of the same name (already recreated) is left alone. */
  async deletePod(pod: V1Pod): Promise<void> {
    try {
      await this.core.deleteNamespacedPod({ name: pod.metadata!.name!, namespace: pod.metadata!.namespace!, body: { preconditions: { uid: pod.metadata!.uid } } });
    } catch (err) {
      if (statusOf(err) !== 404 && statusOf(err) !== 409) throw err;
    }
  }

  /** One key of a Secret, decoded; undefined when the Secret or the key is missing. */
  async secretValue(namespace: string, name: string, key: string): Promise<string | undefined> {
    try {
      const value = (await this.core.readNamespacedSecret({ name, namespace })).data?.[key];
      return value === undefined ? undefined : Buffer.from(value, 'base64').toString('utf8');
    } catch (err) {
      if (statusOf(err) === 404) return undefined;
      throw err;
    }
  }

  /** A ConfigMap's data (a database's VSchema by reference); undefined when there is no such ConfigMap. */
  async configMapData(namespace: string, name: string): Promise<Record<string, string> | undefined> {
    try {
      return (await this.core.readNamespacedConfigMap({ name, namespace })).data ?? {};
    } catch (err) {
      if (statusOf(err) === 404) return undefined;
      throw err;
    }
  }

  /**
   * Server-side apply as the operator's field manager: idempotent (an unchanged object is not
   * written), and fields other managers own (a StatefulSet's status, an HPA's replicas) stay theirs.
   */
  apply<T extends KubernetesObject>(obj: T): Promise<T> {
    return this.objects.patch(obj, undefined, undefined, MANAGER, true, PatchStrategy.ServerSideApply);
  }

  /** Sets a workload's replicas, leaving the rest of it as it is. */
  async scale(obj: KubernetesObject, replicas: number): Promise<void> {
    await this.objects.patch({ apiVersion: obj.apiVersion, kind: obj.kind, metadata: { name: obj.metadata!.name, namespace: obj.metadata!.namespace }, spec: { replicas } } as KubernetesObject,
      undefined, undefined, MANAGER, undefined, PatchStrategy.MergePatch);
  }

  /** Creates the object unless one of that name exists; returns whether it created it. */
  async createIfMissing(obj: KubernetesObject): Promise<boolean> {
    try {
      await this.objects.create(obj, undefined, undefined, MANAGER);
      return true;
    } catch (err) {
      if (statusOf(err) === 409) return false;
      throw err;
    }
  }

  /** The objects of one kind the operator made for a cluster. */
  async listOwned(apiVersion: string, kind: string, namespace: string, cluster: string): Promise<KubernetesObject[]> {
    const list = await this.objects.list(apiVersion, kind, namespace, undefined, undefined, undefined, undefined, `${LABEL_MANAGED_BY}=${MANAGER},${LABEL_CLUSTER}=${cluster}`);
    return list.items.map((o) => ({ ...o, apiVersion, kind }));
  }

  async delete(obj: KubernetesObject): Promise<void> {
    try {
      await this.objects.delete(obj, undefined, undefined, undefined, undefined, 'Background');
    } catch (err) {
      if (statusOf(err) !== 404) throw err;
    }
  }

  async listCustom<T>(kind: CustomKind, namespace: string): Promise<T[]> {
    const list = await this.custom.listNamespacedCustomObject({ group: GROUP, version: VERSION, namespace, plural: PLURALS[kind] });
    return (list as { items: T[] }).items;
  }

  /** The resource, or undefined when it is gone. */
  async getCustom<T>(kind: CustomKind, namespace: string, name: string): Promise<T | undefined> {
    try {
      return (await this.custom.getNamespacedCustomObject({ group: GROUP, version: VERSION, namespace, plural: PLURALS[kind], name })) as T;
    } catch (err) {
      if (statusOf(err) === 404) return undefined;
      throw err;
    }
  }

  /** A JSON merge patch of the resource (metadata: finalizers, owner references). */
  patchCustom(kind: CustomKind, namespace: string, name: string, body: object): Promise<unknown> {
    return this.custom.patchNamespacedCustomObject({ group: GROUP, version: VERSION, namespace, plural: PLURALS[kind], name, body },
      setHeaderOptions('Content-Type', PatchStrategy.MergePatch));
  }

  /** A JSON merge patch of the status subresource. */
  patchStatus(kind: CustomKind, namespace: string, name: string, status: object): Promise<unknown> {
    return this.custom.patchNamespacedCustomObjectStatus({ group: GROUP, version: VERSION, namespace, plural: PLURALS[kind], name, body: { status } },
      setHeaderOptions('Content-Type', PatchStrategy.MergePatch));
  }
}
