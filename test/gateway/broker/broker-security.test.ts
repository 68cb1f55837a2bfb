import { readFileSync } from 'node:fs';
import mqtt, { type MqttClient } from 'mqtt';
import mqttPacket, { type Packet } from 'mqtt-packet';
import { describe, expect, it } from 'vitest';
import type { Config, ConfigInput } from '../../../src/config/schema.js';
import { createBroker, type Broker } from '../../../src/gateway/broker/broker.js';
import { createPacketSizeScanner } from '../../../src/gateway/broker/packet-limit.js';
import { createLogger } from '../../../src/logger.js';
import type { ActivityLog } from '../../../src/store/activity-log.js';
import type { IncomingMessage } from '../../../src/store/outbox-types.js';
import {
  PASSWORDS,
  openWorldStore,
  twoDeviceBrokerConfig,
  useBrokerTestWorld,
} from '../../helpers/broker-fixture.js';
import { connectPacket, connectRaw, waitUntil, type RawMqtt } from '../../helpers/raw-mqtt.js';

const GATEWAY_ID = 'gw-sec';
const world = useBrokerTestWorld('gw-broker-sec-');
const running = world.running;

function brokerConfig(broker: Partial<NonNullable<ConfigInput['broker']>> = {}): Config['broker'] {
  return twoDeviceBrokerConfig(GATEWAY_ID, world.root, world.hashes, broker);
}

interface Harness {
  broker: Broker;
  port: number;
  ingested: IncomingMessage[];
  activity: ActivityLog;
  logLines: string[];
}

async function startBroker(
  options: { config?: Config['broker']; activityWindowMs?: number } = {},
): Promise<Harness> {
  const logLines: string[] = [];
  const logger = createLogger({
    level: 'debug',
    gatewayId: GATEWAY_ID,
    destination: { write: (line: string) => void logLines.push(line) },
  });
  const { activity } = openWorldStore(world, GATEWAY_ID, logger);
  const ingested: IncomingMessage[] = [];
  const broker = createBroker({
    config: options.config ?? brokerConfig(),
    gatewayId: GATEWAY_ID,
    retainedStatus: true,
    logger,
    activity,
    activityWindowMs: options.activityWindowMs,
    ingest: (m) => {
      ingested.push(m);
      return Promise.resolve();
    },
  });
  running.push(broker);
  const bound = await broker.listen();
  return { broker, port: bound[0]!.port, ingested, activity, logLines };
}

async function device(port: number, id: keyof typeof PASSWORDS): Promise<MqttClient> {
  const client = await mqtt.connectAsync(
    `mqtt://127.0.0.1:${port}`,
    { clientId: id, username: id, password: PASSWORDS[id], reconnectPeriod: 0, connectTimeout: 5000 },
    false,
  );
  running.push({ close: () => void client.end(true) });
  return client;
}

function raw(port: number): Promise<RawMqtt> {
  return connectRaw(port, running, { ignoreParseErrors: true });
}

function login(id: keyof typeof PASSWORDS, extra: Partial<mqttPacket.IConnectPacket> = {}): Packet {
  return connectPacket(id, { username: id, password: Buffer.from(PASSWORDS[id]), ...extra });
}

async function connackCode(port: number, packet: Packet): Promise<number> {
  const c = await raw(port);
  c.send(packet);
  const connack = (await c.next('connack')) as mqttPacket.IConnackPacket;
  return connack.returnCode ?? -1;
}

/** A device still works when a QoS 1 round trip succeeds on it. */
async function stillServes(client: MqttClient, id: string): Promise<void> {
  await client.publishAsync(`devices/${id}/telemetry`, 'alive', { qos: 1 });
  expect(client.connected).toBe(true);
}

