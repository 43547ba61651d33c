/**
 * A MoveTables workflow across four failovers (issue 12, decisions 0069 and 0073):
 * an unsharded source of two instances (CDC on) moved into a 2-shard target whose
 * first shard has a replica too, with a writer inserting and updating through the
 * gateway the whole time. In the copy phase (small pages, so that it lasts), kill -9
 * of the source primary's Postgres, then of the target shard's primary: the copy
 * goes on each time from its last page on the new primary. In catch-up, the same two
 * kills: the orchestrator promotes the standby and the change stream goes on from
 * its copy of the slot (decision 0052), and the apply from the positions the target
 * holds. No one runs a command. Afterwards every acknowledged write is on the target
 * shard its keyspace id names, exactly once, VDiff is clean, and the table was never
 * copied again after the copy phase.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { hashKeyspaceId, shardFor } from '../../schemas/index.ts';
import type { ShardStatus } from '../../compose/orchestrators.ts';
import { fullStrength, postgresPids, shardStatus, signalAll, type ShardRef } from '../fault/support/faults.ts';
import { CdcWatch } from '../support/cdc-watch.ts';
import { sleep, until } from '../support/cluster.ts';
import { moveTablesCluster, statusHistory, targetHoldsSource } from '../support/movetables.ts';

const PAGE_ROWS = 25;
const mt = moveTablesCluster('wffailover', 3, { 'materializer.pageRows': PAGE_ROWS }, { sourceInstances: 2 });
const { cluster, ranges: RANGES, gateway } = mt;
const { spec, flags, mg, dataDir, prefix } = cluster;
const INITIAL_ROWS = 40_000;
const SOURCE: ShardRef = { database: 'src', shard: '-' };
const TARGET: ShardRef = { database: 'dst', shard: RANGES[0].shard }; // the target shard with a replica
const homeOf = (id: number | string) => shardFor(hashKeyspaceId(String(id)), RANGES);

const api = async (p: string) => (await fetch(`http://127.0.0.1:${spec.materializer.port}${p}`)).json() as Promise<any>;

let watch: CdcWatch;

/**
 * A session on the shard's primary now (after a failover it is on another port). Refused while the
 * instance the orchestrator still names is in recovery: a killed primary comes back as a standby
 * holding what it had, before the status names the new one, and reading it would prove nothing.
 */
async function onPrimary(ref: ShardRef): Promise<pg.Client> {
  const s = await shardStatus(cluster, ref);
  const port = s.instances.find((i) => i.instanceId === s.primary)!.port;
  const c = await mt.direct(ref.database, ref.shard, port);
  if ((await c.query("SELECT 1 WHERE pg_is_in_recovery()")).rowCount) { // the session reads every value as text
    await c.end();
    throw new Error(`${s.primary}, named primary of ${ref.database}/${ref.shard}, is in recovery`);
  }
  return c;
}

/**
 * What the writer was told: each id's last acknowledged note. A write whose outcome the client never
 * learnt (its session died under it) leaves its id with either value possible, until a later write is acknowledged.
 */
const acknowledged = new Map<number, string>();
const possible = new Map<number, Set<string | undefined>>();
let writing = true;
let writes = 0;
let failedWrites = 0;
/** When each id's insert was acknowledged (ms since the epoch). */
const ackedAt = new Map<number, number>();

async function writer(): Promise<void> {
  let next = INITIAL_ROWS + 1;
  let c: pg.Client | undefined;
  while (writing) {
    const r = writes++ % 3;
    const id = r < 2 ? next++ : 1 + Math.floor(Math.random() * (next - 1));
    const note = r < 2 ? `i${id}` : `u${writes}`;
    try {
      if (!c) {
        c = await gateway('src');
        c.on('error', () => undefined);
      }
      if (r < 2) {
        await c.query('INSERT INTO orders (id, customer, amount, note) VALUES ($1, $2, $3, $4)', [id, `c${id % 97}`, (id % 1000) / 4, note]);
        ackedAt.set(id, Date.now());
      } else if ((await c.query('UPDATE orders SET note = $2, amount = amount + 1 WHERE id = $1', [id, note])).rowCount !== 1) continue;
      acknowledged.set(id, note);
      possible.delete(id);
    } catch {
      failedWrites++;
      const was = possible.get(id) ?? new Set([acknowledged.get(id)]);
      possible.set(id, was.add(note));
      await c?.end().catch(() => undefined);
      c = undefined;
      await sleep(100);
    }
  }
  await c?.end().catch(() => undefined);
}

