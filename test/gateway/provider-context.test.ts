import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt, { type MqttClient } from 'mqtt';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadConfigFile } from '../../src/config/load.js';
import { hashPassword } from '../../src/gateway/broker/password-hash.js';
import { createGateway, type Gateway } from '../../src/gateway/gateway.js';
import type { ProviderContext } from '../../src/providers/provider.js';
import { openStore } from '../../src/store/database.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';
import { freePort } from '../helpers/ports.js';
import { createFakeCloud, type FakeCloud } from '../providers/fake-provider.js';

/**
 * What the gateway gives providers besides rows: local presence, report(), knownDevices() and
 * reportedState(), through createGateway with fake clouds injected for the `mqtt` type.
 */

const A = '3f1c1f0e-7d8e-4f5a-9a51-0c2b6f1d2e3a';
const B = '8b2d0c4e-1a7f-4e3b-8c6d-5e9f0a1b2c3d';

let dir: string;
let hash: string;
const running: (() => Promise<unknown>)[] = [];

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'gw-context-'));
  hash = await hashPassword('pw');
});
afterEach(async () => {
  for (const fn of running.splice(0).reverse()) await fn();
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function writeConfig(file: string, port: number, names: string[], data: string): void {
  const integrations = names.flatMap((name) => [
    `  - name: ${name}`,
    `    id: ${name === 'a' ? A : B}`,
    '    type: mqtt',
    // Never dialled: the injected factory stands in for the MQTT provider.
    '    settings: { url: "mqtt://127.0.0.1:1", outbound: [{ local: "#", remote: "{topic}" }] }',
    '    routes: [{ from: "devices/#" }]',
  ]);
  writeFileSync(
    file,
    [
      `gateway: { id: ctx-gw, dataDir: ${JSON.stringify(data)} }`,
      'broker:',
      `  listeners: [{ type: tcp, host: 127.0.0.1, port: ${port} }]`,
      `  devices: [{ id: d1, passwordHash: "${hash}" }, { id: d2, passwordHash: "${hash}" }]`,
      'integrations:',
      ...integrations,
      'http: { enabled: false }',
    ].join('\n'),
  );
}

interface World {
  gateway: Gateway;
  clouds: Record<'a' | 'b', FakeCloud>;
  logs: LogRecord[];
  file: string;
  port: number;
  data: string;
}

let worlds = 0;

/** A gateway with fake clouds; `again` restarts on the data directory (and port) of an earlier one. */
async function startGateway(names: string[], again?: World): Promise<World> {
  const p = again?.port ?? (await freePort());
  const data = again?.data ?? join(dir, `data-${worlds++}`);
  const file = join(dir, `gateway-${worlds}.yaml`);
  writeConfig(file, p, names, data);
  const logs: LogRecord[] = [];
  const clouds = { a: createFakeCloud(), b: createFakeCloud() };
  const gateway = createGateway({
    configFile: file,
    config: loadConfigFile(file).config,
    logger: createCaptureLogger(logs, { level: 'info' }),
    providers: { mqtt: (context) => clouds[context.integration.name as 'a' | 'b'].factory(context) },
  });
  await gateway.start();
  running.push(() => gateway.stop('test done'));
  return { gateway, clouds, logs, file, port: p, data };
}

async function device(port: number, id: string): Promise<MqttClient> {
  const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
    clientId: id,
    username: id,
    password: 'pw',
    reconnectPeriod: 0,
  });
  running.push(() => client.endAsync(true));
  return client;
}

