import Database from 'better-sqlite3';
import mqtt, { type MqttClient } from 'mqtt';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { hashPassword } from '../../src/gateway/broker/password-hash.js';
import { startDaemon, type DaemonHandle } from '../helpers/daemon.js';
import { freePort } from '../helpers/ports.js';
import { buildShim, powerCut, shimEnv } from '../helpers/power-loss.js';
import { expectIntactStore, waitFor } from '../helpers/sequenced-devices.js';

/**
 * The embedded broker's own state (broker.persistence: sqlite, the default) survives kill -9 of
 * the daemon: a retained desired state, the subscriptions of a clean=false session and the QoS 1
 * commands queued while its device was offline are there after the restart and reach the device
 * when it comes back; a clean=true reconnect discards the session and its queue (MQTT-3.1.2-6).
 * A subscription is on disk when its SUBACK goes out: a power cut right after it keeps it.
 */

const PASSWORD = 'pw-broker-state';

interface World {
  dir: string;
  port: number;
  configFile: string;
}

async function startWorld(cleanup: (() => unknown)[], extraDevices: readonly string[] = []): Promise<World> {
  const dir = mkdtempSync(join(tmpdir(), 'gw-broker-state-'));
  cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
  const port = await freePort();
  const hash = await hashPassword(PASSWORD);
  const configFile = join(dir, 'gateway.yaml');
  writeFileSync(
    configFile,
    [
      `gateway: { id: broker-state-gw, dataDir: ${JSON.stringify(join(dir, 'data'))}, log: { level: info } }`,
      'broker:',
      `  listeners: [{ type: tcp, host: 127.0.0.1, port: ${port} }]`,
      '  devices:',
      `    - { id: lamp, passwordHash: "${hash}" }`,
      ...extraDevices.map((id) => `    - { id: ${id}, passwordHash: "${hash}" }`),
      // The cloud side, standing in for a provider: sends commands and desired state to devices.
      `    - { id: ctl, passwordHash: "${hash}", acl: { publish: ["devices/+/commands/#", "devices/+/desired"], subscribe: [] } }`,
      'features: { retainedStatus: false }',
      'http: { enabled: false }',
    ].join('\n'),
  );
  return { dir, port, configFile };
}

interface Received {
  topic: string;
  payload: string;
  retain: boolean;
}

interface Device {
  client: MqttClient;
  sessionPresent: boolean;
  /** What it received, in order (listening from before the CONNACK: queued messages follow it at once). */
  got: Received[];
}

function connect(world: World, id: string, clean: boolean): Promise<Device> {
  const client = mqtt.connect(`mqtt://127.0.0.1:${world.port}`, {
    clientId: id,
    username: id,
    password: PASSWORD,
    clean,
    reconnectPeriod: 0,
    connectTimeout: 10_000,
    protocolVersion: 4,
  });
  const got: Received[] = [];
  client.on('message', (topic, payload, packet) =>
    got.push({ topic, payload: payload.toString(), retain: packet.retain }),
  );
  return new Promise((resolve, reject) => {
    client.once('connect', (connack) => resolve({ client, sessionPresent: connack.sessionPresent, got }));
    client.once('error', reject);
  });
}

/** Rows of the broker's tables for one client, read from the file over a connection of our own. */
function stored(world: World, clientId: string): { queued: number; subscriptions: number; retained: number } {
  const db = new Database(join(world.dir, 'data', 'gateway.db'), { readonly: true });
  try {
    const count = (sql: string, ...args: unknown[]) =>
      (db
        .prepare(sql)
        .pluck()
        .get(...args) as number) ?? 0;
    return {
      queued: count('SELECT count(*) FROM broker_outgoing WHERE client_id = ?', clientId),
      subscriptions: count('SELECT count(*) FROM broker_subscriptions WHERE client_id = ?', clientId),
      retained: count('SELECT count(*) FROM broker_retained'),
    };
  } finally {
    db.close();
  }
}

