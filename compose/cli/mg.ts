/**
 * mg: the operator's command line.
 *   mg cluster up     [--spec file.yaml] [--data-dir dir] [--set path=value ...]
 *   mg cluster status [--data-dir dir]
 *   mg cluster down   [--data-dir dir] [--clean]
 *   mg cdc status     [--data-dir dir]
 *   mg shard status   [--data-dir dir]
 *   mg shard switchover <db>/<shard> [--to instance] [--data-dir dir]
 *   mg shard history  <db>/<shard> [--data-dir dir]
 *   mg backup create  <db>[/<shard>] [--type full|diff|incr] [--no-wait] [--data-dir dir]
 *   mg backup list|verify|check <db>[/<shard>] [--data-dir dir]
 *   mg backup expire  <db>[/<shard>] [--label L] [--data-dir dir]
 *   mg backup restore <db>/<shard> [--time T | --lsn L] [--stanza S] --to-dir dir --port P [--data-dir dir]
 *   mg backup restore <db> --as <new db> [--time T | --lsn L] [--data-dir dir]
 *   mg backup restore <db>[/<shard>] --in-place --time T | --lsn L [--data-dir dir]
 *   mg database list|create|drop|activate|deactivate|add-shard-set ... (see USAGE)
 *   mg replica add    <db>/<shard> [--cell zoneN] [--data-dir dir]
 *   mg replica remove <db>/<shard> <instanceId> [--data-dir dir]
 *   mg vschema apply  <db> vschema.yaml [--data-dir dir]
 *   mg vschema show   <db> [--data-dir dir]
 *   mg vschema backfill|externalize <db> <lookup vindex> [--data-dir dir]
 *   mg workflow create|list|show|start|stop|cancel|vdiff|switch-traffic|reverse-traffic|complete ... (see USAGE)
 *   mg migration submit|list|show|cutover|cancel|revert|complete ... (see USAGE)
 */
import path from 'node:path';
import { parseArgs } from 'node:util';
import { createLogger } from '../../common/log.ts';
import { clusterDown, clusterUp, eventLogFor, readClusterView, savedSpec } from '../cluster.ts';
import { loadSpec, SpecError, type ClusterSpec } from '../spec.ts';
import { readCdcStatus, renderCdcStatus } from '../cdc-status.ts';
import { renderStatus } from '../status.ts';
import { BackupUsageError, runBackupCommand } from './backup.ts';
import { addShardSet, createWithInstances, runDatabaseCommand } from './database.ts';
import { runReplicaCommand } from './replica.ts';
import { runShardCommand } from './shard.ts';
import { runMigrationCommand } from './migration.ts';
import { runVSchemaCommand, type VSchemaCommand } from './vschema.ts';
import { createReshard, runWorkflowCommand } from './workflow.ts';

