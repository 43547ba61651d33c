/**
 * The VSchema the unit tests of lookup vindexes share: users sharded by
 * tenant_id, with a unique e-mail lookup (its table sharded by the e-mail) and
 * a non-unique nick lookup (its table on the first shard, `to` = tenant_id).
 */
export const LOOKUP_VSCHEMA = {
  vindexes: {
    hash: { type: 'hash' }, text_hash: { type: 'xxhash' },
    email: { type: 'consistent_lookup_unique', params: { table: 'users_email_idx', from: 'email', to: 'keyspace_id' }, owner: 'users' },
    nick: { type: 'lookup', params: { table: 'users_nick_idx', from: 'nick', to: 'tenant_id' }, owner: 'users' },
  },
  tables: {
    users: { column_vindexes: [{ column: 'tenant_id', name: 'hash' }, { column: 'email', name: 'email' }, { column: 'nick', name: 'nick' }] },
    orders: { column_vindexes: [{ column: 'tenant_id', name: 'hash' }] },
    users_email_idx: { column_vindexes: [{ column: 'email', name: 'text_hash' }] },
  },
};
