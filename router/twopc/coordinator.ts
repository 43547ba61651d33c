/**
 * Two-phase commit of one transaction across shards (docs/twopc.md, decision
 * 0032): PREPARE TRANSACTION on every participant but the first, then the
 * first participant (the decision shard) commits one-phase with the COMMIT
 * decision row in its own transaction, so that COMMIT is the decision; then
 * COMMIT PREPARED on the others. A transaction left in doubt by a crash is
 * finished by the resolver in MultiOrch from that same row (or its absence:
 * presumed abort), so every shard ends the same way.
 */
import { randomUUID } from 'node:crypto';
import type { Logger } from '../../common/log.ts';
import { counter, histogram } from '../../common/metrics.ts';
import { DECISION_DDL, DECISION_TABLE, formatGid, gidLiteral } from '../../schemas/index.ts';
import { PgError, SQLSTATE } from '../protocol/errors.ts';

/**
 * One shard's side of the transaction: a connection (through the shard
 * primary's pooler) holding the transaction open. `query` runs `sql` with the
 * simple query protocol (it may hold several statements) and rejects with an
 * error whose `code` is the SQLSTATE when Postgres answers with an error.
 */
export interface Participant {
  shard: string;
  query(sql: string): Promise<void>;
}

/**
 * Test hook, not a tuning knob: a step at which every two-phase commit of
 * this coordinator stops for good (logging "stopped at a fault point" with
 * the gid), so a fault test can kill -9 the process exactly there. The
 * gateway takes it from MG_TWOPC_FAULT_POINT (docs/twopc.md, "Fault points").
 *   before-decision         every other participant prepared; the decision shard not committed
 *   after-decision          the decision shard committed; no COMMIT PREPARED sent
 *   during-commit-prepared  COMMIT PREPARED done on every other participant but the last
 */
export const FAULT_POINTS = ['before-decision', 'after-decision', 'during-commit-prepared'] as const;
export type FaultPoint = (typeof FAULT_POINTS)[number];

export interface CoordinatorDeps {
  /** Names this coordinator in gids and decisions (e.g. the gateway's id): letters, digits, `.`, `_`, `-`. */
  id: string;
  log: Logger;
  faultPoint?: FaultPoint;
}

const SERIALIZATION_FAILURE = '40001';
const UNDEFINED_TABLE = '42P01';
const INVALID_SCHEMA_NAME = '3F000';
/** SQLSTATE classes after which a statement may or may not have committed: connection lost, server shut down, system or internal error. */
const OUTCOME_UNKNOWN = /^(08|57|58|XX)/;

const commits = counter('mg_twopc_commits_total', 'Cross-shard commits by outcome (committed, aborted, unknown)', ['outcome']);
const commitSeconds = histogram('mg_twopc_commit_duration_seconds', 'Time of a two-phase commit, from the first PREPARE to the last COMMIT PREPARED',
  [], [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 5]);
const leftToResolver = counter('mg_twopc_left_to_resolver_total', 'Prepared transactions a coordinator could not finish itself (the resolver will)', ['phase']);

const codeOf = (err: unknown): string | undefined => (err as { code?: unknown })?.code as string | undefined;
const messageOf = (err: unknown): string => (err as Error)?.message ?? String(err);

/**
 * Postgres answers PREPARE TRANSACTION in a failed transaction with a plain
 * ROLLBACK, no error: this check in the same round trip turns that into one.
 * (A CASE keeps the cast from being folded at plan time.)
 */
const prepareSql = (gid: string) => `PREPARE TRANSACTION ${gidLiteral(gid)};
SELECT (CASE WHEN count(*) = 0 THEN ${gidLiteral(`transaction ${gid} was not prepared (it had failed)`)} END)::int
FROM pg_catalog.pg_prepared_xacts WHERE gid = ${gidLiteral(gid)}`;

export class TwoPhaseCoordinator {
  /** Decision shards (`db/shard`) whose decision table this process has seen: the others get the DDL in the deciding transaction. */
  private readonly tablesSeen = new Set<string>();

