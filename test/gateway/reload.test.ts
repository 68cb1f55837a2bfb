import { randomUUID } from 'node:crypto';
import { mkdtempSync, renameSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt, { type MqttClient } from 'mqtt';
import { afterAll, describe, expect, it } from 'vitest';
import { hashPassword } from '../../src/gateway/password-hash.js';
import { startDaemon, type DaemonHandle } from '../helpers/daemon.js';
import { freePort } from '../helpers/ports.js';

/**
 * Live reload under traffic (SPEC §3, issue 4): a device keeps publishing while the config file
 * is edited in place, replaced by rename, broken, and signalled with SIGHUP. Nobody the edit does
 * not concern is disconnected, and every acknowledged message reaches the upstream.
 */
describe('live config reload under traffic', () => {
  const cleanup: (() => Promise<unknown> | void)[] = [];
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn();
  });

  it('applies valid edits, refuses broken ones, and loses nothing', { timeout: 120_000 }, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'gw-reload-'));
    const file = join(dir, 'gateway.yaml');
    const prefix = `reload-${randomUUID().slice(0, 8)}`;
    const port = await freePort();
    const httpPort = await freePort();
    const hash = await hashPassword('pw');
    const integrationId = randomUUID();
    const secondId = randomUUID();
    const render = (opts: { devices: string[]; routes: string[]; second?: string }) =>
      [
        `gateway: { id: reload-gw, dataDir: ${JSON.stringify(join(dir, 'data'))}, log: { level: info } }`,
        'broker:',
        `  listeners: [{ type: tcp, host: 127.0.0.1, port: ${port} }]`,
        '  devices:',
        ...opts.devices.map((d) => `    - { id: ${d}, passwordHash: "${hash}" }`),
        'integrations:',
        `  - name: up`,
        `    id: ${integrationId}`,
        '    type: mqtt',
        `    settings: { url: "mqtt://127.0.0.1:1883", outbound: [{ local: "#", remote: "${prefix}/{topic}" }] }`,
        `    routes: [${opts.routes.map((r) => `{ from: "${r}" }`).join(', ')}]`,
        ...(opts.second === undefined
          ? []
          : [
              `  - name: up2`,
              `    id: ${secondId}`,
              '    type: mqtt',
              `    settings: { url: "mqtt://127.0.0.1:1883", keepalive: ${opts.second}, outbound: [{ local: "#", remote: "${prefix}/second/{topic}" }] }`,
              '    routes: [{ from: "devices/+/state" }]',
            ]),
        `http: { host: 127.0.0.1, port: ${httpPort} }`,
      ].join('\n');
    writeFileSync(file, render({ devices: ['a', 'b'], routes: ['devices/+/telemetry'] }));

    const received: string[] = [];
    const observer = await mqtt.connectAsync('mqtt://127.0.0.1:1883', { reconnectPeriod: 0 });
    cleanup.push(() => observer.endAsync(true));
    observer.on('message', (topic, payload) =>
      received.push(`${topic.slice(prefix.length + 1)} ${payload.toString()}`),
    );
    await observer.subscribeAsync(`${prefix}/#`, { qos: 1 });

    const daemon: DaemonHandle = startDaemon(file);
    cleanup.push(() => daemon.stop('SIGKILL'));
    await daemon.ready;
    const connect = (id: string) =>
      mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
        clientId: id,
        username: id,
        password: 'pw',
        reconnectPeriod: 0,
      });
    const a = await connect('a');
    const b = await connect('b');
    cleanup.push(
      () => void a.end(true),
      () => void b.end(true),
    );
    let closedA = 0;
    let closedB = 0;
    a.on('close', () => closedA++);
    b.on('close', () => closedB++);

    // Device a publishes continuously through every edit.
    const acked: string[] = [];
    let running = true;
    const publisher = (async () => {
      for (let seq = 0; running && seq < 100_000; seq++) {
        await a.publishAsync('devices/a/telemetry', String(seq), { qos: 1 });
        acked.push(`devices/a/telemetry ${seq}`);
        await new Promise((r) => setTimeout(r, 5));
      }
    })();
    const reloads = () =>
      daemon.lines.filter((l) => l.msg === 'config_reloaded' || l.msg === 'config_reload_failed').length;
    const waitReload = async (before: number) => {
      const deadline = Date.now() + 15_000;
      while (reloads() <= before && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      expect(reloads()).toBeGreaterThan(before);
    };

    // 1. In-place edit: add device c and a route for state.
    let before = reloads();
    writeFileSync(
      file,
      render({ devices: ['a', 'b', 'c'], routes: ['devices/+/telemetry', 'devices/+/state'] }),
    );
    await waitReload(before);
    const c: MqttClient = await connect('c');
    cleanup.push(() => void c.end(true));
    await c.publishAsync('devices/c/state', '{"on":true}', { qos: 1 });

    // 2. Broken YAML via atomic rename: refused, the old config stays in force.
    before = reloads();
    writeFileSync(join(dir, 'tmp.yaml'), render({ devices: ['a'], routes: [] }) + '\nbroker: [oops\n');
    renameSync(join(dir, 'tmp.yaml'), file);
    await waitReload(before);
    const failed = daemon.lines.find((l) => l.msg === 'config_reload_failed');
    expect(failed).toBeDefined();
    const status = (await (await fetch(`http://127.0.0.1:${httpPort}/api/status`)).json()) as {
      config: { lastError: { message: string } | null };
    };
    expect(status.config.lastError?.message).toMatch(/YAML syntax/);
    // b and c were not removed by the broken edit: they can still publish.
    await b.publishAsync('devices/b/telemetry', 'still-here', { qos: 1 });

    // 3. A semantic error (unknown provider type) is refused too.
    before = reloads();
    writeFileSync(
      file,
      render({ devices: ['a', 'b', 'c'], routes: ['devices/+/telemetry'] }).replace(
        'type: mqtt',
        'type: kafka',
      ),
    );
    await waitReload(before);

    // 4. Revoke b with SIGHUP after a valid edit: b is disconnected, a and c stay.
    writeFileSync(file, render({ devices: ['a', 'c'], routes: ['devices/+/telemetry', 'devices/+/state'] }));
    before = reloads();
    daemon.proc.kill('SIGHUP');
    await waitReload(before);
    const deadline = Date.now() + 10_000;
    while (closedB === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    expect(closedB).toBeGreaterThan(0);

    // 5. Add an integration: it starts; the running one is not restarted.
    const current = { devices: ['a', 'c'], routes: ['devices/+/telemetry', 'devices/+/state'] };
    const lifecycle = (msg: string, name: string) =>
      daemon.lines.filter((l) => l.msg === msg && l.integration === name).length;
    before = reloads();
    writeFileSync(file, render({ ...current, second: '30s' }));
    await waitReload(before);
    expect(lifecycle('integration_started', 'up2')).toBe(1);
    // 6. Change only the new integration's settings: only it restarts.
    before = reloads();
    writeFileSync(file, render({ ...current, second: '20s' }));
    await waitReload(before);
    expect(lifecycle('integration_stopped', 'up2')).toBe(1);
    expect(lifecycle('integration_started', 'up2')).toBe(2);
    expect(lifecycle('integration_stopped', 'up')).toBe(0);
    expect(lifecycle('integration_started', 'up')).toBe(1);
    await c.publishAsync('devices/c/state', '{"on":false}', { qos: 1 });

    running = false;
    await publisher;
    expect(closedA).toBe(0);
    expect(c.connected).toBe(true);

    const expected = [
      ...acked,
      'devices/c/state {"on":true}',
      'devices/b/telemetry still-here',
      'devices/c/state {"on":false}',
      'second/devices/c/state {"on":false}',
    ];
    const until = Date.now() + 20_000;
    while (expected.some((m) => !received.includes(m)) && Date.now() < until)
      await new Promise((r) => setTimeout(r, 100));
    expect(expected.filter((m) => !received.includes(m))).toEqual([]);
    expect(acked.length).toBeGreaterThan(10);
    expect(await daemon.stop('SIGTERM')).toBe(0);
  });
});
