import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt, { type MqttClient } from 'mqtt';
import { afterAll, describe, expect, it } from 'vitest';
import { hashPassword } from '../../src/gateway/broker/password-hash.js';
import { startDaemon } from '../helpers/daemon.js';
import { freePort } from '../helpers/ports.js';
import { waitFor } from '../helpers/sequenced-devices.js';

/**
 * R15: a gateway restart with a site's devices connected. Every device reconnects at once, all
 * from one address, each with its own password (a scrypt check each, the login cache being
 * gone with the old process). The default admission control (connectRate, 20/s per address
 * after a burst of 50) turns most of them away at first; every device must still get in, and
 * publish, without a crash.
 */

const DEVICES = 200;

describe('durability: reconnect storm after a restart', () => {
  const cleanup: (() => Promise<unknown> | void)[] = [];
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn();
  });

  it('lets every device back in under the default admission control', { timeout: 120_000 }, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'gw-storm-'));
    cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
    const port = await freePort();
    const ids = Array.from({ length: DEVICES }, (_, i) => `storm-${i}`);
    const passwords = ids.map(() => randomUUID());
    const hashes = await Promise.all(passwords.map((p) => hashPassword(p)));
    const configFile = join(dir, 'gateway.yaml');
    writeFileSync(
      configFile,
      [
        `gateway: { id: storm-gw, dataDir: ${JSON.stringify(join(dir, 'data'))} }`,
        'broker:',
        `  listeners: [{ type: tcp, host: 127.0.0.1, port: ${port} }]`,
        '  devices:',
        ...ids.map((id, i) => `    - { id: ${id}, passwordHash: "${hashes[i]}" }`),
        'http: { enabled: false }',
      ].join('\n'),
    );

    let daemon = startDaemon(configFile);
    cleanup.push(() => daemon.stop('SIGKILL'));
    await daemon.ready;
    // Devices that reconnect on their own, as field devices do (1 s, mqtt.js' default is 1 s too).
    const clients: MqttClient[] = [];
    for (let i = 0; i < DEVICES; i++) {
      const client = mqtt.connect(`mqtt://127.0.0.1:${port}`, {
        clientId: ids[i],
        username: ids[i],
        password: passwords[i],
        reconnectPeriod: 1_000,
        connectTimeout: 5_000,
      });
      client.on('error', () => {});
      clients.push(client);
      cleanup.push(() => void client.end(true));
      // Paced like a site coming up, so the first connect is not itself the storm.
      if (i % 20 === 19) await new Promise((r) => setTimeout(r, 1_100));
    }
    await waitFor(() => clients.every((c) => c.connected), 60_000);

    const lost = clients.map((c) => new Promise<void>((r) => c.once('close', () => r())));
    expect(await daemon.stop('SIGTERM')).toBe(0);
    await Promise.all(lost);
    daemon = startDaemon(configFile);
    await daemon.ready;

    await waitFor(() => clients.every((c) => c.connected), 90_000);
    // Logged at most once a second per address, with how many sockets the line stands for.
    const refused = daemon.lines
      .filter((l) => l.msg === 'connection_rejected')
      .reduce((n, l) => n + (typeof l.count === 'number' ? l.count : 1), 0);
    console.log(
      `storm: ${DEVICES} devices back after the restart; ${refused} connects turned away on the way`,
    );
    expect(refused).toBeGreaterThan(0); // the storm did meet the admission control
    await Promise.all(
      clients.map((c, i) => c.publishAsync(`devices/${ids[i]}/telemetry`, 'back', { qos: 1 })),
    );
    expect(daemon.proc.exitCode).toBeNull();
    await Promise.all(clients.map((c) => c.endAsync()));
    expect(await daemon.stop('SIGTERM')).toBe(0);
  });
});
