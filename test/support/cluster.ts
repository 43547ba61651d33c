/**
 * A whole local cluster for one integration test file, brought up with the
 * real CLI on the run's shared broker and registry, with its own ports and
 * topic prefix, and taken down (with its data) at the end.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { orchestratorStatus } from '../../compose/orchestrators.ts';
import { instancesOf, parseSpec, type ClusterSpec, type PlannedInstance } from '../../compose/spec.ts';
import { bootstrap, registryUrl, uniquePrefix } from './env.ts';

const run = promisify(execFile);
export const mgBin = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'compose', 'bin', 'mg');

export interface TestClusterOptions {
  settings?: Record<string, string | number | boolean>;
  spec?: Record<string, unknown>;
}

export interface TestCluster {
  spec: ClusterSpec;
  dataDir: string;
  prefix: string;
  flags: string[];
  instances: PlannedInstance[];
  mg(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }>;
  /** `mg <args> --data-dir <this cluster's>`: its stdout, or an assertion failure with what it printed. */
  mgOk(...args: string[]): Promise<string>;
  /** `mg vschema apply` of this YAML to a database; throws with mg's stderr if it is refused. */
  applyVSchema(database: string, yaml: string): Promise<void>;
  /** The first shard's primary and replicas as MultiOrch has them now (it elects the primary; no instance is fixed). */
  roles(): Promise<{ primary: PlannedInstance; replicas: PlannedInstance[] }>;
  /**
   * `fn` as a test body whose failure carries the cluster's last warnings and errors: a failure
   * in CI is read from the runner's output alone, after the cluster and its logs are gone.
   */
  explained<C>(fn: (t: C) => Promise<void>): (t: C) => Promise<void>;
}

/** How many of the cluster's warnings and errors a failed test's error carries. */
const EXPLAINED_LINES = 25;

/** A cluster's component and Postgres logs copied to `keep` (in the run's directory), to read after `down --clean`. */
export function keepLogs(dataDir: string, keep: string): void {
  fs.mkdirSync(keep, { recursive: true });
  if (fs.existsSync(path.join(dataDir, 'logs'))) fs.cpSync(path.join(dataDir, 'logs'), keep, { recursive: true });
  const postgres = path.join(dataDir, 'postgres');
  for (const f of fs.existsSync(postgres) ? fs.readdirSync(postgres).filter((n) => n.endsWith('.log')) : []) {
    fs.copyFileSync(path.join(postgres, f), path.join(keep, `postgres-${f}`));
  }
}

/** The last warnings and errors (level 40+) in a cluster's component logs, oldest first, one short line each. */
function recentTrouble(dataDir: string): string[] {
  const dir = path.join(dataDir, 'logs');
  const found: { time: string; line: string }[] = [];
  for (const file of fs.existsSync(dir) ? fs.readdirSync(dir).filter((f) => f.endsWith('.log')) : []) {
    for (const text of fs.readFileSync(path.join(dir, file), 'utf8').split('\n')) {
      if (!text.startsWith('{')) continue;
      let entry: { level?: number; time?: string; msg?: string; err?: string | { message?: string } };
      try {
        entry = JSON.parse(text);
      } catch {
        continue;
      }
      if ((entry.level ?? 0) < 40 || !entry.time) continue;
      const why = typeof entry.err === 'string' ? entry.err : entry.err?.message;
      const line = `${entry.time.slice(11, 23)} ${file.replace(/\.log$/, '')}: ${entry.msg ?? ''}${why ? ` (${why})` : ''}`;
      found.push({ time: entry.time, line: line.slice(0, 300) });
    }
  }
  return found.sort((a, b) => a.time.localeCompare(b.time)).slice(-EXPLAINED_LINES).map((f) => f.line);
}

/**
 * Ports are spread by `slot` (0..4) so test files never collide (per slot:
 * Postgres +0, agents +100, poolers +200/+300, gateway +400/+401, orchestrators
 * +450, materializer +470; a test's own extra processes use +480..+499); all stay
 * below Linux's ephemeral range (32768+). MG_TEST_PORT_BASE moves the whole
 * range, so two test runs (e.g. two worktrees) can share a machine.
 * `settings` adds or overrides spec fields (`group.field` -> value), as `mg --set`
 * does; `spec` adds top-level fields --set cannot express (e.g. databases[].cdc),
 * passed to the CLI as a spec file.
 */
