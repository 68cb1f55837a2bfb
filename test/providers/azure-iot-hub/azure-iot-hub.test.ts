import { randomBytes, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { configSchema } from '../../../src/config/schema.js';
import { ErrorCodes, GatewayError } from '../../../src/errors.js';
import { createSasToken } from '../../../src/providers/azure-iot-hub/sas.js';
import type {
  InboundMessage,
  OutboundMessage,
  Provider,
  ProviderEvent,
} from '../../../src/providers/provider.js';
import { createProvider, loadProviders } from '../../../src/providers/registry.js';
import { createCaptureLogger, type LogRecord } from '../../helpers/capture-logger.js';
import { createTestPki, type TestPki } from '../../helpers/certs.js';
import { createAzureHubSim, type AzureHubSim } from '../../sims/azure-iot-hub/azure-iot-hub-sim.js';

// Built-in providers load on first use; the gateway loads them as it does here.
await loadProviders(['azure-iot-hub']);

const key = () => randomBytes(32).toString('base64');
const policyKey = key();
const serviceKey = key();
const keys: Record<string, string> = {};

let pki: TestPki;
let sim: AzureHubSim;
const cleanups: (() => Promise<void> | void)[] = [];

beforeAll(async () => {
  pki = createTestPki();
  sim = await createAzureHubSim({
    tls: { cert: readFileSync(pki.serverCert), key: readFileSync(pki.serverKey), ca: pki.ca },
  });
  for (let i = 0; i < 12; i++) {
    keys[`d${i}`] = key();
    sim.addDevice(`d${i}`, { primaryKey: keys[`d${i}`]! });
  }
  sim.addPolicy('device', policyKey, ['DeviceConnect']);
  sim.addPolicy('registryRead', serviceKey, ['RegistryRead']);
});

afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
  sim.outage(false);
});

afterAll(async () => {
  await sim.close();
  pki.cleanup();
});

interface Harness {
  provider: Provider;
  inbound: InboundMessage[];
  events: ProviderEvent[];
  logs: LogRecord[];
  disconnects: Error[];
}

function make(
  settings: Record<string, unknown> = {},
  extra: { known?: string[]; reported?: Map<string, Record<string, unknown>> } = {},
): Harness {
  const config = configSchema.parse({
    gateway: { id: 'gw-az' },
    integrations: [
      {
        name: `az-${randomUUID().slice(0, 8)}`,
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
      },
    ],
  });
  const logs: LogRecord[] = [];
  const events: ProviderEvent[] = [];
  const inbound: InboundMessage[] = [];
  const disconnects: Error[] = [];
  const provider = createProvider({
    gatewayId: 'gw-az',
    integration: config.integrations[0]!,
    logger: createCaptureLogger(logs),
    report: (e) => events.push(e),
    knownDevices: () => extra.known ?? [],
    reportedState: () => extra.reported ?? new Map(),
  });
  provider.onCommand((m) => inbound.push(m));
  provider.onDisconnect((e) => disconnects.push(e));
  cleanups.push(() => provider.close());
  return { provider, inbound, events, logs, disconnects };
}

let rowId = 1;
function row(deviceId: string, topic: string, payload: string | Buffer): OutboundMessage {
  return {
    id: rowId++,
    deviceId,
    topic,
    payload: typeof payload === 'string' ? Buffer.from(payload) : payload,
    qos: 1,
    retain: false,
    enqueuedAt: Date.now(),
    attempts: 0,
  };
}

async function connected(h: Harness): Promise<void> {
  await h.provider.connect(AbortSignal.timeout(10_000));
}

