/**
 * A client slower than its results: a node-postgres connection whose socket
 * reads nothing until resumed. With it a test checks what a slow client does
 * to the proxy and to Postgres: the rows wait in Postgres (its backend blocked
 * writing, wait_event ClientWrite), not in the proxy's memory.
 */
import type net from 'node:net';
import pg from 'pg';
import { queryInstance } from './postgres.ts';
import { sleep } from './wait.ts';

export interface PausedQuery {
  /** Starts reading: the rows arrive, counted (not kept), and `done` settles. */
  resume(): void;
  done: Promise<{ rows: number; bytes: number }>;
}

/**
 * Sends `sql` on `client` with its socket paused; `column` is the text column whose bytes are counted.
 * `onRow` sees each row as it arrives (to check an order without keeping the rows).
 */
export function pausedQuery(client: pg.Client, sql: string, column: string, onRow?: (row: Record<string, string>) => void): PausedQuery {
  const socket = (client as unknown as { connection: { stream: net.Socket } }).connection.stream;
  socket.pause();
  let rows = 0;
  let bytes = 0;
  // A Query with a 'row' listener and no callback does not accumulate its rows.
  const query = new pg.Query(sql);
  query.on('row', (row: Record<string, string>) => {
    rows++;
    bytes += row[column].length;
    onRow?.(row);
  });
  const done = new Promise<{ rows: number; bytes: number }>((resolve, reject) => {
    query.on('end', () => resolve({ rows, bytes }));
    query.on('error', reject);
  });
  done.catch(() => undefined); // a test that fails before awaiting it ends the connection: not an unhandled rejection
  void client.query(query);
  return { resume: () => socket.resume(), done };
}

/**
 * Resolves once, on every instance of `ports`, the backend running a statement that
 * starts with `statement` has waited to write to its client (ClientWrite) at each look
 * for `forMs` on end; throws after `timeoutMs`.
 */
export async function heldWritingFor(ports: number[], statement: string, forMs: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let since: number | undefined;
  let seen = '';
  while (Date.now() < deadline) {
    const states = await Promise.all(ports.map(async (port) => (await queryInstance<{ state: string; wait_event: string | null }>(port,
      'SELECT state, wait_event FROM pg_stat_activity WHERE starts_with(query, $1) AND pid <> pg_backend_pid()', [statement]))[0]));
    seen = states.map((s, i) => `${ports[i]}: ${s ? `${s.state}/${s.wait_event}` : 'no backend'}`).join(', ');
    if (states.every((s) => s?.state === 'active' && s.wait_event === 'ClientWrite')) {
      since ??= Date.now();
      if (Date.now() - since >= forMs) return;
    } else {
      since = undefined;
    }
    await sleep(100);
  }
  throw new Error(`the backends running "${statement}" were not held writing for ${forMs} ms (last: ${seen})`);
}

/**
 * Resolves with `made()` (how many rows each backend has made of its result) once the backends running
 * `statement` have been held writing for a second on end with `made()` the same before and after it.
 * On a loaded machine the sockets between a held Postgres and the paused client take a while to fill (a
 * starved pooler drains Postgres' send buffer slowly while Postgres still waits in ClientWrite), so this
 * looks again until the count stands still; a gateway that reads the whole result never gets there.
 */
export async function heldStill(ports: number[], statement: string, made: () => Promise<number[]>, timeoutMs: number): Promise<number[]> {
  const deadline = Date.now() + timeoutMs;
  await heldWritingFor(ports, statement, 2_000, timeoutMs);
  let last = await made();
  for (;;) {
    await heldWritingFor(ports, statement, 1_000, Math.max(deadline - Date.now(), 1_000));
    const now = await made();
    if (now.every((n, i) => n === last[i])) return now;
    if (Date.now() > deadline) throw new Error(`the backends running "${statement}" kept making rows while waiting in ClientWrite (${last.join(', ')}, then ${now.join(', ')})`);
    last = now;
  }
}

/** A service's resident memory as its /metrics reports it (prom-client's default process metrics). */
export async function residentBytes(metricsPort: number): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
  return Number(/^mg_process_resident_memory_bytes (\d+)/m.exec(text)![1]);
}
