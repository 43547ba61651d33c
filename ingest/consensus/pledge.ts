/**
 * The voter's durable promise: the highest term it has pledged, and to which
 * orchestrator. Written with fsync (file and directory) before the voter
 * answers, so a voter that crashes and comes back never pledges a term twice
 * nor goes back to an older one.
 *
 * The file sits beside the data directory, not in it: pg_rewind and rebuilds
 * replace the data directory, and the pledge must survive them.
 */
import fs from 'node:fs';
import path from 'node:path';

export interface Pledge {
  term: bigint;
  orchestrator: string;
}

export class PledgeFile {
  readonly file: string;

  constructor(dataDir: string) {
    this.file = `${path.resolve(dataDir)}.pledge.json`;
  }

  read(): Pledge {
    let text: string;
    try {
      text = fs.readFileSync(this.file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { term: 0n, orchestrator: '' };
      throw err;
    }
    const raw = JSON.parse(text) as { term: string; orchestrator: string };
    return { term: BigInt(raw.term), orchestrator: raw.orchestrator };
  }

  write(p: Pledge): void {
    const tmp = `${this.file}.tmp`;
    fs.mkdirSync(path.dirname(this.file), { recursive: true, mode: 0o755 }); // a new instance may have no data yet
    const fd = fs.openSync(tmp, 'w', 0o600);
    try {
      fs.writeSync(fd, JSON.stringify({ term: p.term.toString(), orchestrator: p.orchestrator }));
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, this.file);
    const dir = fs.openSync(path.dirname(this.file), 'r');
    try {
      fs.fsyncSync(dir); // the rename itself must be durable
    } finally {
      fs.closeSync(dir);
    }
  }
}
