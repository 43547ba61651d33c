/**
 * pgBackRest for one Postgres data directory: its configuration file, the
 * archive settings that make Postgres push WAL through it, and the commands
 * (stanza-create, backup, info, verify, expire, restore) run as the server's
 * OS user so the repository stays readable by the archiver.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { BackupKind, RecoveryTarget } from '../../schemas/index.ts';
import type { BackupConfig } from '../config.ts';
import { chownToPostgres, runAsPostgres } from '../postgres/instance.ts';

const PGBACKREST = 'pgbackrest';

/** Where a local Postgres can be reached by pgBackRest (it connects through the Unix socket). */
export interface LocalPostgres {
  dataDir: string;
  port: number;
  socketDir: string;
}

/** The parts of `pgbackrest info --output=json` we read. */
export interface BackupInfo {
  label: string;
  type: BackupKind;
  prior: string | null;
  startedAt: Date;
  stoppedAt: Date;
  startLsn: string;
  stopLsn: string;
  /** Database size covered, and what this backup added to the repository. */
  sizeBytes: number;
  repoDeltaBytes: number;
  error: boolean;
}

export interface StanzaInfo {
  stanza: string;
  status: string;
  backups: BackupInfo[];
  archiveMin: string | null;
  archiveMax: string | null;
  /** While a backup runs (pgBackRest 2.41+): bytes done of total. */
  progress: { done: number; total: number } | null;
}

export class PgBackRest {
  /** Beside the data directory, which a clone or restore replaces. */
  readonly configFile: string;

  /** `configFile`: another file than the instance's own, e.g. to restore another stanza's backup into it. */
  constructor(private readonly cfg: BackupConfig, readonly stanza: string, private readonly pg: LocalPostgres, configFile = configFileOf(pg.dataDir)) {
    this.configFile = configFile;
  }

  /**
   * postgresql.conf settings of the instance in `dataDir`: archive every WAL
   * segment of the shard's stanza through pgBackRest (a primary does; a standby archives nothing).
   */
  static archiveSettingsFor(stanza: string, dataDir: string): Record<string, string> {
    const base = `${PGBACKREST} --config=${configFileOf(path.resolve(dataDir))} --stanza=${stanza}`;
    return {
      archive_mode: 'on',
      archive_command: `${base} archive-push %p`,
      // Timeline history files only: a promotion then sees the timelines other primaries of the shard already
      // archived and picks an unused number (two primaries on "timeline 2" would block the archive for good).
      // Segments keep coming by streaming; a replica restored from a backup has pgBackRest's full restore_command.
      restore_command: `case %f in *.history) exec ${base} archive-get %f "%p";; *) exit 1;; esac`,
      // An idle primary still ships its last writes within a minute (the archive's worst-case lag).
      archive_timeout: '60s',
    };
  }

  /** Writes the configuration file and the directories it names (owned by the server's user). */
  writeConfig(): void {
    writeConfigFile(this.cfg, this.configFile, [`[${this.stanza}]`, `pg1-path=${this.pg.dataDir}`, `pg1-port=${this.pg.port}`, `pg1-socket-path=${this.pg.socketDir}`, '']);
  }

  /** Every stanza the repository holds (a configuration of the repository alone is written to `configFile`). */
  static async repository(cfg: BackupConfig, configFile: string): Promise<StanzaInfo[]> {
    writeConfigFile(cfg, configFile, []);
    const out = await runAsPostgres(PGBACKREST, [`--config=${configFile}`, '--output=json', 'info'], { cwd: path.dirname(configFile) });
    return (JSON.parse(out) as RawInfo[]).filter((raw) => raw.status.code !== 1).map(stanzaInfoOf);
  }

  /** One pgBackRest command; `operands` follow the command name (archive-push's WAL file). */
  run(command: string, args: string[] = [], operands: string[] = []): Promise<string> {
    return runAsPostgres(PGBACKREST, [`--config=${this.configFile}`, `--stanza=${this.stanza}`, ...args, command, ...operands], { cwd: path.dirname(this.configFile) });
  }

  /** Creates the stanza, or checks that it matches this database (it is idempotent). */
  async stanzaCreate(): Promise<void> {
    await this.run('stanza-create');
  }

  /** Archiving works end to end: the current WAL segment reaches the repository. */
  async check(): Promise<void> {
    await this.run('check');
  }

  /** A backup; from this standby when `primary` is given (the primary only starts and stops it). */
  async backup(type: BackupKind, primary?: LocalPostgres): Promise<void> {
    const standby = primary ? ['--backup-standby', `--pg2-path=${primary.dataDir}`, `--pg2-port=${primary.port}`, `--pg2-socket-path=${primary.socketDir}`] : [];
    await this.run('backup', [`--type=${type}`, ...standby]);
  }

  async info(): Promise<StanzaInfo | undefined> {
    const [raw] = JSON.parse(await this.run('info', ['--output=json'])) as RawInfo[];
    if (!raw || raw.status.code === 1) return undefined; // code 1: missing stanza path
    return stanzaInfoOf(raw);
  }

