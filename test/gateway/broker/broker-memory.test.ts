import { readdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import mqtt from 'mqtt';
import mqttPacket from 'mqtt-packet';
import { expect, it } from 'vitest';
import { createBroker } from '../../../src/gateway/broker/broker.js';
import { createLogger } from '../../../src/logger.js';
import {
  PASSWORDS,
  openWorldStore,
  twoDeviceBrokerConfig,
  useBrokerTestWorld,
} from '../../helpers/broker-fixture.js';
import { connectPacket, connectRaw, waitUntil, type Closable } from '../../helpers/raw-mqtt.js';

const GATEWAY_ID = 'gw-test';
/** The module aedes and mqtt.js write packets with (one copy in node_modules, one instance). */
const numbers = createRequire(import.meta.url)('mqtt-packet/numbers.js') as { cache: Record<number, Buffer> };

const world = useBrokerTestWorld('gw-broker-mem-');

it('writes packets without building mqtt-packet’s 65,536-buffer number cache (≈ 7 MB of heap)', async () => {
  const logger = createLogger({ level: 'silent', gatewayId: GATEWAY_ID });
  const { activity } = openWorldStore(world, GATEWAY_ID, logger);
  const broker = createBroker({
    config: twoDeviceBrokerConfig(GATEWAY_ID, world.root, world.hashes),
    gatewayId: GATEWAY_ID,
    retainedStatus: false,
    logger,
    activity,
    ingest: () => Promise.resolve(),
  });
  try {
    const [bound] = await broker.listen();
    const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${bound!.port}`, {
      clientId: 'sensor-1',
      username: 'sensor-1',
      password: PASSWORDS['sensor-1'],
      reconnectPeriod: 0,
      connectTimeout: 5000,
      protocolVersion: 4,
    });
    try {
      // A QoS 1 round trip: CONNACK and PUBACK written by aedes, CONNECT and PUBLISH by mqtt.js.
      await client.publishAsync('devices/sensor-1/t', 'x', { qos: 1 });
    } finally {
      await client.endAsync();
    }
  } finally {
    await broker.close();
  }
  expect(Object.keys(numbers.cache)).toHaveLength(0);
});

/** Open file descriptors of this process (Linux). */
const openFds = () => readdirSync('/proc/self/fd').length;

it('R14: 3,000 connects and disconnects of every kind leave no socket, session or descriptor behind', async () => {
  const logger = createLogger({ level: 'silent', gatewayId: GATEWAY_ID });
  const { activity } = openWorldStore(world, GATEWAY_ID, logger);
  const broker = createBroker({
    config: twoDeviceBrokerConfig(GATEWAY_ID, world.root, world.hashes, {
      connectRate: { perIp: 0, total: 0 },
      loginBackoff: { failures: 0, ipFailures: 0 },
      connectTimeout: 1_000,
    }),
    gatewayId: GATEWAY_ID,
    retainedStatus: true,
    logger,
    activity,
    ingest: () => Promise.resolve(),
  });
  const sockets: Closable[] = [];
  try {
    const [bound] = await broker.listen();
    const port = bound!.port;
    const login = (id: 'sensor-1' | 'sensor-2') =>
      connectPacket(id, { username: id, password: Buffer.from(PASSWORDS[id]) });
    // One cycle of a churning site: a clean session, a dropped link, a wrong password, a socket
    // that never sends CONNECT, one that dies halfway through it, a takeover of a live session.
    const cycle = async (i: number): Promise<void> => {
      const c = await connectRaw(port, sockets, { ignoreParseErrors: true });
      const id = i % 2 === 0 ? 'sensor-1' : 'sensor-2';
      // Cycles run 50 at a time with two ids, so a login often takes over a live session of the
      // same id (one more kind of churn): the link may close before the answer comes.
      const answer = (cmd: 'connack' | 'puback') =>
        Promise.race([c.next(cmd).catch(() => undefined), c.closed]);
      switch (i % 6) {
        case 0:
          c.send(login(id));
          await answer('connack');
          c.send({
            cmd: 'publish',
            topic: `devices/${id}/t`,
            payload: Buffer.from('x'),
            qos: 1,
            messageId: 1,
            retain: false,
            dup: false,
          });
          await answer('puback');
          c.send({ cmd: 'disconnect' });
          break;
        case 1:
          c.send(login(id));
          await answer('connack');
          break; // destroyed below without DISCONNECT: the will path
        case 2:
          c.send(connectPacket(id, { username: id, password: Buffer.from('wrong') }));
          await answer('connack');
          break;
        case 3:
          break; // nothing at all
        case 4:
          c.write(mqttPacket.generate(login(id)).subarray(0, 7));
          break;
        default:
          c.send(login(id));
          await answer('connack');
          c.send(login(id)); // a second CONNECT on the same link is a protocol error
          await c.closed;
      }
      c.socket.destroy();
      await c.closed;
    };
    const fdsBefore = openFds();
    const total = 3_000;
    const parallel = 50;
    for (let start = 0; start < total; start += parallel) {
      await Promise.all(Array.from({ length: parallel }, (_, k) => cycle(start + k)));
    }
    await waitUntil(() => broker.stats.connections === 0, 10_000);
    expect(broker.connectedDevices()).toEqual([]);
    // The broker's own descriptors are back where they were (the test's sockets are closed too).
    await waitUntil(() => openFds() <= fdsBefore + 2, 10_000);
    // It still serves.
    const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
      clientId: 'sensor-1',
      username: 'sensor-1',
      password: PASSWORDS['sensor-1'],
      reconnectPeriod: 0,
    });
    await client.publishAsync('devices/sensor-1/t', 'after the churn', { qos: 1 });
    await client.endAsync();
  } finally {
    for (const s of sockets) await s.close();
    await broker.close();
  }
}, 120_000);