/** Bounds a wait so a regression fails fast instead of at the test timeout. */
function within<T>(promise: Promise<T>, ms = 5000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`not settled within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function varint(n: number): Buffer {
  const out: number[] = [];
  do {
    let byte = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) byte |= 0x80;
    out.push(byte);
  } while (n > 0);
  return Buffer.from(out);
}

describe('broker security: authentication', () => {
  it('answers a wrong password with CONNACK 4, records it and never logs the password', async () => {
    const { port, activity, logLines, broker } = await startBroker();
    const code = await connackCode(
      port,
      connectPacket('sensor-1', { username: 'sensor-1', password: Buffer.from('hunter2-wrong') }),
    );
    expect(code).toBe(4);
    const rows = activity.list({ activityType: 'auth_failed' });
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ direction: 'incoming', status: 'failed' });
    expect(rows[0]!.metadata).toMatchObject({
      clientId: 'sensor-1',
      remoteAddress: '127.0.0.1',
      reason: 'bad_password',
      count: 1,
    });
    expect(broker.stats.authFailures).toBe(1);
    const warn = logLines
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .find((l) => l.msg === 'auth_failed');
    expect(warn).toMatchObject({ level: 'warn', clientId: 'sensor-1', reason: 'bad_password' });
    expect(logLines.join('\n')).not.toContain('hunter2-wrong');
  });

  it('answers an unknown device like a wrong password', async () => {
    const { port, activity } = await startBroker();
    expect(
      await connackCode(port, connectPacket('ghost', { username: 'ghost', password: Buffer.from('x') })),
    ).toBe(4);
    expect(activity.list({ activityType: 'auth_failed' })[0]!.metadata).toMatchObject({
      reason: 'unknown_device',
    });
  });

  it('refuses anonymous clients unless allowAnonymous, and then grants only anonymousAcl', async () => {
    const closed = await startBroker();
    expect(await connackCode(closed.port, connectPacket('anon-1'))).toBe(5);

    const open = await startBroker({
      config: brokerConfig({
        allowAnonymous: true,
        anonymousAcl: { publish: ['public/#'], subscribe: ['public/#'] },
      }),
    });
    const c = await raw(open.port);
    c.send(connectPacket('anon-1'));
    expect(await c.next('connack')).toMatchObject({ returnCode: 0 });
    c.send({
      cmd: 'subscribe',
      messageId: 1,
      subscriptions: [
        { topic: 'public/x', qos: 1 },
        { topic: 'devices/#', qos: 1 },
      ],
    });
    expect(await c.next('suback')).toMatchObject({ granted: [1, 128] });
    c.send({
      cmd: 'publish',
      topic: 'public/x',
      payload: Buffer.from('hi'),
      qos: 1,
      messageId: 2,
      retain: false,
      dup: false,
    });
    await c.next('puback');
    expect(open.ingested[0]).toMatchObject({ deviceId: 'anon-1', topic: 'public/x' });
    c.send({
      cmd: 'publish',
      topic: 'devices/sensor-1/telemetry',
      payload: Buffer.from('x'),
      qos: 1,
      messageId: 3,
      retain: false,
      dup: false,
    });
    await c.closed;
    expect(open.ingested).toHaveLength(1);
  });

  it("refuses a client id that is not the username (CONNACK 2) and leaves the victim's session alone", async () => {
    const { port, broker } = await startBroker();
    const victim = await device(port, 'sensor-1');
    let victimClosed = false;
    victim.on('close', () => (victimClosed = true));
    expect(
      await connackCode(
        port,
        connectPacket('sensor-1', { username: 'sensor-2', password: Buffer.from(PASSWORDS['sensor-2']) }),
      ),
    ).toBe(2);
    await stillServes(victim, 'sensor-1');
    expect(victimClosed).toBe(false);
    expect(broker.connectedDevices().map((d) => d.id)).toEqual(['sensor-1']);
  });

  it('refuses client ids and usernames with wildcards, slashes, $ or NUL, and empty ids with clean=false', async () => {
    const { port } = await startBroker({ config: brokerConfig({ allowAnonymous: true }) });
    for (const id of ['+', '#', 'a/b', '$SYS', 'a\u0000b', 'x'.repeat(300)]) {
      expect(await connackCode(port, connectPacket(id)), id).toBe(2);
    }
    // mqtt-packet refuses to generate this one (MQTT-3.1.3-8), so the bytes are written by hand.
    const emptyPersistent = await raw(port);
    emptyPersistent.write(Buffer.from('100c00044d51545404' + '00' + '003c' + '0000', 'hex'));
    expect(await emptyPersistent.next('connack')).toMatchObject({ returnCode: 2 });
    expect(
      await connackCode(
        port,
        connectPacket('sensor-1', { username: 'sensor+1', password: Buffer.from('x') }),
      ),
    ).toBe(4);
    expect(await connackCode(port, connectPacket('sensor-1', { username: 'sensor-1' }))).toBe(4);
  });

  it('S4: answers odd CONNECT fields without an exception: 64 KiB ids, empty or binary credentials', async () => {
    const { port, logLines } = await startBroker();
    const huge = 'd'.repeat(65_000); // the most a 2-byte length allows, nearly
    // A client id and a username of about 64 KiB each (the packet stays under maxPacketSize).
    expect(
      await connackCode(port, connectPacket(huge, { username: huge, password: Buffer.from('x') })),
    ).not.toBe(0);
    // An empty username with a password; a password that is not UTF-8.
    expect(
      await connackCode(port, connectPacket('sensor-1', { username: '', password: Buffer.from('x') })),
    ).not.toBe(0);
    expect(
      await connackCode(
        port,
        connectPacket('sensor-1', { username: 'sensor-1', password: Buffer.from([0xff, 0xfe, 0x00, 0xc3]) }),
      ),
    ).toBe(4);
    // None of it escaped a hook, and the device with good credentials still gets in.
    expect(logLines.some((l) => /authenticate_failed|uncaught/.test(l))).toBe(false);
    await stillServes(await device(port, 'sensor-1'), 'sensor-1');
  });

  it('aggregates an auth failure flood into one row per second per address, with the count', async () => {
    // A window far longer than five scrypt checks take on a loaded machine: the first failure is
    // written at once, the other four wait in its window and are written, counted, at close.
    const { port, activity, broker } = await startBroker({ activityWindowMs: 60_000 });
    for (let i = 0; i < 5; i++) {
      expect(
        await connackCode(
          port,
          connectPacket('sensor-1', { username: 'sensor-1', password: Buffer.from(`wrong-${i}`) }),
        ),
      ).toBe(4);
    }
    expect(activity.list({ activityType: 'auth_failed' })).toHaveLength(1);
    expect(broker.stats.authFailures).toBe(5);
    await broker.close();
    const rows = activity.list({ activityType: 'auth_failed' });
    expect(rows.map((r) => Number(r.metadata.count)).sort()).toEqual([1, 4]);
  });
});

describe('broker security: topics', () => {
  it('closes the connection on a publish to another device, without PUBACK or ingest', async () => {
    const { port, ingested } = await startBroker();
    const c = await raw(port);
    c.send(login('sensor-1'));
    await c.next('connack');
    c.send({
      cmd: 'publish',
      topic: 'devices/sensor-2/telemetry',
      payload: Buffer.from('spoof'),
      qos: 1,
      messageId: 5,
      retain: false,
      dup: false,
    });
    await c.closed;
    expect(c.packets.some((p) => p.cmd === 'puback')).toBe(false);
    expect(ingested).toEqual([]);
  });

  it('answers SUBACK 0x80 for filters reaching beyond the ACL', async () => {
    const { port } = await startBroker();
    const c = await raw(port);
    c.send(login('sensor-1'));
    await c.next('connack');
    const filters = [
      '#',
      '+/#',
      'devices/+/telemetry',
      'devices/sensor-2/#',
      '$SYS/#',
      '$SYS/+/new/subscribes',
      'devices/sensor-1/#',
      'devices/sensor-1/x/+',
    ];
    c.send({
      cmd: 'subscribe',
      messageId: 1,
      subscriptions: filters.map((topic) => ({ topic, qos: 1 as const })),
    });
    expect(await c.next('suback')).toMatchObject({ granted: [128, 128, 128, 128, 128, 128, 1, 1] });
  });

  it('never serves another device its retained messages', async () => {
    const { port } = await startBroker({
      config: brokerConfig({
        devices: [
          {
            id: 'sensor-1',
            passwordHash: world.hashes['sensor-1'],
            acl: { publish: ['devices/sensor-1/#'], subscribe: ['devices/#'], deny: ['devices/sensor-2/#'] },
          },
          { id: 'sensor-2', passwordHash: world.hashes['sensor-2'] },
        ],
      }),
    });
    const owner = await device(port, 'sensor-2');
    await owner.publishAsync('devices/sensor-2/state', 'private', { qos: 1, retain: true });
    const c = await raw(port);
    c.send(login('sensor-1'));
    await c.next('connack');
    // `devices/#` is allowed and reaches into the deny list: granted, and the denied topics'
    // messages (the retained one and new ones alike) are dropped at delivery (deny wins).
    // A filter wholly inside the deny list is refused.
    c.send({
      cmd: 'subscribe',
      messageId: 1,
      subscriptions: [
        { topic: 'devices/#', qos: 1 },
        { topic: 'devices/sensor-1/#', qos: 1 },
        { topic: 'devices/sensor-2/state', qos: 1 },
      ],
    });
    expect(await c.next('suback')).toMatchObject({ granted: [1, 1, 128] });
    await expect(c.next('publish', 300)).rejects.toThrow(/no publish/);
    await owner.publishAsync('devices/sensor-2/telemetry', 'private too', { qos: 1 });
    c.send({
      cmd: 'publish',
      topic: 'devices/sensor-1/telemetry',
      payload: Buffer.from('own'),
      qos: 1,
      messageId: 2,
      retain: false,
      dup: false,
    });
    await c.next('puback');
    // Only its own message comes back; the other device's, published first, never does.
    expect(await c.next('publish')).toMatchObject({ topic: 'devices/sensor-1/telemetry' });
    await expect(c.next('publish', 300)).rejects.toThrow(/no publish/);
  });

  it('acknowledges and discards a $SYS/<id>/new/clients publish naming a victim; the victim stays', async () => {
    const { port, ingested, activity } = await startBroker();
    const victim = await device(port, 'sensor-2');
    let victimClosed = false;
    victim.on('close', () => (victimClosed = true));
    const c = await raw(port);
    c.send(login('sensor-1'));
    await c.next('connack');
    // aedes' own cluster takeover listens on `$SYS/+/new/clients` (aedes #597).
    for (const [qos, messageId] of [
      [0, undefined],
      [1, 7],
      [2, 8],
    ] as const) {
      c.send({
        cmd: 'publish',
        topic: '$SYS/other-broker/new/clients',
        payload: Buffer.from('sensor-2'),
        qos,
        messageId,
        retain: true,
        dup: false,
      });
    }
    // `$` topics are the server's: acknowledged as the QoS requires and discarded (MQTT-3.3.5-2).
    expect(await c.next('puback')).toMatchObject({ messageId: 7 });
    expect(await c.next('pubrec')).toMatchObject({ messageId: 8 });
    c.send({ cmd: 'pubrel', messageId: 8 });
    expect(await c.next('pubcomp')).toMatchObject({ messageId: 8 });
    await stillServes(victim, 'sensor-2');
    expect(victimClosed).toBe(false);
    expect(c.isClosed).toBe(false);
    expect(ingested.map((m) => m.topic)).toEqual(['devices/sensor-2/telemetry']);
    expect(activity.list({ activityType: 'acl_denied' })[0]!.metadata).toMatchObject({
      clientId: 'sensor-1',
      topic: '$SYS/other-broker/new/clients',
    });
  });

  it('refuses a will on a foreign or $ topic at CONNECT, and publishes an allowed will through ingest', async () => {
    const { port, ingested, activity } = await startBroker();
    const will = (topic: string) => ({ topic, payload: Buffer.from('gone'), qos: 1 as const, retain: false });
    expect(await connackCode(port, login('sensor-1', { will: will('devices/sensor-2/status') }))).toBe(5);
    expect(await connackCode(port, login('sensor-1', { will: will('$SYS/x/new/clients') }))).toBe(5);
    expect(activity.list({ activityType: 'auth_failed' }).map((r) => r.metadata.reason)).toContain(
      'will_not_allowed',
    );

    const c = await raw(port);
    c.send(login('sensor-1', { will: will('devices/sensor-1/status') }));
    expect(await c.next('connack')).toMatchObject({ returnCode: 0 });
    c.socket.destroy();
    await waitUntil(() => ingested.length === 1);
    expect(ingested[0]).toMatchObject({ deviceId: 'sensor-1', topic: 'devices/sensor-1/status' });
  });
});

