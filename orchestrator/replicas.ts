/**
 * Replicas at run time, the cluster manager's side (decision 0034): which
 * replica may be added or removed, and the order of the steps. Adding: the
 * provisioner starts an agent with no data; the keeper restores it (latest
 * backup plus archived WAL, else pg_basebackup) like any empty instance and
 * puts it in service once it has caught up. Removing: out of routing and out
 * of the policy's cohort first (the keeper), then stopped, its data deleted
 * (the provisioner), deregistered, and its replication slot dropped.
 */
import { queryAt } from '../common/postgres.ts';
import { slotNameOf, type InstanceRegistered } from '../schemas/index.ts';
import { drainClients, ElectionError } from './election.ts';
import type { Journal } from './journal.ts';
import type { Keeper } from './keeper.ts';
import { OperationError } from './operations.ts';
import type { Provisioner } from './provisioner.ts';
import type { ClusterWatch, ShardView } from './view.ts';

type Step = (message: string) => void;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** How long a new replica may take to restore, catch up and serve. */
const ADD_TIMEOUT_MS = 600_000;
/** Client transactions on a leaving replica get this long to end (new ones go elsewhere). */
const REMOVE_DRAIN_MS = 5_000;
/** Time for every gateway to fold DRAINED before the replica is watched for idleness. */
const ROUTING_GRACE_MS = 500;
/** What the agent says when a REPOINT built the data directory (ReplicaSource in ingest/postgres/instance.ts). */
const BUILT = /restored from the latest backup|cloned with pg_basebackup/;

export class ReplicaManager {
  constructor(
    private readonly watch: ClusterWatch, private readonly keeper: Keeper, private readonly journal: Journal, private readonly provisioner: Provisioner,
  ) {}

  /** The cell the new replica goes to (the given one, else the shard's least used); an OperationError when it cannot be added now. */
  checkAdd(database: string, shardName: string, cell: string | undefined): string {
    const shard = this.shardOr404(database, shardName);
    if (cell !== undefined && !this.watch.topology.cells.has(cell)) {
      throw new OperationError(400, `body.cell: no cell "${cell}" (cells: ${[...this.watch.topology.cells.keys()].join(', ')})`);
    }
    if (this.watch.topology.inactive.has(database)) throw new OperationError(409, `database "${database}" is inactive (scaled to zero); activate it first`);
    if (!shard.primary) throw new OperationError(409, `${shard.key} has no primary yet`);
    if (!this.provisioner.available) throw new OperationError(501, 'this orchestrator has no provisioner configured: instances are provisioned outside it (mg cluster up configures one)');
    if (cell !== undefined) return cell;
    const used = (c: string) => shard.cohort.filter((i) => i.cell === c).length;
    return [...this.watch.topology.cells.keys()].sort((a, b) => used(a) - used(b) || a.localeCompare(b))[0];
  }

  async add(database: string, shardName: string, cell: string, step: Step): Promise<void> {
    const key = `${database}/${shardName}`;
    const started = new Date();
    step(`provisioning a replica of ${key} in ${cell}: its agent and pooler on this machine`);
    const { instanceId } = await this.provisioner.add(database, shardName, cell, step);
    step(`${instanceId}: registered; waiting for MultiOrch to restore it from the latest backup plus archived WAL (pg_basebackup when there is none)`);
    const deadline = Date.now() + ADD_TIMEOUT_MS;
    const said = new Set<string>();
    let servingSince: number | undefined;
    const say = (what: string, message: string) => {
      if (!said.has(what)) step(message);
      said.add(what);
    };
    for (;;) {
      if (Date.now() > deadline) throw new Error(`${instanceId} did not serve within ${ADD_TIMEOUT_MS / 1000} s`);
      const shard = this.watch.shard(database, shardName);
      if (!shard?.cohort.some((i) => i.instanceId === instanceId)) throw new Error(`${instanceId} left ${key} while being added`);
      // Of this instance since the operation began (an earlier replica may have had its id and slot).
      const repoints = this.journal.historyOf(shard.key).filter((e) => e.operation === 'repoint' && e.summary.startsWith(`${instanceId}:`) && e.ts >= started);
      // Orchestrators of other cells may repoint it again once it streams: the one that built it says how.
      const repoint = repoints.find((e) => e.kind === 'COMPLETED' && BUILT.test(e.summary)) ?? repoints.at(-1);
      if (repoint?.kind === 'COMPLETED') say('restored', `${repoint.summary}; waiting until it has caught up with the primary`);
      else if (repoint?.kind === 'FAILED') say(`failed ${repoint.eventId}`, `${repoint.summary} (MultiOrch retries)`);
      const h = this.watch.fresh(instanceId);
      if (h?.walReceiverStatus === 'streaming') say('streaming', `${instanceId}: streaming from ${h.upstream}`);
      // The journal and the topology are two logs: give the repoint's outcome a moment to show before the end.
      if (this.watch.topology.serving.get(instanceId) === 'SERVING' && (said.has('restored') || (servingSince ??= Date.now()) < Date.now() - 2_000)) {
        step(`${instanceId}: caught up with the primary: serving (the gateways send it reads)`);
        return;
      }
      await sleep(200);
    }
  }

