import { connect as netConnect } from 'node:net';
import mqtt, { type MqttClient } from 'mqtt';
import type mqttPacket from 'mqtt-packet';
import { describe, expect, it } from 'vitest';
import type { Config, ConfigInput } from '../../../src/config/schema.js';
import {
  createConnectRateLimiter,
  createLoginBackoff,
  sourceKey,
  type ConnectRateConfig,
  type LoginBackoffConfig,
} from '../../../src/gateway/broker/admission.js';
import { createBroker, type Broker } from '../../../src/gateway/broker/broker.js';
import {
  createPasswordVerifier,
  hashPassword,
  type PasswordVerifier,
} from '../../../src/gateway/broker/password-hash.js';
import type { ActivityLog } from '../../../src/store/activity-log.js';
import { createCaptureLogger, type LogRecord } from '../../helpers/capture-logger.js';
import {
  PASSWORDS,
  openWorldStore,
  twoDeviceBrokerConfig,
  useBrokerTestWorld,
} from '../../helpers/broker-fixture.js';
import { connectPacket, connectRaw, waitUntil } from '../../helpers/raw-mqtt.js';

const GATEWAY_ID = 'gw-admission';
const world = useBrokerTestWorld('gw-admission-');
const running = world.running;

/** A clock the test moves by hand: nothing here waits for real time to pass. */
function manualClock(start = 1_000) {
  let t = start;
  return { now: () => t, advance: (ms: number) => void (t += ms) };
}

/** The real scrypt verifier, without its own cache, counting how often a password is checked. */
function countingVerifier(): { verifier: PasswordVerifier; readonly calls: number } {
  const real = createPasswordVerifier({ cacheSize: 0 });
  let calls = 0;
  return {
    get calls() {
      return calls;
    },
    verifier: {
      get cacheSize() {
        return real.cacheSize;
      },
      verify(password, hash) {
        calls++;
        return real.verify(password, hash);
      },
    },
  };
}

function brokerConfig(broker: Partial<NonNullable<ConfigInput['broker']>> = {}): Config['broker'] {
  return twoDeviceBrokerConfig(GATEWAY_ID, world.root, world.hashes, broker);
}

interface Harness {
  broker: Broker;
  port: number;
  activity: ActivityLog;
  logs: LogRecord[];
}

async function startBroker(options: {
  config: Config['broker'];
  now: () => number;
  verifier?: PasswordVerifier;
  activityWindowMs?: number;
}): Promise<Harness> {
  const logs: LogRecord[] = [];
  const logger = createCaptureLogger(logs, { gatewayId: GATEWAY_ID });
  const { activity } = openWorldStore(world, GATEWAY_ID, logger);
  const broker = createBroker({
    config: options.config,
    gatewayId: GATEWAY_ID,
    retainedStatus: false,
    logger,
    activity,
    activityWindowMs: options.activityWindowMs,
    verifier: options.verifier,
    now: options.now,
    ingest: () => null,
  });
  running.push(broker);
  const bound = await broker.listen();
  return { broker, port: bound[0]!.port, activity, logs };
}

async function device(port: number, id: keyof typeof PASSWORDS, password: string = PASSWORDS[id]) {
  const client: MqttClient = await mqtt.connectAsync(
    `mqtt://127.0.0.1:${port}`,
    { clientId: id, username: id, password, reconnectPeriod: 0, connectTimeout: 5000 },
    false,
  );
  running.push({ close: () => void client.end(true) });
  return client;
}

/** A bare TCP connection that sends nothing; `isClosed` once the broker hung up. */
function bareSocket(port: number): { readonly isClosed: boolean } {
  const socket = netConnect({ host: '127.0.0.1', port });
  socket.on('error', () => {});
  let isClosed = false;
  socket.once('close', () => (isClosed = true));
  running.push({ close: () => void socket.destroy() });
  return {
    get isClosed() {
      return isClosed;
    },
  };
}

async function connackCode(port: number, packet: mqttPacket.Packet): Promise<number> {
  const c = await connectRaw(port, running, { ignoreParseErrors: true });
  c.send(packet);
  const connack = (await c.next('connack')) as mqttPacket.IConnackPacket;
  c.socket.destroy();
  return connack.returnCode ?? -1;
}

const login = (username: string, password: string, clientId = username) =>
  connectPacket(clientId, { username, password: Buffer.from(password) });

const CONNECT_RATE: ConnectRateConfig = { perIp: 10, perIpBurst: 3, total: 100, totalBurst: 5 };
const BACKOFF: LoginBackoffConfig = {
  failures: 3,
  ipFailures: 0,
  window: 60_000,
  initial: 1_000,
  max: 8_000,
};

