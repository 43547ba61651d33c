/**
 * Two-phase commit of one transaction across shards (docs/twopc.md):
 * PREPARE TRANSACTION on every participant, then the COMMIT decision made
 * durable as a row in the decision table of the first participant's shard,
 * then COMMIT PREPARED everywhere. A transaction left in doubt by a crash is
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

export interface CoordinatorDeps {
  /** Names this coordinator in gids and decisions (e.g. the gateway's id): letters, digits, `.`, `_`, `-`. */
  id: string;
  log: Logger;
}

const SERIALIZATION_FAILURE = '40001';
const UNIQUE_VIOLATION = '23505';
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
  constructor(private readonly deps: CoordinatorDeps) {}

  /**
   * Commits the participants' transactions atomically. Resolves once every
   * participant has committed, or once the COMMIT decision is durable when a
   * COMMIT PREPARED fails (the resolver finishes those). Rejects with a
   * PgError when the transaction was rolled back everywhere (40001, or the
   * participant's own SQLSTATE when its PREPARE failed, e.g. a deferred
   * constraint, or when Postgres refused the decision insert), or with 08007
   * when the decision could not be confirmed.
   */
  async commit(database: string, participants: Participant[]): Promise<void> {
    if (participants.length === 0) return;
    const shards = participants.map((p) => p.shard);
    if (new Set(shards).size !== shards.length) throw new PgError('ERROR', SQLSTATE.INTERNAL_ERROR, `two-phase commit with a shard twice: ${shards.join(', ')}`);
    if (participants.length === 1) return this.commitOne(participants[0]);

    const gid = formatGid({ database, decisionShard: participants[0].shard, coordinator: this.deps.id, txn: randomUUID() });
    const log = this.deps.log.child({ gid, shards });
    const end = commitSeconds.startTimer();

    const prepared = await Promise.allSettled(participants.map((p) => p.query(prepareSql(gid))));
    const failed = prepared.findIndex((r) => r.status === 'rejected');
    if (failed >= 0) {
      const reason = (prepared[failed] as PromiseRejectedResult).reason;
      await this.rollBack(gid, participants, prepared.map((r) => r.status === 'fulfilled'), log);
      commits.inc({ outcome: 'aborted' });
      log.info({ shard: shards[failed], err: messageOf(reason) }, 'two-phase commit aborted: a PREPARE failed');
      // A constraint checked at PREPARE (deferred) or the participant's own rollback keeps its SQLSTATE; anything else is 40001 (retry).
      const code = codeOf(reason);
      throw new PgError('ERROR', code && /^(23|40)/.test(code) ? code : SERIALIZATION_FAILURE,
        `could not prepare the transaction on shard ${shards[failed]}: ${messageOf(reason)}`,
        'The transaction was rolled back on every shard.');
    }

    await this.decideCommit(gid, participants, log);

    const done = await Promise.allSettled(participants.map((p) => p.query(`COMMIT PREPARED ${gidLiteral(gid)}`)));
    done.forEach((r, i) => {
      if (r.status === 'fulfilled') return;
      leftToResolver.inc({ phase: 'commit' });
      log.warn({ shard: shards[i], err: messageOf(r.reason) }, 'COMMIT PREPARED failed after the commit decision; the resolver will finish it');
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
   * Inserts the COMMIT row. A row already there can only be the resolver's
   * ABORT (it gave up on this transaction as too old): then this one rolls
   * back. The primary key settles the race whichever comes first.
   */
  private async decideCommit(gid: string, participants: Participant[], log: Logger): Promise<void> {
    const [first] = participants;
    const insert = `INSERT INTO ${DECISION_TABLE} (gid, decision, decided_by, participants) VALUES (${gidLiteral(gid)}, 'commit', ${gidLiteral(this.deps.id)}, ARRAY[${participants.map((p) => gidLiteral(p.shard)).join(', ')}])`;
    for (let attempt = 1; ; attempt++) {
      try {
        await first.query(insert);
        return;
      } catch (err) {
        const code = codeOf(err);
        if ((code === UNDEFINED_TABLE || code === INVALID_SCHEMA_NAME) && attempt === 1) {
          // The shard's first two-phase commit; a concurrent creator may win the race, which is fine.
          await first.query(DECISION_DDL).catch(() => {});
          continue;
        }
        if (code === UNIQUE_VIOLATION) {
          await this.rollBack(gid, participants, participants.map(() => true), log);
          commits.inc({ outcome: 'aborted' });
          log.warn('two-phase commit aborted: the resolver had already decided to abort it');
          throw new PgError('ERROR', SERIALIZATION_FAILURE, 'the transaction was rolled back: it stayed prepared too long and the in-doubt resolver aborted it',
            'The transaction was rolled back on every shard.');
        }
        if (code && !OUTCOME_UNKNOWN.test(code)) {
          // Postgres refused the INSERT (e.g. permission denied): nothing was decided, so the answer is abort.
          await this.rollBack(gid, participants, participants.map(() => true), log);
          commits.inc({ outcome: 'aborted' });
          log.warn({ err: messageOf(err) }, 'two-phase commit aborted: the decision could not be recorded');
          throw new PgError('ERROR', code, `could not record the commit decision on shard ${first.shard}: ${messageOf(err)}`,
            'The transaction was rolled back on every shard.');
        }
        commits.inc({ outcome: 'unknown' });
        leftToResolver.inc({ phase: 'decision' });
        log.error({ err: messageOf(err) }, 'two-phase commit in doubt: the decision could not be confirmed');
        throw new PgError('ERROR', SQLSTATE.TRANSACTION_RESOLUTION_UNKNOWN,
          `the outcome of the transaction is unknown: recording its commit on shard ${first.shard} failed: ${messageOf(err)}`,
          `It is committed on every shard or on none; the in-doubt resolver settles it (gid ${gid}).`);
      }
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
}
