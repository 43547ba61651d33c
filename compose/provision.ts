/**
 * The local provisioner MultiOrch runs for `mg replica add|remove` (decision 0034), `mg database drop` (0035) and a reshard's complete (0061):
 *   node --import tsx compose/provision.ts --data-dir <dir> add <db> <shard> <cell>
 *   node --import tsx compose/provision.ts --data-dir <dir> remove <instanceId>
 *   node --import tsx compose/provision.ts --data-dir <dir> drop-database <db>
 *   node --import tsx compose/provision.ts --data-dir <dir> drop-shards <db> <shard>...   (a reshard's old set, decision 0061)
 * Progress goes to stderr, one line per step; `add` prints the new instance as JSON on stdout.
 */
import { parseArgs } from 'node:util';
import { createLogger } from '../common/log.ts';
import { Progress } from './progress.ts';
import { provisionReplica, releaseDatabase, releaseInstance, releaseShardSet } from './replicas.ts';

const { values, positionals } = parseArgs({ allowPositionals: true, options: { 'data-dir': { type: 'string' } } });
const [action, ...args] = positionals;
const dataDir = values['data-dir'];
const log = createLogger('mg-provision', {});
log.level = process.env.MG_LOG_LEVEL ?? 'warn';
const progress = new Progress(1, process.stderr);

try {
  if (!dataDir) throw new Error('--data-dir is required');
  if (action === 'add' && args.length === 3) {
    const inst = await provisionReplica(dataDir, args[0], args[1], args[2], progress, log);
    process.stdout.write(`${JSON.stringify({ instanceId: inst.instanceId, port: inst.port, poolerPort: inst.poolerPort })}\n`);
  } else if (action === 'remove' && args.length === 1) {
    await releaseInstance(dataDir, args[0], progress);
  } else if (action === 'drop-database' && args.length === 1) {
    await releaseDatabase(dataDir, args[0], progress);
  } else if (action === 'drop-shards' && args.length >= 2) {
    await releaseShardSet(dataDir, args[0], args.slice(1), progress);
  } else {
    throw new Error('usage: provision.ts --data-dir <dir> add <db> <shard> <cell> | remove <instanceId> | drop-database <db> | drop-shards <db> <shard>...');
  }
  process.exit(0);
} catch (err) {
  process.stderr.write(`${(err as Error).message}\n`);
  process.exit(1);
}