describe('connect-rate limiter', () => {
  it('spends a source its burst, then refuses until the bucket refills', () => {
    const clock = manualClock();
    const limiter = createConnectRateLimiter({
      config: { ...CONNECT_RATE, totalBurst: 100 },
      now: clock.now,
    });
    const verdicts = Array.from({ length: 5 }, () => limiter.admit('10.0.0.1'));
    expect(verdicts).toEqual([null, null, null, 'connect_rate_ip', 'connect_rate_ip']);
    // Another source has its own bucket.
    expect(limiter.admit('10.0.0.2')).toBeNull();
    clock.advance(100); // 10/s: one token
    expect(limiter.admit('10.0.0.1')).toBeNull();
    expect(limiter.admit('10.0.0.1')).toBe('connect_rate_ip');
  });

  it('caps the total, and a source refused for itself does not drain the total', () => {
    const clock = manualClock();
    const limiter = createConnectRateLimiter({ config: CONNECT_RATE, now: clock.now });
    // One noisy source: 3 admitted, 20 refused by its own bucket; 2 of the 5 total tokens are left.
    for (let i = 0; i < 23; i++) limiter.admit('10.0.0.1');
    expect(limiter.admit('10.0.0.2')).toBeNull();
    expect(limiter.admit('10.0.0.3')).toBeNull();
    expect(limiter.admit('10.0.0.4')).toBe('connect_rate_total');
    expect(limiter.admit(null)).toBe('connect_rate_total');
    clock.advance(10); // 100/s: one token
    expect(limiter.admit('10.0.0.4')).toBeNull();
  });

  it('treats 0 as unlimited and applies a reload to existing buckets', () => {
    const clock = manualClock();
    const limiter = createConnectRateLimiter({
      config: { perIp: 0, perIpBurst: 1, total: 0, totalBurst: 1 },
      now: clock.now,
    });
    for (let i = 0; i < 1000; i++) expect(limiter.admit('10.0.0.1')).toBeNull();
    expect(limiter.sources).toBe(0);
    limiter.configure({ perIp: 1, perIpBurst: 1, total: 0, totalBurst: 1 });
    expect(limiter.admit('10.0.0.1')).toBeNull();
    expect(limiter.admit('10.0.0.1')).toBe('connect_rate_ip');
  });

  it('keeps its table bounded under a flood from many addresses', () => {
    const clock = manualClock();
    const limiter = createConnectRateLimiter({
      config: { perIp: 1, perIpBurst: 2, total: 0, totalBurst: 1 },
      maxSources: 100,
      now: clock.now,
    });
    for (let i = 0; i < 20_000; i++) {
      limiter.admit(`10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`);
      expect(limiter.sources).toBeLessThanOrEqual(100);
    }
    expect(limiter.sources).toBe(100);
  });

  it('counts IPv4-mapped addresses as IPv4 and IPv6 by /64', () => {
    expect(sourceKey('::ffff:127.0.0.1')).toBe('127.0.0.1');
    expect(sourceKey('2001:db8:1:2:aaaa::1')).toBe(sourceKey('2001:db8:1:2:bbbb:cccc:dddd:eeee'));
    expect(sourceKey('2001:db8:1:2::1')).not.toBe(sourceKey('2001:db8:1:3::1'));
    expect(sourceKey('fe80::1%eth0')).toBe('fe80:0:0:0::/64');
    const clock = manualClock();
    const limiter = createConnectRateLimiter({
      config: { perIp: 1, perIpBurst: 1, total: 0, totalBurst: 1 },
      now: clock.now,
    });
    expect(limiter.admit('2001:db8::1')).toBeNull();
    expect(limiter.admit('2001:db8::2')).toBe('connect_rate_ip');
    expect(limiter.admit('127.0.0.1')).toBeNull();
    expect(limiter.admit('::ffff:127.0.0.1')).toBe('connect_rate_ip');
  });
});

