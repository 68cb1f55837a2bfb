import { randomUUID } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { configSchema } from '../../../src/config/schema.js';
import { ErrorCodes, GatewayError } from '../../../src/errors.js';
import { createLogger } from '../../../src/logger.js';
import type {
  InboundMessage,
  OutboundMessage,
  Provider,
  ProviderEvent,
} from '../../../src/providers/provider.js';
import { createProvider, loadProviders } from '../../../src/providers/registry.js';
import type { AwsIotSim } from '../../sims/aws-iot/aws-iot-sim.js';
import { createAwsWorld, SIM_ENDPOINT, type AwsWorld } from '../../sims/aws-iot/fixture.js';

// Built-in providers load on first use; the gateway loads them as it does here.
await loadProviders(['aws-iot']);

let world: AwsWorld;
const cleanups: (() => Promise<void> | void)[] = [];

beforeAll(() => {
  world = createAwsWorld('site-gw');
});
afterAll(() => world.cleanup());
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

interface Harness {
  provider: Provider;
  inbound: InboundMessage[];
  events: ProviderEvent[];
  disconnects: Error[];
  logs: string[];
}

function makeProvider(
  settings: Record<string, unknown>,
  extra: { knownDevices?: string[]; reported?: Map<string, Record<string, unknown>> } = {},
): Harness {
  const config = configSchema.parse({
    gateway: { id: 'site-gw' },
    integrations: [{ name: 'aws', id: randomUUID(), type: 'aws-iot', settings }],
  });
  const logs: string[] = [];
  const logger = createLogger({
    level: 'debug',
    gatewayId: 'site-gw',
    destination: new Writable({
      write(chunk: Buffer, _enc, cb) {
        logs.push(...chunk.toString('utf8').split('\n').filter(Boolean));
        cb();
      },
    }),
  });
  const events: ProviderEvent[] = [];
  const provider = createProvider({
    gatewayId: 'site-gw',
    integration: config.integrations[0]!,
    logger,
    report: (e) => events.push(e),
    knownDevices: () => extra.knownDevices ?? [],
    reportedState: () => extra.reported ?? new Map(),
  });
  const inbound: InboundMessage[] = [];
  const disconnects: Error[] = [];
  provider.onCommand((m) => inbound.push(m));
  provider.onDisconnect((e) => disconnects.push(e));
  cleanups.push(() => provider.close());
  return { provider, inbound, events, disconnects, logs };
}

let rowId = 0;
function row(topic: string, payload: string | Buffer, qos: 0 | 1 | 2 = 1): OutboundMessage {
  const deviceId = topic.split('/')[1]!;
  return {
    id: ++rowId,
    deviceId,
    topic,
    payload: typeof payload === 'string' ? Buffer.from(payload) : payload,
    qos,
    retain: false,
    enqueuedAt: Date.now(),
    attempts: 0,
  };
}

async function connected(
  options: Parameters<AwsWorld['start']>[0] = {},
  overrides: Record<string, unknown> = {},
  extra: Parameters<typeof makeProvider>[1] = {},
): Promise<{ sim: AwsIotSim; h: Harness }> {
  const sim = await world.start(options);
  cleanups.push(() => sim.stop());
  const h = makeProvider(world.settings(sim, overrides), extra);
  await h.provider.connect(new AbortController().signal);
  return { sim, h };
}

describe('aws-iot provider: the connection (§1.1, §1.2)', () => {
  it('connects with mTLS and SNI as the gateway thing, declares AWS limits, subscribes with + for thing names', async () => {
    const { sim, h } = await connected();
    const [client] = sim.clients();
    expect(client).toMatchObject({ clientId: 'site-gw', sni: SIM_ENDPOINT, protocolVersion: 5 });
    expect(client!.subscriptions).toContain('$aws/things/+/shadow/update/delta');
    expect(client!.subscriptions).toContain('cmd/site-gw/+/+');
    expect(client!.subscriptions.length).toBeLessThanOrEqual(50);
    expect(h.provider.limits).toEqual({
      maxPublishRate: { perSecond: 100, scope: 'connection' },
      minReconnectDelayMs: 1000,
    });
    expect(h.provider.maxPayloadBytes).toBe(128 * 1024);
    expect(h.provider.maxInflight).toBe(100);
  });

  it('on port-443 style endpoints offers ALPN x-amzn-mqtt-ca, without which the endpoint does not speak MQTT', async () => {
    const sim = await world.start({ alpn443: true });
    cleanups.push(() => sim.stop());
    const without = makeProvider(world.settings(sim, { alpn: false }));
    await expect(without.provider.connect(new AbortController().signal)).rejects.toBeInstanceOf(GatewayError);
    const withAlpn = makeProvider(world.settings(sim, { alpn: true }));
    await withAlpn.provider.connect(new AbortController().signal);
    expect(sim.clients()[0]).toMatchObject({ alpn: 'x-amzn-mqtt-ca' });
  });

  it('another connection with the same client id takes the link over: reported as a loss naming the cause', async () => {
    const { sim, h } = await connected({ connectIntervalMs: 0 });
    const other = makeProvider(world.settings(sim));
    await other.provider.connect(new AbortController().signal);
    await sim.waitFor(() => h.disconnects.length === 1, 10_000, 'the takeover');
    expect(h.disconnects[0]!.message).toMatch(/another client connected with the client id site-gw/);
  });
});

