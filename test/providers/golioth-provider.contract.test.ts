import { randomUUID } from 'node:crypto';
import { Writable } from 'node:stream';
import { afterAll } from 'vitest';
import { configSchema } from '../../src/config/schema.js';
import { createLogger } from '../../src/logger.js';
import { createGoliothProvider } from '../../src/providers/golioth/golioth-provider.js';
import { createTestPki, type TestPki } from '../helpers/certs.js';
import { startGoliothSim, type GoliothSim } from '../sims/golioth/golioth-sim.js';
import { describeProviderContract } from './contract.js';

/**
 * The golioth provider against the Golioth simulator. The contract's rows are telemetry, which
 * Golioth takes over CoAP/DTLS-PSK as the device: the suite's devices get PSKs. Knobs: the
 * simulator's relay holds Golioth's ACKs (`holdAcks`), and a restart of its DTLS server ends
 * every session with close_notify (`dropLink`). Golioth has no link-wide throttle, and a
 * device's failure is a handshake refused, which the provider's own tests cover; those parts of
 * the contract are not claimed.
 */

const PROJECT = 'contract';
const DEVICES = ['contract-dev', 'slow-dev', 'broken-dev', 'fine-dev'];
let pki: TestPki | undefined;
let sim: GoliothSim | undefined;

async function simulator(): Promise<GoliothSim> {
  if (sim !== undefined) return sim;
  pki = createTestPki();
  const s = await startGoliothSim(pki);
  s.addProject(PROJECT, 'contract-key');
  for (const name of DEVICES) s.addDevice(PROJECT, { name, psk: { key: `${name}-psk` } });
  await s.applyCredentials();
  sim = s;
  return s;
}

afterAll(async () => {
  await sim?.close();
  pki?.cleanup();
});

describeProviderContract(
  'golioth (simulator)',
  async () => {
    const s = await simulator();
    const integration = configSchema.parse({
      gateway: { id: 'gw-contract' },
      integrations: [
        {
          name: `contract-${randomUUID().slice(0, 8)}`,
          id: randomUUID(),
          type: 'golioth',
          settings: {
            projectId: PROJECT,
            apiKey: 'contract-key',
            baseUrl: s.restUrl,
            ca: pki!.caCert,
            coapHost: '127.0.0.1',
            coapPort: s.coap.port,
            handshakeTimeout: '10s',
            devices: Object.fromEntries(DEVICES.map((d) => [d, { psk: `${d}-psk` }])),
          },
        },
      ],
    }).integrations[0]!;
    const logger = createLogger({
      level: 'warn',
      gatewayId: 'gw-contract',
      destination: new Writable({ write: (_c, _e, cb) => cb() }),
    });
    const provider = createGoliothProvider({ gatewayId: 'gw-contract', integration, logger });
    return {
      provider,
      cloud: {
        received: () => s.coap.requests.map((r) => r.payload),
        holdAcks: () => s.coap.holdReplies(true),
        releaseAcks: () => s.coap.holdReplies(false),
        dropLink: () => s.coap.restart(),
      },
    };
  },
  { timeoutMs: 60_000 },
);
