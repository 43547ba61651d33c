/**
 * mg: the operator's command line.
 *   mg cluster up     [--spec file.yaml] [--data-dir dir] [--set path=value ...]
 *   mg cluster status [--data-dir dir]
 *   mg cluster down   [--data-dir dir] [--clean]
 *   mg cdc status     [--data-dir dir]
 *   mg shard status   [--data-dir dir]
 *   mg shard switchover <db>/<shard> [--to instance] [--data-dir dir]
 *   mg shard history  <db>/<shard> [--data-dir dir]
 *   mg vschema apply  <db> vschema.yaml [--data-dir dir]
 *   mg vschema show   <db> [--data-dir dir]
 */
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { createLogger } from '../../common/log.ts';
import { clusterDown, clusterUp, eventLogFor, readClusterView, savedSpec } from '../cluster.ts';
import { loadSpec, SpecError, type ClusterSpec } from '../spec.ts';
import { readCdcStatus, renderCdcStatus } from '../cdc-status.ts';
import { renderStatus } from '../status.ts';
import { runShardCommand } from './shard.ts';
import { applyVSchema, showVSchema } from '../vschema.ts';
import YAML from 'yaml';
import { VSchemaError } from '../../schemas/index.ts';

const USAGE = `usage:
  mg cluster up     [--spec file.yaml] [--data-dir dir] [--set path=value ...]
  mg cluster status [--data-dir dir]
  mg cluster down   [--data-dir dir] [--clean]
  mg cdc status     [--data-dir dir]
  mg shard status   [--data-dir dir]
  mg shard switchover <db>/<shard> [--to instance] [--data-dir dir]
  mg shard history  <db>/<shard> [--data-dir dir]
  mg vschema apply  <db> vschema.yaml [--data-dir dir]
  mg vschema show   <db> [--data-dir dir]

--set overrides one field of the spec, e.g. --set kafka.port=29092 --set postgres.basePort=25432`;

class UsageError extends Error {}

async function main(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      spec: { type: 'string', short: 'f' },
      'data-dir': { type: 'string' },
      set: { type: 'string', multiple: true },
      clean: { type: 'boolean' },
      to: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return;
  }
  const [group, command] = positionals;
  if (group === 'shard') {
    const spec = savedSpec(values['data-dir'] ?? '.mg');
    if (!spec) throw new UsageError(`no cluster in ${values['data-dir'] ?? '.mg'} (give --data-dir)`);
    process.exitCode = await shardCommand(spec, command, positionals[2], values.to);
    return;
  }
  if (group === 'vschema') {
    process.exitCode = await vschemaCommand(values['data-dir'] ?? '.mg', command, positionals[2], positionals[3]);
    return;
  }
  const known = (group === 'cluster' && ['up', 'status', 'down'].includes(command)) || (group === 'cdc' && command === 'status');
  if (!known) throw new UsageError(`unknown command: ${positionals.join(' ') || '(none)'}`);

  // Logs of the CLI's own libraries go to a file-free sink unless asked for: the CLI prints progress instead.
  const log = createLogger('mg', {}).child({ command });
  log.level = process.env.MG_LOG_LEVEL ?? 'warn';

  const overrides: Record<string, unknown> = {};
  for (const kv of values.set ?? []) {
    const eq = kv.indexOf('=');
    if (eq < 1) throw new UsageError(`--set takes path=value, not '${kv}'`);
    const raw = kv.slice(eq + 1);
    overrides[kv.slice(0, eq)] = raw === 'true' || raw === 'false' ? raw === 'true' : raw !== '' && !Number.isNaN(Number(raw)) ? Number(raw) : raw;
  }
  if (values['data-dir']) overrides.dataDir = path.resolve(values['data-dir']);

  if (command === 'up') {
    await clusterUp(loadSpec(values.spec, overrides), log);
    return;
  }
  const spec: ClusterSpec = savedSpec(values['data-dir'] ?? '.mg') ?? loadSpec(values.spec, overrides);
  if (command === 'down') {
    await clusterDown(spec, { clean: values.clean ?? false });
    return;
  }
  const eventLog = eventLogFor(spec, 'mg-cli', log);
  try {
    console.log(group === 'cdc' ? renderCdcStatus(await readCdcStatus(eventLog)) : renderStatus(await readClusterView(eventLog)));
  } finally {
    await eventLog.close();
  }
}

async function shardCommand(spec: ClusterSpec, command: string | undefined, target: string | undefined, to: string | undefined): Promise<number> {
  if (!['status', 'switchover', 'history'].includes(command ?? '')) throw new UsageError(`unknown command: shard ${command ?? '(none)'}`);
  if (command !== 'status' && !/^[^/]+\/[^/]+$/.test(target ?? '')) throw new UsageError(`shard ${command} needs <db>/<shard>, e.g. postgres/-`);
  return runShardCommand(spec, command as 'status' | 'switchover' | 'history', target, to);
}

async function vschemaCommand(dataDir: string, command: string | undefined, database: string | undefined, file: string | undefined): Promise<number> {
  if (command !== 'apply' && command !== 'show') throw new UsageError(`unknown command: vschema ${command ?? '(none)'}`);
  if (!database || (command === 'apply' && !file)) throw new UsageError(`vschema ${command} needs <db>${command === 'apply' ? ' vschema.yaml' : ''}`);
  const spec = savedSpec(dataDir);
  if (!spec) throw new UsageError(`no cluster in ${dataDir} (give --data-dir)`);
  let raw: unknown;
  if (command === 'apply') {
    try {
      raw = YAML.parse(fs.readFileSync(file!, 'utf8'));
    } catch (err) {
      throw new SpecError(`cannot read VSchema ${file}: ${(err as Error).message}`);
    }
  }
  const log = createLogger('mg', {}).child({ command: `vschema ${command}` });
  log.level = process.env.MG_LOG_LEVEL ?? 'warn';
  const eventLog = eventLogFor(spec, 'mg-cli', log);
  try {
    if (command === 'apply') {
      const { version } = await applyVSchema(eventLog, database, raw).catch((err) => {
        throw err instanceof VSchemaError ? new SpecError(`invalid VSchema ${file}:\n${err.message}`) : err;
      });
      console.log(`vschema of ${database}: version ${version} published`);
      return 0;
    }
    const held = await showVSchema(eventLog, database);
    if (!held) {
      console.error(`mg: database ${database} has no VSchema`);
      return 1;
    }
    console.log(`# version ${held.version}\n${YAML.stringify(held.vschema)}`);
    return 0;
  } finally {
    await eventLog.close();
  }
}

main(process.argv.slice(2)).then(
  () => process.exit(process.exitCode ?? 0),
  (err) => {
    if (err instanceof UsageError || (err as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
      console.error(`mg: ${(err as Error).message}\n\n${USAGE}`);
      process.exit(2);
    }
    console.error(`mg: ${err instanceof SpecError ? '' : 'error: '}${(err as Error).message}`);
    process.exit(err instanceof SpecError ? 2 : 1);
  },
);
