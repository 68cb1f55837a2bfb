import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connectAsync, type MqttClient } from 'mqtt';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadConfigFile } from '../../../src/config/load.js';
import { hashPassword } from '../../../src/gateway/broker/password-hash.js';
import { createGateway, type Gateway } from '../../../src/gateway/gateway.js';
import { createCaptureLogger, type LogRecord } from '../../helpers/capture-logger.js';
import { createTestPki, type TestPki } from '../../helpers/certs.js';
import { createAzureHubSim, type AzureHubSim } from '../../sims/azure-iot-hub/azure-iot-hub-sim.js';

// Device → gateway (embedded broker, SQLite queue, forwarder) → simulated IoT Hub, and back, on
// real sockets and TLS.
const DEVICES = ['dev-a', 'dev-b', ...Array.from({ length: 10 }, (_, i) => `t${i}`)];
const PASSWORD = 'pw-e2e';
const keys = Object.fromEntries(DEVICES.map((id) => [id, randomBytes(32).toString('base64')]));

let pki: TestPki;
let sim: AzureHubSim;
let root: string;
let passwordHash: string;
const cleanups: (() => Promise<unknown> | void)[] = [];

beforeAll(async () => {
  pki = createTestPki();
  sim = await createAzureHubSim({
    tls: { cert: readFileSync(pki.serverCert), key: readFileSync(pki.serverKey), ca: pki.ca },
  });
  for (const id of DEVICES) sim.addDevice(id, { primaryKey: keys[id]! });
  root = mkdtempSync(join(tmpdir(), 'gw-az-e2e-'));
  passwordHash = await hashPassword(PASSWORD);
});

afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

afterAll(async () => {
  await sim.close();
  pki.cleanup();
  rmSync(root, { recursive: true, force: true });
});

async function startGateway(
  settings: Record<string, unknown> = {},
): Promise<{ gateway: Gateway; port: number; logs: LogRecord[] }> {
  const dir = mkdtempSync(join(root, 'gw-'));
  const file = join(dir, 'gateway.json');
  writeFileSync(
    file,
    JSON.stringify({
      gateway: { id: 'gw-e2e', dataDir: join(dir, 'data') },
      broker: {
        listeners: [{ type: 'tcp', host: '127.0.0.1', port: 0 }],
        devices: DEVICES.map((id) => ({ id, passwordHash })),
      },
      integrations: [
        {
          name: 'hub',
          id: randomUUID(),
          type: 'azure-iot-hub',
          settings: {
            hostName: 'localhost',
            address: '127.0.0.1',
            port: sim.port,
            ca: pki.caCert,
            auth: { type: 'device-keys', keys },
            ...settings,
          },
          routes: [
            { from: 'devices/+/telemetry/#', qos: 1 },
            { from: 'devices/+/telemetry', qos: 1 },
            { from: 'devices/+/state', qos: 1 },
            { from: 'devices/+/commands/+/response', qos: 1 },
          ],
        },
      ],
    }),
  );
  const logs: LogRecord[] = [];
  const { config } = loadConfigFile(file);
  const gateway = createGateway({
    configFile: file,
    config,
    logger: createCaptureLogger(logs, { level: 'info' }),
  });
  await gateway.start();
  cleanups.push(() => gateway.stop('test end'));
  const port = gateway.status().broker.listeners[0]!.port;
  return { gateway, port, logs };
}

async function device(port: number, id: string): Promise<MqttClient> {
  const client = await connectAsync(`mqtt://127.0.0.1:${port}`, {
    clientId: id,
    username: id,
    password: PASSWORD,
    reconnectPeriod: 0,
  });
  cleanups.push(() => client.endAsync(true));
  return client;
}

function received(client: MqttClient): { topic: string; payload: string; retain: boolean }[] {
  const got: { topic: string; payload: string; retain: boolean }[] = [];
  client.on('message', (topic, payload, packet) =>
    got.push({ topic, payload: payload.toString(), retain: packet.retain }),
  );
  return got;
}

