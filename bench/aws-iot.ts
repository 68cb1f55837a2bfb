import { randomUUID } from 'node:crypto';
import { mkdtemp, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { createAwsWorld } from '../test/sims/aws-iot/fixture.js';
import { closedLoopBurst, connectDevices, waitFor } from './lib/load.js';
import { pin, waitForPort } from './lib/process.js';
import { freePort } from './lib/ports.js';
import type { BenchSettings } from './lib/settings.js';
import { gatewayCliPath, type BenchContext } from './lib/systems.js';
import { fmt, markdownTable } from './lib/table.js';

/** AWS IoT Core takes 100 publishes/s per connection (cloud-protocols.md §1.2). */
const AWS_RATE = 100;

/**
 * Device → gateway (durable queue) → AWS IoT simulator over mutual TLS: QoS 1 telemetry from
 * `devices` devices, as fast as they can. The cloud link may not exceed 100 publishes/s; the
 * bench shows how close to that the forwarder runs, the busiest second the simulator saw, and
 * that it throttled nothing, lost nothing and dead-lettered nothing.
 */
export async function runAwsIotBench(ctx: BenchContext, settings: BenchSettings): Promise<string> {
  const total = Number(process.env.BENCH_AWS_MESSAGES ?? (settings.quick ? 600 : 3_000));
  const deviceCount = Math.min(settings.devices, 10);
  const perDevice = Math.ceil(total / deviceCount);
  const world = createAwsWorld('bench-gw');
  const sim = await world.start();
  try {
    const dir = await mkdtemp(join(ctx.tmpRoot, 'aws-iot-'));
    const port = await freePort();
    const config = {
      gateway: { id: 'bench-gw', dataDir: join(dir, 'data'), log: { level: 'info' } },
      broker: {
        listeners: [{ type: 'tcp', host: '127.0.0.1', port }],
        allowAnonymous: true,
        anonymousAcl: { publish: ['devices/#'], subscribe: [] },
        connectRate: { perIp: 0, total: 0 },
      },
      http: { enabled: false },
      integrations: [
        {
          name: 'aws',
          id: randomUUID(),
          type: 'aws-iot',
          settings: world.settings(sim),
          routes: [{ from: 'devices/+/telemetry', qos: 1 }],
          queue: { inflight: 100 },
        },
      ],
    };
    const confPath = join(dir, 'gateway.yaml');
    await writeFile(confPath, stringify(config));
    const child = ctx.group.spawn(
      'gateway-aws',
      process.execPath,
      [gatewayCliPath(ctx.root), 'run', '-c', confPath],
      {
        cwd: dir,
      },
    );
    pin(child.pid, 'system');
    try {
      await child.waitForLine(/"msg":"gateway_ready"/, 30_000);
      await waitForPort(port, 5_000);
      if (!(await waitFor(() => sim.clients().length === 1, 30_000)))
        throw new Error('the gateway never connected to the simulator');
      const devices = await connectDevices(port, deviceCount, 'aws');
      try {
        const expected = deviceCount * perDevice;
        // Well above 100/s for the devices: the queue absorbs it, the link drains at the quota.
        const timeoutMs = Math.max(60_000, (expected / AWS_RATE) * 2_000);
        const burst = await closedLoopBurst(
          devices,
          1,
          perDevice,
          settings.window,
          settings.payloadSize,
          timeoutMs,
        );
        await waitFor(() => sim.received.length >= expected, timeoutMs);
        const arrivals = sim.received.map((r) => r.at);
        const first = arrivals[0] ?? 0;
        const last = arrivals.at(-1) ?? 0;
        const unique = new Set(
          sim.received.map((r) => `${r.topic}:${r.payload.readUInt32BE(4)}:${r.payload.readUInt32BE(8)}`),
        );
        // The busiest second: the most arrivals in any window of 1000 ms.
        let busiest = 0;
        for (let i = 0, j = 0; i < arrivals.length; i++) {
          while (arrivals[i]! - arrivals[j]! >= 1000) j++;
          busiest = Math.max(busiest, i - j + 1);
        }
        const throttled = sim.events.filter((e) => e.type === 'throttled').length;
        const deliveredRate =
          arrivals.length > 1 ? (arrivals.length - 1) / ((last - first) / 1000) : Number.NaN;
        const fanIn =
          burst.lastAck > burst.start
            ? burst.acked.size / ((burst.lastAck - burst.start) / 1000)
            : Number.NaN;
        const rows = [
          ['messages (QoS 1, ' + String(settings.payloadSize) + ' B)', fmt(expected)],
          ['device fan-in to the durable queue, msg/s', fmt(fanIn)],
          ['delivered to AWS, msg/s (first to last arrival)', fmt(deliveredRate)],
          ['of the 100/s quota', `${((deliveredRate / AWS_RATE) * 100).toFixed(1)} %`],
          ['busiest 1 s of arrivals at the simulator (its event loop stalls bunch them)', fmt(busiest)],
          ['throttled by AWS (PUBACK 0x97)', fmt(throttled)],
          ['missing', fmt(expected - unique.size)],
          ['duplicates', fmt(sim.received.length - unique.size)],
        ];
        return [
          '### AWS IoT Core (simulator): device → gateway → cloud',
          '',
          `${deviceCount} devices, closed loop (window ${settings.window}); one mTLS connection limited to ${AWS_RATE} publishes/s.`,
          '',
          markdownTable(['measure', 'value'], rows),
        ].join('\n');
      } finally {
        for (const d of devices) d.destroy();
      }
    } finally {
      await child.stop(25_000);
    }
  } finally {
    await world.cleanup();
  }
}
