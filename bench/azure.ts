import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { createTestPki } from '../test/helpers/certs.js';
import { createAzureHubSim, type AzureHubSim } from '../test/sims/azure-iot-hub/azure-iot-hub-sim.js';
import { closedLoopBurst, makePayload, waitFor } from './lib/load.js';
import { connectRaw, type RawClient } from './lib/mqtt-raw.js';
import { freePort } from './lib/ports.js';
import { pin, readRss, sleep, waitForPort } from './lib/process.js';
import type { BenchSettings } from './lib/settings.js';
import { gatewayCliPath, type BenchContext } from './lib/systems.js';
import { fmt, markdownTable } from './lib/table.js';

/**
 * Device → gateway → simulated Azure IoT Hub (test/sims/azure-iot-hub) throughput, with one hub
 * link per child device (identity translation): for 10 and for 1,000 devices. Reports links
 * opened, the gateway's RSS growth per link, and QoS 1 messages per second until the last one
 * reached the simulator. The simulator runs in this process, next to the device load.
 */
export interface AzureRun {
  devices: number;
  messages: number;
  linksOpened: number;
  linkOpenSeconds: number;
  /** Gateway RSS growth per device: its local session and its hub link. */
  rssPerLinkKb: number;
  endToEnd: number;
  missing: number;
}

const PHASE = 3;

function sizes(settings: BenchSettings): { devices: number; perDevice: number }[] {
  const total = settings.quick ? 5_000 : 20_000;
  return [
    { devices: 10, perDevice: total / 10 },
    { devices: 1000, perDevice: Math.max(1, total / 1000) },
  ];
}

async function runOnce(
  ctx: BenchContext,
  settings: BenchSettings,
  sim: AzureHubSim,
  caPath: string,
  policyKey: string,
  devices: number,
  perDevice: number,
): Promise<AzureRun> {
  for (let i = 0; i < devices; i++)
    sim.addDevice(`d${i}`, { primaryKey: randomBytes(32).toString('base64') });
  const dir = await mkdtemp(join(ctx.tmpRoot, 'azure-'));
  const port = await freePort();
  const config = {
    gateway: { id: 'bench-az', dataDir: join(dir, 'data'), log: { level: 'info' } },
    broker: {
      listeners: [{ type: 'tcp', host: '127.0.0.1', port }],
      allowAnonymous: true,
      anonymousAcl: { publish: ['devices/#'], subscribe: [] },
      connectRate: { perIp: 0, total: 0 },
    },
    integrations: [
      {
        name: 'hub',
        id: randomUUID(),
        type: 'azure-iot-hub',
        settings: {
          hostName: sim.hostName,
          address: '127.0.0.1',
          port: sim.port,
          ca: caPath,
          auth: { type: 'policy', policyName: 'device', key: policyKey },
          maxLinks: devices + 10,
        },
        routes: [{ from: 'devices/#', qos: 1 }],
        queue: { inflight: 1000 },
      },
    ],
  };
  const confPath = join(dir, 'gateway.yaml');
  await writeFile(confPath, stringify(config));
  const child = ctx.group.spawn(
    'gateway-azure',
    process.execPath,
    [gatewayCliPath(ctx.root), 'run', '-c', confPath],
    {
      cwd: dir,
    },
  );
  pin(child.pid, 'system');
  const stops: (() => Promise<void>)[] = [() => child.stop(25_000)];
  try {
    await child.waitForLine(/"msg":"gateway_ready"/, 30_000);
    await waitForPort(port, 5_000);
    await sleep(500);
    const rssBefore = await readRss(child.pid);
    const connectsBefore = sim.connectionCount();
    // Client id = device id: a device connecting locally is its presence, which opens its hub
    // link (paced at connectsPerSecond, at most 16 opening at once).
    const warmStart = performance.now();
    const clients: RawClient[] = [];
    stops.push(async () => {
      await Promise.all(clients.map((c) => c.end()));
    });
    for (let i = 0; i < devices; i += 50) {
      const batch = Array.from({ length: Math.min(50, devices - i) }, (_, j) =>
        connectRaw({ port, clientId: `d${i + j}`, keepalive: 600, timeoutMs: 30_000 }),
      );
      clients.push(...(await Promise.all(batch)));
    }
    if (!(await waitFor(() => sim.connectionCount() - connectsBefore >= devices, 300_000))) {
      throw new Error(
        `azure: ${sim.connectionCount() - connectsBefore} of ${devices} links opened\n${child.tail()}`,
      );
    }
    const linkOpenSeconds = (performance.now() - warmStart) / 1000;
    const linksOpened = sim.connectionCount() - connectsBefore;
    // One message per device through its link (JIT warm-up).
    const warmTarget = sim.telemetry.length + devices;
    clients.forEach((c, i) =>
      c.publish(`devices/d${i}/telemetry`, makePayload(settings.payloadSize, 0, i, 0, 0), 1),
    );
    if (!(await waitFor(() => sim.telemetry.length >= warmTarget, 120_000))) {
      throw new Error(
        `azure: warm-up incomplete (${sim.telemetry.length} of ${warmTarget})\n${child.tail()}`,
      );
    }
    await sleep(500);
    const rssAfter = await readRss(child.pid);

    const total = devices * perDevice;
    const target = sim.telemetry.length + total;
    // Up to 100 in flight per device for 10 devices, 20 for 1,000 (20,000 at once is plenty).
    const window = Math.min(settings.window, devices > 100 ? 20 : 100);
    const burst = closedLoopBurst(clients, PHASE, perDevice, window, settings.payloadSize, 300_000);
    const start = performance.now();
    let last = start;
    await waitFor(
      () => {
        if (sim.telemetry.length >= target) {
          last = performance.now();
          return true;
        }
        return false;
      },
      300_000,
      5,
    );
    await burst;
    const arrived = Math.min(total, sim.telemetry.length - (target - total));
    return {
      devices,
      messages: total,
      linksOpened,
      linkOpenSeconds,
      rssPerLinkKb: (rssAfter - rssBefore) / 1024 / Math.max(1, linksOpened),
      endToEnd: arrived / ((last - start) / 1000),
      missing: total - arrived,
    };
  } finally {
    for (const stop of stops.reverse()) await stop().catch(() => {});
    // The simulator keeps only what the next run needs.
    sim.telemetry.length = 0;
  }
}

