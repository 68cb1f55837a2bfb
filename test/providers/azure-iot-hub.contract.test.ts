import { randomBytes, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { afterAll } from 'vitest';
import { configSchema } from '../../src/config/schema.js';
import { createAzureIotHubProvider } from '../../src/providers/azure-iot-hub/azure-iot-hub.js';
import { createCaptureLogger } from '../helpers/capture-logger.js';
import { createTestPki, type TestPki } from '../helpers/certs.js';
import { createAzureHubSim } from '../sims/azure-iot-hub/azure-iot-hub-sim.js';
import { describeProviderContract } from './contract.js';

/**
 * The azure-iot-hub provider against the hub simulator. `dropLink` is a short hub outage (every
 * link closes, connections are refused for 300 ms or until `releaseAcks`): one device's link
 * closing is that device's failure, not the integration's, in this provider. Throttling closes a
 * device's link (429002) rather than answering a throttle, and renewal swaps one device's link
 * inside the provider without the supervisor, so `throttles`, `deviceFailures` and
 * `plannedReconnects` are covered by test/providers/azure-iot-hub/azure-iot-hub.test.ts instead.
 */
let pki: TestPki | undefined;
afterAll(() => pki?.cleanup());

describeProviderContract('azure-iot-hub (simulator)', async () => {
  pki ??= createTestPki();
  const sim = await createAzureHubSim({
    tls: { cert: readFileSync(pki.serverCert), key: readFileSync(pki.serverKey), ca: pki.ca },
  });
  const policyKey = randomBytes(32).toString('base64');
  sim.addPolicy('device', policyKey, ['DeviceConnect']);
  for (const id of ['contract-dev', 'slow-dev', 'broken-dev', 'fine-dev']) {
    sim.addDevice(id, { primaryKey: randomBytes(32).toString('base64') });
  }
  const integration = configSchema.parse({
    gateway: { id: 'gw-contract' },
    integrations: [
      {
        name: `contract-${randomUUID().slice(0, 8)}`,
        id: randomUUID(),
        type: 'azure-iot-hub',
        settings: {
          hostName: 'localhost',
          address: '127.0.0.1',
          port: sim.port,
          ca: pki.caCert,
          auth: { type: 'policy', policyName: 'device', key: policyKey },
        },
      },
    ],
  }).integrations[0]!;
  const provider = createAzureIotHubProvider({
    gatewayId: 'gw-contract',
    integration,
    logger: createCaptureLogger([], { level: 'warn' }),
  });
  let outageTimer: NodeJS.Timeout | undefined;
  const endOutage = () => {
    clearTimeout(outageTimer);
    sim.outage(false);
  };
  return {
    provider,
    cloud: {
      received: () => sim.telemetry.map((t) => t.payload.toString()),
      holdAcks: () => sim.holdAcks(true),
      releaseAcks: () => {
        sim.holdAcks(false);
        endOutage();
      },
      dropLink: () => {
        sim.outage(true);
        outageTimer = setTimeout(endOutage, 300);
      },
    },
    cleanup: async () => {
      endOutage();
      await sim.close();
    },
  };
});
