import { Aedes } from 'aedes';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { configSchema } from '../../../src/config/schema.js';
import { createBackoff } from '../../../src/common/backoff.js';
import {
  createConnectionSupervisor,
  type ConnectionSupervisor,
  type SupervisorState,
} from '../../../src/gateway/delivery/connection-supervisor.js';
import { createMqttProvider } from '../../../src/providers/mqtt/mqtt-provider.js';
import { createActivityLog, type ActivityLog } from '../../../src/store/activity-log.js';
import { openStore, type Store } from '../../../src/store/database.js';
import { createCaptureLogger, type LogRecord } from '../../helpers/capture-logger.js';
import { createFakeCloud, type FakeCloudOptions } from '../../providers/fake-provider.js';
import { startTcpProxy } from '../../helpers/tcp-proxy.js';

interface Harness {
  dir: string;
  store: Store;
  activity: ActivityLog;
  logs: LogRecord[];
  cleanups: (() => Promise<void> | void)[];
  integrationId: string;
}

let h: Harness;

function setUp(): Harness {
  const dir = mkdtempSync(join(tmpdir(), 'gw-sup-'));
  const logs: LogRecord[] = [];
  const logger = createCaptureLogger(logs);
  const store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
  const activity = createActivityLog({ db: store.db, gatewayId: 'gw-test', logger });
  return { dir, store, activity, logs, cleanups: [], integrationId: randomUUID() };
}

afterEach(async () => {
  for (const fn of h.cleanups.reverse()) await fn();
  h.store.close();
  rmSync(h.dir, { recursive: true, force: true });
});

function supervise(
  url: string,
  options: {
    baseMs?: number;
    maxMs?: number;
    stableAfterMs?: number;
    settings?: Record<string, unknown>;
  } = {},
): ConnectionSupervisor {
  const integration = configSchema.parse({
    gateway: { id: 'gw-test' },
    integrations: [
      {
        name: `up-${randomUUID().slice(0, 6)}`,
        id: h.integrationId,
        type: 'mqtt',
        settings: { url, ...options.settings },
      },
    ],
  }).integrations[0]!;
  const logger = createCaptureLogger(h.logs).child({ integrationId: integration.id });
  const provider = createMqttProvider({ gatewayId: 'gw-test', integration, logger });
  const supervisor = createConnectionSupervisor({
    provider,
    logger,
    activity: h.activity,
    integrationId: integration.id,
    // random = 1: every wait is the ceiling of its range, so the test sees the exponential curve.
    backoff: createBackoff({
      baseMs: options.baseMs ?? 50,
      maxMs: options.maxMs ?? 2000,
      random: () => 0.999,
    }),
    ...(options.stableAfterMs === undefined ? {} : { stableAfterMs: options.stableAfterMs }),
  });
  h.cleanups.push(() => supervisor.stop());
  return supervisor;
}

async function until(check: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 10));
  }
}

const rows = (type: string, status?: string) =>
  h.activity.list({
    integrationId: h.integrationId,
    activityType: type,
    limit: 1000,
    ...(status ? { status: status as 'failed' } : {}),
  });

/** An aedes that accepts the CONNECT and closes the client right after CONNACK (like a duplicate id or a policy kick). */
async function startKickingBroker(): Promise<number> {
  const aedes = new Aedes();
  await aedes.listen();
  aedes.on('connackSent', (_packet, client) => setImmediate(() => client.close()));
  const server = createServer(aedes.handle);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  h.cleanups.push(
    () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        aedes.close();
      }),
  );
  return (server.address() as { port: number }).port;
}

describe('backoff', () => {
  it('draws in [0, min(max, base·2^attempt)] ("full jitter")', () => {
    h = setUp();
    const top = createBackoff({ baseMs: 1000, maxMs: 60_000, random: () => 0.9999 });
    expect([0, 1, 2, 5, 6, 7, 50].map((a) => top.delay(a))).toEqual([
      999, 1999, 3999, 31_996, 59_994, 59_994, 59_994,
    ]);
    expect(createBackoff({ random: () => 0 }).delay(9)).toBe(0);
    const real = createBackoff();
    for (let a = 0; a < 20; a++) {
      const d = real.delay(a);
      expect(d).toBeGreaterThanOrEqual(0);
      expect(d).toBeLessThanOrEqual(Math.min(60_000, 1000 * 2 ** a));
    }
  });
});

