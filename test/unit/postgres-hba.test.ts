// Who a Postgres run by the agent lets in (ingest/postgres/instance.ts, decision 0076): locally,
// loopback only and trusted; at a pod's address, that address is trusted (the pod's own pooler and
// agent) and every other one needs the login password (other pods: replication, pg_rewind, the
// orchestrators). A real Postgres 15; a client at another address is one bound to another
// 127/8 address, as another pod's would come from its own.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { createLogger } from '../../common/log.ts';
import { setLoginPassword, withConnection } from '../../common/postgres.ts';
import { PostgresInstance } from '../../ingest/postgres/instance.ts';
import { freePort } from '../support/wait.ts';

const POD = '127.0.1.21';
const OTHER_POD = '127.0.1.22';
let dir: string;
let inst: PostgresInstance;

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mg-hba-'));
  fs.chmodSync(dir, 0o755); // the postgres OS user must reach the data dir below
  inst = new PostgresInstance({ name: 'hba', dataDir: path.join(dir, 'data'), host: POD, port: await freePort(), log: createLogger('postgres-hba-test') });
  await inst.initPrimary();
  await inst.start();
  await withConnection({ host: POD, port: inst.port }, (c) => setLoginPassword(c, 's3cret'));
});

after(async () => {
  await inst?.stop('immediate').catch(() => undefined);
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

/** Connects from `from` (the source address) and reads the session's user; rejects as Postgres does. */
async function connectFrom(from: string, password?: string, replication = false): Promise<string> {
  // node-postgres calls stream.connect(port, host): bind the source address there.
  const bound = () => {
    const socket = new net.Socket();
    const connect = socket.connect.bind(socket);
    return Object.assign(socket, { connect: (port: number, host: string) => connect({ port, host, localAddress: from }) });
  };
  const client = new pg.Client({ host: POD, port: inst.port, user: 'postgres', database: 'postgres', password, stream: bound, ...(replication ? { replication: 'database' } : {}) } as pg.ClientConfig);
  client.on('error', () => {});
  await client.connect();
  try {
    return (await client.query(replication ? 'IDENTIFY_SYSTEM' : 'SELECT current_user AS u')).rows[0].u ?? 'replication';
  } finally {
    await client.end();
  }
}

test("at a pod's address Postgres listens there, trusts the pod's own address and asks everyone else for the password", async () => {
  assert.equal(await connectFrom(POD), 'postgres', "the pod's pooler and agent need no password");
  await assert.rejects(connectFrom(OTHER_POD), /password authentication failed|client password must be a string|SASL/, 'another pod without the password');
  await assert.rejects(connectFrom(OTHER_POD, 'wrong'), /password authentication failed for user "postgres"/);
  assert.equal(await connectFrom(OTHER_POD, 's3cret'), 'postgres');
  await assert.rejects(connectFrom(OTHER_POD, 'wrong', true), /password authentication failed/, 'replication too');
  assert.equal(await connectFrom(OTHER_POD, 's3cret', true), 'replication');
  await assert.rejects(withConnection({ host: '127.0.0.1', port: inst.port }, async () => undefined, 2_000), /ECONNREFUSED/, 'not on loopback: in the test, another pod may have that port there');
});

test('a local instance (127.0.0.1) keeps the pg_hba.conf it had: trust on the socket and loopback, nothing else', () => {
  const dataDir = path.join(dir, 'local');
  fs.mkdirSync(dataDir);
  fs.writeFileSync(path.join(dataDir, 'PG_VERSION'), '15\n');
  fs.writeFileSync(path.join(dataDir, 'postgresql.conf'), '');
  new PostgresInstance({ name: 'local', dataDir, port: 5999, binDir: '/nonexistent', log: createLogger('postgres-hba-test') }).writeConfig();
  assert.equal(fs.readFileSync(path.join(dataDir, 'pg_hba.conf'), 'utf8'), `# Written by the ingest agent (mg); rewritten on every config write.
local all         all                trust
host  all         all  127.0.0.1/32  trust
local replication all                trust
host  replication all  127.0.0.1/32  trust
`);
  assert.match(fs.readFileSync(path.join(dataDir, 'mg.conf'), 'utf8'), /^listen_addresses = '127\.0\.0\.1'$/m);
});
