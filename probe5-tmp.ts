import pg from 'pg';
import { execFileSync } from 'node:child_process';
const port = Number(process.env.PORT);
const workers = execFileSync('ps', ['-o', 'pid=,comm=', '--ppid', process.env.PRIMARY!], { encoding: 'utf8' }).split('\n').map((l) => l.trim().split(/\s+/)).filter(([, c]) => c === 'node').map(([p]) => p);
const by = new Map<string, pg.Client[]>(workers.map((w) => [w, []]));
for (let i = 0; i < 16; i++) {
  const c = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', database: 'postgres' });
  c.on('error', () => undefined);
  await c.connect();
  const lp = (c as any).connection.stream.localPort;
  const out = execFileSync('ss', ['-Htnp', 'state', 'established', `( sport = :${port} and dport = :${lp} )`], { encoding: 'utf8' });
  const pids = [...out.matchAll(/pid=(\d+)/g)].map((m) => m[1]);
  const w = pids.find((p) => workers.includes(p));
  if (pids.length !== 1) console.log('ss pids', pids);
  by.get(w!)!.push(c);
}
console.log([...by].map(([w, l]) => `${w}:${l.length}`).join(' '));
const [a, b] = [...by.values()].map((l) => l.slice(0, 4));
await Promise.all(a.map((c) => c.query('BEGIN')));
await Promise.all(a.map((c) => c.query('SELECT 1')));
await Promise.all(a.map((c) => c.query('COMMIT')));
const t0 = Date.now();
try {
  await Promise.all(b.map((c) => c.query('BEGIN')));
  const pids = await Promise.all(b.map(async (c) => (await c.query('SELECT pg_backend_pid() p')).rows[0].p));
  console.log('B got', new Set(pids).size, 'in', Date.now() - t0, 'ms');
} catch (err) { console.log('B failed after', Date.now() - t0, 'ms:', (err as any).code, (err as Error).message); }
process.exit(0);
