import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt from 'mqtt';
import { afterAll, describe, expect, it } from 'vitest';
import { loadConfigFile } from '../../src/config/load.js';
import { hashPassword } from '../../src/gateway/broker/password-hash.js';
import { createGateway } from '../../src/gateway/gateway.js';
import type {
  InboundMessage,
  OutboundMessage,
  Provider,
  ProviderContext,
} from '../../src/providers/provider.js';
import { openStore } from '../../src/store/database.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';
import { FAKE_INTEGRATION_YAML } from '../helpers/fake-integration.js';
import { freePort } from '../helpers/ports.js';

const NOTHING_SYNCED = { recordsProcessed: 0, recordsSucceeded: 0, recordsFailed: 0 };

/** A cloud in memory: acknowledges every publish at once and can send commands down. */
function createFakeCloud() {
  const published: OutboundMessage[] = [];
  const contexts: ProviderContext[] = [];
  let command: ((message: InboundMessage) => void) | undefined;
  const factory = (context: ProviderContext): Provider => {
    contexts.push(context);
    return {
      connect: async () => {},
      publish: async (message) => {
        published.push(message);
      },
      onCommand: (handler) => {
        command = handler;
      },
      onDisconnect: () => {},
      maxInflight: 10,
      maxPayloadBytes: 1024 * 1024,
      testConnection: async () => ({ ok: true, latencyMs: 0, details: { cloud: 'fake' } }),
      import: async () => NOTHING_SYNCED,
      export: async () => NOTHING_SYNCED,
      bidirectionalSync: async () => NOTHING_SYNCED,
      close: async () => {},
    };
  };
  return { factory, published, contexts, send: (message: InboundMessage) => command?.(message) };
}

const waitFor = async (condition: () => boolean, what: string, timeoutMs = 20_000) => {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
};

describe('createGateway with injected providers and store', () => {
  const dir = mkdtempSync(join(tmpdir(), 'gw-compose-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('delivers through a fake provider, routes its commands to the device, and leaves the caller’s store open', async () => {
    const port = await freePort();
    const file = join(dir, 'gateway.yaml');
    writeFileSync(
      file,
      [
        `gateway: { id: compose-gw, dataDir: ${JSON.stringify(join(dir, 'data'))} }`,
        'broker:',
        `  listeners: [{ type: tcp, host: 127.0.0.1, port: ${port} }]`,
        `  devices: [{ id: d1, passwordHash: "${await hashPassword('pw')}" }]`,
        ...FAKE_INTEGRATION_YAML,
        'http: { enabled: false }',
      ].join('\n'),
    );
    const { config } = loadConfigFile(file);
    const logs: LogRecord[] = [];
    const logger = createCaptureLogger(logs);
    const store = openStore({ dataDir: join(dir, 'data'), logger, onCorrupt: 'refuse', lock: false });
    const cloud = createFakeCloud();
    const gateway = createGateway({
      configFile: file,
      config,
      logger,
      store,
      providers: { mqtt: cloud.factory },
    });
    await gateway.start();
    const device = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
      clientId: 'd1',
      username: 'd1',
      password: 'pw',
      reconnectPeriod: 0,
    });
    try {
      await device.publishAsync('devices/d1/telemetry', '21.5', { qos: 1 });
      await waitFor(() => cloud.published.length === 1, 'the fake cloud to receive the row');
      expect(cloud.published[0]).toMatchObject({ deviceId: 'd1', topic: 'devices/d1/telemetry' });
      expect(cloud.published[0]!.payload.toString()).toBe('21.5');
      expect(cloud.contexts.map((c) => c.gatewayId)).toEqual(['compose-gw']);
      // Acked rows are deleted in groups, so the queue empties shortly after the ack.
      await waitFor(() => {
        const up = gateway.status().integrations[0]!;
        return up.delivered === 1 && up.queue.depth === 0;
      }, 'the row to be acknowledged and deleted');
      expect(gateway.status().integrations[0]!.state).toBe('connected');

      const commands: string[] = [];
      device.on('message', (topic, payload) => commands.push(`${topic} ${payload.toString()}`));
      await device.subscribeAsync('devices/d1/commands/#', { qos: 1 });
      cloud.send({ topic: 'devices/d1/commands/reboot', payload: Buffer.from('now'), qos: 1, retain: false });
      await waitFor(() => commands.length === 1, 'the command to reach the device');
      expect(commands).toEqual(['devices/d1/commands/reboot now']);
    } finally {
      await device.endAsync(true);
      expect(await gateway.stop('test done')).toBe(0);
    }
    // stop() did not close the store it was given: its owner still reads the activity log.
    const stopped = store.db
      .prepare("SELECT COUNT(*) AS n FROM activity_log WHERE activity_type = 'gateway_stopped'")
      .get() as { n: number };
    expect(stopped.n).toBe(1);
    store.close();
  });
});
