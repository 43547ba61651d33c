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
import { payload, shardKey, topologyKey, type TopologyEvent } from '../schemas/index.ts';
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
        name, hostedOn: d.hostedOn, durability: d.durabilityPolicy, active: !inactive, inactiveReason: inactive?.reason ?? null,
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
   * them and each is deregistered (decision 0035). Backups stay in the repository until expired.
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
    step('its instances are deregistered; its backups stay in the repository until expired (mg backup expire)');
  }

  /** Throws unless `name` is a database whose instances can stop and start (not one hosted on another). */
  checkActivation(name: string): void {
    const known = this.watch.topology.databases.get(name);
    if (!known || known.dropped) throw new OperationError(404, `no database "${name}"`);
    if (known.hostedOn !== null) {
      throw new OperationError(409, `database "${name}" is hosted on "${known.hostedOn}" and has no instances of its own: (de)activate "${known.hostedOn}", which takes its hosted databases along`);
    }
  }

  /** Publishes the wish; the agents stop (checkpoint first) or start Postgres. Waits until they have. */
  async setActive(name: string, active: boolean, reason: string, step: Step): Promise<void> {
    await this.event(payload('DatabaseActivationChanged', { database: name, active, reason }));
    step(active ? 'asked its agents to start Postgres' : 'asked the gateways to drain its sessions and its agents to checkpoint and stop Postgres');
    if (active) {
      for (const shard of this.shardsOf(name)) await this.primaryOf(name, shard, step);
      step('every shard has a serving primary');
      return;
    }
    const instances = this.shardsOf(name).flatMap((shard) => this.watch.shard(name, shard)?.cohort ?? []);
    const deadline = Date.now() + 60_000;
    step(`waiting for ${instances.map((i) => i.instanceId).join(', ')} to stop`);
    for (;;) {
      const running = instances.filter((i) => this.watch.fresh(i.instanceId)?.reachable !== false);
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

  private async event(p: TopologyEvent['payload']): Promise<void> {
    const e: TopologyEvent = { eventId: randomUUID(), ts: new Date(), source: this.source, payload: p };
    const folded = this.watch.folded(e.eventId);
    try {
      await this.publish([{ key: topologyKey(e), value: e }]);
    } catch (err) {
      folded.catch(() => undefined); // nothing will be folded; its timeout must not go unhandled
      throw err;
    }
    await folded;
  }
}