describe('aws-iot provider: mapping (§1.3, §1.5)', () => {
  it('telemetry goes to the topic template, streams appended; QoS 2 is sent as QoS 1', async () => {
    const { sim, h } = await connected();
    await h.provider.publish(row('devices/pump-1/telemetry', '{"t":1}', 2));
    await h.provider.publish(row('devices/pump-1/telemetry/vibration', '{"v":2}'));
    expect(sim.received.map((r) => [r.topic, r.payload.toString(), r.qos])).toEqual([
      ['dt/site-gw/pump-1/telemetry', '{"t":1}', 1],
      ['dt/site-gw/pump-1/telemetry/vibration', '{"v":2}', 1],
    ]);
    expect(sim.events.some((e) => e.type === 'qos2_ignored')).toBe(false);
  });

  it('state becomes the reported section of the named shadow and resolves on update/accepted', async () => {
    const { sim, h } = await connected({}, { shadowName: 'gateway', thingName: 'site-{deviceId}' });
    await h.provider.publish(row('devices/pump-1/state', '{"rpm":1200,"mode":"run"}'));
    expect(sim.shadows.document('site-pump-1', 'gateway')).toMatchObject({
      state: { reported: { rpm: 1200, mode: 'run' } },
      version: 1,
    });
    const [request] = sim.shadowRequests;
    expect(request!.topic).toBe('$aws/things/site-pump-1/shadow/name/gateway/update');
    expect(JSON.parse(request!.payload.toString())).toMatchObject({ clientToken: expect.any(String) });
  });

  it('a rejected update is a non-retryable error with the service message; a non-object state is refused before sending', async () => {
    const { h } = await connected({ shadow: { maxDepth: 2 } });
    const deep = h.provider.publish(row('devices/pump-1/state', '{"a":{"b":{"c":1}}}'));
    await expect(deep).rejects.toMatchObject({ code: ErrorCodes.PROVIDER_REJECTED, retryable: false });
    await expect(deep).rejects.toThrow(/400 JSON contains too many levels of nesting; maximum is 2/);
    await expect(h.provider.publish(row('devices/pump-1/state', '[1,2]'))).rejects.toMatchObject({
      code: ErrorCodes.PROVIDER_REJECTED,
      retryable: false,
    });
  });

  it('a version conflict (409) is fetched, merged and retried; the update lands', async () => {
    const { sim, h } = await connected();
    await h.provider.publish(row('devices/pump-2/state', '{"rpm":1}'));
    // Someone else writes the shadow; no delta comes (desired is empty), so our version is stale.
    sim.updateShadow('pump-2', { state: { reported: { fw: '1.2' } } });
    await h.provider.publish(row('devices/pump-2/state', '{"rpm":2}'));
    const bodies = sim.shadowRequests.map((r) => JSON.parse(r.payload.toString()) as Record<string, unknown>);
    expect(sim.shadowRequests.map((r) => r.topic.split('/').slice(-1)[0])).toEqual([
      'update',
      'update',
      'get',
      'update',
    ]);
    expect(bodies[1]).toMatchObject({ version: 1 });
    expect(bodies[3]).toMatchObject({ version: 2 });
    expect(sim.shadows.document('pump-2')).toMatchObject({
      state: { reported: { rpm: 2, fw: '1.2' } },
      version: 3,
    });
    expect(h.events).toContainEqual(
      expect.objectContaining({ activityType: 'shadow_conflict', status: 'success' }),
    );
  });

  it('a shadow that keeps changing stops after maxConflictRetries with a retryable error', async () => {
    const { sim, h } = await connected({}, { maxConflictRetries: 1 });
    await h.provider.publish(row('devices/busy/state', '{"n":0}'));
    // Every get is followed by another writer's change before our retry arrives.
    const writer = setInterval(
      () => sim.updateShadow('busy', { state: { reported: { other: Math.random() } } }),
      1,
    );
    cleanups.push(() => clearInterval(writer));
    const attempt = h.provider.publish(row('devices/busy/state', '{"n":1}'));
    await expect(attempt).rejects.toMatchObject({ code: ErrorCodes.PROVIDER_REJECTED, retryable: true });
    clearInterval(writer);
    const updates = sim.shadowRequests.filter((r) => r.topic.endsWith('/update')).length;
    expect(updates).toBeLessThanOrEqual(3);
  });

  it('deltas go to devices/{id}/desired retained; commands come in and their responses go out', async () => {
    const { sim, h } = await connected();
    sim.updateShadow('pump-3', { state: { desired: { rpm: 900 } } });
    sim.publish('cmd/site-gw/pump-3/reboot', '{"requestId":"r-1"}');
    await sim.waitFor(() => h.inbound.length === 2, 10_000, 'desired and command');
    expect(h.inbound.map((m) => [m.topic, m.payload.toString(), m.retain])).toEqual([
      ['devices/pump-3/desired', '{"rpm":900}', true],
      ['devices/pump-3/commands/reboot', '{"requestId":"r-1"}', false],
    ]);
    await h.provider.publish(row('devices/pump-3/commands/reboot/response', '{"requestId":"r-1","ok":true}'));
    expect(sim.received.at(-1)).toMatchObject({ topic: 'cmd/site-gw/pump-3/reboot/response' });
  });
});