export function testCluster(label: string, slot: number, opts: TestClusterOptions = {}): TestCluster {
  const settings = opts.settings ?? {};
  const specFields = opts.spec ?? {};
  const dataDir = fs.mkdtempSync(path.join(process.env.MG_TEST_DIR ?? os.tmpdir(), `${label}-`));
  fs.chmodSync(dataDir, 0o755);
  const prefix = uniquePrefix(label);
  const base = Number(process.env.MG_TEST_PORT_BASE ?? 30_000) + slot * 500;
  const all: Record<string, string | number | boolean> = {
    'kafka.bootstrap': bootstrap(), 'registry.url': registryUrl(), 'kafka.topicPrefix': prefix,
    'postgres.basePort': base, 'agent.metricsBasePort': base + 100, 'pooler.basePort': base + 200,
    'pooler.metricsBasePort': base + 300, 'gateway.port': base + 400, 'gateway.metricsPort': base + 401,
    'orchestrator.basePort': base + 450, 'materializer.port': base + 470,
    ...settings,
  };
  const flags = ['--data-dir', dataDir, ...Object.entries(all).flatMap(([k, v]) => ['--set', `${k}=${v}`])];
  if (Object.keys(specFields).length) {
    const file = path.join(dataDir, 'test-spec.yaml');
    fs.writeFileSync(file, JSON.stringify(specFields));
    flags.push('--spec', file);
  }
  const raw: Record<string, any> = { ...specFields, dataDir };
  for (const [k, v] of Object.entries(all)) {
    const [group, field] = k.split('.');
    (raw[group] ??= {})[field] = v;
  }
  const spec = parseSpec(raw);
  return {
    spec, dataDir, prefix, flags, instances: instancesOf(spec),
    async mg(...args: string[]) {
      try {
        const { stdout, stderr } = await run(mgBin, args, { timeout: 300_000 });
        return { code: 0, stdout, stderr };
      } catch (err) {
        const e = err as { code: number; stdout: string; stderr: string };
        return { code: e.code, stdout: e.stdout, stderr: e.stderr };
      }
    },
    async mgOk(...args: string[]) {
      const r = await this.mg(...args, '--data-dir', dataDir);
      assert.equal(r.code, 0, `mg ${args.join(' ')} failed:\n${r.stdout}\n${r.stderr}`);
      return r.stdout;
    },
    async applyVSchema(database: string, yaml: string) {
      const file = path.join(dataDir, `${database}-vschema.yaml`);
      fs.writeFileSync(file, yaml);
      const applied = await this.mg('vschema', 'apply', database, file, '--data-dir', dataDir);
      if (applied.code !== 0) throw new Error(`mg vschema apply ${database}: ${applied.stderr}`);
    },
    async roles() {
      const [first] = (await orchestratorStatus(spec)).shards;
      const members = instancesOf(spec).filter((i) => i.database === first.database && i.shard === first.shard);
      const primary = members.find((i) => i.instanceId === first.primary);
      if (!primary) throw new Error(`${first.database}/${first.shard} has no primary yet`);
      return { primary, replicas: members.filter((i) => i !== primary) };
    },
    explained(fn) {
      return async (t) => {
        try {
          await fn(t);
        } catch (err) {
          try {
            if (process.env.MG_TEST_DIR) keepLogs(dataDir, path.join(process.env.MG_TEST_DIR, 'failed', path.basename(dataDir)));
            const trouble = recentTrouble(dataDir);
            if (err instanceof Error && trouble.length) err.message += `\nthe cluster's last warnings and errors:\n  ${trouble.join('\n  ')}`;
          } catch {
            // The test's own error is what it reports: reading the logs must not replace it.
          }
          throw err;
        }
      };
    },
  };
}

export { sleep, until } from './wait.ts';
