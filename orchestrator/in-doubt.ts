/**
 * The in-doubt resolver: finishes two-phase commits whose coordinator did not
 * (it crashed, or lost a connection). Every scan reads pg_prepared_xacts on
 * every shard's current primary (a prepared transaction survives a failover
 * to a synchronous replica, so the new primary has it); one of ours prepared
 * longer than the grace period is committed or rolled back as its decision
 * row says. Without a row it is presumed aborted: the resolver inserts the
 * ABORT row itself, and the table's primary key makes that and a late
 * coordinator's COMMIT mutually exclusive (docs/twopc.md). Every orchestrator
 * runs one; the work is idempotent, and only the one whose step took effect
 * records it.
 */
import type pg from 'pg';
import type { Logger } from '../common/log.ts';
import { counter, gauge } from '../common/metrics.ts';
import { queryAt, withConnection, type PostgresAddress } from '../common/postgres.ts';
import {
  DECISION_DDL, DECISION_TABLE, GID_PREFIX, gidLiteral, parseGid, shardGroupOf, type TwoPhaseDecision,
} from '../schemas/index.ts';
import type { OrchConfig } from './config.ts';
import type { Journal } from './journal.ts';
import type { ClusterWatch, ShardView } from './view.ts';

const resolved = counter('mg_twopc_resolved_total', 'In-doubt prepared transactions this orchestrator finished, by decision', ['decision']);
const presumedAborts = counter('mg_twopc_presumed_aborts_total', 'ABORT decisions this orchestrator recorded for transactions without a decision');
const failures = counter('mg_twopc_resolve_failures_total', 'Resolution steps that failed (retried at the next scan)', ['step']);
const pruned = counter('mg_twopc_decisions_pruned_total', 'Decision rows deleted after the retention period (their transaction finished everywhere)');
const inDoubt = gauge('mg_twopc_in_doubt', 'Prepared transactions of ours older than the grace period at the last scan, per shard', ['shard']);

const UNDEFINED_OBJECT = '42704'; // the prepared transaction is gone: someone finished it
const UNDEFINED_TABLE = '42P01';
const INVALID_SCHEMA_NAME = '3F000';
const codeOf = (err: unknown) => (err as { code?: string }).code;

interface PreparedRow { gid: string; database: string; age_ms: number }

export class InDoubtResolver {
  private timer: NodeJS.Timeout | undefined;
  private scanning: Promise<void> | undefined;
  /** Gids not of our format already reported, so each is logged once. */
  private readonly foreign = new Set<string>();
  private lastPrune = 0;

  constructor(
    private readonly cfg: Pick<OrchConfig, 'id' | 'twopcGraceMs' | 'twopcScanMs' | 'twopcRetentionMs'>,
    private readonly watch: ClusterWatch, private readonly journal: Journal, private readonly log: Logger,
  ) {}

  start(): void {
    this.timer = setInterval(() => {
      this.scanning ??= this.scan().finally(() => (this.scanning = undefined));
    }, this.cfg.twopcScanMs);
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.scanning;
  }

  /** One pass over every shard's primary; what fails is retried at the next pass. */
  async scan(): Promise<void> {
    const shards = this.watch.shards();
    const seen = await Promise.all(shards.map(async (shard) => {
      const at = this.primaryAddress(shard);
      if (!at) return undefined;
      let rows: PreparedRow[];
      try {
        rows = await queryAt<PreparedRow>(at, `SELECT gid, database, (extract(epoch FROM now() - prepared) * 1000)::float8 AS age_ms
          FROM pg_catalog.pg_prepared_xacts WHERE gid LIKE '${GID_PREFIX}:%' ORDER BY prepared`, [], 3_000);
      } catch (err) {
        failures.inc({ step: 'scan' });
        this.log.debug({ err, shard: shard.key }, 'could not list prepared transactions');
        return undefined;
      }
      const old = rows.filter((r) => r.age_ms >= this.cfg.twopcGraceMs);
      inDoubt.set({ shard: shard.key }, old.length);
      for (const row of old) await this.resolve(shard, at, row);
      return { at, gids: rows.map((r) => r.gid) };
    }));
    // Pruning needs every primary's list: a gid still prepared on a shard not heard from must keep its decision.
    if (Date.now() - this.lastPrune >= Math.min(60_000, this.cfg.twopcRetentionMs) && seen.every((x) => x !== undefined)) {
      this.lastPrune = Date.now();
      const stillPrepared = seen.flatMap((x) => x!.gids);
      await Promise.all(seen.map((x) => this.prune(x!.at, stillPrepared)));
    }
  }

