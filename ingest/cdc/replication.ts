/**
 * A `replication=database` session on the primary: creates the logical slot
 * (exporting its snapshot), starts pgoutput streaming in CopyBoth mode and
 * sends standby status updates. It reports only the LSN the caller gives it:
 * keep-alives are answered by the stream with what Kafka has acknowledged,
 * never with what was merely received.
 */
import pg from 'pg';
import { formatLsn, parseLsn } from '../postgres/lsn.ts';
import { quoteIdent, SESSION_OPTIONS } from './catalog.ts';
import { standbyStatus } from './pgoutput.ts';

export interface ReplicationOptions {
  host: string;
  port: number;
  database: string;
  applicationName: string;
}

export interface CreatedSlot {
  consistentPoint: bigint;
  snapshotName: string;
}

export class ReplicationSession {
  private readonly client: pg.Client;
  private streaming: Promise<unknown> | undefined;
  private closed = false;

  constructor(opts: ReplicationOptions) {
    this.client = new pg.Client({
      host: opts.host, port: opts.port, database: opts.database, user: 'postgres',
      application_name: opts.applicationName, options: SESSION_OPTIONS, replication: 'database',
    } as pg.ClientConfig);
    // Errors surface through the streaming promise or the next query; keep the process alive.
    this.client.on('error', () => undefined);
  }

  async connect(): Promise<void> {
    await this.client.connect();
  }

  /**
   * Creates a logical slot and exports the snapshot it is consistent with. The
   * snapshot stays importable only until this session runs its next command,
   * so the caller reads it before calling start().
   */
  async createSlot(slot: string): Promise<CreatedSlot> {
    const { rows } = await this.client.query(`CREATE_REPLICATION_SLOT ${quoteIdent(slot)} LOGICAL pgoutput (SNAPSHOT 'export')`);
    return { consistentPoint: parseLsn(rows[0].consistent_point), snapshotName: rows[0].snapshot_name };
  }

  /**
   * Starts streaming changes committed after `from`. `onData` gets each CopyData
   * payload in order; the returned promise settles when streaming ends (an
   * error, the server going away, or close()).
   */
  start(slot: string, publication: string, from: bigint, onData: (chunk: Buffer) => void): Promise<void> {
    const con = (this.client as unknown as { connection: pg.Connection & NodeJS.EventEmitter }).connection;
    // The protocol parser reuses its buffer for later socket data: copy, since the stream reads messages asynchronously.
    con.on('copyData', (msg: { chunk: Buffer }) => onData(Buffer.from(msg.chunk)));
    const ended = new Promise<void>((_resolve, reject) => {
      this.client.once('end', () => reject(new Error('replication connection closed')));
      this.client.once('error', reject);
    });
    const query = this.client.query(
      `START_REPLICATION SLOT ${quoteIdent(slot)} LOGICAL ${formatLsn(from)} ` +
      `(proto_version '1', publication_names '${quoteIdent(publication).replace(/'/g, "''")}', messages 'true')`);
    this.streaming = Promise.race([query, ended]).then(() => {
      if (!this.closed) throw new Error('the server ended replication');
    }, (err) => {
      if (!this.closed) throw err;
    });
    return this.streaming as Promise<void>;
  }

  /** Tells the server that everything up to `lsn` is safely in Kafka (written = flushed = applied). */
  confirm(lsn: bigint): void {
    const con = (this.client as unknown as { connection: { sendCopyFromChunk(b: Buffer): void } }).connection;
    con.sendCopyFromChunk(standbyStatus(lsn));
  }

  /** Stops reading from the socket (back-pressure while Kafka catches up) and resumes. */
  pause(): void {
    this.socket()?.pause();
  }
  resume(): void {
    this.socket()?.resume();
  }

  private socket(): NodeJS.ReadableStream | undefined {
    return (this.client as unknown as { connection?: { stream?: NodeJS.ReadableStream } }).connection?.stream;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // end() on a session in CopyBoth mode waits for the server; destroying the socket is immediate and safe
    // (the slot keeps its confirmed position).
    (this.socket() as unknown as { destroy?: () => void })?.destroy?.();
    await this.client.end().catch(() => undefined);
  }
}
