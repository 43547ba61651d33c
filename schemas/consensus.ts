/**
 * The consensus part of the agent-command contract: arguments of RECRUIT,
 * PROMOTE, BOOTSTRAP and REPOINT, the position a voter reports, and the shard rule table
 * inside Postgres. Both the voter (ingest) and MultiOrch (orchestrator) use it.
 */

/**
 * The physical replication slot a replica streams through, on its upstream (named after the instance: slot names
 * allow only [a-z0-9_], at most 63 characters). The agent creates it; MultiOrch drops it when the replica is removed.
 */
export function slotNameOf(instanceId: string): string {
  return instanceId.toLowerCase().replace(/[^a-z0-9_]/g, '_').slice(0, 63);
}

/** Where the shard's current rule lives, inside Postgres (database `postgres`), replicated with the data. */
export const RULE_TABLE = 'multigres.rule';

export const RULE_DDL = `
CREATE SCHEMA IF NOT EXISTS multigres;
CREATE TABLE IF NOT EXISTS ${RULE_TABLE} (
  rule_number bigint PRIMARY KEY,
  term bigint NOT NULL,
  primary_id text NOT NULL,
  cohort text[] NOT NULL,
  policy text NOT NULL,
  decided_by text NOT NULL,
  decided_at timestamptz NOT NULL DEFAULT now()
)`;

/** What a voter answers to RECRUIT and PROMOTE (as JSON in the command result). */
export interface VoterPosition {
  term: bigint;
  /** WAL this node holds (received or replayed on a standby, flushed on a primary). */
  lsn: bigint;
  /** The newest rule in its data (0 when none): elections rank by (ruleTerm, lsn). */
  ruleNumber: bigint;
  ruleTerm: bigint;
  timeline: number;
  inRecovery: boolean;
  /** No data directory yet (a new shard's instance): it can be bootstrapped (initdb) or cloned, not promoted. */
  empty: boolean;
}

export function encodePosition(p: VoterPosition): string {
  return JSON.stringify(p, (_k, v) => (typeof v === 'bigint' ? v.toString() : v));
}

export function decodePosition(text: string): VoterPosition {
  const raw = JSON.parse(text) as Record<string, string | number | boolean>;
  return {
    term: BigInt(raw.term as string), lsn: BigInt(raw.lsn as string), ruleNumber: BigInt(raw.ruleNumber as string),
    ruleTerm: BigInt(raw.ruleTerm as string), timeline: Number(raw.timeline), inRecovery: Boolean(raw.inRecovery),
    empty: raw.empty === true,
  };
}

/** Orders positions: a newer rule first, then more WAL. */
export function comparePositions(a: VoterPosition, b: VoterPosition): number {
  if (a.ruleTerm !== b.ruleTerm) return a.ruleTerm > b.ruleTerm ? 1 : -1;
  if (a.lsn !== b.lsn) return a.lsn > b.lsn ? 1 : -1;
  return 0;
}

/** The refusal message of a voter that pledged a newer term; MultiOrch reads the term back from it. */
export const refusal = (asked: bigint, pledged: bigint) => `term ${asked} refused: pledged term ${pledged}`;

export function pledgedTermIn(message: string): bigint | undefined {
  const m = /pledged term (\d+)/.exec(message);
  return m ? BigInt(m[1]) : undefined;
}
