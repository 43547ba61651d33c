/**
 * One election: a new term for a shard, for an unplanned failover, a planned
 * switchover, or the bootstrap of a new shard. docs/orchestrator.md states the protocol and why it is safe; in
 * short: recruit voters for term T until the unrecruited cannot acknowledge a
 * commit on their own (and the recruited are a majority), promote the most
 * advanced recruited voter, point the others at it, write the rule of term T
 * into Postgres with synchronous commit, and only then tell the world
 * (PrimaryChanged with term T).
 */
import { randomUUID } from 'node:crypto';
import type { EventLog } from '../common/eventlog.ts';
import { withConnection } from '../common/postgres.ts';
import {
  comparePositions, decodePosition, payload, pledgedTermIn, recruitmentSuffices, RULE_DDL, RULE_TABLE, syncStandbyNames, topologyKey,
  type InstanceRegistered, type OrchEventKind, type ServingState, type TopologyEvent, type VoterPosition,
} from '../schemas/index.ts';
import { AgentTimeout, type Agents } from './agents.ts';
import type { OrchConfig } from './config.ts';
import { LeaseLost, REQUEST_WAIT_MS, type Journal } from './journal.ts';
import type { ShardView } from './view.ts';

export interface ElectionRequest {
  /** restore: the election that ends an in-place restore (orchestrator/restores.ts); otherwise as a failover. */
  operation: 'failover' | 'switchover' | 'bootstrap' | 'restore';
  reason: string;
  /** Switchover: the instance to hand over to (must be among the most advanced); otherwise the one preferred among equals. */
  target?: string;
  /**
   * Restore: the instances that follow the restored history; only they may win. A voter left on the abandoned
   * one may look more advanced (later WAL, a rule of a later term) and would bring back what the restore undid.
   */
  candidates?: string[];
}

export interface ElectionResult {
  term: bigint;
  ruleNumber: bigint;
  primary: string;
  previous: string | undefined;
  durationMs: number;
}

export class ElectionError extends Error {
  constructor(message: string, readonly status: 'invalid' | 'busy' | 'refused' | 'failed') {
    super(message);
  }
}

const DRAIN_MS = 3_000;
const DRAIN_POLL_MS = 5;
const RECRUIT_GRACE_MS = 150;
const RULE_WRITE_TIMEOUT_MS = 20_000;
/** A new shard's first rule waits for its standbys to be cloned. */
const BOOTSTRAP_RULE_WRITE_TIMEOUT_MS = 120_000;
/** A first primary may be restored from another database's backup (mg backup restore --as): minutes for a large one. */
const BOOTSTRAP_TIMEOUT_MS = 30 * 60_000;

const addr = (i: InstanceRegistered) => ({ host: i.host, port: i.port });
const positionDetails = (positions: Map<string, VoterPosition>) =>
  Object.fromEntries([...positions].map(([id, p]) => [id, `rule ${p.ruleTerm}/${p.ruleNumber} lsn ${p.lsn}`]));

export class Election {
  private readonly publishTopology;

  constructor(
    private readonly cfg: OrchConfig, eventLog: EventLog, private readonly agents: Agents, private readonly journal: Journal,
    /** Highest term seen refused per shard, so the next attempt goes above it. */
    private readonly termsSeen: Map<string, bigint>,
  ) {
    this.publishTopology = eventLog.publisher('topology');
  }

