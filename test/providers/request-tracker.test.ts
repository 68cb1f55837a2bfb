import { randomUUID } from 'node:crypto';
import { connectAsync } from 'mqtt';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes, GatewayError } from '../../src/errors.js';
import { openMqttLink } from '../../src/providers/mqtt-link.js';
import { createRequestTracker } from '../../src/providers/request-tracker.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';
import { waitUntil } from '../helpers/raw-mqtt.js';
import { rejection } from '../helpers/rejection.js';

let cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const fn of cleanups.reverse()) await fn();
  cleanups = [];
});

/** Records what was sent, so a test answers requests the way a cloud would. */
function recorder() {
  const sent: string[] = [];
  return { sent, send: (token: string) => void sent.push(token) };
}

describe('request tracker', () => {
  it('round-trips shadow-style requests over Mosquitto, at most maxInFlight outstanding, each answer to its request', async () => {
    const prefix = `gwtest/rt-${randomUUID().slice(0, 8)}`;
    const logs: LogRecord[] = [];
    const link = await openMqttLink(
      {
        url: 'mqtt://127.0.0.1:1883',
        clientId: `rt-${randomUUID()}`,
        protocolVersion: 4,
        logger: createCaptureLogger(logs),
      },
      new AbortController().signal,
    );
    cleanups.push(() => link.close());
    // The "cloud": holds the requests until none came for 100 ms (so it sees every request the
    // tracker lets out at once), then answers them in reverse order, echoing the token.
    const cloud = await connectAsync('mqtt://127.0.0.1:1883', {
      clientId: `cloud-${randomUUID()}`,
      reconnectPeriod: 0,
    });
    cleanups.push(() => cloud.endAsync(true));
    let maxHeld = 0;
    const held: { token: string; body: string }[] = [];
    const answers: Promise<unknown>[] = [];
    let quiet: NodeJS.Timeout | undefined;
    const answerAll = () => {
      for (const h of held.splice(0).reverse()) {
        answers.push(
          cloud.publishAsync(
            `${prefix}/res/${h.token}`,
            JSON.stringify({ clientToken: h.token, echo: h.body }),
            { qos: 1 },
          ),
        );
      }
    };
    cloud.on('message', (topic, payload) => {
      held.push({ token: topic.split('/').pop()!, body: payload.toString() });
      maxHeld = Math.max(maxHeld, held.length);
      clearTimeout(quiet);
      quiet = setTimeout(answerAll, 100);
    });
    await cloud.subscribeAsync(`${prefix}/req/+`, { qos: 1 });

    const tracker = createRequestTracker<{ clientToken: string; echo: string }>({
      maxInFlight: 3,
      timeoutMs: 20_000,
    });
    link.onMessage((topic, payload) => {
      const body = JSON.parse(payload.toString()) as { clientToken: string; echo: string };
      tracker.settle(body.clientToken, body);
    });
    expect(await link.subscribe({ [`${prefix}/res/+`]: { qos: 1 } })).toEqual({ refused: [] });

    const results = await Promise.all(
      Array.from({ length: 12 }, (_, i) =>
        tracker.request((token) => link.publish(`${prefix}/req/${token}`, `body-${i}`, { qos: 1 })),
      ),
    );
    expect(results.map((r) => r.echo)).toEqual(Array.from({ length: 12 }, (_, i) => `body-${i}`));
    expect(maxHeld).toBeLessThanOrEqual(3);
    expect(maxHeld).toBeGreaterThan(1);
    await Promise.all(answers);
    expect(tracker.stats).toEqual({ inFlight: 0, queued: 0, ignored: 0, timedOut: 0 });
  });

  it('queues beyond maxInFlight and sends the next one as soon as a response frees a slot', async () => {
    const r = recorder();
    const tracker = createRequestTracker<string>({
      maxInFlight: 10,
      token: (() => {
        let n = 0;
        return () => `t${++n}`;
      })(),
    });
    const pending = Array.from({ length: 12 }, () => tracker.request(r.send));
    expect(r.sent).toHaveLength(10);
    expect(tracker.stats).toMatchObject({ inFlight: 10, queued: 2 });
    expect(tracker.settle('t4', 'four')).toBe(true);
    expect(await pending[3]).toBe('four');
    expect(r.sent).toEqual([...Array.from({ length: 10 }, (_, i) => `t${i + 1}`), 't11']);
    for (const token of r.sent.filter((t) => t !== 't4')) tracker.settle(token, token);
    expect(r.sent).toHaveLength(12);
    tracker.settle('t12', 't12');
    expect(await Promise.all(pending)).toEqual([
      't1',
      't2',
      't3',
      'four',
      ...Array.from({ length: 8 }, (_, i) => `t${i + 5}`),
    ]);
  });

  it('times a request out, then ignores and counts its late response and responses nobody asked for', async () => {
    const r = recorder();
    const tracker = createRequestTracker<string>({ timeoutMs: 100, name: 'shadow' });
    const err = await rejection(tracker.request(r.send));
    expect([err.code, err.retryable]).toEqual([ErrorCodes.PROVIDER_TIMEOUT, true]);
    expect(err.message).toMatch(/no shadow response within 100 ms/);
    expect(tracker.settle(r.sent[0]!, 'late')).toBe(false);
    expect(tracker.settle('never-sent', 'stray')).toBe(false);
    expect(tracker.stats).toEqual({ inFlight: 0, queued: 0, ignored: 2, timedOut: 1 });
  });

  it('honours an abort while queued and while in flight; the freed slot goes to the next request', async () => {
    const r = recorder();
    const tracker = createRequestTracker<string>({ maxInFlight: 1 });
    const first = new AbortController();
    const second = new AbortController();
    const a = tracker.request(r.send, { signal: first.signal });
    const b = tracker.request(r.send, { signal: second.signal });
    const c = tracker.request(r.send);
    second.abort();
    expect((await rejection(b)).code).toBe(ErrorCodes.ABORTED);
    expect(r.sent).toHaveLength(1);
    first.abort();
    expect((await rejection(a)).code).toBe(ErrorCodes.ABORTED);
    expect(r.sent).toHaveLength(2);
    tracker.settle(r.sent[1]!, 'c');
    expect(await c).toBe('c');
    const already = new AbortController();
    already.abort();
    expect((await rejection(tracker.request(r.send, { signal: already.signal }))).code).toBe(
      ErrorCodes.ABORTED,
    );
    expect(r.sent).toHaveLength(2);
  });

  it('rejects everything in flight and queued exactly once when the link is lost', async () => {
    const r = recorder();
    const tracker = createRequestTracker<string>({ maxInFlight: 2 });
    const outcomes: string[] = [];
    const all = Array.from({ length: 4 }, (_, i) =>
      tracker.request(r.send).then(
        () => outcomes.push(`resolved ${i}`),
        (e: GatewayError) => outcomes.push(`${e.code} ${i}`),
      ),
    );
    const lost = new GatewayError(ErrorCodes.PROVIDER_NOT_CONNECTED, 'the connection was lost', {
      retryable: true,
    });
    tracker.rejectAll(lost);
    tracker.rejectAll(lost);
    expect(tracker.settle(r.sent[0]!, 'too late')).toBe(false);
    await Promise.all(all);
    expect(outcomes.sort()).toEqual([0, 1, 2, 3].map((i) => `${ErrorCodes.PROVIDER_NOT_CONNECTED} ${i}`));
    expect(r.sent).toHaveLength(2);
    expect(tracker.stats).toMatchObject({ inFlight: 0, queued: 0 });
  });

  it('takes a response that overtakes its own publish, and a failed publish frees its slot with the publish error', async () => {
    const tracker = createRequestTracker<string>({ maxInFlight: 1 });
    let releasePublish: () => void = () => {};
    const early = tracker.request(
      (token) =>
        new Promise<void>((resolve) => {
          // The broker delivers the answer before our PUBACK.
          tracker.settle(token, 'accepted');
          releasePublish = resolve;
        }),
    );
    expect(await early).toBe('accepted');
    releasePublish();

    const refused = new GatewayError(ErrorCodes.PROVIDER_REJECTED, 'not authorised', { retryable: false });
    const failing = tracker.request(() => Promise.reject(refused));
    const r = recorder();
    const next = tracker.request(r.send);
    expect(await rejection(failing)).toBe(refused);
    await waitUntil(() => r.sent.length === 1);
    tracker.fail(
      r.sent[0]!,
      new GatewayError(ErrorCodes.PROVIDER_REJECTED, 'version conflict', { retryable: true }),
    );
    expect((await rejection(next)).message).toBe('version conflict');
  });

  it('refuses as throttled once the queue is full', async () => {
    const r = recorder();
    const tracker = createRequestTracker<string>({ maxInFlight: 1, maxQueued: 1, timeoutMs: 60_000 });
    const a = tracker.request(r.send);
    const b = tracker.request(r.send);
    const c = await rejection(tracker.request(r.send));
    expect(c.code).toBe(ErrorCodes.PROVIDER_THROTTLED);
    expect(c.retryable).toBe(true);
    tracker.rejectAll(new GatewayError(ErrorCodes.PROVIDER_CLOSED, 'closed', { retryable: true }));
    await Promise.allSettled([a, b]);
  });
});
