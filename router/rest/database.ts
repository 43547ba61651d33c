/**
 * One database behind the REST API: pg pools to wherever routing says
 * (through the poolers in the gateway, or straight to Postgres in tests), the
 * schema cache, and its reload on `NOTIFY pgrst, 'reload schema'`.
 */
import { createHash } from 'node:crypto';
import pg from 'pg';
import type { Logger } from '../../common/log.ts';
import { counter } from '../../common/metrics.ts';
import type { RunShards, RunTransaction, Transaction } from './handler.ts';
import type { TwoPhaseCoordinator } from '../twopc/coordinator.ts';
import type { ShardRouting } from './sharded.ts';
import { loadSchemaCache, type SchemaCache } from './schema-cache.ts';

export interface RestEndpoint { host: string; port: number }

export interface RestDatabaseOptions {
  name: string;
  user: string;
  schemas: string[];
  /**
   * Where a transaction runs now: the primary of `shard` (of the first shard
   * when unnamed), or (readOnly) a replica when routing allows; waits out a failover.
   */
  endpoint(readOnly: boolean, shard?: string): Promise<RestEndpoint>;
  /** The planner and key ranges when the database is sharded now (undefined: unsharded). */
  sharding?(): ShardRouting | undefined;
  /** The coordinator when the database's transaction mode is twopc now (undefined: multi). */
  twopc?(): TwoPhaseCoordinator | undefined;
  log: Logger;
  poolSize?: number;
}

const RELOAD_RETRY_MS = 1_000;
const announced = counter('mg_rest_schema_announcements_total', 'NOTIFY pgrst sent after DDL through the gateway, by outcome (sent, failed)', ['outcome']);
/** DDL statements within this window of each other are announced once. */
const ANNOUNCE_DEBOUNCE_MS = 50;
/**
 * Statements prepared per connection, at most: request shapes repeat (the
 * values are parameters), so the hot ones are parsed and planned once; a
 * client inventing endless shapes cannot grow a server connection past this.
 */
const MAX_PREPARED_PER_CONNECTION = 200;
const prepared = new WeakMap<pg.PoolClient, Set<string>>();
/** Values as the text Postgres sent (merging compares them by type, as the sharded planner's merge does). */
const RAW_TEXT = { getTypeParser: () => (v: string) => v } as unknown as pg.CustomTypesConfig;

/**
 * The statement as node-postgres should send it: named (prepared once per
 * connection) while there is room. The name carries the schema cache's
 * generation, so a statement prepared before a reload (whose parameter types
 * may no longer fit the columns) is never reused after it.
 */
function statement(client: pg.PoolClient, generation: number, text: string, values: unknown[]): pg.QueryConfig {
  let names = prepared.get(client);
  if (!names) prepared.set(client, (names = new Set()));
  const name = `mg_rest_${generation}_${createHash('sha1').update(text).digest('base64url')}`;
  if (!names.has(name) && names.size >= MAX_PREPARED_PER_CONNECTION) return { text, values };
  names.add(name);
  return { name, text, values };
}

export class RestDatabase {
  private readonly pools = new Map<string, pg.Pool>();
  private cache: Promise<SchemaCache> | undefined;
  private listener: pg.Client | undefined;
  private closed = false;
  /** Bumped on each schema reload (names of prepared statements carry it). */
  private generation = 0;
  /** A NOTIFY about to announce DDL (announceSchemaChange). */
  private announcing: NodeJS.Timeout | undefined;

  constructor(private readonly opts: RestDatabaseOptions) {}

  private pool(ep: RestEndpoint): pg.Pool {
    const key = `${ep.host}:${ep.port}`;
    let pool = this.pools.get(key);
    if (!pool) {
      pool = new pg.Pool({
        host: ep.host, port: ep.port, user: this.opts.user, database: this.opts.name, max: this.opts.poolSize ?? 10,
        idleTimeoutMillis: 30_000, application_name: 'mg-rest', pipeline: true,
      });
      // A pooled connection that dies (failover, restart) is dropped; the next request opens another.
      pool.on('error', (err) => this.opts.log.warn({ err: err.message, endpoint: key }, 'rest pool connection failed'));
      this.pools.set(key, pool);
    }
    return pool;
  }

