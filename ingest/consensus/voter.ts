/**
 * The consensus voter inside the agent: answers MultiOrch's RECRUIT, PROMOTE
 * and REPOINT commands for its Postgres (docs/orchestrator.md has the protocol).
 *
 * - RECRUIT(term): refuses a term not newer than its pledge; otherwise pledges
 *   it durably, stops acknowledging the old primary (a standby drops its
 *   upstream; a primary is shut down and comes back as a standby of nobody),
 *   and answers with its position (rule and WAL). In a switchover, `outlast`
 *   names the old primary: a standby lets it end the stream first.
 * - PROMOTE(term): only for the orchestrator it pledged this term to; promotes
 *   and checkpoints (so the old primary can be rewound from it at once).
 * - BOOTSTRAP(term): the same pledge check; an instance with no data
 *   directory yet (a new shard) is initialized and started as the first primary.
 * - REPOINT(term, host, port): streams from the term's primary; when the WAL
 *   has diverged, pg_rewind, and when that fails, a fresh clone (also how an
 *   empty instance gets its data): restored from the shard's latest backup plus
 *   archived WAL when there is one, else pg_basebackup from the primary.
 *
 * A Postgres that dies while primary comes back as a standby of nobody: only
 * a PROMOTE makes a primary.
 */
import type { Logger } from '../../common/log.ts';
import { counter } from '../../common/metrics.ts';
import { encodePosition, refusal, RULE_TABLE, type AgentCommand, type VoterPosition } from '../../schemas/index.ts';
import type { Agent } from '../agent.ts';
import { queryAt } from '../../common/postgres.ts';
import type { Upstream } from '../postgres/instance.ts';
import { parseLsn } from '../postgres/lsn.ts';
import { PledgeFile } from './pledge.ts';

const pledges = counter('mg_voter_pledges_total', 'Terms this voter pledged');
const refusals = counter('mg_voter_refusals_total', 'Commands refused for an old term', ['action']);
const rewinds = counter('mg_voter_rewinds_total', 'Repoints that needed pg_rewind (result: rewound or rebuilt)', ['result']);

