/**
 * Leader election on a coordination.k8s.io Lease, the way Kubernetes controllers do it: the
 * holder renews the lease every retry period; another replica takes it only once it has not
 * been renewed for a whole lease duration; every write carries the resourceVersion read, so
 * of two replicas racing for the lease exactly one wins. A leader that cannot renew within
 * the renew deadline stops acting (the caller exits) before anyone else may take over.
 */
import { CoordinationV1Api, V1MicroTime, type KubeConfig, type V1Lease } from '@kubernetes/client-node';
import type { Logger } from '../common/log.ts';
import { counter, gauge } from '../common/metrics.ts';
import { statusOf } from './kube.ts';

const leading = gauge('mg_operator_leader', '1 while this replica holds the lease');
const transitions = counter('mg_operator_leader_acquired_total', 'Times this replica acquired the lease');

export interface LeaderOptions {
  namespace: string;
  name: string;
  identity: string;
  leaseSeconds: number;
  log: Logger;
}

export class LeaderElector {
  private readonly api: CoordinationV1Api;
  private timer: NodeJS.Timeout | undefined;
  private lastRenew = 0;
  private leader = false;

  constructor(kc: KubeConfig, private readonly opts: LeaderOptions) {
    this.api = kc.makeApiClient(CoordinationV1Api);
  }

  isLeader(): boolean {
    return this.leader;
  }

  /**
   * Tries for the lease every leaseSeconds/3; calls onLead once it has it and onLost if it
   * fails to renew for 2/3 of the lease (other replicas wait the whole lease before taking it).
   */
  start(onLead: () => void, onLost: () => void): void {
    const period = (this.opts.leaseSeconds * 1000) / 3;
    const tick = async () => {
      try {
        const held = await this.tryAcquireOrRenew();
        if (held) this.lastRenew = Date.now();
        if (held && !this.leader) {
          this.leader = true;
          leading.set(1);
          transitions.inc();
          this.opts.log.info({ lease: this.opts.name, identity: this.opts.identity }, 'acquired the leader lease');
          onLead();
        }
        if (!held && this.leader) return this.lose(onLost, 'another replica holds the lease');
      } catch (err) {
        this.opts.log.warn({ err: (err as Error).message }, 'lease request failed');
      }
      if (this.leader && Date.now() - this.lastRenew > 2 * period) return this.lose(onLost, 'could not renew the lease in time');
      this.timer = setTimeout(() => void tick(), period);
    };
    void tick();
  }

  /** Gives the lease up (on shutdown) so another replica takes over at once. */
  async release(): Promise<void> {
    clearTimeout(this.timer);
    if (!this.leader) return;
    this.leader = false;
    leading.set(0);
    try {
      const lease = await this.api.readNamespacedLease({ name: this.opts.name, namespace: this.opts.namespace });
      if (lease.spec?.holderIdentity !== this.opts.identity) return;
      lease.spec.holderIdentity = undefined;
      lease.spec.renewTime = undefined;
      await this.api.replaceNamespacedLease({ name: this.opts.name, namespace: this.opts.namespace, body: lease });
    } catch (err) {
      this.opts.log.warn({ err: (err as Error).message }, 'could not release the lease');
    }
  }

  private lose(onLost: () => void, why: string): void {
    this.leader = false;
    leading.set(0);
    clearTimeout(this.timer);
    this.opts.log.error({ lease: this.opts.name, why }, 'lost the leader lease');
    onLost();
  }

  /** True when this replica holds the lease after the call. */
  private async tryAcquireOrRenew(): Promise<boolean> {
    const { name, namespace, identity, leaseSeconds } = this.opts;
    // MicroTime: the API server wants six fractional digits, a plain Date sends three.
    const now = new V1MicroTime();
    let lease: V1Lease;
    try {
      lease = await this.api.readNamespacedLease({ name, namespace });
    } catch (err) {
      if (statusOf(err) !== 404) throw err;
      try {
        await this.api.createNamespacedLease({ namespace, body: {
          metadata: { name, namespace },
          spec: { holderIdentity: identity, leaseDurationSeconds: leaseSeconds, acquireTime: now, renewTime: now, leaseTransitions: 0 },
        } });
        return true;
      } catch (createErr) {
        if (statusOf(createErr) === 409) return false; // another replica created it first
        throw createErr;
      }
    }
    const spec = lease.spec ?? {};
    const mine = spec.holderIdentity === identity;
    const renewed = spec.renewTime ? new Date(spec.renewTime).getTime() : 0;
    const expired = !spec.holderIdentity || renewed + (spec.leaseDurationSeconds ?? leaseSeconds) * 1000 < now.getTime();
    if (!mine && !expired) return false;
    lease.spec = {
      ...spec, holderIdentity: identity, leaseDurationSeconds: leaseSeconds, renewTime: now,
      ...(mine ? {} : { acquireTime: now, leaseTransitions: (spec.leaseTransitions ?? 0) + 1 }),
    };
    try {
      // The resourceVersion read above makes this a compare-and-swap: a concurrent writer gets 409.
      await this.api.replaceNamespacedLease({ name, namespace, body: lease });
      return true;
    } catch (err) {
      if (statusOf(err) === 409) return false;
      throw err;
    }
  }
}
