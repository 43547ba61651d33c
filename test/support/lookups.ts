/**
 * What the lookup-vindex integration tests check on the shards themselves (not
 * through the gateway), for the users table of LOOKUP_VSCHEMA: users sharded by
 * hash(tenant_id), a unique e-mail lookup whose table is sharded by
 * xxhash(email) with the owner's keyspace id as `to`, and a non-unique nick
 * lookup on the first shard with `to` = tenant_id.
 */
import assert from 'node:assert/strict';
import pg from 'pg';
import { hashKeyspaceId, shardFor, xxhashKeyspaceId, type KeyRange } from '../../schemas/index.ts';

export interface UserRow { tenant_id: string; id: string; email: string | null; nick: string | null }

export function lookupChecks(ranges: KeyRange[], portOf: (shard: string) => number, database: string) {
  const [FIRST, SECOND] = ranges.map((r) => r.shard);
  const shardOfTenant = (t: number | string) => shardFor(hashKeyspaceId(Number(t)), ranges);
  const shardOfEmail = (e: string) => shardFor(xxhashKeyspaceId(e), ranges);
  const sorted = (xs: string[]) => [...xs].sort();

  /** The rows of a query on each shard's Postgres itself, by shard. */
  async function onEachShard(sql: string): Promise<Record<string, any[]>> {
    return Object.fromEntries(await Promise.all(ranges.map(async ({ shard }) => {
      const c = new pg.Client({ host: '127.0.0.1', port: portOf(shard), user: 'postgres', database });
      await c.connect();
      return [shard, (await c.query(sql).finally(() => c.end())).rows];
    })));
  }

  /**
   * The lookup tables hold exactly what the owner rows say: one email row per
   * user with an email, on the shard xxhash(email) names, pointing at the user's
   * keyspace id; one nick row per user with a nick, all on the first shard.
   */
  async function assertLookupsExact(): Promise<UserRow[]> {
    const users = Object.entries(await onEachShard('SELECT tenant_id::text, id::text, email, nick FROM users')).flatMap(([shard, rows]) => {
      for (const u of rows) assert.equal(shard, shardOfTenant(u.tenant_id), `user ${u.tenant_id}/${u.id} on its tenant's shard`);
      return rows as UserRow[];
    });
    const emails = await onEachShard("SELECT email, encode(keyspace_id, 'hex') AS ksid FROM users_email_idx");
    for (const { shard } of ranges) {
      const want = users.filter((u) => u.email !== null && shardOfEmail(u.email) === shard).map((u) => `${u.email} ${hashKeyspaceId(Number(u.tenant_id)).toString('hex')}`);
      assert.deepEqual(sorted(emails[shard].map((r) => `${r.email} ${r.ksid}`)), sorted(want), `users_email_idx on ${shard}`);
    }
    const nicks = await onEachShard('SELECT nick, tenant_id::text FROM users_nick_idx');
    assert.deepEqual(sorted(nicks[FIRST].map((r) => `${r.nick} ${r.tenant_id}`)), sorted(users.filter((u) => u.nick !== null).map((u) => `${u.nick} ${u.tenant_id}`)), 'users_nick_idx on the first shard');
    assert.deepEqual(nicks[SECOND], [], 'an unsharded lookup table lives on the first shard only');
    return users;
  }

  return { onEachShard, assertLookupsExact, shardOfTenant, shardOfEmail };
}