  async run(shard: ShardView, req: ElectionRequest): Promise<ElectionResult> {
    const started = Date.now();
    const { database, shard: name, key } = shard;
    const op = req.operation;
    const previous = shard.primary?.instanceId;
    if (op === 'switchover') await this.journal.awaitFree(key, REQUEST_WAIT_MS);
    const held = [shard.primary?.term ?? 0n, this.termsSeen.get(key) ?? 0n, this.journal.claimedTerm(key)];
    const term = held.reduce((a, b) => (a > b ? a : b)) + 1n;
    if (!(await this.journal.claim(database, name, op, term, this.cfg.leaseMs))) {
      throw new ElectionError(this.journal.whyNotClaimed(key), 'busy');
    }
    // The journal is read up to our claim, the topology maybe not: an election completed meanwhile makes this one moot.
    // Terms an earlier system under the shard's name completed (up to its retired term) are not this shard's.
    const completed = this.journal.completedTerm(key);
    if (completed > (shard.primary?.term ?? shard.retiredTerm)) {
      await this.journal.release(database, name, op).catch(() => undefined);
      throw new ElectionError(`${key} already has a newer term (${completed}) than this view shows`, 'busy');
    }
    // Progress goes to the journal without waiting for Kafka: every step here is inside the client's write gap.
    const note = (kind: OrchEventKind, summary: string, details: Record<string, string> = {}, durationMs?: number) =>
      this.journal.note(database, name, kind, op, summary, { term, details, durationMs });
    // The journal renews the lease in the background while we hold it; one that lapsed stops us at the next step.
    const step = () => this.journal.assertHeld(database, name);
    const ms = (since: number) => String(Date.now() - since);
    try {
      note('DECIDED', `${op} to term ${term}: ${req.reason}`, { previous: previous ?? '', target: req.target ?? '' });
      const old = shard.cohort.find((i) => i.instanceId === previous);
      if (old) await this.serving(old.instanceId, 'NOT_SERVING', term); // gateways buffer from here on
      const gapStarted = Date.now();

      const positions = new Map<string, VoterPosition>();
      const t0 = Date.now();
      if (op === 'switchover' || op === 'restore') {
        if (!old) throw new ElectionError(`${key} has no primary to hand over from`, 'refused');
        // A restore's primary is out of service already (the restore drained it).
        if (op === 'switchover') await drainClients(old, DRAIN_MS);
        const drainMs = ms(t0);
        // All at once: the old primary shuts down (fast: its walsenders send everything, the shutdown checkpoint
        // included), and the standbys let it end their stream before they stop listening (`outlast`): cut off in
        // the middle, a standby may hold a partial record it can never replay, and cannot report its position.
        // A restore waits for every answer: the candidates (on the restored history) must be among the recruited.
        const [p] = await Promise.all([this.recruit(key, old, term), this.recruitQuorum(shard, term, positions, old, op === 'restore')]);
        // The standbys are pledged to this term now and refuse the old one: stopping here would leave the old
        // primary without its quorum. Without it, the election goes on as a failover would (fenced by quorum loss).
        if (p) positions.set(old.instanceId, p);
        if (!recruitmentSuffices(shard.policy, shard.cohort, new Set(positions.keys()))) throw this.notEnough(shard, term, positions);
        note('ACTED', `${op === 'switchover' ? `drained (${drainMs} ms) and ` : ''}recruited ${[...positions.keys()].join(', ')}${p ? '' : ` (not the primary ${old.instanceId}: it did not answer)`}`,
          positionDetails(positions), Date.now() - t0);
      } else {
        await this.recruitQuorum(shard, term, positions, undefined, op === 'bootstrap');
        // A voter that did not answer may hold data (a first election that failed midway): the first election of a
        // shard needs every voter, and initializes a new primary only when none holds data.
        if (op === 'bootstrap' && positions.size < shard.cohort.length) {
          throw new ElectionError(`a shard's first election needs every voter; recruited ${[...positions.keys()].join(', ') || 'nobody'} of ${shard.cohort.length}`, 'failed');
        }
        note('ACTED', `recruited ${[...positions.keys()].join(', ')}`, positionDetails(positions), Date.now() - t0);
      }

      step();
      const winner = this.choose(shard, positions, req, previous);
      // The most advanced voter holds no data only when no recruited one does: in a shard's first election (all
      // recruited) that is a new shard, whose primary is initialized; otherwise the data is on voters not reached.
      const empty = positions.get(winner.instanceId)!.empty;
      if (empty && op !== 'bootstrap') throw new ElectionError(`no recruited voter holds data (${[...positions.keys()].join(', ')}); waiting for one that does`, 'failed');
      const action = empty ? 'BOOTSTRAP' : 'PROMOTE';
      note('DECIDED', `${action.toLowerCase()} ${winner.instanceId}`, { reason: empty ? 'a new shard: no voter holds data' : 'most advanced recruited voter' });
      const t1 = Date.now();
      const promoted = await this.agents.send(winner.instanceId, action, { term: String(term) }, empty ? BOOTSTRAP_TIMEOUT_MS : this.cfg.commandTimeoutMs * 2);
      if (promoted.status !== 'SUCCEEDED') throw new ElectionError(`${action} of ${winner.instanceId} failed: ${promoted.message}`, 'failed');
      note('ACTED', `${empty ? 'initialized' : 'promoted'} ${winner.instanceId}`, {}, Date.now() - t1);

      step();
      const t2 = Date.now();
      // Repoints go on in the background, while the policy is applied; the rule write below waits for as many as the policy needs.
      for (const inst of shard.members.filter((i) => i.instanceId !== winner.instanceId)) void this.repoint(shard, inst, winner, term).catch(() => undefined);
      await applyPolicy(shard, winner);
      const policyMs = ms(t2);
      const t3 = Date.now();
      const ruleNumber = await writeRule(shard, winner, term, this.cfg.id, op === 'bootstrap' ? BOOTSTRAP_RULE_WRITE_TIMEOUT_MS : RULE_WRITE_TIMEOUT_MS);
      note('ACTED', `rule ${ruleNumber} of term ${term} written on ${winner.instanceId} and acknowledged by the quorum (policy ${policyMs} ms, rule ${ms(t3)} ms)`, {}, Date.now() - t2);
      step();

      await this.topology(
        payload('PrimaryChanged', { database, shard: name, primaryInstanceId: winner.instanceId, term, ruleNumber, reason: `${op}: ${req.reason}` }),
        payload('ServingStateChanged', { instanceId: winner.instanceId, state: 'SERVING', term }),
      );
      const durationMs = Date.now() - started;
      const buffered = old ? `; ${old.instanceId} was NOT_SERVING for ${ms(gapStarted)} ms until the announcement` : '';
      await this.journal.record(database, name, 'COMPLETED', op, `${winner.instanceId} is primary of term ${term}${buffered}`,
        { term, details: { previous: previous ?? '' }, durationMs });
      return { term, ruleNumber, primary: winner.instanceId, previous, durationMs };
    } catch (err) {
      await this.journal.record(database, name, 'FAILED', op, (err as Error).message, { term, durationMs: Date.now() - started }).catch(() => undefined);
      throw err instanceof ElectionError ? err : new ElectionError((err as Error).message, err instanceof LeaseLost ? 'busy' : 'failed');
    } finally {
      await this.journal.release(database, name, op).catch(() => undefined);
    }
  }

