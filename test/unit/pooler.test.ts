// MultiPooler pieces that need no server: statement classification, startup options,
// settings replay, message framing, config validation.
import { before, test } from 'node:test';
import assert from 'node:assert/strict';
import { classify, loadParser, prefilter, syntaxError, weakensDurability } from '../../router/pooler/classify.ts';
import { ConfigError, parseConfig } from '../../router/pooler/config.ts';
import { afterResetAll, decodeSessionState, encodeSessionState, setConfigSql, Settings, settingsDelta, settingsFromStartup, startupSettings } from '../../router/pooler/settings.ts';
import { MessageScanner } from '../../router/protocol/frames.ts';
import { OutBatch } from '../../router/protocol/output.ts';
import { quoteLiteral, splitOptions } from '../../router/pooler/text.ts';

before(() => loadParser());

const effects = (sql: string) => classify(sql)?.map((s) => s.effects) ?? null;

test('the prefilter lets ordinary queries through without parsing', () => {
  for (const q of ['SELECT 1', 'UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 5', 'INSERT INTO t VALUES (1)',
    'BEGIN', 'COMMIT', 'SELECT * FROM t OFFSET 5', 'select reset_val from pg_settings']) {
    assert.equal(prefilter(q), false, q);
  }
  for (const q of ['SET x = 1', '  set search_path to a', 'select 1; RESET ALL', '/* c */ SET x = 1', '-- c\nDISCARD ALL',
    "SELECT set_config('a', 'b', false)", 'CREATE TEMP TABLE t (x int)', 'SELECT pg_advisory_lock(1)', 'LISTEN x', 'ROLLBACK TO s1',
    'PREPARE p AS SELECT 1', 'DECLARE c CURSOR WITH HOLD FOR SELECT 1', 'SAVEPOINT s']) {
    assert.equal(prefilter(q), true, q);
  }
});

test('classification of session-changing statements', () => {
  assert.equal(effects('UPDATE t SET a = 1'), null);
  assert.deepEqual(effects('SET search_path TO a, "B"'), [[{ t: 'set', name: 'search_path', sql: 'SET search_path TO a, "B"' }]]);
  assert.deepEqual(effects('SET LOCAL search_path TO a'), null);
  assert.deepEqual(effects('SET TRANSACTION ISOLATION LEVEL SERIALIZABLE'), null);
  assert.deepEqual(effects("SET TIME ZONE 'UTC'"), [[{ t: 'set', name: 'timezone', sql: "SET TIME ZONE 'UTC'" }]]);
  assert.deepEqual(effects('RESET timezone'), [[{ t: 'reset', name: 'timezone' }]]);
  assert.deepEqual(effects('SET statement_timeout TO DEFAULT'), [[{ t: 'reset', name: 'statement_timeout' }]]);
  assert.deepEqual(effects('RESET ALL'), [[{ t: 'resetAll' }]]);
  assert.deepEqual(effects('select 1; set a.b = 2'), [[], [{ t: 'set', name: 'a.b', sql: 'set a.b = 2' }]]);
  assert.deepEqual(effects("SELECT set_config('App.X', 'v', false)"), [[{ t: 'set', name: 'app.x', sql: setConfigSql('app.x', 'v') }]]);
  assert.deepEqual(effects("SELECT set_config('a.x', 'v', true)"), null);
  assert.deepEqual(effects("SELECT set_config('a.x', $1, false)"), [[{ t: 'dynamic', name: 'a.x' }]]);
  assert.deepEqual(effects("SELECT set_config('a.x', 'v', false) FROM t WHERE false"), [[{ t: 'dynamic', name: 'a.x' }]]);
  assert.deepEqual(effects('SELECT set_config($1, $2, false)'), [[{ t: 'pin', reason: 'unknown' }]]);
  assert.deepEqual(effects('CREATE TEMP TABLE t (x int)'), [[{ t: 'pin', reason: 'temp' }]]);
  assert.deepEqual(effects('CREATE TEMP TABLE t (x int) ON COMMIT DROP'), null);
  assert.deepEqual(effects('CREATE TABLE pg_temp.t (x int)'), [[{ t: 'pin', reason: 'temp' }]]);
  assert.deepEqual(effects('SELECT * INTO TEMP t2 FROM t'), [[{ t: 'pin', reason: 'temp' }]]);
  assert.deepEqual(effects('CREATE TABLE template_x (x int)'), null);
  assert.deepEqual(effects('SELECT pg_advisory_lock(1), pg_try_advisory_lock_shared(2)'), [[{ t: 'pin', reason: 'advisory' }]]);
  assert.deepEqual(effects('SELECT pg_advisory_xact_lock(1)'), null);
  assert.deepEqual(effects('SELECT pg_advisory_unlock_all()'), [[{ t: 'unpin', reason: 'advisory' }]]);
  assert.deepEqual(effects('DECLARE c CURSOR WITH HOLD FOR SELECT 1'), [[{ t: 'pin', reason: 'cursor' }]]);
  assert.deepEqual(effects('DECLARE c CURSOR FOR SELECT 1'), null);
  assert.deepEqual(effects('PREPARE p AS SELECT 1'), [[{ t: 'pin', reason: 'prepare' }]]);
  assert.deepEqual(effects('DEALLOCATE ALL'), [[{ t: 'deallocate', name: null }]]);
  assert.deepEqual(effects('DEALLOCATE p1'), [[{ t: 'deallocate', name: 'p1' }]]);
  assert.deepEqual(effects('DISCARD ALL'), [[{ t: 'discardAll' }]]);
  assert.deepEqual(effects('DISCARD TEMP'), [[{ t: 'unpin', reason: 'temp' }]]);
  assert.deepEqual(effects('LISTEN Foo; UNLISTEN *'), [[{ t: 'listen', channel: 'foo' }], [{ t: 'unlisten', channel: null }]]);
  assert.deepEqual(effects('savepoint s1'), [[{ t: 'savepoint', name: 's1' }]]);
  assert.deepEqual(effects('ROLLBACK TO SAVEPOINT S1'), [[{ t: 'rollbackTo', name: 's1' }]]);
  assert.deepEqual(effects('release "Sp"'), [[{ t: 'release', name: 'Sp' }]]);
  assert.deepEqual(effects('SET SESSION AUTHORIZATION alice'), [[{ t: 'reset', name: 'role' },
    { t: 'set', name: 'session_authorization', sql: 'SET SESSION AUTHORIZATION alice' }]]);
  assert.deepEqual(effects('SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY'), [[
    { t: 'set', name: 'default_transaction_read_only', sql: 'SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY' }]]);
  // Unparseable but flagged: if Postgres runs it anyway, the session is pinned.
  assert.deepEqual(effects('SET ??? nonsense'), [[{ t: 'pin', reason: 'unknown' }]]);
});

