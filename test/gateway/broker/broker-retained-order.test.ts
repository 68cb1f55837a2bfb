import mqtt, { type MqttClient } from 'mqtt';
import { expect, it } from 'vitest';
import { createBroker, type Broker } from '../../../src/gateway/broker/broker.js';
import { createLogger } from '../../../src/logger.js';
import { createBrokerPersistence } from '../../../src/store/broker-persistence.js';
import {
  PASSWORDS,
  openWorldStore,
  twoDeviceBrokerConfig,
  useBrokerTestWorld,
} from '../../helpers/broker-fixture.js';
import { waitUntil } from '../../helpers/raw-mqtt.js';

const GATEWAY_ID = 'gw-test';
const world = useBrokerTestWorld('gw-broker-retained-');

/** A broker on broker.persistence: sqlite (the default), as the gateway wires it. */
async function startSqliteBroker(): Promise<{ broker: Broker; url: string }> {
  const logger = createLogger({ level: 'silent', gatewayId: GATEWAY_ID });
  const { store, activity } = openWorldStore(world, GATEWAY_ID, logger);
  const persistence = createBrokerPersistence({
    db: store.db,
    syncWal: store.syncWal,
    logger,
    limits: {
      maxQueuedMessages: 1000,
      maxQueuedBytes: 1024 * 1024,
      maxRetainedPerDevice: 100,
      sessionExpiryMs: 0,
    },
  });
  const broker = createBroker({
    persistence,
    config: twoDeviceBrokerConfig(GATEWAY_ID, world.root, world.hashes),
    gatewayId: GATEWAY_ID,
    retainedStatus: false,
    logger,
    activity,
    ingest: () => Promise.resolve(),
  });
  world.running.push(broker);
  const [bound] = await broker.listen();
  return { broker, url: `mqtt://127.0.0.1:${bound!.port}` };
}

async function device(url: string, id: keyof typeof PASSWORDS, clean = true): Promise<MqttClient> {
  const client = await mqtt.connectAsync(url, {
    clientId: id,
    username: id,
    password: PASSWORDS[id],
    clean,
    reconnectPeriod: 0,
    connectTimeout: 5000,
    protocolVersion: 4,
  });
  world.running.push({ close: () => client.endAsync(true) });
  return client;
}

function received(client: MqttClient): { topic: string; payload: string; retain: boolean }[] {
  const got: { topic: string; payload: string; retain: boolean }[] = [];
  client.on('message', (topic, payload, packet) =>
    got.push({ topic, payload: payload.toString(), retain: packet.retain }),
  );
  return got;
}

it.each([true, false])(
  'a subscribed device (clean %s) gets the retained desired state the gateway publishes, and the command right after',
  async (clean) => {
    const { broker, url } = await startSqliteBroker();
    const pump = await device(url, 'sensor-1', clean);
    const got = received(pump);
    await pump.subscribeAsync(['devices/sensor-1/desired', 'devices/sensor-1/commands/+'], { qos: 1 });
    // Not awaited one by one: the command is published while the retained store still syncs.
    await Promise.all([
      broker.publish({
        topic: 'devices/sensor-1/desired',
        payload: Buffer.from('{"rpm":900}'),
        qos: 1,
        retain: true,
      }),
      broker.publish({
        topic: 'devices/sensor-1/commands/reboot',
        payload: Buffer.from('r-7'),
        qos: 0,
        retain: false,
      }),
    ]);
    await waitUntil(() => got.length >= 2, 20_000);
    // Both arrive (MQTT orders only messages of one QoS, so the order is not asserted).
    expect(got).toHaveLength(2);
    expect(got).toEqual(
      expect.arrayContaining([
        { topic: 'devices/sensor-1/desired', payload: '{"rpm":900}', retain: false },
        { topic: 'devices/sensor-1/commands/reboot', payload: 'r-7', retain: false },
      ]),
    );
  },
);
