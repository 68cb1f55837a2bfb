import { randomUUID } from 'node:crypto';
import { mkdtempSync, renameSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt, { type MqttClient } from 'mqtt';
import { afterAll, describe, expect, it } from 'vitest';
import { hashPassword } from '../../src/gateway/broker/password-hash.js';
import { createTestPki } from '../helpers/certs.js';
import { startDaemon, type DaemonHandle } from '../helpers/daemon.js';
import { freePort } from '../helpers/ports.js';

/**
 * Live reload under traffic (SPEC §3, issue 4): a device keeps publishing while the config file
 * is edited in place, replaced by rename, broken, and signalled with SIGHUP. Nobody the edit does
 * not concern is disconnected, and every acknowledged message reaches the upstream.
 */
/** A device of these tests (password `pw`), without reconnecting. */
const connectDevice = (port: number, id: string) =>
  mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
    clientId: id,
    username: id,
    password: 'pw',
    reconnectPeriod: 0,
  });

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
    const connect = (id: string) => connectDevice(port, id);
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

  it(
    'R13: a half-written file and an emptied ACL are refused, a new listener waits for a restart, and no ACL opens',
    { timeout: 60_000 },
    async () => {
      const dir = mkdtempSync(join(tmpdir(), 'gw-reload13-'));
      const file = join(dir, 'gateway.yaml');
      const port = await freePort();
      const otherPort = await freePort();
      const hash = await hashPassword('pw');
      const render = (opts: { devices: string[]; port?: number; emptyAclFor?: string }) =>
        [
          `gateway: { id: reload13-gw, dataDir: ${JSON.stringify(join(dir, 'data'))}, log: { level: info } }`,
          'broker:',
          `  listeners: [{ type: tcp, host: 127.0.0.1, port: ${opts.port ?? port} }]`,
          '  devices:',
          ...opts.devices.flatMap((d) =>
            d === opts.emptyAclFor
              ? [`    - id: ${d}`, `      passwordHash: "${hash}"`, '      acl:', '        # to be filled in']
              : [`    - { id: ${d}, passwordHash: "${hash}" }`],
          ),
          'http: { enabled: false }',
          '',
        ].join('\n');
      writeFileSync(file, render({ devices: ['a', 'b'] }));
      const daemon = startDaemon(file);
      cleanup.push(() => daemon.stop('SIGKILL'));
      await daemon.ready;
      const connect = (id: string) => connectDevice(port, id);
      const a = await connect('a');
      cleanup.push(() => void a.end(true));
      let closedA = 0;
      a.on('close', () => closedA++);
      /** b may not publish to a's topics: its probe link is cut, without a PUBACK. */
      const aclStillClosed = async () => {
        const probe = await connect('b');
        const closed = new Promise<void>((r) => probe.once('close', () => r()));
        let acked = false;
        probe.publish('devices/a/telemetry', 'sneaky', { qos: 1 }, (err) => {
          if (!err) acked = true;
        });
        await closed;
        probe.end(true);
        expect(acked).toBe(false);
      };
      const count = (msg: string) => daemon.lines.filter((l) => l.msg === msg).length;
      const waitFor = async (msg: string, before: number) => {
        const deadline = Date.now() + 10_000;
        while (count(msg) <= before && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
        expect(count(msg)).toBeGreaterThan(before);
      };

      // 1. A writer stops halfway (inside a quoted hash) for longer than the watcher's debounce.
      const next = render({ devices: ['a', 'b', 'c'] });
      const cut = next.indexOf('$scrypt$', next.indexOf('id: c')) + 10;
      let failed = count('config_reload_failed');
      writeFileSync(file, next.slice(0, cut));
      await waitFor('config_reload_failed', failed);
      await aclStillClosed();
      const reloaded = count('config_reloaded');
      writeFileSync(file, next);
      await waitFor('config_reloaded', reloaded);
      const c = await connect('c'); // the completed edit is in force
      await c.endAsync();

      // 2. An ACL emptied down to a comment is refused, not read as "no restriction".
      failed = count('config_reload_failed');
      writeFileSync(file, render({ devices: ['a', 'b', 'c'], emptyAclFor: 'a' }));
      await waitFor('config_reload_failed', failed);
      const refusal = daemon.lines.filter((l) => l.msg === 'config_reload_failed').at(-1);
      expect(JSON.stringify(refusal)).toMatch(/broker\.devices\[0\]\.acl.*is empty/);
      await aclStillClosed();
      await a.publishAsync('devices/a/telemetry', 'own topic still fine', { qos: 1 });

      // 3. A new listener port needs a restart: reported, and the running listener keeps serving.
      const restart = count('config_restart_required');
      writeFileSync(file, render({ devices: ['a', 'b', 'c'], port: otherPort }));
      await waitFor('config_restart_required', restart);
      await a.publishAsync('devices/a/telemetry', 'same port', { qos: 1 });
      expect(closedA).toBe(0);
      expect(await daemon.stop('SIGTERM')).toBe(0);
    },
  );

  it(
    'SIGHUP re-reads the TLS files: a new CRL applies, a broken one is refused and logged',
    { timeout: 60_000 },
    async () => {
      const pki = createTestPki();
      cleanup.push(() => pki.cleanup());
      const dir = mkdtempSync(join(tmpdir(), 'gw-reload-tls-'));
      const file = join(dir, 'gateway.yaml');
      const crl = join(dir, 'devices.crl');
      pki.writeCrl(crl);
      const port = await freePort();
      writeFileSync(
        file,
        [
          `gateway: { id: reload-tls-gw, dataDir: ${JSON.stringify(join(dir, 'data'))}, log: { level: info } }`,
          'broker:',
          `  listeners: [{ type: tls, host: 127.0.0.1, port: ${port}, cert: ${pki.serverCert}, key: ${pki.serverKey}, ca: ${pki.caCert}, requireClientCert: true, crl: ${crl} }]`,
          '  devices: [{ id: meter-1 }]',
          'http: { enabled: false }',
          '',
        ].join('\n'),
      );
      const daemon = startDaemon(file);
      cleanup.push(() => daemon.stop('SIGKILL'));
      await daemon.ready;
      const meter = pki.issueClient('meter-1');
      const connect = () =>
        mqtt.connectAsync(
          `mqtts://127.0.0.1:${port}`,
          { clientId: 'meter-1', ca: pki.ca, ...meter, reconnectPeriod: 0, connectTimeout: 3000 },
          false,
        );
      (await connect()).end(true);

      pki.revoke(meter.cert);
      pki.writeCrl(crl);
      daemon.proc.kill('SIGHUP');
      await daemon.waitForLine((l) => l.msg === 'tls_files_reloaded');
      await expect(connect()).rejects.toThrow();

      writeFileSync(crl, 'garbage');
      daemon.proc.kill('SIGHUP');
      const failed = await daemon.waitForLine((l) => l.msg === 'tls_reload_failed');
      expect(String(failed.error)).toMatch(/broker\.listeners\[0\].*\.crl/);
      // The listener kept the CRL it had: the revoked certificate stays out.
      await expect(connect()).rejects.toThrow();
      expect(await daemon.stop('SIGTERM')).toBe(0);
    },
  );
});
