import { randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { connect as connectTcp, createServer as createNetServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer as createTlsServer } from 'node:tls';
import { Aedes } from 'aedes';
import { connectAsync } from 'mqtt';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { configSchema } from '../../../src/config/schema.js';
import { createBackoff } from '../../../src/common/backoff.js';
import {
  createConnectionSupervisor,
  type ConnectionSupervisor,
} from '../../../src/gateway/delivery/connection-supervisor.js';
import { createForwarder, type Forwarder } from '../../../src/gateway/delivery/forwarder.js';
import type { Logger } from '../../../src/logger.js';
import { createMqttProvider } from '../../../src/providers/mqtt/mqtt-provider.js';
import type { Provider } from '../../../src/providers/provider.js';
import { createActivityLog, type ActivityLog } from '../../../src/store/activity-log.js';
import { openStore, type Store } from '../../../src/store/database.js';
import { createOutbox } from '../../../src/store/outbox.js';
import type { Outbox, QueueLimits } from '../../../src/store/outbox-types.js';
import { createCaptureLogger, type LogRecord } from '../../helpers/capture-logger.js';
import { createTestPki } from '../../helpers/certs.js';
import { startMosquitto, type PrivateMosquitto } from '../../helpers/mosquitto.js';
import { startScriptedMqtt } from '../../helpers/scripted-mqtt.js';
import { startTcpProxy, type TcpProxy } from '../../helpers/tcp-proxy.js';

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
  prefix: string;
  proxy: TcpProxy;
  cleanups: (() => Promise<void> | void)[];
}

let h: Harness;
/** Upstream Mosquitto of this file, with unbounded client queues so the observer never drops. */
let upstream: PrivateMosquitto;
beforeAll(async () => {
  upstream = await startMosquitto();
});
afterAll(async () => {
  await upstream.stop();
});

async function setUp(): Promise<Harness> {
  const dir = mkdtempSync(join(tmpdir(), 'gw-fwd-'));
  const logs: LogRecord[] = [];
  const logger = createCaptureLogger(logs);
  const store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
  const activity = createActivityLog({ db: store.db, gatewayId: 'gw-test', logger });
  const outbox = createOutbox({ db: store.db, logger, activity });
  const proxy = await startTcpProxy(upstream.port);
  return {
    dir,
    store,
    activity,
    outbox,
    logger,
    logs,
    integrationId: randomUUID(),
    prefix: `gwtest/${randomUUID().slice(0, 8)}`,
    proxy,
    cleanups: [() => proxy.close()],
  };
}

interface Pipeline {
  provider: Provider;
  supervisor: ConnectionSupervisor;
  forwarder: Forwarder;
}

function pipeline(
  options: {
    settings?: Record<string, unknown>;
    queue?: { rate?: number; inflight?: number; maxAttempts?: number };
  } = {},
): Pipeline {
  const integration = configSchema.parse({
    gateway: { id: 'gw-test' },
    integrations: [
      {
        name: `upstream-${randomUUID().slice(0, 8)}`,
        id: h.integrationId,
        type: 'mqtt',
        settings: {
          url: `mqtt://127.0.0.1:${h.proxy.port}`,
          connectTimeout: '1s',
          outbound: [{ local: 'devices/#', remote: `${h.prefix}/{1}` }],
          ...options.settings,
        },
      },
    ],
  }).integrations[0]!;
  const logger = h.logger.child({ integrationId: h.integrationId });
  const provider = createMqttProvider({ gatewayId: 'gw-test', integration, logger });
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
    queue: { rate: 0, inflight: 100, maxAttempts: 10, ...options.queue },
  });
  const unsubscribe = h.outbox.onEnqueue((ids) => {
    if (ids.has(h.integrationId)) forwarder.wake();
  });
  h.cleanups.push(async () => {
    unsubscribe();
    await forwarder.stop();
    await supervisor.stop();
  });
  return { provider, supervisor, forwarder };
}

/** Collects what reaches the upstream Mosquitto under the test prefix, as `device:seq` strings. */
async function observe(): Promise<{ got: string[] }> {
  const client = await connectAsync(`mqtt://127.0.0.1:${upstream.port}`, {
    clientId: `obs-${randomUUID()}`,
    reconnectPeriod: 0,
  });
  h.cleanups.push(() => client.endAsync(true));
  const got: string[] = [];
  client.on('message', (_topic, payload) => got.push(payload.toString()));
  await client.subscribeAsync(`${h.prefix}/#`, { qos: 1 });
  return { got };
}

