import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createBackoff } from '../../../src/common/backoff.js';
import { createQuotaLimiter } from '../../../src/common/quota-limiter.js';
import { createRateLimiter } from '../../../src/common/rate-limiter.js';
import {
  createConnectionSupervisor,
  type ConnectionSupervisor,
} from '../../../src/gateway/delivery/connection-supervisor.js';
import { createForwarder, type Forwarder } from '../../../src/gateway/delivery/forwarder.js';
import type { Logger } from '../../../src/logger.js';
import { createActivityLog, type ActivityLog } from '../../../src/store/activity-log.js';
import { openStore, type Store } from '../../../src/store/database.js';
import { createOutbox } from '../../../src/store/outbox.js';
import type { Outbox, QueueLimits } from '../../../src/store/outbox-types.js';
import { createCaptureLogger, type LogRecord } from '../../helpers/capture-logger.js';
import { createFakeCloud, type FakeCloud, type FakeCloudOptions } from '../../providers/fake-provider.js';

/**
 * The forwarder's logic against the in-memory fake cloud (test/providers/fake-provider.ts): real
 * SQLite queue, real supervisor, no broker. forwarder-mqtt.test.ts keeps the end-to-end cases
 * through the MQTT provider and Mosquitto.
 */

const roomy: QueueLimits = {
  maxMessages: 1_000_000,
  maxBytes: 512 * 1024 * 1024,
  onFull: 'drop-oldest',
  ttlMs: 0,
};

interface Harness {
  dir: string;
  store: Store;
  activity: ActivityLog;
  outbox: Outbox;
  logger: Logger;
  logs: LogRecord[];
  integrationId: string;
  cleanups: (() => Promise<void> | void)[];
}

let h: Harness;

function setUp(): Harness {
  const dir = mkdtempSync(join(tmpdir(), 'gw-fwd-'));
  const logs: LogRecord[] = [];
  const logger = createCaptureLogger(logs);
  const store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
  const activity = createActivityLog({ db: store.db, gatewayId: 'gw-test', logger });
  const outbox = createOutbox({ db: store.db, logger, activity });
  return { dir, store, activity, outbox, logger, logs, integrationId: randomUUID(), cleanups: [] };
}

interface Pipeline {
  cloud: FakeCloud;
  supervisor: ConnectionSupervisor;
  forwarder: Forwarder;
}

function pipeline(
  options: {
    cloud?: FakeCloudOptions;
    queue?: { rate?: number; inflight?: number; maxAttempts?: number };
    down?: boolean;
  } = {},
): Pipeline {
  const cloud = createFakeCloud(options.cloud);
  if (options.down) cloud.refuseConnects();
  return pipelineOn(cloud, options.queue ?? {});
}

async function enqueue(deviceId: string, seq: number, options: { payload?: Buffer; topic?: string } = {}) {
  await h.outbox.enqueue(
    {
      deviceId,
      topic: options.topic ?? `devices/${deviceId}/telemetry`,
      payload: options.payload ?? Buffer.from(`${deviceId}:${seq}`),
      qos: 1,
      retain: false,
    },
    [{ integrationId: h.integrationId, limits: roomy }],
  );
}

async function until(check: () => boolean, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 10));
  }
}

const depth = () => h.outbox.stats(h.integrationId).depth;
const texts = (cloud: FakeCloud) => cloud.published.map((m) => m.payload.toString());
const distinct = (cloud: FakeCloud) => new Set(texts(cloud)).size;
const deadLetters = () => h.outbox.stats(h.integrationId).deadLetters;
const failureRows = () =>
  h.activity
    .list({ integrationId: h.integrationId, limit: 1000 })
    .filter((r) => r.status === 'failed' || r.status === 'error');

/** Per device: the first arrival of each seq must come in increasing order. */
function assertPerDeviceOrder(got: string[]): void {
  const seen = new Set<string>();
  const last = new Map<string, number>();
  for (const item of got) {
    if (seen.has(item)) continue;
    seen.add(item);
    const [device, seqText] = item.split(':') as [string, string];
    const seq = Number(seqText);
    expect(seq, `${device} out of order`).toBeGreaterThan(last.get(device) ?? -1);
    last.set(device, seq);
  }
}

