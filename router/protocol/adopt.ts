/**
 * Accepted sockets cannot take `onread`: net.Server makes their net.Socket itself, with
 * 'data' events (Node 20 and 22 alike; `onread` is an option of net.connect and of
 * new net.Socket). What Node does offer is `new net.Socket({ handle, onread })`: a socket
 * made around an existing TCP handle, which is what net.Server does too. adoptOwnReads
 * moves an accepted socket's handle to such a socket once the startup phase is over.
 */
import net from 'node:net';
import tls from 'node:tls';
import { ownReads } from './output.ts';

/** What net.Socket keeps of its handle: private fields, the same in Node 20 and 22. */
interface SocketInternals {
  _handle: { readStop?: () => number; reading?: boolean } | null;
  _server: net.Server | null;
  server: net.Server | null;
}

/**
 * A socket on `old`'s connection that reads into the process's reused read buffer and hands
 * each read to `feed` (see output.ts ownReads), plus the bytes `old` had read and not yet
 * delivered; `old` is left without a handle and without listeners. Null, with `old` untouched,
 * when the move is not safe: a TLS socket (its reads are decrypted by Node), a socket still
 * writing (a write queued in `old` would be overtaken), one that ended or is gone.
 */
export function adoptOwnReads(old: net.Socket, feed: (buf: Buffer, end: number) => void): { socket: net.Socket; unread: Buffer[] } | null {
  const o = old as unknown as SocketInternals;
  const handle = o._handle;
  if (!handle || typeof handle.readStop !== 'function' || old instanceof tls.TLSSocket || old.destroyed || old.connecting
    || old.writableLength > 0 || old.readableEnded || (old as unknown as { _readableState: { ended: boolean } })._readableState.ended) {
    return null;
  }
  handle.readStop();
  handle.reading = false;
  o._handle = null;
  const unread: Buffer[] = [];
  for (let c = old.read() as Buffer | null; c !== null; c = old.read() as Buffer | null) unread.push(c);
  const socket = new net.Socket({ handle, onread: ownReads(feed), allowHalfOpen: old.allowHalfOpen, readable: true, writable: true } as net.SocketConstructorOpts);
  const s = socket as unknown as SocketInternals;
  // The server counts the connection until the socket that holds it closes (server.close waits for it).
  s._server = o._server;
  s.server = o.server;
  o._server = null;
  o.server = null;
  old.removeAllListeners();
  old.on('error', () => undefined);
  old.destroy(); // without a handle: closes nothing, only retires the object
  return { socket, unread };
}