describe('broker security: packets', () => {
  it('closes the socket on a PUBLISH declaring 10 MiB as soon as the header arrives', async () => {
    const { port, broker, activity, ingested } = await startBroker();
    const other = await device(port, 'sensor-2');
    const c = await raw(port);
    c.send(login('sensor-1'));
    await c.next('connack');
    // Only the fixed header: the broker must not wait for a body it will never buffer.
    c.write(Buffer.concat([Buffer.from([0x32]), varint(10 * 1024 * 1024)]));
    await within(c.closed);
    expect(broker.stats.rejectedPackets).toBe(1);
    expect(activity.list({ activityType: 'packet_rejected' })[0]!.metadata).toMatchObject({
      reason: 'packet_too_large',
      remoteAddress: '127.0.0.1',
    });
    expect(ingested).toEqual([]);
    await stillServes(other, 'sensor-2');
  });

  it('cuts a 10 MiB PUBLISH stream long before it is all sent, keeping memory flat', async () => {
    const { port, ingested } = await startBroker();
    const c = await raw(port);
    c.send(login('sensor-1'));
    await c.next('connack');
    const total = 10 * 1024 * 1024;
    const topic = Buffer.from('devices/sensor-1/telemetry');
    const header = Buffer.concat([Buffer.from([0x30]), varint(total), Buffer.from([0, topic.length]), topic]);
    const before = process.memoryUsage().arrayBuffers;
    const chunk = Buffer.alloc(64 * 1024, 0x61);
    let sent = header.length;
    c.write(header);
    // Bounded loop: writes at most the declared size, stops when the broker hangs up.
    while (sent < total && !c.isClosed) {
      const ok = c.socket.write(chunk);
      sent += chunk.length;
      if (!ok) await Promise.race([new Promise((r) => c.socket.once('drain', r)), c.closed]);
    }
    await c.closed;
    // Kernel buffers take a few MiB at most: the broker stopped reading at the header.
    expect(sent).toBeLessThan(total);
    expect(ingested).toEqual([]);
    expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(total);
  });

  it('follows fixed headers split across chunks', async () => {
    const { port, broker } = await startBroker();
    const ok = await raw(port);
    for (const byte of mqttPacket.generate(login('sensor-1'))) {
      ok.write(Buffer.from([byte]));
      await new Promise((r) => setImmediate(r));
    }
    expect(await ok.next('connack')).toMatchObject({ returnCode: 0 });

    // An oversized PUBLISH header, one byte per TCP segment, after a valid CONNECT.
    const big = await raw(port);
    big.send(login('sensor-2'));
    await big.next('connack');
    for (const byte of Buffer.concat([Buffer.from([0x30]), varint(5 * 1024 * 1024)])) {
      if (big.isClosed) break;
      big.write(Buffer.from([byte]));
      await new Promise((r) => setTimeout(r, 5));
    }
    await within(big.closed);
    expect(broker.stats.rejectedPackets).toBe(1);
  });

  it('S12: closes sockets that send nothing or half a CONNECT after connectTimeout; devices stay served', async () => {
    const { port, broker } = await startBroker({
      config: brokerConfig({ connectTimeout: '300ms', connectRate: { perIp: 0, total: 0 } }),
    });
    const other = await device(port, 'sensor-2');
    const half = mqttPacket.generate(login('sensor-1')).subarray(0, 9);
    const idle = await Promise.all(
      Array.from({ length: 60 }, async (_, i) => {
        const c = await raw(port);
        if (i % 2 === 1) c.write(half);
        return c;
      }),
    );
    await within(Promise.all(idle.map((c) => c.closed)), 5_000);
    expect(idle.every((c) => c.packets.length === 0)).toBe(true); // not even a CONNACK
    await stillServes(other, 'sensor-2');
    await waitUntil(() => broker.stats.connections === 1);
  });

  it('S16: accepts keepalive 0, refuses a keepalive over keepaliveLimit with CONNACK 2 (a 3.1.1 code)', async () => {
    const { port, activity } = await startBroker({ config: brokerConfig({ keepaliveLimit: '10m' }) });
    expect(await connackCode(port, login('sensor-1', { keepalive: 65_535 }))).toBe(2);
    expect(await connackCode(port, login('sensor-1', { keepalive: 601 }))).toBe(2);
    expect(await connackCode(port, login('sensor-1', { keepalive: 600 }))).toBe(0);
    // Keepalive 0 (none) is valid MQTT 3.1.1: connected, and still served after a while.
    const idle = await raw(port);
    idle.send(login('sensor-2', { keepalive: 0 }));
    expect(await idle.next('connack')).toMatchObject({ returnCode: 0 });
    idle.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'devices/sensor-2/#', qos: 1 }] });
    expect(await idle.next('suback')).toMatchObject({ granted: [1] });
    expect(activity.list({ activityType: 'connection_rejected' })[0]!.metadata).toMatchObject({
      reason: 'keepalive_too_long',
      keepalive: 65_535,
    });
  });

  it('refuses keepalive 0 with CONNACK 2 when broker.allowKeepaliveZero is false, before any password check', async () => {
    const { port, broker } = await startBroker({ config: brokerConfig({ allowKeepaliveZero: false }) });
    expect(await connackCode(port, login('sensor-1', { keepalive: 0 }))).toBe(2);
    // A wrong password is not even checked (no auth failure counted): the keepalive refuses first.
    expect(
      await connackCode(
        port,
        connectPacket('sensor-1', { username: 'sensor-1', password: Buffer.from('x'), keepalive: 0 }),
      ),
    ).toBe(2);
    expect(broker.stats.authFailures).toBe(0);
    expect(await connackCode(port, login('sensor-1', { keepalive: 30 }))).toBe(0);
  });

  it('turns TCP keepalive on for accepted sockets, so a keepalive-0 client that vanished is found', async () => {
    const { port } = await startBroker();
    const c = await raw(port);
    c.send(login('sensor-1', { keepalive: 0 }));
    expect(await c.next('connack')).toMatchObject({ returnCode: 0 });
    // /proc/net/tcp: the broker's end of the connection (local port = the listener's, state 01
    // established) runs the keepalive timer (`tr` 02) while idle; without SO_KEEPALIVE it is 00.
    const hex = port.toString(16).toUpperCase().padStart(4, '0');
    const timers = readFileSync('/proc/net/tcp', 'utf8')
      .split('\n')
      .map((line) => line.trim().split(/\s+/))
      .filter((f) => f[1]?.endsWith(`:${hex}`) && f[3] === '01')
      .map((f) => f[5]!.split(':')[0]);
    expect(timers).toEqual(['02']);
  });

  it('applies keepaliveLimit and allowKeepaliveZero from a reload to the next CONNECT', async () => {
    const { port, broker } = await startBroker();
    expect(await connackCode(port, login('sensor-1', { keepalive: 0 }))).toBe(0);
    expect(await connackCode(port, login('sensor-1', { keepalive: 900 }))).toBe(0);
    broker.updateConfig(brokerConfig({ allowKeepaliveZero: false, keepaliveLimit: '5m' }));
    expect(await connackCode(port, login('sensor-1', { keepalive: 0 }))).toBe(2);
    expect(await connackCode(port, login('sensor-1', { keepalive: 900 }))).toBe(2);
    expect(await connackCode(port, login('sensor-1', { keepalive: 300 }))).toBe(0);
  });

  it('answers every refusal with a CONNACK code MQTT 3.1.1 defines (1–5)', async () => {
    const { port } = await startBroker({
      config: brokerConfig({ keepaliveLimit: '1m', allowKeepaliveZero: false }),
    });
    const refusals: [string, Packet][] = [
      ['protocol level 5', connectPacket('sensor-1', { protocolVersion: 5 })],
      ['keepalive 0', login('sensor-1', { keepalive: 0 })],
      ['keepalive over the limit', login('sensor-1', { keepalive: 61 })],
      ['wrong password', connectPacket('sensor-1', { username: 'sensor-1', password: Buffer.from('x') })],
      ['anonymous', connectPacket('anon')],
      [
        'foreign client id',
        connectPacket('sensor-2', { username: 'sensor-1', password: Buffer.from(PASSWORDS['sensor-1']) }),
      ],
    ];
    for (const [what, packet] of refusals) {
      const code = await connackCode(port, packet);
      expect(code, what).toBeGreaterThanOrEqual(1);
      expect(code, what).toBeLessThanOrEqual(5);
    }
  });

  it('grants each filter the QoS asked for or 0x80, nothing else (SUBACK 0, 1, 2, 0x80)', async () => {
    const { port } = await startBroker();
    const c = await raw(port);
    c.send(login('sensor-1'));
    await c.next('connack');
    c.send({
      cmd: 'subscribe',
      messageId: 1,
      subscriptions: [
        { topic: 'devices/sensor-1/a', qos: 0 },
        { topic: 'devices/sensor-1/b', qos: 1 },
        { topic: 'devices/sensor-1/c', qos: 2 },
        { topic: 'devices/sensor-2/a', qos: 2 },
        { topic: '$SYS/#', qos: 0 },
      ],
    });
    expect(await c.next('suback')).toMatchObject({ granted: [0, 1, 2, 128, 128] });
  });

  it('S14: disconnects a device that leaves 1,000 QoS 2 messages without PUBREL; others stay served', async () => {
    const { port, logLines } = await startBroker();
    const other = await device(port, 'sensor-2');
    const abuser = await raw(port);
    abuser.send(login('sensor-1'));
    await abuser.next('connack');
    const payload = Buffer.alloc(64, 1);
    for (let i = 1; i <= 1500 && !abuser.isClosed; i++) {
      abuser.send({
        cmd: 'publish',
        topic: 'devices/sensor-1/telemetry',
        payload,
        qos: 2,
        messageId: i,
        retain: false,
        dup: false,
      });
      if (i % 100 === 0) await new Promise((r) => setTimeout(r, 5));
    }
    await within(abuser.closed, 10_000);
    expect(logLines.some((l) => l.includes('maxInflightInbound exceeded'))).toBe(true);
    // Bounded: it never got a PUBREC past aedes' limit of 1,000 messages awaiting PUBREL.
    expect(abuser.packets.filter((p) => p.cmd === 'pubrec').length).toBeLessThanOrEqual(1000);
    await stillServes(other, 'sensor-2');
  });

  it('S14: a QoS 2 message repeated with its id is taken once; a PUBREL for an unknown id changes nothing', async () => {
    const { port, ingested } = await startBroker();
    const c = await raw(port);
    c.send(login('sensor-1'));
    await c.next('connack');
    const publish = (dup: boolean) =>
      c.send({
        cmd: 'publish',
        topic: 'devices/sensor-1/telemetry',
        payload: Buffer.from('once'),
        qos: 2,
        messageId: 42,
        retain: false,
        dup,
      });
    publish(false);
    await c.next('pubrec');
    // The device did not see the PUBREC and sends the message again, five times.
    for (let i = 0; i < 5; i++) {
      publish(true);
      await c.next('pubrec');
    }
    c.send({ cmd: 'pubrel', messageId: 42 });
    await c.next('pubcomp');
    // PUBRELs for ids that were never published, or already released.
    for (const messageId of [42, 7, 65_535]) {
      c.send({ cmd: 'pubrel', messageId });
      await c.next('pubcomp');
    }
    expect(ingested.map((m) => m.payload.toString())).toEqual(['once']);
    expect(c.isClosed).toBe(false);
    c.socket.destroy();

    // A persistent session: the link drops after the PUBREC, the device reconnects and resends.
    const persistent = { clean: false };
    const before = await raw(port);
    before.send(login('sensor-1', persistent));
    await before.next('connack');
    const resendable = (dup: boolean): Packet => ({
      cmd: 'publish',
      topic: 'devices/sensor-1/telemetry',
      payload: Buffer.from('across a reconnect'),
      qos: 2,
      messageId: 9,
      retain: false,
      dup,
    });
    before.send(resendable(false));
    await before.next('pubrec');
    before.socket.destroy();
    await before.closed;
    const after = await raw(port);
    after.send(login('sensor-1', persistent));
    expect(await after.next('connack')).toMatchObject({ returnCode: 0 });
    after.send(resendable(true));
    await after.next('pubrec');
    after.send({ cmd: 'pubrel', messageId: 9 });
    await after.next('pubcomp');
    expect(ingested.map((m) => m.payload.toString())).toEqual(['once', 'across a reconnect']);
  });

  it('survives a 201-level topic, a __proto__ client id and the aedes #612 CONNECT bytes', async () => {
    const { port } = await startBroker({
      config: brokerConfig({ allowAnonymous: true, anonymousAcl: { publish: ['#'], subscribe: ['#'] } }),
    });
    const deep = Array.from({ length: 201 }, (_, i) => `l${i}`).join('/');

    const pub = await raw(port);
    pub.send(connectPacket('deep-pub'));
    await pub.next('connack');
    pub.send({
      cmd: 'publish',
      topic: deep,
      payload: Buffer.from('x'),
      qos: 1,
      messageId: 1,
      retain: false,
      dup: false,
    });
    await pub.closed;

    const sub = await raw(port);
    sub.send(connectPacket('deep-sub'));
    await sub.next('connack');
    sub.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: deep, qos: 0 }] });
    await Promise.race([sub.closed, sub.next('suback')]);

    expect(
      await connackCode(
        port,
        connectPacket('deep-will', {
          will: { topic: deep, payload: Buffer.from('x'), qos: 0, retain: false },
        }),
      ),
    ).not.toBe(0);

    const proto = await raw(port);
    proto.send(connectPacket('__proto__'));
    await Promise.race([proto.closed, proto.next('connack')]);
    proto.socket.destroy();

    const fuzz = await raw(port);
    fuzz.write(Buffer.from('101000044d5154540502003c0321001400006202d301e0020020', 'hex'));
    await Promise.race([fuzz.closed, fuzz.next('connack').catch(() => undefined)]);
    fuzz.socket.destroy();

    // The broker is alive and serving.
    const fine = await device(port, 'sensor-1');
    await stillServes(fine, 'sensor-1');
  });
});

