import { randomUUID } from 'node:crypto';
import { Writable } from 'node:stream';
import { afterAll } from 'vitest';
import { configSchema } from '../../../src/config/schema.js';
import { createLogger } from '../../../src/logger.js';
import { createAwsIotProvider } from '../../../src/providers/aws-iot/aws-iot.js';
import { createAwsWorld } from '../../sims/aws-iot/fixture.js';
import { describeProviderContract } from '../contract.js';

/**
 * The aws-iot provider against the AWS IoT simulator over mutual TLS. AWS throttles per
 * connection, never per child device, and has no credentials that expire on an MQTT/X.509 link,
 * so the per-device throttle, device-failure and planned-reconnect parts are not claimed.
 */
const world = createAwsWorld('contract-gw');
afterAll(() => world.cleanup());

describeProviderContract('aws-iot (simulator)', async () => {
  const sim = await world.start();
  const integration = configSchema.parse({
    gateway: { id: 'contract-gw' },
    integrations: [{ name: 'aws', id: randomUUID(), type: 'aws-iot', settings: world.settings(sim) }],
  }).integrations[0]!;
  const logger = createLogger({
    level: 'warn',
    gatewayId: 'contract-gw',
    destination: new Writable({ write: (_c, _e, cb) => cb() }),
  });
  const provider = createAwsIotProvider({ gatewayId: 'contract-gw', integration, logger });
  return {
    provider,
    cloud: {
      received: () => sim.received.map((m) => m.payload.toString()),
      holdAcks: () => sim.holdAcks(),
      releaseAcks: () => sim.releaseAcks(),
      dropLink: () => sim.dropConnections(),
      stallConnects: () => sim.stallConnects(),
      releaseConnects: () => sim.releaseConnects(),
    },
    cleanup: () => sim.stop(),
  };
});