describe('azure-iot-hub end to end', () => {
  it('device → gateway → hub: telemetry as D2C messages, state as reported properties', async () => {
    const { port } = await startGateway();
    const a = await device(port, 'dev-a');
    const before = sim.telemetry.length;
    for (let n = 0; n < 20; n++)
      await a.publishAsync('devices/dev-a/telemetry', JSON.stringify({ n }), { qos: 1 });
    await a.publishAsync('devices/dev-a/telemetry/power', '42', { qos: 1 });
    await a.publishAsync('devices/dev-a/state', JSON.stringify({ fw: '1.2.3', led: 'on' }), { qos: 1 });
    await sim.waitFor(() => sim.telemetry.length - before === 21, 30_000, '21 D2C messages');
    await sim.waitFor(() => sim.twin('dev-a').reported.fw === '1.2.3', 30_000, 'reported fw');
    const got = sim.telemetry.slice(before);
    expect(
      got.filter((t) => t.properties.stream === undefined).map((t) => JSON.parse(t.payload.toString()).n),
    ).toEqual(Array.from({ length: 20 }, (_, n) => n));
    expect(got.find((t) => t.properties.stream === 'power')?.payload.toString()).toBe('42');
    expect(sim.twin('dev-a').reported).toEqual({ fw: '1.2.3', led: 'on' });
  });

  it('hub → gateway → device: desired state (retained), a C2D message, and a method answered by the device', async () => {
    sim.updateDesired('dev-b', { interval: 30 });
    const { port } = await startGateway();
    const b = await device(port, 'dev-b');
    const got = received(b);
    await b.subscribeAsync('devices/dev-b/#', { qos: 1 });
    // The device's first message opens its hub link; desired state follows from the twin GET.
    await b.publishAsync('devices/dev-b/telemetry', 'hello', { qos: 1 });
    await waitFor(() => got.some((m) => m.topic === 'devices/dev-b/desired'), 'desired');
    expect(JSON.parse(got.find((m) => m.topic === 'devices/dev-b/desired')!.payload)).toEqual({
      interval: 30,
    });

    sim.updateDesired('dev-b', { interval: 60 });
    await waitFor(() => got.filter((m) => m.topic === 'devices/dev-b/desired').length >= 2, 'desired patch');
    expect(JSON.parse(got.filter((m) => m.topic === 'devices/dev-b/desired').at(-1)!.payload)).toEqual({
      interval: 60,
    });
    // Retained: subscribing again brings the latest desired state at once.
    await b.unsubscribeAsync('devices/dev-b/#');
    const retainedBefore = got.filter((m) => m.retain).length;
    await b.subscribeAsync('devices/dev-b/desired', { qos: 1 });
    await waitFor(() => got.filter((m) => m.retain).length > retainedBefore, 'retained desired');
    expect(JSON.parse(got.filter((m) => m.retain).at(-1)!.payload)).toEqual({ interval: 60 });
    await b.subscribeAsync('devices/dev-b/commands/#', { qos: 1 });

    sim.sendC2d('dev-b', JSON.stringify({ color: 'red' }), { name: 'led' });
    await waitFor(() => got.some((m) => m.topic === 'devices/dev-b/commands/led'), 'C2D');
    expect(JSON.parse(got.find((m) => m.topic === 'devices/dev-b/commands/led')!.payload)).toMatchObject({
      kind: 'c2d',
      payload: { color: 'red' },
    });

    // The device answers every method it gets on commands/{name}/response with the same requestId.
    b.on('message', (topic, payload) => {
      const m = /^devices\/dev-b\/commands\/([^/]+)$/.exec(topic);
      if (!m) return;
      const req = JSON.parse(payload.toString()) as { requestId: string; kind: string; payload: unknown };
      if (req.kind !== 'method') return;
      void b.publishAsync(
        `devices/dev-b/commands/${m[1]}/response`,
        JSON.stringify({ requestId: req.requestId, status: 200, payload: { echo: req.payload } }),
        { qos: 1 },
      );
    });
    await expect(sim.invokeMethod('dev-b', 'ping', { x: 1 }, { timeoutMs: 20_000 })).resolves.toEqual({
      status: 200,
      payload: { echo: { x: 1 } },
    });
  });

  it('a device that only connects locally gets its hub link, so a C2D message reaches it', async () => {
    const { port } = await startGateway();
    const a = await device(port, 'dev-a');
    const got = received(a);
    await a.subscribeAsync('devices/dev-a/commands/#', { qos: 1 });
    await sim.waitFor(() => sim.connectedDevices().includes('dev-a'), 30_000, 'dev-a linked on presence');
    sim.sendC2d('dev-a', 'hi', { name: 'greet' });
    await waitFor(
      () => got.some((m) => m.topic === 'devices/dev-a/commands/greet'),
      'C2D to a silent device',
    );
  });

  it('one device throttled (429002) while nine flow: all rows arrive, none dead-lettered', async () => {
    const ids = Array.from({ length: 10 }, (_, i) => `t${i}`);
    const { gateway, port } = await startGateway();
    const clients = await Promise.all(ids.map((id) => device(port, id)));
    const before = sim.telemetry.length;
    sim.throttle('t3', { forMs: 3000 });
    await Promise.all(
      clients.map(async (c, i) => {
        for (let n = 0; n < 30; n++) {
          await c.publishAsync(`devices/${ids[i]}/telemetry`, JSON.stringify({ n }), { qos: 1 });
        }
      }),
    );
    const count = (id: string) =>
      new Set(
        sim.telemetry
          .slice(before)
          .filter((t) => t.deviceId === id)
          .map((t) => t.payload.toString()),
      ).size;
    // The nine are not held up by the parked one; t3 follows once its throttle ends.
    await sim.waitFor(
      () => ids.filter((id) => id !== 't3').every((id) => count(id) === 30),
      30_000,
      'nine devices',
    );
    await sim.waitFor(() => count('t3') === 30, 60_000, 'the throttled device, once its throttle ended');
    expect(sim.events.some((e) => e.type === 'throttled' && e.deviceId === 't3')).toBe(true);
    const status = gateway.status().integrations[0]!;
    expect(status.queue.deadLettered).toBe(0);
    expect(status.queue.deadLetters).toBe(0);
  });

  it('a hub outage mid-stream loses nothing, and a token renewed under traffic loses nothing', async () => {
    const { gateway, port } = await startGateway({ tokenTtl: '4s', tokenRenewBefore: '2s' });
    const b = await device(port, 'dev-b');
    const before = sim.telemetry.length;
    const expiredBefore = sim.events.filter((e) => e.type === 'token_expired').length;
    let n = 0;
    const until = Date.now() + 8000;
    let outage = false;
    while (Date.now() < until) {
      if (!outage && Date.now() > until - 6000) {
        outage = true;
        sim.outage(true);
        setTimeout(() => sim.outage(false), 1500);
      }
      await b.publishAsync('devices/dev-b/telemetry', JSON.stringify({ n: n++ }), { qos: 1 });
      await new Promise((r) => setTimeout(r, 5));
    }
    const values = () =>
      new Set(
        sim.telemetry
          .slice(before)
          .filter((t) => t.deviceId === 'dev-b')
          .map((t) => (JSON.parse(t.payload.toString()) as { n: number }).n),
      );
    await sim.waitFor(() => values().size === n, 60_000, `all ${n} messages`);
    expect(sim.events.filter((e) => e.type === 'token_expired').length).toBe(expiredBefore);
    const status = gateway.status().integrations[0]!;
    expect(status.reconnects).toBeGreaterThanOrEqual(1);
    expect(status.queue.deadLetters).toBe(0);
  });
});

async function waitFor(predicate: () => boolean, what: string, timeoutMs = 30_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > until) throw new Error(`${what} did not arrive within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
