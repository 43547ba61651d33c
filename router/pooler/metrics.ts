/**
 * Prometheus metrics of the pooler. The hot path only bumps plain numbers; the
 * metrics read them (and the pools) when scraped. Several poolers in one
 * process (tests) are summed.
 */
import client from 'prom-client';
import { metrics } from '../../common/metrics.ts';

export interface PoolerSnapshot {
  clients: { active: number; waiting: number; idle: number; pinned: number };
  servers: { active: number; idle: number; resetting: number; connecting: number };
  queries: number;
  xacts: number;
  errors: ReadonlyMap<string, number>;
  notifications: number;
  serverConnects: number;
  giveBacks: number;
}

const live = new Set<() => PoolerSnapshot>();

export function registerPooler(snapshot: () => PoolerSnapshot): () => void {
  ensureMetrics();
  live.add(snapshot);
  return () => live.delete(snapshot);
}

/**
 * A histogram cheap enough for every checkout: plain bucket counters, turned into
 * Prometheus lines only when scraped (prom-client's observe() hashes labels each time).
 */
class WaitHistogram {
  readonly name = 'mg_pooler_wait_seconds';
  readonly help = 'Time clients waited for a server connection';
  readonly type = 'histogram';
  readonly aggregator = 'sum';
  private readonly bounds = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30];
  private counts = new Float64Array(this.bounds.length + 1);
  private sum = 0;

  observe(v: number): void {
    const b = this.bounds;
    let i = 0;
    while (i < b.length && v > b[i]) i++;
    this.counts[i]++;
    this.sum += v;
  }

  get() {
    const values: Array<{ metricName: string; labels: Record<string, string | number>; value: number }> = [];
    let acc = 0;
    this.bounds.forEach((le, i) => {
      acc += this.counts[i];
      values.push({ metricName: `${this.name}_bucket`, labels: { le }, value: acc });
    });
    acc += this.counts[this.bounds.length];
    values.push({ metricName: `${this.name}_bucket`, labels: { le: '+Inf' }, value: acc });
    values.push({ metricName: `${this.name}_sum`, labels: {}, value: this.sum });
    values.push({ metricName: `${this.name}_count`, labels: {}, value: acc });
    return { name: this.name, help: this.help, type: this.type, values, aggregator: this.aggregator };
  }

  reset(): void {
    this.counts = new Float64Array(this.bounds.length + 1);
    this.sum = 0;
  }
}

let waitHistogram: WaitHistogram | undefined;

export function observeWait(seconds: number): void {
  waitHistogram?.observe(seconds);
}

function snapshots(): PoolerSnapshot[] {
  return [...live].map((f) => f());
}

/** Sets one gauge sample per state, summed over every live pooler. */
function setByState<K extends string>(gauge: client.Gauge, states: K[], pick: (s: PoolerSnapshot) => Record<K, number>): void {
  const all = snapshots();
  for (const state of states) gauge.set({ state }, all.reduce((n, s) => n + pick(s)[state], 0));
}

function ensureMetrics(): void {
  if (waitHistogram) return;
  const existing = metrics.getSingleMetric('mg_pooler_wait_seconds') as unknown as WaitHistogram | undefined;
  if (existing) {
    waitHistogram = existing;
    return;
  }
  waitHistogram = new WaitHistogram();
  metrics.registerMetric(waitHistogram as unknown as client.Metric);
  new client.Gauge({
    name: 'mg_pooler_clients',
    help: 'Client connections by state',
    labelNames: ['state'],
    registers: [metrics],
    collect() {
      setByState(this, ['active', 'waiting', 'idle'], (s) => s.clients);
    },
  });
  new client.Gauge({
    name: 'mg_pooler_waiting_clients',
    help: 'Clients waiting for a server connection',
    registers: [metrics],
    collect() {
      this.set(snapshots().reduce((n, s) => n + s.clients.waiting, 0));
    },
  });
  new client.Gauge({
    name: 'mg_pooler_pinned_clients',
    help: 'Clients pinned to a server connection by session state',
    registers: [metrics],
    collect() {
      this.set(snapshots().reduce((n, s) => n + s.clients.pinned, 0));
    },
  });
  new client.Gauge({
    name: 'mg_pooler_servers',
    help: 'Server connections by state',
    labelNames: ['state'],
    registers: [metrics],
    collect() {
      setByState(this, ['active', 'idle', 'resetting', 'connecting'], (s) => s.servers);
    },
  });
  new client.Counter({
    name: 'mg_pooler_transactions_total',
    help: 'Transactions (server connection checkouts) completed',
    registers: [metrics],
    collect() {
      this.reset();
      this.inc(snapshots().reduce((n, s) => n + s.xacts, 0));
    },
  });
  new client.Counter({
    name: 'mg_pooler_queries_total',
    help: 'Queries completed (ReadyForQuery relayed)',
    registers: [metrics],
    collect() {
      this.reset();
      this.inc(snapshots().reduce((n, s) => n + s.queries, 0));
    },
  });
  new client.Counter({
    name: 'mg_pooler_notifications_total',
    help: 'Notifications fanned out by shared listeners',
    registers: [metrics],
    collect() {
      this.reset();
      this.inc(snapshots().reduce((n, s) => n + s.notifications, 0));
    },
  });
  new client.Counter({
    name: 'mg_pooler_server_connects_total',
    help: 'Server connections opened',
    registers: [metrics],
    collect() {
      this.reset();
      this.inc(snapshots().reduce((n, s) => n + s.serverConnects, 0));
    },
  });
  new client.Counter({
    name: 'mg_pooler_give_backs_total',
    help: 'Server connections closed to give their lease to another worker of the same pooler',
    registers: [metrics],
    collect() {
      this.reset();
      this.inc(snapshots().reduce((n, s) => n + s.giveBacks, 0));
    },
  });
  new client.Counter({
    name: 'mg_pooler_errors_total',
    help: 'Errors by kind (server_error, client_protocol, queue_timeout, server_lost, server_connect, ...)',
    labelNames: ['kind'],
    registers: [metrics],
    collect() {
      this.reset();
      for (const s of snapshots()) for (const [k, v] of s.errors) this.inc({ kind: k }, v);
    },
  });
}
