/**
 * Databases at run time, the cluster manager's side: which database may be
 * created, dropped, activated or deactivated, and the events and agent
 * commands that do it. Databases created `on` another one are Postgres
 * databases inside that one's instances (its shard group); scale to zero is a
 * property of a shard group, carried out by its agents (see
 * docs/decisions/0026-databases-at-run-time.md).
 */
import { randomUUID } from 'node:crypto';
import type { EventLog } from '../common/eventlog.ts';
import { payload, servingShardsOf, shardKey, topologyKey, type InstanceRegistered, type TopologyEvent } from '../schemas/index.ts';
import type { Agents } from './agents.ts';
import { OperationError } from './operations.ts';
import type { Provisioner } from './provisioner.ts';
import type { ClusterWatch } from './view.ts';

export interface DatabaseInfo {
  name: string;
  hostedOn: string | null;
  durability: string | null;
  active: boolean;
  inactiveReason: string | null;
  /** Inactive and held stopped by a declaration: clients are refused, not woken (decision 0084). */
  held: boolean;
  shards: Array<{ shard: string; primary: string | null; instances: string[] }>;
}

type Step = (message: string) => void;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class DatabaseManager {
  private readonly publish;

  constructor(
    private readonly watch: ClusterWatch, private readonly agents: Agents, private readonly provisioner: Provisioner,
    eventLog: EventLog, private readonly source: string,
  ) {
    this.publish = eventLog.publisher('topology');
  }

  list(): DatabaseInfo[] {
    const t = this.watch.topology;
    return [...t.databases].filter(([, d]) => !d.dropped).map(([name, d]) => {
      const group = d.hostedOn ?? name;
      const inactive = t.inactive.get(group);
      return {
        name, hostedOn: d.hostedOn, durability: d.durabilityPolicy, active: !inactive, inactiveReason: inactive?.reason ?? null, held: inactive?.held ?? false,
        shards: this.watch.shards().filter((s) => s.database === group).map((s) => ({
          shard: s.shard, primary: s.primary?.instanceId ?? null, instances: s.cohort.map((i) => i.instanceId),
        })),
      };
    });
  }

  get(name: string): DatabaseInfo | undefined {
    return this.list().find((d) => d.name === name);
  }

  /** Throws an OperationError when `name` cannot be created on `on` now. */
  checkCreateOn(name: string, on: string): void {
    const t = this.watch.topology;
    const known = t.databases.get(name);
    if (known && !known.dropped) throw new OperationError(409, `database "${name}" already exists`);
    const host = t.databases.get(on);
    if (!host || host.dropped) throw new OperationError(404, `on: no database "${on}"`);
    if (host.hostedOn !== null) throw new OperationError(400, `on: "${on}" is itself hosted on "${host.hostedOn}"; use on: ${host.hostedOn}`);
    if (t.inactive.has(on)) throw new OperationError(409, `on: "${on}" is inactive; activate it first`);
  }

  /** CREATE DATABASE on every shard primary of `on`, then the topology says so: the gateways serve it. */
  async createOn(name: string, on: string, step: Step): Promise<void> {
    for (const shard of this.shardsOf(on)) {
      const primary = await this.primaryOf(on, shard, step);
      step(`CREATE DATABASE on ${primary} (primary of ${on}/${shard})`);
      await this.command(primary, 'CREATE_DATABASE', name);
    }
    await this.event(payload('DatabaseCreated', { database: name, durabilityPolicy: null, hostedOn: on, sharded: false, transactionMode: null }));
    step(`registered in the topology, hosted on ${on}: the gateways serve it`);
  }

  checkDrop(name: string): void {
    const t = this.watch.topology;
    const known = t.databases.get(name);
    if (!known || known.dropped) throw new OperationError(404, `no database "${name}"`);
    if (known.hostedOn !== null) return;
    const hosted = [...t.databases].filter(([, d]) => !d.dropped && d.hostedOn === name).map(([n]) => n);
    if (hosted.length) throw new OperationError(409, `databases ${hosted.join(', ')} are hosted on "${name}": drop them first`);
    if ([...t.databases].every(([n, d]) => d.dropped || n === name)) throw new OperationError(409, `"${name}" is the cluster's only database`);
    if (!this.provisioner.available) throw new OperationError(501, 'this orchestrator has no provisioner configured: instances are provisioned outside it (mg cluster up configures one)');
  }

  /**
   * Deregisters first (the gateways drain its sessions and answer 3D000), then: for a database hosted on another,
   * DROP DATABASE on the host's primaries; for one with instances of its own, the provisioner stops and deletes
   * them and each is deregistered (decision 0035). Backups stay in the repository until deleted (decision 0064).
   */
  async drop(name: string, step: Step): Promise<void> {
    const host = this.watch.topology.databases.get(name)!.hostedOn;
    const instances = host === null ? this.shardsOf(name).flatMap((shard) => this.watch.shard(name, shard)!.cohort) : [];
    await this.event(payload('DatabaseDropped', { database: name }));
    step('deregistered: the gateways drain its sessions and answer 3D000 for it');
    if (host !== null) {
      for (const shard of this.shardsOf(host)) {
        const primary = await this.primaryOf(host, shard, step);
        step(`DROP DATABASE on ${primary} (primary of ${host}/${shard})`);
        await this.command(primary, 'DROP_DATABASE', name);
      }
      return;
    }
    step(`stopping and deleting its ${instances.length} instance(s): ${instances.map((i) => i.instanceId).join(', ')}`);
    await this.provisioner.dropDatabase(name, step);
    for (const inst of instances) await this.event(payload('InstanceDeregistered', { instanceId: inst.instanceId, reason: `mg database drop ${name}` }));
    step(`its instances are deregistered; its backups stay in the repository until deleted (mg backup list ${name})`);
  }

  /**
   * Throws unless `shards` of `name` can be retired now: a database with instances of its own, shards the topology
   * still knows (defined, or with instances not yet deregistered), none of them serving its clients.
   */
  checkRetireShards(name: string, shards: string[]): void {
    const t = this.watch.topology;
    const known = t.databases.get(name);
    if (!known || known.dropped) throw new OperationError(404, `no database "${name}"`);
    if (known.hostedOn !== null) throw new OperationError(409, `database "${name}" is hosted on "${known.hostedOn}" and has no shards of its own`);
    const left = this.retiring(name, shards);
    const unknown = shards.filter((s) => !left.defined.includes(s) && !left.instances.some((i) => i.shard === s));
    if (unknown.length) throw new OperationError(404, `database "${name}" has no shard ${unknown.join(', ')} (or it is retired already)`);
    const serving = servingShardsOf(t, name).map((s) => s.shard).filter((s) => shards.includes(s));
    if (serving.length) throw new OperationError(409, `shards ${serving.join(', ')} of "${name}" serve its clients: a reshard's switch-traffic moves them to another set first`);
    if (!this.provisioner.available) throw new OperationError(501, 'this orchestrator has no provisioner configured: instances are provisioned outside it (mg cluster up configures one)');
  }

  /**
   * Retires a reshard's old shard set (decision 0061), as a database drop does its instances: ShardDropped first
   * (orchestrators stop electing, repairing and backing up the shards, gateways forget them), then the provisioner
   * stops and deletes their instances and retires the set in the saved spec, then each is deregistered. Every step
   * skips what an earlier, interrupted run did. Backups stay in the repository until deleted (decision 0064).
   */
  async retireShards(name: string, shards: string[], reason: string, step: Step): Promise<void> {
    const { defined, instances } = this.retiring(name, shards);
    if (defined.length) {
      await this.events(defined.map((shard) => payload('ShardDropped', { database: name, shard, reason })));
      step(`ShardDropped ${defined.map((s) => `${name}/${s}`).join(', ')}: no orchestrator manages them, no gateway knows them`);
    }
    step(`stopping and deleting their ${instances.length} instance(s): ${instances.map((i) => i.instanceId).join(', ') || 'none left'}`);
    await this.provisioner.dropShards(name, shards, step);
    if (instances.length) await this.events(instances.map((inst) => payload('InstanceDeregistered', { instanceId: inst.instanceId, reason })));
    step(`their instances are deregistered; their backups stay in the repository until deleted (mg backup list ${name})`);
  }

  /** What is left of `shards` of `name` in the topology: the ones still defined, and their instances still registered. */
  private retiring(name: string, shards: string[]): { defined: string[]; instances: InstanceRegistered[] } {
    const t = this.watch.topology;
    return {
      defined: shards.filter((s) => t.shards.has(shardKey(name, s))),
      instances: [...t.instances.values()].filter((i) => i.database === name && shards.includes(i.shard)),
    };
  }

  /** Throws unless `name` is a database whose instances can stop and start (not one hosted on another). */
  checkActivation(name: string): void {
    const known = this.watch.topology.databases.get(name);
    if (!known || known.dropped) throw new OperationError(404, `no database "${name}"`);
    if (known.hostedOn !== null) {
      throw new OperationError(409, `database "${name}" is hosted on "${known.hostedOn}" and has no instances of its own: (de)activate "${known.hostedOn}", which takes its hosted databases along`);
    }
  }

  /**
   * Publishes the wish; the agents stop (checkpoint first) or start Postgres. Waits until they have.
   * A held deactivation is not undone by a client connecting: the gateways refuse them until an activation.
   */
  async setActive(name: string, active: boolean, reason: string, step: Step, held = false): Promise<void> {
    await this.event(payload('DatabaseActivationChanged', { database: name, active, reason, held: !active && held }));
    step(active ? 'asked its agents to start Postgres'
      : `asked the gateways to drain its sessions${held ? ' and refuse new ones until it is activated' : ''} and its agents to checkpoint and stop Postgres`);
    if (active) {
      for (const shard of this.shardsOf(name)) await this.primaryOf(name, shard, step);
      step('every shard has a serving primary');
      return;
    }
    const instances = this.shardsOf(name).flatMap((shard) => this.watch.shard(name, shard)?.cohort ?? []);
    const deadline = Date.now() + 60_000;
    step(`waiting for ${instances.map((i) => i.instanceId).join(', ')} to stop`);
    for (;;) {
      // Unreachable is not stopped: a shutdown checkpoint refuses connections while the postmaster still runs.
      const running = instances.filter((i) => {
        const h = this.watch.fresh(i.instanceId);
        return !h || h.reachable || h.postgresPid !== null;
      });
      if (running.length === 0) break;
      if (Date.now() > deadline) throw new Error(`still running after 60 s: ${running.map((i) => i.instanceId).join(', ')}`);
      await sleep(100);
    }
    step('every instance stopped; data and topology stay');
  }

  private shardsOf(group: string): string[] {
    return this.watch.shards().filter((s) => s.database === group).map((s) => s.shard);
  }

  /** The shard's primary once its agent reports it healthy (waiting up to 30 s, e.g. during a failover). */
  private async primaryOf(database: string, shard: string, step: Step): Promise<string> {
    const deadline = Date.now() + 30_000;
    let said = false;
    for (;;) {
      const id = this.watch.topology.primaries.get(shardKey(database, shard))?.instanceId;
      const h = id && this.watch.fresh(id);
      if (h && h.reachable && h.role === 'PRIMARY') return id!;
      if (Date.now() > deadline) throw new Error(`${database}/${shard} has no healthy primary after 30 s`);
      if (!said) step(`waiting for a healthy primary of ${database}/${shard}`);
      said = true;
      await sleep(100);
    }
  }

  private async command(instanceId: string, action: 'CREATE_DATABASE' | 'DROP_DATABASE', name: string): Promise<void> {
    const r = await this.agents.send(instanceId, action, { name }, 60_000);
    if (r.status !== 'SUCCEEDED') throw new Error(`${action} on ${instanceId}: ${r.message}`);
  }

  private event(p: TopologyEvent['payload']): Promise<void> {
    return this.events([p]);
  }

  /** Publishes the events in one batch and waits until this orchestrator's fold has taken them in. */
  private async events(payloads: Array<TopologyEvent['payload']>): Promise<void> {
    const batch: TopologyEvent[] = payloads.map((p) => ({ eventId: randomUUID(), ts: new Date(), source: this.source, payload: p }));
    const folded = batch.map((e) => this.watch.folded(e.eventId));
    try {
      await this.publish(batch.map((e) => ({ key: topologyKey(e), value: e })));
    } catch (err) {
      for (const f of folded) f.catch(() => undefined); // nothing will be folded; the timeouts must not go unhandled
      throw err;
    }
    await Promise.all(folded);
  }
}