test('syntax errors as Postgres reports them', () => {
  assert.deepEqual(syntaxError('select * fro t'), { message: 'syntax error at or near "fro"', position: 10 });
  assert.equal(syntaxError('select 1'), null);
});

test('startup options: -c and --name=value, backslash escapes, GUC names folded', () => {
  assert.deepEqual(splitOptions('-c a=1   -c b=x\\ y --c-d=2'), ['-c', 'a=1', '-c', 'b=x y', '--c-d=2']);
  const m = startupSettings({ user: 'u', database: 'd', application_name: 'app', TimeZone: 'UTC', options: '-c search_path=s1 -cwork_mem=4MB --lock-timeout=5s' });
  assert.deepEqual([...m], [['application_name', 'app'], ['timezone', 'UTC'], ['search_path', 's1'], ['work_mem', '4MB'], ['lock_timeout', '5s']]);
  assert.throws(() => startupSettings({ user: 'u', options: '-B 100' }), /invalid command-line argument/);
  assert.throws(() => startupSettings({ user: 'u', options: '-c novalue' }), /requires a value/);
});

test('settings replay: only the missing tail, or back to defaults and everything', () => {
  const s1 = settingsFromStartup(new Map([['application_name', 'a']]));
  const s2 = s1.with('search_path', 'SET search_path TO x');
  assert.equal(settingsDelta(s1, s1), '');
  assert.equal(settingsDelta(s1, s2), 'SET search_path TO x');
  assert.equal(settingsDelta(s2, s1), `RESET ALL; ${setConfigSql('application_name', 'a')}`);
  assert.equal(settingsDelta(null, Settings.EMPTY), 'RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL');
  assert.equal(settingsDelta(Settings.EMPTY.with('role', 'SET ROLE r'), Settings.EMPTY), 'RESET ROLE; RESET ALL');
  // A re-SET moves to the end, so order is kept.
  assert.deepEqual([...s2.with('application_name', 'x').map.keys()], ['search_path', 'application_name']);
  assert.equal(s1.planContext === s2.planContext, false);
  assert.deepEqual([...afterResetAll(s2.with('role', 'SET ROLE r'), s1).map.keys()], ['application_name', 'role']);
  assert.equal(quoteLiteral("it's"), "'it''s'");
  assert.equal(quoteLiteral('a\\b'), "E'a\\\\b'");
});

test('the scanner hands out whole messages however the bytes are split', () => {
  const msgs = [Buffer.from('Q\0\0\0\x0dselect 1\0', 'latin1'), Buffer.from('S\0\0\0\x04', 'latin1'), Buffer.concat([Buffer.from('d\0\0\x20\x04', 'latin1'), Buffer.alloc(8192, 7)])];
  const all = Buffer.concat(msgs);
  for (const step of [1, 2, 3, 5, 7, 4096, all.length]) {
    const scanner = new MessageScanner(1 << 20);
    const got: Buffer[] = [];
    for (let i = 0; i < all.length; i += step) scanner.push(all.subarray(i, i + step), { onMessage: (b, s, l) => got.push(Buffer.from(b.subarray(s, s + l))) });
    assert.deepEqual(got, msgs, `step ${step}`);
  }
  const tooBig = new MessageScanner(100);
  assert.throws(() => tooBig.push(Buffer.from([0x51, 0, 0, 1, 0]), { onMessage() {} }), /exceeds the maximum/);
  assert.throws(() => new MessageScanner(100).push(Buffer.from([0x51, 0, 0, 0, 3]), { onMessage() {} }), /invalid message length 3/);
});

