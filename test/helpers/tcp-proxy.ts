import { createServer, connect, type Server, type Socket } from 'node:net';

export type ProxyMode = 'pass' | 'blackhole' | 'refuse';

export interface TcpProxy {
  readonly port: number;
  /** pass: forward; blackhole: accept and hold without forwarding (half-open link); refuse: reset new connections. */
  setMode(mode: ProxyMode): void;
  /** Resets (RST) every open connection now. */
  resetAll(): void;
  /** Resets every connection once `bytes` more bytes have gone client → upstream (cuts mid-batch). */
  cutAfterClientBytes(bytes: number): void;
  /** Resets every connection once `bytes` more bytes have gone upstream → client. */
  cutAfterServerBytes(bytes: number): void;
  /** Holds every upstream → client chunk this long (a slow or far-away upstream); 0 is off. */
  setServerDelay(ms: number): void;
  /** Bytes forwarded so far in each direction. */
  readonly stats: { clientBytes: number; serverBytes: number; connections: number };
  close(): Promise<void>;
}

/**
 * A TCP fault proxy on loopback (Toxiproxy is not available here): tests put it between the
 * gateway and an upstream (Mosquitto, PostgreSQL) and cut, blackhole or refuse the link.
 */
export async function startTcpProxy(upstreamPort: number, upstreamHost = '127.0.0.1'): Promise<TcpProxy> {
  let mode: ProxyMode = 'pass';
  let cutClient = Infinity;
  let cutServer = Infinity;
  let serverDelayMs = 0;
  const stats = { clientBytes: 0, serverBytes: 0, connections: 0 };
  const pairs = new Set<{ client: Socket; upstream: Socket | undefined }>();

  const reset = (pair: { client: Socket; upstream: Socket | undefined }) => {
    pair.client.resetAndDestroy();
    pair.upstream?.resetAndDestroy();
    pairs.delete(pair);
  };

  const server: Server = createServer((client) => {
    client.on('error', () => {});
    if (mode === 'refuse') {
      client.resetAndDestroy();
      return;
    }
    stats.connections++;
    const pair: { client: Socket; upstream: Socket | undefined } = { client, upstream: undefined };
    pairs.add(pair);
    if (mode === 'blackhole') {
      client.on('close', () => pairs.delete(pair));
      return;
    }
    const upstream = connect({ port: upstreamPort, host: upstreamHost });
    pair.upstream = upstream;
    upstream.setNoDelay(true);
    client.setNoDelay(true);
    upstream.on('error', () => reset(pair));
    client.on('error', () => reset(pair));
    client.on('close', () => {
      upstream.destroy();
      pairs.delete(pair);
    });
    upstream.on('close', () => {
      client.destroy();
      pairs.delete(pair);
    });
    client.on('data', (chunk: Buffer) => {
      if (mode === 'blackhole') return;
      stats.clientBytes += chunk.length;
      cutClient -= chunk.length;
      if (cutClient <= 0) {
        // Forward part of the chunk, then cut: the upstream sees a truncated request.
        const keep = chunk.length + cutClient;
        cutClient = Infinity;
        if (keep > 0) upstream.write(chunk.subarray(0, keep));
        setImmediate(() => [...pairs].forEach(reset));
        return;
      }
      upstream.write(chunk);
    });
    upstream.on('data', (chunk: Buffer) => {
      if (mode === 'blackhole') return;
      stats.serverBytes += chunk.length;
      cutServer -= chunk.length;
      if (cutServer <= 0) {
        cutServer = Infinity;
        [...pairs].forEach(reset);
        return;
      }
      // Same delay for every chunk: the timers fire in order, so the stream stays in order.
      if (serverDelayMs > 0) setTimeout(() => client.write(chunk), serverDelayMs);
      else client.write(chunk);
    });
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : 0;

  return {
    port,
    stats,
    setMode(next) {
      mode = next;
      if (next !== 'pass') {
        // Existing links stop forwarding too (blackhole) or die (refuse).
        if (next === 'refuse') [...pairs].forEach(reset);
      }
    },
    resetAll() {
      [...pairs].forEach(reset);
    },
    cutAfterClientBytes(bytes) {
      cutClient = bytes;
    },
    cutAfterServerBytes(bytes) {
      cutServer = bytes;
    },
    setServerDelay(ms) {
      serverDelayMs = ms;
    },
    async close() {
      [...pairs].forEach(reset);
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