  /** RECRUIT(term) to one voter; its position, or undefined when it refused or did not answer. */
  private async recruit(key: string, inst: InstanceRegistered, term: bigint, args: { outlast?: string } = {}): Promise<VoterPosition | undefined> {
    try {
      const r = await this.agents.send(inst.instanceId, 'RECRUIT', { term: String(term), ...args }, this.cfg.commandTimeoutMs);
      if (r.status === 'SUCCEEDED') return decodePosition(r.message);
      const pledged = pledgedTermIn(r.message);
      if (pledged !== undefined && pledged > (this.termsSeen.get(key) ?? 0n)) this.termsSeen.set(key, pledged);
      return undefined;
    } catch (err) {
      if (err instanceof AgentTimeout) return undefined;
      throw err;
    }
  }

  /**
   * Recruits every voter at once and returns as soon as the recruited suffice
   * (plus a short grace, so a slightly slower but more advanced voter is not
   * left out), or when all have answered (always, with `everyone`). In a
   * switchover or a restore's election the live old primary is recruited by the caller alongside
   * (`outlast`), and the caller judges.
   */
  private async recruitQuorum(shard: ShardView, term: bigint, positions: Map<string, VoterPosition>, outlast?: InstanceRegistered, everyone = false): Promise<void> {
    const todo = shard.cohort.filter((i) => !positions.has(i.instanceId) && i.instanceId !== outlast?.instanceId);
    const args = outlast ? { outlast: `${outlast.host}:${outlast.port}` } : {};
    const suffices = () => recruitmentSuffices(shard.policy, shard.cohort, new Set(positions.keys()));
    await new Promise<void>((resolve) => {
      let left = todo.length;
      let grace: NodeJS.Timeout | undefined;
      const settle = () => {
        if (left === 0) {
          clearTimeout(grace);
          resolve();
        } else if (!everyone && suffices() && !grace) grace = setTimeout(resolve, RECRUIT_GRACE_MS);
      };
      if (left === 0) resolve();
      for (const inst of todo) {
        void this.recruit(shard.key, inst, term, args).then((p) => {
          if (p) positions.set(inst.instanceId, p);
        }, () => undefined).finally(() => {
          left--;
          settle();
        });
      }
    });
    if (!outlast && !suffices()) throw this.notEnough(shard, term, positions);
  }

