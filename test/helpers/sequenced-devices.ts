import { randomUUID } from 'node:crypto';
import { copyFileSync, existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import mqtt, { type MqttClient } from 'mqtt';
import { expect } from 'vitest';
import { hashPassword } from '../../src/gateway/broker/password-hash.js';
import { startMosquitto } from './mosquitto.js';
import { freePort } from './ports.js';
import { startTcpProxy, type TcpProxy } from './tcp-proxy.js';

/**
 * The durability tests' world: devices that publish sequenced QoS 1 messages through the daemon
 * with a bounded window, counting a message only when it was PUBACKed, and an observer on the
 * upstream that records what arrived, so every acknowledged message can be checked for.
 */
export interface DeviceRun {
  id: string;
  next: number;
  acked: Set<number>;
  client: MqttClient | undefined;
}

function makeDevices(count: number): DeviceRun[] {
  return Array.from({ length: count }, (_, i) => ({
    id: `dev-${i}`,
    next: 0,
    acked: new Set<number>(),
    client: undefined,
  }));
}

/** A daemon config: the devices, one mqtt integration to `upstreamPort` under `prefix`. */
function writeDurabilityConfig(options: {
  dir: string;
  gatewayId: string;
  port: number;
  devices: readonly DeviceRun[];
  passwordHash: string;
  upstreamPort: number;
  prefix: string;
  inflight: number;
}): string {
  const file = join(options.dir, 'gateway.yaml');
  writeFileSync(
    file,
    [
      `gateway: { id: ${options.gatewayId}, dataDir: ${JSON.stringify(join(options.dir, 'data'))}, log: { level: info } }`,
      'broker:',
      `  listeners: [{ type: tcp, host: 127.0.0.1, port: ${options.port} }]`,
      '  devices:',
      ...options.devices.map((d) => `    - { id: ${d.id}, passwordHash: "${options.passwordHash}" }`),
      'integrations:',
      '  - name: upstream',
      `    id: ${randomUUID()}`,
      '    type: mqtt',
      '    settings:',
      `      url: mqtt://127.0.0.1:${options.upstreamPort}`,
      `      outbound: [{ local: "devices/#", remote: "${options.prefix}/{topic}" }]`,
      '      keepalive: 5s',
      '    routes: [{ from: "devices/+/telemetry", qos: 1 }]',
      `    queue: { inflight: ${options.inflight} }`,
      'http: { enabled: false }',
    ].join('\n'),
  );
  return file;
}

/** Subscribes on the upstream itself and records, per device, the sequence numbers that arrived. */
async function observeUpstream(
  upstreamPort: number,
  prefix: string,
): Promise<{ received: Map<string, number[]>; close: () => Promise<void> }> {
  const received = new Map<string, number[]>();
  const observer = await mqtt.connectAsync(`mqtt://127.0.0.1:${upstreamPort}`, {
    clientId: `obs-${prefix}`,
    reconnectPeriod: 1000,
  });
  observer.on('message', (_topic, payload) => {
    const { d, seq } = JSON.parse(payload.toString()) as { d: string; seq: number };
    let list = received.get(d);
    if (!list) received.set(d, (list = []));
    list.push(seq);
  });
  await observer.subscribeAsync(`${prefix}/#`, { qos: 1 });
  return { received, close: () => observer.endAsync(true) };
}

export function connectDevice(port: number, d: DeviceRun, password: string): Promise<MqttClient> {
  return mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
    clientId: d.id,
    username: d.id,
    password,
    reconnectPeriod: 0,
    connectTimeout: 5000,
  });
}

/** Publishes the device's next sequence numbers up to `until`, `window` at a time, while connected. */
export async function pump(d: DeviceRun, until: number, window: number): Promise<void> {
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
    if (inflight.size >= window) await Promise.race([...inflight, closed]);
  }
  await Promise.race([Promise.allSettled([...inflight]), closed, new Promise((r) => setTimeout(r, 3000))]);
}

export const deliveredCount = (received: Map<string, number[]>): number =>
  [...received.values()].reduce((n, l) => n + l.length, 0);

export const allDelivered = (devices: readonly DeviceRun[], received: Map<string, number[]>) => () =>
  devices.every((d) => [...d.acked].every((s) => (received.get(d.id) ?? []).includes(s)));

