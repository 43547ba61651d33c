// Reads into a reused buffer (issue 15 part 1, decision 0016): framing of messages split
// across reads or packed many to a read, when the read buffer is overwritten by the next read;
// output batches and queued messages that must not keep views of it; a real socket read with
// `onread` against a server that sends in odd-sized pieces.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { MessageScanner } from '../../router/protocol/frames.ts';
import { inRead, isReadBuffer, keep, OutBatch, ownReads } from '../../router/protocol/output.ts';

/** Typed messages of assorted sizes: empty body, small, a few KiB, more than one read buffer. */
function messages(): Buffer[] {
  const out: Buffer[] = [];
  const sizes = [0, 1, 9, 13, 100, 4091, 70_000, 3, 0, 200_000, 17];
  sizes.forEach((n, i) => {
    const m = Buffer.alloc(5 + n);
    m[0] = 0x41 + (i % 26);
    m.writeInt32BE(4 + n, 1);
    for (let j = 0; j < n; j++) m[5 + j] = (i * 31 + j) & 0xff;
    out.push(m);
  });
  return out;
}

/**
 * Feeds `all` through one reused buffer, `step` bytes a read, the way an onread socket
 * does: the buffer is overwritten (with garbage first) before every read.
 */
function scanThroughReusedBuffer(all: Buffer, step: number, bufSize = 65_536): Buffer[] {
  const scanner = new MessageScanner(1 << 30);
  const reused = Buffer.allocUnsafeSlow(bufSize);
  const got: Buffer[] = [];
  const views: Array<{ b: Buffer; s: number; l: number }> = [];
  for (let i = 0; i < all.length;) {
    const n = Math.min(step, bufSize, all.length - i);
    reused.fill(0xee);
    all.copy(reused, 0, i, i + n);
    i += n;
    inRead((buf, end) => scanner.push(buf, {
      onMessage: (b, s, l) => {
        got.push(Buffer.from(b.subarray(s, s + l)));
        if (isReadBuffer(b)) views.push({ b, s, l });
      },
    }, end), reused, n);
  }
  assert.equal(scanner.buffered, 0, 'nothing left over');
  return got;
}

test('a reused read buffer: messages split across reads and many to a read come out whole', () => {
  const msgs = messages();
  const all = Buffer.concat(msgs);
  for (const step of [1, 2, 3, 4, 5, 6, 7, 13, 4096, 65_535, 65_536]) {
    const got = scanThroughReusedBuffer(all, step);
    assert.equal(got.length, msgs.length, `step ${step}`);
    for (let i = 0; i < msgs.length; i++) assert.ok(got[i].equals(msgs[i]), `step ${step}, message ${i}`);
  }
});

test('a split message is assembled from copies: overwriting a chunk after push does not change it', () => {
  const m = Buffer.alloc(5 + 3000, 9);
  m[0] = 0x44;
  m.writeInt32BE(4 + 3000, 1);
  const big = Buffer.alloc(5 + 2_000_000, 5); // over the in-place assembly size: kept as copied parts
  big[0] = 0x64;
  big.writeInt32BE(4 + 2_000_000, 1);
  for (const msg of [m, big]) {
    const scanner = new MessageScanner(1 << 30);
    const got: Buffer[] = [];
    const sink = { onMessage: (b: Buffer, s: number, l: number) => got.push(Buffer.from(b.subarray(s, s + l))) };
    const chunk = Buffer.alloc(1000);
    for (let i = 0; i < msg.length; i += 1000) {
      const n = Math.min(1000, msg.length - i);
      msg.copy(chunk, 0, i, i + n);
      scanner.push(chunk, sink, n);
      chunk.fill(0xff); // the next read overwrites it
    }
    assert.equal(got.length, 1);
    assert.ok(got[0].equals(msg));
  }
});

