import { Aedes } from 'aedes';
import { randomUUID } from 'node:crypto';
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect as connectTcp, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { createServer as createTlsServer } from 'node:tls';
import { connectAsync, type MqttClient } from 'mqtt';
import mqttPacket from 'mqtt-packet';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { configSchema } from '../../src/config/schema.js';
import { ErrorCodes, GatewayError } from '../../src/errors.js';
import { createLogger } from '../../src/logger.js';
import { createMqttProvider } from '../../src/providers/mqtt/mqtt-provider.js';
import type { InboundMessage, OutboundMessage, Provider } from '../../src/providers/provider.js';
import { createProvider, loadProviders, providerRegistry } from '../../src/providers/registry.js';
import { createActivityLog, type ActivityLog } from '../../src/store/activity-log.js';
import { openStore, type Store } from '../../src/store/database.js';
import { createTestPki, type TestPki } from '../helpers/certs.js';
import { startMosquitto } from '../helpers/mosquitto.js';
import { freePort } from '../helpers/ports.js';
import { startTcpProxy, type TcpProxy } from '../helpers/tcp-proxy.js';

// Built-in providers load on first use; the gateway loads them as it does here.
await loadProviders(['mqtt']);

const MOSQUITTO = 'mqtt://127.0.0.1:1883';

interface Harness {
  dir: string;
  store: Store;
  activity: ActivityLog;
  logs: string[];
  cleanups: (() => Promise<void> | void)[];
}

let h: Harness;

function setUp(): Harness {
  const dir = mkdtempSync(join(tmpdir(), 'gw-mqtt-'));
  const logs: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, cb) {
      logs.push(...chunk.toString('utf8').split('\n').filter(Boolean));
      cb();
    },
  });
  const logger = createLogger({ level: 'debug', gatewayId: 'gw-test', destination });
  const store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
  const activity = createActivityLog({ db: store.db, gatewayId: 'gw-test', logger });
  return { dir, store, activity, logs, cleanups: [] };
}

/** Integration names (and so client ids) are unique per run: Mosquitto kicks a duplicate client id. */
function makeProvider(settings: Record<string, unknown>, label = 'upstream'): Provider {
  const name = `${label}-${randomUUID().slice(0, 8)}`;
  const config = configSchema.parse({
    gateway: { id: 'gw-test' },
    integrations: [{ name, id: randomUUID(), type: 'mqtt', settings }],
  });
  const integration = config.integrations[0]!;
  const logger = createLogger({
    level: 'debug',
    gatewayId: 'gw-test',
    destination: new Writable({
      write(chunk: Buffer, _enc, cb) {
        h.logs.push(...chunk.toString('utf8').split('\n').filter(Boolean));
        cb();
      },
    }),
  }).child({ component: 'integration', integrationId: integration.id });
  const provider = createProvider({ gatewayId: 'gw-test', integration, logger });
  h.cleanups.push(() => provider.close());
  return provider;
}

async function observer(
  filter: string,
  protocolVersion: 4 | 5 = 4,
): Promise<{ client: MqttClient; got: { topic: string; payload: string; retain: boolean }[] }> {
  const client = await connectAsync(MOSQUITTO, {
    clientId: `obs-${randomUUID()}`,
    reconnectPeriod: 0,
    protocolVersion,
  });
  h.cleanups.push(() => client.endAsync(true));
  const got: { topic: string; payload: string; retain: boolean }[] = [];
  client.on('message', (topic, payload, packet) =>
    got.push({ topic, payload: payload.toString(), retain: packet.retain }),
  );
  await client.subscribeAsync(filter, { qos: 1 });
  return { client, got };
}

let seq = 0;
function row(
  topic: string,
  payload: string | Buffer,
  overrides: Partial<OutboundMessage> = {},
): OutboundMessage {
  return {
    id: ++seq,
    deviceId: topic.split('/')[1] ?? 'dev',
    topic,
    payload: typeof payload === 'string' ? Buffer.from(payload) : payload,
    qos: 1,
    retain: false,
    enqueuedAt: Date.now(),
    attempts: 0,
    ...overrides,
  };
}

async function until(check: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function rejection(p: Promise<unknown>): Promise<GatewayError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(GatewayError);
    return err as GatewayError;
  }
  throw new Error('expected a rejection');
}