export async function runAzureBench(ctx: BenchContext, settings: BenchSettings): Promise<string> {
  const pki = createTestPki();
  const sim = await createAzureHubSim({
    tls: { cert: await readFile(pki.serverCert), key: await readFile(pki.serverKey), ca: pki.ca },
  });
  const policyKey = randomBytes(32).toString('base64');
  sim.addPolicy('device', policyKey, ['DeviceConnect']);
  const rows: AzureRun[] = [];
  try {
    for (const { devices, perDevice } of sizes(settings)) {
      console.error(`azure: ${devices} devices × ${perDevice} messages`);
      rows.push(await runOnce(ctx, settings, sim, pki.caCert, policyKey, devices, perDevice));
    }
  } finally {
    await sim.close();
    pki.cleanup();
  }
  return [
    '### Azure IoT Hub (simulated): device → gateway → hub',
    '',
    'One MQTT 3.1.1 + TLS link per child device, SAS tokens from a DeviceConnect policy; QoS 1, ' +
      `${settings.payloadSize}-byte payloads, up to 100 (10 devices) or 20 (1,000 devices) in flight per device; ` +
      'links open on local connect (presence) at the default 50/s; RSS per device = its local session and its hub link; ' +
      'the simulator runs in the bench process.',
    '',
    markdownTable(
      [
        'devices',
        'messages',
        'links opened',
        'links opened in (s)',
        'RSS per device (KiB)',
        'msg/s end to end',
        'missing',
      ],
      rows.map((r) => [
        String(r.devices),
        String(r.messages),
        String(r.linksOpened),
        fmt(r.linkOpenSeconds, 1),
        fmt(r.rssPerLinkKb),
        fmt(r.endToEnd),
        String(r.missing),
      ]),
    ),
  ].join('\n');
}