test('the scanner frames only chunk[0, end), not the stale bytes after it', () => {
  const chunk = Buffer.alloc(64, 0x51); // garbage beyond end would read as a huge length
  Buffer.from('S\0\0\0\x04Z\0\0\0\x05I', 'latin1').copy(chunk);
  const got: string[] = [];
  new MessageScanner(1 << 20).push(chunk, { onMessage: (b, s, l) => got.push(b.toString('latin1', s, s + l)) }, 11);
  assert.deepEqual(got, ['S\0\0\0\x04', 'Z\0\0\0\x05I']);
});

test('an output batch holding views of the read buffer keeps its bytes after the read', () => {
  const reused = Buffer.allocUnsafeSlow(64);
  const batch = new OutBatch();
  reused.write('hello world', 'latin1');
  inRead((buf) => {
    batch.range(buf, 0, 5); // never flushed during the read
    batch.add(buf.subarray(6, 11)); // a view made elsewhere
  }, reused, 11);
  reused.fill(0x58);
  const written: Buffer[] = [];
  batch.writeTo({ destroyed: false, write: (x: Buffer) => written.push(x), cork() {}, uncork() {} } as unknown as net.Socket);
  assert.equal(Buffer.concat(written).toString('latin1'), 'helloworld');
});

test('a batch flushed during the read writes a copy, never a view of the read buffer', () => {
  const reused = Buffer.allocUnsafeSlow(64);
  reused.write('abcdef', 'latin1');
  const written: Buffer[] = [];
  const fake = { destroyed: false, write: (x: Buffer) => written.push(x), cork() {}, uncork() {} } as unknown as net.Socket;
  inRead((buf) => {
    const b = new OutBatch();
    b.range(buf, 0, 3);
    b.writeTo(fake);
  }, reused, 6);
  reused.fill(0);
  assert.equal(written[0].toString('latin1'), 'abc');
  assert.notEqual(written[0].buffer, reused.buffer);
});

test('keep() copies only what lies in the read buffer', () => {
  const reused = Buffer.allocUnsafeSlow(16);
  reused.write('queued', 'latin1');
  const other = Buffer.from('fresh chunk');
  let kept!: Buffer;
  let view!: Buffer;
  inRead((buf) => {
    kept = keep(buf, 0, 6);
    view = keep(other, 0, 5);
  }, reused, 6);
  reused.fill(0);
  assert.equal(kept.toString(), 'queued');
  assert.equal(view.buffer, other.buffer, 'a fresh chunk is not copied');
  assert.equal(keep(reused, 0, 3).buffer, reused.buffer, 'outside a read nothing is copied');
});

test('a socket with onread into the shared buffer frames a stream sent in odd pieces, and sees the end', async () => {
  const msgs = messages();
  const all = Buffer.concat(msgs);
  const server = net.createServer({ noDelay: true }, async (s) => {
    for (let i = 0; i < all.length;) {
      const n = 1 + ((i * 7919) % 9000);
      s.write(all.subarray(i, i + n));
      i += n;
      if (i % 3 === 0) await new Promise((r) => setImmediate(r));
    }
    s.end();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as net.AddressInfo;
  const got: Buffer[] = [];
  const scanner = new MessageScanner(1 << 30);
  // A second socket reading into the same buffer at the same time, to interleave reads.
  const sink = { onMessage: (b: Buffer, s: number, l: number) => got.push(Buffer.from(b.subarray(s, s + l))) };
  const got2: Buffer[] = [];
  const scanner2 = new MessageScanner(1 << 30);
  const sink2 = { onMessage: (b: Buffer, s: number, l: number) => got2.push(Buffer.from(b.subarray(s, s + l))) };
  const closed = (sock: net.Socket) => new Promise<void>((r) => sock.on('close', () => r()));
  const a = net.connect({ port, host: '127.0.0.1', onread: ownReads((buf, end) => scanner.push(buf, sink, end)) });
  const b = net.connect({ port, host: '127.0.0.1', onread: ownReads((buf, end) => scanner2.push(buf, sink2, end)) });
  await Promise.all([closed(a), closed(b)]);
  server.close();
  for (const g of [got, got2]) {
    assert.equal(g.length, msgs.length);
    for (let i = 0; i < msgs.length; i++) assert.ok(g[i].equals(msgs[i]), `message ${i}`);
  }
});