  /** Whether the repository holds a backup to restore from. */
  async hasBackup(): Promise<boolean> {
    return ((await this.info().catch(() => undefined))?.backups.length ?? 0) > 0;
  }

  /** Checks every backup and archived WAL file in the repository against its checksum; the report text. */
  async verify(): Promise<string> {
    return this.run('verify', ['--log-level-console=info']);
  }

  /** Expires what retention no longer keeps, or the backup `label` (and what depends on it). */
  async expire(label?: string): Promise<string> {
    return this.run('expire', ['--log-level-console=info', ...(label ? [`--set=${label}`] : [])]);
  }

  /**
   * Restores into `dataDir` (empty, or with `delta`: rewritten in place, copying only the files
   * that differ from the backup). `target`: a standby that follows the archive (and then its
   * upstream), or recovery to a time or LSN that ends promoted, or the end of the archive.
   * `set`: the backup to start from (default: pgBackRest's choice, the latest before a time target).
   */
  async restore(dataDir: string, target: { type: 'standby' } | RecoveryTarget, opts: { delta?: boolean; set?: string } = {}): Promise<void> {
    const args = [`--pg1-path=${dataDir}`, `--type=${target.type}`, ...(opts.delta ? ['--delta'] : []), ...(opts.set ? [`--set=${opts.set}`] : [])];
    if (target.type === 'time' || target.type === 'lsn') args.push(`--target=${target.value}`, '--target-action=promote');
    await this.run('restore', args);
  }
}

function stanzaInfoOf(raw: RawInfo): StanzaInfo {
  const archive = raw.archive?.[raw.archive.length - 1];
  const lock = raw.status.lock?.backup;
  return {
    stanza: raw.name,
    status: raw.status.message,
    archiveMin: archive?.min ?? null,
    archiveMax: archive?.max ?? null,
    progress: lock?.held && lock['size-cplt'] !== undefined ? { done: lock['size-cplt'], total: lock.size ?? 0 } : null,
    backups: (raw.backup ?? []).map((b) => ({
      label: b.label, type: b.type, prior: b.prior,
      startedAt: new Date(b.timestamp.start * 1000), stoppedAt: new Date(b.timestamp.stop * 1000),
      startLsn: b.lsn?.start ?? '', stopLsn: b.lsn?.stop ?? '',
      sizeBytes: b.info.size, repoDeltaBytes: b.info.repository.delta, error: b.error ?? false,
    })),
  };
}

/** The repository's [global] section from `cfg`, then `sections`; the directories it names are made, owned by the server's user. */
function writeConfigFile(c: BackupConfig, configFile: string, sections: string[]): void {
  fs.mkdirSync(path.dirname(configFile), { recursive: true });
  for (const dir of [c.lockPath, c.logPath, ...(c.options['repo1-type'] && c.options['repo1-type'] !== 'posix' ? [] : [c.repoPath])]) {
    fs.mkdirSync(dir, { recursive: true }); // parents it creates stay enterable (0755), as the server's user must pass them
    fs.chmodSync(dir, 0o750);
    chownToPostgres(dir);
  }
  const global: Record<string, string> = {
    'repo1-path': c.repoPath,
    'repo1-retention-full': String(c.retentionFull),
    ...(c.retentionDiff ? { 'repo1-retention-diff': String(c.retentionDiff) } : {}),
    'lock-path': c.lockPath,
    'log-path': c.logPath,
    'log-level-console': 'warn',
    'log-level-file': 'info',
    'compress-type': c.compressType,
    'process-max': String(c.processMax),
    'start-fast': 'y', // backups start at once instead of waiting for the next checkpoint
    ...c.options,
  };
  const lines = ['# Written by mg (the agent at every start; the CLI for a restore or a look at the repository).', '[global]',
    ...Object.entries(global).map(([k, v]) => `${k}=${oneLine(v)}`), '', ...sections];
  const tmp = `${configFile}.tmp`;
  fs.writeFileSync(tmp, lines.join('\n'), { mode: 0o640 });
  chownToPostgres(tmp);
  fs.renameSync(tmp, configFile);
}

function configFileOf(dataDir: string): string {
  return path.join(path.dirname(dataDir), `${path.basename(dataDir)}.pgbackrest.conf`);
}

function oneLine(v: string): string {
  if (/[\r\n]/.test(v)) throw new Error(`pgBackRest option value contains a line break: ${JSON.stringify(v)}`);
  return v;
}

interface RawInfo {
  name: string;
  status: { code: number; message: string; lock?: { backup?: { held: boolean; size?: number; 'size-cplt'?: number } } };
  archive?: Array<{ min: string | null; max: string | null }>;
  backup?: Array<{
    label: string; type: BackupKind; prior: string | null; error?: boolean;
    timestamp: { start: number; stop: number };
    lsn?: { start: string; stop: string };
    info: { size: number; repository: { delta: number } };
  }>;
}