describe('login backoff', () => {
  it('locks a username after `failures`, doubles the lock up to max, and clears it on reset', () => {
    const clock = manualClock();
    const backoff = createLoginBackoff({ config: BACKOFF, now: clock.now });
    expect(backoff.failed('sensor-1', '10.0.0.1')).toEqual([]);
    expect(backoff.failed('sensor-1', '10.0.0.1')).toEqual([]);
    expect(backoff.check('sensor-1', '10.0.0.1')).toBeNull();
    expect(backoff.failed('sensor-1', '10.0.0.1')).toEqual([{ scope: 'username', remainingMs: 1_000 }]);
    expect(backoff.check('sensor-1', '10.0.0.9')).toEqual({ scope: 'username', remainingMs: 1_000 });
    expect(backoff.check('sensor-2', '10.0.0.1')).toBeNull();

    const locks: number[] = [];
    for (let i = 0; i < 6; i++) {
      clock.advance(backoff.check('sensor-1', null)!.remainingMs);
      expect(backoff.check('sensor-1', null)).toBeNull();
      locks.push(backoff.failed('sensor-1', null)[0]!.remainingMs);
    }
    expect(locks).toEqual([2_000, 4_000, 8_000, 8_000, 8_000, 8_000]);

    backoff.reset('sensor-1');
    expect(backoff.check('sensor-1', null)).toBeNull();
    expect(backoff.failed('sensor-1', null)).toEqual([]);
  });

  it('forgets a count after a quiet window', () => {
    const clock = manualClock();
    const backoff = createLoginBackoff({ config: BACKOFF, now: clock.now });
    backoff.failed('sensor-1', null);
    backoff.failed('sensor-1', null);
    clock.advance(BACKOFF.window);
    expect(backoff.failed('sensor-1', null)).toEqual([]);
    expect(backoff.failed('sensor-1', null)).toEqual([]);
  });

  it('locks a source across usernames; a login success does not clear the source', () => {
    const clock = manualClock();
    const backoff = createLoginBackoff({
      config: { ...BACKOFF, failures: 0, ipFailures: 3 },
      now: clock.now,
    });
    expect(backoff.failed('a', '10.0.0.1')).toEqual([]);
    expect(backoff.failed('b', '10.0.0.1')).toEqual([]);
    backoff.reset('c');
    expect(backoff.failed('c', '10.0.0.1')).toEqual([{ scope: 'ip', remainingMs: 1_000 }]);
    expect(backoff.check('anyone', '10.0.0.1')).toEqual({ scope: 'ip', remainingMs: 1_000 });
    expect(backoff.check('anyone', '10.0.0.2')).toBeNull();
    expect(backoff.size.usernames).toBe(0);
  });

  it('keeps both tables bounded under many usernames and sources, and keeps locks over idle entries', () => {
    const clock = manualClock();
    const backoff = createLoginBackoff({
      config: { ...BACKOFF, failures: 2, ipFailures: 2 },
      maxEntries: 50,
      now: clock.now,
    });
    backoff.failed('victim', '10.9.9.9');
    backoff.failed('victim', '10.9.9.9');
    expect(backoff.check('victim', null)).toMatchObject({ scope: 'username' });
    for (let i = 0; i < 5_000; i++) {
      backoff.failed(`user-${i}`, `10.0.${(i >> 8) & 255}.${i & 255}`);
      expect(backoff.size.usernames).toBeLessThanOrEqual(50);
      expect(backoff.size.sources).toBeLessThanOrEqual(50);
    }
    expect(backoff.size).toEqual({ usernames: 50, sources: 50 });
    // Entries without a lock went first: the flood did not evict the lock it wanted gone.
    expect(backoff.check('victim', null)).toMatchObject({ scope: 'username' });
    expect(backoff.check('x', '10.9.9.9')).toMatchObject({ scope: 'ip' });
  });
});