/** The workflow's phase, rows copied, reported lag and message, sampled from its REST API until stopped. */
const samples: { at: number; phase: string; rowsCopied: number; lag: number; message: string | null }[] = [];
let sampling = true;
async function sampler(): Promise<void> {
  while (sampling) {
    const w = await api('/v1/workflows/mt').catch(() => undefined);
    if (w?.progress) samples.push({ at: Date.now(), phase: w.phase, rowsCopied: Number(w.progress.rowsCopied), lag: Number(w.progress.lagSeconds ?? 0), message: w.message });
    await sleep(100);
  }
}

/** Copy page parts that met rows already on a target shard (written again as upserts), from the materializer's metrics. */
async function upsertedParts(): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${spec.materializer.port}/metrics`)).text();
  return Number(/^mg_materializer_copy_parts_upserted_total\{table="public\.orders"\} (\d+)/m.exec(text)?.[1] ?? 0);
}

/**
 * A kill in the copy phase at `killedAt`, of `shard`'s primary: waits until the workflow says it reopened its
 * session there and has copied rows since. Returns the rows copied at the kill and the time from the kill to then.
 */
async function copyGoesOn(what: string, killedAt: number, shard: string): Promise<{ rowsAtKill: number; goesOnMs: number; messages: string[] }> {
  const atKill = samples.filter((s) => s.at < killedAt).at(-1)!;
  assert.equal(atKill.phase, 'COPYING', `${what}: the copy had ended before the kill (make it longer)`);
  const lastSeen = (err: Error) => {
    const last = samples.at(-1);
    throw new Error(`${err.message}; the workflow is ${last?.phase} at ${last?.rowsCopied} rows: ${last?.message}`);
  };
  // Longer than the workflow's own wait for a primary (90 s, then FAILED).
  const reopened = await until(`${what}: the session on ${shard} reopened`, 150_000, () => {
    const failed = samples.find((s) => s.at > killedAt && s.phase === 'FAILED');
    if (failed) throw new Error(`${what}: the workflow failed: ${failed.message}`);
    return samples.find((s) => s.at > killedAt && s.message?.includes(shard) && s.message.includes('reopened'));
  }).catch(lastSeen);
  const on = await until(`${what}: the copy to go on`, 120_000, () => samples.find((s) => s.at >= reopened.at && s.rowsCopied > reopened.rowsCopied)).catch(lastSeen);
  const messages = [...new Set(samples.filter((s) => s.at > killedAt && s.at <= on.at && s.message).map((s) => s.message!))];
  assert.ok(samples.filter((s) => s.at > killedAt && s.at <= on.at).every((s) => s.phase === 'COPYING'), `${what}: the workflow left the copy phase`);
  return { rowsAtKill: atKill.rowsCopied, goesOnMs: on.at - killedAt, messages };
}

/** Waits until the source's standby holds a ready copy of the CDC slot (decision 0052): a failover then keeps the stream's epoch. */
async function sourceSlotCopied(): Promise<ShardStatus> {
  const src = await fullStrength(cluster, 90_000, 1_500, SOURCE);
  const standby = src.instances.find((i) => i.instanceId !== src.primary)!.instanceId;
  await until(`${standby}'s copy of the slot ready`, 90_000, async () =>
    JSON.parse((await watch.command(standby, 'CDC_STATUS')).message).standbySlot?.ready === true);
  await sleep(1_000);
  return src;
}

/**
 * After a kill at `killedAt`: watches the writes acknowledged since to rows of the given target shard arrive there,
 * until one has and none acknowledged over 1 s ago is missing, with the workflow in catch-up reporting a lag under 1 s.
 * Returns the longest wait of such a write for the target (observed, to within a poll), the workflow's own lag peak,
 * and the time from the kill to then.
 */
