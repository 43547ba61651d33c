import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { isAlive, pidFilePath, readPid, spawnDetached, stopProcess, waitFor } from '../../compose/supervise.ts';

const dir = mkdtempSync(join(tmpdir(), 'mg-supervise-'));
const runDir = join(dir, 'run');
after(() => rmSync(dir, { recursive: true, force: true }));

test('spawnDetached starts its own process group and stopProcess stops it with SIGTERM', async () => {
  const pid = await spawnDetached({ name: 'sleeper', command: 'sleep', args: ['30'], runDir, logFile: join(dir, 'sleeper.log') });
  assert.equal(readPid(runDir, 'sleeper'), pid);
  assert.ok(isAlive(pid));
  const pgrp = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ')[2];
  assert.equal(Number(pgrp), pid);
  await assert.rejects(
    spawnDetached({ name: 'sleeper', command: 'sleep', args: ['30'], runDir, logFile: join(dir, 'sleeper.log') }),
    /already running/,
  );

  assert.equal(await stopProcess(runDir, 'sleeper'), 'stopped');
  assert.ok(!isAlive(pid));
  assert.ok(!existsSync(pidFilePath(runDir, 'sleeper')));
  assert.equal(await stopProcess(runDir, 'sleeper'), 'not-running');
});

test('stopProcess escalates to SIGKILL after the grace period', async () => {
  // An ignored signal stays ignored across exec, so this sleep ignores SIGTERM.
  const pid = await spawnDetached({
    name: 'stubborn',
    command: 'sh',
    args: ['-c', 'trap "" TERM; exec sleep 30'],
    runDir,
    logFile: join(dir, 'stubborn.log'),
  });
  await new Promise((r) => setTimeout(r, 200)); // let sh install the trap
  const started = Date.now();
  assert.equal(await stopProcess(runDir, 'stubborn', { graceMs: 300 }), 'killed');
  assert.ok(Date.now() - started >= 300);
  assert.ok(!isAlive(pid));
  assert.ok(!existsSync(pidFilePath(runDir, 'stubborn')));
});

test('the log file is appended to, not truncated', async () => {
  const logFile = join(dir, 'echo.log');
  for (const word of ['first', 'second']) {
    const pid = await spawnDetached({ name: 'echo', command: 'sh', args: ['-c', `echo ${word}`], runDir, logFile });
    await waitFor(async () => !isAlive(pid), { timeoutMs: 5_000, what: 'echo to exit' });
  }
  assert.equal(readFileSync(logFile, 'utf8'), 'first\nsecond\n');
});

test('a stale pid file is not-running, and a recycled pid is not ours', async () => {
  writeFileSync(pidFilePath(runDir, 'gone'), '2147483646 1\n');
  assert.equal(await stopProcess(runDir, 'gone'), 'not-running');
  assert.ok(!existsSync(pidFilePath(runDir, 'gone')));

  // Our own pid with a start time that is not ours: a pid reused by another process.
  writeFileSync(pidFilePath(runDir, 'reused'), `${process.pid} 1\n`);
  assert.equal(readPid(runDir, 'reused'), undefined);
  assert.equal(await stopProcess(runDir, 'reused'), 'not-running');
});

test('isAlive treats a zombie as dead', async () => {
  // sh forks a short sleep and then becomes a sleep that never reaps it. The child outlives the exec: one that
  // ended before it could be reaped by sh itself (seen once in CI: /proc/<pid> gone, never a zombie).
  const zombieFile = join(dir, 'zombie.pid');
  await spawnDetached({
    name: 'reaper-less',
    command: 'sh',
    args: ['-c', `sleep 0.5 & echo $! > ${zombieFile}; exec sleep 30`],
    runDir,
    logFile: join(dir, 'zombie.log'),
  });
  await waitFor(async () => existsSync(zombieFile) && readFileSync(zombieFile, 'utf8').endsWith('\n'), {
    timeoutMs: 5_000,
    what: 'zombie pid',
  });
  const zombie = Number(readFileSync(zombieFile, 'utf8'));
  await waitFor(async () => readFileSync(`/proc/${zombie}/stat`, 'utf8').includes(') Z '), { timeoutMs: 5_000, what: 'zombie state' });
  assert.ok(!isAlive(zombie));
  assert.equal(await stopProcess(runDir, 'reaper-less'), 'stopped');
});

test('waitFor names what it waited for, with the last error', async () => {
  await assert.rejects(
    waitFor(
      async () => {
        throw new Error('connection refused');
      },
      { timeoutMs: 150, intervalMs: 20, what: 'the moon' },
    ),
    /timed out after 150 ms waiting for the moon: last error: connection refused/,
  );
  // A check that hangs still ends at the deadline.
  const started = Date.now();
  await assert.rejects(waitFor(() => new Promise<boolean>(() => {}), { timeoutMs: 100, what: 'a hang' }), /a hang/);
  assert.ok(Date.now() - started < 1_000);
});
