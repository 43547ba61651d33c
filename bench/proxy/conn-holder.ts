/**
 * A child process of bench/proxy.ts that opens many client connections to a
 * Postgres-speaking server (the gateway, PgBouncer) and holds them idle.
 * Raw sockets: startup message, SCRAM-SHA-256 (or trust), wait for
 * ReadyForQuery. The salted password is computed once per salt, so the
 * client side costs a few HMACs per connection.
 *
 *   node --import tsx bench/proxy/conn-holder.ts '<json HolderConfig>'
 *
 * Prints one JSON line per second ({"open","failed","closed","firstError"})
 * and a final line once the target is reached or it stalls; holds until
 * SIGTERM, then destroys its sockets and exits.
 */
import { createHash, createHmac, pbkdf2Sync, randomBytes } from 'node:crypto';
import net from 'node:net';

export interface HolderConfig {
  host: string;
  port: number;
  user: string;
  password: string;
  database: string;
  count: number;
  /** Local addresses to connect from, round-robin (127.0.0.2.. to get past ~28k ports per source address). */
  localAddresses: string[];
  /** Handshakes in flight at once. */
  concurrency: number;
}

export interface HolderReport {
  open: number;
  failed: number;
  /** Connections that were established and later closed by the server. */
  closed: number;
  firstError: string | null;
  done: boolean;
  elapsedMs: number;
}

const cfg = JSON.parse(process.argv[2]) as HolderConfig;
const t0 = performance.now();
const sockets = new Set<net.Socket>();
let open = 0;
let failed = 0;
let closed = 0;
let started = 0;
let inFlight = 0;
let firstError: string | null = null;
let done = false;
const salted = new Map<string, Buffer>();

const report = () => {
  const r: HolderReport = { open, failed, closed, firstError, done, elapsedMs: Math.round(performance.now() - t0) };
  process.stdout.write(`${JSON.stringify(r)}\n`);
};
const ticker = setInterval(report, 1000);

function frame(type: string, body: Buffer): Buffer {
  const head = Buffer.alloc(5);
  head.write(type, 0, 'latin1');
  head.writeInt32BE(body.length + 4, 1);
  return Buffer.concat([head, body]);
}

function startup(): Buffer {
  const kv = Buffer.from(`user\0${cfg.user}\0database\0${cfg.database}\0application_name\0mg-bench-idle\0\0`);
  const b = Buffer.alloc(8);
  b.writeInt32BE(8 + kv.length, 0);
  b.writeInt32BE(196608, 4);
  return Buffer.concat([b, kv]);
}

const hmac = (key: Buffer, data: string) => createHmac('sha256', key).update(data).digest();

