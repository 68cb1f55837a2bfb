import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import mqtt, { type MqttClient } from 'mqtt';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfigFile } from '../../../src/config/load.js';
import { hashPassword } from '../../../src/gateway/broker/password-hash.js';
import { createGateway, type Gateway } from '../../../src/gateway/gateway.js';
import { createCaptureLogger, type LogRecord } from '../../helpers/capture-logger.js';
import { createTestPki, type TestPki } from '../../helpers/certs.js';
import { freePort } from '../../helpers/ports.js';
import { startGoliothSim, type GoliothSim } from '../../sims/golioth/golioth-sim.js';

// End to end: a device on the gateway's broker → the gateway (real aedes, SQLite queue,
// forwarder) → the golioth provider → the Golioth simulator (HTTPS REST, CoAP over DTLS-PSK
// through coap-server-openssl), and back for desired state. Secrets come in through the config's
// secret syntax (`${ENV}` and `{ file }`).

const PROJECT = 'orchard';
let pki: TestPki;
let sim: GoliothSim;
let gateway: Gateway;
let dir: string;
let brokerPort: number;
let integrationId: string;
const logs: LogRecord[] = [];
const clients: MqttClient[] = [];

async function waitFor(check: () => boolean, ms = 60_000, what = 'condition') {
  const until = Date.now() + ms;
  while (!check()) {
    if (Date.now() > until) throw new Error(`${what} not met in time`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function device(id: string): Promise<MqttClient> {
  const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${brokerPort}`, {
    clientId: id,
    username: id,
    password: `${id}-password`,
    reconnectPeriod: 0,
  });
  clients.push(client);
  return client;
}

const streamOf = (name: string) =>
  sim
    .stream(PROJECT)
    .filter((r) => r.deviceId === sim.device(PROJECT, name).id)
    .map((r) => r.data);

beforeAll(async () => {
  pki = createTestPki();
  sim = await startGoliothSim(pki);
  sim.addProject(PROJECT, 'orchard-api-key');
  sim.addDevice(PROJECT, { name: 'pump-a', psk: { key: 'pump-a-psk' } });
  sim.addDevice(PROJECT, { name: 'pump-b', psk: { key: 'pump-b-psk' } });
  await sim.applyCredentials();

  dir = mkdtempSync(join(tmpdir(), 'gw-golioth-'));
  brokerPort = await freePort();
  integrationId = randomUUID();
  const pskFile = join(dir, 'pump-a.psk');
  writeFileSync(pskFile, 'pump-a-psk', { mode: 0o600 });
  const config = {
    gateway: { id: 'gw-golioth', dataDir: join(dir, 'data') },
    broker: {
      listeners: [{ type: 'tcp', host: '127.0.0.1', port: brokerPort }],
      devices: await Promise.all(
        ['pump-a', 'pump-b'].map(async (id) => ({ id, passwordHash: await hashPassword(`${id}-password`) })),
      ),
    },
    http: { enabled: false },
    integrations: [
      {
        name: 'golioth',
        id: integrationId,
        type: 'golioth',
        settings: {
          projectId: PROJECT,
          apiKey: '${GOLIOTH_API_KEY}',
          baseUrl: sim.restUrl,
          ca: pki.caCert,
          coapHost: '127.0.0.1',
          coapPort: sim.coap.port,
          coapAckTimeout: '1s',
          coapMaxRetransmit: 2,
          handshakeTimeout: '10s',
          requestTimeout: '3s',
          devices: { 'pump-a': { psk: { file: pskFile } }, 'pump-b': { psk: '${PUMP_B_PSK}' } },
        },
        routes: [
          { from: 'devices/+/telemetry' },
          { from: 'devices/+/telemetry/#' },
          { from: 'devices/+/state' },
        ],
        queue: { maxAttempts: 1000 },
      },
    ],
  };
  const file = join(dir, 'gateway.yaml');
  writeFileSync(file, JSON.stringify(config, null, 2));
  const loaded = loadConfigFile(file, { GOLIOTH_API_KEY: 'orchard-api-key', PUMP_B_PSK: 'pump-b-psk' });
  gateway = createGateway({
    configFile: file,
    config: loaded.config,
    logger: createCaptureLogger(logs, { level: 'info' }),
  });
  await gateway.start();
}, 120_000);

afterAll(async () => {
  for (const c of clients) await c.endAsync().catch(() => {});
  await gateway?.stop('test done');
  await sim?.close();
  pki?.cleanup();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('golioth end to end through the gateway', () => {
  it('test-connection succeeds and is recorded as activity', async () => {
    const result = await gateway.testConnection('golioth');
    expect(result.ok).toBe(true);
    const db = new Database(join(dir, 'data', 'gateway.db'), { readonly: true });
    const rows = db
      .prepare(
        "SELECT status FROM activity_log WHERE integration_id = ? AND activity_type = 'test_connection'",
      )
      .all(integrationId);
    db.close();
    expect(rows).toEqual([{ status: 'success' }]);
  });

  it('telemetry of two devices reaches LightDB Stream in order, each under its own identity', async () => {
    const a = await device('pump-a');
    const b = await device('pump-b');
    for (let n = 1; n <= 5; n++) {
      await a.publishAsync('devices/pump-a/telemetry', JSON.stringify({ n }), { qos: 1 });
      await b.publishAsync('devices/pump-b/telemetry/flow', JSON.stringify({ lpm: n * 10 }), { qos: 1 });
    }
    await waitFor(
      () => streamOf('pump-a').length === 5 && streamOf('pump-b').length === 5,
      60_000,
      'stream rows',
    );
    expect(streamOf('pump-a')).toEqual([1, 2, 3, 4, 5].map((n) => ({ telemetry: { n } })));
    expect(streamOf('pump-b')).toEqual(
      [1, 2, 3, 4, 5].map((n) => ({ telemetry: { flow: { lpm: n * 10 } } })),
    );
    const identities = new Set(sim.coap.requests.map((r) => r.identity));
    expect(identities).toEqual(new Set(['pump-a@orchard', 'pump-b@orchard']));
  });

  it('device state lands in LightDB State at the reported path', async () => {
    const pump = clients.find((c) => c.options.clientId === 'pump-a')!;
    await pump.publishAsync('devices/pump-a/state', JSON.stringify({ mode: 'eco', rpm: 1200 }), { qos: 1 });
    await waitFor(
      () => JSON.stringify(sim.device(PROJECT, 'pump-a').state.reported) === '{"mode":"eco","rpm":1200}',
    );
  });

  it('desired state and settings set in Golioth arrive retained on devices/{id}/desired after a sync, with a sync row', async () => {
    sim.setState(PROJECT, 'pump-b', 'desired', { rpm: 900 });
    sim.addSetting(PROJECT, { key: 'FLOW_LIMIT', dataType: 'float', value: 12.5 });
    sim.addSetting(PROJECT, { key: 'FLOW_LIMIT', dataType: 'float', value: 9.5, deviceName: 'pump-b' });
    const outcome = await gateway.sync('golioth', 'import');
    expect(outcome).toMatchObject({ ok: true, recordsProcessed: 2, recordsSucceeded: 2, recordsFailed: 0 });

    // The device subscribes after the sync and gets the retained desired state.
    const b2 = clients.find((c) => c.options.clientId === 'pump-b')!;
    const got = new Promise<{ payload: string; retain: boolean }>((resolve) => {
      b2.on('message', (_t, payload, packet) =>
        resolve({ payload: payload.toString(), retain: packet.retain }),
      );
    });
    await b2.subscribeAsync('devices/pump-b/desired', { qos: 1 });
    const desired = await got;
    expect(desired.retain).toBe(true);
    expect(JSON.parse(desired.payload)).toEqual({ state: { rpm: 900 }, settings: { FLOW_LIMIT: 9.5 } });

    const db = new Database(join(dir, 'data', 'gateway.db'), { readonly: true });
    const sync = db
      .prepare('SELECT sync_type, status, records_succeeded FROM sync_log WHERE integration_id = ?')
      .all(integrationId);
    // Each REST request of the sync is an activity row of its own, with its request id.
    const requests = db
      .prepare(
        "SELECT activity_type, status, metadata FROM activity_log WHERE integration_id = ? AND activity_type LIKE 'golioth_%'",
      )
      .all(integrationId) as { activity_type: string; status: string; metadata: string }[];
    db.close();
    expect(sync).toEqual([{ sync_type: 'import', status: 'success', records_succeeded: 2 }]);
    const types = requests.map((r) => r.activity_type);
    expect(types.filter((t) => t === 'golioth_list_devices').length).toBeGreaterThanOrEqual(1);
    expect(types.filter((t) => t === 'golioth_device_settings').length).toBe(2);
    expect(
      requests.every((r) => typeof (JSON.parse(r.metadata) as { requestId?: string }).requestId === 'string'),
    ).toBe(true);
  });

  it('loses nothing while the API and the CoAP path are down, and delivers once they are back', async () => {
    const pump = clients.find((c) => c.options.clientId === 'pump-a')!;
    const before = streamOf('pump-a').length;
    sim.rest.faults.outage = 'refuse';
    sim.coap.setOutage(true);
    // Acknowledged by the gateway while the cloud is unreachable.
    for (let n = 6; n <= 8; n++) {
      await pump.publishAsync('devices/pump-a/telemetry', JSON.stringify({ n }), { qos: 1 });
    }
    await pump.publishAsync('devices/pump-a/state', JSON.stringify({ mode: 'boost' }), { qos: 1 });
    // Let the gateway try and fail for a while.
    const datagrams = sim.coap.stats.datagramsIn;
    await waitFor(() => sim.coap.stats.datagramsIn > datagrams + 2, 30_000, 'attempts during the outage');
    await new Promise((r) => setTimeout(r, 1500));
    expect(streamOf('pump-a').length).toBe(before);
    sim.rest.faults.outage = false;
    sim.coap.setOutage(false);
    const after = () =>
      streamOf('pump-a')
        .slice(before)
        .map((d) => (d as { telemetry: { n: number } }).telemetry.n);
    await waitFor(() => new Set(after()).size === 3, 90_000, 'the backlog');
    // At least once, in order: a copy whose ACK was lost may come twice, never out of order.
    expect(after().filter((n, i, all) => n !== all[i - 1])).toEqual([6, 7, 8]);
    await waitFor(
      () => (sim.device(PROJECT, 'pump-a').state.reported as { mode?: string }).mode === 'boost',
      60_000,
    );
  }, 180_000);

  it('honours a 429 Retry-After from the API', async () => {
    const pump = clients.find((c) => c.options.clientId === 'pump-a')!;
    sim.rest.faults.throttle = { remaining: 1, retryAfterSeconds: 2 };
    const before = sim.rest.requests.length;
    await pump.publishAsync('devices/pump-a/state', JSON.stringify({ mode: 'quiet' }), { qos: 1 });
    await waitFor(() => (sim.device(PROJECT, 'pump-a').state.reported as { mode?: string }).mode === 'quiet');
    const calls = sim.rest.requests.slice(before).filter((c) => c.path.includes('/data/'));
    const throttledCall = sim.rest.requests.slice(before).find((c) => c.status === 429)!;
    expect(throttledCall).toBeDefined();
    expect(calls.at(-1)!.status).toBe(200);
    expect(calls.at(-1)!.at - throttledCall.at).toBeGreaterThanOrEqual(1990);
  }, 60_000);
});
