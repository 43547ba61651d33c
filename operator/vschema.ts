/**
 * A sharded database's VSchema by reference (decision 0075): `spec.vschemaRef` names a
 * ConfigMap key holding it (YAML or JSON), and the operator applies it the way `mg vschema
 * apply` does, a PUT to the orchestrators' admin API, which validates it and publishes it as
 * the next version on the topology log every gateway folds. The orchestrator is the one
 * validator: the operator never judges a VSchema itself, it shows the orchestrator's refusal.
 *
 * Once per content: the hash of the text last sent (applied or refused) is kept in the
 * database's status, so a reconcile, a resync or the other operator replica taking over never
 * sends it again; a changed ConfigMap has another hash and is sent. Before sending, the topology
 * log is asked too: a VSchema it already serves (an operator that died between the PUT and the
 * status, or `mg vschema apply` of the same one) is recorded, not published as another version.
 */
import { createHash } from 'node:crypto';
import YAML from 'yaml';
import { parseVSchema, type VSchemaRecord } from '../schemas/index.ts';
import type { KubeClient } from './kube.ts';
import type { OrchestratorApi } from './orchestrator.ts';
import type { Condition, MultigresDatabase, VSchemaStatus } from './resources.ts';

/** What a reconcile writes into the database's status: the condition, what was sent, when to look again. */
export interface VSchemaOutcome {
  condition?: Condition;
  /** Unchanged when undefined; null clears it (no vschemaRef any more). */
  sent?: VSchemaStatus | null;
  /** A failure that may pass (no orchestrator answering, the database not on the log yet): try again after this long. */
  retryMs?: number;
}

/** The failures that may pass on their own are retried after this long (the ConfigMap watch wakes the rest). */
export const VSCHEMA_RETRY_MS = 5_000;

const DEFAULT_KEY = 'vschema.json';

const applied = (reason: string, message: string): Condition => ({ type: 'VSchemaApplied', status: 'True', reason, message });
const notApplied = (reason: string, message: string): Condition => ({ type: 'VSchemaApplied', status: 'False', reason, message });

/**
 * One database's VSchema step. `held`: the VSchema the topology log serves for it, and whether
 * the log was read to its end (nothing is sent before: the log's end wakes the reconcile).
 */
export async function reconcileVSchema(
  kube: Pick<KubeClient, 'configMapData'>, db: MultigresDatabase, held: { caughtUp: boolean; record?: VSchemaRecord },
  orchestrator: () => Promise<OrchestratorApi>,
): Promise<VSchemaOutcome> {
  const ref = db.spec.vschemaRef;
  const previous = db.status?.vschema;
  if (!ref) return previous ? { sent: null } : {};
  const name = db.metadata!.name!;
  if (!db.spec.sharded) return { condition: notApplied('NotSharded', `database ${name} is not sharded (sharded: true): a VSchema applies to sharded databases only`) };
  const key = ref.key ?? DEFAULT_KEY;
  const where = `ConfigMap ${ref.name} key ${key}`;
  const data = await kube.configMapData(db.metadata!.namespace!, ref.name);
  if (!data) return { condition: notApplied('ConfigMapNotFound', `ConfigMap ${ref.name} (vschemaRef) does not exist in namespace ${db.metadata!.namespace}`) };
  const text = data[key];
  if (text === undefined) return { condition: notApplied('KeyNotFound', `ConfigMap ${ref.name} has no key ${key} (it has: ${Object.keys(data).join(', ') || 'none'})`) };

  const sent: VSchemaStatus = { configMap: ref.name, key, hash: createHash('sha256').update(text).digest('hex') };
  // This content was sent already: its outcome stands (and is shown again after a missing ConfigMap came back).
  if (previous && previous.hash === sent.hash && previous.configMap === sent.configMap && previous.key === sent.key) return { condition: conditionOf(previous) };
  if (!held.caughtUp) return {};

  let raw: unknown;
  try {
    raw = YAML.parse(text) ?? {};
  } catch (err) {
    return outcome({ ...sent, error: `${where} is neither YAML nor JSON: ${(err as Error).message}` });
  }
  if (held.record && servesAlready(held.record, raw)) return outcome({ ...sent, version: Number(held.record.version) });
  try {
    const r = await (await orchestrator()).applyVSchema(name, raw);
    if (r.status === 200) return outcome({ ...sent, version: Number(r.body.version) });
    // 400 is the orchestrator's verdict on this content: shown, and not sent again until the ConfigMap changes.
    if (r.status === 400) return outcome({ ...sent, error: `${where} refused by the orchestrator: ${r.body.error}` });
    return { condition: notApplied('ApplyFailed', `${where}: HTTP ${r.status}: ${r.body.error ?? 'no reason given'}; retrying`), retryMs: VSCHEMA_RETRY_MS };
  } catch (err) {
    return { condition: notApplied('ApplyFailed', `${where}: ${(err as Error).message}; retrying`), retryMs: VSCHEMA_RETRY_MS };
  }
}

const outcome = (sent: VSchemaStatus): VSchemaOutcome => ({ sent, condition: conditionOf(sent) });

/** The condition of content that was sent: applied as a version, or refused. */
function conditionOf(sent: VSchemaStatus): Condition {
  if (sent.version !== undefined) return applied('Applied', `ConfigMap ${sent.configMap} key ${sent.key} is version ${sent.version} on the topology log`);
  return notApplied('InvalidVSchema', sent.error ?? 'refused');
}

/** Whether the log's VSchema is this one (compared as the orchestrator would publish it; one it would refuse is never served). */
function servesAlready(record: VSchemaRecord, raw: unknown): boolean {
  try {
    return JSON.stringify(parseVSchema(raw)) === JSON.stringify(record.vschema);
  } catch {
    return false;
  }
}