describe('broker security: odd topics (S15)', () => {
  /** A QoS 1 PUBLISH with the topic given as raw bytes (mqtt-packet would encode a string). */
  function publishBytes(topic: Buffer, messageId: number): Buffer {
    const body = Buffer.concat([
      Buffer.from([topic.length >> 8, topic.length & 0xff]),
      topic,
      Buffer.from([messageId >> 8, messageId & 0xff]),
      Buffer.from('x'),
    ]);
    return Buffer.concat([Buffer.from([0x32]), varint(body.length), body]);
  }

  it('closes the link on a topic with U+0000 or ill-formed UTF-8, without PUBACK or ingest', async () => {
    const { port, ingested } = await startBroker();
    const bad = [
      Buffer.from('devices/sensor-1/a\u0000b', 'utf8'),
      Buffer.concat([Buffer.from('devices/sensor-1/'), Buffer.from([0xc3, 0x28])]),
      Buffer.concat([Buffer.from('devices/sensor-1/'), Buffer.from([0xed, 0xa0, 0x80])]), // a UTF-16 surrogate
    ];
    for (const topic of bad) {
      const c = await raw(port);
      c.send(login('sensor-1'));
      expect(((await c.next('connack')) as mqttPacket.IConnackPacket).returnCode).toBe(0);
      c.write(publishBytes(topic, 1));
      await within(c.closed);
      expect(c.packets.filter((p) => p.cmd === 'puback')).toEqual([]);
    }
    expect(ingested).toEqual([]);
    await stillServes(await device(port, 'sensor-1'), 'sensor-1');
  });

  it('treats __proto__ and constructor as plain topic levels, and survives a 201-level UNSUBSCRIBE', async () => {
    const { port, ingested } = await startBroker();
    const client = await device(port, 'sensor-1');
    for (const topic of ['devices/sensor-1/__proto__', 'devices/sensor-1/constructor/prototype']) {
      await client.publishAsync(topic, '{"__proto__":{"polluted":1}}', { qos: 1 });
    }
    await client.subscribeAsync('devices/sensor-1/__proto__/#', { qos: 1 });
    expect(ingested.map((m) => m.topic)).toEqual([
      'devices/sensor-1/__proto__',
      'devices/sensor-1/constructor/prototype',
    ]);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();

    const c = await raw(port);
    c.send(login('sensor-2'));
    await c.next('connack');
    const deep = Array.from({ length: 201 }, (_, i) => `l${i}`).join('/');
    c.send({ cmd: 'unsubscribe', messageId: 3, unsubscriptions: [deep, 'devices/sensor-2/\u0000'] });
    await Promise.race([c.closed, c.next('unsuback')]);
    await stillServes(client, 'sensor-1');
  });
});

