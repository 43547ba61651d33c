/**
 * How the materializer's copy writes a page on a target shard (decision 0066), on one
 * Postgres started here with the project's settings (shared_buffers 32MB, wal_level logical):
 *
 *   npm run bench:copy-write -- [--rows 200000] [--pages 2500,5000,20000] [--base-port 25000]
 *
 * The same rows (the shape of bench/materializer.ts's `items`) written page by page, each
 * page one autocommit statement as the copy runs them, in four ways:
 *  - copy: COPY FROM STDIN into the table (what the copy phase does);
 *  - staged: COPY into a temporary table, then INSERT ... SELECT ... ON CONFLICT DO UPDATE
 *    (the other exact way: an upsert whatever the target holds);
 *  - upsert: INSERT ... SELECT FROM unnest(text[]...) ON CONFLICT DO UPDATE (the copy before 0066);
 *  - copy over existing rows: the table already full, every page's COPY fails with 23505
 *    and is upserted (the worst case of the fallback: what a page written again costs).
 * rows/s of each, and the load average. Port: base. Everything is removed at the end.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { finished } from 'node:stream/promises';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { from as copyFrom } from 'pg-copy-streams';
import { createLogger } from '../common/log.ts';
import { PostgresInstance } from '../ingest/postgres/instance.ts';
import { upsertSql, type MovedTable } from '../materializer/tables.ts';

const { values: args } = parseArgs({
  options: {
    rows: { type: 'string', default: '200000' },
    pages: { type: 'string', default: '2500,5000,20000' },
    'base-port': { type: 'string', default: '25000' },
  },
});
const ROWS = Number(args.rows);
const PAGES = args.pages.split(',').map(Number);
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-bench-copy-write-'));
fs.chmodSync(work, 0o755);

const items: MovedTable = {
  schema: 'public', table: 'items', sql: '"public"."items"', key: ['id'], vindex: { column: 'id', type: 'hash' },
  columns: [
    { name: 'id', type: 'bigint', notNull: true }, { name: 'owner', type: 'bigint', notNull: true },
    { name: 'note', type: 'text', notNull: true }, { name: 'amount', type: 'numeric(12,2)', notNull: true },
  ],
};
const TABLE = 'DROP TABLE IF EXISTS items; CREATE TABLE items (id bigint PRIMARY KEY, owner bigint NOT NULL, note text NOT NULL, amount numeric(12,2) NOT NULL)';
const UPSERT_FROM_STAGE = 'INSERT INTO items SELECT * FROM stage ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, note = EXCLUDED.note, amount = EXCLUDED.amount';

async function copyIn(c: pg.Client, table: string, lines: string[]): Promise<void> {
  const stream = c.query(copyFrom(`COPY ${table} (id, owner, note, amount) FROM STDIN`));
  stream.end(`${lines.join('\n')}\n`);
  await finished(stream);
}

const rowsOf = (lines: string[]) => lines.map((l) => {
  const [id, owner, note, amount] = l.split('\t');
  return { id, owner, note, amount };
});

const ways: Record<string, (c: pg.Client, lines: string[]) => Promise<void>> = {
  copy: (c, lines) => copyIn(c, 'items', lines),
  staged: async (c, lines) => {
    await c.query('TRUNCATE stage');
    await copyIn(c, 'stage', lines);
    await c.query(UPSERT_FROM_STAGE);
  },
  upsert: async (c, lines) => void await c.query(upsertSql(items, rowsOf(lines))),
  'copy over existing rows': async (c, lines) => {
    try {
      await copyIn(c, 'items', lines);
      throw new Error('the COPY over existing rows did not fail');
    } catch (err) {
      if ((err as { code?: string }).code !== '23505') throw err;
      await c.query(upsertSql(items, rowsOf(lines)));
    }
  },
};

async function main(): Promise<void> {
  const log = createLogger('bench-copy-write');
  const inst = new PostgresInstance({ name: 'copywrite', dataDir: path.join(work, 'pg', 'data'), port: Number(args['base-port']), log });
  fs.mkdirSync(path.join(work, 'pg'), { mode: 0o755 });
  await inst.initPrimary();
  await inst.start();
  const c = new pg.Client({ host: '127.0.0.1', port: inst.port, user: 'postgres', database: 'postgres' });
  try {
    await c.connect();
    await c.query('CREATE TEMP TABLE stage (id bigint NOT NULL, owner bigint NOT NULL, note text NOT NULL, amount numeric(12,2) NOT NULL)');
    const lines = Array.from({ length: ROWS }, (_, i) => {
      const g = i + 1;
      return `${g}\t${g % 1000}\t${'0123456789abcdef'.repeat(4)}\t${(g % 100000) / 100}`;
    });
    console.log(`${ROWS} rows, ${os.cpus().length} cores, load ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}, ${new Date().toISOString()}`);
    console.log(`| rows per page | ${Object.keys(ways).join(' | ')} |`);
    console.log(`|---|${Object.keys(ways).map(() => '---').join('|')}|`);
    for (const page of PAGES) {
      const rates: number[] = [];
      for (const [name, write] of Object.entries(ways)) {
        if (name !== 'copy over existing rows') await c.query(TABLE);
        const t0 = performance.now();
        for (let i = 0; i < ROWS; i += page) await write(c, lines.slice(i, i + page));
        rates.push(Math.round(ROWS / ((performance.now() - t0) / 1000)));
      }
      console.log(`| ${page} | ${rates.map((r) => `${r.toLocaleString('en-US')} rows/s`).join(' | ')} |`);
    }
    console.log(`load ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`);
  } finally {
    await c.end().catch(() => undefined);
    await inst.stop('fast').catch(() => undefined);
    fs.rmSync(work, { recursive: true, force: true });
  }
}

await main();