describe('broker admission: connect rate at accept', () => {
  it('closes sockets over the per-source burst, counts them, logs once, and stays responsive', async () => {
    const clock = manualClock();
    const { broker, port, logs, activity } = await startBroker({
      config: brokerConfig({ connectRate: { perIp: '1/s', perIpBurst: 3, total: 0 } }),
      now: clock.now,
      activityWindowMs: 60_000,
    });
    const online = await device(port, 'sensor-2');
    const flood = Array.from({ length: 12 }, () => bareSocket(port));
    await waitUntil(() => flood.filter((s) => s.isClosed).length === 10);
    expect(broker.stats.rateLimitedConnections).toBe(10);
    expect(broker.stats.rejectedConnections).toBe(0);
    // sensor-2 and the two sockets that fit in the burst are still open.
    expect(broker.stats.connections).toBe(3);

    // The device that was already connected still gets its messages through.
    await online.publishAsync('devices/sensor-2/telemetry', 'alive', { qos: 1 });
    expect(online.connected).toBe(true);

    // One warning and one activity row for the whole flood (the rest are counted into the next).
    const warnings = logs.filter((l) => l.msg === 'connection_rejected');
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatchObject({ reason: 'connect_rate_ip', remoteAddress: '127.0.0.1' });
    expect(activity.list({ activityType: 'connection_rejected' })).toHaveLength(1);

    // The bucket is empty: a legitimate device is refused at accept too...
    const early = bareSocket(port);
    await waitUntil(() => early.isClosed);
    expect(broker.stats.rateLimitedConnections).toBe(11);
    // ...and gets in once the bucket has refilled.
    clock.advance(1_000);
    const late = await device(port, 'sensor-1');
    expect(late.connected).toBe(true);
  });

  it('refuses beyond the total rate whatever the source', async () => {
    const clock = manualClock();
    const { broker, port, activity } = await startBroker({
      config: brokerConfig({ connectRate: { perIp: 0, total: '1/s', totalBurst: 2 } }),
      now: clock.now,
    });
    const sockets = Array.from({ length: 6 }, () => bareSocket(port));
    await waitUntil(() => sockets.filter((s) => s.isClosed).length === 4);
    expect(broker.stats.rateLimitedConnections).toBe(4);
    await waitUntil(() => activity.list({ activityType: 'connection_rejected' }).length > 0);
    expect(activity.list({ activityType: 'connection_rejected' })[0]!.metadata).toMatchObject({
      reason: 'connect_rate_total',
    });
    clock.advance(1_000);
    expect(await connackCode(port, login('sensor-1', PASSWORDS['sensor-1']))).toBe(0);
  });

  it('applies a new connectRate on updateConfig', async () => {
    const clock = manualClock();
    const config = brokerConfig({ connectRate: { perIp: '1/s', perIpBurst: 1, total: 0 } });
    const { broker, port } = await startBroker({ config, now: clock.now });
    await device(port, 'sensor-1');
    const refused = bareSocket(port);
    await waitUntil(() => refused.isClosed);
    expect(broker.stats.rateLimitedConnections).toBe(1);
    broker.updateConfig(brokerConfig({ connectRate: { perIp: 0, total: 0 } }));
    await device(port, 'sensor-2');
    expect(broker.stats.rateLimitedConnections).toBe(1);
  });
});

describe('broker admission: login backoff', () => {
  const backoff = { failures: 3, ipFailures: 0, window: '1m', initial: '1s', max: '8s' };

  it('refuses a username after repeated wrong passwords without running scrypt, until the lock ends', async () => {
    const clock = manualClock();
    const counted = countingVerifier();
    const { broker, port, logs, activity } = await startBroker({
      config: brokerConfig({ loginBackoff: backoff }),
      now: clock.now,
      verifier: counted.verifier,
    });
    const answers: number[] = [];
    for (let i = 0; i < 3; i++) answers.push(await connackCode(port, login('sensor-1', `guess-${i}`)));
    expect(answers).toEqual([4, 4, 4]);
    expect(counted.calls).toBe(3);

    // Locked: wrong and right passwords alike are refused with 5 and no password check.
    expect(await connackCode(port, login('sensor-1', 'guess-3'))).toBe(5);
    expect(await connackCode(port, login('sensor-1', PASSWORDS['sensor-1']))).toBe(5);
    expect(counted.calls).toBe(3);
    expect(broker.stats.loginBackoffRefusals).toBe(2);
    // Other devices are not affected.
    expect(await connackCode(port, login('sensor-2', PASSWORDS['sensor-2']))).toBe(0);

    clock.advance(1_000);
    expect(await connackCode(port, login('sensor-1', PASSWORDS['sensor-1']))).toBe(0);
    // The success cleared the count: one more wrong password is checked and answered 4, not locked.
    expect(await connackCode(port, login('sensor-1', 'guess-4'))).toBe(4);

    expect(activity.list({ activityType: 'login_locked' })[0]!.metadata).toMatchObject({
      username: 'sensor-1',
      scope: 'username',
      lockMs: 1_000,
    });
    const text = JSON.stringify(logs);
    for (const secret of ['guess-0', 'guess-3', PASSWORDS['sensor-1']]) expect(text).not.toContain(secret);
  });

  it('treats an unknown username exactly like a known one', async () => {
    const clock = manualClock();
    const counted = countingVerifier();
    const { port } = await startBroker({
      config: brokerConfig({ loginBackoff: backoff }),
      now: clock.now,
      verifier: counted.verifier,
    });
    const run = async (username: string) => {
      const before = counted.calls;
      const answers: number[] = [];
      for (let i = 0; i < 5; i++) answers.push(await connackCode(port, login(username, `guess-${i}`)));
      return { answers, checks: counted.calls - before };
    };
    const known = await run('sensor-1');
    const unknown = await run('ghost-device');
    expect(known).toEqual({ answers: [4, 4, 4, 5, 5], checks: 3 });
    expect(unknown).toEqual(known);
  });

  it('locks a source that fails across many usernames', async () => {
    const clock = manualClock();
    const counted = countingVerifier();
    const { port } = await startBroker({
      config: brokerConfig({ loginBackoff: { ...backoff, failures: 0, ipFailures: 3 } }),
      now: clock.now,
      verifier: counted.verifier,
    });
    for (const user of ['ghost-1', 'ghost-2', 'sensor-1'])
      expect(await connackCode(port, login(user, 'nope'))).toBe(4);
    expect(await connackCode(port, login('sensor-2', PASSWORDS['sensor-2']))).toBe(5);
    expect(counted.calls).toBe(3);
    clock.advance(1_000);
    expect(await connackCode(port, login('sensor-2', PASSWORDS['sensor-2']))).toBe(0);
  });

  it('lets a device in at once when its credentials change on reload', async () => {
    const clock = manualClock();
    const { broker, port } = await startBroker({
      config: brokerConfig({ loginBackoff: backoff }),
      now: clock.now,
    });
    for (let i = 0; i < 3; i++) await connackCode(port, login('sensor-1', 'rotated-secret'));
    expect(await connackCode(port, login('sensor-1', 'rotated-secret'))).toBe(5);
    const rotated = await hashPassword('rotated-secret');
    broker.updateConfig(
      brokerConfig({
        loginBackoff: backoff,
        devices: [
          { id: 'sensor-1', passwordHash: rotated },
          { id: 'sensor-2', passwordHash: world.hashes['sensor-2'] },
        ],
      }),
    );
    expect(await connackCode(port, login('sensor-1', 'rotated-secret'))).toBe(0);
  });
});