  private notEnough(shard: ShardView, term: bigint, positions: Map<string, VoterPosition>): ElectionError {
    const refusedAbove = this.termsSeen.get(shard.key);
    return new ElectionError(
      `recruited ${[...positions.keys()].join(', ') || 'nobody'} of ${shard.cohort.length}: not enough under ${shard.policyText}` +
      (refusedAbove && refusedAbove >= term ? ` (a voter pledged term ${refusedAbove})` : ''), 'failed');
  }

  private choose(shard: ShardView, positions: Map<string, VoterPosition>, req: ElectionRequest, previous: string | undefined): InstanceRegistered {
    const ranked = shard.cohort.filter((i) => positions.has(i.instanceId) && (!req.candidates || req.candidates.includes(i.instanceId))).sort((a, b) => {
      const byPosition = comparePositions(positions.get(b.instanceId)!, positions.get(a.instanceId)!);
      if (byPosition !== 0) return byPosition;
      const prefer = (i: InstanceRegistered) => (i.instanceId === req.target ? 0 : i.instanceId === previous ? 2 : 1);
      return prefer(a) - prefer(b) || a.instanceId.localeCompare(b.instanceId);
    });
    const best = ranked[0];
    if (!best) throw new ElectionError(`none of the candidates ${req.candidates?.join(', ')} was recruited`, 'failed');
    if (req.operation === 'switchover') {
      const candidates = ranked.filter((i) => i.instanceId !== previous && comparePositions(positions.get(i.instanceId)!, positions.get(best.instanceId)!) === 0);
      const chosen = req.target ? candidates.find((i) => i.instanceId === req.target) : candidates[0];
      if (!chosen) throw new ElectionError(req.target ? `${req.target} is not caught up with the primary` : 'no replica is caught up with the primary', 'failed');
      return chosen;
    }
    return best;
  }

  private async repoint(shard: ShardView, inst: InstanceRegistered, primary: InstanceRegistered, term: bigint): Promise<void> {
    const started = Date.now();
    const r = await this.agents.send(inst.instanceId, 'REPOINT', { term: String(term), host: primary.host, port: String(primary.port) }, 60_000)
      .catch((err: Error) => ({ status: 'TIMEOUT', message: err.message }));
    await this.journal.record(shard.database, shard.shard, r.status === 'SUCCEEDED' ? 'ACTED' : 'OBSERVED', 'repoint',
      `${inst.instanceId} -> ${primary.instanceId}: ${r.status === 'SUCCEEDED' ? r.message : `not yet (${r.message})`}`, { term, durationMs: Date.now() - started });
    if (r.status === 'SUCCEEDED') await this.serving(inst.instanceId, 'SERVING', term);
  }