  /** Deletes decisions older than the retention whose transaction is prepared nowhere, in every database of one primary. */
  private async prune(at: PostgresAddress, stillPrepared: string[]): Promise<void> {
    try {
      const dbs = await queryAt<{ datname: string }>(at, 'SELECT datname FROM pg_catalog.pg_database WHERE datallowconn AND NOT datistemplate', [], 3_000);
      for (const { datname } of dbs) {
        const deleted = await withConnection({ ...at, database: datname }, async (c) => {
          const { rows: [t] } = await c.query<{ exists: boolean }>(`SELECT to_regclass('${DECISION_TABLE}') IS NOT NULL AS exists`);
          if (!t.exists) return 0;
          const r = await c.query(`DELETE FROM ${DECISION_TABLE} WHERE decided_at < now() - make_interval(secs => $1::float8 / 1000) AND gid <> ALL($2::text[])`,
            [this.cfg.twopcRetentionMs, stillPrepared]);
          return r.rowCount ?? 0;
        }, 10_000);
        if (deleted > 0) {
          pruned.inc(deleted);
          this.log.info({ database: datname, at: `${at.host}:${at.port}`, deleted }, 'pruned old two-phase-commit decisions');
        }
      }
    } catch (err) {
      failures.inc({ step: 'prune' });
      this.log.debug({ err }, 'could not prune decisions');
    }
  }

  /**
   * The shard's primary, unless it is out of service: during an in-place
   * restore a shard may already hold the restored prepared transactions while
   * its decision shard still holds decisions made after the target; each is
   * read again once its shard serves (restored, elected).
   */
  private primaryAddress(shard: ShardView): PostgresAddress | undefined {
    const inst = shard.primary && this.watch.topology.instances.get(shard.primary.instanceId);
    if (!inst || this.watch.topology.serving.get(inst.instanceId) === 'NOT_SERVING') return undefined;
    return { host: inst.host, port: inst.port };
  }

  private async resolve(shard: ShardView, at: PostgresAddress, row: PreparedRow): Promise<void> {
    const gid = parseGid(row.gid);
    // A transaction of a database this shard does not serve came with a restore (mg backup restore --as), which decides it from its own copy of the decisions.
    if (!gid || shardGroupOf(this.watch.topology, gid.database) !== shard.database) {
      if (!this.foreign.has(row.gid)) this.log.warn({ gid: row.gid, shard: shard.key }, 'prepared transaction with our prefix but not our gid format or not of this shard\'s databases; left alone');
      this.foreign.add(row.gid);
      return;
    }
    const decisionShard = this.watch.shard(gid.database, gid.decisionShard);
    const decisionAt = decisionShard && this.primaryAddress(decisionShard);
    if (!decisionAt) {
      failures.inc({ step: 'decision' });
      this.log.warn({ gid: row.gid }, `no primary known for ${gid.database}/${gid.decisionShard}, which holds the decision; retrying`);
      return;
    }
    let decision: { decision: TwoPhaseDecision; decidedBy: string; ours: boolean };
    try {
      decision = await withConnection({ ...decisionAt, database: row.database }, (c) => this.decide(c, row.gid), 5_000);
    } catch (err) {
      failures.inc({ step: 'decision' });
      this.log.warn({ err, gid: row.gid }, 'could not read or record the decision; retrying');
      return;
    }
    const details = { gid: row.gid, decision: decision.decision, decidedBy: decision.decidedBy, ageMs: String(Math.round(row.age_ms)) };
    if (decision.ours) {
      presumedAborts.inc();
      await this.journal.record(gid.database, gid.decisionShard, 'DECIDED', 'twopc',
        `no decision for ${row.gid} after ${Math.round(row.age_ms)} ms: abort (presumed)`, { details }).catch(() => {});
    }
    const verb = decision.decision === 'commit' ? 'COMMIT' : 'ROLLBACK';
    try {
      await withConnection({ ...at, database: row.database }, (c) => c.query(`${verb} PREPARED ${gidLiteral(row.gid)}`), 10_000);
    } catch (err) {
      if (codeOf(err) === UNDEFINED_OBJECT) return; // another orchestrator (or the coordinator) finished it meanwhile
      failures.inc({ step: verb.toLowerCase() });
      this.log.warn({ err, gid: row.gid, shard: shard.key }, `${verb} PREPARED failed; retrying`);
      return;
    }
    resolved.inc({ decision: decision.decision });
    this.log.info({ ...details, shard: shard.key }, `resolved an in-doubt transaction: ${verb} PREPARED`);
    await this.journal.record(shard.database, shard.shard, 'ACTED', 'twopc', `${verb} PREPARED ${row.gid} (decision ${decision.decision} by ${decision.decidedBy})`, { details })
      .catch(() => {});
  }