async function waitUntil(what: string, predicate: () => boolean, timeoutMs = 20_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > until) throw new Error(`${what} did not happen within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Sends like the forwarder: a device-scoped refusal waits its retryAfterMs and tries again. */
async function deliver(p: Provider, message: OutboundMessage, maxTries = 200): Promise<number> {
  for (let tries = 1; ; tries++) {
    try {
      await p.publish(message);
      return tries;
    } catch (err) {
      const e = err as GatewayError;
      const scoped =
        e.code === ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE || e.code === ErrorCodes.PROVIDER_THROTTLED;
      if (!scoped || tries >= maxTries) throw err;
      await new Promise((r) => setTimeout(r, Math.min(Number(e.details?.retryAfterMs ?? 100), 2000)));
    }
  }
}

describe('streaming', () => {
  it('sends telemetry to devices/{id}/messages/events/ with a property bag, one link per device', async () => {
    const h = make();
    await connected(h);
    const before = sim.telemetry.length;
    const startConnects = sim.connectsOf('d0');
    await Promise.all([
      h.provider.publish(row('d0', 'devices/d0/telemetry', '{"t":1}')),
      h.provider.publish(row('d0', 'devices/d0/telemetry/power', 'raw')),
      h.provider.publish(row('d1', 'devices/d1/telemetry', '{"t":2}')),
    ]);
    const got = sim.telemetry.slice(before);
    expect(got.map((t) => t.deviceId).sort()).toEqual(['d0', 'd0', 'd1']);
    const json = got.find((t) => t.deviceId === 'd0' && t.payload.toString() === '{"t":1}')!;
    expect(json.properties['$.ct']).toBe('application/json');
    expect(json.properties['$.mid']).toMatch(/^gw-az-\d+$/);
    const power = got.find((t) => t.payload.toString() === 'raw')!;
    expect(power.properties.stream).toBe('power');
    expect(power.properties['$.ct']).toBeUndefined();
    expect(sim.connectsOf('d0') - startConnects).toBe(1);
  });

  it('updates reported properties from state and refuses what the hub cannot take', async () => {
    const h = make();
    await connected(h);
    await h.provider.publish(row('d2', 'devices/d2/state', '{"fw":"2.1","battery":{"pct":80}}'));
    await h.provider.publish(row('d2', 'devices/d2/state', '{"battery":{"pct":null}}'));
    expect(sim.twin('d2').reported).toEqual({ fw: '2.1', battery: {} });
    await expect(h.provider.publish(row('d2', 'devices/d2/state', '[1,2]'))).rejects.toMatchObject({
      code: ErrorCodes.PROVIDER_REJECTED,
      retryable: false,
    });
    await expect(h.provider.publish(row('d2', 'devices/d2/state', '{"bad.key":1}'))).rejects.toMatchObject({
      code: ErrorCodes.PROVIDER_REJECTED,
      retryable: false,
    });
    await expect(h.provider.publish(row('d2', 'devices/d2/other', 'x'))).rejects.toMatchObject({
      retryable: false,
    });
    await expect(
      h.provider.publish(row('d2', 'devices/d2/telemetry', Buffer.alloc(256 * 1024 + 1))),
    ).rejects.toMatchObject({ code: ErrorCodes.PROVIDER_TOO_LARGE });
  });

  it('delivers desired state (GET then patches), C2D messages and methods with their responses', async () => {
    const h = make({ methodTimeout: '1s' });
    sim.updateDesired('d3', { interval: 10, mode: 'eco' });
    await connected(h);
    h.provider.onDevicePresence!('d3', true);
    await waitUntil('desired from GET', () => h.inbound.some((m) => m.topic === 'devices/d3/desired'));
    const first = h.inbound.find((m) => m.topic === 'devices/d3/desired')!;
    expect(first.retain).toBe(true);
    expect(JSON.parse(first.payload.toString())).toEqual({ interval: 10, mode: 'eco' });

    sim.updateDesired('d3', { mode: null, level: 3 });
    await waitUntil(
      'desired patch',
      () => h.inbound.filter((m) => m.topic === 'devices/d3/desired').length === 2,
    );
    const merged = h.inbound.filter((m) => m.topic === 'devices/d3/desired')[1]!;
    expect(JSON.parse(merged.payload.toString())).toEqual({ interval: 10, level: 3 });

    sim.sendC2d('d3', '{"on":true}', { name: 'led' });
    await waitUntil('C2D', () => h.inbound.some((m) => m.topic === 'devices/d3/commands/led'));
    const c2d = JSON.parse(h.inbound.find((m) => m.topic === 'devices/d3/commands/led')!.payload.toString());
    expect(c2d).toMatchObject({ kind: 'c2d', payload: { on: true }, properties: { name: 'led' } });
    expect(typeof c2d.requestId).toBe('string');
    await sim.waitFor(() => sim.pendingC2d('d3') === 0, 10_000, 'C2D completed');

    const call = sim.invokeMethod('d3', 'reboot', { delay: 2 }, { timeoutMs: 10_000 });
    await waitUntil('method', () => h.inbound.some((m) => m.topic === 'devices/d3/commands/reboot'));
    const req = JSON.parse(
      h.inbound.find((m) => m.topic === 'devices/d3/commands/reboot')!.payload.toString(),
    );
    expect(req).toMatchObject({ kind: 'method', payload: { delay: 2 } });
    await h.provider.publish(
      row(
        'd3',
        'devices/d3/commands/reboot/response',
        JSON.stringify({ requestId: req.requestId, status: 202, payload: { ok: true } }),
      ),
    );
    await expect(call).resolves.toEqual({ status: 202, payload: { ok: true } });

    // A response after settings.methodTimeout has nobody waiting: dead-lettered with the reason.
    const late = sim.invokeMethod('d3', 'slow', {}, { timeoutMs: 3000 }).catch((e: Error) => e);
    await waitUntil('slow method', () => h.inbound.some((m) => m.topic === 'devices/d3/commands/slow'));
    const slow = JSON.parse(
      h.inbound.find((m) => m.topic === 'devices/d3/commands/slow')!.payload.toString(),
    );
    await waitUntil('method timeout', () =>
      h.events.some((e) => e.activityType === 'direct_method' && e.status === 'failed'),
    );
    await expect(
      h.provider.publish(
        row('d3', 'devices/d3/commands/slow/response', JSON.stringify({ requestId: slow.requestId })),
      ),
    ).rejects.toMatchObject({ code: ErrorCodes.PROVIDER_REJECTED, retryable: false });
    await late;
  });

  it('renews a token before it expires under traffic, one link at a time, losing nothing', async () => {
    // Tokens live 4 s (se has whole seconds); each link is swapped 2 s before expiry.
    const h = make({ tokenTtl: '4s', tokenRenewBefore: '2s' });
    await connected(h);
    const before = sim.telemetry.filter((t) => t.deviceId === 'd4').length;
    const connects = sim.connectsOf('d4');
    const kicksBefore = sim.events.filter((e) => e.type === 'kicked' && e.deviceId === 'd4').length;
    let sent = 0;
    const until = Date.now() + 7000;
    while (Date.now() < until) {
      await Promise.all(
        [0, 1, 2, 3].map(() => deliver(h.provider, row('d4', 'devices/d4/telemetry', `{"n":${sent++}}`))),
      );
    }
    const got = sim.telemetry.filter((t) => t.deviceId === 'd4').slice(before);
    const values = new Set(got.map((t) => (JSON.parse(t.payload.toString()) as { n: number }).n));
    expect(values.size).toBe(sent);
    expect(sim.connectsOf('d4') - connects).toBeGreaterThanOrEqual(3);
    expect(sim.events.some((e) => e.type === 'token_expired' && e.deviceId === 'd4')).toBe(false);
    expect(sim.events.filter((e) => e.type === 'kicked' && e.deviceId === 'd4').length).toBe(kicksBefore);
    expect(
      h.events.filter((e) => e.activityType === 'token_renewal' && e.status === 'success').length,
    ).toBeGreaterThanOrEqual(2);
  });
});

describe('quotas and faults', () => {
  it('parks only the throttled device (429002) while nine others flow, and then delivers its rows', async () => {
    const h = make();
    await connected(h);
    const ids = ['d0', 'd1', 'd2', 'd3', 'd4', 'd5', 'd6', 'd7', 'd8', 'd9'];
    await Promise.all(ids.map((id) => h.provider.publish(row(id, `devices/${id}/telemetry`, 'warm'))));
    sim.throttle('d5', { forMs: 2500 });
    const start = sim.telemetry.length;
    const refusals: GatewayError[] = [];
    await Promise.all(
      ids.map(async (id) => {
        for (let n = 0; n < 20; n++) {
          const message = row(id, `devices/${id}/telemetry`, `{"id":"${id}","n":${n}}`);
          try {
            await h.provider.publish(message);
          } catch (err) {
            refusals.push(err as GatewayError);
            await deliver(h.provider, message);
          }
        }
      }),
    );
    expect(refusals.length).toBeGreaterThan(0);
    for (const e of refusals) {
      expect([ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE, ErrorCodes.PROVIDER_THROTTLED]).toContain(e.code);
      expect(e.details?.deviceId).toBe('d5');
      expect(e.retryable).toBe(true);
    }
    const got = sim.telemetry.slice(start);
    for (const id of ids) {
      const ns = new Set(
        got
          .filter((t) => t.deviceId === id)
          .map((t) => (JSON.parse(t.payload.toString()) as { n: number }).n),
      );
      expect(ns.size, id).toBe(20);
    }
    expect(sim.events.some((e) => e.type === 'throttled' && e.deviceId === 'd5' && e.code === 429002)).toBe(
      true,
    );
    expect(h.events.some((e) => e.activityType === 'device_link' && e.metadata?.deviceId === 'd5')).toBe(
      true,
    );
    expect(h.disconnects).toHaveLength(0);
  });

  it('answers a twin 429 with a throttle scoped to the device', async () => {
    const h = make();
    await connected(h);
    await h.provider.publish(row('d6', 'devices/d6/telemetry', 'x'));
    sim.throttle('d6', { forMs: 1500 });
    const err = (await h.provider
      .publish(row('d6', 'devices/d6/state', '{"a":1}'))
      .catch((e: unknown) => e)) as GatewayError;
    expect(err.code).toBe(ErrorCodes.PROVIDER_THROTTLED);
    expect(err.details).toMatchObject({ deviceId: 'd6' });
    expect(Number(err.details?.retryAfterMs)).toBeGreaterThan(0);
  });

  it('reports a hub outage through onDisconnect, refuses to connect during it, and loses nothing', async () => {
    const h = make();
    await connected(h);
    const sentBefore = sim.telemetry.length;
    const ns: number[] = [];
    for (let n = 0; n < 10; n++) {
      await h.provider.publish(row('d7', 'devices/d7/telemetry', `{"n":${n}}`));
      ns.push(n);
    }
    sim.outage(true);
    // Rows keep coming: each fails (device-scoped or not connected), none is acknowledged falsely.
    const pending = [10, 11, 12].map((n) => row('d7', 'devices/d7/telemetry', `{"n":${n}}`));
    for (const m of pending) await h.provider.publish(m).catch(() => {});
    await waitUntil('disconnect reported', () => h.disconnects.length === 1, 30_000);
    expect((h.disconnects[0] as GatewayError).code).toBe(ErrorCodes.PROVIDER_CONNECT);
    await expect(h.provider.connect(AbortSignal.timeout(5000))).rejects.toMatchObject({ retryable: true });
    sim.outage(false);
    await connected(h);
    for (const m of pending) await deliver(h.provider, m);
    const got = sim.telemetry.slice(sentBefore).filter((t) => t.deviceId === 'd7');
    const values = new Set(got.map((t) => (JSON.parse(t.payload.toString()) as { n: number }).n));
    expect([...values].sort((a, b) => a - b)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
  });

  it('keeps a present device linked past the idle timeout, closes idle ones, and stays within maxLinks', async () => {
    const h = make({ idleTimeout: '500ms', maxLinks: 2 });
    await connected(h);
    h.provider.onDevicePresence!('d8', true);
    await sim.waitFor(() => sim.connectedDevices().includes('d8'), 10_000, 'd8 linked');
    await h.provider.publish(row('d9', 'devices/d9/telemetry', 'x'));
    await sim.waitFor(() => !sim.connectedDevices().includes('d9'), 10_000, 'idle d9 closed');
    expect(sim.connectedDevices()).toContain('d8');
    // Two links at most: d10 takes d11's place rather than a third link.
    await h.provider.publish(row('d11', 'devices/d11/telemetry', 'x'));
    await h.provider.publish(row('d10', 'devices/d10/telemetry', 'x'));
    await sim.waitFor(() => !sim.connectedDevices().includes('d11'), 10_000, 'd11 evicted');
    expect(
      sim
        .connectedDevices()
        .filter((id) => ['d8', 'd9', 'd10', 'd11'].includes(id))
        .sort(),
    ).toEqual(['d10', 'd8']);
    h.provider.onDevicePresence!('d8', false);
    await sim.waitFor(() => !sim.connectedDevices().includes('d8'), 10_000, 'd8 closed once gone');
  });

  it('reopens a kicked device link and keeps sending', async () => {
    const h = make();
    await connected(h);
    await h.provider.publish(row('d1', 'devices/d1/telemetry', 'a'));
    sim.kick('d1');
    await waitUntil('link lost', () =>
      h.logs.some((l) => l.msg === 'device_link_lost' && l.deviceId === 'd1'),
    );
    expect(await deliver(h.provider, row('d1', 'devices/d1/telemetry', 'b'))).toBeGreaterThanOrEqual(1);
    expect(h.disconnects).toHaveLength(0);
  });
});

describe('authentication and settings', () => {
  it('connects devices with a DeviceConnect policy key', async () => {
    const h = make({ auth: { type: 'policy', policyName: 'device', key: policyKey } });
    await connected(h);
    await h.provider.publish(row('d0', 'devices/d0/telemetry', 'via-policy'));
    expect(sim.telemetry.some((t) => t.payload.toString() === 'via-policy')).toBe(true);
  });

  it('says in one sentence what is wrong: a wrong key, a wrong host, an expired token', async () => {
    const wrong = make({ auth: { type: 'device-keys', keys: { d0: key() } } });
    const r1 = await wrong.provider.testConnection(AbortSignal.timeout(10_000));
    expect(r1.ok).toBe(false);
    expect(r1.error?.code).toBe(ErrorCodes.PROVIDER_AUTH);
    expect(r1.error?.message).toMatch(
      /^localhost:\d+ refused device d0 as not authorized \(CONNACK 5\); check settings\.hostName, that the device exists in the hub, and its key, policy or token$/,
    );

    // TLS accepts 127.0.0.1 (in the certificate), but the hub is `localhost`: usernames and tokens name the wrong host.
    const host = make({ hostName: '127.0.0.1', auth: { type: 'device-keys', keys: { d0: keys.d0 } } });
    const r2 = await host.provider.testConnection(AbortSignal.timeout(10_000));
    expect(r2.error?.code).toBe(ErrorCodes.PROVIDER_AUTH);

    const closedPort = make({ port: 1, auth: { type: 'device-keys', keys: { d0: keys.d0 } } });
    const r3 = await closedPort.provider.testConnection(AbortSignal.timeout(10_000));
    expect(r3.error?.message).toMatch(
      /^cannot reach the hub at localhost:1: .*; check settings.hostName, settings.address and settings.port$/,
    );

    const se = Math.floor(Date.now() / 1000) - 60;
    const token = createSasToken({ resource: 'localhost/devices/d0', key: keys.d0!, expiresAt: se });
    const expired = make({ auth: { type: 'sas-tokens', tokens: { d0: token } } });
    const r4 = await expired.provider.testConnection(AbortSignal.timeout(10_000));
    expect(r4.error?.message).toBe(
      `the SAS token of device d0 in settings.auth.tokens expired at ${new Date(se * 1000).toISOString()}; make a new one with a later se, or give the device key instead`,
    );
    await expect(expired.provider.connect(AbortSignal.timeout(5000))).rejects.toMatchObject({
      code: ErrorCodes.PROVIDER_AUTH,
    });

    const service = make({ service: { policyName: 'registryRead', key: key(), port: sim.servicePort } });
    const r5 = await service.provider.testConnection(AbortSignal.timeout(10_000));
    expect(r5.error?.message).toMatch(
      /service API refused policy registryRead \(HTTP 401\); check settings.service.key/,
    );

    const good = make(
      { service: { policyName: 'registryRead', key: serviceKey, port: sim.servicePort } },
      { known: ['d0'] },
    );
    const ok = await good.provider.testConnection(AbortSignal.timeout(10_000));
    expect(ok).toMatchObject({ ok: true, details: { deviceId: 'd0', service: 'twin query accepted' } });
  });

  it('refuses settings it cannot use, at check-config', () => {
    const parse = (settings: Record<string, unknown>) =>
      configSchema.safeParse({
        gateway: { id: 'gw' },
        integrations: [{ name: 'a', id: randomUUID(), type: 'azure-iot-hub', settings }],
      });
    const base = { hostName: 'hub.azure-devices.net', auth: { type: 'policy', key: key() } };
    expect(parse(base).success).toBe(true);
    const messages = (s: Record<string, unknown>) => {
      const r = parse(s);
      return r.success ? [] : r.error.issues.map((i) => i.message);
    };
    expect(messages({ ...base, auth: { type: 'policy', key: 'not base64!' } })).toEqual([
      'is not a base64 symmetric key; copy the primary key of the device or shared access policy from the hub',
    ]);
    expect(messages({ ...base, tokenTtl: '10m', tokenRenewBefore: '10m' })[0]).toMatch(
      /must be shorter than tokenTtl/,
    );
    expect(messages({ ...base, hostName: 'https://hub.azure-devices.net' })[0]).toMatch(
      /must be the hub host name/,
    );
    expect(messages({ ...base, auth: { type: 'sas-tokens', tokens: { d: 'nope' } } })[0]).toMatch(
      /is not a SharedAccessSignature/,
    );

    // Across settings, routes and the configured devices.
    const withRoutes = (settings: Record<string, unknown>, routes: { from: string }[]) => {
      const r = configSchema.safeParse({
        gateway: { id: 'gw' },
        broker: { devices: [{ id: 'sensor-1' }, { id: 'sensor-2' }] },
        integrations: [{ name: 'a', id: randomUUID(), type: 'azure-iot-hub', settings, routes }],
      });
      // Only the integration's problems (the devices here have no passwords, which is beside the point).
      return r.success
        ? []
        : r.error.issues
            .filter((i) => i.path[0] === 'integrations')
            .map((i) => `${i.path.join('.')}: ${i.message}`);
    };
    expect(withRoutes(base, [{ from: 'devices/+/desired' }])).toEqual([
      'integrations.0.routes.0.from: this route matches nothing azure-iot-hub sends (devices/<id>/telemetry[/…], /state, /commands/<name>/response), so every row it queues would be dead-lettered: change or remove it',
    ]);
    expect(
      withRoutes({ ...base, auth: { type: 'device-keys', keys: { 'sensor-1': key() } } }, [
        { from: 'devices/#' },
      ]),
    ).toEqual([
      'integrations.0.settings.auth.keys: sensor-2 is routed to Azure IoT Hub but has no key here: add it, or use a DeviceConnect policy',
    ]);
    expect(withRoutes(base, [{ from: 'devices/+/telemetry/#' }, { from: 'devices/+/state' }])).toEqual([]);
  });
});

describe('sync operations', () => {
  it('imports desired state with a twin GET per device, and exports reported state', async () => {
    sim.updateDesired('d9', { target: 21 });
    const reported = new Map<string, Record<string, unknown>>([
      ['d10', { fw: '3.0' }],
      ['d11', { fw: '3.1' }],
    ]);
    const h = make({ twinOpsPerSecond: 50 }, { known: ['d9', 'd10'], reported });
    const imported = await h.provider.import(AbortSignal.timeout(30_000));
    // known devices plus the ones with keys in settings
    expect(imported.recordsFailed).toBe(0);
    expect(imported.recordsSucceeded).toBe(imported.recordsProcessed);
    const d9 = h.inbound.filter((m) => m.topic === 'devices/d9/desired').at(-1)!;
    expect(JSON.parse(d9.payload.toString())).toMatchObject({ target: 21 });
    expect(d9.retain).toBe(true);
    const exported = await h.provider.export(AbortSignal.timeout(30_000));
    expect(exported).toMatchObject({ recordsProcessed: 2, recordsSucceeded: 2, recordsFailed: 0 });
    expect(sim.twin('d10').reported).toMatchObject({ fw: '3.0' });
    expect(sim.twin('d11').reported).toMatchObject({ fw: '3.1' });
    expect(h.events.some((e) => e.activityType === 'twin_get' && e.status === 'success')).toBe(true);
    expect(h.events.some((e) => e.activityType === 'twin_patch' && e.metadata?.deviceId === 'd11')).toBe(
      true,
    );
  });

  it('imports through the service twin query in pages of 1000 with x-ms-continuation', async () => {
    for (let i = 0; i < 1500; i++) sim.addDevice(`bulk-${String(i).padStart(4, '0')}`, { primaryKey: key() });
    sim.updateDesired('bulk-1234', { color: 'blue' });
    const h = make(
      { service: { policyName: 'registryRead', key: serviceKey, port: sim.servicePort } },
      { known: ['bulk-1234', 'd0'] },
    );
    const before = sim.serviceRequests.length;
    const result = await h.provider.import(AbortSignal.timeout(30_000));
    const requests = sim.serviceRequests.slice(before);
    expect(requests.length).toBe(2);
    expect(requests[0]!.headers['x-ms-max-item-count']).toBe('1000');
    expect(requests[1]!.headers['x-ms-continuation']).toBeDefined();
    expect(result.recordsProcessed).toBe(1512);
    const bulk = h.inbound.find((m) => m.topic === 'devices/bulk-1234/desired')!;
    expect(JSON.parse(bulk.payload.toString())).toEqual({ color: 'blue' });
    expect(h.inbound.some((m) => m.topic === 'devices/bulk-0001/desired')).toBe(false);
    expect(h.events.filter((e) => e.activityType === 'twin_query')).toHaveLength(2);
  });
});