/**
 * Asserts that every acknowledged message arrived and that each device's first arrivals are in
 * order; returns the duplicates.
 */
export function checkDelivery(devices: readonly DeviceRun[], received: Map<string, number[]>): number {
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
  return duplicates;
}

export interface DurabilityWorld {
  dir: string;
  port: number;
  password: string;
  devices: DeviceRun[];
  configFile: string;
  /** The upstream as the daemon reaches it: `refuse` (down) until the test says `pass`. */
  proxy: TcpProxy;
  /** What arrived on the upstream, per device. */
  received: Map<string, number[]>;
}

/**
 * A temp dir, a Mosquitto of the test's own behind a TCP proxy that starts refusing (the
 * upstream is down during the burst), the devices, the daemon's config and an observer on the
 * upstream. Everything started is pushed onto `cleanup`.
 */
export async function startDurabilityWorld(
  name: string,
  deviceCount: number,
  cleanup: (() => Promise<unknown> | void)[],
): Promise<DurabilityWorld> {
  const dir = mkdtempSync(join(tmpdir(), `gw-${name}-`));
  cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
  const prefix = `${name}-${randomUUID().slice(0, 8)}`;
  // Unbounded queues: the observer must not lose messages to Mosquitto's default 1,000-message
  // client queue while the backlog drains into it.
  const upstream = await startMosquitto();
  cleanup.push(() => upstream.stop());
  const proxy = await startTcpProxy(upstream.port);
  cleanup.push(() => proxy.close());
  proxy.setMode('refuse');
  const password = `pw-${name}`;
  const port = await freePort();
  const devices = makeDevices(deviceCount);
  const configFile = writeDurabilityConfig({
    dir,
    gatewayId: `${name}-gw`,
    port,
    devices,
    passwordHash: await hashPassword(password),
    upstreamPort: proxy.port,
    prefix,
    inflight: 64,
  });
  const { received, close } = await observeUpstream(upstream.port, prefix);
  cleanup.push(close);
  return { dir, port, password, devices, configFile, proxy, received };
}

/**
 * The devices publish up to `perDevice` messages each, in `interruptions + 1` phases. In every
 * phase but the last, once a third of it is acknowledged, `interrupt(phase)` stops the daemon
 * (it must have exited when the promise resolves); the devices' links end with it, and
 * `restart()` starts the next daemon before they connect again.
 */
export async function publishInPhases(
  world: Pick<DurabilityWorld, 'port' | 'password' | 'devices'>,
  options: {
    perDevice: number;
    window: number;
    interruptions: number;
    interrupt: (phase: number) => Promise<void>;
    restart: () => Promise<void>;
  },
): Promise<void> {
  const { port, password, devices } = world;
  const perPhase = Math.ceil(options.perDevice / (options.interruptions + 1));
  for (let phase = 0; phase <= options.interruptions; phase++) {
    for (const d of devices) d.client = await connectDevice(port, d, password);
    const target = Math.min(options.perDevice, (phase + 1) * perPhase);
    const pumping = Promise.all(devices.map((d) => pump(d, target, options.window)));
    if (phase === options.interruptions) {
      await pumping;
      for (const d of devices) await d.client?.endAsync();
      return;
    }
    const phaseStart = phase * perPhase;
    await waitFor(() => devices.every((d) => d.acked.size >= phaseStart + perPhase / 3), 60_000);
    await options.interrupt(phase);
    await pumping;
    for (const d of devices) d.client?.end(true);
    await options.restart();
  }
}

export async function waitFor(predicate: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * PRAGMA integrity_check (every page, every index entry) on a copy of a dead daemon's store, so
 * the daemon still recovers the WAL itself at its next start.
 */
export function expectIntactStore(dataDir: string): void {
  const copy = mkdtempSync(join(tmpdir(), 'gw-intact-'));
  try {
    for (const suffix of ['', '-wal']) {
      const from = join(dataDir, `gateway.db${suffix}`);
      if (existsSync(from)) copyFileSync(from, join(copy, `gateway.db${suffix}`));
    }
    const db = new Database(join(copy, 'gateway.db'));
    try {
      expect(db.pragma('integrity_check', { simple: true })).toBe('ok');
    } finally {
      db.close();
    }
  } finally {
    rmSync(copy, { recursive: true, force: true });
  }
}
