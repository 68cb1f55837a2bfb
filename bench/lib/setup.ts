import { mkdtemp } from 'node:fs/promises';
import { join } from 'node:path';
import { connectDevices, createCollector, pacedBurst, waitFor, type Collector } from './load.js';
import {
  startMosquitto,
  upstreamConfLines,
  writeMosquittoConf,
  type MosquittoInstance,
} from './mosquitto.js';
import type { RawClient } from './mqtt-raw.js';
import { freePort } from './ports.js';
import type { BenchSettings } from './settings.js';
import { startSystem, type BenchContext, type SystemName, type SystemUnderTest } from './systems.js';

export interface Setup {
  readonly system: SystemUnderTest;
  readonly upstream: MosquittoInstance;
  readonly upstreamConf: string;
  readonly collector: Collector;
  readonly devices: RawClient[];
}

export const WARMUP_PHASE = 0;
const WARMUP_RATE = 2_000;

/**
 * One measurement's world, fresh every time: an upstream mosquitto, the system under test,
 * the upstream subscriber and the devices, warmed up (JIT, bridge connection) by a closed-loop
 * burst that must arrive completely. Everything is stopped afterwards, also on failure.
 */
export async function withSetup<T>(
  ctx: BenchContext,
  settings: BenchSettings,
  name: SystemName,
  opts: { persistentUpstream?: boolean; devices?: number },
  measure: (setup: Setup) => Promise<T>,
): Promise<T> {
  const dir = await mkdtemp(join(ctx.tmpRoot, `upstream-`));
  const upstreamPort = await freePort();
  const upstreamConf = await writeMosquittoConf(
    dir,
    'upstream',
    upstreamPort,
    upstreamConfLines(dir, opts.persistentUpstream ?? false),
  );
  const stops: (() => Promise<void>)[] = [];
  try {
    const upstream = await startMosquitto(ctx.group, 'mosquitto-upstream', upstreamConf, upstreamPort);
    stops.push(() => upstream.stop());
    const collector = await createCollector(upstreamPort, opts.persistentUpstream ?? false);
    stops.push(() => collector.close());
    const system = await startSystem(ctx, name, upstreamPort);
    stops.push(() => system.stop());
    const devices = await connectDevices(
      system.port,
      opts.devices ?? settings.devices,
      `bench-${name}`,
      ctx.auth?.password,
    );
    stops.push(async () => {
      await Promise.all(devices.map((d) => d.end()));
    });

    // Paced well below every system's capacity: Mosquitto's bridge drops what overflows its queue.
    collector.expect(WARMUP_PHASE, devices.length, settings.warmupPerDevice);
    const warm = await pacedBurst(devices, WARMUP_PHASE, {
      rate: WARMUP_RATE,
      total: devices.length * settings.warmupPerDevice,
      payloadSize: settings.payloadSize,
    });
    const arrived = await waitFor(
      () => collector.arrived.size >= warm.total && warm.acked.size >= warm.total,
      30_000,
    );
    if (!arrived || warm.acked.size < warm.total) {
      throw new Error(
        `${name}: warm-up incomplete (${warm.acked.size} acked, ${collector.arrived.size} of ${warm.total} arrived upstream)\n${system.child.tail()}`,
      );
    }
    return await measure({ system, upstream, upstreamConf, collector, devices });
  } finally {
    for (const stop of stops.reverse()) {
      await stop().catch(() => {});
    }
  }
}