/**
 * A quota of `n` per second kept and saturated, as the cloud saw it: the arrival times are taken
 * a few calls after the limiter's, so a GC pause in between may shift one by a little.
 */
function expectQuota(times: readonly number[], n: number): void {
  expect(busiestWindow(times, 1000 - 20)).toBeLessThanOrEqual(n);
  expect(busiestWindow(times, 1000)).toBeGreaterThanOrEqual(n);
}

/** The most arrivals within any `windowMs` (half-open) among these times. */
function busiestWindow(times: readonly number[], windowMs = 1000): number {
  let most = 0;
  for (let i = 0, j = 0; i < times.length; i++) {
    while (times[i]! - times[j]! >= windowMs) j++;
    most = Math.max(most, i - j + 1);
  }
  return most;
}

afterEach(async () => {
  for (const fn of h.cleanups.reverse()) await fn();
  await h.outbox.close();
  h.store.close();
  rmSync(h.dir, { recursive: true, force: true });
});

describe('rate limiters', () => {
  it('token bucket: spends a burst of one second, then paces; 0 is unlimited', () => {
    h = setUp();
    let t = 0;
    const limiter = createRateLimiter({ rate: 10, now: () => t });
    const waits = Array.from({ length: 11 }, () => limiter.take());
    expect(waits.slice(0, 10)).toEqual(Array(10).fill(0));
    expect(waits[10]).toBe(100);
    expect(limiter.peek()).toBe(100);
    t += 100;
    expect(limiter.peek()).toBe(0);
    expect(limiter.take()).toBe(0);
    expect(limiter.take()).toBe(100);

    const slow = createRateLimiter({ rate: 0.5, now: () => t });
    expect(slow.take()).toBe(0);
    expect(slow.take()).toBe(2000);

    const unlimited = createRateLimiter({ rate: 0, now: () => t });
    for (let i = 0; i < 1000; i++) expect(unlimited.take()).toBe(0);
    unlimited.setRate(1);
    expect(unlimited.take()).toBe(0);
    expect(unlimited.take()).toBe(1000);
  });

  it('quota: never more than the rate in any second, and the full rate when there is work', () => {
    h = setUp();
    let t = 0;
    const quota = createQuotaLimiter({ rate: 10, now: () => t });
    const taken: number[] = [];
    // Try every 7 ms for 5 s of simulated time.
    for (; t < 5000; t += 7) if (quota.take() === 0) taken.push(t);
    expect(busiestWindow(taken)).toBe(10);
    expect(taken.length).toBeGreaterThanOrEqual(49);

    // Reading the same rate again (a reconnect) keeps the history; a new rate starts afresh.
    const two = createQuotaLimiter({ rate: 2, now: () => t });
    expect([two.take(), two.take()]).toEqual([0, 0]);
    two.setRate(2);
    expect(two.take()).toBe(1000);
    two.setRate(3);
    expect(two.take()).toBe(0);

    const half = createQuotaLimiter({ rate: 0.5, now: () => t });
    expect(half.take()).toBe(0);
    expect(half.take()).toBe(2000);
    const none = createQuotaLimiter({ rate: 0, now: () => t });
    for (let i = 0; i < 100; i++) expect(none.take()).toBe(0);
  });
});

