/**
 * The two-phase-commit contract between the coordinator (router/twopc) and the
 * in-doubt resolver (orchestrator): how a global transaction id (gid) is
 * spelled, and the decision table both sides write to. The decision for a gid
 * is its row in the decision table of one shard the transaction touched (the
 * gid names that shard); whoever inserts the row first decides, and the
 * primary key makes that decision unique (docs/decisions/0020-twopc-decision-log.md).
 */

/** Every gid of ours starts with this; prepared transactions without it are not ours to touch. */
export const GID_PREFIX = 'mg2pc';

export type TwoPhaseDecision = 'commit' | 'abort';

/** Schema-qualified name of the decision table, in each shard's database. */
export const DECISION_TABLE = 'mg_twopc.decisions';

/** Created on first use on a shard, by whichever side gets there first (both tolerate the race). */
export const DECISION_DDL = `
CREATE SCHEMA IF NOT EXISTS mg_twopc;
CREATE TABLE IF NOT EXISTS ${DECISION_TABLE} (
  gid text PRIMARY KEY,
  decision text NOT NULL CHECK (decision IN ('commit', 'abort')),
  decided_by text NOT NULL,
  participants text[] NOT NULL DEFAULT '{}',
  decided_at timestamptz NOT NULL DEFAULT now()
)`;

export interface Gid {
  /** The logical database (keyspace). */
  database: string;
  /** The shard whose decision table holds the decision. */
  decisionShard: string;
  /** Who coordinated (a gateway's id). */
  coordinator: string;
  txn: string;
}

// Postgres allows 200 bytes; these parts never hold ':' or a quote, so the gid is safe inside a SQL literal.
const PART = /^[A-Za-z0-9._-]+$/;
const GID_MAX = 200;

export function formatGid(g: Gid): string {
  for (const [field, v] of Object.entries(g)) {
    if (!PART.test(v)) throw new Error(`invalid gid part ${field}: ${JSON.stringify(v)} (letters, digits, . _ - only)`);
  }
  const gid = [GID_PREFIX, g.database, g.decisionShard, g.coordinator, g.txn].join(':');
  if (Buffer.byteLength(gid) > GID_MAX) throw new Error(`gid longer than ${GID_MAX} bytes: ${gid}`);
  return gid;
}

/** The parts of one of our gids, or undefined for any other gid. */
export function parseGid(gid: string): Gid | undefined {
  const parts = gid.split(':');
  if (parts.length !== 5 || parts[0] !== GID_PREFIX || !parts.slice(1).every((p) => PART.test(p))) return undefined;
  const [, database, decisionShard, coordinator, txn] = parts;
  return { database, decisionShard, coordinator, txn };
}

/** `'gid'` as a SQL literal (formatGid/parseGid guarantee it holds no quote). */
export const gidLiteral = (gid: string) => `'${gid.replace(/'/g, "''")}'`;
