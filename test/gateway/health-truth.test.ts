import { randomUUID } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import mqtt from 'mqtt';
import mqttPacket from 'mqtt-packet';
import { afterAll, describe, expect, it } from 'vitest';
import { hashPassword } from '../../src/gateway/broker/password-hash.js';
import type { GatewayStatusSnapshot } from '../../src/gateway/http/status.js';
import { startDaemon } from '../helpers/daemon.js';
import { freePort } from '../helpers/ports.js';

/** An upstream that accepts the connection and answers pings, but never acknowledges a publish. */
async function startSilentBroker(): Promise<{ port: number; published: number; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const state = { published: 0 };
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    const parser = mqttPacket.parser({ protocolVersion: 4 });
    parser.on('packet', (packet) => {
      if (packet.cmd === 'connect')
        socket.write(mqttPacket.generate({ cmd: 'connack', returnCode: 0, sessionPresent: false }));
      else if (packet.cmd === 'pingreq') socket.write(mqttPacket.generate({ cmd: 'pingresp' }));
      else if (packet.cmd === 'publish') state.published++;
    });
    socket.on('data', (chunk) => parser.parse(chunk));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const address = server.address();
  return {
    port: typeof address === 'object' && address ? address.port : 0,
    get published() {
      return state.published;
    },
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

describe('health tells the truth', () => {
  const cleanup: (() => Promise<unknown> | void)[] = [];
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn();
  });

  it(
    'an upstream that accepts but never acks is degraded within the threshold; metrics match the queue table',
    { timeout: 60_000 },
    async () => {
      const upstream = await startSilentBroker();
      cleanup.push(() => upstream.close());
      const dir = mkdtempSync(join(tmpdir(), 'gw-health-'));
      const port = await freePort();
      const httpPort = await freePort();
      const hash = await hashPassword('pw');
      const file = join(dir, 'gateway.yaml');
      writeFileSync(
        file,
        [
          `gateway: { id: health-gw, dataDir: ${JSON.stringify(join(dir, 'data'))} }`,
          `broker: { listeners: [{ type: tcp, host: 127.0.0.1, port: ${port} }], devices: [{ id: d1, passwordHash: "${hash}" }] }`,
          'integrations:',
          '  - name: up',
          `    id: ${randomUUID()}`,
          '    type: mqtt',
          `    settings: { url: "mqtt://127.0.0.1:${upstream.port}", publishTimeout: 60s }`,
          '    routes: [{ from: "devices/#" }]',
          '    health: { degradedAfter: 2s }',
          `http: { host: 127.0.0.1, port: ${httpPort} }`,
        ].join('\n'),
      );
      const daemon = startDaemon(file);
      cleanup.push(() => daemon.stop('SIGKILL'));
      await daemon.ready;
      const getStatus = async () =>
        (await (await fetch(`http://127.0.0.1:${httpPort}/api/status`)).json()) as GatewayStatusSnapshot;

      // Connected and idle is healthy.
      let deadline = Date.now() + 10_000;
      while ((await getStatus()).integrations[0]!.state !== 'connected' && Date.now() < deadline)
        await new Promise((r) => setTimeout(r, 100));
      expect((await getStatus()).integrations[0]!.state).toBe('connected');

      const device = await mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
        clientId: 'd1',
        username: 'd1',
        password: 'pw',
        reconnectPeriod: 0,
      });
      cleanup.push(() => void device.end(true));
      for (let i = 0; i < 7; i++) await device.publishAsync('devices/d1/telemetry', `m${i}`, { qos: 1 });

      deadline = Date.now() + 15_000;
      let status = await getStatus();
      while (status.integrations[0]!.state !== 'degraded' && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 200));
        status = await getStatus();
      }
      expect(status.integrations[0]!.state).toBe('degraded');
      expect(upstream.published).toBeGreaterThan(0); // it was sent; the link is up; nothing was acknowledged
      expect(status.integrations[0]!.queue.depth).toBe(7);

      const db = new Database(join(dir, 'data', 'gateway.db'), { readonly: true });
      cleanup.push(() => void db.close());
      const rows = db
        .prepare('SELECT count(*) AS n, sum(length(payload)) AS bytes FROM queue_messages')
        .get() as { n: number; bytes: number };
      const metrics = await (await fetch(`http://127.0.0.1:${httpPort}/metrics`)).text();
      const value = (name: string) =>
        Number(new RegExp(`^${name}\\{[^}]*integration="up"[^}]*\\} (\\S+)$`, 'm').exec(metrics)?.[1]);
      expect(value('iot_gateway_queue_depth')).toBe(rows.n);
      expect(value('iot_gateway_queue_bytes')).toBe(rows.bytes);
      expect(value('iot_gateway_integration_up')).toBe(0);
      expect(metrics).toMatch(/iot_gateway_integration_state\{[^}]*state="degraded"[^}]*\} 1/);
      expect(await daemon.stop('SIGTERM')).toBe(0);
    },
  );
});
