import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { createBackoff } from '../../src/common/backoff.js';
import { ErrorCodes } from '../../src/errors.js';
import {
  createHttpClient,
  parseRetryAfter,
  type HttpClientOptions,
} from '../../src/providers/http-client.js';
import type { ProviderEvent } from '../../src/providers/provider.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';
import { freePort } from '../helpers/ports.js';
import { rejection } from '../helpers/rejection.js';

interface Seen {
  method: string;
  url: string;
  headers: IncomingMessage['headers'];
  body: string;
}

let cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const fn of cleanups.reverse()) await fn();
  cleanups = [];
});

/** A real HTTP server on a loopback port; `answer` is called for each request, in order. */
async function cloud(
  answer: (seen: Seen, n: number, res: ServerResponse) => void,
): Promise<{ url: string; seen: Seen[] }> {
  const seen: Seen[] = [];
  const sockets = new Set<Socket>();
  const server: Server = createServer((req, res) => {
    let body = '';
    req.on('data', (c: Buffer) => (body += c.toString()));
    req.on('end', () => {
      const s = { method: req.method!, url: req.url!, headers: req.headers, body };
      seen.push(s);
      answer(s, seen.length, res);
    });
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  cleanups.push(
    () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  );
  return { url: `http://127.0.0.1:${(server.address() as { port: number }).port}/v1`, seen };
}

const json = (res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}) => {
  res.writeHead(status, { 'content-type': 'application/json', ...headers });
  res.end(JSON.stringify(body));
};

function client(baseUrl: string, logs: LogRecord[], extra: Partial<HttpClientOptions> = {}) {
  return createHttpClient({
    baseUrl,
    logger: createCaptureLogger(logs),
    headers: () => ({ 'x-api-key': 'key-never-logged' }),
    backoff: createBackoff({ baseMs: 20, maxMs: 50 }),
    ...extra,
  });
}

describe('http client', () => {
  it('sends JSON with a request id and the API key, logs request and response with the key redacted, reports success', async () => {
    const c = await cloud((s, _n, res) =>
      json(res, 200, { data: { id: 'dev-1', echo: JSON.parse(s.body) } }),
    );
    const logs: LogRecord[] = [];
    const events: ProviderEvent[] = [];
    const http = client(c.url, logs, { requestIdHeader: 'X-Golioth-Request', report: (e) => events.push(e) });
    const res = await http.request<{ data: { id: string; echo: unknown } }>({
      method: 'PUT',
      path: '/projects/p1/devices/dev-1',
      query: { force: true, skip: undefined },
      body: { name: 'sensor' },
      operation: 'update_device',
    });
    expect(res.status).toBe(200);
    expect(res.body).toEqual({ data: { id: 'dev-1', echo: { name: 'sensor' } } });
    expect(res.attempts).toBe(1);
    expect(c.seen[0]).toMatchObject({
      method: 'PUT',
      url: '/v1/projects/p1/devices/dev-1?force=true',
      headers: {
        'x-api-key': 'key-never-logged',
        'x-golioth-request': res.requestId,
        'content-type': 'application/json',
      },
    });
    const request = logs.find((l) => l.msg === 'http_request')!;
    expect(request).toMatchObject({
      requestId: res.requestId,
      method: 'PUT',
      path: '/projects/p1/devices/dev-1',
    });
    expect((request.headers as Record<string, string>)['x-api-key']).toBe('[redacted]');
    expect(logs.find((l) => l.msg === 'http_response')).toMatchObject({
      requestId: res.requestId,
      status: 200,
    });
    expect(JSON.stringify(logs)).not.toContain('key-never-logged');
    expect(events).toEqual([
      expect.objectContaining({
        activityType: 'update_device',
        direction: 'outgoing',
        status: 'success',
        metadata: expect.objectContaining({ requestId: res.requestId, status: 200, attempts: 1 }),
      }),
    ]);
  });

  it('retries 5xx and a dropped connection with backoff, under one request id, logging each retry_attempt', async () => {
    const c = await cloud((_s, n, res) => {
      if (n === 1) json(res, 503, { code: 'UNAVAILABLE' });
      else if (n === 2) res.socket?.destroy();
      else json(res, 200, { data: 'ok' });
    });
    const logs: LogRecord[] = [];
    const res = await client(c.url, logs).request({ method: 'GET', path: '/devices' });
    expect(res).toMatchObject({ status: 200, body: { data: 'ok' }, attempts: 3 });
    expect(new Set(c.seen.map((s) => s.headers['x-request-id']))).toEqual(new Set([res.requestId]));
    const retries = logs.filter((l) => l.msg === 'retry_attempt');
    expect(retries.map((r) => [r.attempt, r.reason])).toEqual([
      [1, ErrorCodes.PROVIDER_REJECTED],
      [2, ErrorCodes.PROVIDER_CONNECT],
    ]);
  });

  it('honours Retry-After in seconds and as an HTTP date, capped', async () => {
    expect(parseRetryAfter('2', 60_000)).toBe(2000);
    expect(parseRetryAfter('3600', 5000)).toBe(5000);
    const now = Date.parse('2026-12-04T15:00:00Z');
    expect(parseRetryAfter('Fri, 04 Dec 2026 15:00:07 GMT', 60_000, now)).toBe(7000);
    expect(parseRetryAfter('Fri, 04 Dec 2026 14:59:00 GMT', 60_000, now)).toBe(0);
    expect(parseRetryAfter('soon', 60_000)).toBeUndefined();

    const c = await cloud((_s, n, res) => {
      if (n === 1) json(res, 429, {}, { 'retry-after': '1' });
      else if (n === 2) json(res, 503, {}, { 'retry-after': '3600' });
      else json(res, 200, {});
    });
    const logs: LogRecord[] = [];
    await client(c.url, logs, { maxRetryAfterMs: 300 }).request({ method: 'GET', path: '/x' });
    expect(logs.filter((l) => l.msg === 'retry_attempt').map((l) => [l.status, l.delayMs])).toEqual([
      [429, 300],
      [503, 300],
    ]);
    const c2 = await cloud((_s, n, res) =>
      n === 1 ? json(res, 429, {}, { 'retry-after': '1' }) : json(res, 200, {}),
    );
    const logs2: LogRecord[] = [];
    await client(c2.url, logs2).request({ method: 'GET', path: '/x' });
    expect(logs2.find((l) => l.msg === 'retry_attempt')).toMatchObject({ delayMs: 1000 });
  });

  it('turns a 429 that outlasts the retries into throttled with the Retry-After, never a failure', async () => {
    const c = await cloud((_s, _n, res) =>
      json(res, 429, { code: 'RESOURCE_EXHAUSTED' }, { 'retry-after': '0' }),
    );
    const events: ProviderEvent[] = [];
    const err = await rejection(
      client(c.url, [], { retries: 2, report: (e) => events.push(e) }).request({
        method: 'GET',
        path: '/stream',
      }),
    );
    expect(err.code).toBe(ErrorCodes.PROVIDER_THROTTLED);
    expect(err.retryable).toBe(true);
    expect(err.details).toMatchObject({ retryAfterMs: 0 });
    expect(c.seen).toHaveLength(3);
    expect(events[0]).toMatchObject({ status: 'failed', errorCode: ErrorCodes.PROVIDER_THROTTLED });
    // A POST is not retried unless the caller says the cloud deduplicates it.
    const post = await rejection(
      client(c.url, []).request({ method: 'POST', path: '/stream', body: { t: 1 } }),
    );
    expect(post.code).toBe(ErrorCodes.PROVIDER_THROTTLED);
    expect(c.seen).toHaveLength(4);
  });

  it('does not retry 401/403 (auth), 404 (names the path) or 400; 413 is too large', async () => {
    const statuses = [401, 403, 404, 400, 413];
    const c = await cloud((_s, n, res) => json(res, statuses[n - 1]!, { code: 'X', message: 'no' }));
    const http = client(c.url, []);
    const outcomes = [];
    for (const status of statuses) {
      const err = await rejection(http.request({ method: 'GET', path: `/projects/p1/devices/d-${status}` }));
      outcomes.push([status, err.code, err.retryable]);
      expect(err.details).toMatchObject({ status });
      if (status === 404) expect(err.message).toContain('/projects/p1/devices/d-404');
    }
    expect(outcomes).toEqual([
      [401, ErrorCodes.PROVIDER_AUTH, false],
      [403, ErrorCodes.PROVIDER_AUTH, false],
      [404, ErrorCodes.PROVIDER_REJECTED, false],
      [400, ErrorCodes.PROVIDER_REJECTED, false],
      [413, ErrorCodes.PROVIDER_TOO_LARGE, false],
    ]);
    expect(c.seen).toHaveLength(statuses.length);
    // A status the caller expects is an answer, not an error.
    const c2 = await cloud((_s, _n, res) => json(res, 404, { code: 'NOT_FOUND' }));
    expect((await client(c2.url, []).request({ method: 'GET', path: '/d', accept: [404] })).status).toBe(404);
  });

  it('times out a silent server per attempt, fails a refused connection as retryable, and honours abort', async () => {
    const c = await cloud(() => {
      // never answers
    });
    const timedOut = await rejection(
      client(c.url, [], { retries: 1, timeoutMs: 200 }).request({ method: 'GET', path: '/slow' }),
    );
    expect([timedOut.code, timedOut.retryable]).toEqual([ErrorCodes.PROVIDER_TIMEOUT, true]);
    expect(c.seen).toHaveLength(2);

    const closed = `http://127.0.0.1:${await freePort()}`;
    const refused = await rejection(
      client(closed, [], { retries: 1 }).request({ method: 'GET', path: '/x', query: { sig: 'secret-sig' } }),
    );
    expect([refused.code, refused.retryable]).toEqual([ErrorCodes.PROVIDER_CONNECT, true]);
    expect(refused.message).not.toContain('secret-sig');

    const controller = new AbortController();
    const pending = rejection(
      client(c.url, [], { timeoutMs: 60_000 }).request({
        method: 'GET',
        path: '/slow',
        signal: controller.signal,
      }),
    );
    await new Promise((r) => setTimeout(r, 50));
    controller.abort();
    expect((await pending).code).toBe(ErrorCodes.ABORTED);

    // An abort during the wait before a retry ends it too.
    const busy = await cloud((_s, _n, res) => json(res, 503, {}, { 'retry-after': '60' }));
    const waiting = new AbortController();
    const logs: LogRecord[] = [];
    const retrying = rejection(
      client(busy.url, logs).request({ method: 'GET', path: '/x', signal: waiting.signal }),
    );
    const deadline = Date.now() + 10_000;
    while (!logs.some((l) => l.msg === 'retry_attempt') && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 10));
    waiting.abort();
    expect((await retrying).code).toBe(ErrorCodes.ABORTED);
    expect(busy.seen).toHaveLength(1);
  });
});
