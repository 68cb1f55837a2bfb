import { randomUUID } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { configSchema } from '../../../src/config/schema.js';
import { ErrorCodes, GatewayError } from '../../../src/errors.js';
import type {
  InboundMessage,
  OutboundMessage,
  Provider,
  ProviderEvent,
} from '../../../src/providers/provider.js';
import { createProvider, loadProviders } from '../../../src/providers/registry.js';
import { createTestPki, type TestPki } from '../../helpers/certs.js';
import { createCaptureLogger, type LogRecord } from '../../helpers/capture-logger.js';
import { startGoliothSim, type GoliothSim } from '../../sims/golioth/golioth-sim.js';

// Built-in providers load on first use; the gateway loads them as it does here.
await loadProviders(['golioth']);

// The golioth provider against the Golioth simulator (test/sims/golioth): REST over HTTPS with
// the test CA, CoAP over DTLS-PSK through coap-server-openssl.

let pki: TestPki;
let sim: GoliothSim;
const PROJECT = 'greenhouse';
const KEY = 'key-greenhouse';

interface Made {
  provider: Provider;
  events: ProviderEvent[];
  logs: LogRecord[];
  inbound: InboundMessage[];
  reported: Map<string, Record<string, unknown>>;
}
const cleanups: (() => Promise<void>)[] = [];

function make(settings: Record<string, unknown> = {}, known: string[] = []): Made {
  const config = configSchema.parse({
    gateway: { id: 'gw-test' },
    integrations: [
      {
        name: `golioth-${randomUUID().slice(0, 8)}`,
        id: randomUUID(),
        type: 'golioth',
        settings: {
          projectId: PROJECT,
          apiKey: KEY,
          baseUrl: sim.restUrl,
          ca: pki.caCert,
          coapHost: '127.0.0.1',
          coapPort: sim.coap.port,
          coapAckTimeout: '1s',
          coapMaxRetransmit: 2,
          handshakeTimeout: '10s',
          ...settings,
        },
      },
    ],
  });
  const logs: LogRecord[] = [];
  const events: ProviderEvent[] = [];
  const inbound: InboundMessage[] = [];
  const reported = new Map<string, Record<string, unknown>>();
  const integration = config.integrations[0]!;
  const provider = createProvider({
    gatewayId: 'gw-test',
    integration,
    logger: createCaptureLogger(logs).child({ integrationId: integration.id }),
    report: (e) => events.push(e),
    knownDevices: () => known,
    reportedState: () => reported,
  });
  provider.onCommand((m) => inbound.push(m));
  // Connecting opens nothing (sessions open per device); it makes the provider take publishes.
  void provider.connect(new AbortController().signal);
  cleanups.push(() => provider.close());
  return { provider, events, logs, inbound, reported };
}

let rowId = 1;
function row(deviceId: string, topic: string, payload: unknown): OutboundMessage {
  return {
    id: rowId++,
    deviceId,
    topic,
    payload: Buffer.from(typeof payload === 'string' ? payload : JSON.stringify(payload)),
    qos: 1,
    retain: false,
    enqueuedAt: Date.now(),
    attempts: 0,
  };
}