  /** Publishes topology events in one batch (one partition: they arrive in this order). */
  topology(...payloads: Array<TopologyEvent['payload']>): Promise<void> {
    const events = payloads.map((p): TopologyEvent => ({ eventId: randomUUID(), ts: new Date(), source: `orchestrator/${this.cfg.id}`, payload: p }));
    return this.publishTopology(events.map((e) => ({ key: topologyKey(e), value: e })));
  }

  /** Flips an instance's serving flag, stamped with the term we act in (the fold ignores it once a newer term is known). */
  async serving(instanceId: string, state: ServingState, term: bigint): Promise<void> {
    await this.topology(payload('ServingStateChanged', { instanceId, state, term }));
  }
}

/**
 * Waits (bounded by ms) until the instance runs no client transaction: in a
 * switchover the gateways hold new ones meanwhile; for a replica being removed
 * they send new ones elsewhere.
 */
export async function drainClients(inst: InstanceRegistered, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  await withConnection(addr(inst), async (c) => {
    while (Date.now() < deadline) {
      const { rows: [{ busy }] } = await c.query<{ busy: number }>(`SELECT count(*)::int AS busy FROM pg_stat_activity
        WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND state NOT IN ('idle') AND application_name NOT LIKE 'mg-%'`);
      if (busy === 0) return;
      await new Promise((r) => setTimeout(r, DRAIN_POLL_MS));
    }
  }, ms + 1_000);
}

/**
 * Makes Postgres itself enforce the shard's durability policy on its primary:
 * `synchronous_standby_names = 'ANY k (...)'` and `synchronous_commit = on`,
 * through ALTER SYSTEM (so it survives restarts), effective once reloaded.
 */
export async function applyPolicy(shard: ShardView, primary: InstanceRegistered): Promise<string> {
  const names = syncStandbyNames(shard.policy, shard.members, primary);
  const lit = (v: string) => `'${v.replace(/'/g, "''")}'`;
  return withConnection(addr(primary), async (c) => {
    await c.query(`ALTER SYSTEM SET synchronous_standby_names = ${lit(names)}`);
    await c.query(`ALTER SYSTEM SET synchronous_commit = 'on'`);
    await c.query('SELECT pg_reload_conf()');
    // The reload is asynchronous; a backend applies it before its next statement, so poll until it shows.
    for (let i = 0; i < 200; i++) {
      const { rows: [{ s }] } = await c.query<{ s: string }>('SELECT current_setting($1) AS s', ['synchronous_standby_names']);
      if (s === names) return names;
      await new Promise((r) => setTimeout(r, 10));
    }
    throw new Error(`${primary.instanceId} did not take synchronous_standby_names = ${names}`);
  }, 10_000);
}

/** Inserts the next rule (term, primary, cohort, policy) on the primary; resolves when the quorum acknowledged it. */
export async function writeRule(shard: ShardView, primary: InstanceRegistered, term: bigint, decidedBy: string, timeoutMs = RULE_WRITE_TIMEOUT_MS): Promise<bigint> {
  return withConnection(addr(primary), async (c) => {
    await c.query(RULE_DDL);
    const { rows: [row] } = await c.query<{ n: string }>(`INSERT INTO ${RULE_TABLE} (rule_number, term, primary_id, cohort, policy, decided_by)
      SELECT coalesce(max(rule_number), 0) + 1, $1, $2, $3, $4, $5 FROM ${RULE_TABLE} RETURNING rule_number::text AS n`,
    [term.toString(), primary.instanceId, shard.cohort.map((i) => i.instanceId), shard.policyText, decidedBy]);
    return BigInt(row.n);
  }, timeoutMs);
}
