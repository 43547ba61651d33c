/**
 * Summarizes a V8 .cpuprofile (from `node --cpu-prof`): where the sampled
 * time went, by function (self time) and by source file.
 */
import fs from 'node:fs';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
  children?: number[];
}

export interface ProfileSummary {
  totalMs: number;
  idleMs: number;
  gcMs: number;
  byFunction: Array<{ name: string; ms: number; pct: number }>;
  byFile: Array<{ file: string; ms: number; pct: number }>;
}

const shortUrl = (url: string) => {
  if (!url) return '(native)';
  const m = /\/(node_modules\/(?:@[^/]+\/)?[^/]+)\//.exec(url);
  if (m) return m[1];
  const i = url.indexOf('/work/main/');
  if (i >= 0) return url.slice(i + '/work/main/'.length);
  return url.replace(/^file:\/\//, '').replace(/^node:/, 'node:');
};

/**
 * `window` keeps only the samples taken between `fromEndMs` and `toEndMs`
 * before the profile's end (the process exit), e.g. just the measured run
 * and not the process start-up.
 */
export function summarizeProfile(file: string, top = 15, window?: { fromEndMs: number; toEndMs: number }): ProfileSummary {
  const p = JSON.parse(fs.readFileSync(file, 'utf8')) as { nodes: ProfileNode[]; samples: number[]; timeDeltas: number[]; endTime: number; startTime: number };
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const selfUs = new Map<number, number>();
  const lo = window ? p.endTime - window.fromEndMs * 1000 : -Infinity;
  const hi = window ? p.endTime - window.toEndMs * 1000 : Infinity;
  let t = p.startTime;
  for (let i = 0; i < p.samples.length; i++) {
    t += p.timeDeltas[i] ?? 0;
    if (t < lo || t > hi) continue;
    selfUs.set(p.samples[i], (selfUs.get(p.samples[i]) ?? 0) + (p.timeDeltas[i] ?? 0));
  }
  let total = 0;
  let idle = 0;
  let gc = 0;
  const fn = new Map<string, number>();
  const files = new Map<string, number>();
  for (const [id, us] of selfUs) {
    const n = byId.get(id)!;
    total += us;
    const name = n.callFrame.functionName || '(anonymous)';
    if (name === '(idle)') {
      idle += us;
      continue;
    }
    if (name === '(garbage collector)') gc += us;
    const key = `${name} ${shortUrl(n.callFrame.url)}${n.callFrame.url ? `:${n.callFrame.lineNumber + 1}` : ''}`;
    fn.set(key, (fn.get(key) ?? 0) + us);
    const f = name.startsWith('(') ? name : shortUrl(n.callFrame.url);
    files.set(f, (files.get(f) ?? 0) + us);
  }
  const busy = total - idle;
  const rank = (m: Map<string, number>) => [...m].sort((a, b) => b[1] - a[1]).slice(0, top);
  return {
    totalMs: total / 1000, idleMs: idle / 1000, gcMs: gc / 1000,
    byFunction: rank(fn).map(([name, us]) => ({ name, ms: us / 1000, pct: (100 * us) / busy })),
    byFile: rank(files).map(([file, us]) => ({ file, ms: us / 1000, pct: (100 * us) / busy })),
  };
}

if (process.argv[1]?.endsWith('profile.ts') && process.argv[2]) {
  const s = summarizeProfile(process.argv[2], Number(process.argv[3] ?? 25));
  console.log(`sampled ${s.totalMs.toFixed(0)} ms, idle ${s.idleMs.toFixed(0)} ms, GC ${s.gcMs.toFixed(0)} ms`);
  console.log('\nby file (share of busy time):');
  for (const f of s.byFile) console.log(`  ${f.pct.toFixed(1).padStart(5)}%  ${f.file}`);
  console.log('\nby function (self time):');
  for (const f of s.byFunction) console.log(`  ${f.pct.toFixed(1).padStart(5)}%  ${f.name}`);
}