  /**
   * The gid's decision, recording ABORT when there is none. The INSERT waits
   * for a coordinator's concurrent INSERT of COMMIT to end, so exactly one of
   * the two gets in, and both sides act on the row that did.
   */
  private async decide(c: pg.Client, gid: string): Promise<{ decision: TwoPhaseDecision; decidedBy: string; ours: boolean }> {
    for (let attempt = 1; ; attempt++) {
      try {
        const inserted = await c.query(`INSERT INTO ${DECISION_TABLE} (gid, decision, decided_by) VALUES ($1, 'abort', $2) ON CONFLICT (gid) DO NOTHING`, [gid, this.cfg.id]);
        if (inserted.rowCount === 1) return { decision: 'abort', decidedBy: this.cfg.id, ours: true };
        const { rows } = await c.query<{ decision: TwoPhaseDecision; decided_by: string }>(`SELECT decision, decided_by FROM ${DECISION_TABLE} WHERE gid = $1`, [gid]);
        return { decision: rows[0].decision, decidedBy: rows[0].decided_by, ours: false };
      } catch (err) {
        const code = codeOf(err);
        if (attempt > 1 || (code !== UNDEFINED_TABLE && code !== INVALID_SCHEMA_NAME)) throw err;
        // No two-phase commit ever reached this shard's decision table: create it (a concurrent creator may win).
        await c.query(DECISION_DDL).catch(() => {});
      }
    }
  }
}

/**
 * Finishes the prepared transactions a restore brought along (`mg backup
 * restore --as`): the restored copy of each decision shard's table says what
 * had been decided by the restore's target point, and a transaction without
 * a decision row there is rolled back (presumed abort), so every shard of
 * the restored database agrees at that point. `database`: the Postgres
 * database holding them; `primaries`: the restored shard primaries by shard
 * name (the same names as the source's).
 */
export async function finishRestoredTransactions(database: string, primaries: Map<string, PostgresAddress>): Promise<{ committed: number; rolledBack: number }> {
  const done = { committed: 0, rolledBack: 0 };
  for (const [shard, at] of primaries) {
    const prepared = await queryAt<{ gid: string }>({ ...at, database },
      `SELECT gid FROM pg_catalog.pg_prepared_xacts WHERE database = current_database() AND gid LIKE '${GID_PREFIX}:%' ORDER BY prepared`);
    for (const { gid } of prepared) {
      const decisionShard = parseGid(gid)?.decisionShard;
      const decisionAt = decisionShard === undefined ? undefined : primaries.get(decisionShard);
      if (!decisionAt) throw new Error(`prepared transaction ${gid} on shard ${shard}: its decision shard is not a shard of ${database}`);
      const decided = await queryAt<{ decision: TwoPhaseDecision }>({ ...decisionAt, database }, `SELECT decision FROM ${DECISION_TABLE} WHERE gid = $1`, [gid])
        .catch((err) => {
          if (codeOf(err) === UNDEFINED_TABLE || codeOf(err) === INVALID_SCHEMA_NAME) return [];
          throw err;
        });
      const commit = decided[0]?.decision === 'commit';
      await queryAt({ ...at, database }, `${commit ? 'COMMIT' : 'ROLLBACK'} PREPARED ${gidLiteral(gid)}`, [], 10_000);
      if (commit) done.committed++;
      else done.rolledBack++;
    }
  }
  return done;
}