async function until(check: () => boolean, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

const context = (cloud: FakeCloud): ProviderContext => cloud.contexts.at(-1)!;

describe('the provider context in the gateway', () => {
  it('tells every integration of local presence, also the devices connected before it started', async () => {
    const w = await startGateway(['a']);
    const d1 = await device(w.port, 'd1');
    await until(() => w.clouds.a.presence.length === 1);
    expect(w.clouds.a.presence).toEqual([{ deviceId: 'd1', online: true }]);

    // Integration b arrives by a reload while d1 is connected: it learns of d1 at its start.
    writeConfig(w.file, w.port, ['a', 'b'], w.data);
    expect((await w.gateway.reload()).ok).toBe(true);
    await until(() => w.clouds.b.presence.length === 1);
    expect(w.clouds.b.presence).toEqual([{ deviceId: 'd1', online: true }]);

    await d1.endAsync();
    await until(() => w.clouds.a.presence.length === 2 && w.clouds.b.presence.length === 2);
    expect(w.clouds.a.presence.at(-1)).toEqual({ deviceId: 'd1', online: false });
    expect(w.clouds.b.presence.at(-1)).toEqual({ deviceId: 'd1', online: false });
  });

  it('report() writes an activity row of the integration; knownDevices() and reportedState() see the devices', async () => {
    const w = await startGateway(['a']);
    const ctx = context(w.clouds.a);
    expect('activity' in ctx).toBe(false);
    ctx.report!({
      activityType: 'token_renewed',
      direction: 'internal',
      status: 'success',
      metadata: { expiresInS: 3600 },
    });
    const store = openStore({
      dataDir: w.data,
      logger: createCaptureLogger([]),
      onCorrupt: 'refuse',
      lock: false,
    });
    const row = store.db
      .prepare(
        "SELECT integration_id AS id, status, metadata FROM activity_log WHERE activity_type = 'token_renewed'",
      )
      .get() as { id: string; status: string; metadata: string };
    store.close();
    expect(row).toMatchObject({ id: A, status: 'success' });
    expect(JSON.parse(row.metadata)).toEqual({ expiresInS: 3600 });

    const d2 = await device(w.port, 'd2');
    await d2.publishAsync('devices/d2/state', '{"on":true,"level":3,"color":{"r":1,"g":2}}', { qos: 1 });
    await d2.publishAsync('devices/d2/state', '{"on":null,"color":{"g":null}}', { qos: 1 });
    expect(Object.fromEntries(ctx.reportedState!())).toEqual({ d2: { level: 3, color: { r: 1 } } });
    expect([...ctx.knownDevices!()].sort()).toEqual(['d1', 'd2']);
    // The state messages are still queued like any routed row.
    await until(() => w.clouds.a.published.filter((m) => m.topic === 'devices/d2/state').length === 2);
  });

  it('keeps the reported state across a restart', async () => {
    const first = await startGateway(['a']);
    const d1 = await device(first.port, 'd1');
    await d1.publishAsync('devices/d1/state', '{"fw":"1.2.0","uptime":5}', { qos: 1 });
    await d1.publishAsync('devices/d1/state', '{"uptime":9}', { qos: 1 });
    await d1.endAsync();
    expect(await first.gateway.stop('restart')).toBe(0);
    running.splice(0);

    const second = await startGateway(['a'], first);
    expect(Object.fromEntries(context(second.clouds.a).reportedState!())).toEqual({
      d1: { fw: '1.2.0', uptime: 9 },
    });
  });

  it('a planned reconnect of a provider leaves no failure row and no alert', async () => {
    const w = await startGateway(['a']);
    await until(() => w.clouds.a.connected);
    const d1 = await device(w.port, 'd1');
    w.clouds.a.holdAcks();
    for (let i = 0; i < 5; i++) await d1.publishAsync('devices/d1/telemetry', `t${i}`, { qos: 1 });
    await until(() => w.clouds.a.received.length === 5);
    w.clouds.a.plannedReconnect();
    w.clouds.a.releaseAcks();
    await until(() => w.gateway.status().integrations[0]!.reconnects === 1);
    await until(() => w.gateway.status().integrations[0]!.queue.depth === 0);
    expect(new Set(w.clouds.a.published.map((m) => m.payload.toString()))).toEqual(
      new Set(['t0', 't1', 't2', 't3', 't4']),
    );
    const status = w.gateway.status().integrations[0]!;
    expect(status).toMatchObject({ lastError: null, queue: { deadLetters: 0 } });
    const store = openStore({
      dataDir: w.data,
      logger: createCaptureLogger([]),
      onCorrupt: 'refuse',
      lock: false,
    });
    const bad = store.db
      .prepare("SELECT activity_type AS type FROM activity_log WHERE status IN ('failed', 'error')")
      .all();
    store.close();
    expect(bad).toEqual([]);
    expect(w.logs.some((l) => l.msg === 'planned_reconnect')).toBe(true);
  });
});
