/**
 * The read path alone (issue 15 part 1, decision 0016): CPU per relayed message of a Node
 * process that reads framed messages and writes them back, with 'data' events against
 * `onread` into the reused buffer (router/protocol/output.ts), everything else the same
 * (MessageScanner, OutBatch, one write per read event). The peer is another process that
 * echoes bytes; `--conns` connections each keep one message in flight (ping-pong, as a
 * pgbench client does), so every read carries about one message.
 *
 *   node --import tsx bench/onread.ts [--conns 20] [--seconds 4] [--rounds 3] [--size 60]
 *
 * Prints, per variant and round, round trips per second and this process's CPU (user +
 * system, process.cpuUsage) per round trip. The peer's CPU is not counted.
 */
import { spawn } from 'node:child_process';
import net from 'node:net';
import { parseArgs } from 'node:util';
import { MessageScanner, type MessageSink } from '../router/protocol/frames.ts';
import { inEvent, OutBatch, ownReads, requestFlush, type Flushable } from '../router/protocol/output.ts';

const { values: args } = parseArgs({ options: {
  conns: { type: 'string', default: '20' }, seconds: { type: 'string', default: '4' },
  rounds: { type: 'string', default: '3' }, size: { type: 'string', default: '60' },
} });
const CONNS = Number(args.conns);
const SIZE = Math.max(6, Number(args.size));

const ECHO = `const net=require('net');const s=net.createServer({noDelay:true},(c)=>{c.on('error',()=>{});c.on('data',(d)=>c.write(d))});
s.listen(0,'127.0.0.1',()=>process.stdout.write(String(s.address().port)+'\\n'));`;

class Conn implements Flushable, MessageSink {
  flushQueued = false;
  readonly out = new OutBatch();
  readonly scanner = new MessageScanner(1 << 20);
  trips = 0;
  constructor(readonly socket: net.Socket) {}
  onMessage(buf: Buffer, start: number, len: number): void {
    this.trips++;
    this.out.range(buf, start, start + len); // send it back: the next round trip
    requestFlush(this);
  }
  flush(): void {
    this.out.writeTo(this.socket);
  }
}

async function run(port: number, variant: 'data' | 'onread', seconds: number): Promise<{ trips: number; cpuUs: number }> {
  const msg = Buffer.alloc(SIZE, 0x61);
  msg[0] = 0x51;
  msg.writeInt32BE(SIZE - 1, 1);
  const conns: Conn[] = [];
  await Promise.all(Array.from({ length: CONNS }, () => new Promise<void>((resolve) => {
    let c: Conn;
    const s = variant === 'onread'
      ? net.connect({ port, host: '127.0.0.1', noDelay: true, onread: ownReads((buf, end) => c.scanner.push(buf, c, end)) })
      : net.connect({ port, host: '127.0.0.1', noDelay: true });
    c = new Conn(s);
    if (variant === 'data') s.on('data', (chunk: Buffer) => inEvent((b: Buffer) => c.scanner.push(b, c), chunk));
    s.on('connect', () => resolve());
    conns.push(c);
  })));
  for (const c of conns) c.socket.write(msg);
  await new Promise((r) => setTimeout(r, 500)); // warm up
  const t0 = conns.reduce((n, c) => n + c.trips, 0);
  const u0 = process.cpuUsage();
  await new Promise((r) => setTimeout(r, seconds * 1000));
  const u = process.cpuUsage(u0);
  const trips = conns.reduce((n, c) => n + c.trips, 0) - t0;
  for (const c of conns) c.socket.destroy();
  return { trips, cpuUs: u.user + u.system };
}

const peer = spawn(process.execPath, ['-e', ECHO], { stdio: ['ignore', 'pipe', 'inherit'] });
const port = await new Promise<number>((resolve) => peer.stdout!.once('data', (d: Buffer) => resolve(Number(String(d).trim()))));
const seconds = Number(args.seconds);
console.log(`bench/onread.ts: ${CONNS} connections, ${SIZE}-byte messages in ping-pong, ${seconds} s per run, load ${(await import('node:os')).loadavg().map((x) => x.toFixed(1)).join(' ')}`);
console.log('| round | variant | round trips/s | CPU us per round trip |');
console.log('|---|---|---:|---:|');
for (let r = 1; r <= Number(args.rounds); r++) {
  for (const v of ['data', 'onread'] as const) {
    const { trips, cpuUs } = await run(port, v, seconds);
    console.log(`| ${r} | ${v} | ${Math.round(trips / seconds)} | ${(cpuUs / trips).toFixed(2)} |`);
  }
}
peer.kill();
