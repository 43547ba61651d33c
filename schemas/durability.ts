/**
 * Durability policies and the quorum arithmetic both sides of an election rely
 * on. A policy says how many nodes must hold a commit before it is
 * acknowledged (the primary included): `ANY_<n>` counts nodes, and
 * `MULTI_CELL_ANY_<n>` counts distinct cells. Pure functions, no I/O.
 */

export interface DurabilityPolicy {
  /** Nodes (or, multi-cell, distinct cells) that hold every acknowledged commit, the primary included. */
  n: number;
  multiCell: boolean;
}

export interface Member {
  instanceId: string;
  cell: string;
}

const POLICY = /^(MULTI_CELL_)?ANY_([1-9])$/;

export function parsePolicy(text: string): DurabilityPolicy {
  const m = POLICY.exec(text);
  if (!m) throw new Error(`invalid durability policy ${JSON.stringify(text)}: expected ANY_<n> or MULTI_CELL_ANY_<n> (n 1..9)`);
  return { n: Number(m[2]), multiCell: m[1] !== undefined };
}

/** The default for a shard of `size` instances: the primary plus one replica when there is one. */
export function defaultPolicy(size: number): string {
  return size >= 2 ? 'ANY_2' : 'ANY_1';
}

/** How many of `members` count toward the policy: nodes, or distinct cells. */
function weight(policy: DurabilityPolicy, members: Member[]): number {
  return policy.multiCell ? new Set(members.map((m) => m.cell)).size : members.length;
}

/** Whether these members alone could acknowledge a commit under the policy. */
export function canAcknowledge(policy: DurabilityPolicy, members: Member[]): boolean {
  return weight(policy, members) >= policy.n;
}

/**
 * Whether an election may proceed with `recruited` (voters that pledged the new
 * term and stopped acknowledging the old primary):
 * - revocation: the cohort members not recruited cannot acknowledge a commit on
 *   their own, so the old primary can no longer complete one, and every commit
 *   it did acknowledge is held by at least one recruited voter;
 * - uniqueness: the recruited are a majority of the cohort, so two elections
 *   of the same term (two orchestrators) cannot both succeed.
 */
export function recruitmentSuffices(policy: DurabilityPolicy, cohort: Member[], recruited: Set<string>): boolean {
  const unrecruited = cohort.filter((m) => !recruited.has(m.instanceId));
  const inCohort = cohort.filter((m) => recruited.has(m.instanceId)).length;
  return !canAcknowledge(policy, unrecruited) && inCohort * 2 > cohort.length;
}

/**
 * `synchronous_standby_names` for a primary: ANY k of the other members, where
 * k = n - 1 standbys plus the primary make n. Multi-cell lists only standbys
 * outside the primary's cell; that is exact when each other cell holds at most
 * one of the shard's instances (the default layout), see docs/orchestrator.md.
 * Empty when the policy needs no standby.
 */
export function syncStandbyNames(policy: DurabilityPolicy, cohort: Member[], primary: Member): string {
  const k = policy.n - 1;
  if (k <= 0) return '';
  const standbys = cohort.filter((m) => m.instanceId !== primary.instanceId && (!policy.multiCell || m.cell !== primary.cell));
  const names = standbys.map((m) => `"${m.instanceId.replace(/"/g, '""')}"`);
  return `ANY ${k} (${names.join(', ')})`;
}