describe('forwarder (fake cloud)', () => {
  it('drains 2,000 queued rows in order with the cloud down then up, losing nothing', async () => {
    h = setUp();
    const { cloud, supervisor, forwarder } = pipeline({ down: true });
    for (let i = 0; i < 2000; i++) void enqueue(`d${i % 5}`, i);
    await h.outbox.flush();
    expect(depth()).toBe(2000);
    await until(() => supervisor.lastError !== null);
    expect(forwarder.delivered).toBe(0);

    cloud.acceptConnects();
    // Drop the link once mid-drain: in-flight rows are resent after the reconnect.
    await until(() => forwarder.delivered >= 600);
    cloud.dropLink();
    await until(() => depth() === 0, 30_000);
    expect(distinct(cloud)).toBe(2000);
    expect(cloud.published.length - 2000).toBeLessThanOrEqual(100);
    assertPerDeviceOrder(texts(cloud));
    expect(supervisor.reconnects).toBeGreaterThanOrEqual(1);

    await forwarder.stop();
    const deliver = h.activity.list({
      integrationId: h.integrationId,
      activityType: 'deliver',
      status: 'success',
    });
    expect(deliver.reduce((n, r) => n + (r.metadata.count as number), 0)).toBe(forwarder.delivered);
  });

  it('interleaves live traffic with a backlog instead of queueing it behind', async () => {
    h = setUp();
    const { cloud, supervisor } = pipeline({ down: true, queue: { rate: 200 } });
    for (let i = 0; i < 800; i++) void enqueue('old', i);
    // A device with a short backlog that keeps publishing: its order must hold across the watermark.
    for (let i = 0; i < 3; i++) void enqueue('mixed', i);
    await h.outbox.flush();
    cloud.acceptConnects();
    await until(() => supervisor.state === 'connected');
    for (let i = 0; i < 20; i++) {
      await enqueue('live', i);
      await enqueue('mixed', 3 + i);
      await new Promise((r) => setTimeout(r, 25));
    }
    await until(() => depth() === 0, 30_000);
    const got = texts(cloud);
    assertPerDeviceOrder(got);
    expect(new Set(got).size).toBe(843);
    // At 200/s the backlog takes about four seconds; live rows arrive while it drains.
    expect(got.indexOf('live:0')).toBeLessThan(got.lastIndexOf('old:799'));
  });

  it('dead-letters a row too large for the cloud and delivers the rows behind it', async () => {
    h = setUp();
    await enqueue('p', 0);
    await enqueue('p', 1, { payload: Buffer.alloc(2048, 0x41) });
    await enqueue('p', 2);
    await enqueue('p', 3);
    const { cloud } = pipeline({ cloud: { maxPayloadBytes: 1024 } });
    await until(() => depth() === 0);
    expect(texts(cloud)).toEqual(['p:0', 'p:2', 'p:3']);
    const dead = h.store.db
      .prepare('SELECT topic, error_code AS code, attempts FROM dead_letters WHERE integration_id = ?')
      .all(h.integrationId);
    expect(dead).toEqual([{ topic: 'devices/p/telemetry', code: 'GW_ERR_PROVIDER_TOO_LARGE', attempts: 1 }]);
  });

  it('dead-letters a row that used up maxAttempts on retryable failures', async () => {
    h = setUp();
    await enqueue('r', 0);
    await enqueue('r', 1);
    const [first] = h.outbox.read(h.integrationId, 0, 1);
    for (let i = 0; i < 3; i++) h.outbox.markAttempt(h.integrationId, [first!.id]);
    const { cloud } = pipeline({ queue: { maxAttempts: 3 } });
    await until(() => depth() === 0);
    expect(texts(cloud)).toEqual(['r:1']);
    expect(deadLetters()).toBe(1);
  });

  it('R6: a cloud that drops the link on one message gets it dead-lettered after maxAttempts', async () => {
    h = setUp();
    await enqueue('ok', 0);
    await enqueue('forbidden', 0);
    for (let i = 1; i < 5; i++) await enqueue('ok', i);
    const cloud = createFakeCloud();
    cloud.dropLinkOn((m) => m.deviceId === 'forbidden');
    h.cleanups.push(() => cloud.dropLinkOn(undefined));
    const { cloud: used } = pipelineOn(cloud, { maxAttempts: 3 });
    await until(() => depth() === 0, 30_000);
    expect(deadLetters()).toBe(1);
    const letter = h.store.db
      .prepare('SELECT topic, attempts FROM dead_letters WHERE integration_id = ?')
      .get(h.integrationId);
    expect(letter).toEqual({ topic: 'devices/forbidden/telemetry', attempts: 3 });
    expect(h.logs.some((l) => l.msg === 'deliver_probing')).toBe(true);
    expect([...new Set(texts(used))].sort()).toEqual(['ok:0', 'ok:1', 'ok:2', 'ok:3', 'ok:4']);
    expect(used.connects).toBeLessThanOrEqual(3 + 3);
  });

  it('R5: a slow cloud keeps the in-flight window bounded and sends nothing twice', async () => {
    h = setUp();
    const { cloud, supervisor } = pipeline({ queue: { inflight: 50 } });
    cloud.setAckDelay(30);
    await until(() => supervisor.state === 'connected');
    for (let i = 0; i < 600; i++) void enqueue('slow', i);
    await h.outbox.flush();
    await until(() => depth() === 0, 60_000);
    expect(cloud.peakInflight).toBeGreaterThan(1);
    expect(cloud.peakInflight).toBeLessThanOrEqual(50);
    expect(texts(cloud)).toHaveLength(600);
    assertPerDeviceOrder(texts(cloud));
  });

  it('stop() leaves unacknowledged rows queued', async () => {
    h = setUp();
    const { cloud, forwarder, supervisor } = pipelineOn(createFakeCloud(), {}, 200);
    await until(() => supervisor.state === 'connected');
    cloud.holdAcks();
    for (let i = 0; i < 10; i++) await enqueue('s', i);
    await until(() => cloud.received.length === 10);
    await forwarder.stop();
    await supervisor.stop();
    cloud.releaseAcks();
    expect(depth()).toBe(10);
    expect(forwarder.delivered).toBe(0);
  });

  it('a throttled burst waits and counts nothing: 0 dead letters, attempts unchanged, no failure rows', async () => {
    h = setUp();
    for (let i = 0; i < 300; i++) void enqueue(`t${i % 3}`, i);
    await h.outbox.flush();
    const cloud = createFakeCloud();
    // 120 refusals in a row, 50 ms each: with maxAttempts 1, one counted attempt dead-letters.
    cloud.throttleNext(120, 50);
    const { forwarder } = pipelineOn(cloud, { maxAttempts: 1 });
    await until(() => depth() === 0, 60_000);
    expect(cloud.throttledCount).toBe(120);
    expect(forwarder.throttled).toBe(120);
    expect(deadLetters()).toBe(0);
    expect(distinct(cloud)).toBe(300);
    assertPerDeviceOrder(texts(cloud));
    expect(failureRows()).toEqual([]);
    expect(h.logs.some((l) => l.msg === 'deliver_throttled')).toBe(true);
  });

  it('a throttle of one device parks only that device', async () => {
    h = setUp();
    const cloud = createFakeCloud();
    // More refusals than the device has rows in flight: each cautious retry is refused alone.
    cloud.throttleNext(70, 100, 'hot');
    const { forwarder } = pipelineOn(cloud, { maxAttempts: 1 });
    for (let i = 0; i < 50; i++) {
      void enqueue('hot', i);
      void enqueue('cool', i);
    }
    await h.outbox.flush();
    await until(() => depth() === 0, 60_000);
    expect(cloud.throttledCount).toBe(70);
    expect(deadLetters()).toBe(0);
    expect(distinct(cloud)).toBe(100);
    assertPerDeviceOrder(texts(cloud));
    // The cool device did not wait for the hot one.
    const got = texts(cloud);
    expect(got.indexOf('cool:49')).toBeLessThan(got.indexOf('hot:49'));
    expect(forwarder.parkedDevices()).toEqual([]);
    expect(failureRows()).toEqual([]);
  });

  it("one device's cloud link failing parks its rows while nine devices flow", async () => {
    h = setUp();
    const cloud = createFakeCloud();
    cloud.failDevice('d0', 100);
    const { forwarder } = pipelineOn(cloud, { maxAttempts: 1 });
    for (let i = 0; i < 50; i++) for (let d = 0; d < 10; d++) void enqueue(`d${d}`, i);
    await h.outbox.flush();
    await until(() => texts(cloud).filter((t) => !t.startsWith('d0:')).length >= 450);
    await until(() => depth() === 50);
    expect(texts(cloud).filter((t) => t.startsWith('d0:'))).toEqual([]);
    expect(forwarder.parkedDevices().map((p) => p.deviceId)).toEqual(['d0']);

    cloud.restoreDevice('d0');
    await until(() => depth() === 0, 30_000);
    expect(distinct(cloud)).toBe(500);
    assertPerDeviceOrder(texts(cloud));
    expect(deadLetters()).toBe(0);
    // The failing device link is one activity row, however often it was retried.
    const parkedRows = failureRows();
    expect(parkedRows.map((r) => [r.activityType, r.errorCode, r.metadata.deviceId])).toEqual([
      ['device_parked', 'GW_ERR_PROVIDER_DEVICE_UNAVAILABLE', 'd0'],
    ]);
    expect(cloud.deviceFailures).toBeGreaterThanOrEqual(2);
    await until(() => forwarder.parkedDevices().length === 0);
  });

  it('many flapping devices cost a few rewinds a second, not one per unpark', async () => {
    h = setUp();
    const cloud = createFakeCloud();
    const flapping = Array.from({ length: 20 }, (_, i) => `f${i}`);
    for (const id of flapping) cloud.failDevice(id, 5);
    // From before the pipeline starts, so every rewind falls inside the measured span.
    const started = Date.now();
    pipelineOn(cloud, { maxAttempts: 1 });
    for (let i = 0; i < 10; i++) for (const id of [...flapping, 'steady']) void enqueue(id, i);
    await h.outbox.flush();
    await until(() => cloud.deviceFailures >= 400);
    const rewinds = () => h.logs.filter((l) => l.msg === 'backlog_drain_started').length;
    // At most one rewind per 200 ms (plus the first epoch and one a timer may add while this
    // line runs), whatever the 5 ms parks would ask for: unspaced, it was one per unpark.
    expect(rewinds()).toBeLessThanOrEqual(3 + (Date.now() - started) / 200);
    for (const id of flapping) cloud.restoreDevice(id);
    await until(() => depth() === 0, 30_000);
    expect(distinct(cloud)).toBe(210);
    expect(deadLetters()).toBe(0);
    assertPerDeviceOrder(texts(cloud));
  });

  it("honours the provider's per-connection publish rate: saturated, never exceeded", async () => {
    h = setUp();
    for (let i = 0; i < 130; i++) void enqueue(`r${i % 4}`, i);
    await h.outbox.flush();
    // The config allows 500/s; the cloud's 50/s is the lower and wins.
    const { cloud } = pipeline({
      cloud: { limits: { maxPublishRate: { perSecond: 50, scope: 'connection' } } },
      queue: { rate: 500 },
    });
    await until(() => depth() === 0, 30_000);
    expectQuota(cloud.receivedAt, 50);
    expect(cloud.received).toHaveLength(130);
  });

  it("honours the provider's per-device publish rate without holding other devices back", async () => {
    h = setUp();
    for (let i = 0; i < 45; i++) void enqueue('busy', i);
    await h.outbox.flush();
    const { cloud } = pipeline({
      cloud: { limits: { maxPublishRate: { perSecond: 20, scope: 'device' } } },
    });
    await until(() => cloud.received.length >= 20);
    for (let i = 0; i < 10; i++) void enqueue('quiet', i);
    await until(() => depth() === 0, 30_000);
    const times = (device: string) =>
      cloud.received.flatMap((m, i) => (m.deviceId === device ? [cloud.receivedAt[i]!] : []));
    expectQuota(times('busy'), 20);
    expect(busiestWindow(times('quiet'))).toBe(10);
    assertPerDeviceOrder(texts(cloud));
    // The quiet device's rows went out while the busy one still waited for its quota.
    const got = cloud.received.map((m) => m.payload.toString());
    expect(got.indexOf('quiet:9')).toBeLessThan(got.indexOf('busy:44'));
  });

  it('refills a full window a quarter at a time, so the publishes freed by one read leave in one write', async () => {
    h = setUp();
    // No poll: only acknowledgements and enqueues wake the forwarder here.
    const cloud = createFakeCloud();
    const { supervisor, forwarder } = pipelineOn(cloud, { inflight: 8 }, undefined, 3_600_000);
    await until(() => supervisor.state === 'connected');
    cloud.holdAcks();
    for (let i = 0; i < 40; i++) void enqueue('w', i);
    await h.outbox.flush();
    await until(() => forwarder.inflight === 8);
    const turns = () => new Promise<void>((r) => setTimeout(r, 20));
    for (let k = 1; k <= 8; k++) {
      cloud.releaseAcks(1);
      await until(() => forwarder.delivered === k);
      await turns();
      // One free slot waits for a second; two (a quarter of 8) are filled together.
      expect(forwarder.inflight).toBe(k % 2 === 1 ? 7 : 8);
      expect(cloud.received.length).toBe(8 + 2 * Math.floor(k / 2));
    }
    cloud.releaseAcks();
    await until(() => depth() === 0);
    expect(distinct(cloud)).toBe(40);
    assertPerDeviceOrder(texts(cloud));
  });

  it("sends a command response at once, not behind its device's telemetry backlog", async () => {
    h = setUp();
    for (let i = 0; i < 400; i++) void enqueue('x', i);
    await h.outbox.flush();
    const { cloud, forwarder } = pipeline({ down: true, queue: { inflight: 4 } });
    cloud.setAckDelay(5);
    cloud.acceptConnects();
    await until(() => forwarder.delivered >= 20);
    await enqueue('x', 400, {
      topic: 'devices/x/commands/reboot/response',
      payload: Buffer.from('x:response'),
    });
    await until(() => depth() === 0, 60_000);
    const got = texts(cloud);
    expect(got.indexOf('x:response')).toBeGreaterThanOrEqual(0);
    expect(got.indexOf('x:response')).toBeLessThan(got.indexOf('x:399'));
    assertPerDeviceOrder(got.filter((t) => t !== 'x:response'));
  });

  for (const settle of ['fail', 'ack'] as const) {
    it(`a planned reconnect (in-flight ${settle === 'ack' ? 'acknowledged' : 'failed back'}) loses nothing and counts nothing`, async () => {
      h = setUp();
      const { cloud, supervisor, forwarder } = pipeline({ queue: { maxAttempts: 1 } });
      await until(() => supervisor.state === 'connected');
      cloud.holdAcks();
      for (let i = 0; i < 30; i++) void enqueue('p', i);
      await h.outbox.flush();
      await until(() => forwarder.inflight === 30);
      cloud.plannedReconnect(settle);
      cloud.releaseAcks();
      for (let i = 30; i < 40; i++) void enqueue('p', i);
      await h.outbox.flush();
      await until(() => depth() === 0, 30_000);
      expect(distinct(cloud)).toBe(40);
      assertPerDeviceOrder(texts(cloud));
      expect(deadLetters()).toBe(0);
      expect(supervisor.reconnects).toBe(1);
      expect(failureRows()).toEqual([]);
    });
  }
});

