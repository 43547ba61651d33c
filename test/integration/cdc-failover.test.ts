/**
 * The change stream across failover without a re-snapshot (decision 0052):
 * the standby keeps a copy of the primary's slot, and the instance promoted
 * next resumes from it. A writer inserts rows through the gateway the whole
 * time; the primary's Postgres is killed with -9 (then, once the other instance is
 * a standby with its own copy, a switchover to it): the table's topic
 * holds every committed row exactly once, in commit order, and no snapshot.
 * (The fallback to a re-snapshot, for an instance without a copy, is the
 * failover test of cdc.test.ts.)
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { ChangeConsumer } from '../support/cdc-consumer.ts';
import { CdcWatch } from '../support/cdc-watch.ts';
import { testCluster, until } from '../support/cluster.ts';
import { bootstrap, registryUrl } from '../support/env.ts';
import { fullStrength, postgresPids, signalAll } from '../fault/support/faults.ts';

const cluster = testCluster('cdcfo', 4, { spec: {
  databases: [{ name: 'postgres', shards: 1, instancesPerShard: 2, cdc: { enabled: true, heartbeatMs: 500 } }],
} });
const { dataDir, prefix, flags, mg, spec } = cluster;
const TOPIC = `${prefix}mg.postgres.public.items`;
const SEED_ROWS = 5_000;

let watch: CdcWatch;
let consumer: ChangeConsumer;

async function sql(port: number, text: string): Promise<any[]> {
  const client = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', database: 'postgres' });
  await client.connect();
  try {
    return (await client.query(text)).rows;
  } finally {
    await client.end();
  }
}

/** Inserts one row at a time through the gateway until stopped; remembers which inserts were acknowledged. */
function startWriter(from: number) {
  const acked: number[] = [];
  let writing = true;
  const done = (async () => {
    let next = from;
    let client: pg.Client | undefined;
    while (writing) {
      try {
        if (!client) {
          client = new pg.Client({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres' });
          client.on('error', () => undefined);
          await client.connect();
        }
        const id = next++;
        await client.query('INSERT INTO items VALUES ($1, $2)', [id, `row ${id}`]);
        acked.push(id);
      } catch {
        await client?.end().catch(() => undefined);
        client = undefined;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    await client?.end().catch(() => undefined);
  })();
  return { acked, stop: async () => { writing = false; await done; } };
}

const standbyCopyReady = (instanceId: string) => until(`${instanceId}'s copy of the slot ready`, 90_000, async () => {
  const reply = await watch.command(instanceId, 'CDC_STATUS');
  return JSON.parse(reply.message).standbySlot?.ready === true;
});

const streamingOn = (instanceId: string, since: Date) => until(`${instanceId} streaming`, 120_000, () => {
  const s = watch.statuses.at(-1);
  return s && s.ts > since && s.instanceId === instanceId && s.state === 'STREAMING' ? s : undefined;
});

/**
 * The topic against the table on the primary: each row's create exactly once,
 * in commit order, in the stream's first epoch, and not one snapshot event
 * after the stream's first start.
 */
async function assertExactlyOnce(primaryPort: number, acked: number[], instances: string[]): Promise<void> {
  const rows = (await sql(primaryPort, 'SELECT id FROM items ORDER BY id')).map((r) => Number(r.id));
  const present = new Set(rows);
  assert.deepEqual(acked.filter((id) => !present.has(id)), [], 'every acknowledged insert is on the new primary');
  const events = () => consumer.messages.filter((m) => m.topic === TOPIC && m.value);
  await until('every row in the topic', 60_000, () => events().length >= rows.length);
  await new Promise((r) => setTimeout(r, 2_000)); // anything resent would arrive by now
  const all = events();
  assert.deepEqual(all.filter((m) => m.value.op !== 'c').map((m) => `${m.value.op} ${m.value.source.snapshot}`), [], 'no snapshot read, truncate or other op');
  assert.deepEqual([...new Set(all.map((m) => m.value.source.epoch))], [1n], 'one epoch: the stream never started over');
  const ids = all.map((m) => Number(m.value.after.id));
  assert.equal(ids.length, new Set(ids).size, 'no row sent twice');
  assert.deepEqual(ids, rows, 'every committed row once, in commit order');
  for (let i = 1; i < all.length; i++) {
    const [a, b] = [all[i - 1].value.source, all[i].value.source];
    assert.ok(a.commit_lsn < b.commit_lsn || (a.commit_lsn === b.commit_lsn && a.position < b.position), `commit order at offset ${all[i].offset}`);
  }
  assert.deepEqual([...new Set(all.map((m) => m.value.source.instance))], instances);
}

before(async () => {
  watch = await CdcWatch.open(prefix);
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  consumer = new ChangeConsumer(bootstrap(), registryUrl());
});

after(async () => {
  await consumer?.stop();
  await watch?.close();
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

test('kill -9 of the primary, then a switchover, under a writer: the stream resumes from the standby\'s copy of the slot each time; each row exactly once, in order, no snapshot', cluster.explained(async () => {
  const first = await fullStrength(cluster);
  const [a, b] = [first.primary!, first.instances.find((i) => i.instanceId !== first.primary)!.instanceId];
  const port = (id: string) => cluster.instances.find((i) => i.instanceId === id)!.port;
  await sql(port(a), `CREATE TABLE items (id bigint PRIMARY KEY, note text); INSERT INTO items SELECT g, 'seed ' || g FROM generate_series(1, ${SEED_ROWS}) g`);
  await consumer.follow([TOPIC]);
  await standbyCopyReady(b);

  const writer = startWriter(SEED_ROWS + 1);
  let primary = a;
  try {
    await until('the writer going', 30_000, () => writer.acked.length >= 50);
    const killedAt = new Date();
    signalAll(postgresPids(cluster, a), 'SIGKILL'); // a backend may exit between the listing and the kill
    // The orchestrator elects the most advanced instance: usually the standby; the old primary when its agent brought it back first.
    const resumed = await until('a new term\'s stream', 120_000, () => {
      const s = watch.statuses.at(-1);
      return s && s.ts > killedAt && s.term > 1n && s.state === 'STREAMING' ? s : undefined;
    });
    primary = resumed.instanceId;
    if (primary === b) {
      assert.match(resumed.resumedFrom ?? '', new RegExp(`^slot carried over from ${a} at `));
    }
    const acked = writer.acked.length;
    await until('writes on the new primary', 60_000, () => writer.acked.length >= acked + 50);
    console.log(`# kill -9: the stream was live on ${primary} ${(resumed.ts.getTime() - killedAt.getTime()) / 1000} s after the kill`);

    // The other instance (back as a standby, rewound or cloned) copies the slot; a switchover hands the stream to it.
    const next = primary === a ? b : a;
    await fullStrength(cluster, 120_000);
    await standbyCopyReady(next);
    const switchedAt = new Date();
    const switched = await mg('shard', 'switchover', 'postgres/-', '--to', next, '--data-dir', dataDir);
    assert.equal(switched.code, 0, switched.stderr + switched.stdout);
    const back = await streamingOn(next, switchedAt);
    assert.match(back.resumedFrom ?? '', new RegExp(`^slot carried over from ${primary} at `));
    primary = next;
    const ackedAtSwitch = writer.acked.length;
    await until('writes after the switchover', 60_000, () => writer.acked.length >= ackedAtSwitch + 50);
  } finally {
    await writer.stop();
  }
  // Both instances streamed (in this order), each takeover from the other's copy of the slot.
  await assertExactlyOnce(port(primary), writer.acked, [a, b]);
}));
