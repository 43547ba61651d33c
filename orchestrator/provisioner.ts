/**
 * The orchestrator's side of the provisioning seam (decision 0034): starting
 * and stopping an instance's processes is not MultiOrch's to do, so it runs
 * the command its config names (compose's local provisioner, written by
 * `mg cluster up`) and reports each line the command prints as a step.
 */
import { spawn } from 'node:child_process';
import { counter } from '../common/metrics.ts';
import type { OrchConfig } from './config.ts';

const runs = counter('mg_orch_provisioner_runs_total', 'Provisioner commands run, by action and result', ['action', 'result']);

type Step = (message: string) => void;

/** What the provisioner started: the new instance's id and ports. */
export interface Provisioned { instanceId: string; port: number; poolerPort: number }

/** A timeout of its own: an agent that waits for Kafka, a Postgres that will not stop. */
const PROVISION_TIMEOUT_MS = 180_000;

export class Provisioner {
  constructor(private readonly cfg: OrchConfig['provisioner']) {}

  get available(): boolean {
    return this.cfg !== undefined;
  }

  async add(database: string, shard: string, cell: string, step: Step): Promise<Provisioned> {
    const out = await this.run('add', [database, shard, cell], step);
    // Its last line; log lines of the libraries it uses may come before.
    return JSON.parse(out.trim().split('\n').at(-1)!) as Provisioned;
  }

  async remove(instanceId: string, step: Step): Promise<void> {
    await this.run('remove', [instanceId], step);
  }

  /** Stops and deletes every instance of the database and forgets it (its backups stay). */
  async dropDatabase(database: string, step: Step): Promise<void> {
    await this.run('drop-database', [database], step);
  }

  /** Stops and deletes every instance of a reshard's old shard set and retires the set in the spec (decision 0061). */
  async dropShards(database: string, shards: string[], step: Step): Promise<void> {
    await this.run('drop-shards', [database, ...shards], step);
  }

  private run(action: string, args: string[], step: Step): Promise<string> {
    const [command, ...prefix] = this.cfg!.command;
    return new Promise((resolve, reject) => {
      // `--` ends the options: a shard name such as -80 is an operand, not a flag.
      const child = spawn(command, [...prefix, action, '--', ...args], { cwd: this.cfg!.cwd, stdio: ['ignore', 'pipe', 'pipe'], timeout: PROVISION_TIMEOUT_MS });
      let stdout = '';
      let lastLine = '';
      let partial = '';
      child.stdout.on('data', (d: Buffer) => (stdout += d));
      child.stderr.on('data', (d: Buffer) => {
        const lines = (partial + d.toString()).split('\n');
        partial = lines.pop()!;
        for (const line of lines.map((l) => l.trim()).filter(Boolean)) {
          lastLine = line;
          step(line);
        }
      });
      child.on('error', (err) => {
        runs.inc({ action, result: 'failed' });
        reject(new Error(`provisioner ${action}: ${err.message}`));
      });
      child.on('close', (code, signal) => {
        runs.inc({ action, result: code === 0 ? 'succeeded' : 'failed' });
        if (code === 0) resolve(stdout);
        else reject(new Error(`provisioner ${action} failed (${signal ?? `exit ${code}`}): ${(partial.trim() || lastLine) || 'no output'}`));
      });
    });
  }
}