describe('broker security: malformed packets (S17)', () => {
  /** Deterministic, so a failure replays: mulberry32. */
  function prng(seed: number): () => number {
    let a = seed >>> 0;
    return () => {
      a = (a + 0x6d2b79f5) >>> 0;
      let t = a;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }

  function mutate(frame: Buffer, rand: () => number): Buffer {
    const out = Buffer.from(frame);
    const pick = (n: number) => Math.floor(rand() * n);
    switch (pick(5)) {
      case 0: // flip a few bits anywhere
        for (let i = pick(4) + 1; i > 0; i--) out[pick(out.length)]! ^= 1 << pick(8);
        return out;
      case 1: // truncate
        return out.subarray(0, pick(out.length));
      case 2: // a wrong remaining length
        out[1] = pick(256);
        return out;
      case 3: // reserved flags and packet types 0 and 15
        out[0] = (pick(2) === 0 ? 0x00 : 0xf0) | pick(16);
        return out;
      default: // a slice repeated inside
        return Buffer.concat([out, out.subarray(pick(out.length))]);
    }
  }

  it('survives 300 mutated CONNECT, PUBLISH, SUBSCRIBE, UNSUBSCRIBE and PUBREL frames', async () => {
    // The door's own defences off, so every frame reaches the parser and the hooks.
    const { port, activity } = await startBroker({
      config: brokerConfig({
        connectRate: { perIp: 0, total: 0 },
        loginBackoff: { failures: 0, ipFailures: 0 },
      }),
      activityWindowMs: 0,
    });
    const other = await device(port, 'sensor-2');
    const rand = prng(20261129);
    const good = mqttPacket.generate(login('sensor-1'));
    const frames: Buffer[] = [
      good,
      mqttPacket.generate({
        cmd: 'publish',
        topic: 'devices/sensor-1/telemetry',
        payload: Buffer.from('{"t":21.5}'),
        qos: 1,
        messageId: 7,
        retain: false,
        dup: false,
      }),
      mqttPacket.generate({
        cmd: 'subscribe',
        messageId: 8,
        subscriptions: [{ topic: 'devices/sensor-1/commands/#', qos: 1 }],
      }),
      mqttPacket.generate({
        cmd: 'unsubscribe',
        messageId: 9,
        unsubscriptions: ['devices/sensor-1/commands/#'],
      }),
      mqttPacket.generate({ cmd: 'pubrel', messageId: 10 }),
    ];
    for (let i = 0; i < 300; i++) {
      const kind = i % frames.length;
      const c = await raw(port);
      // Mutated CONNECTs on their own; the other kinds after a good login.
      if (kind === 0) c.write(mutate(good, rand));
      else c.write(Buffer.concat([good, mutate(frames[kind]!, rand)]));
      await new Promise((r) => setTimeout(r, 2));
      c.socket.destroy();
    }
    await stillServes(other, 'sensor-2');
    // A well-formed login still works after all of it.
    expect(await connackCode(port, login('sensor-1'))).toBe(0);
    // The broken frames are on record (SPEC §4): before a login and from a logged-in device.
    await waitUntil(
      () =>
        activity.list({ activityType: 'connection_rejected' }).length > 0 &&
        activity.list({ activityType: 'protocol_error' }).length > 0,
    );
    const errors = activity.list({ activityType: 'protocol_error', limit: 1000 });
    expect(
      errors.every((row) => row.status === 'failed' && row.errorMessage?.startsWith('connection closed: ')),
    ).toBe(true);
    expect(errors.some((row) => (row.metadata as { clientId?: unknown }).clientId === 'sensor-1')).toBe(true);
  });
});

describe('packet size scanner', () => {
  const header = (type: number, length: number) => Buffer.concat([Buffer.from([type << 4]), varint(length)]);

  it('accepts packets up to the limit and rejects the first byte over it', () => {
    const limit = 1000;
    const atLimit = Buffer.concat([header(3, 997), Buffer.alloc(997)]);
    expect(atLimit.length).toBe(1000);
    expect(createPacketSizeScanner(limit).push(atLimit)).toBeNull();
    expect(createPacketSizeScanner(limit).push(header(3, 998))).toMatchObject({
      reason: 'packet_too_large',
      declaredSize: 1001,
      packetType: 3,
    });
  });

  it('tracks bodies and headers across arbitrary chunk boundaries', () => {
    const stream = Buffer.concat([
      header(12, 0),
      header(3, 300),
      Buffer.alloc(300),
      header(8, 10),
      Buffer.alloc(10),
      header(3, 2_000_000),
    ]);
    for (const size of [1, 2, 3, 7, 128, stream.length]) {
      const scanner = createPacketSizeScanner(1024);
      let result = null;
      for (let i = 0; i < stream.length && result === null; i += size)
        result = scanner.push(stream.subarray(i, i + size));
      expect(result, `chunk size ${size}`).toMatchObject({ reason: 'packet_too_large', packetType: 3 });
    }
  });

  it('rejects a remaining length longer than four bytes', () => {
    expect(
      createPacketSizeScanner(1 << 30).push(Buffer.from([0x30, 0xff, 0xff, 0xff, 0xff, 0x01])),
    ).toMatchObject({ reason: 'malformed_length' });
  });
});
