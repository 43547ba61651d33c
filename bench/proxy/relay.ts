/**
 * The floor of a Node proxy hop: a TCP relay that copies bytes both ways,
 * one upstream connection per client, with no parsing, no pooling and no
 * routing. The benchmark measures it (and two of them chained, the shape of
 * gateway + pooler) beside the real proxies, so what our code costs can be
 * told apart from what a Node process hop costs on the same machine.
 *
 *   node --import tsx bench/proxy/relay.ts <listenPort> <upstreamPort>
 */
import net from 'node:net';

const [listenPort, upstreamPort] = process.argv.slice(2).map(Number);
if (!listenPort || !upstreamPort) {
  console.error('usage: bench/proxy/relay.ts <listenPort> <upstreamPort>');
  process.exit(2);
}

net.createServer({ noDelay: true }, (client) => {
  const server = net.connect({ host: '127.0.0.1', port: upstreamPort, noDelay: true });
  client.on('data', (chunk) => server.write(chunk));
  server.on('data', (chunk) => client.write(chunk));
  client.on('close', () => server.destroy());
  server.on('close', () => client.destroy());
  client.on('error', () => server.destroy());
  server.on('error', () => client.destroy());
}).listen(listenPort, '127.0.0.1');