const signal = () => new AbortController().signal;

/** A small aedes on port 0; hooks decide how it treats us. */
async function startAedes(options: { refuseAuth?: boolean; tls?: TestPki } = {}) {
  const aedes = new Aedes({
    authenticate(_client, _user, _pass, cb) {
      if (options.refuseAuth) {
        const err = Object.assign(new Error('bad credentials'), { returnCode: 4 });
        cb(err as never, false);
      } else cb(null, true);
    },
  });
  await aedes.listen();
  const server: Server = options.tls
    ? (createTlsServer(
        { cert: readFileSync(options.tls.serverCert), key: readFileSync(options.tls.serverKey) },
        aedes.handle,
      ) as unknown as Server)
    : createServer(aedes.handle);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  h.cleanups.push(
    () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        aedes.close();
      }),
  );
  return { aedes, port };
}

/** Listens on a loopback port; after the test, `sockets` are destroyed and the server closed. */
async function listenForTest(server: Server, sockets: Set<Socket>): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  h.cleanups.push(
    () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  );
  return (server.address() as { port: number }).port;
}

/** A private Mosquitto with an ACL and a packet-size limit, for broker-side rejections over MQTT 5. */
async function startPrivateMosquitto(): Promise<{ port: number }> {
  const aclDir = mkdtempSync(join(tmpdir(), 'gw-acl-'));
  chmodSync(aclDir, 0o755);
  writeFileSync(join(aclDir, 'acl'), 'topic readwrite gwtest/#\n');
  chmodSync(join(aclDir, 'acl'), 0o644);
  const mosquitto = await startMosquitto([
    `acl_file ${join(aclDir, 'acl')}`,
    'max_packet_size 4096',
    'max_inflight_messages 7',
  ]);
  h.cleanups.push(async () => {
    await mosquitto.stop();
    rmSync(aclDir, { recursive: true, force: true });
  });
  return { port: mosquitto.port };
}