describe('broker admission: login cache', () => {
  it('checks a device password once, and again only after its hash changed on reload', async () => {
    const clock = manualClock();
    const counted = countingVerifier();
    const { broker, port } = await startBroker({
      config: brokerConfig(),
      now: clock.now,
      verifier: counted.verifier,
    });
    expect(await connackCode(port, login('sensor-1', PASSWORDS['sensor-1']))).toBe(0);
    expect(counted.calls).toBe(1);
    for (let i = 0; i < 3; i++)
      expect(await connackCode(port, login('sensor-1', PASSWORDS['sensor-1']))).toBe(0);
    expect(counted.calls).toBe(1);
    // A wrong password is never answered from the cache.
    expect(await connackCode(port, login('sensor-1', 'not-it'))).toBe(4);
    expect(counted.calls).toBe(2);

    const rotated = await hashPassword('new-secret');
    broker.updateConfig(
      brokerConfig({
        devices: [
          { id: 'sensor-1', passwordHash: rotated },
          { id: 'sensor-2', passwordHash: world.hashes['sensor-2'] },
        ],
      }),
    );
    expect(await connackCode(port, login('sensor-1', PASSWORDS['sensor-1']))).toBe(4);
    expect(counted.calls).toBe(3);
    expect(await connackCode(port, login('sensor-1', 'new-secret'))).toBe(0);
    expect(await connackCode(port, login('sensor-1', 'new-secret'))).toBe(0);
    expect(counted.calls).toBe(4);
  });

  it('expires after loginCacheTtl, counted from the end of the last session', async () => {
    const clock = manualClock();
    const counted = countingVerifier();
    const { port, logs } = await startBroker({
      config: brokerConfig({ loginCacheTtl: '5m' }),
      now: clock.now,
      verifier: counted.verifier,
    });
    // The broker logs device_disconnected after it has noted the end of the session.
    const disconnects = () => logs.filter((l) => l.msg === 'device_disconnected').length;

    // Connected for an hour, then a network blip: the reconnect needs no scrypt.
    const long = await device(port, 'sensor-1');
    expect(counted.calls).toBe(1);
    clock.advance(60 * 60_000);
    await long.endAsync(true);
    await waitUntil(() => disconnects() === 1);
    clock.advance(60_000);
    expect(await connackCode(port, login('sensor-1', PASSWORDS['sensor-1']))).toBe(0);
    expect(counted.calls).toBe(1);

    // Five minutes after the end of its last session, the entry is gone.
    await waitUntil(() => disconnects() === 2);
    clock.advance(5 * 60_000);
    expect(await connackCode(port, login('sensor-1', PASSWORDS['sensor-1']))).toBe(0);
    expect(counted.calls).toBe(2);
  });
});