function connectOne(i: number): void {
  inFlight++;
  const localAddress = cfg.localAddresses[i % cfg.localAddresses.length];
  const s = net.connect({ host: cfg.host, port: cfg.port, localAddress, noDelay: true });
  let buf = Buffer.alloc(0);
  let established = false;
  let settled = false;
  const nonce = randomBytes(18).toString('base64');
  const clientFirstBare = `n=,r=${nonce}`;
  let expectedServerSig: Buffer | null = null;

  const settle = (ok: boolean, err?: string) => {
    if (settled) return;
    settled = true;
    inFlight--;
    if (ok) {
      established = true;
      open++;
    } else {
      failed++;
      firstError ??= err ?? 'unknown error';
      s.destroy();
    }
    pump();
  };
  s.on('connect', () => s.write(startup()));
  s.on('error', (e) => settle(false, `${e.message}`));
  s.on('close', () => {
    sockets.delete(s);
    if (established) {
      open--;
      closed++;
    } else settle(false, 'server closed the connection during startup');
  });
  sockets.add(s);
  s.on('data', (chunk) => {
    if (established) return; // idle clients ignore ParameterStatus/notices sent later
    buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
    while (buf.length >= 5) {
      const len = buf.readInt32BE(1);
      if (buf.length < 1 + len) break;
      const type = String.fromCharCode(buf[0]);
      const body = buf.subarray(5, 1 + len);
      buf = buf.subarray(1 + len);
      if (type === 'E') {
        const fields = new Map<string, string>();
        let o = 0;
        while (o < body.length && body[o] !== 0) {
          const end = body.indexOf(0, o + 1);
          fields.set(String.fromCharCode(body[o]), body.toString('utf8', o + 1, end));
          o = end + 1;
        }
        return settle(false, `${fields.get('C') ?? '?'} ${fields.get('M') ?? ''}`);
      }
      if (type === 'Z') return settle(true);
      if (type !== 'R') continue;
      const code = body.readInt32BE(0);
      if (code === 0) continue; // AuthenticationOk
      if (code === 3) {
        s.write(frame('p', Buffer.from(`${cfg.password}\0`)));
      } else if (code === 10) {
        const mech = Buffer.from('SCRAM-SHA-256\0');
        const first = Buffer.from(`n,,${clientFirstBare}`);
        const len = Buffer.alloc(4);
        len.writeInt32BE(first.length, 0);
        s.write(frame('p', Buffer.concat([mech, len, first])));
      } else if (code === 11) {
        const serverFirst = body.toString('utf8', 4);
        const attrs = new Map(serverFirst.split(',').map((kv) => [kv[0], kv.slice(2)] as [string, string]));
        const r = attrs.get('r')!;
        const salt = attrs.get('s')!;
        const iters = Number(attrs.get('i'));
        if (!r.startsWith(nonce)) return settle(false, 'SCRAM: server nonce does not extend ours');
        const saltKey = `${salt}:${iters}`;
        let saltedPassword = salted.get(saltKey);
        if (!saltedPassword) salted.set(saltKey, (saltedPassword = pbkdf2Sync(cfg.password, Buffer.from(salt, 'base64'), iters, 32, 'sha256')));
        const clientKey = hmac(saltedPassword, 'Client Key');
        const storedKey = createHash('sha256').update(clientKey).digest();
        const withoutProof = `c=biws,r=${r}`;
        const authMessage = `${clientFirstBare},${serverFirst},${withoutProof}`;
        const sig = hmac(storedKey, authMessage);
        const proof = Buffer.alloc(32);
        for (let k = 0; k < 32; k++) proof[k] = clientKey[k] ^ sig[k];
        expectedServerSig = hmac(hmac(saltedPassword, 'Server Key'), authMessage);
        s.write(frame('p', Buffer.from(`${withoutProof},p=${proof.toString('base64')}`)));
      } else if (code === 12) {
        const v = body.toString('utf8', 4);
        if (!expectedServerSig || v !== `v=${expectedServerSig.toString('base64')}`) return settle(false, 'SCRAM: bad server signature');
      } else {
        return settle(false, `unsupported authentication request ${code}`);
      }
    }
  });
}

let lastProgressAt = performance.now();
let lastProgress = 0;
function pump(): void {
  while (!done && inFlight < cfg.concurrency && started < cfg.count) connectOne(started++);
  if (!done && started >= cfg.count && inFlight === 0) finish();
}

function finish(): void {
  if (done) return;
  done = true;
  report();
}

// Stop trying once nothing has progressed for 15 s (e.g. the server stopped accepting).
const stall = setInterval(() => {
  const progress = open + failed;
  if (progress !== lastProgress) {
    lastProgress = progress;
    lastProgressAt = performance.now();
  } else if (!done && performance.now() - lastProgressAt > 15_000) {
    firstError ??= `stalled: ${inFlight} handshakes unanswered for 15 s`;
    finish();
  }
}, 1000);

process.on('SIGTERM', () => {
  clearInterval(ticker);
  clearInterval(stall);
  for (const s of sockets) s.destroy();
  process.exit(0);
});
pump();