describe("aws-iot provider: AWS's limits (§1.2, §1.3)", () => {
  it('a payload over 128 KB is refused for good without being sent', async () => {
    const { sim, h } = await connected();
    const err = await h.provider
      .publish(row('devices/big/telemetry', Buffer.alloc(128 * 1024 + 1)))
      .catch((e: unknown) => e);
    expect(err).toMatchObject({ code: ErrorCodes.PROVIDER_TOO_LARGE, retryable: false });
    expect(sim.events.some((e) => e.type === 'too_large')).toBe(false);
    expect(sim.clients()).toHaveLength(1);
  });

  it('a policy-denied topic fails for good with a sentence naming the policy; the link stays up (MQTT 5)', async () => {
    const { sim, h } = await connected();
    sim.deny('dt/site-gw/secret/#');
    await expect(h.provider.publish(row('devices/secret/telemetry', '1'))).rejects.toMatchObject({
      code: ErrorCodes.PROVIDER_AUTH,
      retryable: false,
      message: expect.stringMatching(
        /policy of site-gw does not allow publishing to dt\/site-gw\/secret\/telemetry/,
      ),
    });
    await h.provider.publish(row('devices/open/telemetry', '2'));
    expect(sim.received.map((r) => r.topic)).toEqual(['dt/site-gw/open/telemetry']);
  });

  it('a burst of 250 publishes is paced to 100/s: the endpoint throttles none and takes all', async () => {
    const { sim, h } = await connected();
    const all = Array.from({ length: 250 }, (_, i) =>
      h.provider.publish(row(`devices/d${i % 5}/telemetry`, String(i))),
    );
    await Promise.all(all);
    expect(sim.events.filter((e) => e.type === 'throttled')).toEqual([]);
    expect(sim.received).toHaveLength(250);
    // Per device, in the order given.
    const d0 = sim.received
      .filter((r) => r.topic === 'dt/site-gw/d0/telemetry')
      .map((r) => Number(r.payload.toString()));
    expect(d0).toEqual([...d0].sort((a, b) => a - b));
  });

  it('keeps at most 10 shadow requests in flight: 40 state updates at once draw no 429', async () => {
    const { sim, h } = await connected({ shadowLatencyMs: 100 });
    await Promise.all(
      Array.from({ length: 40 }, (_, i) => h.provider.publish(row(`devices/s${i}/state`, `{"i":${i}}`))),
    );
    expect(sim.events.filter((e) => e.type === 'shadow_throttled')).toEqual([]);
    expect(sim.shadows.document('s39')).toMatchObject({ state: { reported: { i: 39 } } });
  });

  it('a 429 from the shadow service is a throttle, not a failure', async () => {
    // Another client of the same account keeps the connection's in-flight budget full.
    const { sim, h } = await connected({ shadowInflight: 0 });
    const err = await h.provider.publish(row('devices/t/state', '{"a":1}')).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: ErrorCodes.PROVIDER_THROTTLED, retryable: true });
    expect((err as GatewayError).details).toMatchObject({ retryAfterMs: 1000 });
    expect(sim.events.some((e) => e.type === 'shadow_throttled')).toBe(true);
  });
});