describe('durability: the broker state survives kill -9 and power cuts', () => {
  const cleanup: (() => unknown)[] = [];
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn();
  });

  it(
    'delivers queued commands and the retained desired state after a restart; clean=true clears the session',
    { timeout: 120_000 },
    async () => {
      const world = await startWorld(cleanup);
      let daemon: DaemonHandle = startDaemon(world.configFile);
      cleanup.push(() => daemon.stop('SIGKILL'));
      await daemon.ready;
      const restart = async () => {
        daemon.proc.kill('SIGKILL');
        await daemon.exited;
        expectIntactStore(join(world.dir, 'data'));
        daemon = startDaemon(world.configFile);
        await daemon.ready;
      };

      // The lamp opens a persistent session, subscribes to its commands and goes to sleep.
      const lamp1 = await connect(world, 'lamp', false);
      await lamp1.client.subscribeAsync('devices/lamp/commands/#', { qos: 1 });
      await lamp1.client.endAsync();

      // The cloud side sets a desired state and sends three commands meanwhile.
      const ctl = await connect(world, 'ctl', true);
      await ctl.client.publishAsync('devices/lamp/desired', '{"on":true}', { qos: 1, retain: true });
      for (const n of [1, 2, 3])
        await ctl.client.publishAsync('devices/lamp/commands/set', `c${n}`, { qos: 1 });
      await ctl.client.endAsync();
      // aedes acknowledges a QoS 1 publish before it queues it: wait until it is on disk.
      await waitFor(() => stored(world, 'lamp').queued === 3 && stored(world, 'lamp').retained >= 1, 30_000);

      await restart();

      // Back after the restart: the session, its queue and the retained message are there.
      const lamp2 = await connect(world, 'lamp', false);
      const got2 = lamp2.got;
      expect(lamp2.sessionPresent).toBe(true);
      await waitFor(() => got2.length >= 3, 30_000);
      expect(got2.map((m) => m.payload)).toEqual(['c1', 'c2', 'c3']);
      await lamp2.client.subscribeAsync('devices/lamp/desired', { qos: 1 });
      await waitFor(() => got2.length >= 4, 30_000);
      expect(got2[3]).toMatchObject({ topic: 'devices/lamp/desired', payload: '{"on":true}', retain: true });
      // The subscription restored from the store still routes new commands.
      const ctl2 = await connect(world, 'ctl', true);
      await ctl2.client.publishAsync('devices/lamp/commands/set', 'c4', { qos: 1 });
      await waitFor(() => got2.length >= 5, 30_000);
      expect(got2[4]!.payload).toBe('c4');
      await lamp2.client.endAsync();
      // Delivered and acknowledged: nothing is left queued.
      await waitFor(() => stored(world, 'lamp').queued === 0, 30_000);

      // Another command while the lamp sleeps, another kill -9.
      await ctl2.client.publishAsync('devices/lamp/commands/set', 'c5', { qos: 1 });
      await ctl2.client.endAsync();
      await waitFor(() => stored(world, 'lamp').queued === 1, 30_000);
      await restart();

      // A clean=true connect discards the session: no c5, no subscriptions, no queue.
      const lamp3 = await connect(world, 'lamp', true);
      const got3 = lamp3.got;
      expect(lamp3.sessionPresent).toBe(false);
      await waitFor(
        () => stored(world, 'lamp').queued === 0 && stored(world, 'lamp').subscriptions === 0,
        30_000,
      );
      // One round trip on this link: had c5 been delivered it would have come before c6.
      await lamp3.client.subscribeAsync('devices/lamp/commands/#', { qos: 1 });
      const ctl3 = await connect(world, 'ctl', true);
      await ctl3.client.publishAsync('devices/lamp/commands/set', 'c6', { qos: 1 });
      await ctl3.client.endAsync();
      await waitFor(() => got3.length >= 1, 30_000);
      expect(got3.map((m) => m.payload)).toEqual(['c6']);
      await lamp3.client.endAsync();

      // The retained desired state is not session state: it is still there.
      expect(stored(world, 'lamp').retained).toBeGreaterThanOrEqual(1);
      expect(await daemon.stop('SIGTERM')).toBe(0);
    },
  );

  it(
    'keeps a subscription it SUBACKed through a power cut right after the SUBACK',
    { timeout: 180_000 },
    async () => {
      const ids = ['pc1', 'pc2', 'pc3'];
      const world = await startWorld(cleanup, ids);
      const shim = buildShim(world.dir);
      const dataDir = join(world.dir, 'data');
      let daemon: DaemonHandle | undefined;
      cleanup.push(() => daemon?.stop('SIGKILL'));
      for (const [n, id] of ids.entries()) {
        const journal = join(world.dir, `journal-${n}`);
        daemon = startDaemon(world.configFile, shimEnv(shim, dataDir, journal));
        await daemon.ready;
        const device = await connect(world, id, false);
        await device.client.subscribeAsync(`devices/${id}/commands/#`, { qos: 1 });
        // The power goes the moment the SUBACK is in: what no sync covered is gone.
        daemon.proc.kill('SIGKILL');
        await daemon.exited;
        device.client.end(true);
        powerCut(journal);
        expectIntactStore(dataDir);
      }

      daemon = startDaemon(world.configFile);
      await daemon.ready;
      const devices = await Promise.all(ids.map((id) => connect(world, id, false)));
      expect(devices.map((d) => d.sessionPresent)).toEqual([true, true, true]);
      const ctl = await connect(world, 'ctl', true);
      for (const id of ids)
        await ctl.client.publishAsync(`devices/${id}/commands/set`, `to-${id}`, { qos: 1 });
      await ctl.client.endAsync();
      await waitFor(() => devices.every((d) => d.got.length >= 1), 30_000);
      expect(devices.map((d) => d.got.map((m) => m.payload))).toEqual(ids.map((id) => [`to-${id}`]));
      for (const d of devices) await d.client.endAsync();
      expect(await daemon.stop('SIGTERM')).toBe(0);
    },
  );
});
