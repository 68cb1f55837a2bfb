import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import Database from 'better-sqlite3';
import { connectAsync, type MqttClient } from 'mqtt';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { checkConfigCommand } from '../../../src/commands/check-config.js';
import { syncCommand, testConnectionCommand } from '../../../src/commands/integration-ops.js';
import { loadConfigFile } from '../../../src/config/load.js';
import { hashPassword } from '../../../src/gateway/broker/password-hash.js';
import { createGateway, type Gateway } from '../../../src/gateway/gateway.js';
import { createLogger } from '../../../src/logger.js';
import type { AwsIotSim } from '../../sims/aws-iot/aws-iot-sim.js';
import { createAwsWorld, type AwsWorld } from '../../sims/aws-iot/fixture.js';

/**
 * End to end: devices on the embedded broker → gateway (durable queue, forwarder, supervisor)
 * → the AWS IoT simulator over mutual TLS, and back. Real sockets, TLS and SQLite.
 */

const DEVICES = ['pump-1', 'pump-2', 'secret'] as const;
const PASSWORD = 'device-password';

let world: AwsWorld;
let passwordHash: string;
const cleanups: (() => Promise<unknown> | void)[] = [];

beforeAll(async () => {
  world = createAwsWorld('site-gw');
  passwordHash = await hashPassword(PASSWORD);
});
afterAll(() => world.cleanup());
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

interface Site {
  sim: AwsIotSim;
  gateway: Gateway;
  dir: string;
  configFile: string;
  port: number;
  device(id: (typeof DEVICES)[number]): Promise<MqttClient>;
  deadLetters(): { device_id: string; topic: string; error_code: string; reason: string }[];
  queued(): number;
  activity(type: string): { status: string; metadata: Record<string, unknown> }[];
}