async function waitFor(check: () => boolean, ms = 15_000) {
  const until = Date.now() + ms;
  while (!check()) {
    if (Date.now() > until) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

beforeAll(async () => {
  pki = createTestPki();
  sim = await startGoliothSim(pki);
  sim.addProject(PROJECT, KEY);
  sim.addProject('elsewhere', 'key-elsewhere');
  sim.addDevice(PROJECT, {
    name: 'fan-1',
    hardwareIds: ['hw-fan-1'],
    blueprintId: 'bp-fan',
    psk: { key: 'fan-1-secret' },
  });
  sim.addDevice(PROJECT, { name: 'fan-2', hardwareIds: ['aa:bb:cc'], psk: { key: 'fan-2-secret' } });
  sim.addDevice(PROJECT, { name: 'not-local' });
  await sim.applyCredentials();
});

afterEach(async () => {
  sim.rest.faults.outage = false;
  sim.rest.faults.throttle = { remaining: 0, retryAfterSeconds: 1 };
  sim.coap.setOutage(false);
  while (cleanups.length > 0) await cleanups.pop()!();
});

afterAll(async () => {
  await sim?.close();
  pki?.cleanup();
});

describe('golioth provider: testConnection', () => {
  it('looks the project up and reports its name and latency', async () => {
    const { provider } = make();
    const result = await provider.testConnection(AbortSignal.timeout(30_000));
    expect(result.ok).toBe(true);
    expect(result.details).toMatchObject({ projectId: PROJECT, projectName: PROJECT });
    expect(result.latencyMs).toBeGreaterThanOrEqual(0);
    const call = sim.rest.requests.at(-1)!;
    expect(call.path).toBe(`/v1/projects/${PROJECT}`);
    expect(call.requestId).toMatch(/^[0-9a-f-]{36}$/);
  });

  it('says what to fix for a wrong key (401), a key of another project (403) and an unknown project (404)', async () => {
    const wrongKey = await make({ apiKey: 'nope' }).provider.testConnection(AbortSignal.timeout(30_000));
    expect(wrongKey.ok).toBe(false);
    expect(wrongKey.error?.code).toBe(ErrorCodes.PROVIDER_AUTH);
    expect(wrongKey.error?.message).toMatch(/refused the API key \(401\): check settings\.apiKey/);

    const foreign = await make({ apiKey: 'key-elsewhere' }).provider.testConnection(
      AbortSignal.timeout(30_000),
    );
    expect(foreign.error?.message).toMatch(/no access to project greenhouse \(403\).*settings\.projectId/);

    const unknown = await make({ projectId: 'no-such-project' }).provider.testConnection(
      AbortSignal.timeout(30_000),
    );
    expect(unknown.error?.code).toBe(ErrorCodes.PROVIDER_REJECTED);
    expect(unknown.error?.message).toMatch(
      /has no project no-such-project \(404\): check settings\.projectId/,
    );
  });
});

describe('golioth provider: import and export', () => {
  it('imports LightDB State and effective settings as retained desired state of the devices it knows, matched by name or hardware id', async () => {
    sim.setState(PROJECT, 'fan-1', 'desired', { speed: 2 });
    sim.setState(PROJECT, 'fan-2', 'desired', { speed: 5 });
    sim.addSetting(PROJECT, { key: 'RPM_MAX', dataType: 'integer', value: 1000 });
    sim.addSetting(PROJECT, { key: 'RPM_MAX', dataType: 'integer', value: 1200, blueprintId: 'bp-fan' });
    sim.addSetting(PROJECT, { key: 'RPM_MAX', dataType: 'integer', value: 1500, deviceName: 'fan-2' });
    // fan-2 is known locally by its hardware id; `ghost` has no Golioth device.
    const { provider, inbound, events } = make({}, ['fan-1', 'aa:bb:cc', 'ghost']);
    const result = await provider.import(AbortSignal.timeout(30_000));
    expect(result).toMatchObject({ recordsProcessed: 2, recordsSucceeded: 2, recordsFailed: 0 });
    expect(result.details).toMatchObject({ cloudDevices: 3, matched: 2, pages: 1, requests: 3 });
    const byTopic = Object.fromEntries(inbound.map((m) => [m.topic, JSON.parse(m.payload.toString())]));
    expect(byTopic).toEqual({
      'devices/fan-1/desired': { state: { speed: 2 }, settings: { RPM_MAX: 1200 } },
      'devices/aa:bb:cc/desired': { state: { speed: 5 }, settings: { RPM_MAX: 1500 } },
    });
    expect(inbound.every((m) => m.retain && m.qos === 1)).toBe(true);
    expect(events.filter((e) => e.status === 'success').map((e) => e.activityType)).toEqual([
      'golioth_list_devices',
      'golioth_device_settings',
      'golioth_device_settings',
    ]);
  });

  it('exports reported state to LightDB State at the reported path, leaving the desired path alone', async () => {
    const { provider, reported } = make({ reportedPath: 'gw/reported' });
    reported.set('fan-1', { rpm: 900, mode: 'auto' });
    reported.set('ghost', { rpm: 1 });
    const result = await provider.export(AbortSignal.timeout(30_000));
    expect(result).toMatchObject({ recordsProcessed: 2, recordsSucceeded: 1, recordsFailed: 1 });
    expect(sim.device(PROJECT, 'fan-1').state).toMatchObject({
      gw: { reported: { rpm: 900, mode: 'auto' } },
      desired: { speed: 2 },
    });
  });

  it('waits out a 429 for its Retry-After and then succeeds', async () => {
    const { provider, logs } = make();
    sim.rest.faults.throttle = { remaining: 1, retryAfterSeconds: 1 };
    const before = sim.rest.requests.length;
    const result = await provider.testConnection(AbortSignal.timeout(30_000));
    expect(result.ok).toBe(true);
    const calls = sim.rest.requests.slice(before);
    expect(calls.map((c) => c.status)).toEqual([429, 200]);
    // Same request id on the retry; the retry came no sooner than Retry-After said.
    expect(calls[1]!.requestId).toBe(calls[0]!.requestId);
    expect(calls[1]!.at - calls[0]!.at).toBeGreaterThanOrEqual(990);
    expect(logs.some((l) => l.msg === 'retry_attempt' && l.delayMs === 1000 && l.status === 429)).toBe(true);
  });

  it('fails a sync while the API is down with a retryable error, and the next sync after it is back succeeds', async () => {
    const { provider, reported } = make({ requestTimeout: '2s' });
    reported.set('fan-2', { rpm: 1 });
    sim.rest.faults.outage = 'refuse';
    const err = await provider.export(AbortSignal.timeout(60_000)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GatewayError);
    expect((err as GatewayError).retryable).toBe(true);
    expect((err as GatewayError).message).toMatch(
      /cannot reach the Golioth API at https:\/\/127\.0\.0\.1:\d+/,
    );
    sim.rest.faults.outage = false;
    const again = await provider.export(AbortSignal.timeout(30_000));
    expect(again).toMatchObject({ recordsSucceeded: 1, recordsFailed: 0 });
    expect(sim.device(PROJECT, 'fan-2').state).toMatchObject({ reported: { rpm: 1 } });
  }, 120_000);
});

describe('golioth provider: telemetry over CoAP/DTLS-PSK', () => {
  it('posts each device’s telemetry to /.s/<streamPath>[/<stream>] as that device, and REST stream queries find it', async () => {
    const { provider, events } = make({
      devices: { 'fan-1': { psk: 'fan-1-secret' }, 'fan-2': { psk: 'fan-2-secret' } },
    });
    const before = sim.stream(PROJECT).length;
    await provider.publish(row('fan-1', 'devices/fan-1/telemetry', { rpm: 800 }));
    await provider.publish(row('fan-2', 'devices/fan-2/telemetry/env', { temp: 21.5 }));
    await waitFor(() => sim.stream(PROJECT).length === before + 2);
    const rows = sim.stream(PROJECT).slice(before);
    expect(rows.map((r) => [r.deviceId, r.data])).toEqual([
      [sim.device(PROJECT, 'fan-1').id, { telemetry: { rpm: 800 } }],
      [sim.device(PROJECT, 'fan-2').id, { telemetry: { env: { temp: 21.5 } } }],
    ]);
    expect(sim.coap.requests.slice(-2).map((r) => [r.identity, r.path])).toEqual([
      ['fan-1@greenhouse', '/.s/telemetry'],
      ['fan-2@greenhouse', '/.s/telemetry/env'],
    ]);
    expect(
      events.filter((e) => e.activityType === 'device_session_opened' && e.status === 'success'),
    ).toHaveLength(2);
  });

  it('refuses telemetry of a device without a PSK for good (dead letter) with a clear reason; sends non-JSON as octet-stream', async () => {
    const { provider } = make({ devices: { 'fan-1': { psk: 'fan-1-secret' } } });
    const noPsk = await provider
      .publish(row('fan-2', 'devices/fan-2/telemetry', { rpm: 1 }))
      .catch((e: unknown) => e);
    expect(noPsk).toMatchObject({ code: ErrorCodes.PROVIDER_AUTH, retryable: false });
    expect((noPsk as Error).message).toMatch(/fan-2 has no PSK in settings\.devices/);
    const streamBefore = sim.stream(PROJECT).length;
    await provider.publish(row('fan-1', 'devices/fan-1/telemetry', 'rpm=1'));
    await waitFor(() => sim.coap.requests.some((r) => r.payload === 'rpm=1'));
    expect(sim.coap.requests.find((r) => r.payload === 'rpm=1')?.contentFormat).toBe(
      'application/octet-stream',
    );
    // LightDB Stream keeps JSON only; a pipeline would have to transform this.
    expect(sim.stream(PROJECT).length).toBe(streamBefore);
  });

  it('parks only the device whose PSK is wrong (deviceUnavailable), while another device goes on', async () => {
    const { provider } = make({
      devices: { 'fan-1': { psk: 'wrong' }, 'fan-2': { psk: 'fan-2-secret' } },
      handshakeTimeout: '3s',
    });
    const bad = await provider
      .publish(row('fan-1', 'devices/fan-1/telemetry', { rpm: 1 }))
      .catch((e: unknown) => e);
    expect(bad).toMatchObject({
      code: ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE,
      details: { deviceId: 'fan-1' },
    });
    expect((bad as GatewayError).details?.retryAfterMs).toBeGreaterThan(0);
    await provider.publish(row('fan-2', 'devices/fan-2/telemetry', { rpm: 2 }));
    // While it backs off, the device fails at once without a handshake.
    const again = await provider
      .publish(row('fan-1', 'devices/fan-1/telemetry', { rpm: 1 }))
      .catch((e: unknown) => e);
    expect(again).toMatchObject({ code: ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE });
  });

  it('during a CoAP outage the device is parked (not dead-lettered), and its rows go through once the path is back', async () => {
    const { provider } = make({ devices: { 'fan-1': { psk: 'fan-1-secret' } } });
    await provider.publish(row('fan-1', 'devices/fan-1/telemetry', { n: 1 }));
    sim.coap.setOutage(true);
    const err = await provider
      .publish(row('fan-1', 'devices/fan-1/telemetry', { n: 2 }))
      .catch((e: unknown) => e);
    expect(err).toMatchObject({ code: ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE, retryable: true });
    sim.coap.setOutage(false);
    const before = sim.stream(PROJECT).length;
    // The forwarder would retry after retryAfterMs; the session is reopened on that retry.
    let delivered = false;
    for (let i = 0; i < 20 && !delivered; i++) {
      await new Promise((r) => setTimeout(r, 500));
      delivered = await provider.publish(row('fan-1', 'devices/fan-1/telemetry', { n: 2 })).then(
        () => true,
        () => false,
      );
    }
    expect(delivered).toBe(true);
    await waitFor(() => sim.stream(PROJECT).length === before + 1);
    expect(sim.stream(PROJECT).at(-1)!.data).toEqual({ telemetry: { n: 2 } });
  }, 60_000);

  it('dead-letters topics Golioth has no mapping for, and declares its limits', async () => {
    const { provider } = make();
    const err = await provider
      .publish(row('fan-1', 'devices/fan-1/commands/x/response', {}))
      .catch((e: unknown) => e);
    expect(err).toMatchObject({ code: ErrorCodes.PROVIDER_REJECTED, retryable: false });
    expect(provider.limits).toEqual({ maxPublishRate: { perSecond: 20, scope: 'device' } });
    expect(provider.maxPayloadBytes).toBe(1024);
  });
});

describe('golioth settings at check-config', () => {
  const base = {
    gateway: { id: 'gw' },
    broker: {
      devices: [
        { id: 'fan-1', passwordHash: '$scrypt$x' },
        { id: 'fan-2', passwordHash: '$scrypt$x' },
      ],
    },
  };
  const integration = (settings: Record<string, unknown>, routes: unknown[]) => ({
    name: 'g',
    id: randomUUID(),
    type: 'golioth',
    settings: { projectId: 'p', apiKey: 'k', ...settings },
    routes,
  });
  const problems = (cfg: unknown) => {
    const r = configSchema.safeParse(cfg);
    return r.success ? [] : r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`);
  };

  it('says a telemetry route needs PSKs when none are configured', () => {
    expect(problems({ ...base, integrations: [integration({}, [{ from: 'devices/+/telemetry' }])] })).toEqual(
      [
        expect.stringMatching(
          /^integrations\.0\.routes\.0\.from: this route sends telemetry to Golioth.*add settings\.devices\.<id>\.psk/,
        ),
      ],
    );
  });

  it('names the listed devices whose telemetry is routed but that have no PSK', () => {
    const cfg = {
      ...base,
      integrations: [
        integration({ devices: { 'fan-1': { psk: 's' } } }, [{ from: 'devices/+/telemetry/#' }]),
      ],
    };
    expect(problems(cfg)).toEqual([
      expect.stringMatching(/telemetry of fan-2 is routed to Golioth but has no PSK/),
    ]);
  });

  it('accepts state-only routes without PSKs, and refuses unknown settings keys', () => {
    expect(problems({ ...base, integrations: [integration({}, [{ from: 'devices/+/state' }])] })).toEqual([]);
    expect(problems({ ...base, integrations: [integration({ apikey: 'x' }, [])] })).toEqual([
      expect.stringMatching(/Unrecognized key/),
    ]);
  });
});
