/**
 * VSchema sequences: ids for the auto-increment columns of sharded tables.
 * The sequence rows live in one table on the database's first shard (a row per
 * sequence: next_id, cache); a gateway takes a block of `cache` ids at a time
 * with one atomic upsert that advances next_id, and hands them out to its
 * sessions from memory. Ids are unique across shards and gateways; like
 * Vitess's, they are not gap-free (a gateway that stops loses the rest of its block).
 */
import { counter } from '../../common/metrics.ts';

/** Schema and table of the sequence rows on the first shard (created on first use). */
export const SEQUENCE_TABLE = 'mg_sharding.sequences';

const blocksTaken = counter('mg_gateway_sequence_blocks_total', 'Blocks of ids taken from a sequence table', ['database', 'sequence']);

/** Runs one statement on the first shard, outside any client transaction; returns the first column of the first row. */
export type SequenceQuery = (sql: string) => Promise<string | undefined>;

interface Block { next: bigint; end: bigint }

/** The statement that takes the next block (and creates the sequence row at 1 on its first use). */
export function takeBlockSql(sequence: string, cache: number): string {
  return `INSERT INTO ${SEQUENCE_TABLE} AS s (name, next_id, cache) VALUES ('${sequence}', ${1 + cache}, ${cache}) `
    + 'ON CONFLICT (name) DO UPDATE SET next_id = s.next_id + EXCLUDED.cache, cache = EXCLUDED.cache RETURNING s.next_id - s.cache';
}

export const CREATE_SEQUENCE_TABLE = 'CREATE SCHEMA IF NOT EXISTS mg_sharding; '
  + `CREATE TABLE IF NOT EXISTS ${SEQUENCE_TABLE} (name text PRIMARY KEY, next_id bigint NOT NULL, cache bigint NOT NULL)`;

export class SequenceBlocks {
  private readonly blocks = new Map<string, Block>();
  /** One block fetch at a time per sequence; sessions that run dry meanwhile wait for it. */
  private readonly fetching = new Map<string, Promise<void>>();

  /** `n` ids of `database`'s `sequence`, in increasing order. */
  async take(database: string, sequence: string, cache: number, n: number, query: SequenceQuery): Promise<string[]> {
    const key = `${database}/${sequence}`;
    const ids: string[] = [];
    while (ids.length < n) {
      const b = this.blocks.get(key);
      if (b && b.next < b.end) {
        ids.push(String(b.next++));
        continue;
      }
      let fetch = this.fetching.get(key);
      if (!fetch) {
        fetch = this.fetchBlock(key, sequence, cache, query).finally(() => this.fetching.delete(key));
        this.fetching.set(key, fetch);
      }
      await fetch;
    }
    return ids;
  }

  private async fetchBlock(key: string, sequence: string, cache: number, query: SequenceQuery): Promise<void> {
    const sql = takeBlockSql(sequence, cache);
    let start: string | undefined;
    try {
      start = await query(sql);
    } catch (err) {
      if ((err as { code?: string }).code !== '42P01' && (err as { code?: string }).code !== '3F000') throw err;
      // First use in this database: create the table (two gateways may race; IF NOT EXISTS can still collide, so tolerate that once).
      await query(CREATE_SEQUENCE_TABLE).catch((e) => {
        if (!['23505', '42P07', '42P06'].includes(e.code)) throw e;
      });
      start = await query(sql);
    }
    const first = BigInt(start!);
    this.blocks.set(key, { next: first, end: first + BigInt(cache) });
    blocksTaken.inc({ database: key.split('/')[0], sequence });
  }
}

/** The gateway's blocks (one per gateway process). */
export const sequenceBlocks = new SequenceBlocks();