async function recovered(what: string, killedAt: number, shard: string): Promise<{ observedPeak: number; reportedPeak: number; backMs: number }> {
  const seenAt = new Map<number, number>();
  let target: pg.Client | undefined;
  try {
    await until(`${what}: the writes acknowledged after the kill applied on ${shard}, lag under 1 s`, 120_000, async () => {
      const now = Date.now();
      const waiting = [...ackedAt].filter(([id, at]) => at > killedAt && homeOf(id) === shard && !seenAt.has(id)).map(([id]) => id);
      target ??= await onPrimary({ database: 'dst', shard }).catch(() => undefined);
      if (!target) return false;
      const found = await target.query<{ id: string }>('SELECT id FROM orders WHERE id = ANY($1)', [waiting]).catch(async () => {
        await target?.end().catch(() => undefined);
        target = undefined;
      });
      if (!found) return false;
      for (const r of found.rows) seenAt.set(Number(r.id), now);
      const late = waiting.filter((id) => !seenAt.has(id) && ackedAt.get(id)! < now - 1_000);
      const last = samples.at(-1);
      return seenAt.size > 0 && late.length === 0 && last?.phase === 'RUNNING' && last.at > now - 1_000 && last.lag < 1;
    });
  } catch (err) {
    const last = samples.at(-1);
    throw new Error(`${(err as Error).message}; the workflow is ${last?.phase}: ${last?.message}`);
  } finally {
    await target?.end().catch(() => undefined);
  }
  return {
    observedPeak: Math.max(...[...seenAt].map(([id, at]) => (at - ackedAt.get(id)!) / 1000)),
    reportedPeak: Math.max(0, ...samples.filter((s) => s.at >= killedAt).map((s) => s.lag)),
    backMs: Date.now() - killedAt,
  };
}

/** The figures of one failover, as the test prints them. */
const figures = (r: Awaited<ReturnType<typeof recovered>>) =>
  `a write acknowledged after the kill waited up to ${r.observedPeak.toFixed(1)} s for the target (the workflow's lag peaked at ${r.reportedPeak.toFixed(1)} s); `
  + `lag back under 1 s ${(r.backMs / 1000).toFixed(1)} s after the kill`;

before(async () => {
  watch = await CdcWatch.open(prefix);
  await mt.up();
  const added = await mg('replica', 'add', `${TARGET.database}/${TARGET.shard}`, '--data-dir', dataDir);
  assert.equal(added.code, 0, added.stderr + added.stdout);
  const c = await gateway('src');
  await c.query('CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(10,2) NOT NULL, note text)');
  await c.query(`INSERT INTO orders SELECT g, 'c' || (g % 97), (g % 1000) / 4.0, 'i' || g FROM generate_series(1, ${INITIAL_ROWS}) g`);
  await c.end();
  for (let id = 1; id <= INITIAL_ROWS; id++) acknowledged.set(id, `i${id}`);
});

after(async () => {
  writing = false;
  sampling = false;
  await watch?.close();
  await mg('cluster', 'down', '--data-dir', dataDir, '--clean');
});