describe('mqtt provider', () => {
  let pki: TestPki;
  beforeAll(() => {
    pki = createTestPki();
  });
  afterAll(() => pki.cleanup());

  afterEach(async () => {
    for (const fn of h.cleanups.reverse()) await fn();
    h.store.close();
    rmSync(h.dir, { recursive: true, force: true });
  });

  const prefix = () => `gwtest/${randomUUID().slice(0, 8)}`;

  it('is the registry entry for type mqtt', () => {
    h = setUp();
    expect(providerRegistry.mqtt).toBe(createMqttProvider);
    // Only the types asked for are loaded: the other clouds' modules stay out of memory.
    expect(providerRegistry.golioth).toBeUndefined();
    expect(providerRegistry['aws-iot']).toBeUndefined();
  });

  it('refuses a type without a factory with GW_ERR_PROVIDER_UNSUPPORTED naming the available types', () => {
    h = setUp();
    const integration = configSchema.parse({
      gateway: { id: 'gw-test' },
      integrations: [{ name: 'x', id: randomUUID(), type: 'mqtt', settings: { url: MOSQUITTO } }],
    }).integrations[0]!;
    // Every configurable type has a factory in providerRegistry; a gateway given fewer (as
    // createGateway takes injected factories) must refuse the missing one in one clear sentence.
    const err = (() => {
      try {
        createProvider(
          {
            gatewayId: 'gw-test',
            integration: { ...integration, type: 'golioth' },
            logger: createLogger({ level: 'silent', gatewayId: 'gw-test' }),
          },
          { mqtt: createMqttProvider },
        );
      } catch (e) {
        return e as GatewayError;
      }
      return undefined;
    })();
    expect(err).toBeInstanceOf(GatewayError);
    expect(err?.code).toBe(ErrorCodes.PROVIDER_UNSUPPORTED);
    expect(err?.retryable).toBe(false);
    expect(err?.message).toBe('the golioth provider is not available in this release; available: mqtt');
  });

  it('publishes through the first matching outbound rule and resolves on PUBACK', async () => {
    h = setUp();
    const p = prefix();
    const obs = await observer(`${p}/#`);
    const provider = makeProvider({
      url: MOSQUITTO,
      outbound: [
        { local: 'devices/+/telemetry/#', remote: `${p}/up/{1}/{2}`, retain: false },
        { local: 'devices/+/state', remote: `${p}/state/{deviceId}`, qos: 0, retain: true },
      ],
    });
    await provider.connect(signal());
    await provider.publish(row('devices/s1/telemetry/temp', 't1'));
    await provider.publish(row('devices/s2/state', 's2', { qos: 1, retain: false }));
    await provider.publish(row('devices/s1/telemetry/hum', 'q2', { qos: 2 }));
    await until(() => obs.got.length === 3);
    expect(obs.got.map((m) => [m.topic, m.payload])).toEqual([
      [`${p}/up/s1/temp`, 't1'],
      [`${p}/state/s2`, 's2'],
      [`${p}/up/s1/hum`, 'q2'],
    ]);
    // retain: true forces the flag; a late subscriber sees the retained state.
    const late = await observer(`${p}/state/#`);
    await until(() => late.got.length === 1);
    expect(late.got[0]).toMatchObject({ topic: `${p}/state/s2`, retain: true });
    await obs.client.publishAsync(`${p}/state/s2`, '', { retain: true, qos: 1 });

    const unmatched = await rejection(provider.publish(row('gateway/x/status', 'x')));
    expect(unmatched.code).toBe(ErrorCodes.PROVIDER_REJECTED);
    expect(unmatched.retryable).toBe(false);
    expect(provider.maxInflight).toBeGreaterThan(0);
  });

  it('maps inbound messages through the first matching rule to the command handler', async () => {
    h = setUp();
    const p = prefix();
    const provider = makeProvider({
      url: MOSQUITTO,
      inbound: [
        { remote: `${p}/down/+/cmd/+`, local: 'devices/{1}/commands/{2}' },
        { remote: `${p}/down/+/desired`, local: 'devices/{1}/desired' },
        { remote: `${p}/down/#`, local: 'devices/other/{1}' },
      ],
    });
    const received: InboundMessage[] = [];
    provider.onCommand((m) => received.push(m));
    await provider.connect(signal());
    const pub = await connectAsync(MOSQUITTO, { clientId: `pub-${randomUUID()}`, reconnectPeriod: 0 });
    h.cleanups.push(() => pub.endAsync(true));
    await pub.publishAsync(`${p}/down/s7/cmd/reboot`, '{"requestId":"r1"}', { qos: 1 });
    await pub.publishAsync(`${p}/down/s7/desired`, '{"rate":5}', { qos: 1 });
    await pub.publishAsync(`${p}/down/x/y`, 'z', { qos: 0 });
    await until(() => received.length === 3);
    expect(received.map((m) => [m.topic, m.payload.toString()])).toEqual([
      ['devices/s7/commands/reboot', '{"requestId":"r1"}'],
      ['devices/s7/desired', '{"rate":5}'],
      ['devices/other/x/y', 'z'],
    ]);
  });

  it('with MQTT 5 and noLocal does not receive its own publications on a both-way mapping', async () => {
    h = setUp();
    const p = prefix();
    const both = {
      outbound: [{ local: 'devices/#', remote: `${p}/bridge/{1}` }],
      inbound: [{ remote: `${p}/bridge/#`, local: 'devices/{1}' }],
    };
    const v5 = makeProvider({ url: MOSQUITTO, protocolVersion: 5, ...both }, 'v5');
    const received: string[] = [];
    v5.onCommand((m) => received.push(m.payload.toString()));
    await v5.connect(signal());
    await v5.publish(row('devices/s1/telemetry', 'ours'));
    const other = await connectAsync(MOSQUITTO, { clientId: `other-${randomUUID()}`, reconnectPeriod: 0 });
    h.cleanups.push(() => other.endAsync(true));
    await other.publishAsync(`${p}/bridge/s1/desired`, 'theirs', { qos: 1 });
    await until(() => received.includes('theirs'));
    expect(received).toEqual(['theirs']);
  });

  /** Both ways over MQTT 3.1.1 on one prefix; `seen` counts what a plain subscriber got, echoes included. */
  async function bothWaysV4(url: string, extra: Record<string, unknown>, label: string) {
    const p = prefix();
    const provider = makeProvider(
      {
        url,
        protocolVersion: 4,
        outbound: [{ local: 'devices/#', remote: `${p}/bridge/{1}` }],
        inbound: [{ remote: `${p}/bridge/#`, local: 'devices/{1}' }],
        ...extra,
      },
      label,
    );
    const received: string[] = [];
    provider.onCommand((m) => received.push(`${m.topic} ${m.payload.toString()}`));
    await provider.connect(signal());
    const other = await connectAsync(url, { clientId: `other-${randomUUID()}`, reconnectPeriod: 0 });
    h.cleanups.push(() => other.endAsync(true));
    return { p, provider, received, other };
  }

  it('on MQTT 3.1.1 connects as a bridge, so Mosquitto does not send our publications back', async () => {
    h = setUp();
    const { p, provider, received, other } = await bothWaysV4(MOSQUITTO, {}, 'v4-bridge');
    expect(h.logs.some((l) => l.includes('connect_started') && l.includes('"bridge":true'))).toBe(true);
    await provider.publish(row('devices/s1/telemetry', 'ours'));
    await other.publishAsync(`${p}/bridge/s1/desired`, 'theirs', { qos: 1 });
    await until(() => received.length === 1);
    await new Promise((r) => setTimeout(r, 200)); // an echo would have come by now
    expect(received).toEqual(['devices/s1/desired theirs']);
    // Mosquitto suppressed the echo itself: nothing reached the filter.
    expect(h.logs.some((l) => l.includes('inbound_echo_dropped'))).toBe(false);
  });

  it('stops its echo filter on a bridge-flag link that never echoes, so identical foreign messages pass', async () => {
    h = setUp();
    const { p, provider, received, other } = await bothWaysV4(MOSQUITTO, { echoWindow: '40ms' }, 'v4-probe');
    for (let i = 0; i < 22 && !h.logs.some((l) => l.includes('echo_filter_off')); i++) {
      await provider.publish(row('devices/s1/telemetry', `ours-${i}`));
      await new Promise((r) => setTimeout(r, 50)); // longer than the window: forgotten unmatched
    }
    expect(h.logs.some((l) => l.includes('echo_filter_off'))).toBe(true);
    // Someone else publishes exactly what we just sent: it is theirs, and it arrives.
    await provider.publish(row('devices/s1/telemetry', 'same'));
    await other.publishAsync(`${p}/bridge/s1/telemetry`, 'same', { qos: 1 });
    await until(() => received.length === 1);
    expect(received).toEqual(['devices/s1/telemetry same']);
  });

  it('on MQTT 3.1.1 without the bridge flag drops the echo of each own publication, and only that', async () => {
    h = setUp();
    const { p, provider, received, other } = await bothWaysV4(MOSQUITTO, { bridgeMode: false }, 'v4-plain');
    await provider.publish(row('devices/s1/telemetry', 'ours'));
    await until(() => h.logs.some((l) => l.includes('inbound_echo_dropped')));
    // The same payload on the same topic from someone else is a new message: it gets through.
    await other.publishAsync(`${p}/bridge/s1/telemetry`, 'ours', { qos: 1 });
    await other.publishAsync(`${p}/bridge/s1/desired`, 'theirs', { qos: 1 });
    await until(() => received.length === 2);
    expect(received).toEqual(['devices/s1/telemetry ours', 'devices/s1/desired theirs']);
  });

  /**
   * Aedes behind a front that answers a CONNECT with the bridge flag with CONNACK 1
   * (unacceptable protocol version), as brokers without bridge support do; `attempts` records
   * the flag of every CONNECT.
   */
  async function bridgeRefusingBroker(): Promise<{ url: string; attempts: boolean[] }> {
    const { port: brokerPort } = await startAedes();
    const attempts: boolean[] = [];
    const sockets = new Set<Socket>();
    const server = createServer((socket) => {
      sockets.add(socket);
      socket.on('close', () => sockets.delete(socket));
      socket.on('error', () => {});
      const parser = mqttPacket.parser();
      const seen: Buffer[] = [];
      const onData = (chunk: Buffer) => {
        seen.push(chunk);
        parser.parse(chunk);
      };
      parser.once('packet', (packet: { cmd: string; bridgeMode?: boolean }) => {
        socket.off('data', onData);
        const bridge = packet.bridgeMode === true;
        attempts.push(bridge);
        if (bridge) {
          socket.end(Buffer.from([0x20, 0x02, 0x00, 0x01]));
          return;
        }
        const broker = connectTcp(brokerPort, '127.0.0.1');
        sockets.add(broker);
        broker.on('close', () => sockets.delete(broker));
        broker.on('error', () => socket.destroy());
        broker.write(Buffer.concat(seen));
        socket.pipe(broker).pipe(socket);
      });
      socket.on('data', onData);
    });
    const port = await listenForTest(server, sockets);
    return { url: `mqtt://127.0.0.1:${port}`, attempts };
  }

  it('under bridgeMode auto falls back to plain 3.1.1 when the broker refuses the bridge flag', async () => {
    h = setUp();
    const { url, attempts } = await bridgeRefusingBroker();
    const { p, provider, received, other } = await bothWaysV4(url, {}, 'v4-auto');
    expect(attempts).toEqual([true, false, false]); // ours refused, ours plain, then `other`
    expect(h.logs.some((l) => l.includes('bridge_mode_refused'))).toBe(true);

    // Aedes echoes like any 3.1.1 broker: the filter drops our copy, a foreign message passes.
    await provider.publish(row('devices/s1/telemetry', 'ours'));
    await until(() => h.logs.some((l) => l.includes('inbound_echo_dropped')));
    await other.publishAsync(`${p}/bridge/s1/desired`, 'theirs', { qos: 1 });
    await until(() => received.length === 1);
    expect(received).toEqual(['devices/s1/desired theirs']);

    // The flag stays off for this provider: a reconnect goes straight to plain 3.1.1.
    await provider.connect(signal());
    expect(attempts).toEqual([true, false, false, false]);
  });

  it('with bridgeMode true a refusal of the flag is an error naming the CONNACK, not a silent fallback', async () => {
    h = setUp();
    const { url, attempts } = await bridgeRefusingBroker();
    const provider = makeProvider({ url, bridgeMode: true });
    const err = await rejection(provider.connect(signal()));
    expect(err.message).toMatch(/CONNACK 1/);
    expect(attempts).toEqual([true]);
    expect(h.logs.some((l) => l.includes('bridge_mode_refused'))).toBe(false);
  });

  it('rejects a publish while not connected (retryable) and an oversized payload (not retryable)', async () => {
    h = setUp();
    const provider = makeProvider({
      url: MOSQUITTO,
      maxPayloadSize: '1KB',
      outbound: [{ local: '#', remote: `${prefix()}/{topic}` }],
    });
    const notConnected = await rejection(provider.publish(row('devices/a/telemetry', 'x')));
    expect(notConnected.code).toBe(ErrorCodes.PROVIDER_NOT_CONNECTED);
    expect(notConnected.retryable).toBe(true);
    await provider.connect(signal());
    expect(provider.maxPayloadBytes).toBe(1024);
    const tooLarge = await rejection(provider.publish(row('devices/a/telemetry', Buffer.alloc(1025))));
    expect(tooLarge.code).toBe(ErrorCodes.PROVIDER_TOO_LARGE);
    expect(tooLarge.retryable).toBe(false);
    await provider.publish(row('devices/a/telemetry', Buffer.alloc(1024)));
  });

  it('turns MQTT 5 PUBACK reason codes into non-retryable rejections and honours the server limits', async () => {
    h = setUp();
    const { port } = await startPrivateMosquitto();
    const provider = makeProvider({
      url: `mqtt://127.0.0.1:${port}`,
      protocolVersion: 5,
      outbound: [
        { local: 'devices/+/denied', remote: 'forbidden/{1}' },
        { local: '#', remote: 'gwtest/{topic}' },
      ],
    });
    await provider.connect(signal());
    expect(provider.maxPayloadBytes).toBe(4096);
    // The server's Receive Maximum bounds the in-flight window.
    expect(provider.maxInflight).toBe(7);
    await provider.publish(row('devices/a/telemetry', 'fine'));
    const denied = await rejection(provider.publish(row('devices/a/denied', 'no')));
    expect(denied.code).toBe(ErrorCodes.PROVIDER_REJECTED);
    expect(denied.retryable).toBe(false);
    expect(denied.details).toMatchObject({ reasonCode: 0x87 });
    // Near the limit: the payload fits but the whole packet would not; refused before sending.
    const big = await rejection(provider.publish(row('devices/a/telemetry', Buffer.alloc(4090))));
    expect(big.code).toBe(ErrorCodes.PROVIDER_TOO_LARGE);
    // The link survived both: a rejection is per message, not a disconnect.
    await provider.publish(row('devices/a/telemetry', 'still fine'));
  });

  it('reports a CONNACK refusal as GW_ERR_PROVIDER_AUTH and a refused TCP connect as retryable', async () => {
    h = setUp();
    const { port } = await startAedes({ refuseAuth: true });
    const provider = makeProvider({
      url: `mqtt://127.0.0.1:${port}`,
      username: 'gw',
      password: 's3cret-pass',
    });
    const auth = await rejection(provider.connect(signal()));
    expect(auth.code).toBe(ErrorCodes.PROVIDER_AUTH);

    const closedPort = await freePort();
    const refused = await rejection(
      makeProvider({ url: `mqtt://127.0.0.1:${closedPort}` }, 'refused').connect(signal()),
    );
    expect(refused.code).toBe(ErrorCodes.PROVIDER_CONNECT);
    expect(refused.retryable).toBe(true);
    expect(h.logs.some((l) => l.includes('connect_failed'))).toBe(true);
    expect(h.logs.join('\n')).not.toContain('s3cret-pass');
  });

  it('refuses a TLS server whose certificate it does not trust, and connects when given the CA', async () => {
    h = setUp();
    const { port } = await startAedes({ tls: pki });
    const untrusted = makeProvider({ url: `mqtts://127.0.0.1:${port}` }, 'untrusted');
    const err = await rejection(untrusted.connect(signal()));
    expect(err.code).toBe(ErrorCodes.PROVIDER_CONNECT);
    expect(err.message).toMatch(/TLS/);

    const trusted = makeProvider({ url: `mqtts://localhost:${port}`, ca: pki.caCert }, 'trusted');
    await trusted.connect(signal());
    await trusted.publish(row('devices/a/telemetry', 'over tls'));

    const missingCa = makeProvider(
      { url: `mqtts://localhost:${port}`, ca: join(h.dir, 'nope.pem') },
      'missing',
    );
    const missing = await rejection(missingCa.connect(signal()));
    expect(missing.code).toBe(ErrorCodes.PROVIDER_CONNECT);
    expect(missing.message).toContain('nope.pem');
  });

  it('rejects pending publishes on a half-open link: timeout, then GW_ERR_PROVIDER_CLOSED on close', async () => {
    h = setUp();
    const proxy: TcpProxy = await startTcpProxy(1883);
    h.cleanups.push(() => proxy.close());
    const provider = makeProvider({
      url: `mqtt://127.0.0.1:${proxy.port}`,
      publishTimeout: '300ms',
      outbound: [{ local: '#', remote: `${prefix()}/{topic}` }],
    });
    await provider.connect(signal());
    proxy.setMode('blackhole');
    const timedOut = await rejection(provider.publish(row('devices/a/telemetry', 'lost')));
    expect(timedOut.code).toBe(ErrorCodes.PROVIDER_TIMEOUT);
    expect(timedOut.retryable).toBe(true);

    const provider2 = makeProvider(
      { url: `mqtt://127.0.0.1:${proxy.port}`, publishTimeout: '30s' },
      'second',
    );
    proxy.setMode('pass');
    await provider2.connect(signal());
    proxy.setMode('blackhole');
    const pending = rejection(provider2.publish(row('devices/a/telemetry', 'pending')));
    await provider2.close();
    const closed = await pending;
    expect(closed.code).toBe(ErrorCodes.PROVIDER_CLOSED);
    expect(closed.retryable).toBe(true);
  });

  it('detects a half-open link by keepalive and reports the loss once', async () => {
    h = setUp();
    // A peer that answers CONNECT and then goes silent without closing: a true half-open link
    // (a blackholing proxy in front of a real broker races the broker's own keepalive kick).
    const sockets = new Set<Socket>();
    const silent = createServer((socket) => {
      sockets.add(socket);
      socket.on('error', () => {});
      socket.once('data', () => socket.write(Buffer.from([0x20, 0x02, 0x00, 0x00])));
    });
    const port = await listenForTest(silent, sockets);
    const provider = makeProvider({ url: `mqtt://127.0.0.1:${port}`, keepalive: '1s' });
    const losses: Error[] = [];
    provider.onDisconnect((e) => losses.push(e));
    await provider.connect(signal());
    await until(() => losses.length === 1, 8000);
    expect(losses[0]!.message).toMatch(/Keepalive timeout/i);
    await new Promise((r) => setTimeout(r, 300));
    expect(losses).toHaveLength(1);
    expect((await rejection(provider.publish(row('devices/a/telemetry', 'x')))).code).toBe(
      ErrorCodes.PROVIDER_NOT_CONNECTED,
    );
  });

  it('testConnection measures CONNACK with a -test client id and names no credentials', async () => {
    h = setUp();
    const provider = makeProvider({
      url: 'mqtt://127.0.0.1:1883',
      username: 'u',
      password: 'pw-never-shown',
    });
    const ok = await provider.testConnection(signal());
    expect(ok.ok).toBe(true);
    expect(ok.latencyMs).toBeGreaterThanOrEqual(0);
    expect(ok.details).toMatchObject({
      protocolVersion: 4,
      clientId: expect.stringMatching(/^gw-test-upstream-[0-9a-f]{8}-test$/),
    });
    expect(JSON.stringify(ok.details)).not.toContain('pw-never-shown');

    const proxy = await startTcpProxy(1883);
    h.cleanups.push(() => proxy.close());
    proxy.setMode('refuse');
    const bad = await makeProvider({ url: `mqtt://127.0.0.1:${proxy.port}` }, 'down').testConnection(
      signal(),
    );
    expect(bad.ok).toBe(false);
    expect(bad.error?.code).toBe(ErrorCodes.PROVIDER_CONNECT);
    expect(h.logs.join('\n')).not.toContain('pw-never-shown');
  });

  it('import delivers retained messages on inbound filters; with no inbound rules it says why nothing happened', async () => {
    h = setUp();
    const p = prefix();
    const pub = await connectAsync(MOSQUITTO, { clientId: `pub-${randomUUID()}`, reconnectPeriod: 0 });
    h.cleanups.push(async () => {
      await pub.publishAsync(`${p}/desired/s1`, '', { retain: true, qos: 1 });
      await pub.publishAsync(`${p}/desired/s2`, '', { retain: true, qos: 1 });
      await pub.endAsync(true);
    });
    await pub.publishAsync(`${p}/desired/s1`, '{"a":1}', { retain: true, qos: 1 });
    await pub.publishAsync(`${p}/desired/s2`, '{"a":2}', { retain: true, qos: 1 });
    const provider = makeProvider({
      url: MOSQUITTO,
      inbound: [{ remote: `${p}/desired/+`, local: 'devices/{1}/desired' }],
    });
    const received: InboundMessage[] = [];
    provider.onCommand((m) => received.push(m));
    const result = await provider.import(signal());
    expect(result).toMatchObject({ recordsProcessed: 2, recordsSucceeded: 2, recordsFailed: 0 });
    expect(received.map((m) => [m.topic, m.payload.toString(), m.retain]).sort()).toEqual([
      ['devices/s1/desired', '{"a":1}', true],
      ['devices/s2/desired', '{"a":2}', true],
    ]);

    const plain = makeProvider({ url: MOSQUITTO }, 'plain');
    const none = await plain.bidirectionalSync(signal());
    expect(none.recordsProcessed).toBe(0);
    expect(JSON.stringify(none.details)).toContain('no device registry');
  });

  it('logs the connection lifecycle without credentials', async () => {
    h = setUp();
    const provider = makeProvider({ url: MOSQUITTO, username: 'user1', password: 'hunter2-secret' });
    await provider.connect(signal());
    const events = h.logs.map((l) => JSON.parse(l) as { msg: string; component?: string });
    for (const msg of ['client_initialized', 'connect_started', 'connect_completed']) {
      expect(events.some((e) => e.msg === msg && e.component === 'mqtt')).toBe(true);
    }
    expect(h.logs.join('\n')).not.toContain('hunter2-secret');
  });
});