  /**
   * BEGIN, the request's statements and (when the outcome does not depend on
   * the result) COMMIT go out together on a pipelining connection: one round
   * trip to Postgres instead of four.
   */
  readonly run: RunTransaction = async (opts, fn) => {
    const client = await this.pool(await this.opts.endpoint(opts.readOnly)).connect();
    let broken = false;
    const quietly = (p: Promise<unknown>) => p.catch((err) => {
      if (!(err as { code?: string }).code) broken = true; // a socket error, not a Postgres one: never reuse it
    });
    try {
      const begin = client.query(opts.readOnly ? 'BEGIN READ ONLY' : 'BEGIN');
      const tx = this.transaction(client);
      const work = fn(tx);
      // sent right behind the statements fn issued before its first await; an error there makes it a ROLLBACK
      const early = opts.decideAfter ? undefined : client.query('COMMIT');
      for (const p of [begin, work, early]) p?.catch(() => {}); // awaited below, possibly after another one failed
      await begin;
      try {
        const { result, rollback } = await work;
        if (early) await early;
        else await client.query(rollback ? 'ROLLBACK' : 'COMMIT');
        return result;
      } catch (err) {
        if (early) await quietly(early);
        else await quietly(client.query('ROLLBACK'));
        throw err;
      }
    } catch (err) {
      if (!(err as { code?: string }).code) broken = true;
      throw err;
    } finally {
      client.release(broken);
    }
  };

  private transaction(client: pg.PoolClient): Transaction {
    return {
      query: async (sql, params) => (await client.query(statement(client, this.generation, sql, params))).rows,
      rows: async (sql, params) => {
        const r = await client.query({ ...statement(client, this.generation, sql, params), rowMode: 'array', types: RAW_TEXT });
        return { fields: r.fields.map((f) => ({ name: f.name, typeOid: f.dataTypeID })), rows: r.rows as Array<Array<string | null>> };
      },
    };
  }

  /** The database's sharding now, when it is sharded. */
  sharding(): ShardRouting | undefined {
    return this.opts.sharding?.();
  }

  /**
   * One transaction on each of `shards` (primaries, or replicas for reads when
   * routing allows): committed together when `fn` returns, rolled back
   * together when it throws or asks. A write over several shards commits as
   * the database's transaction mode says, as the wire protocol's would: with
   * two-phase commit in `twopc` mode (all or nothing); otherwise as `multi`,
   * where a COMMIT that fails on one shard after another committed is
   * reported, not undone.
   */
  readonly runShards: RunShards = async (shards, opts, fn) => {
    // In the order opened: the shards asked for, then those `on` joins (lookup tables' shards).
    const clients: Array<{ shard: string; client: pg.PoolClient }> = [];
    const opening = new Map<string, Promise<Transaction>>();
    const broken = new Set<pg.PoolClient>();
    const on = (shard: string): Promise<Transaction> => {
      let tx = opening.get(shard);
      if (!tx) {
        tx = (async () => {
          const client = await this.pool(await this.opts.endpoint(opts.readOnly, shard)).connect();
          clients.push({ shard, client });
          await client.query(opts.readOnly ? 'BEGIN READ ONLY' : 'BEGIN');
          return this.transaction(client);
        })();
        opening.set(shard, tx);
      }
      return tx;
    };
    /** Every transaction opened, once none is still opening (a failed request may leave one in flight). */
    const opened = async () => {
      await Promise.allSettled(opening.values());
      return clients;
    };
    const settle = (client: pg.PoolClient, sql: string) => client.query(sql).catch((err) => {
      if (!(err as { code?: string }).code) broken.add(client);
    });
    try {
      let outcome: Awaited<ReturnType<typeof fn>>;
      try {
        outcome = await fn(await Promise.all(shards.map(on)), on);
      } catch (err) {
        await Promise.all((await opened()).map((c) => settle(c.client, 'ROLLBACK')));
        throw err;
      }
      const all = await opened();
      const coordinator = !opts.readOnly && !outcome.rollback && all.length > 1 ? this.opts.twopc?.() : undefined;
      // The commit's own statements (the decision row, PREPARE) run as the gateway's user, not the request's role: a
      // prepared transaction belongs to the role that prepared it, and the decision table is the gateway's.
      // Its first statement on each shard is inside the transaction (the PREPARE, or the decision and COMMIT): the
      // RESET goes with it, not with a later COMMIT PREPARED, which may not share a query string.
      const participant = ({ shard, client }: { shard: string; client: pg.PoolClient }) => {
        let reset = 'RESET ROLE; ';
        return { shard, query: async (sql: string) => { await client.query(`${reset}${sql}`); reset = ''; } };
      };
      if (coordinator) await coordinator.commit(this.opts.name, all.map(participant));
      else await Promise.all(all.map((c) => c.client.query(outcome.rollback ? 'ROLLBACK' : 'COMMIT')));
      return outcome.result;
    } catch (err) {
      if (!(err as { code?: string }).code) clients.forEach((c) => broken.add(c.client));
      throw err;
    } finally {
      for (const c of await opened()) c.client.release(broken.has(c.client));
    }
  };

