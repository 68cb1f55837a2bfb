import { randomUUID } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt, { type MqttClient } from 'mqtt';
import { afterAll, describe, expect, it } from 'vitest';
import { hashPassword } from '../../src/gateway/password-hash.js';
import { startDaemon, type DaemonHandle } from '../helpers/daemon.js';
import { startMosquitto } from '../helpers/mosquitto.js';
import { freePort } from '../helpers/ports.js';
import { startTcpProxy, type TcpProxy } from '../helpers/tcp-proxy.js';

/**
 * R1: devices publish sequenced QoS 1 messages while the upstream is down; the daemon is killed
 * with SIGKILL mid-burst several times and restarted; then the upstream comes back. Every
 * message a device saw PUBACKed must reach the upstream (Mosquitto), in per-device order after
 * dedup; duplicates are counted and reported.
 */

const DEVICES = 4;
const PER_DEVICE = 2500;
const WINDOW = 32;
const KILLS = 4;

interface DeviceRun {
  id: string;
  next: number;
  acked: Set<number>;
  client: MqttClient | undefined;
}

describe('durability: kill -9 mid-burst with the upstream down', () => {
  const cleanup: (() => Promise<unknown> | void)[] = [];
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn();
  });

  it('loses no acknowledged message and keeps per-device order', { timeout: 240_000 }, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'gw-kill9-'));
    const prefix = `kill9-${randomUUID().slice(0, 8)}`;
    // A Mosquitto of the test's own with unbounded queues: the observer must not lose messages
    // to Mosquitto's default 1,000-message client queue while the backlog drains into it.
    const upstream = await startMosquitto();
    cleanup.push(() => upstream.stop());
    const proxy: TcpProxy = await startTcpProxy(upstream.port);
    cleanup.push(() => proxy.close());
    proxy.setMode('refuse'); // the upstream is down during the burst

    const password = 'pw-kill9';
    const hash = await hashPassword(password);
    const port = await freePort();
    const devices: DeviceRun[] = Array.from({ length: DEVICES }, (_, i) => ({
      id: `dev-${i}`,
      next: 0,
      acked: new Set(),
      client: undefined,
    }));
    const configFile = join(dir, 'gateway.yaml');
    writeFileSync(
      configFile,
      [
        'gateway: { id: kill9-gw, dataDir: ' + JSON.stringify(join(dir, 'data')) + ', log: { level: info } }',
        'broker:',
        `  listeners: [{ type: tcp, host: 127.0.0.1, port: ${port} }]`,
        '  devices:',
        ...devices.map((d) => `    - { id: ${d.id}, passwordHash: "${hash}" }`),
        'integrations:',
        '  - name: upstream',
        `    id: ${randomUUID()}`,
        '    type: mqtt',
        '    settings:',
        `      url: mqtt://127.0.0.1:${proxy.port}`,
        `      outbound: [{ local: "devices/#", remote: "${prefix}/{topic}" }]`,
        '      keepalive: 5s',
        '    routes: [{ from: "devices/+/telemetry", qos: 1 }]',
        '    queue: { inflight: 64 }',
        'http: { enabled: false }',
      ].join('\n'),
    );

    // Observe the upstream directly on the upstream Mosquitto.
    const received = new Map<string, number[]>();
    const observer = await mqtt.connectAsync(`mqtt://127.0.0.1:${upstream.port}`, {
      clientId: `obs-${prefix}`,
      reconnectPeriod: 1000,
    });
    cleanup.push(() => observer.endAsync(true));
    observer.on('message', (_topic, payload) => {
      const { d, seq } = JSON.parse(payload.toString()) as { d: string; seq: number };
      let list = received.get(d);
      if (!list) received.set(d, (list = []));
      list.push(seq);
    });
    await observer.subscribeAsync(`${prefix}/#`, { qos: 1 });

    let daemon: DaemonHandle = startDaemon(configFile);
    cleanup.push(() => daemon.stop('SIGKILL'));
    await daemon.ready;

    const connect = (d: DeviceRun) =>
      mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
        clientId: d.id,
        username: d.id,
        password,
        reconnectPeriod: 0,
        connectTimeout: 5000,
      });

    // Each device publishes its sequence with a bounded window; a publish counts only when PUBACKed.
    const pump = async (d: DeviceRun, until: number) => {
      const client = d.client!;
      const inflight = new Set<Promise<void>>();
      // mqtt.js keeps unacknowledged publishes for a reconnect that never comes (reconnectPeriod 0):
      // a closed link must end the pump instead of waiting on them.
      const closed = new Promise<void>((resolve) => client.once('close', () => resolve()));
      while (d.next < until && client.connected) {
        const seq = d.next++;
        const p = client
          .publishAsync(`devices/${d.id}/telemetry`, JSON.stringify({ d: d.id, seq }), { qos: 1 })
          .then(() => {
            d.acked.add(seq);
          })
          .catch(() => {})
          .finally(() => inflight.delete(p));
        inflight.add(p);
        if (inflight.size >= WINDOW) await Promise.race([...inflight, closed]);
      }
      await Promise.race([
        Promise.allSettled([...inflight]),
        closed,
        new Promise((r) => setTimeout(r, 3000)),
      ]);
    };

    const perPhase = Math.ceil(PER_DEVICE / (KILLS + 1));
    for (let phase = 0; phase <= KILLS; phase++) {
      for (const d of devices) d.client = await connect(d);
      const target = Math.min(PER_DEVICE, (phase + 1) * perPhase);
      const pumping = Promise.all(devices.map((d) => pump(d, target)));
      if (phase < KILLS) {
        // Kill mid-burst: once a fraction of this phase is acknowledged, without warning.
        const phaseStart = phase * perPhase;
        await waitFor(() => devices.every((d) => d.acked.size >= phaseStart + perPhase / 3), 60_000);
        console.log(
          `kill9: phase ${phase}, acknowledged ${devices.map((d) => d.acked.size).join('/')}, SIGKILL`,
        );
        daemon.proc.kill('SIGKILL');
        await daemon.exited;
        await pumping;
        for (const d of devices) d.client?.end(true);
        daemon = startDaemon(configFile);
        await daemon.ready;
      } else {
        await pumping;
        for (const d of devices) await d.client?.endAsync();
      }
    }

    const ackedTotal = devices.reduce((n, d) => n + d.acked.size, 0);
    expect(ackedTotal).toBeGreaterThan(DEVICES * PER_DEVICE * 0.5);

    // The upstream comes back. A restart connects at once (no backoff left from the outage);
    // then one more kill -9 in the middle of the drain, and a last restart finishes it.
    proxy.setMode('pass');
    await daemon.stop('SIGKILL');
    daemon = startDaemon(configFile);
    await daemon.ready;
    const deliveredCount = () => [...received.values()].reduce((n, l) => n + l.length, 0);
    await waitFor(() => deliveredCount() >= ackedTotal * 0.3, 60_000);
    console.log(`kill9: draining, ${deliveredCount()} delivered, SIGKILL`);
    daemon.proc.kill('SIGKILL');
    await daemon.exited;
    daemon = startDaemon(configFile);
    await daemon.ready;
    const allDelivered = () =>
      devices.every((d) => [...d.acked].every((s) => (received.get(d.id) ?? []).includes(s)));
    await waitFor(allDelivered, 120_000).catch(() => {});

    let duplicates = 0;
    for (const d of devices) {
      const got = received.get(d.id) ?? [];
      const missing = [...d.acked].filter((s) => !got.includes(s));
      expect(missing, `${d.id} acknowledged but never delivered`).toEqual([]);
      // Per-device order after dedup: first occurrences strictly increase.
      const firsts: number[] = [];
      const seen = new Set<number>();
      for (const s of got) {
        if (seen.has(s)) duplicates++;
        else {
          seen.add(s);
          firsts.push(s);
        }
      }
      expect(firsts).toEqual([...firsts].sort((a, b) => a - b));
    }
    console.log(
      `kill9: ${KILLS + 2} kills, ${ackedTotal} acknowledged, ${[...received.values()].reduce((n, l) => n + l.length, 0)} delivered, ${duplicates} duplicates (bound: window 64 + ack batch 500)`,
    );
    // Only the kill during the drain can duplicate: at most the rows in flight then (window 64)
    // plus the acknowledged rows whose grouped delete had not committed yet (≤ 500 rows / 50 ms).
    expect(duplicates).toBeLessThanOrEqual(64 + 500);
    await daemon.stop('SIGTERM');
  });
});

async function waitFor(predicate: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 50));
  }
}