const PROBE_TIMEOUT_MS = 1_000;
const STREAM_WAIT_MS = 3_000;
const STREAM_AFTER_REWIND_MS = 10_000;
const START_AFTER_REWIND_S = 15;
const START_AS_STANDBY_S = 5;
/** A clone restored from a backup first replays the archived WAL since the backup: it reaches consistency and streams later. */
const START_AFTER_CLONE_S = 600;
const STREAM_AFTER_CLONE_MS = 120_000;
/** How long a standby that just started must hold one position before it reports it. */
const STABLE_MS = 80;
/** How long a standby waits for a switchover's old primary to end the stream before it stops listening anyway. */
const OUTLAST_MS = 3_000;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class Voter {
  private readonly pledge: PledgeFile;

  constructor(private readonly agent: Agent, private readonly log: Logger) {
    this.pledge = new PledgeFile(agent.postgres.dataDir);
  }

  attach(): void {
    this.agent.handle('RECRUIT', (cmd) => this.recruit(cmd));
    this.agent.handle('PROMOTE', (cmd) => this.promote(cmd));
    this.agent.handle('BOOTSTRAP', (cmd) => this.bootstrap(cmd));
    this.agent.handle('REPOINT', (cmd) => this.repoint(cmd));
    // A primary that died may hold commits nobody acknowledged; it must not come back writable on its own.
    this.agent.beforeRestart = () => {
      if (!this.agent.postgres.isStandby()) {
        this.log.warn('restarting a dead primary as a standby of nobody (fenced until promoted)');
        this.agent.postgres.configureStandby(null);
      }
    };
  }

  /** A new or rebuilt replica starts from the latest backup when there is one (pg_basebackup otherwise). */
  private get restore(): (() => Promise<boolean>) | undefined {
    const backups = this.agent.backups;
    return backups && (() => backups.restoreStandby());
  }

  private get pg() {
    return this.agent.postgres;
  }

  private async recruit(cmd: AgentCommand): Promise<string> {
    const term = termOf(cmd);
    const held = this.pledge.read();
    if (term <= held.term) {
      refusals.inc({ action: 'RECRUIT' });
      throw new Error(refusal(term, held.term));
    }
    this.pledge.write({ term, orchestrator: cmd.issuedBy });
    pledges.inc();
    this.log.info({ term, orchestrator: cmd.issuedBy }, 'pledged term');
    const fenced = await this.fence(term, cmd.args.outlast);
    return encodePosition(fenced === 'receiver gone' ? await this.position(term, true) : fenced ?? (await this.position(term)));
  }

  /**
   * Stops this node from acknowledging (as standby) or accepting (as primary)
   * anything of the old term. A primary reports its position itself, taken
   * before it shuts down.
   */
  private async fence(term: bigint, outlast?: string): Promise<VoterPosition | 'receiver gone' | undefined> {
    const pg = this.pg;
    if (!pg.isInitialized()) return emptyPosition(term); // holds nothing, acknowledges nothing
    if (!pg.isRunning()) {
      // Down: bring it back as a standby of nobody, so it can report what it holds.
      await this.agent.exclusive(async () => {
        pg.configureStandby(null);
        await pg.start();
      }, true);
      return;
    }
    const probe = await pg.probe(PROBE_TIMEOUT_MS);
    if (!probe) {
      // Hung (e.g. SIGSTOP): queue an immediate shutdown, which it acts on as soon as it runs again.
      await this.agent.exclusive(async () => {
        pg.configureStandby(null);
        pg.signal('SIGQUIT');
      }, false);
      throw new Error('postgres does not answer: immediate shutdown queued; position unknown');
    }
    if (probe.inRecovery) {
      // Switchover: the old primary (`outlast`, host:port) is being shut down by the same term's RECRUIT. Its last WAL
      // and shutdown checkpoint still reach us if we let its walsender end the stream before we stop listening.
      if (outlast) {
        await pg.watch(`${outlast} to end its stream`, `SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming' AND sender_host || ':' || sender_port = $1`,
          [outlast], (rows) => rows.length === 0, OUTLAST_MS).catch(() => undefined); // it may not: we stop listening anyway
      }
      pg.configureStandby(null);
      await pg.reload();
      await pg.watch('the WAL receiver to stop', 'SELECT 1 FROM pg_stat_wal_receiver', [], (rows) => rows.length === 0, 5_000);
      // Streaming until now: all its WAL came through the receiver (local WAL is replayed before streaming starts).
      return probe.walReceiverStatus === 'streaming' ? 'receiver gone' : undefined;
    }
    // A primary: what it holds, then a fast shutdown (its walsenders first send everything, the shutdown
    // checkpoint included, to connected standbys). It stays down, a standby of nobody, until repointed or promoted.
    const held = await this.position(term);
    await this.agent.exclusive(async () => {
      await pg.stop('fast');
      pg.configureStandby(null);
    }, false);
    return held;
  }

  /** The term of a PROMOTE or BOOTSTRAP, which only the orchestrator this voter pledged that term to may send. */
  private pledgedTermOf(cmd: AgentCommand): bigint {
    const term = termOf(cmd);
    const held = this.pledge.read();
    if (held.term !== term || held.orchestrator !== cmd.issuedBy) {
      refusals.inc({ action: cmd.action });
      throw new Error(`${refusal(term, held.term)} (to ${held.orchestrator || 'nobody'}); not acting for ${cmd.issuedBy}`);
    }
    return term;
  }

  private async promote(cmd: AgentCommand): Promise<string> {
    const term = this.pledgedTermOf(cmd);
    if (!this.pg.isInitialized()) throw new Error('no data directory: an empty instance is bootstrapped or cloned, not promoted');
    await this.agent.exclusive(async () => {
      await this.pg.start(); // a fenced old primary is down (a standby of nobody once started)
      const [{ rec }] = await this.pg.query<{ rec: boolean }>('SELECT pg_is_in_recovery() AS rec');
      if (rec) await this.pg.promote();
    }, true);
    this.agent.backups?.primaryStarted();
    this.log.info({ term }, 'promoted for term');
    // Gateways route to a primary only once its heartbeat says so.
    const [, position] = await Promise.all([this.agent.reportNow(), this.position(term)]);
    return encodePosition(position);
  }

  private async bootstrap(cmd: AgentCommand): Promise<string> {
    const term = this.pledgedTermOf(cmd);
    if (this.pg.isInitialized()) throw new Error('already holds a data directory: only an empty instance is bootstrapped (PROMOTE it instead)');
    await this.agent.exclusive(() => this.agent.initFirstPrimary(), true);
    this.agent.backups?.primaryStarted();
    this.log.info({ term }, 'bootstrapped as the first primary of the shard');
    await this.agent.reportNow();
    return encodePosition(await this.position(term));
  }

  private async repoint(cmd: AgentCommand): Promise<string> {
    const term = termOf(cmd);
    const held = this.pledge.read();
    if (term < held.term) {
      refusals.inc({ action: 'REPOINT' });
      throw new Error(refusal(term, held.term));
    }
    if (term > held.term) this.pledge.write({ term, orchestrator: cmd.issuedBy });
    const upstream: Upstream = { host: cmd.args.host ?? '', port: Number(cmd.args.port) };
    if (!upstream.host || !Number.isInteger(upstream.port)) throw new Error('REPOINT needs args host and port');
    // Host and port: pods all use Postgres's one port, each at its own address.
    if (upstream.host === this.pg.host && upstream.port === this.pg.port) throw new Error('REPOINT to itself');
    const pg = this.pg;
    if (!pg.isInitialized()) {
      let source = '';
      await this.agent.exclusive(async () => {
        source = await pg.rebuild(upstream, this.restore); // also clears what a failed clone left behind
        pg.configureStandby(upstream);
        await pg.start(START_AFTER_CLONE_S);
      }, true);
      if (!(await this.streamingFrom(upstream, STREAM_AFTER_CLONE_MS))) throw new Error(`${source}, but not streaming from ${upstream.host}:${upstream.port}`);
      return `${source}; streaming from ${upstream.host}:${upstream.port}`;
    }
    await this.ensureSlot(upstream);

    if (!pg.isRunning()) {
      // Down (fenced, or shut down cleanly by a switchover): try it as a standby of the new primary first.
      await this.agent.exclusive(async () => {
        pg.configureStandby(upstream);
        await pg.start(START_AS_STANDBY_S);
      }, true).catch((err) => this.log.warn({ err }, 'could not start as a standby; rewinding'));
    }
    if (pg.isRunning()) {
      if (pg.isFrozen()) throw new Error('postgres is frozen (stopped by a signal); cannot repoint it now');
      const probe = await pg.probe(PROBE_TIMEOUT_MS);
      if (probe?.inRecovery) {
        pg.configureStandby(upstream);
        await pg.reload();
        if (await this.streamingFrom(upstream, STREAM_WAIT_MS)) return `streaming from ${upstream.host}:${upstream.port}`;
        this.log.warn({ upstream }, 'not streaming from the new primary; rewinding');
      }
    }
    // Not a standby that follows: a stale primary, a diverged standby, or a server that does not come up.
    let how = 'rewound';
    try {
      await this.agent.exclusive(async () => {
        await pg.stop('immediate');
        // Postgres 15: a freshly promoted source must have checkpointed, or pg_rewind works from its old timeline.
        await queryAt(upstream, 'CHECKPOINT', [], 60_000);
        await pg.rewind(upstream);
        pg.writeConfig(); // the rewind copied the source's configuration
        pg.configureStandby(upstream);
        await pg.start(START_AFTER_REWIND_S);
      }, true);
      if (!(await this.streamingFrom(upstream, STREAM_AFTER_REWIND_MS))) throw new Error('not streaming after the rewind');
      rewinds.inc({ result: 'rewound' });
    } catch (err) {
      // E.g. two promotions picked the same timeline number: pg_rewind sees no divergence, yet the WAL differs.
      this.log.warn({ err }, 'rewinding did not make a following standby; cloning again');
      how = 'rebuilt';
      await this.agent.exclusive(async () => {
        await pg.stop('immediate');
        await pg.rebuild(upstream, this.restore);
        pg.configureStandby(upstream);
        await pg.start(START_AFTER_CLONE_S);
      }, true);
      if (!(await this.streamingFrom(upstream, STREAM_AFTER_CLONE_MS))) throw new Error(`rebuilt, but not streaming from ${upstream.host}:${upstream.port}`);
      rewinds.inc({ result: 'rebuilt' });
    }
    return `${how}; streaming from ${upstream.host}:${upstream.port}`;
  }

  /** The slot this node streams through must exist on its new upstream (slots are not replicated). */
  private async ensureSlot(upstream: Upstream): Promise<void> {
    await queryAt(upstream, `SELECT pg_create_physical_replication_slot($1, true)
      WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)`, [this.pg.slotName]);
  }

  /**
   * Streaming from `upstream` on its current timeline and replaying past the
   * WAL the upstream had when we began: a standby whose WAL diverged may
   * connect, but never gets there.
   */
  private async streamingFrom(upstream: Upstream, timeoutMs: number): Promise<boolean> {
    // The timeline from the WAL file name: the control file's lags until the first checkpoint after a promotion.
    const [{ tli, lsn }] = await queryAt<{ tli: number; lsn: string }>(upstream, `SELECT
      ('x' || substr(pg_walfile_name(pg_current_wal_flush_lsn()), 1, 8))::bit(32)::int AS tli, pg_current_wal_flush_lsn()::text AS lsn`);
    try {
      await this.waitFor(`streaming from ${upstream.port}`, timeoutMs, async () => {
        const rows = await this.pg.query<{ status: string; sender_port: number; received_tli: number; replayed: boolean }>(
          `SELECT status, sender_port, received_tli, pg_last_wal_replay_lsn() >= $1::pg_lsn AS replayed FROM pg_stat_wal_receiver`, [lsn]);
        return rows.some((r) => r.status === 'streaming' && r.sender_port === upstream.port && r.received_tli === tli && r.replayed);
      });
      return true;
    } catch {
      return false;
    }
  }

  /**
   * What this node holds, once a standby has replayed all it received. A
   * standby whose WAL receiver was just seen gone (`receiverGone`) holds no
   * more than it received; one that just started may still be replaying
   * local WAL, so its position must first stay put for STABLE_MS.
   */
  private async position(term: bigint, receiverGone = false): Promise<VoterPosition> {
    const pg = this.pg;
    let last = '';
    let stableSince = Date.now();
    const [row] = await pg.watch<{ rec: boolean; lsn: string; caught_up: boolean; tli: number }>('replay to reach the received WAL', `SELECT pg_is_in_recovery() AS rec,
      (CASE WHEN pg_is_in_recovery() THEN greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) ELSE pg_current_wal_flush_lsn() END)::text AS lsn,
      (NOT pg_is_in_recovery() OR pg_last_wal_receive_lsn() IS NULL OR pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn()) AS caught_up,
      (SELECT timeline_id FROM pg_control_checkpoint()) AS tli`, [], ([r]) => {
      if (r.lsn !== last) stableSince = Date.now();
      last = r.lsn;
      return r.caught_up && (!r.rec || receiverGone || Date.now() - stableSince >= STABLE_MS);
    }, 10_000);
    const [rule] = await pg.query<{ rule_number: string; term: string }>(
      `SELECT r.rule_number::text, r.term::text FROM ${RULE_TABLE} r ORDER BY r.rule_number DESC LIMIT 1`).catch((err: { code?: string }) => {
      if (err.code === '42P01' || err.code === '3F000') return []; // no rule yet (before bootstrap)
      throw err;
    });
    return {
      term, lsn: parseLsn(row.lsn), timeline: row.tli, inRecovery: row.rec,
      ruleNumber: BigInt(rule?.rule_number ?? 0), ruleTerm: BigInt(rule?.term ?? 0), empty: false,
    };
  }

  private async waitFor(what: string, timeoutMs: number, check: () => Promise<boolean>, intervalMs = 50): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (await check().catch(() => false)) return;
      if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
      await sleep(intervalMs);
    }
  }
}

function emptyPosition(term: bigint): VoterPosition {
  return { term, lsn: 0n, ruleNumber: 0n, ruleTerm: 0n, timeline: 0, inRecovery: true, empty: true };
}

function termOf(cmd: AgentCommand): bigint {
  const t = cmd.args.term;
  if (!t || !/^\d+$/.test(t)) throw new Error(`${cmd.action} needs a numeric term argument`);
  return BigInt(t);
}
