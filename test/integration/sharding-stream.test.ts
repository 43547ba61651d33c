/**
 * A slow client of a scatter read on a sharded database (decisions 0062 and
 * 0065): a client whose socket reads nothing must leave the rows in the
 * shards' Postgres (each backend blocked writing, wait_event ClientWrite), not
 * in the gateway's memory, whether the rows merge by ORDER BY or not; once it
 * reads, every row arrives, in order. A cursor reads such a result in batches
 * with the gateway's memory flat. Merged order checked against one Postgres.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import pg from 'pg';
import postgres from 'postgres';
import { nodeArgs } from '../../compose/launch.ts';
import { shardRanges } from '../../compose/spec.ts';
import { portAnswers } from '../../compose/supervise.ts';
import { hashKeyspaceId, shardFor } from '../../schemas/index.ts';
import { testCluster, until } from '../support/cluster.ts';
import { runPgx } from '../support/pgx.ts';
import { queryInstance } from '../support/postgres.ts';
import { heldStill, pausedQuery, residentBytes } from '../support/slow-client.ts';

const cluster = testCluster('sharding-stream', 1, { spec: {
  cells: ['zone1'],
  databases: [{ name: 'postgres', sharded: true, shards: 2, instancesPerShard: 1, durability: 'ANY_1' }],
} });
const { spec, flags, mg, dataDir } = cluster;
const ranges = shardRanges(2);
const shardPorts = ranges.map((r) => cluster.instances.find((i) => i.shard === r.shard)!.port);
/** The first id the hash vindex places on `shard`. */
const idOn = (shard: string) => Array.from({ length: 20 }, (_, i) => i + 1).find((id) => shardFor(hashKeyspaceId(id), ranges) === shard)!;
/** Rows of `pieces` (ids and g 1..PIECES, spread over the shards by the hash vindex), and the bytes each read makes of one. */
const PIECES = 3_000;
const PAD = 100_000;
const gwClient = () => new pg.Client({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres' });
let gw: pg.Client;
/**
 * HAVING and selected expressions of group columns over all shards (decision 0072) against the
 * `reference` database (the same `typed` rows in one Postgres): literal and $n thresholds, AND / OR /
 * NOT, NULL groups, ordered by the groups with LIMIT/OFFSET (streamed) or by an aggregate (gathered),
 * no ORDER BY compared as sets; what the gateway cannot compare is refused and the session goes on.
 */
async function havingComparedWithOnePostgres(): Promise<void> {
  const ref = new pg.Client({ host: '127.0.0.1', port: shardPorts[0], user: 'postgres', database: 'reference' });
  await ref.connect();
  const sql = postgres({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres', max: 1, onnotice: () => undefined });
  try {
    const agg = 'count(*) AS c, sum(n) AS s, sum(i) AS si, min(t) AS lo, max(b) AS hi';
    const streamed = [
      `SELECT i, ${agg} FROM typed GROUP BY i HAVING count(*) > 12 ORDER BY i`,
      `SELECT i, ${agg} FROM typed GROUP BY i HAVING count(*) >= 12 OR i IS NULL ORDER BY i DESC NULLS LAST LIMIT 5 OFFSET 2`,
      `SELECT t, i, ${agg} FROM typed GROUP BY t, i HAVING sum(n) > 0 AND NOT t IS NULL ORDER BY i, t DESC LIMIT 10`,
      `SELECT t, ${agg} FROM typed GROUP BY t HAVING max(b) > 0 AND min(t) <> 'a' OR min(t) IS NULL ORDER BY t`,
      `SELECT t, ${agg} FROM typed GROUP BY t HAVING t >= 'B' AND t != 'z' ORDER BY t DESC`,
      `SELECT n, ${agg} FROM typed GROUP BY n HAVING 2.5 >= sum(n) AND NOT (count(*) < 3) ORDER BY n NULLS FIRST OFFSET 1`,
      `SELECT i, count(*)::int AS c FROM typed GROUP BY i HAVING count(*)::int != 13 AND i IS NOT NULL ORDER BY i LIMIT 6`,
      'SELECT i, t, i * 2 AS d, lower(t) AS lt, coalesce(t, \'-\') || i AS label, 7 AS k, count(*) FROM typed GROUP BY i, t ORDER BY i, t LIMIT 40',
      'SELECT i, i * 2 AS d, count(*) AS c FROM typed GROUP BY i HAVING i * 2 > 4 ORDER BY i',
      // A date is not a type whose order the gateway follows: gathered, then merged, HAVING on the count.
      `SELECT DATE '2026-01-01' + i AS d, ${agg} FROM typed GROUP BY 1 HAVING count(*) > 12 ORDER BY 1`,
    ];
    const kept: number[] = [];
    for (const text of streamed) {
      const expected = (await ref.query(text)).rows;
      assert.deepEqual((await gw.query(text)).rows, expected, text);
      assert.match((await gw.query('SHOW mg_plan')).rows[0].mg_plan, /streamed group by group/, text);
      kept.push(expected.length);
    }
    console.log(`HAVING and group expressions, streamed: groups kept per read ${kept.join(', ')}, each the same as on one Postgres`);
    const gathered = [
      `SELECT t, ${agg} FROM typed GROUP BY t HAVING count(*) > 30 ORDER BY c DESC, t LIMIT 3`,
      'SELECT count(*) AS c, sum(n) AS s FROM typed HAVING count(*) > 10',
      'SELECT count(*) AS c, sum(n) AS s FROM typed HAVING count(*) > 1000',
    ];
    for (const text of gathered) assert.deepEqual((await gw.query(text)).rows, (await ref.query(text)).rows, text);
    // $n thresholds: node-postgres (text, types left to Postgres) and postgres.js.
    const bound = `SELECT i, ${agg} FROM typed GROUP BY i HAVING count(*) > $1 AND sum(n) < $2 OR i = $3 ORDER BY i LIMIT $4`;
    for (const params of [[12, '10', -11, 5], [0, '-3.5', 100, 20], [13, null, 2, 3]] as Array<Array<string | number | null>>) {
      const expected = (await ref.query(bound, params)).rows;
      assert.deepEqual((await gw.query(bound, params)).rows, expected, `${bound} ${params}`);
      assert.deepEqual((await sql.unsafe(bound, params)).map((r) => String(r.i)), expected.map((r) => String(r.i)), `postgres.js: ${bound} ${params}`);
    }
    // A cursor takes the groups HAVING keeps, a few per Execute.
    const cursored = `SELECT t, i, count(*) AS c FROM typed GROUP BY t, i HAVING count(*) > $1 ORDER BY t, i`;
    const taken: string[] = [];
    for await (const rows of sql.unsafe(cursored, [1]).cursor(4)) taken.push(...rows.map((r) => `${r.t}/${r.i}/${r.c}`));
    assert.deepEqual(taken, (await ref.query(cursored, [1])).rows.map((r) => `${r.t}/${r.i}/${r.c}`), cursored);
    assert.ok(taken.length > 4, `${taken.length} groups: more than one batch`);
    // No ORDER BY: any order is right, so the rows are compared as sets.
    const sorted = (rows: unknown[]) => rows.map((r) => JSON.stringify(r)).sort();
    for (const [text, params] of [
      [`SELECT i, ${agg} FROM typed GROUP BY i HAVING count(*) > 12 OR sum(n) IS NULL`, []],
      [`SELECT t, ${agg} FROM typed GROUP BY t HAVING count(*) < $1 LIMIT 100`, [34]],
      ['SELECT DISTINCT i, i - 1 AS j, count(*) AS c FROM typed GROUP BY i HAVING count(*) > 12 AND i - 1 < 5', []],
      // GROUP BY t is the column t, not the output named t: one row per word, several of the same length.
      ['SELECT length(t) AS t, count(*) AS c FROM typed GROUP BY t', []],
      ['SELECT length(t) AS t, count(*)::int AS c FROM typed GROUP BY t HAVING count(*) > $1', [30]],
    ] as Array<[string, unknown[]]>) {
      assert.deepEqual(sorted((await gw.query(text, params)).rows), sorted((await ref.query(text, params)).rows), text);
    }
    // Refused, naming what: before anything runs, or once the RowDescription shows a type the gateway does not compare.
    for (const [text, message] of [
      [`SELECT i, count(*) FROM typed GROUP BY i HAVING count(*) > (SELECT 1)`, /a subquery in HAVING/],
      [`SELECT i, min(n), max(n) FROM typed GROUP BY i HAVING min(n) < max(n)`, /HAVING comparison of min\(\.\.\.\) with max\(\.\.\.\)/],
      ['SELECT i, sum(n)::int AS s FROM typed GROUP BY i', /sum\(\.\.\.\)::int4 over all shards \(each shard would cast its part/],
      [`SELECT DATE '2026-01-01' + i AS d, count(*) FROM typed GROUP BY 1 HAVING DATE '2026-01-01' + i > '2026-01-05'`, /HAVING comparing d, of a type/],
    ] as Array<[string, RegExp]>) {
      await assert.rejects(gw.query(text), (e: any) => e.code === '0A000' && message.test(e.message), text);
      assert.equal((await gw.query('SELECT count(*)::int AS n FROM typed')).rows[0].n, 300, 'the session goes on');
    }
  } finally {
    await sql.end();
    await ref.end();
  }
}

/** How many rows each shard's Postgres has made of a result (calls of nextval('made') on it). */
const made = () => Promise.all(shardPorts.map(async (port) => Number((await queryInstance(port, 'SELECT last_value FROM made'))[0].last_value)));
const gatewayRss = () => residentBytes(spec.gateway.metricsPort);

before(async () => {
  const up = await mg('cluster', 'up', ...flags);
  assert.equal(up.code, 0, up.stderr + up.stdout);
  await cluster.applyVSchema('postgres', `vindexes:\n  hash: { type: hash }\ntables:\n${['blobs', 'pieces', 'typed'].map((t) => `  ${t}: { column_vindexes: [{ column: id, name: hash }] }\n`).join('')}`);
  gw = gwClient();
  await gw.connect();
  // Before the gateway has folded the VSchema, blobs is refused (0A000); after, the shards say it does not exist yet.
  await until('the gateway to know the VSchema', 15_000, () => gw.query('SELECT * FROM blobs').then(() => true, (e) => e.code === '42P01'));
  await gw.query('CREATE TABLE blobs (id bigint PRIMARY KEY)');
  await gw.query('CREATE SEQUENCE made'); // on every shard: how many rows its Postgres has made of a result
  // PIECES rows, ordered by g through an index: a shard reads them in order and makes each row as it sends it.
  await gw.query('CREATE TABLE pieces (id bigint PRIMARY KEY, g int NOT NULL)');
  await gw.query('CREATE INDEX pieces_g ON pieces (g)');
  for (let from = 1; from <= PIECES; from += 1000) {
    await gw.query(`INSERT INTO pieces (id, g) VALUES ${Array.from({ length: Math.min(1000, PIECES - from + 1) }, (_, k) => `(${from + k}, ${from + k})`).join(', ')}`);
  }
});

after(async () => {
  await gw?.end().catch(() => undefined);
  await mg('cluster', 'down', '--clean', ...flags);
  fs.rmSync(dataDir, { recursive: true, force: true });
});

test('a scatter read to a client that reads nothing: both shards\' backends wait writing and make no more rows, the gateway\'s memory stays flat, and every row arrives', cluster.explained(async () => {
  // One stored row on each shard, made into PER_SHARD rows of PAD bytes by its shard as it sends them: 150 MB
  // from each shard, twice what the sockets from one shard's Postgres through its pooler to the gateway could hold
  // at most (Linux's 4 MB send and 32 MB receive buffers each); held, a shard has made 10-18 MB of it.
  const PER_SHARD = 1_500;
  await gw.query(`INSERT INTO blobs (id) VALUES ${ranges.map((r) => `(${idOn(r.shard)})`).join(', ')}`);
  const statement = `SELECT b.id, g, nextval('made'), repeat('x', ${PAD}) AS pad FROM blobs b, generate_series(1, ${PER_SHARD}) g`;
  const slow = gwClient();
  await slow.connect();
  try {
    const before = await residentBytes(spec.gateway.metricsPort);
    const q = pausedQuery(slow, statement, 'pad');
    // Waiting in ClientWrite alone could be a gateway that reads slowly (a busy machine): held, the shards make no row more.
    const madeWhenHeld = await heldStill(shardPorts, statement, made, 90_000);
    assert.ok(madeWhenHeld.every((n) => n < PER_SHARD), `each shard held before its last row (made: ${madeWhenHeld.join(', ')} of ${PER_SHARD})`);
    const held = await residentBytes(spec.gateway.metricsPort);
    q.resume();
    const rows = ranges.length * PER_SHARD;
    assert.deepEqual(await q.done, { rows, bytes: rows * PAD });
    console.log(`a ${rows * PAD / 1e6} MB scatter read with the client paused: held at rows ${madeWhenHeld.join(' and ')} of ${PER_SHARD} per shard, gateway RSS ${(before / 1e6).toFixed(0)} MB before, ${(held / 1e6).toFixed(0)} MB while held`);
    assert.ok(held - before < 50e6, `the gateway grew by ${((held - before) / 1e6).toFixed(0)} MB while the client read nothing`);
  } finally {
    await slow.end();
  }
}));


test('an ORDER BY scatter read to a client that reads nothing: merged as the rows come, both shards held writing with no row more made, the gateway\'s memory flat, and every row arrives in order', cluster.explained(async () => {
  // 300 MB in all, 150 MB from each shard (see above); each shard's rows come from its index in g order.
  await pausedPiecesRead('ORDER BY', `SELECT p.id, p.g, nextval('made') AS made, repeat('x', ${PAD}) AS pad FROM pieces p ORDER BY p.g`,
    [], (row, last) => Number(row.g) !== last + 1);
}));

/**
 * A read of `pieces` in g order (a row of PAD bytes per piece) to a client that reads nothing: both shards are
 * held writing long before their last row, with no row more made and the gateway's memory flat; once the client
 * reads, every row arrives, none of them `wrong` (given the g of the row before).
 */
async function pausedPiecesRead(label: string, statement: string, settings: string[], wrong: (row: any, lastG: number) => boolean): Promise<void> {
  const slow = gwClient();
  await slow.connect();
  try {
    // On every shard link: the index gives the order, no sort first makes every row.
    for (const setting of ['SET enable_sort = off', ...settings]) await slow.query(setting);
    const before = await gatewayRss();
    const start = await made();
    let last = 0;
    let wrongRows = 0;
    const q = pausedQuery(slow, statement, 'pad', (row) => {
      if (wrong(row, last)) wrongRows++;
      last = Number(row.g);
    });
    const madeWhenHeld = (await heldStill(shardPorts, statement, made, 90_000)).map((n, i) => n - start[i]);
    assert.ok(madeWhenHeld.every((n) => n < PIECES / 2 - 100), `${label}: each shard held long before its last row (made: ${madeWhenHeld.join(', ')} of about ${PIECES / 2})`);
    const held = await gatewayRss();
    q.resume();
    assert.deepEqual(await q.done, { rows: PIECES, bytes: PIECES * PAD });
    assert.equal(wrongRows, 0, `${label}: every row once, in g order`);
    console.log(`a ${PIECES * PAD / 1e6} MB ${label} scatter read with the client paused: held at rows ${madeWhenHeld.join(' and ')} of each shard's ~${PIECES / 2}, gateway RSS ${(before / 1e6).toFixed(0)} MB before, ${(held / 1e6).toFixed(0)} MB while held`);
    assert.ok(held - before < 50e6, `${label}: the gateway grew by ${((held - before) / 1e6).toFixed(0)} MB while the client read nothing`);
  } finally {
    await slow.end();
  }
}

test('cursors (postgres.js) over 300 MB scatter reads, merged by ORDER BY and not: every row in batches, the gateway\'s memory flat; a cursor left early lets its shards go and the session goes on', cluster.explained(async () => {
  const sql = postgres({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres', max: 1, onnotice: () => undefined });
  try {
    await sql.unsafe('SET enable_sort = off');
    for (const [label, statement] of [['ORDER BY', 'SELECT id, g, nextval(\'made\'), repeat(\'x\', 100000) AS pad FROM pieces ORDER BY g'], ['no order', 'SELECT id, g, nextval(\'made\'), repeat(\'x\', 100000) AS pad FROM pieces']]) {
      const before = await gatewayRss();
      const start = await made();
      let madeAtThirdBatch: number[] = [];
      let peak = before;
      const ids = new Set<number>();
      let last = 0;
      let outOfOrder = 0;
      let batches = 0;
      await sql.unsafe(statement).cursor(100, async (rows) => {
        batches++;
        for (const row of rows) {
          ids.add(Number(row.id));
          assert.equal(row.pad.length, PAD);
          if (Number(row.g) !== last + 1) outOfOrder++;
          last = Number(row.g);
        }
        if (batches % 5 === 0) peak = Math.max(peak, await gatewayRss());
        // The shards go on only as far as the cursor takes rows (a gathering gateway has all of them made by now).
        if (batches === 3) madeAtThirdBatch = (await made()).map((n, i) => n - start[i]);
      });
      assert.ok(madeAtThirdBatch.every((n) => n < PIECES / 2 - 100), `${label}: with 300 of ${PIECES} rows taken, each shard had made only part of its ~${PIECES / 2} (${madeAtThirdBatch.join(', ')})`);
      assert.equal(ids.size, PIECES, `${label}: every row once`);
      assert.equal(batches, PIECES / 100, `${label}: batches of 100`);
      if (label === 'ORDER BY') assert.equal(outOfOrder, 0, 'rows in g order across batches');
      console.log(`a cursor (100 rows a batch) over a ${PIECES * PAD / 1e6} MB scatter read, ${label}: shards had made ${madeAtThirdBatch.join(' and ')} rows at the third batch; gateway RSS ${(before / 1e6).toFixed(0)} MB before, at most ${(peak / 1e6).toFixed(0)} MB during`);
      assert.ok(peak - before < 60e6, `${label}: the gateway grew by ${((peak - before) / 1e6).toFixed(0)} MB during the cursor`);
    }
    // Left after two batches: postgres.js closes the portal; the shards' rest is dropped, and their backends finish.
    const statement = 'SELECT id, g, repeat(\'y\', 100000) AS pad FROM pieces ORDER BY g';
    let taken = 0;
    for await (const rows of sql.unsafe(statement).cursor(100)) {
      taken += rows.length;
      if (taken >= 200) break;
    }
    assert.equal((await sql`SELECT count(*)::int AS n FROM pieces`)[0].n, PIECES, 'the session goes on');
    await until('the shards to finish the left cursor\'s statement', 30_000, async () => (await Promise.all(shardPorts.map((port) =>
      queryInstance(port, 'SELECT 1 FROM pg_stat_activity WHERE starts_with(query, $1) AND state = \'active\' AND pid <> pg_backend_pid()', [statement])))).every((r) => r.length === 0));
    // The same inside a transaction: the portal ends with it.
    await sql.begin(async (tx) => {
      let n = 0;
      for await (const rows of tx.unsafe(statement).cursor(50)) {
        n += rows.length;
        if (n >= 100) break;
      }
      assert.deepEqual(Array.from(await tx`SELECT g FROM pieces ORDER BY g LIMIT 2 OFFSET 10`, (r) => r.g), [11, 12]);
    });
  } finally {
    await sql.end();
  }
}));

test('a merged read past its LIMIT stops taking rows, an error on one shard ends the rows with its name, and the session goes on', cluster.explained(async () => {
  const top = await gw.query(`SELECT id, g, repeat('x', ${PAD}) AS pad FROM pieces ORDER BY g DESC LIMIT 4 OFFSET 3`);
  assert.deepEqual(top.rows.map((r) => Number(r.id)), [PIECES - 3, PIECES - 4, PIECES - 5, PIECES - 6]);
  await assert.rejects(gw.query('SELECT id, g, 10 / (g - 2000) AS x FROM pieces ORDER BY g'), (e: any) => e.code === '22012' && /^shard \S+: division by zero/.test(e.message));
  assert.deepEqual((await gw.query('SELECT g FROM pieces ORDER BY g LIMIT 3')).rows.map((r) => r.g), [1, 2, 3]);
}));

test('ORDER BY over all shards gives what one Postgres gives: int, bigint, numeric, text, timestamps as clocks go back, BC dates, intervals, DESC, NULLS FIRST/LAST, several keys, LIMIT/OFFSET, simple and extended protocol', cluster.explained(async () => {
  await gw.query('CREATE TABLE typed (id bigint PRIMARY KEY, i int, b bigint, n numeric, t text)');
  const words = ['a', 'B', 'ab', 'é', 'z', '', 'Zz', 'a b'];
  const values = Array.from({ length: 300 }, (_, k) => {
    const id = k + 1;
    const i = id % 13 === 0 ? 'NULL' : String((id * 7) % 23 - 11);
    const b = id % 17 === 0 ? 'NULL' : String((BigInt(id * 7919 % 301) - 150n) * 10_000_000_000_000n);
    const n = id % 11 === 0 ? 'NULL' : `${(((id * 37) % 101) - 50) / 8}`;
    const t = id % 9 === 0 ? 'NULL' : `'${words[id % words.length]}'`;
    return `(${id}, ${i}, ${b}, ${n}, ${t})`;
  }).join(', ');
  await gw.query(`INSERT INTO typed (id, i, b, n, t) VALUES ${values}`);
  // The reference: the same rows in one database on one of the cluster's Postgres instances.
  await queryInstance(shardPorts[0], 'CREATE DATABASE reference');
  const ref = new pg.Client({ host: '127.0.0.1', port: shardPorts[0], user: 'postgres', database: 'reference' });
  await ref.connect();
  const sql = postgres({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres', max: 1, onnotice: () => undefined });
  try {
    await ref.query('CREATE TABLE typed (id bigint PRIMARY KEY, i int, b bigint, n numeric, t text)');
    await ref.query(`INSERT INTO typed (id, i, b, n, t) VALUES ${values}`);
    const orders = [
      'i, id', 'i DESC, id', 'i NULLS FIRST, id DESC', 'b DESC, id', 'b DESC NULLS LAST, id', 'n, id', 'n DESC NULLS LAST, id',
      'n NULLS FIRST, i DESC, id', 't, id', 't DESC, id', 't NULLS FIRST, n, id', 't DESC NULLS LAST, b NULLS FIRST, id', '3, 1', '5 DESC, 2, 1',
    ];
    const windows = ['', ' LIMIT 17', ' LIMIT 17 OFFSET 5', ' OFFSET 290', ' LIMIT 0', ' LIMIT 0 OFFSET 3', ' LIMIT 400 OFFSET 1'];
    let compared = 0;
    for (const order of orders) {
      for (const window of windows) {
        const text = `SELECT id, i, b, n, t FROM typed ORDER BY ${order}${window}`;
        const expected = (await ref.query(text)).rows;
        assert.deepEqual((await gw.query(text)).rows, expected, `simple protocol: ${text}`);
        compared++;
      }
      // Extended protocol, LIMIT and OFFSET as parameters (node-postgres), and postgres.js.
      const text = `SELECT id, i, b, n, t FROM typed ORDER BY ${order} LIMIT $1 OFFSET $2`;
      const expected = (await ref.query(text, [25, 40])).rows;
      assert.deepEqual((await gw.query(text, [25, 40])).rows, expected, `extended protocol: ${text}`);
      assert.deepEqual((await sql.unsafe(text, [25, 40])).map((r) => String(r.id)), expected.map((r) => r.id), `postgres.js: ${text}`);
      compared += 2;
    }
    console.log(`${compared} ORDER BY reads over two shards, each the same as on one Postgres`);
    // Timestamps in a zone as its clocks go back (the same local hour twice, +02 then +01) and BC dates: as text they would sort wrong.
    for (const c of [gw, ref]) await c.query("SET TimeZone = 'Europe/Berlin'");
    for (const text of [
      "SELECT id, timestamptz '2026-10-25 00:00+00' + (id % 37) * interval '7 minutes' AS at FROM typed ORDER BY at DESC, id",
      "SELECT id, (date '2026-01-01' - id::int * 40)::timestamp AS at, date '0001-06-01' - id::int * 9 AS d FROM typed ORDER BY d, id LIMIT 50 OFFSET 10",
      "SELECT id, i * interval '1 day' - id * interval '37 minutes' + (id % 5) * interval '1 mon' AS span FROM typed ORDER BY span DESC NULLS LAST, id",
    ]) {
      assert.deepEqual((await gw.query(text)).rows, (await ref.query(text)).rows, text);
    }
    for (const c of [gw, ref]) await c.query('RESET TimeZone');
    // A type whose text does not sort as its values: refused, naming the column; the session goes on.
    await assert.rejects(gw.query("SELECT id, timetz '10:00+02' + i * interval '1 hour' AS tz FROM typed ORDER BY tz"), (e: any) => e.code === '0A000' && /ORDER BY tz, of a type the gateway does not order/.test(e.message));
    assert.equal((await gw.query('SELECT count(*)::int AS n FROM typed')).rows[0].n, 300);
  } finally {
    await sql.end();
    await ref.end();
  }
}));

test('GROUP BY and DISTINCT over all shards, merged group by group as the shards send them sorted, give what one Postgres gives; a grouped read to a paused client holds both shards', cluster.explained(async () => {
  // `typed` and the `reference` database on the first shard's instance, from the test above.
  const ref = new pg.Client({ host: '127.0.0.1', port: shardPorts[0], user: 'postgres', database: 'reference' });
  await ref.connect();
  try {
    const agg = 'count(*) AS c, count(t) AS ct, sum(n) AS s, sum(i) AS si, min(t) AS lo, max(b) AS hi';
    const ordered = [
      `SELECT i, ${agg} FROM typed GROUP BY i ORDER BY i`,
      `SELECT i, ${agg} FROM typed GROUP BY i ORDER BY i DESC NULLS LAST LIMIT 5 OFFSET 2`,
      `SELECT t, i, ${agg} FROM typed GROUP BY t, i ORDER BY i, t DESC LIMIT 30`,
      `SELECT n, ${agg} FROM typed GROUP BY n ORDER BY n NULLS FIRST OFFSET 3`,
      `SELECT t, ${agg} FROM typed GROUP BY 1 ORDER BY 1, 2 DESC`,
      'SELECT DISTINCT t FROM typed ORDER BY t',
      'SELECT DISTINCT i, t FROM typed ORDER BY t DESC, i LIMIT 12',
      // A date is not a type whose order the gateway follows: gathered, then merged.
      `SELECT DATE '2026-01-01' + i AS d, ${agg} FROM typed GROUP BY 1 ORDER BY 1`,
    ];
    for (const text of ordered) {
      assert.deepEqual((await gw.query(text)).rows, (await ref.query(text)).rows, text);
      assert.match((await gw.query('SHOW mg_plan')).rows[0].mg_plan, /streamed group by group/, text);
    }
    const limited = `SELECT i, ${agg} FROM typed GROUP BY i ORDER BY i LIMIT $1 OFFSET $2`;
    assert.deepEqual((await gw.query(limited, [4, 3])).rows, (await ref.query(limited, [4, 3])).rows, limited);
    // No ORDER BY: any order is right, so the rows are compared as sets.
    const sorted = (rows: unknown[]) => rows.map((r) => JSON.stringify(r)).sort();
    for (const text of [`SELECT i, ${agg} FROM typed GROUP BY i`, 'SELECT DISTINCT b FROM typed', `SELECT t, ${agg} FROM typed GROUP BY t LIMIT 100`]) {
      assert.deepEqual(sorted((await gw.query(text)).rows), sorted((await ref.query(text)).rows), text);
    }
    // Ordered by an aggregate: every group is needed first, so the rows are gathered (as before).
    const byCount = `SELECT t, ${agg} FROM typed GROUP BY t ORDER BY c DESC, t`;
    assert.deepEqual((await gw.query(byCount)).rows, (await ref.query(byCount)).rows, byCount);
    assert.doesNotMatch((await gw.query('SHOW mg_plan')).rows[0].mg_plan, /streamed/);
  } finally {
    await ref.end();
  }

  await havingComparedWithOnePostgres();

  // 3,000 groups of one big row each (300 MB), each shard sending its groups in g order from the index
  // (the gateway takes only group columns and aggregates, so the big value is an aggregate too).
  await pausedPiecesRead('GROUP BY', `SELECT p.g, count(*) AS c, max(nextval('made')) AS made, max(repeat('x', ${PAD})) AS pad FROM pieces p GROUP BY p.g ORDER BY p.g`,
    ['SET enable_hashagg = off'], (row, last) => Number(row.g) !== last + 1 || Number(row.c) !== 1); // groups from the index as they come
}));

test('what the merge needs and the client did not select goes hidden (ORDER BY a column or an expression, HAVING on an aggregate, GROUP BY a column): the same rows and columns as one Postgres, simple and extended protocol', cluster.explained(async () => {
  // `typed` and the `reference` database on the first shard's instance, from the tests above.
  const ref = new pg.Client({ host: '127.0.0.1', port: shardPorts[0], user: 'postgres', database: 'reference' });
  await ref.connect();
  const sql = postgres({ host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres', max: 1, onnotice: () => undefined });
  const values = (rows: any[]) => rows.map((r) => Object.values(r).map((v) => (v === null ? null : String(v))));
  const asSet = (rows: unknown[][]) => rows.map((r) => JSON.stringify(r)).sort();
  try {
    // The simple protocol (no parameters), node-postgres's extended one (a portal Described), and postgres.js
    // (the statement Described): the client sees the columns it selected, no more, and the rows one Postgres gives.
    const compare = async (text: string, params: unknown[] = [], ordered = true) => {
      const expected = await ref.query(text, params);
      const names = expected.fields.map((f) => f.name);
      const rows = ordered ? values(expected.rows) : asSet(values(expected.rows));
      const got = await gw.query(text, params);
      assert.deepEqual(got.fields.map((f) => f.name), names, `${params.length ? 'extended' : 'simple'} protocol, columns: ${text}`);
      assert.deepEqual(ordered ? values(got.rows) : asSet(values(got.rows)), rows, `${params.length ? 'extended' : 'simple'} protocol: ${text}`);
      const js = await sql.unsafe(text, params as any[]);
      assert.deepEqual(js.columns.map((c) => c.name), names, `postgres.js, columns: ${text}`);
      assert.deepEqual(ordered ? values(js) : asSet(values(js)), rows, `postgres.js: ${text}`);
      return expected.rows.length;
    };
    const counts: number[] = [];
    for (const [text, params, ordered] of [
      // 1. ORDER BY a column or an expression the select list lacks; id, not selected either, breaks ties.
      ['SELECT i, t FROM typed ORDER BY b DESC NULLS LAST, id LIMIT 15 OFFSET 4'],
      ['SELECT id, t FROM typed ORDER BY lower(t) NULLS FIRST, n, id LIMIT 25'],
      ['SELECT t FROM typed ORDER BY i * 2 DESC, id OFFSET 280'],
      ['SELECT t, n FROM typed ORDER BY (coalesce(n, $1) + $2) * -1, id LIMIT $3 OFFSET $4', ['0', '1.5', 20, 3]],
      ['SELECT i FROM typed ORDER BY t || $1 DESC, id LIMIT $2', ['x', 12]],
      // After `*`: the hidden key is the row's last column; an alias after `*` is sorted by itself.
      ['SELECT * FROM typed ORDER BY n * -1 NULLS LAST, lower(t) DESC, id LIMIT 10'],
      ['SELECT *, -i AS j FROM typed ORDER BY j, id LIMIT 10 OFFSET 2'],
      ['SELECT * FROM typed ORDER BY b, t, id LIMIT $1', [7]],
      // Under GROUP BY: ordered by an aggregate the select list lacks (gathered, then merged).
      ['SELECT t FROM typed GROUP BY t ORDER BY count(*) DESC, t LIMIT 5'],
      ['SELECT i, count(*) AS c FROM typed GROUP BY i ORDER BY sum(n) DESC NULLS LAST, i LIMIT $1', [8]],
      // 2. HAVING on an aggregate the select list lacks.
      ['SELECT i FROM typed GROUP BY i HAVING count(*) > 12 ORDER BY i'],
      ['SELECT t, count(*) AS c FROM typed GROUP BY t HAVING sum(n) > $1 AND max(b) IS NOT NULL ORDER BY t DESC LIMIT $2', ['0', 5]],
      ['SELECT i, max(t) AS hi FROM typed GROUP BY i HAVING min(n) < -2 OR count(*) <= 12 ORDER BY max(b), i'],
      // 3. GROUP BY a column the select list lacks: sorted by it on the shards, merged group by group.
      ['SELECT count(*) AS c, sum(n) AS s FROM typed GROUP BY i ORDER BY i LIMIT 5 OFFSET 2'],
      ['SELECT count(*) AS c, min(t) AS lo FROM typed GROUP BY t, i ORDER BY i DESC, t LIMIT 30'],
      ['SELECT max(b) AS hi FROM typed GROUP BY lower(t) ORDER BY lower(t) NULLS FIRST'],
      ['SELECT count(*) AS c FROM typed GROUP BY i HAVING count(*) > $1 ORDER BY i LIMIT $2', [11, 6]],
      ['SELECT count(*) AS c, sum(i) AS si FROM typed GROUP BY t', [], false],
      ['SELECT sum(n) AS s FROM typed GROUP BY i, t HAVING count(*) > $1', [1], false],
    ] as Array<[string, unknown[]?, boolean?]>) counts.push(await compare(text, params, ordered));
    console.log(`hidden items: ${counts.length} reads (rows ${counts.join(', ')}), each the same rows and columns as one Postgres in three clients`);
    for (const text of ['SELECT count(*) AS c FROM typed GROUP BY i ORDER BY i', 'SELECT i FROM typed GROUP BY i HAVING count(*) > 12 ORDER BY i']) {
      await gw.query(text);
      assert.match((await gw.query('SHOW mg_plan')).rows[0].mg_plan, /streamed group by group/, text);
    }
    // A cursor (postgres.js, an Execute with a row limit) takes the rows without their hidden column.
    const cursored = 'SELECT id FROM typed ORDER BY lower(t) DESC, id';
    const taken: unknown[][] = [];
    for await (const rows of sql.unsafe(cursored).cursor(7)) taken.push(...rows.map((r) => Object.keys(r)));
    assert.deepEqual(taken, Array.from({ length: 300 }, () => ['id']), cursored);
    // Postgres refuses DISTINCT ordered by what it does not select: so does the gateway, and the session goes on.
    await assert.rejects(gw.query('SELECT DISTINCT t FROM typed ORDER BY i'), (e: any) => e.code === '0A000' && /DISTINCT with ORDER BY/.test(e.message));
    assert.equal((await gw.query('SELECT count(*)::int AS n FROM typed')).rows[0].n, 300, 'the session goes on');
  } finally {
    await sql.end();
    await ref.end();
  }
}));

test('binary result columns (node-postgres in binary mode; pgx, one format code per column): ORDER BY, GROUP BY, HAVING and hidden items merged over all shards give what one Postgres gives', cluster.explained(async () => {
  // `typed` and the `reference` database on the first shard's instance, from the tests above.
  const binaryMode = { binary: true } as unknown as pg.ClientConfig; // node-postgres's binary mode, which its types leave out
  const ref = new pg.Client({ ...binaryMode, host: '127.0.0.1', port: shardPorts[0], user: 'postgres', database: 'reference' });
  const gwBinary = new pg.Client({ ...binaryMode, host: '127.0.0.1', port: spec.gateway.port, user: 'postgres', password: 'postgres', database: 'postgres' });
  await ref.connect();
  await gwBinary.connect();
  const reads: Array<[string, string[]]> = [
    ['SELECT id, i, b, n, t FROM typed ORDER BY n DESC NULLS LAST, i, id LIMIT $1', ['40']],
    ['SELECT id, i, b, n, t FROM typed ORDER BY t NULLS FIRST, b DESC, id LIMIT $1 OFFSET $2', ['30', '7']],
    ["SELECT id, timestamptz '2026-10-25 00:00+00' + (id % 37) * interval '7 minutes' AS at, date '0001-06-01' - id::int * 9 AS d, id * interval '37 minutes' + (id % 5) * interval '1 mon' AS span FROM typed ORDER BY at DESC, d, id LIMIT $1", ['60']],
    ['SELECT id FROM typed ORDER BY (id % 5) * $1::interval DESC, id LIMIT $2', ['1 mon', '25']],
    ['SELECT i, count(*) AS c, sum(n) AS s, sum(b) AS sb, sum(i) AS si, sum(n::float8) AS f, min(t) AS lo, max(n) AS hi FROM typed GROUP BY i ORDER BY i LIMIT $1', ['30']],
    ['SELECT t, count(*) AS c, sum(n) AS s FROM typed GROUP BY t ORDER BY count(*) DESC, t LIMIT $1', ['5']],
    ['SELECT i, count(*)::int AS c FROM typed GROUP BY i HAVING sum(n) > $1 AND count(*) > $2 ORDER BY i', ['0', '3']],
    ['SELECT i, t FROM typed ORDER BY b DESC NULLS LAST, id LIMIT $1 OFFSET $2', ['15', '4']],
    ['SELECT DISTINCT i FROM typed WHERE i > $1 ORDER BY i', ['-5']],
    ['SELECT count(*) AS c, sum(b) AS sb, max(b) AS hb FROM typed WHERE id > $1', ['0']],
  ];
  try {
    // node-postgres in binary mode: one result format code, binary, for every column (the hidden ones too);
    // the values compared as the bytes Postgres sent.
    const raw = { getTypeParser: () => (v: string | Buffer) => (Buffer.isBuffer(v) ? v.toString('hex') : v) } as any;
    for (const [text, params] of reads) {
      const expected = await ref.query({ text, values: params, types: raw, rowMode: 'array' });
      const got = await gwBinary.query({ text, values: params, types: raw, rowMode: 'array' });
      assert.deepEqual(got.fields.map((f) => [f.name, f.format]), expected.fields.map((f) => [f.name, f.format]), `node-postgres binary, columns: ${text}`);
      assert.ok(got.fields.every((f) => f.format === 'binary'), text);
      assert.ok(got.rows.length, text);
      assert.deepEqual(got.rows, expected.rows, `node-postgres binary: ${text}`);
    }
    // pgx prepares each statement, then binds one format code per column it was described with: the gateway
    // adds codes for the hidden columns, whose values the merge reads in either format.
    // Numbers as a Go program passes them, in binary: an int8 LIMIT, HAVING against a binary int8, numeric and float8.
    const typedArgs = [
      { sql: 'SELECT i, count(*) AS c FROM typed GROUP BY i HAVING sum(n) > $1 AND count(*) > $2 ORDER BY i LIMIT $3', args: [2.5, 3, 10] },
      { sql: 'SELECT i, sum(n::float8) AS f FROM typed GROUP BY i HAVING sum(n::float8) < $1 ORDER BY 2, 1', args: [-1.25] },
    ];
    const statements = [...reads.map(([sql, args]) => ({ sql, args })), ...typedArgs, { sql: "SELECT id, timetz '10:00+02' + i * interval '1 hour' AS tz FROM typed ORDER BY tz" }];
    const got = runPgx(`postgres://postgres:postgres@127.0.0.1:${spec.gateway.port}/postgres`, statements);
    const expected = runPgx(`postgres://postgres@127.0.0.1:${shardPorts[0]}/reference`, statements);
    for (const [k, { sql }] of statements.slice(0, -1).entries()) {
      assert.equal(got[k].error, undefined, `pgx: ${sql}`);
      assert.ok(got[k].rows?.length, `pgx: ${sql}`);
      assert.deepEqual(got[k], expected[k], `pgx: ${sql}`);
    }
    assert.equal(got.at(-1)!.code, '0A000', 'a type the gateway does not order is still refused');
  } finally {
    await gwBinary.end();
    await ref.end();
  }
}));

test('GROUP BY a name that is both a select-list alias and a column groups by the column, as Postgres does, and follows DDL that adds the column, through this gateway or another', cluster.explained(async () => {
  const ref = new pg.Client({ host: '127.0.0.1', port: shardPorts[0], user: 'postgres', database: 'reference' });
  await ref.connect();
  const other = gwClient();
  await other.connect();
  // A second gateway of the cluster, which learns of the first's DDL from the schema-change events on Kafka.
  const port = spec.postgres.basePort + 480;
  const config = JSON.parse(fs.readFileSync(path.join(dataDir, 'config', 'gateway.json'), 'utf8'));
  const configFile = path.join(dataDir, 'config', 'gateway-2.json');
  fs.writeFileSync(configFile, JSON.stringify({ ...config, port, metricsPort: port + 1, httpPort: undefined, workers: 1 }));
  const second = spawn(process.execPath, [...nodeArgs('router/gateway/main.ts'), '--config', configFile], { stdio: 'ignore' });
  await until('the second gateway listens', 30_000, () => portAnswers(port));
  const viaSecond = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', password: 'postgres', database: 'postgres' });
  await viaSecond.connect();
  const sorted = (rows: unknown[]) => rows.map((r) => JSON.stringify(r)).sort();
  const same = async (text: string, params: unknown[] = [], client = gw) => {
    const expected = (await ref.query(text, params)).rows;
    assert.deepEqual(sorted((await client.query(text, params)).rows), sorted(expected), text);
    return expected.length;
  };
  try {
    // typed has a column i: Postgres groups by it, whatever the alias i stands for (one row per i, not one row).
    assert.ok(await same('SELECT 1 AS i, count(*)::int AS c FROM typed GROUP BY i') > 10);
    assert.ok(await same('SELECT $1::int AS i, count(*)::int AS c FROM typed GROUP BY i', [5]) > 10, 'extended protocol');
    // No relation has a column lt: the alias is the group.
    assert.equal(await same('SELECT lower(t) AS lt, count(*)::int AS c FROM typed GROUP BY lt'), 9, 'eight words and NULL');
    const byK = 'SELECT 7 AS k, count(*)::int AS c FROM typed GROUP BY k';
    assert.equal(await same(byK), 1, 'before typed has a column k');
    assert.equal(await same(byK, [], viaSecond), 1, 'before typed has a column k, through the second gateway');
    for (const db of [gw, ref]) {
      await db.query('ALTER TABLE typed ADD COLUMN k int');
      await db.query('UPDATE typed SET k = id % 3');
    }
    assert.equal(await same(byK), 3, 'after DDL through the gateway, in the session that ran it');
    assert.equal(await same(byK, [], other), 3, 'and in another session of the same gateway');
    await until('the second gateway to group by the new column', 10_000, async () => (await viaSecond.query(byK)).rows.length === 3);
    assert.equal(await same(byK, [], viaSecond), 3, 'through the second gateway');
    for (const db of [gw, ref]) await db.query('ALTER TABLE typed DROP COLUMN k');
    assert.equal(await same(byK, [], other), 1, 'once the column is dropped again');
  } finally {
    await viaSecond.end().catch(() => undefined);
    second.kill('SIGTERM');
    await other.end();
    await ref.end();
  }
}));