describe('aws-iot provider: operations', () => {
  it('testConnection checks endpoint, TLS, CONNACK and a shadow round trip, with latency', async () => {
    const sim = await world.start();
    cleanups.push(() => sim.stop());
    const h = makeProvider(world.settings(sim));
    const result = await h.provider.testConnection(new AbortController().signal);
    expect(result).toMatchObject({
      ok: true,
      details: {
        endpoint: SIM_ENDPOINT,
        clientId: 'site-gw-test',
        shadowFound: false,
        shadowRoundTripMs: expect.any(Number),
      },
    });
    expect(result.latencyMs).toBeGreaterThanOrEqual(0);
    expect(sim.shadowRequests.map((r) => r.topic)).toEqual(['$aws/things/site-gw/shadow/get']);
  });

  it('bad settings give one clear sentence: missing certificate, wrong key, wrong endpoint', async () => {
    const sim = await world.start();
    cleanups.push(() => sim.stop());
    const missing = await makeProvider(
      world.settings(sim, { cert: join(world.pki.dir, 'nope.crt') }),
    ).provider.testConnection(new AbortController().signal);
    expect(missing.error?.message).toMatch(
      /^cannot read the cert file .*nope\.crt \(ENOENT\); fix settings\.cert of integration aws$/,
    );

    const otherKey = join(world.pki.dir, 'other.key');
    writeFileSync(otherKey, world.pki.issueClient('someone-else').key);
    const wrongKey = await makeProvider(world.settings(sim, { key: otherKey })).provider.testConnection(
      new AbortController().signal,
    );
    expect(wrongKey.error?.message).toMatch(/does not belong to the certificate/);

    const wrongEndpoint = await makeProvider(
      world.settings(sim, { endpoint: 'zzz-ats.iot.us-east-1.amazonaws.com' }),
    ).provider.testConnection(new AbortController().signal);
    expect(wrongEndpoint.error?.message).toMatch(
      /server certificate does not name zzz-ats\.iot\.us-east-1\.amazonaws\.com; check settings\.endpoint/,
    );
    const foreign = world.pki.issueClient('site-gw', { signedByOtherCa: true });
    const foreignCert = join(world.pki.dir, 'foreign.crt');
    const foreignKey = join(world.pki.dir, 'foreign.key');
    writeFileSync(foreignCert, foreign.cert);
    writeFileSync(foreignKey, foreign.key);
    const unknownCert = await makeProvider(
      world.settings(sim, { cert: foreignCert, key: foreignKey }),
    ).provider.testConnection(new AbortController().signal);
    expect(unknownCert.error?.message).toMatch(
      /refused the TLS handshake .*; check that settings\.cert is a registered, active AWS IoT certificate$|closed the connection before CONNACK: the certificate may be inactive or unknown to AWS IoT/,
    );
    for (const r of [missing, wrongKey, wrongEndpoint, unknownCert]) {
      expect(r.ok).toBe(false);
      expect(r.error!.message.split('; ').length).toBeLessThanOrEqual(2);
      expect(r.error!.message).not.toMatch(/\n/);
    }
  });

  it('import sends the desired state of known devices to devices/{id}/desired; export writes reported state', async () => {
    const sim = await world.start();
    cleanups.push(() => sim.stop());
    sim.updateShadow('pump-a', { state: { desired: { rpm: 500 } } });
    const reported = new Map<string, Record<string, unknown>>([['pump-b', { rpm: 7 }]]);
    const h = makeProvider(world.settings(sim), { knownDevices: ['pump-a', 'pump-b'], reported });
    const imported = await h.provider.import(new AbortController().signal);
    expect(imported).toMatchObject({
      recordsProcessed: 2,
      recordsSucceeded: 2,
      recordsFailed: 0,
      details: { delivered: 1, notFound: 1 },
    });
    expect(h.inbound).toEqual([
      { topic: 'devices/pump-a/desired', payload: Buffer.from('{"rpm":500}'), qos: 1, retain: true },
    ]);
    // Without a stream link the sync used its own client id, so a running gateway is not kicked.
    expect(sim.events.filter((e) => e.type === 'connected').map((e) => e.clientId)).toEqual(['site-gw-sync']);
    const exported = await h.provider.export(new AbortController().signal);
    expect(exported).toMatchObject({ recordsProcessed: 1, recordsSucceeded: 1, recordsFailed: 0 });
    expect(sim.shadows.document('pump-b')).toMatchObject({ state: { reported: { rpm: 7 } } });
    const gets = h.events.filter((e) => e.activityType === 'shadow_get');
    expect(gets).toHaveLength(2);
    expect(gets[0]!.metadata).toMatchObject({ requestId: expect.any(String) });
    expect(h.events.filter((e) => e.activityType === 'shadow_update')).toHaveLength(1);
  });
});