test('MoveTables under a writer: kill -9 of the source primary, then of a target primary, in the copy and again in catch-up; the workflow goes on, every acknowledged write on its shard once, VDiff clean, no re-copy', cluster.explained(async (t) => {
  const writing$ = writer();
  const sampling$ = sampler();
  await sourceSlotCopied();
  const created = await mg('workflow', 'create', 'mt', '--source', 'src', '--target', 'dst', '--tables', 'orders', '--data-dir', dataDir);
  assert.equal(created.code, 0, created.stderr);

  // In the copy phase: (a) the source primary, once some pages are copied; (b) the target shard's primary, once the copy goes on.
  const copying = await until('some pages copied', 120_000, () => samples.at(-1)?.phase === 'COPYING' && samples.at(-1)!.rowsCopied >= 100 * PAGE_ROWS && samples.at(-1));
  const firstCopying = samples.find((s) => s.phase === 'COPYING')!;
  t.diagnostic(`copy rate before the first kill: ${Math.round((copying.rowsCopied - firstCopying.rowsCopied) / ((copying.at - firstCopying.at) / 1000))} rows/s`);
  const upsertedBefore = await upsertedParts();
  const copySrc = await shardStatus(cluster, SOURCE); // the primary now (under heavy load the orchestrator may have failed over already)
  const copySrcKilledAt = Date.now();
  signalAll(postgresPids(cluster, copySrc.primary!), 'SIGKILL');
  const copySrcOn = await copyGoesOn('source kill in the copy', copySrcKilledAt, 'src/-');
  const upsertedAfterSrc = await upsertedParts();
  const copyStream = await until('the source stream in a new term', 120_000, () =>
    watch.statuses.find((s) => s.database === 'src' && s.ts.getTime() > copySrcKilledAt && BigInt(s.term) > BigInt(copySrc.term!) && s.state === 'STREAMING'));
  t.diagnostic(`copy, source: ${copySrc.primary} killed; stream on ${copyStream.instanceId} (epoch ${copyStream.epoch}, ${copyStream.resumedFrom})`);
  t.diagnostic(`copy, source kill at ${copySrcOn.rowsAtKill} rows: the copy went on ${(copySrcOn.goesOnMs / 1000).toFixed(1)} s after the kill, `
    + `${upsertedAfterSrc - upsertedBefore} page parts met rows already there; ${copySrcOn.messages.join(' | ')}`);
  const copyDst = await fullStrength(cluster, 120_000, 500, TARGET);
  const copyDstKilledAt = Date.now();
  signalAll(postgresPids(cluster, copyDst.primary!), 'SIGKILL');
  const copyDstOn = await copyGoesOn('target kill in the copy', copyDstKilledAt, `dst/${TARGET.shard}`);
  t.diagnostic(`copy, target kill at ${copyDstOn.rowsAtKill} rows: the copy went on ${(copyDstOn.goesOnMs / 1000).toFixed(1)} s after the kill, `
    + `${(await upsertedParts()) - upsertedAfterSrc} page parts met rows already there; ${copyDstOn.messages.join(' | ')}`);

  const running = await until('catch-up to begin', 180_000, () => samples.find((s) => s.phase === 'RUNNING'));
  const copied = (await api('/v1/workflows/mt')).progress.rowsCopied;
  t.diagnostic(`copy phase: ${copied} rows copied in ${((running.at - firstCopying.at) / 1000).toFixed(1)} s`);

  // In catch-up, once the changes made during the copy are applied: (a) the source primary. Its standby must hold a ready copy of the slot first (decision 0052).
  await until('catch-up to apply the changes made during the copy', 120_000, () => {
    const recent = samples.filter((s) => s.at > Date.now() - 2_000);
    return running.at < Date.now() - 3_000 && recent.length > 0 && recent.every((s) => s.phase === 'RUNNING' && s.lag < 1);
  });
  const src = await sourceSlotCopied();
  const standby = src.instances.find((i) => i.instanceId !== src.primary)!.instanceId;
  const srcKilledAt = Date.now();
  signalAll(postgresPids(cluster, src.primary!), 'SIGKILL');
  const resumed = await until('the source stream in a new term', 120_000, () =>
    watch.statuses.find((s) => s.database === 'src' && s.ts.getTime() > srcKilledAt && BigInt(s.term) > BigInt(src.term!) && s.state === 'STREAMING'));
  t.diagnostic(`source: ${src.primary} killed; stream on ${resumed.instanceId} (epoch ${resumed.epoch}, ${resumed.resumedFrom})`);
  const afterSource = await recovered('source failover', srcKilledAt, RANGES[0].shard);
  t.diagnostic(`source failover: ${figures(afterSource)}`);
  if (afterSource.reportedPeak > afterSource.observedPeak + 5) {
    // The reported lag once peaked at 78.7 s with writes waiting 1.1 s (not reproduced since): keep what shows why.
    const around = samples.filter((s) => s.at >= srcKilledAt && s.lag > 1).map((s) => `+${((s.at - srcKilledAt) / 1000).toFixed(1)} s ${s.phase} lag ${s.lag.toFixed(1)} s ${s.message ?? ''}`);
    t.diagnostic(`source failover: the reported lag exceeded what writes waited: ${around.join(' | ')}`);
  }

  // (b) The target shard's primary.
  const dst = await fullStrength(cluster, 120_000, 1_500, TARGET);
  const dstKilledAt = Date.now();
  signalAll(postgresPids(cluster, dst.primary!), 'SIGKILL');
  const afterTarget = await recovered('target failover', dstKilledAt, TARGET.shard);
  const newDst = await shardStatus(cluster, TARGET);
  t.diagnostic(`target: ${dst.primary} killed; primary now ${newDst.primary} (term ${dst.term} -> ${newDst.term})`);
  t.diagnostic(`target failover: ${figures(afterTarget)}`);
  const messages = [...new Set(samples.filter((s) => s.at >= dstKilledAt && s.message).map((s) => s.message))];
  t.diagnostic(`workflow messages after the target kill: ${messages.join(' | ') || 'none'}`);
  assert.ok(messages.some((m) => m!.includes(`dst/${TARGET.shard}`)), `the workflow did not say it lost its session on dst/${TARGET.shard} (${dst.primary} killed, term ${dst.term} -> ${newDst.term}); it said: ${messages.join(' | ') || 'nothing'}`);

  await sleep(1_000);
  writing = false;
  await writing$;
  t.diagnostic(`writer: ${writes} writes, ${failedWrites} failed (their outcome unknown to the client)`);
  assert.ok(writes > 300, `the writer made ${writes} writes`);

  // The target converges to the source's primary: the same rows, each once, on the shard its keyspace id names; every acknowledged write there.
  const source = await onPrimary(SOURCE);
  const targets = new Map(await Promise.all(RANGES.map(async (r) => [r.shard, await onPrimary({ database: 'dst', shard: r.shard })] as const)));
  const { sourceRows, targetRows } = await targetHoldsSource(source, targets, RANGES, 'id, customer, amount, note');
  for (const [id, note] of acknowledged) {
    const row = targetRows.get(String(id));
    const either = possible.get(id);
    if (either) assert.ok(either.has(row?.note), `row ${id}: ${row?.note} on the target, neither of ${[...either].join(', ')}`);
    else assert.equal(row?.note, note, `row ${id}: the acknowledged note ${note} is not on the target`);
  }
  await source.end();
  await Promise.all([...targets.values()].map((c) => c.end()));

  const clean = await mg('workflow', 'vdiff', 'mt', '--data-dir', dataDir);
  t.diagnostic(clean.stdout.trim());
  assert.equal(clean.code, 0, clean.stdout + clean.stderr);
  assert.match(clean.stdout, new RegExp(`source ${sourceRows.length} rows, target ${sourceRows.length}; missing 0, extra 0, different 0`));

  // No re-copy: the phase never went back to COPYING, the rows copied did not grow, and the source stream kept its epoch.
  sampling = false;
  await sampling$;
  const history = await statusHistory(prefix, 'mt');
  const firstRunning = history.findIndex((s) => s.phase === 'RUNNING');
  assert.deepEqual([...new Set(history.slice(0, firstRunning).map((s) => s.phase))], ['COPYING'], 'the copy went on by itself');
  assert.deepEqual([...new Set(history.slice(firstRunning).map((s) => s.phase))].filter((p) => p !== 'RUNNING'), [], 'the workflow stayed in catch-up');
  assert.equal(String(history.at(-1)!.rowsCopied), String(copied), 'no row copied again');
  // The orchestrator elects the most advanced instance: usually the standby (which takes the slot over), sometimes the old primary brought back first.
  if (resumed.instanceId === standby) assert.match(resumed.resumedFrom ?? '', /^slot carried over from /);
  assert.equal(resumed.epoch, 1n, `the source stream started over (${resumed.resumedFrom}): the table was read again`);
}));
