import { mkdtempSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt from 'mqtt';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { createBroker } from '../../src/gateway/broker.js';
import { createLogger } from '../../src/logger.js';
import { createActivityLog, type ActivityLog } from '../../src/store/activity-log.js';
import { openStore, type Store } from '../../src/store/database.js';
import {
  PASSWORDS,
  hashDevicePasswords,
  twoDeviceBrokerConfig,
  type DeviceHashes,
} from '../helpers/broker-fixture.js';

const GATEWAY_ID = 'gw-test';
/** The module aedes and mqtt.js write packets with (one copy in node_modules, one instance). */
const numbers = createRequire(import.meta.url)('mqtt-packet/numbers.js') as { cache: Record<number, Buffer> };

let hashes: DeviceHashes;
let dataDir: string;
let store: Store;
let activity: ActivityLog;

beforeAll(async () => {
  hashes = await hashDevicePasswords();
  dataDir = mkdtempSync(join(tmpdir(), 'gw-broker-mem-'));
  const logger = createLogger({ level: 'silent', gatewayId: GATEWAY_ID });
  store = openStore({ dataDir, logger, onCorrupt: 'refuse', lock: false });
  activity = createActivityLog({ db: store.db, gatewayId: GATEWAY_ID, logger });
});

afterAll(() => {
  store.close();
  rmSync(dataDir, { recursive: true, force: true });
});

it('writes packets without building mqtt-packet’s 65,536-buffer number cache (≈ 7 MB of heap)', async () => {
  const broker = createBroker({
    config: twoDeviceBrokerConfig(GATEWAY_ID, dataDir, hashes),
    gatewayId: GATEWAY_ID,
    retainedStatus: false,
    logger: createLogger({ level: 'silent', gatewayId: GATEWAY_ID }),
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
