import { spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import Database from 'better-sqlite3';
import mqtt from 'mqtt';
import { describe, expect, it } from 'vitest';
import { hashPassword } from '../../src/gateway/broker/password-hash.js';
import { CLI, startDaemon } from '../helpers/daemon.js';
import { freePort } from '../helpers/ports.js';

function cli(args: string[], options: { input?: string; env?: NodeJS.ProcessEnv } = {}) {
  const r = spawnSync(process.execPath, [CLI, ...args], {
    input: options.input ?? '',
    env: { ...process.env, NOTIFY_SOCKET: '', ...options.env },
    encoding: 'utf8',
    timeout: 60_000,
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

function tempConfig(body: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'gw-cli-'));
  const file = join(dir, 'gateway.yaml');
  writeFileSync(file, body.replaceAll('DATADIR', JSON.stringify(join(dir, 'data'))));
  return file;
}

describe('iot-gateway CLI', () => {
  it('prints usage and exits 2 on an unknown command or option', () => {
    expect(cli(['frobnicate']).code).toBe(2);
    const r = cli(['activity', '--bogus']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--bogus/);
    expect(cli(['--help']).code).toBe(0);
  });

  it('check-config lists every problem as path: message (line N), exit 1', () => {
    const file = tempConfig(
      'gateway:\n  id: gw\n  dataDir: DATADIR\nbroker:\n  maxConections: 5\n  maxPacketSize: big\n',
    );
    const r = cli(['check-config', '-c', file]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(
      'broker.maxConections: unknown key "maxConections"; did you mean "maxConnections"? (line 5)',
    );
    expect(r.stderr).toMatch(/broker\.maxPacketSize: "big" is not a size.*\(line 6\)/);
    expect(r.stderr).not.toMatch(/\n\s+at /); // no stack trace
    expect(cli(['check-config', '-c', 'config/gateway.yaml']).code).toBe(0);
  });

  it('run refuses an invalid config with exit 2 and the problem', () => {
    const file = tempConfig('gateway:\n  id: "bad id!"\n');
    const r = cli(['run', '-c', file]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/gateway\.id: .*\(line 2\)/);
  });

  it('run on a port in use (Mosquitto holds 1883) says which port and key to change, exit 2, no stack', () => {
    const file = tempConfig(
      'gateway: { id: gw, dataDir: DATADIR }\nbroker:\n  listeners: [{ type: tcp, host: 127.0.0.1, port: 1883 }]\nhttp: { enabled: false }\n',
    );
    const r = cli(['run', '-c', file]);
    expect(r.code).toBe(2);
    const sentence = r.stderr
      .trim()
      .split('\n')
      .filter((l) => l.startsWith('error:'));
    expect(sentence).toHaveLength(1);
    expect(sentence[0]).toMatch(/1883/);
    expect(sentence[0]).toMatch(/broker\.listeners\[0\]\.port/);
    expect(r.stderr).not.toMatch(/\n\s+at /);
  });

  it('hash-password reads stdin and prints a scrypt hash', () => {
    const r = cli(['hash-password'], { input: 'hunter2\n' });
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toMatch(/^\$scrypt\$N=\d+,r=\d+,p=\d+\$[^$]+\$[^$]+$/);
    expect(cli(['hash-password'], { input: '' }).code).toBe(2);
  });

  it('test-connection reports outcome and latency and records activity', () => {
    const body = (url: string) =>
      `gateway: { id: gw, dataDir: DATADIR }\nintegrations:\n  - { name: up, id: ${randomUUID()}, type: mqtt, settings: { url: "${url}", connectTimeout: 3s } }\n`;
    const good = tempConfig(body('mqtt://127.0.0.1:1883'));
    const ok = cli(['test-connection', 'up', '-c', good]);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/up: OK in \d+ ms/);
    const rows = cli(['activity', '--json', '-c', good])
      .stdout.trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(rows[0]).toMatchObject({ activityType: 'test_connection', status: 'success' });

    const bad = tempConfig(body('mqtt://127.0.0.1:9'));
    const fail = cli(['test-connection', 'up', '-c', bad]);
    expect(fail.code).toBe(1);
    expect(fail.stdout).toMatch(/up: FAILED/);
    const failed = cli(['activity', '--status', 'failed', '-c', bad]);
    expect(failed.stdout).toMatch(/test_connection\s+failed/);

    const unknown = cli(['test-connection', 'nope', '-c', good]);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toMatch(/no integration named "nope".*configured: up/);
  });

  it('sync runs one sync, prints counts and writes a sync log row', () => {
    const file = tempConfig(
      `gateway: { id: gw, dataDir: DATADIR }\nintegrations:\n  - { name: up, id: ${randomUUID()}, type: mqtt, settings: { url: "mqtt://127.0.0.1:1883" } }\n`,
    );
    const r = cli(['sync', 'up', '--direction', 'import', '-c', file]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/up: import completed in \d+ ms — processed \d+, succeeded \d+, failed 0/);
    const db = new Database(join(dirname(file), 'data', 'gateway.db'), { readonly: true });
    const rows = db.prepare('SELECT sync_type, status, request_id FROM sync_log').all();
    db.close();
    expect(rows).toEqual([{ sync_type: 'import', status: 'success', request_id: expect.any(String) }]);
    const bad = cli(['sync', 'up', '--direction', 'sideways', '-c', file]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--direction must be import, export or both/);
  });

  it('status explains when no daemon answers', async () => {
    const port = await freePort();
    const file = tempConfig(`gateway: { id: gw, dataDir: DATADIR }\nhttp: { port: ${port} }\n`);
    const r = cli(['status', '-c', file]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/not answering/);
  });

  it(
    'runs the daemon: a device publishes, the message reaches Mosquitto, SIGTERM exits 0',
    { timeout: 60_000 },
    async () => {
      const prefix = `cli-${randomUUID().slice(0, 8)}`;
      const port = await freePort();
      const httpPort = await freePort();
      const hash = await hashPassword('pw');
      const file = tempConfig(
        [
          'gateway: { id: gw-cli, dataDir: DATADIR }',
          `broker: { listeners: [{ type: tcp, host: 127.0.0.1, port: ${port} }], devices: [{ id: d1, passwordHash: "${hash}" }] }`,
          `integrations: [{ name: up, id: ${randomUUID()}, type: mqtt, settings: { url: "mqtt://127.0.0.1:1883", outbound: [{ local: "#", remote: "${prefix}/{topic}" }] }, routes: [{ from: "devices/+/telemetry" }] }]`,
          `http: { host: 127.0.0.1, port: ${httpPort} }`,
        ].join('\n'),
      );
      const observer = await mqtt.connectAsync('mqtt://127.0.0.1:1883', { reconnectPeriod: 0 });
      await observer.subscribeAsync(`${prefix}/#`, { qos: 1 });
      const arrived = new Promise<string>((resolve) =>
        observer.on('message', (topic, payload) => resolve(`${topic} ${payload.toString()}`)),
      );
      const daemon = startDaemon(file);
      try {
        await daemon.ready;
        const device = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
          clientId: 'd1',
          username: 'd1',
          password: 'pw',
          reconnectPeriod: 0,
        });
        await device.publishAsync('devices/d1/telemetry', '{"t":21.5}', { qos: 1 });
        expect(await arrived).toBe(`${prefix}/devices/d1/telemetry {"t":21.5}`);
        await device.endAsync();
        const status = cli(['status', '-c', file]);
        expect(status.code, status.stderr).toBe(0);
        expect(status.stdout).toMatch(/up/);
      } finally {
        await observer.endAsync();
        expect(await daemon.stop('SIGTERM')).toBe(0);
      }
      expect(daemon.lines.map((l) => l.msg)).toContain('gateway_stopped');
    },
  );
});
