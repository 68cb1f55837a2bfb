import type { ChildProcess } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCodes, GatewayError } from '../../../src/errors.js';
import { createCoapChannel, type DatagramTransport } from '../../../src/providers/golioth/coap-channel.js';
import { openDtlsSession } from '../../../src/providers/golioth/dtls-session.js';
import {
  freePortPair,
  spawnCoapServer,
  startCoapEndpoint,
  type CoapEndpoint,
} from '../../sims/golioth/coap-endpoint.js';

// Our CoAP layer and DTLS-PSK session against reference peers: libcoap's coap-server-openssl
// (DTLS-PSK, OpenSSL) and coap-server-notls (plain CoAP), with a UDP relay that drops datagrams.

let endpoint: CoapEndpoint;

beforeAll(async () => {
  endpoint = await startCoapEndpoint();
  await endpoint.setCredentials(
    new Map([
      ['dev-a@proj', 'secret-a'],
      ['dev-b@proj', 'secret-b'],
    ]),
  );
});

afterAll(async () => {
  await endpoint?.close();
});

async function waitFor(check: () => boolean, ms = 15_000) {
  const until = Date.now() + ms;
  while (!check()) {
    if (Date.now() > until) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('DTLS-PSK session + CoAP channel against coap-server-openssl', () => {
  it('posts JSON to /.s/<path> as each identity, and the server attributes each post to its identity', async () => {
    const sessions = await Promise.all(
      [
        ['dev-a@proj', 'secret-a'],
        ['dev-b@proj', 'secret-b'],
      ].map(([identity, psk]) =>
        openDtlsSession({
          host: '127.0.0.1',
          port: endpoint.port,
          identity: identity!,
          psk: psk!,
          handshakeTimeoutMs: 10_000,
        }),
      ),
    );
    const [a, b] = sessions.map((s) => createCoapChannel(s));
    const ra = await a!.request({
      method: 'POST',
      path: '/.s/env',
      contentFormat: 50,
      payload: Buffer.from('{"t":1}'),
    });
    const rb = await b!.request({
      method: 'POST',
      path: '/.s/env',
      contentFormat: 50,
      payload: Buffer.from('{"t":2}'),
    });
    expect(ra.code).toMatch(/^2\.0[14]$/);
    expect(rb.code).toMatch(/^2\.0[14]$/);
    await waitFor(() => endpoint.requests.length >= 2);
    const seen = endpoint.requests
      .slice(-2)
      .map((r) => [r.identity, r.method, r.path, r.contentFormat, r.payload]);
    expect(seen).toEqual([
      ['dev-a@proj', 'POST', '/.s/env', 'application/json', '{"t":1}'],
      ['dev-b@proj', 'POST', '/.s/env', 'application/json', '{"t":2}'],
    ]);
    await Promise.all(sessions.map((s) => s.close()));
  });

  it('fails the handshake of a wrong PSK with a clear PROVIDER_CONNECT error', async () => {
    const err = await openDtlsSession({
      host: '127.0.0.1',
      port: endpoint.port,
      identity: 'dev-a@proj',
      psk: 'not-the-secret',
      handshakeTimeoutMs: 3000,
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GatewayError);
    expect((err as GatewayError).code).toBe(ErrorCodes.PROVIDER_CONNECT);
    expect((err as GatewayError).message).toMatch(/dev-a@proj.*PSK/);
  });

  it('holds the 20 requests/s limit of the relay: a request over it is dropped and retransmitted, none lost', async () => {
    const session = await openDtlsSession({
      host: '127.0.0.1',
      port: endpoint.port,
      identity: 'dev-a@proj',
      psk: 'secret-a',
      handshakeTimeoutMs: 10_000,
    });
    endpoint.setRateLimit(3);
    const before = endpoint.stats.throttledDrops;
    const channel = createCoapChannel(session, { ackTimeoutMs: 300, nstart: 5 });
    const codes = await Promise.all(
      Array.from({ length: 6 }, (_, i) =>
        channel.request({
          method: 'POST',
          path: '/.s/burst',
          contentFormat: 50,
          payload: Buffer.from(`{"i":${i}}`),
        }),
      ),
    );
    endpoint.setRateLimit(20);
    expect(codes.every((c) => c.code.startsWith('2.'))).toBe(true);
    expect(endpoint.stats.throttledDrops).toBeGreaterThan(before);
    expect(channel.stats.retransmissions).toBeGreaterThan(0);
    await session.close();
  });
});

describe('CoAP channel against coap-server-notls over a lossy relay (RFC 7252 §4.2)', () => {
  let server: ChildProcess;
  let serverPort: number;

  beforeAll(async () => {
    for (let attempt = 0; ; attempt++) {
      serverPort = await freePortPair();
      const started = spawnCoapServer('coap-server-notls', serverPort, ['-d', '100']);
      server = started.child;
      started.child.stdout!.resume();
      started.child.stderr!.resume();
      try {
        await started.ready;
        break;
      } catch (err) {
        server.kill();
        if (attempt >= 4) throw err;
      }
    }
  });
  afterAll(() => {
    server?.kill();
  });

  it('retransmits a confirmable request whose datagrams are lost until it gets through', async () => {
    const socket = createSocket('udp4');
    await new Promise<void>((r) => socket.bind(0, '127.0.0.1', () => r()));
    let dropNext = 2;
    let sent = 0;
    const transport: DatagramTransport = {
      send(datagram) {
        sent++;
        if (dropNext > 0) {
          dropNext--;
          return;
        }
        socket.send(datagram, serverPort, '127.0.0.1');
      },
      onMessage(handler) {
        socket.on('message', (m) => handler(m));
      },
    };
    const channel = createCoapChannel(transport, { ackTimeoutMs: 100 });
    await channel.request({ method: 'PUT', path: '/lossy', contentFormat: 0, payload: Buffer.from('v1') });
    const got = await channel.request({ method: 'GET', path: '/lossy' });
    expect(got.code).toBe('2.05');
    expect(got.payload.toString()).toBe('v1');
    expect(sent).toBe(4);
    expect(channel.stats.retransmissions).toBe(2);
    socket.close();
  });

  it('gives up after MAX_RETRANSMIT with a retryable timeout, and fails what is queued without sending it (no reordering)', async () => {
    const sent: string[] = [];
    const transport: DatagramTransport = {
      send(datagram) {
        sent.push(datagram.subarray(-3).toString());
      },
      onMessage() {},
    };
    const channel = createCoapChannel(transport, { ackTimeoutMs: 20, maxRetransmit: 2 });
    const first = channel.request({ method: 'POST', path: '/.s/x', payload: Buffer.from('"a"') });
    const queued = channel.request({ method: 'POST', path: '/.s/y', payload: Buffer.from('"b"') });
    const err = await first.catch((e: unknown) => e);
    expect((err as GatewayError).code).toBe(ErrorCodes.PROVIDER_TIMEOUT);
    expect((err as GatewayError).retryable).toBe(true);
    await expect(queued).rejects.toMatchObject({ code: ErrorCodes.PROVIDER_TIMEOUT });
    expect(sent).toEqual(['"a"', '"a"', '"a"']);
    await expect(channel.request({ method: 'GET', path: '/z' })).rejects.toMatchObject({
      code: ErrorCodes.PROVIDER_TIMEOUT,
    });
  });
});