  /** An OperationError when the instance may not be removed now: unknown (404), the primary or needed by the policy (409). */
  checkRemove(database: string, shardName: string, instanceId: string): void {
    const shard = this.shardOr404(database, shardName);
    if (!shard.cohort.some((i) => i.instanceId === instanceId)) throw new OperationError(404, `${instanceId} is not an instance of ${shard.key}`);
    const refusal = this.keeper.removalRefusal(shard, instanceId);
    if (refusal) throw new OperationError(409, refusal);
    if (!this.provisioner.available) throw new OperationError(501, 'this orchestrator has no provisioner configured: instances are provisioned outside it (mg cluster up configures one)');
  }

  async remove(database: string, shardName: string, instanceId: string, step: Step): Promise<void> {
    const shard = this.shardOr404(database, shardName);
    const inst = shard.cohort.find((i) => i.instanceId === instanceId)!;
    step(`${instanceId}: out of routing (DRAINED) and out of the durability policy's cohort`);
    try {
      // What the keeper recorded, not the journal's history: that is folded from the log a moment later.
      step(await this.keeper.removeFromCohort(database, shardName, instanceId));
    } catch (err) {
      if (err instanceof ElectionError && err.status === 'refused') throw new OperationError(409, err.message);
      throw err;
    }
    step(`waiting up to ${REMOVE_DRAIN_MS / 1000} s for its client transactions to end`);
    await sleep(ROUTING_GRACE_MS);
    await drainClients(inst, REMOVE_DRAIN_MS).catch((err: Error) => step(`not drained (${err.message}); stopping it anyway`));
    await this.provisioner.remove(instanceId, step);
    await this.keeper.deregister(instanceId, 'mg replica remove');
    step(`${instanceId}: deregistered`);
    await this.dropSlot(database, shardName, inst, step);
  }

  /** The primary kept WAL for the replica's slot: drop it (once the replica's walsender is gone). */
  private async dropSlot(database: string, shardName: string, inst: InstanceRegistered, step: Step): Promise<void> {
    const shard = this.watch.shard(database, shardName);
    const primary = shard?.cohort.find((i) => i.instanceId === shard.primary?.instanceId);
    if (!primary) return step(`no primary to drop the replication slot of ${inst.instanceId} on; the next one will not have it`);
    const slot = slotNameOf(inst.instanceId);
    for (let attempt = 0; ; attempt++) {
      try {
        const rows = await queryAt<{ dropped: boolean }>({ host: primary.host, port: primary.port },
          'SELECT pg_drop_replication_slot(slot_name) IS NULL AS dropped FROM pg_replication_slots WHERE slot_name = $1', [slot], 5_000);
        return step(rows.length ? `replication slot ${slot} dropped on ${primary.instanceId}` : `no replication slot ${slot} on ${primary.instanceId}`);
      } catch (err) {
        if (attempt >= 20) return step(`could not drop replication slot ${slot} on ${primary.instanceId}: ${(err as Error).message}`);
        await sleep(250); // still active for a moment after the replica stopped
      }
    }
  }

  private shardOr404(database: string, shardName: string): ShardView {
    const shard = this.watch.shard(database, shardName);
    if (!shard) throw new OperationError(404, `no shard ${database}/${shardName}`);
    return shard;
  }
}