  /** The schema cache, loaded once and kept current by NOTIFY pgrst. */
  schemaCache(): Promise<SchemaCache> {
    if (!this.cache) {
      this.cache = this.load();
      this.cache.catch(() => { this.cache = undefined; }); // the next request tries again
      void this.listen();
    }
    return this.cache;
  }

  private async load(): Promise<SchemaCache> {
    const started = performance.now();
    const pool = this.pool(await this.opts.endpoint(false));
    const cache = await loadSchemaCache(async (sql, params) => (await pool.query(sql, params)).rows, this.opts.schemas);
    this.opts.log.info({ database: this.opts.name, tables: cache.tables.size, functions: cache.functions.length, ms: Math.round(performance.now() - started) }, 'rest schema cache loaded');
    return cache;
  }

  /**
   * DDL ran on the database: `NOTIFY pgrst, 'reload schema'` on its (first
   * shard's) primary, which every listener hears, this one included: every
   * gateway's cache of it reloads. DDL in quick succession sends one NOTIFY.
   */
  announceSchemaChange(): void {
    if (this.announcing || this.closed) return;
    this.announcing = setTimeout(() => {
      this.announcing = undefined;
      void (async () => this.pool(await this.opts.endpoint(false)).query(`NOTIFY pgrst, 'reload schema'`))()
        .then(() => {
          announced.inc({ outcome: 'sent' });
          this.opts.log.info({ database: this.opts.name }, 'schema changed through the gateway: rest schema caches reload');
        })
        .catch((err) => {
          announced.inc({ outcome: 'failed' });
          this.opts.log.warn({ database: this.opts.name, err: (err as Error).message }, 'could not announce a schema change');
        });
    }, ANNOUNCE_DEBOUNCE_MS);
    this.announcing.unref();
  }

  /** Reloads once the new cache is in; requests keep using the old one meanwhile. */
  async reload(): Promise<void> {
    const next = this.load();
    await next;
    this.cache = next;
    this.generation++;
  }

  private async listen(): Promise<void> {
    if (this.closed || this.listener) return;
    try {
      const ep = await this.opts.endpoint(false);
      const client = new pg.Client({ host: ep.host, port: ep.port, user: this.opts.user, database: this.opts.name, application_name: 'mg-rest-listen' });
      this.listener = client;
      client.on('notification', (n) => {
        if (n.channel === 'pgrst' && (!n.payload || n.payload === 'reload schema')) {
          this.reload().catch((err) => this.opts.log.warn({ err: err.message }, 'rest schema cache reload failed'));
        }
      });
      client.on('error', () => this.relisten());
      client.on('end', () => this.relisten());
      await client.connect();
      await client.query('LISTEN pgrst');
    } catch (err) {
      this.opts.log.warn({ err: (err as Error).message }, 'rest schema listener failed; retrying');
      this.relisten();
    }
  }

  /** A lost listener (failover) may have missed a NOTIFY: listen again and reload. */
  private relisten(): void {
    const old = this.listener;
    this.listener = undefined;
    old?.end().catch(() => {});
    if (this.closed) return;
    setTimeout(() => {
      if (this.closed || this.listener) return;
      void this.listen().then(() => this.cache && this.reload()).catch(() => {});
    }, RELOAD_RETRY_MS).unref();
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.announcing);
    await this.listener?.end().catch(() => {});
    await Promise.all([...this.pools.values()].map((p) => p.end().catch(() => {})));
  }
}
