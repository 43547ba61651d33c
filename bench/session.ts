/**
 * The gateway's own cost per statement, sharded session against unsharded relay, in one process:
 *
 *   npm run bench:session -- [--statements 20000] [--clients 4] [--rounds 5]
 *
 * bench/sharding.ts measures the same point SELECT end to end, but on this 2-core machine Postgres,
 * the poolers, pgbench and other work share the cores with the gateway, and its figures move by tens of
 * percent between runs. Here the gateway's two session kinds (GatewaySession for an unsharded database,
 * ShardedSession for a sharded one with one shard) run in this process against a stand-in pooler
 * (a second process answering every statement with one canned row), driven by clients in that second
 * process too. This process's CPU time per statement (user + system: the session's JavaScript and its
 * socket syscalls) is what is reported: the best of --rounds batches, alternating the two kinds, because
 * load from elsewhere only ever adds time.
 *
 * Discovery is a stand-in (one shard, one primary, no routing rules): what the real one costs per
 * statement (a few map lookups) is left out of both kinds alike.
 */
import { fork } from 'node:child_process';
import net from 'node:net';
import { parseArgs } from 'node:util';
import { parseVSchema } from '../schemas/index.ts';
import { GatewaySession } from '../router/gateway/session.ts';
import { ShardedSession } from '../router/gateway/sharded.ts';
import { plannerReady } from '../router/planner/planner.ts';
import type { Discovery } from '../router/gateway/discovery.ts';
import type { TwoPhaseCoordinator } from '../router/twopc/coordinator.ts';
import { cstr, int16, int32, message, MessageScanner } from '../router/protocol/frames.ts';

const { values: args } = parseArgs({
  options: {
    statements: { type: 'string', default: '20000' },
    clients: { type: 'string', default: '4' },
    rounds: { type: 'string', default: '5' },
    driver: { type: 'string' }, // internal: this process is the stand-in pooler and the clients
  },
});
const STATEMENTS = Number(args.statements);
const CLIENTS = Number(args.clients);
const ROUNDS = Number(args.rounds);
const SQL = 'SELECT v FROM kv WHERE k = ';

// ---------------------------------------------------------------- the second process: pooler and clients
const ROW_DESCRIPTION = message('T', int16(1), cstr('v'), int32(0), int16(0), int32(25), int16(-1), int32(-1), int16(0));
const ROW = message('D', int16(1), int32(7), Buffer.from('value 1'));
const DONE = message('C', cstr('SELECT 1'));
const READY = message('Z', Buffer.from('I'));

/** Answers startup with trust, and every Query or extended batch with one row, as Postgres would for a point SELECT. */
function standInPooler(): net.Server {
  return net.createServer({ noDelay: true }, (socket) => {
    let started = false;
    let pending = Buffer.alloc(0);
    const scanner = new MessageScanner(1 << 30);
    const out: Buffer[] = [];
    socket.on('data', (chunk: Buffer) => {
      if (!started) {
        pending = Buffer.concat([pending, chunk]);
        if (pending.length < 4 || pending.length < pending.readInt32BE(0)) return;
        started = true;
        socket.write(Buffer.concat([message('R', int32(0)), message('S', cstr('server_version'), cstr('15.0')), message('K', int32(1), int32(2)), READY]));
        chunk = pending.subarray(pending.readInt32BE(0));
        if (!chunk.length) return;
      }
      scanner.push(chunk, {
        onMessage: (buf, start) => {
          switch (String.fromCharCode(buf[start])) {
            case 'Q': out.push(ROW_DESCRIPTION, ROW, DONE, READY); break;
            case 'P': out.push(message('1')); break;
            case 'B': out.push(message('2')); break;
            case 'D': out.push(ROW_DESCRIPTION); break;
            case 'E': out.push(ROW, DONE); break;
            case 'S': out.push(READY); break;
            default: break;
          }
        },
      });
      if (out.length) socket.write(Buffer.concat(out.splice(0)));
    });
  });
}

/** One client: `n` statements one after another (simple: Query; extended: Parse/Bind/Describe/Execute/Sync of the unnamed statement). */
function client(port: number, mode: 'simple' | 'extended', n: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ port, host: '127.0.0.1', noDelay: true });
    const scanner = new MessageScanner(1 << 30);
    let sent = 0;
    let greeted = false;
    const send = () => {
      const k = String(1 + Math.floor(Math.random() * 100_000));
      sent++;
      socket.write(mode === 'simple'
        ? message('Q', cstr(`${SQL}${k};`))
        : Buffer.concat([
          message('P', cstr(''), cstr(`${SQL}$1`), int16(0)),
          message('B', cstr(''), cstr(''), int16(0), int16(1), int32(k.length), Buffer.from(k), int16(0)),
          message('D', Buffer.from('P'), cstr('')), message('E', cstr(''), int32(0)), message('S'),
        ]));
    };
    socket.on('data', (chunk: Buffer) => scanner.push(chunk, {
      onMessage: (buf, start) => {
        if (buf[start] === 0x45) return reject(new Error(`error from the gateway: ${buf.toString('utf8', start + 5, start + 200)}`));
        if (buf[start] !== 0x5a) return;
        if (!greeted) greeted = true;
        else if (sent === n) {
          socket.end();
          return resolve();
        }
        send();
      },
    }));
    socket.on('error', reject);
  });
}