  constructor(private readonly deps: CoordinatorDeps) {}

  /**
   * Commits the participants' transactions atomically. Resolves once every
   * participant has committed, or once the COMMIT decision is durable when a
   * COMMIT PREPARED fails (the resolver finishes those). Rejects with a
   * PgError when the transaction was rolled back everywhere (40001, or the
   * participant's own SQLSTATE when its PREPARE or the decision shard's
   * COMMIT failed, e.g. a deferred constraint), or with 08007 when the
   * decision could not be confirmed.
   */
  async commit(database: string, participants: Participant[]): Promise<void> {
    if (participants.length === 0) return;
    const shards = participants.map((p) => p.shard);
    if (new Set(shards).size !== shards.length) throw new PgError('ERROR', SQLSTATE.INTERNAL_ERROR, `two-phase commit with a shard twice: ${shards.join(', ')}`);
    if (participants.length === 1) return this.commitOne(participants[0]);

    const [decider, ...others] = participants;
    const gid = formatGid({ database, decisionShard: decider.shard, coordinator: this.deps.id, txn: randomUUID() });
    const log = this.deps.log.child({ gid, shards });
    const end = commitSeconds.startTimer();

    const prepared = await Promise.allSettled(others.map((p) => p.query(prepareSql(gid))));
    const failed = prepared.findIndex((r) => r.status === 'rejected');
    if (failed >= 0) {
      const reason = (prepared[failed] as PromiseRejectedResult).reason;
      await this.rollBack(gid, participants, [false, ...prepared.map((r) => r.status === 'fulfilled')], log);
      commits.inc({ outcome: 'aborted' });
      log.info({ shard: others[failed].shard, err: messageOf(reason) }, 'two-phase commit aborted: a PREPARE failed');
      // A constraint checked at PREPARE (deferred) or the participant's own rollback keeps its SQLSTATE; anything else is 40001 (retry).
      const code = codeOf(reason);
      throw new PgError('ERROR', code && /^(23|40)/.test(code) ? code : SERIALIZATION_FAILURE,
        `could not prepare the transaction on shard ${others[failed].shard}: ${messageOf(reason)}`,
        'The transaction was rolled back on every shard.');
    }
    await this.reach('before-decision', log);

    await this.decideCommit(database, gid, decider, others, log);
    await this.reach('after-decision', log);

    const last = others.length - 1;
    const earlier: Array<Promise<void>> = [];
    const done = await Promise.allSettled(others.map(async (p, i) => {
      if (i === last && this.deps.faultPoint === 'during-commit-prepared') {
        await Promise.allSettled(earlier);
        await this.reach('during-commit-prepared', log);
      }
      const committing = p.query(`COMMIT PREPARED ${gidLiteral(gid)}`);
      earlier.push(committing);
      return committing;
    }));
    done.forEach((r, i) => {
      if (r.status === 'fulfilled') return;
      leftToResolver.inc({ phase: 'commit' });
      log.warn({ shard: others[i].shard, err: messageOf(r.reason) }, 'COMMIT PREPARED failed after the commit decision; the resolver will finish it');
    });
    commits.inc({ outcome: 'committed' });
    end();
  }

  /**
   * One shard commits atomically on its own. Postgres answers COMMIT in a
   * failed transaction with a plain ROLLBACK; the SELECT before it fails
   * there instead (and the rest of the query is skipped), so that is an error.
   */
  private async commitOne(p: Participant): Promise<void> {
    try {
      await p.query('SELECT; COMMIT');
    } catch (err) {
      await p.query('ROLLBACK').catch(() => {});
      const code = codeOf(err);
      throw new PgError('ERROR', code ?? SERIALIZATION_FAILURE, `could not commit the transaction on shard ${p.shard}: ${messageOf(err)}`);
    }
  }

