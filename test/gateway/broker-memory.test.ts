import { createRequire } from 'node:module';
import mqtt from 'mqtt';
import { expect, it } from 'vitest';
import { createBroker } from '../../src/gateway/broker.js';
import { createLogger } from '../../src/logger.js';
import {
  PASSWORDS,
  openWorldStore,
  twoDeviceBrokerConfig,
  useBrokerTestWorld,
} from '../helpers/broker-fixture.js';

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