async function driver(): Promise<void> {
  const pooler = standInPooler();
  await new Promise<void>((r) => pooler.listen(0, '127.0.0.1', r));
  process.send!({ pooler: (pooler.address() as net.AddressInfo).port });
  process.on('message', async (m: { port: number; mode: 'simple' | 'extended'; n: number }) => {
    await Promise.all(Array.from({ length: CLIENTS }, () => client(m.port, m.mode, Math.ceil(m.n / CLIENTS))));
    process.send!({ done: true });
  });
}

// ---------------------------------------------------------------- this process: the gateway's sessions
async function main(): Promise<void> {
  await plannerReady;
  const child = fork(new URL(import.meta.url), ['--driver', '1', '--clients', String(CLIENTS)], { execArgv: ['--import', 'tsx'] });
  const poolerPort = await new Promise<number>((r) => child.once('message', (m: { pooler: number }) => r(m.pooler)));
  const endpoint = { instanceId: 'i1', cell: 'zone1', host: '127.0.0.1', port: poolerPort };
  const vschema = parseVSchema({ vindexes: { hash: { type: 'hash' } }, tables: { kv: { column_vindexes: [{ column: 'k', name: 'hash' }] } } });
  const topology = {
    databases: new Map([['plain', { sharded: false, transactionMode: null }], ['one', { sharded: true, transactionMode: null }]]),
    vschemas: new Map([['one', { version: 1n, vschema, appliedAt: new Date() }]]),
    routingRules: new Map(), applied: 0,
  };
  const discovery = {
    topology,
    hasDatabase: () => true,
    group: (db: string) => db,
    shards: () => [{ shard: '-' }],
    keyRanges: () => [{ shard: '-', start: '', end: '' }],
    primary: () => endpoint,
    replicaUsable: () => true,
  } as unknown as Discovery;

  // One listening port per database, so the stand-in clients need not name it.
  const databasePort = new Map<string, number>();
  for (const database of ['plain', 'one']) {
    const s = net.createServer({ noDelay: true }, (socket) => {
      const key = { pid: 1, secret: 2 };
      const session = database === 'one'
        ? new ShardedSession(socket, { user: 'postgres', database }, { discovery, bufferWindowMs: 1000, key, twopc: {} as TwoPhaseCoordinator, recordSchemaChange: () => undefined })
        : new GatewaySession(socket, { user: 'postgres', database }, { discovery, bufferWindowMs: 1000, key });
      void session.start(Buffer.alloc(0));
    });
    await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
    databasePort.set(database, (s.address() as net.AddressInfo).port);
  }

  const run = async (database: 'plain' | 'one', mode: 'simple' | 'extended'): Promise<number> => {
    const before = process.cpuUsage();
    await new Promise<void>((resolve) => {
      child.once('message', () => resolve());
      child.send({ port: databasePort.get(database), mode, n: STATEMENTS });
    });
    const used = process.cpuUsage(before);
    return (used.user + used.system) / STATEMENTS;
  };
  console.log(`In-process session cost, ${STATEMENTS} statements x ${ROUNDS} rounds, ${CLIENTS} clients (best round, us of gateway CPU per statement)`);
  console.log('');
  console.log('| protocol | unsharded relay | sharded, one shard | sharded / unsharded |');
  console.log('|---|---|---|---|');
  for (const mode of ['simple', 'extended'] as const) {
    const best = { plain: Infinity, one: Infinity };
    await run('plain', mode); // warm-up: JIT, hash memo
    await run('one', mode);
    for (let round = 0; round < ROUNDS; round++) {
      for (const database of ['plain', 'one'] as const) best[database] = Math.min(best[database], await run(database, mode));
    }
    console.log(`| ${mode} | ${best.plain.toFixed(1)} | ${best.one.toFixed(1)} | ${(best.one / best.plain).toFixed(2)}x |`);
  }
  child.kill();
  process.exit(0);
}

if (args.driver) void driver();
else main().catch((err) => {
  console.error(err);
  process.exit(1);
});
