import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createTestPki, type TestPki } from '../../helpers/certs.js';
import { startAwsIotSim, type AwsIotSim, type AwsIotSimOptions } from './aws-iot-sim.js';

/** A realistic ATS endpoint name: the tests connect to 127.0.0.1 and send this as SNI. */
export const SIM_ENDPOINT = 'a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com';

export interface AwsWorld {
  pki: TestPki;
  /** PEM files of the gateway's thing certificate and the CA that signed the sim's certificate. */
  files: { cert: string; key: string; ca: string };
  serverCert: { cert: Buffer; key: Buffer };
  start(options?: Partial<AwsIotSimOptions>): Promise<AwsIotSim>;
  /** Provider settings pointing at `sim`, with overrides. */
  settings(sim: AwsIotSim, overrides?: Record<string, unknown>): Record<string, unknown>;
  cleanup(): Promise<void>;
}

export function createAwsWorld(thingName = 'site-gw'): AwsWorld {
  const pki = createTestPki();
  const serverCert = pki.issueServer(SIM_ENDPOINT);
  const client = pki.issueClient(thingName);
  const files = { cert: join(pki.dir, 'thing.crt'), key: join(pki.dir, 'thing.key'), ca: pki.caCert };
  writeFileSync(files.cert, client.cert);
  writeFileSync(files.key, client.key, { mode: 0o600 });
  const sims: AwsIotSim[] = [];
  return {
    pki,
    files,
    serverCert,
    async start(options = {}) {
      const sim = await startAwsIotSim({ endpoint: SIM_ENDPOINT, ...serverCert, ca: pki.ca, ...options });
      sims.push(sim);
      return sim;
    },
    settings(sim, overrides = {}) {
      return {
        endpoint: SIM_ENDPOINT,
        address: '127.0.0.1',
        port: sim.port,
        ...files,
        clientId: thingName,
        ...overrides,
      };
    },
    async cleanup() {
      for (const s of sims.splice(0)) await s.stop();
      pki.cleanup();
    },
  };
}