const USAGE = `usage:
  mg cluster up     [--spec file.yaml] [--data-dir dir] [--set path=value ...]
  mg cluster status [--data-dir dir]
  mg cluster down   [--data-dir dir] [--clean]
  mg cdc status     [--data-dir dir]
  mg shard status   [--data-dir dir]
  mg shard switchover <db>/<shard> [--to instance] [--data-dir dir]
  mg shard history  <db>/<shard> [--data-dir dir]
  mg backup create  <db>[/<shard>] [--type full|diff|incr] [--no-wait] [--data-dir dir]
  mg backup list    <db>[/<shard>] [--data-dir dir]
  mg backup verify  <db>[/<shard>] [--data-dir dir]
  mg backup check   <db>[/<shard>] [--data-dir dir]
  mg backup expire  <db>[/<shard>] [--label L] [--data-dir dir]
  mg backup restore <db>/<shard> [--time T | --lsn L] [--stanza S] --to-dir dir --port P [--data-dir dir]
  mg backup restore <db> --as <new db> [--time T | --lsn L] [--data-dir dir]
  mg backup restore <db>[/<shard>] --in-place --time T | --lsn L [--data-dir dir]
  mg database list       [--data-dir dir]
  mg database create     <name> --on <db> [--data-dir dir]
  mg database create     <name> [--shards N] [--replicas M] [--durability ANY_2] [--data-dir dir]
  mg database drop       <name> --yes [--data-dir dir]
  mg database deactivate <name> [--hold] [--data-dir dir]
  mg database activate   <name> [--data-dir dir]
  mg database add-shard-set <name> --shards N [--data-dir dir]
  mg replica add    <db>/<shard> [--cell zoneN] [--data-dir dir]
  mg replica remove <db>/<shard> <instanceId> [--data-dir dir]
  mg vschema apply  <db> vschema.yaml [--data-dir dir]
  mg vschema show   <db> [--data-dir dir]
  mg vschema backfill    <db> <lookup vindex> [--data-dir dir]
  mg vschema externalize <db> <lookup vindex> [--data-dir dir]
  mg workflow create <name> --source <db> --target <db> --tables t1,t2 [--data-dir dir]
  mg workflow create <name> --type reshard --database <db> --to-shards N [--data-dir dir]
  mg workflow create <name> --type materialize --source <db> --target <db> --table <t> --query "SELECT ..." [--data-dir dir]
  mg workflow list   [--data-dir dir]
  mg workflow show|start|stop|cancel <name> [--data-dir dir]
  mg workflow vdiff  <name> [--no-wait] [--data-dir dir]
  mg workflow switch-traffic <name> [--reads-only] [--no-wait] [--data-dir dir]
  mg workflow reverse-traffic|complete <name> [--no-wait] [--data-dir dir]
  mg migration submit <db> "ALTER TABLE t ..." [--revert-seconds N] [--postpone-cutover] [--no-wait] [--data-dir dir]
  mg migration list [--data-dir dir]
  mg migration show|cutover|cancel|revert|complete <name> [--no-wait] [--data-dir dir]

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
      type: { type: 'string' },
      label: { type: 'string' },
      time: { type: 'string' },
      lsn: { type: 'string' },
      'to-dir': { type: 'string' },
      as: { type: 'string' },
      stanza: { type: 'string' },
      'in-place': { type: 'boolean' },
      port: { type: 'string' },
      'no-wait': { type: 'boolean' },
      'reads-only': { type: 'boolean' },
      on: { type: 'string' },
      shards: { type: 'string' },
      replicas: { type: 'string' },
      durability: { type: 'string' },
      yes: { type: 'boolean' },
      hold: { type: 'boolean' },
      source: { type: 'string' },
      target: { type: 'string' },
      tables: { type: 'string' },
      table: { type: 'string' },
      query: { type: 'string' },
      database: { type: 'string' },
      'to-shards': { type: 'string' },
      'revert-seconds': { type: 'string' },
      'postpone-cutover': { type: 'boolean' },
      cell: { type: 'string' },
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
  if (group === 'backup') {
    const spec = savedSpec(values['data-dir'] ?? '.mg');
    if (!spec) throw new UsageError(`no cluster in ${values['data-dir'] ?? '.mg'} (give --data-dir)`);
    if (!['create', 'list', 'verify', 'check', 'expire', 'restore'].includes(command ?? '')) throw new UsageError(`unknown command: backup ${command ?? '(none)'}`);
    const target = positionals[2];
    if (!/^[^/]+(\/[^/]+)?$/.test(target ?? '')) throw new UsageError(`backup ${command} needs <db> or <db>/<shard>, e.g. postgres/-`);
    const log = createLogger('mg', {}).child({ command });
    log.level = process.env.MG_LOG_LEVEL ?? 'warn';
    process.exitCode = await runBackupCommand(spec, command, target, {
      type: values.type, label: values.label, time: values.time, lsn: values.lsn, toDir: values['to-dir'], port: values.port, as: values.as, stanza: values.stanza, inPlace: values['in-place'], wait: !values['no-wait'],
    }, log);
    return;
  }
  if (group === 'database') {
    const spec = savedSpec(values['data-dir'] ?? '.mg');
    if (!spec) throw new UsageError(`no cluster in ${values['data-dir'] ?? '.mg'} (give --data-dir)`);
    const name = positionals[2];
    if (!['list', 'create', 'drop', 'activate', 'deactivate', 'add-shard-set'].includes(command ?? '')) throw new UsageError(`unknown command: database ${command ?? '(none)'}`);
    if (command !== 'list' && !name) throw new UsageError(`database ${command} needs a database name`);
    if (command === 'add-shard-set') {
      if (!/^[1-9]\d*$/.test(values.shards ?? '')) throw new UsageError('database add-shard-set needs --shards N (the new set\'s shard count, a power of two)');
      const log = createLogger('mg', {}).child({ command });
      log.level = process.env.MG_LOG_LEVEL ?? 'warn';
      process.exitCode = await addShardSet(spec, name!, Number(values.shards), log);
      return;
    }
    if (command === 'create' && !values.on) {
      if (!name || !/^[a-z][a-z0-9_]{0,62}$/.test(name)) throw new UsageError('database create needs a name: lower-case letters, digits or _, starting with a letter');
      // Instances of its own: local processes are the provisioning side's (compose), the rest as for `mg cluster up`.
      const log = createLogger('mg', {}).child({ command });
      log.level = process.env.MG_LOG_LEVEL ?? 'warn';
      process.exitCode = await createWithInstances(spec, name, {
        shards: values.shards === undefined ? 1 : Number(values.shards),
        replicas: values.replicas === undefined ? 2 : Number(values.replicas),
        durability: values.durability,
      }, log);
      return;
    }
    if (command === 'create' && (values.shards || values.replicas || values.durability)) {
      throw new UsageError('--shards, --replicas and --durability are for a database with instances of its own; one created --on shares those of its host');
    }
    if (command === 'drop' && !values.yes) throw new UsageError(`database drop deletes ${name} and its data: confirm with --yes`);
    if (values.hold && command !== 'deactivate') throw new UsageError('--hold is for database deactivate (clients are refused, not woken, until an activation)');
    process.exitCode = await runDatabaseCommand(spec, command!, { name, on: values.on, yes: values.yes ?? false, hold: values.hold ?? false });
    return;
  }
  if (group === 'workflow') {
    const spec = savedSpec(values['data-dir'] ?? '.mg');
    if (!spec) throw new UsageError(`no cluster in ${values['data-dir'] ?? '.mg'} (give --data-dir)`);
    if (!['create', 'list', 'show', 'start', 'stop', 'cancel', 'vdiff', 'switch-traffic', 'reverse-traffic', 'complete'].includes(command ?? '')) throw new UsageError(`unknown command: workflow ${command ?? '(none)'}`);
    const name = positionals[2];
    if (command !== 'list' && !name) throw new UsageError(`workflow ${command} needs a workflow name`);
    if (command === 'create' && values.type === 'reshard') {
      if (!values.database || !/^[1-9]\d*$/.test(values['to-shards'] ?? '')) throw new UsageError('workflow create --type reshard needs --database <db> --to-shards N');
      if (values.source || values.target || values.tables) throw new UsageError('a reshard moves every table of its database\'s VSchema within it: --source, --target and --tables are for a MoveTables');
      const log = createLogger('mg', {}).child({ command });
      log.level = process.env.MG_LOG_LEVEL ?? 'warn';
      process.exitCode = await createReshard(spec, name!, values.database, Number(values['to-shards']), log);
      return;
    }
    if (command === 'create' && values.type === 'materialize') {
      if (!values.source || !values.target || !values.table || !values.query) throw new UsageError('workflow create --type materialize needs --source <db> --target <db> --table <target table> --query "SELECT ..."');
      if (values.tables) throw new UsageError('a Materialize fills one table: --table, not --tables');
    } else if (command === 'create') {
      if (values.type !== undefined && values.type !== 'movetables') throw new UsageError(`workflow create --type is movetables, reshard or materialize, not ${values.type}`);
      if (values.table || values.query) throw new UsageError('--table and --query are for --type materialize');
      if (!values.source || !values.target || !values.tables) throw new UsageError('workflow create needs --source <db> --target <db> --tables t1[,t2...]');
    }
    process.exitCode = await runWorkflowCommand(spec, command!, {
      name, source: values.source, target: values.target, tables: values.tables, wait: !values['no-wait'], readsOnly: values['reads-only'] ?? false,
      ...(values.type === 'materialize' ? { materialize: { table: values.table!, query: values.query! } } : {}),
    });
    return;
  }
  if (group === 'migration') {
    const spec = savedSpec(values['data-dir'] ?? '.mg');
    if (!spec) throw new UsageError(`no cluster in ${values['data-dir'] ?? '.mg'} (give --data-dir)`);
    if (!['submit', 'list', 'show', 'cutover', 'cancel', 'revert', 'complete'].includes(command ?? '')) throw new UsageError(`unknown command: migration ${command ?? '(none)'}`);
    const [target, ddl] = positionals.slice(2);
    if (command === 'submit' && (!target || !ddl)) throw new UsageError('migration submit needs a database and an ALTER TABLE statement: mg migration submit <db> "ALTER TABLE t ..."');
    if (command !== 'list' && command !== 'submit' && !target) throw new UsageError(`migration ${command} needs the migration's name (mg migration list)`);
    const revert = values['revert-seconds'];
    if (revert !== undefined && (command !== 'submit' || !/^\d+$/.test(revert))) throw new UsageError('--revert-seconds N (whole seconds) is for migration submit');
    process.exitCode = await runMigrationCommand(spec, command!, {
      target, ddl, revertSeconds: revert === undefined ? undefined : Number(revert), postponeCutOver: values['postpone-cutover'] ?? false, wait: !values['no-wait'],
    });
    return;
  }
  if (group === 'replica') {
    const spec = savedSpec(values['data-dir'] ?? '.mg');
    if (!spec) throw new UsageError(`no cluster in ${values['data-dir'] ?? '.mg'} (give --data-dir)`);
    if (command !== 'add' && command !== 'remove') throw new UsageError(`unknown command: replica ${command ?? '(none)'}`);
    const [target, instance] = positionals.slice(2);
    if (!/^[^/]+\/[^/]+$/.test(target ?? '')) throw new UsageError(`replica ${command} needs <db>/<shard>, e.g. postgres/-`);
    if (command === 'remove' && !instance) throw new UsageError('replica remove needs the instance id: mg replica remove <db>/<shard> <instanceId>');
    if (command === 'remove' && values.cell) throw new UsageError('--cell is for replica add');
    process.exitCode = await runReplicaCommand(spec, command, target, { cell: values.cell, instance });
    return;
  }
  if (group === 'vschema') {
    const [database, arg] = positionals.slice(2);
    const needs: Record<string, string> = { apply: 'vschema.yaml', show: '', backfill: '<lookup vindex>', externalize: '<lookup vindex>' };
    if (!command || !(command in needs)) throw new UsageError(`unknown command: vschema ${command ?? '(none)'}`);
    if (!database || (needs[command] && !arg)) throw new UsageError(`vschema ${command} needs <db>${needs[command] ? ` ${needs[command]}` : ''}`);
    const dataDir = values['data-dir'] ?? '.mg';
    const spec = savedSpec(dataDir);
    if (!spec) throw new UsageError(`no cluster in ${dataDir} (give --data-dir)`);
    process.exitCode = await runVSchemaCommand(spec, command as VSchemaCommand, database, arg);
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

main(process.argv.slice(2)).then(
  () => process.exit(process.exitCode ?? 0),
  (err) => {
    if (err instanceof UsageError || err instanceof BackupUsageError || (err as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
      console.error(`mg: ${(err as Error).message}\n\n${USAGE}`);
      process.exit(2);
    }
    console.error(`mg: ${err instanceof SpecError ? '' : 'error: '}${(err as Error).message}`);
    process.exit(err instanceof SpecError ? 2 : 1);
  },
);