async function enqueue(deviceId: string, seq: number, payload?: Buffer): Promise<void> {
  await h.outbox.enqueue(
    {
      deviceId,
      topic: `devices/${deviceId}/telemetry`,
      payload: payload ?? Buffer.from(`${deviceId}:${seq}`),
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
    await new Promise((r) => setTimeout(r, 20));
  }
}

const depth = () => h.outbox.stats(h.integrationId).depth;

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
 * The forwarder end to end through the real MQTT provider (Mosquitto, aedes, TCP and TLS
 * faults). Its logic is tested against the fake cloud in forwarder.test.ts.
 */
describe('forwarder through the MQTT provider', () => {
  afterEach(async () => {
    for (const fn of h.cleanups.reverse()) await fn();
    await h.outbox.close();
    h.store.close();
    rmSync(h.dir, { recursive: true, force: true });
  });

  it('drains 2,000 queued rows in order with the upstream down then up, losing nothing', async () => {
    h = await setUp();
    const obs = await observe();
    h.proxy.setMode('refuse');
    const { supervisor, forwarder } = pipeline();
    supervisor.start();
    forwarder.start();
    for (let i = 0; i < 2000; i++) void enqueue(`d${i % 5}`, i);
    await h.outbox.flush();
    expect(depth()).toBe(2000);
    await until(() => supervisor.lastError !== null);
    expect(forwarder.delivered).toBe(0);
    expect(depth()).toBe(2000);

    h.proxy.setMode('pass');
    // Cut the link once mid-drain: in-flight rows are resent after the reconnect.
    await until(() => forwarder.delivered >= 600);
    h.proxy.resetAll();
    await until(() => depth() === 0, 30_000);
    await until(() => new Set(obs.got).size === 2000);

    expect(new Set(obs.got).size).toBe(2000);
    const duplicates = obs.got.length - 2000;
    expect(duplicates).toBeLessThanOrEqual(100);
    assertPerDeviceOrder(obs.got);
    expect(forwarder.inflight).toBe(0);
    expect(forwarder.lastAckAt).not.toBeNull();
    expect(supervisor.reconnects).toBeGreaterThanOrEqual(1);

    await forwarder.stop();
    const deliver = h.activity.list({
      integrationId: h.integrationId,
      activityType: 'deliver',
      status: 'success',
    });
    expect(deliver.length).toBeGreaterThanOrEqual(1);
    expect(deliver.reduce((n, r) => n + (r.metadata.count as number), 0)).toBe(forwarder.delivered);
  });

  it('R6: an upstream that drops the link on one message dead-letters it after maxAttempts, no reconnect storm', async () => {
    h = await setUp();
    // An upstream that, like AWS IoT on a publish its policy refuses, closes the connection.
    const upstreamBroker = await Aedes.createBroker({
      authorizePublish(_client, packet, done) {
        done(packet.topic.includes('/forbidden/') ? new Error('not authorised') : null);
      },
    });
    const server = createNetServer(upstreamBroker.handle);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    h.cleanups.push(
      () =>
        new Promise<void>((resolve) => {
          upstreamBroker.close(() => server.close(() => resolve()));
        }),
    );
    let connects = 0;
    upstreamBroker.on('client', () => connects++);
    const got: string[] = [];
    upstreamBroker.on('publish', (packet, client) => {
      if (client) got.push(packet.payload.toString());
    });
    const port = (server.address() as { port: number }).port;

    const { supervisor, forwarder } = pipeline({
      settings: { url: `mqtt://127.0.0.1:${port}` },
      queue: { maxAttempts: 3 },
    });
    await enqueue('ok', 0);
    await enqueue('forbidden', 0);
    for (let i = 1; i < 5; i++) await enqueue('ok', i);
    supervisor.start();
    forwarder.start();
    await until(() => depth() === 0, 30_000);
    expect(h.outbox.stats(h.integrationId).deadLetters).toBe(1);
    const letter = h.store.db
      .prepare('SELECT topic, attempts FROM dead_letters WHERE integration_id = ?')
      .get(h.integrationId) as {
      topic: string;
      attempts: number;
    };
    expect(letter).toEqual({ topic: 'devices/forbidden/telemetry', attempts: 3 });
    expect(h.logs.some((l) => l.msg === 'deliver_probing')).toBe(true);
    expect([...new Set(got)].filter((p) => p.startsWith('ok:')).sort()).toEqual([
      'ok:0',
      'ok:1',
      'ok:2',
      'ok:3',
      'ok:4',
    ]);
    // Two losses with several rows in flight blame none of them (the second starts probing);
    // then one connection per attempt of the row sent alone, and one after its dead letter.
    expect(connects).toBeLessThanOrEqual(3 + 3);
  });

  it('MQTT 5 PUBACK 0x97 (quota exceeded) is a throttle: waited for, no attempt counted, no dead letter', async () => {
    h = await setUp();
    // Every publish of the first window is refused with "quota exceeded", then all are taken.
    let refusals = 10;
    const server = await startScriptedMqtt({ puback: () => (refusals-- > 0 ? 0x97 : 0) });
    h.cleanups.push(() => server.close());
    const { supervisor, forwarder } = pipeline({
      settings: { url: `mqtt://127.0.0.1:${server.port}`, protocolVersion: 5 },
      queue: { inflight: 10, maxAttempts: 1 },
    });
    for (let i = 0; i < 40; i++) await enqueue('q', i);
    supervisor.start();
    forwarder.start();
    await until(() => depth() === 0, 30_000);
    expect(forwarder.throttled).toBe(10);
    expect(h.outbox.stats(h.integrationId).deadLetters).toBe(0);
    const accepted = server.publishes.slice(10).map((p) => p.payload.toString());
    expect(new Set(accepted).size).toBe(40);
    assertPerDeviceOrder(accepted);
    const failures = h.activity
      .list({ integrationId: h.integrationId, limit: 100 })
      .filter((r) => r.status === 'failed' || r.status === 'error');
    expect(failures).toEqual([]);
  });

  it('recovers from a blackholed upstream link and resends what was in flight', async () => {
    h = await setUp();
    const obs = await observe();
    const { supervisor, forwarder } = pipeline({ settings: { keepalive: '1s', publishTimeout: '30s' } });
    supervisor.start();
    forwarder.start();
    await until(() => supervisor.state === 'connected');
    h.proxy.setMode('blackhole');
    for (let i = 0; i < 50; i++) await enqueue('h', i);
    await until(() => forwarder.inflight > 0);
    await until(() => supervisor.state !== 'connected', 8000);
    expect(supervisor.lastError?.message).toMatch(/Keepalive timeout|connection closed/i);
    expect(depth()).toBe(50);
    h.proxy.setMode('pass');
    await until(() => depth() === 0, 20_000);
    await until(() => new Set(obs.got).size === 50);
    assertPerDeviceOrder(obs.got);
    expect(forwarder.delivered).toBeGreaterThanOrEqual(50);
    // One lost link is an ordinary outage: the window stays open (no one-at-a-time probing).
    expect(h.logs.some((l) => l.msg === 'deliver_probing')).toBe(false);
  });

  it('S21: keeps every row queued while the upstream shows a wrong-host or untrusted certificate', async () => {
    h = await setUp();
    const pki = createTestPki();
    h.cleanups.push(() => pki.cleanup());
    // A TLS front for the upstream Mosquitto whose certificate the test swaps: first an impostor.
    const wrongHost = pki.issueServer('cloud.example');
    const front = createTlsServer({ cert: wrongHost.cert, key: wrongHost.key }, (tlsSocket) => {
      const plain = connectTcp(upstream.port, '127.0.0.1');
      tlsSocket.pipe(plain).pipe(tlsSocket);
      const end = () => {
        tlsSocket.destroy();
        plain.destroy();
      };
      tlsSocket.on('error', end).on('close', end);
      plain.on('error', end).on('close', end);
    });
    front.on('tlsClientError', () => {});
    await new Promise<void>((resolve) => front.listen(0, '127.0.0.1', resolve));
    h.cleanups.push(() => new Promise<void>((resolve) => front.close(() => resolve())));
    const port = (front.address() as { port: number }).port;

    const obs = await observe();
    const { supervisor, forwarder } = pipeline({
      settings: { url: `mqtts://localhost:${port}`, ca: pki.caCert },
    });
    supervisor.start();
    forwarder.start();
    for (let i = 0; i < 20; i++) await enqueue('t', i);
    const failures = () => h.logs.filter((l) => l.msg === 'connect_failed').length;
    await until(() => failures() >= 3);
    expect(supervisor.lastError?.message).toMatch(/localhost|altname|cloud\.example/i);

    // The right name, but a CA the integration does not trust.
    const untrusted = pki.issueServer('localhost', { signedByOtherCa: true });
    front.setSecureContext({ cert: untrusted.cert, key: untrusted.key });
    const before = failures();
    await until(() => failures() >= before + 3);
    expect(supervisor.lastError?.message).toMatch(/certificate/i);

    // Refused, never dropped or dead-lettered: every row waits for the genuine upstream.
    expect(depth()).toBe(20);
    expect(h.outbox.stats(h.integrationId)).toMatchObject({ deadLetters: 0, dropped: 0 });
    expect(obs.got).toEqual([]);

    front.setSecureContext({ cert: readFileSync(pki.serverCert), key: readFileSync(pki.serverKey) });
    await until(() => depth() === 0);
    await until(() => new Set(obs.got).size === 20);
    assertPerDeviceOrder(obs.got);
  });
});