test('the output batch coalesces adjacent ranges, and writes a small batch as one buffer', () => {
  const written: Buffer[] = [];
  const fake = { destroyed: false, write: (x: Buffer) => written.push(x), cork() {}, uncork() {} };
  const b = Buffer.from('abcdefgh');
  const out = new OutBatch();
  out.range(b, 0, 2);
  out.range(b, 2, 5);
  out.add(Buffer.from('X'));
  out.range(b, 6, 8);
  assert.equal(out.writeTo(fake as never), 8);
  assert.deepEqual(written.map(String), ['abcdeXgh']);
  written.length = 0;
  const big = Buffer.alloc(20_000, 'y');
  out.range(big, 0, 10_000);
  out.range(big, 10_000, 20_000);
  out.add(Buffer.from('Z'));
  out.range(big, 0, 5);
  out.writeTo(fake as never);
  assert.deepEqual(written.map((w) => w.length), [20_000, 1, 5]);
  assert.equal(written[0].buffer, big.buffer, 'relayed bytes are not copied');
});

test('config validation names the bad field', () => {
  assert.equal(parseConfig({ instanceId: 'p', listenPort: 6432, postgres: { port: 5432 } }).poolSize, 20);
  assert.throws(() => parseConfig({ instanceId: 'p', listenPort: 6432, postgres: { port: 5432 }, poolSize: 'x' }), (e: Error) =>
    e instanceof ConfigError && /^poolSize: Expected number/.test(e.message));
  assert.throws(() => parseConfig({ instanceId: 'p', listenPort: 6432, postgres: { host: 'db.example', port: 5432 } }), /postgres\.host: must be an IP address/);
  assert.equal(parseConfig({ instanceId: 'p', listenPort: 6432, listenHost: '10.0.0.1', postgres: { host: '10.0.0.1', port: 5432 } }).listenHost, '10.0.0.1', "a pod's own address");
  assert.throws(() => parseConfig({ instanceId: 'p', listenPort: 6432, postgres: { port: 5432 }, bogus: 1 }), /Unrecognized key/);
});

test('session state carried between poolers round-trips, keeps order, and refuses malformed text with 08P01', () => {
  const s = new Settings(new Map([['search_path', "SET search_path TO 'a, b'"], ['timezone', "SET timezone TO 'UTC'"]]));
  const back = decodeSessionState(encodeSessionState(s));
  assert.equal(back.fp, s.fp);
  assert.deepEqual([...back.map.keys()], ['search_path', 'timezone']);
  for (const bad of ['', 'not json', '{}', '[["a"]]', '[[1, "x"]]']) {
    assert.throws(() => decodeSessionState(bad), (e: any) => e.code === '08P01' && /mg\.session/.test(e.message), bad);
  }
});

test('statements that would weaken synchronous_commit are refused; strengthening or leaving it is not', () => {
  const refused = [
    'SET synchronous_commit = off', "SET synchronous_commit TO 'local'", 'SET LOCAL synchronous_commit = remote_write',
    'SET SESSION synchronous_commit = 0', "SELECT set_config('synchronous_commit', 'off', false)",
    "SELECT 1; SELECT set_config('synchronous_commit', 'off', true)", "SELECT set_config('synchronous_commit', current_user, false)",
    'ALTER ROLE app SET synchronous_commit = off', 'ALTER DATABASE postgres SET synchronous_commit TO local', 'ALTER SYSTEM SET synchronous_commit = off',
    'CREATE FUNCTION f() RETURNS int LANGUAGE sql SET synchronous_commit = off AS $$ SELECT 1 $$',
  ];
  for (const sql of refused) {
    const forbidden = classify(sql)?.flatMap((s) => s.effects).find((e) => e.t === 'forbidden');
    assert.ok(forbidden, `not refused: ${sql}`);
  }
  const allowed = ['SET synchronous_commit = on', 'SET synchronous_commit = remote_apply', 'RESET synchronous_commit', 'SET synchronous_commit TO DEFAULT',
    "SELECT set_config('statement_timeout', '1s', false)", "SELECT current_setting('synchronous_commit')"];
  for (const sql of allowed) assert.equal(classify(sql)?.flatMap((s) => s.effects).find((e) => e.t === 'forbidden'), undefined, sql);
  assert.ok(weakensDurability('synchronous_commit', 'OFF'));
  assert.ok(!weakensDurability('synchronous_commit', 'on'));
  assert.ok(!weakensDurability('statement_timeout', 'off'));
});