/** A pipeline on a cloud the test prepared first. */
function pipelineOn(
  cloud: FakeCloud,
  queue: { rate?: number; inflight?: number; maxAttempts?: number },
  stopTimeoutMs?: number,
  pollMs?: number,
): Pipeline {
  const logger = h.logger.child({ integrationId: h.integrationId });
  const provider = cloud.factory(undefined as never);
  const supervisor = createConnectionSupervisor({
    provider,
    logger,
    activity: h.activity,
    integrationId: h.integrationId,
    backoff: createBackoff({ baseMs: 50, maxMs: 400 }),
  });
  const forwarder = createForwarder({
    outbox: h.outbox,
    provider,
    supervisor,
    integrationId: h.integrationId,
    logger,
    activity: h.activity,
    queue: { rate: 0, inflight: 100, maxAttempts: 10, ...queue },
    ...(stopTimeoutMs === undefined ? {} : { stopTimeoutMs }),
    ...(pollMs === undefined ? {} : { pollMs }),
  });
  const unsubscribe = h.outbox.onEnqueue((ids) => {
    if (ids.has(h.integrationId)) forwarder.wake();
  });
  h.cleanups.push(async () => {
    unsubscribe();
    await forwarder.stop();
    await supervisor.stop();
  });
  supervisor.start();
  forwarder.start();
  return { cloud, supervisor, forwarder };
}