describe('connection supervisor', () => {
  it('connects, notices a lost link, backs off and reconnects, recording each step', async () => {
    h = setUp();
    const proxy = await startTcpProxy(1883);
    h.cleanups.push(() => proxy.close());
    const supervisor = supervise(`mqtt://127.0.0.1:${proxy.port}`);
    const states: SupervisorState[] = [];
    supervisor.onStateChange((s) => states.push(s));
    expect(supervisor.state).toBe('stopped');
    supervisor.start();
    await until(() => supervisor.state === 'connected');
    expect(supervisor.connectedSince).not.toBeNull();
    expect(supervisor.reconnects).toBe(0);

    proxy.resetAll();
    await until(() => supervisor.reconnects === 1 && supervisor.state === 'connected');
    expect(states).toEqual(['connecting', 'connected', 'backoff', 'connecting', 'connected']);
    expect(supervisor.lastError?.code).toBe('GW_ERR_PROVIDER_CONNECT');
    expect(rows('connect', 'success')).toHaveLength(2);
    const disconnect = rows('disconnect');
    expect(disconnect).toHaveLength(1);
    expect(disconnect[0]).toMatchObject({ status: 'error', errorCode: 'GW_ERR_PROVIDER_CONNECT' });
    expect(
      h.logs.some((l) => l.msg === 'retry_attempt' && l.attempt === 1 && typeof l.delayMs === 'number'),
    ).toBe(true);

    await supervisor.stop();
    expect(supervisor.state).toBe('stopped');
    expect(supervisor.connectedSince).toBeNull();
  });

  it('does not loop tightly against a broker that kicks it right after CONNACK', async () => {
    h = setUp();
    const port = await startKickingBroker();
    const window = 2500;

    const stable = supervise(`mqtt://127.0.0.1:${port}`, { baseMs: 100, stableAfterMs: 10_000 });
    stable.start();
    await new Promise((r) => setTimeout(r, window));
    await stable.stop();
    const guarded = rows('connect', 'success').length;
    // Waits 100, 200, 400, 800, 1600 ms: at most about five connects fit in 2.5 s.
    expect(guarded).toBeGreaterThanOrEqual(2);
    expect(guarded).toBeLessThanOrEqual(7);
    expect(rows('disconnect').length).toBeGreaterThanOrEqual(guarded - 1);

    // Control: if every CONNACK reset the backoff (stableAfterMs 0) the same window holds many more.
    h.integrationId = randomUUID();
    const naive = supervise(`mqtt://127.0.0.1:${port}`, { baseMs: 100, stableAfterMs: 0 });
    naive.start();
    await new Promise((r) => setTimeout(r, window));
    await naive.stop();
    expect(rows('connect', 'success').length).toBeGreaterThan(guarded * 2);
  });

  it('records a failed connect on the 1st and then every 10th attempt, and keeps retrying', async () => {
    h = setUp();
    const proxy = await startTcpProxy(1883);
    h.cleanups.push(() => proxy.close());
    proxy.setMode('refuse');
    const supervisor = supervise(`mqtt://127.0.0.1:${proxy.port}`, { baseMs: 1, maxMs: 5 });
    supervisor.start();
    await until(() => h.logs.filter((l) => l.msg === 'retry_attempt').length >= 21);
    const failed = rows('connect', 'failed').reverse();
    expect(failed.map((r) => r.metadata.attempt)).toEqual([1, 10, 20]);
    expect(failed[0]!.errorCode).toBe('GW_ERR_PROVIDER_CONNECT');
    expect(supervisor.lastError?.code).toBe('GW_ERR_PROVIDER_CONNECT');
    expect(['backoff', 'connecting']).toContain(supervisor.state);

    proxy.setMode('pass');
    await until(() => supervisor.state === 'connected');
  });

  it('stop() aborts a connect attempt that hangs and a long backoff wait', async () => {
    h = setUp();
    const proxy = await startTcpProxy(1883);
    h.cleanups.push(() => proxy.close());
    proxy.setMode('blackhole');
    const hanging = supervise(`mqtt://127.0.0.1:${proxy.port}`, { settings: { connectTimeout: '60s' } });
    hanging.start();
    await until(() => hanging.state === 'connecting');
    await new Promise((r) => setTimeout(r, 100));
    const t0 = Date.now();
    await hanging.stop();
    expect(hanging.state).toBe('stopped');
    expect(Date.now() - t0).toBeLessThan(5000);

    proxy.setMode('refuse');
    const waiting = supervise(`mqtt://127.0.0.1:${proxy.port}`, { baseMs: 60_000, maxMs: 60_000 });
    waiting.start();
    await until(() => waiting.state === 'backoff');
    const t1 = Date.now();
    await waiting.stop();
    expect(waiting.state).toBe('stopped');
    expect(Date.now() - t1).toBeLessThan(5000);
  });

  it('recovers from a blackholed link (found by keepalive, or by the broker dropping us)', async () => {
    h = setUp();
    const proxy = await startTcpProxy(1883);
    h.cleanups.push(() => proxy.close());
    const supervisor = supervise(`mqtt://127.0.0.1:${proxy.port}`, {
      settings: { keepalive: '1s', connectTimeout: '1s' },
      maxMs: 300,
    });
    supervisor.start();
    await until(() => supervisor.state === 'connected');
    proxy.setMode('blackhole');
    await until(() => supervisor.state !== 'connected', 8000);
    expect(supervisor.lastError?.message).toMatch(/Keepalive timeout|connection closed/i);
    proxy.setMode('pass');
    await until(() => supervisor.state === 'connected', 10_000);
    expect(supervisor.reconnects).toBe(1);
  });

  function superviseFake(options: FakeCloudOptions, backoffMs: number) {
    const cloud = createFakeCloud(options);
    const provider = cloud.factory(undefined as never);
    const supervisor = createConnectionSupervisor({
      provider,
      logger: createCaptureLogger(h.logs),
      activity: h.activity,
      integrationId: h.integrationId,
      backoff: createBackoff({ baseMs: backoffMs, maxMs: backoffMs, random: () => 0.999 }),
    });
    h.cleanups.push(() => supervisor.stop());
    return { cloud, supervisor };
  }

  it("keeps the provider's minReconnectDelayMs between attempts, even when its backoff is shorter", async () => {
    h = setUp();
    const { cloud, supervisor } = superviseFake({ limits: { minReconnectDelayMs: 300 } }, 1);
    cloud.refuseConnects();
    supervisor.start();
    await until(() => cloud.connectAttempts.length >= 4);
    cloud.acceptConnects();
    await until(() => supervisor.state === 'connected');
    cloud.dropLink();
    await until(() => supervisor.reconnects === 1 && supervisor.state === 'connected');
    const gaps = cloud.connectAttempts.slice(1).map((t, i) => t - cloud.connectAttempts[i]!);
    // Timers never fire early by more than a millisecond; a slow machine only widens the gaps.
    for (const gap of gaps) expect(gap).toBeGreaterThanOrEqual(298);
    expect(rows('connect', 'failed').length).toBeGreaterThanOrEqual(1);
  });

  it('a planned reconnect reconnects at once: no failure, no backoff, one internal success row', async () => {
    h = setUp();
    // Any failure would wait a minute; the planned one must not.
    const { cloud, supervisor } = superviseFake({}, 60_000);
    const causes: (string | undefined)[] = [];
    supervisor.onStateChange((_s, cause) => causes.push((cause as { code?: string } | undefined)?.code));
    supervisor.start();
    await until(() => supervisor.state === 'connected');
    cloud.plannedReconnect();
    await until(() => supervisor.reconnects === 1 && supervisor.state === 'connected');
    cloud.plannedReconnect();
    await until(() => supervisor.reconnects === 2 && supervisor.state === 'connected');
    expect(supervisor.lastError).toBeNull();
    expect(rows('disconnect')).toEqual([]);
    expect(rows('connect', 'failed')).toEqual([]);
    const planned = rows('reconnect');
    expect(planned).toHaveLength(2);
    expect(planned[0]).toMatchObject({ direction: 'internal', status: 'success' });
    expect(causes).toContain('GW_ERR_PROVIDER_PLANNED_RECONNECT');
  });
});