  /**
   * The decision shard's transaction inserts the COMMIT row and commits, in
   * one round trip: when that COMMIT returns, the transaction is committed.
   * A row already there can only be the resolver's ABORT (it gave up on
   * this transaction as too old; the primary key settles the race whichever
   * comes first), and then everything rolls back. A failed transaction or a
   * deferred constraint there fails the INSERT or the COMMIT the same way.
   */
  private async decideCommit(database: string, gid: string, decider: Participant, others: Participant[], log: Logger): Promise<void> {
    const table = `${database}/${decider.shard}`;
    const insert = `INSERT INTO ${DECISION_TABLE} (gid, decision, decided_by, participants) VALUES (${gidLiteral(gid)}, 'commit', ${gidLiteral(this.deps.id)}, ARRAY[${[decider, ...others].map((p) => gidLiteral(p.shard)).join(', ')}])`;
    try {
      await decider.query(`${this.tablesSeen.has(table) ? '' : `${DECISION_DDL};\n`}${insert};\nCOMMIT`);
      this.tablesSeen.add(table);
      return;
    } catch (err) {
      const code = codeOf(err);
      if (code === undefined || OUTCOME_UNKNOWN.test(code)) {
        commits.inc({ outcome: 'unknown' });
        leftToResolver.inc({ phase: 'decision' });
        log.error({ err: messageOf(err) }, 'two-phase commit in doubt: the decision could not be confirmed');
        throw new PgError('ERROR', SQLSTATE.TRANSACTION_RESOLUTION_UNKNOWN,
          `the outcome of the transaction is unknown: committing it on shard ${decider.shard}, which records the decision, failed: ${messageOf(err)}`,
          `It is committed on every shard or on none; the in-doubt resolver settles it (gid ${gid}).`);
      }
      // Postgres refused: the decision shard's transaction is rolled back, so nothing was decided and the answer is abort.
      if (code === UNDEFINED_TABLE || code === INVALID_SCHEMA_NAME) this.tablesSeen.delete(table);
      await this.rollBack(gid, [decider, ...others], [false, ...others.map(() => true)], log);
      commits.inc({ outcome: 'aborted' });
      if (messageOf(err).includes('decisions_pkey')) {
        log.warn('two-phase commit aborted: the resolver had already decided to abort it');
        throw new PgError('ERROR', SERIALIZATION_FAILURE, 'the transaction was rolled back: it stayed prepared too long and the in-doubt resolver aborted it',
          'The transaction was rolled back on every shard.');
      }
      log.warn({ err: messageOf(err) }, 'two-phase commit aborted: the decision shard could not commit');
      throw new PgError('ERROR', code === UNDEFINED_TABLE || code === INVALID_SCHEMA_NAME ? SERIALIZATION_FAILURE : code,
        `could not commit the transaction on shard ${decider.shard}, which records the decision: ${messageOf(err)}`,
        'The transaction was rolled back on every shard.');
    }
  }

  /** ROLLBACK PREPARED where the PREPARE succeeded, ROLLBACK elsewhere; what fails here the resolver rolls back (presumed abort). */
  private async rollBack(gid: string, participants: Participant[], wasPrepared: boolean[], log: Logger): Promise<void> {
    const results = await Promise.allSettled(participants.map((p, i) => p.query(wasPrepared[i] ? `ROLLBACK PREPARED ${gidLiteral(gid)}` : 'ROLLBACK')));
    results.forEach((r, i) => {
      if (r.status === 'fulfilled' || !wasPrepared[i]) return;
      leftToResolver.inc({ phase: 'rollback' });
      log.warn({ shard: participants[i].shard, err: messageOf(r.reason) }, 'ROLLBACK PREPARED failed; the resolver will roll it back');
    });
  }

  /** The fault point (test hook): stops this commit here for good. */
  private async reach(step: FaultPoint, log: Logger): Promise<void> {
    if (this.deps.faultPoint !== step) return;
    log.warn({ faultPoint: step }, 'two-phase commit stopped at a fault point (MG_TWOPC_FAULT_POINT); kill the process now');
    await new Promise<never>(() => {});
  }
}
