import { randomUUID } from 'node:crypto';
import { createServer } from 'node:net';
import { Writable } from 'node:stream';
import { Aedes, type Client } from 'aedes';
import { configSchema } from '../../src/config/schema.js';
import { createLogger } from '../../src/logger.js';
import { createMqttProvider } from '../../src/providers/mqtt/mqtt-provider.js';
import { describeProviderContract } from './contract.js';

/**
 * The generic MQTT provider against an in-test aedes whose hooks are the cloud's knobs: PUBACKs
 * are held in authorizePublish, CONNACKs in authenticate. A plain broker cannot throttle one
 * device or renew credentials, so those parts of the contract are not claimed.
 */
describeProviderContract('mqtt (aedes)', async () => {
  const received: string[] = [];
  let holding = false;
  const heldAcks: (() => void)[] = [];
  let stalled = false;
  const heldConnacks: (() => void)[] = [];
  const clients = new Set<Client>();
  const broker = await Aedes.createBroker({
    authenticate(_client, _user, _pass, done) {
      if (stalled) heldConnacks.push(() => done(null, true));
      else done(null, true);
    },
    authorizePublish(client, packet, done) {
      if (client) received.push(packet.payload.toString());
      if (holding && client) heldAcks.push(() => done(null));
      else done(null);
    },
  });
  broker.on('client', (client) => clients.add(client));
  broker.on('clientDisconnect', (client) => clients.delete(client));
  const server = createServer(broker.handle);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;

  const integration = configSchema.parse({
    gateway: { id: 'gw-contract' },
    integrations: [
      {
        name: `contract-${randomUUID().slice(0, 8)}`,
        id: randomUUID(),
        type: 'mqtt',
        settings: {
          url: `mqtt://127.0.0.1:${port}`,
          connectTimeout: '10s',
          outbound: [{ local: 'devices/#', remote: 'contract/{1}' }],
        },
      },
    ],
  }).integrations[0]!;
  const logger = createLogger({
    level: 'warn',
    gatewayId: 'gw-contract',
    destination: new Writable({ write: (_c, _e, cb) => cb() }),
  });
  const provider = createMqttProvider({ gatewayId: 'gw-contract', integration, logger });

  const release = (held: (() => void)[]) => {
    for (const fn of held.splice(0)) fn();
  };
  return {
    provider,
    cloud: {
      received: () => received,
      holdAcks: () => {
        holding = true;
      },
      releaseAcks: () => {
        holding = false;
        release(heldAcks);
      },
      dropLink: () => {
        for (const client of clients) client.conn.destroy();
      },
      stallConnects: () => {
        stalled = true;
      },
      releaseConnects: () => {
        stalled = false;
        release(heldConnacks);
      },
    },
    cleanup: () =>
      new Promise<void>((resolve) => {
        release(heldAcks);
        release(heldConnacks);
        broker.close(() => server.close(() => resolve()));
      }),
  };
});