async function startSite(
  options: {
    sim?: Parameters<AwsWorld['start']>[0];
    settings?: Record<string, unknown>;
    queue?: Record<string, unknown>;
    brokerPersistence?: 'sqlite' | 'memory';
  } = {},
): Promise<Site> {
  const sim = await world.start(options.sim);
  cleanups.push(() => sim.stop());
  const dir = mkdtempSync(join(tmpdir(), 'gw-aws-e2e-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const configFile = join(dir, 'gateway.yaml');
  const config = {
    gateway: { id: 'site-gw', dataDir: join(dir, 'data') },
    broker: {
      listeners: [{ type: 'tcp', host: '127.0.0.1', port: 0 }],
      devices: DEVICES.map((id) => ({ id, passwordHash })),
      ...(options.brokerPersistence ? { persistence: options.brokerPersistence } : {}),
    },
    integrations: [
      {
        name: 'aws',
        id: randomUUID(),
        type: 'aws-iot',
        settings: world.settings(sim, options.settings),
        routes: [
          { from: 'devices/+/telemetry' },
          { from: 'devices/+/telemetry/#' },
          { from: 'devices/+/state' },
          { from: 'devices/+/commands/+/response' },
        ],
        queue: { maxAttempts: 3, ...options.queue },
      },
    ],
    http: { enabled: false },
  };
  writeFileSync(configFile, JSON.stringify(config, null, 2));
  const loaded = loadConfigFile(configFile);
  const logger = createLogger({
    level: 'warn',
    gatewayId: 'site-gw',
    destination: new Writable({ write: (_c, _e, cb) => cb() }),
  });
  const gateway = createGateway({ configFile, config: loaded.config, logger });
  await gateway.start();
  cleanups.push(() => gateway.stop('test done'));
  const port = gateway.status().broker.listeners[0]!.port;
  const db = () => {
    const handle = new Database(join(dir, 'data', 'gateway.db'), { readonly: true, fileMustExist: true });
    cleanups.push(() => {
      handle.close();
    });
    return handle;
  };
  return {
    sim,
    gateway,
    dir,
    configFile,
    port,
    async device(id) {
      const client = await connectAsync(`mqtt://127.0.0.1:${port}`, {
        clientId: id,
        username: id,
        password: PASSWORD,
        reconnectPeriod: 0,
      });
      cleanups.push(() => client.endAsync(true));
      return client;
    },
    deadLetters() {
      return db()
        .prepare('SELECT device_id, topic, error_code, reason FROM dead_letters ORDER BY id')
        .all() as ReturnType<Site['deadLetters']>;
    },
    queued() {
      return (db().prepare('SELECT count(*) AS n FROM queue_messages').get() as { n: number }).n;
    },
    activity(type) {
      const rows = db()
        .prepare('SELECT status, metadata FROM activity_log WHERE activity_type = ? ORDER BY seq')
        .all(type) as { status: string; metadata: string }[];
      return rows.map((r) => ({
        status: r.status,
        metadata: JSON.parse(r.metadata) as Record<string, unknown>,
      }));
    },
  };
}

const payloads = (sim: AwsIotSim, topic: string) =>
  sim.received.filter((r) => r.topic === topic).map((r) => r.payload.toString());

describe('aws-iot end to end', () => {
  it('device → gateway → AWS: telemetry to the template topic, state into the shadow', async () => {
    const site = await startSite();
    const pump = await site.device('pump-1');
    await pump.publishAsync('devices/pump-1/telemetry', '{"t":21.5}', { qos: 1 });
    await pump.publishAsync('devices/pump-1/telemetry/vibration', '{"v":0.2}', { qos: 1 });
    await pump.publishAsync('devices/pump-1/state', '{"rpm":1200}', { qos: 1 });
    await pump.publishAsync('devices/pump-1/state', '{"mode":"run"}', { qos: 1 });
    await site.sim.waitFor(
      () => site.sim.shadows.document('pump-1')?.version === 2,
      30_000,
      'two shadow updates',
    );
    expect(site.sim.shadows.document('pump-1')).toMatchObject({
      state: { reported: { rpm: 1200, mode: 'run' } },
    });
    expect(payloads(site.sim, 'dt/site-gw/pump-1/telemetry')).toEqual(['{"t":21.5}']);
    expect(payloads(site.sim, 'dt/site-gw/pump-1/telemetry/vibration')).toEqual(['{"v":0.2}']);
    await site.sim.waitFor(() => site.queued() === 0, 10_000, 'an empty queue');
  });

  it('AWS → gateway → device: desired state (retained) and a command, and the response back', async () => {
    const site = await startSite();
    await site.sim.waitFor(() => site.sim.clients().length === 1, 20_000, 'the gateway link');
    const pump = await site.device('pump-2');
    const got: { topic: string; payload: string; retain: boolean }[] = [];
    pump.on('message', (topic, payload, packet) =>
      got.push({ topic, payload: payload.toString(), retain: packet.retain }),
    );
    await pump.subscribeAsync(['devices/pump-2/desired', 'devices/pump-2/commands/+'], { qos: 1 });
    site.sim.updateShadow('pump-2', { state: { desired: { rpm: 900 } } });
    site.sim.publish('cmd/site-gw/pump-2/reboot', '{"requestId":"r-7"}');
    await site.sim.waitFor(() => got.length === 2, 20_000, 'desired and command at the device');
    expect(got).toContainEqual({ topic: 'devices/pump-2/desired', payload: '{"rpm":900}', retain: false });
    expect(got).toContainEqual({
      topic: 'devices/pump-2/commands/reboot',
      payload: '{"requestId":"r-7"}',
      retain: false,
    });
    // Desired state is retained at the broker: a device that connects later gets it.
    const late = await connectAsync(`mqtt://127.0.0.1:${site.port}`, {
      clientId: 'pump-2',
      username: 'pump-2',
      password: PASSWORD,
      reconnectPeriod: 0,
    });
    cleanups.push(() => late.endAsync(true));
    const retained = new Promise<{ payload: string; retain: boolean }>((resolve) =>
      late.on('message', (_t, payload, packet) =>
        resolve({ payload: payload.toString(), retain: packet.retain }),
      ),
    );
    await late.subscribeAsync('devices/pump-2/desired', { qos: 1 });
    expect(await retained).toEqual({ payload: '{"rpm":900}', retain: true });
    await late.publishAsync('devices/pump-2/commands/reboot/response', '{"requestId":"r-7","ok":true}', {
      qos: 1,
    });
    await site.sim.waitFor(
      () => payloads(site.sim, 'cmd/site-gw/pump-2/reboot/response').length === 1,
      20_000,
      'the response at AWS',
    );
    expect(payloads(site.sim, 'cmd/site-gw/pump-2/reboot/response')).toEqual([
      '{"requestId":"r-7","ok":true}',
    ]);
  });

  it('a cloud outage mid-stream loses nothing: every acknowledged message arrives after recovery', async () => {
    const site = await startSite();
    const pump = await site.device('pump-1');
    const N = 300;
    for (let i = 0; i < N; i++) {
      if (i === 100) site.sim.outage(true);
      await pump.publishAsync('devices/pump-1/telemetry', String(i), { qos: 1 });
    }
    expect(site.queued()).toBeGreaterThan(0);
    site.sim.outage(false);
    await site.sim.waitFor(
      () => new Set(payloads(site.sim, 'dt/site-gw/pump-1/telemetry')).size === N,
      45_000,
      'all 300 after the outage',
    );
    const seen = payloads(site.sim, 'dt/site-gw/pump-1/telemetry').map(Number);
    // At least once and in order: a resend may repeat a message, never skip one.
    expect(seen.filter((v, i) => i === 0 || v > seen[i - 1]!)).toEqual(
      Array.from({ length: N }, (_, i) => i),
    );
    expect(site.deadLetters()).toEqual([]);
    await site.sim.waitFor(() => site.queued() === 0, 10_000, 'an empty queue');
  }, 90_000);

  it('a policy-denied topic dead-letters only its own rows; the rest flow', async () => {
    const site = await startSite();
    site.sim.deny('dt/site-gw/secret/#');
    const secret = await site.device('secret');
    const pump = await site.device('pump-1');
    for (let i = 0; i < 5; i++) {
      await secret.publishAsync('devices/secret/telemetry', `s${i}`, { qos: 1 });
      await pump.publishAsync('devices/pump-1/telemetry', `p${i}`, { qos: 1 });
    }
    await site.sim.waitFor(() => site.queued() === 0, 30_000, 'the queue to drain');
    expect(payloads(site.sim, 'dt/site-gw/pump-1/telemetry')).toEqual(['p0', 'p1', 'p2', 'p3', 'p4']);
    const dead = site.deadLetters();
    expect(dead).toHaveLength(5);
    for (const row of dead) {
      expect(row).toMatchObject({
        device_id: 'secret',
        topic: 'devices/secret/telemetry',
        error_code: 'GW_ERR_PROVIDER_AUTH',
      });
      expect(row.reason).toMatch(
        /policy of site-gw does not allow publishing to dt\/site-gw\/secret\/telemetry/,
      );
    }
  });

  it('on MQTT 3.1.1 a denied publish drops the link (no PUBACK); only that row is dead-lettered', async () => {
    const site = await startSite({ settings: { protocolVersion: 4 }, queue: { maxAttempts: 2 } });
    site.sim.deny('dt/site-gw/secret/#');
    const secret = await site.device('secret');
    const pump = await site.device('pump-1');
    await pump.publishAsync('devices/pump-1/telemetry', 'p0', { qos: 1 });
    await secret.publishAsync('devices/secret/telemetry', 's0', { qos: 1 });
    for (let i = 1; i < 5; i++) await pump.publishAsync('devices/pump-1/telemetry', `p${i}`, { qos: 1 });
    await site.sim.waitFor(() => site.queued() === 0, 60_000, 'the queue to drain');
    expect([...new Set(payloads(site.sim, 'dt/site-gw/pump-1/telemetry'))]).toEqual([
      'p0',
      'p1',
      'p2',
      'p3',
      'p4',
    ]);
    expect(site.deadLetters()).toEqual([
      expect.objectContaining({ device_id: 'secret', topic: 'devices/secret/telemetry' }),
    ]);
    expect(
      site.sim.events.filter((e) => e.type === 'closed' && e.detail?.reason === 'policy denies publish')
        .length,
    ).toBeGreaterThanOrEqual(2);
  }, 90_000);

  it('a burst above 100/s is paced: nothing throttled, dropped or dead-lettered', async () => {
    const site = await startSite();
    const pumps = [await site.device('pump-1'), await site.device('pump-2')];
    const N = 400;
    await Promise.all(
      pumps.map(async (pump, p) => {
        const sends = [];
        for (let i = 0; i < N / 2; i++)
          sends.push(pump.publishAsync(`devices/pump-${p + 1}/telemetry`, String(i), { qos: 1 }));
        await Promise.all(sends);
      }),
    );
    await site.sim.waitFor(
      () => site.sim.received.length >= N && site.queued() === 0,
      60_000,
      'all 400 at AWS',
    );
    expect(site.sim.events.filter((e) => e.type === 'throttled')).toEqual([]);
    expect(new Set(site.sim.received.map((r) => `${r.topic} ${r.payload.toString()}`)).size).toBe(N);
    expect(site.deadLetters()).toEqual([]);
  }, 90_000);

  it('a shadow conflict is resolved: both writers end up in the reported state', async () => {
    const site = await startSite();
    const pump = await site.device('pump-1');
    await pump.publishAsync('devices/pump-1/state', '{"rpm":1}', { qos: 1 });
    await site.sim.waitFor(
      () => site.sim.shadows.document('pump-1')?.version === 1,
      20_000,
      'the first update',
    );
    site.sim.updateShadow('pump-1', { state: { reported: { firmware: '2.0' } } });
    await pump.publishAsync('devices/pump-1/state', '{"rpm":2}', { qos: 1 });
    await site.sim.waitFor(
      () => site.sim.shadows.document('pump-1')?.version === 3,
      20_000,
      'the retried update',
    );
    expect(site.sim.shadows.document('pump-1')).toMatchObject({
      state: { reported: { rpm: 2, firmware: '2.0' } },
    });
    const gets = site.sim.shadowRequests.filter((r) => r.topic.endsWith('/get'));
    expect(gets).toHaveLength(1);
    expect(site.deadLetters()).toEqual([]);
    expect(site.activity('shadow_conflict')).toEqual([
      expect.objectContaining({
        status: 'success',
        metadata: expect.objectContaining({ outcome: 'retried' }),
      }),
    ]);
  });

  it('a sync from the daemon imports the desired state of known devices and exports their reported state', async () => {
    const site = await startSite();
    await site.sim.waitFor(() => site.sim.clients().length === 1, 20_000, 'the gateway link');
    site.sim.updateShadow('pump-2', { state: { desired: { rpm: 640 } } });
    const pump = await site.device('pump-1');
    await pump.publishAsync('devices/pump-1/state', '{"rpm":5,"mode":"idle"}', { qos: 1 });
    await site.sim.waitFor(
      () => site.sim.shadows.document('pump-1')?.version === 1,
      20_000,
      'the state update',
    );
    // The cloud loses pump-1's shadow; the export puts the gateway's merged state back.
    site.sim.shadows.handle('$aws/things/pump-1/shadow/delete', Buffer.from('{}'));
    const outcome = await site.gateway.sync('aws', 'both');
    expect(outcome).toMatchObject({ ok: true, recordsFailed: 0 });
    expect(outcome.details).toMatchObject({ import: { delivered: 1 } });
    expect(site.sim.shadows.document('pump-1')).toMatchObject({
      state: { reported: { rpm: 5, mode: 'idle' } },
    });
    // Desired state reached the broker retained: pump-2 gets it when it subscribes.
    const late = await site.device('pump-2');
    const desired = new Promise<string>((resolve) => late.on('message', (_t, p) => resolve(p.toString())));
    await late.subscribeAsync('devices/pump-2/desired', { qos: 1 });
    expect(await desired).toBe('{"rpm":640}');
    const gets = site.activity('shadow_get');
    expect(gets.length).toBe(3);
    expect(gets.every((g) => typeof g.metadata.requestId === 'string')).toBe(true);
    expect(site.activity('sync_bidirectional')).toEqual([expect.objectContaining({ status: 'success' })]);
  });
});

describe('aws-iot from the command line', () => {
  function io(configPath: string) {
    const out: string[] = [];
    const err: string[] = [];
    return {
      io: { out: (l: string) => out.push(l), err: (l: string) => err.push(l), configPath, env: {} },
      out,
      err,
    };
  }

  function writeConfig(dir: string, settings: Record<string, unknown>): string {
    const file = join(dir, `gateway-${randomUUID().slice(0, 6)}.yaml`);
    writeFileSync(
      file,
      JSON.stringify({
        gateway: { id: 'site-gw', dataDir: join(dir, 'data') },
        integrations: [{ name: 'aws', id: randomUUID(), type: 'aws-iot', settings }],
      }),
    );
    return file;
  }

  it('check-config names a bad endpoint and a missing certificate setting in one sentence each', () => {
    const dir = mkdtempSync(join(tmpdir(), 'gw-aws-cli-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const bad = io(
      writeConfig(dir, {
        endpoint: 'https://abc-ats.iot.eu-west-1.amazonaws.com:8883',
        key: world.files.key,
      }),
    );
    expect(checkConfigCommand(bad.io)).toBe(1);
    const text = [...bad.out, ...bad.err].join('\n');
    expect(text).toMatch(
      /integrations\[0\]\.settings\.endpoint: must be the bare host name of the iot:Data-ATS endpoint/,
    );
    expect(text).toMatch(/integrations\[0\]\.settings\.cert: is required/);
  });

  it('test-connection and sync work from the CLI and write activity and sync rows with request ids', async () => {
    const sim = await world.start();
    cleanups.push(() => sim.stop());
    const dir = mkdtempSync(join(tmpdir(), 'gw-aws-cli-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const good = io(writeConfig(dir, world.settings(sim)));
    expect(await testConnectionCommand(good.io, 'aws')).toBe(0);
    expect(good.out.join('\n')).toMatch(/aws: OK in \d+ ms/);
    expect(await syncCommand(good.io, 'aws', 'both')).toBe(0);

    const missing = io(writeConfig(dir, world.settings(sim, { cert: join(dir, 'absent.crt') })));
    expect(await testConnectionCommand(missing.io, 'aws')).toBe(1);
    expect(missing.err).toEqual([
      expect.stringMatching(
        /^GW_ERR_PROVIDER_CONNECT: cannot read the cert file .*absent\.crt \(ENOENT\); fix settings\.cert of integration aws$/,
      ),
    ]);

    const db = new Database(join(dir, 'data', 'gateway.db'), { readonly: true });
    cleanups.push(() => {
      db.close();
    });
    const activity = db
      .prepare(
        "SELECT activity_type, status, metadata FROM activity_log WHERE activity_type = 'test_connection' ORDER BY seq",
      )
      .all() as {
      status: string;
      metadata: string;
    }[];
    expect(activity.map((a) => a.status)).toEqual(['success', 'failed']);
    expect(JSON.parse(activity[0]!.metadata)).toMatchObject({
      requestId: expect.any(String),
      shadowRoundTripMs: expect.any(Number),
    });
    const syncs = db.prepare('SELECT sync_type, status, request_id FROM sync_log').all();
    expect(syncs).toEqual([
      { sync_type: 'bidirectional', status: 'success', request_id: expect.any(String) },
    ]);
  });
});
