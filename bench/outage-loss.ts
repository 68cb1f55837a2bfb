import { pacedBurst, waitFor } from './lib/load.js';
import { startMosquitto, type MosquittoInstance } from './lib/mosquitto.js';
import { withSetup } from './lib/setup.js';
import { orderForRun, type BenchSettings } from './lib/settings.js';
import { median } from './lib/stats.js';
import { SYSTEM_LABELS, type BenchContext, type SystemName } from './lib/systems.js';
import { fmt, markdownTable, verdict } from './lib/table.js';

const PHASE = 3;
/** The upstream is down from this fraction of the burst to the next. */
const DOWN_AT = 0.25;
const UP_AT = 0.75;

export interface OutageRun {
  acked: number;
  lost: number;
  duplicates: number;
  drainSeconds: number;
}

/**
 * Devices publish a sequenced QoS 1 burst at a fixed rate; the upstream mosquitto is stopped
 * (SIGTERM, so its persistence keeps the subscriber's session) for the middle half of the burst
 * and restarted on the same port. Then we wait for the drain: until every acknowledged message
 * arrived, or nothing new arrived for `idleSeconds` (longer than Mosquitto's default bridge
 * reconnect cap of 30 s), or the drain deadline.
 */
export async function measureOutage(
  ctx: BenchContext,
  settings: BenchSettings,
  name: SystemName,
  idleSeconds: number,
): Promise<OutageRun> {
  return withSetup(ctx, settings, name, { persistentUpstream: true }, async (setup) => {
    const { collector, devices } = setup;
    let upstream: MosquittoInstance = setup.upstream;
    let restarted: MosquittoInstance | undefined;
    let transition: Promise<void> = Promise.resolve();
    const upstreamState: { now: 'up' | 'down' | 'restarted' } = { now: 'up' };
    const total = settings.outageMessages;
    collector.expect(PHASE, devices.length, Math.ceil(total / devices.length));
    try {
      const burst = await pacedBurst(devices, PHASE, {
        rate: settings.outageRate,
        total,
        payloadSize: settings.payloadSize,
        onProgress(fraction) {
          if (upstreamState.now === 'up' && fraction >= DOWN_AT) {
            upstreamState.now = 'down';
            transition = upstream.stop();
          } else if (upstreamState.now === 'down' && fraction >= UP_AT) {
            upstreamState.now = 'restarted';
            transition = transition.then(async () => {
              restarted = await startMosquitto(
                ctx.group,
                'mosquitto-upstream',
                setup.upstreamConf,
                upstream.port,
              );
              upstream = restarted;
            });
          }
        },
      });
      await transition;
      if (upstreamState.now !== 'restarted') throw new Error('the burst ended before the upstream came back');
      // Late PUBACKs (a broker that holds them during the outage) still count as acknowledged.
      await waitFor(() => burst.acked.size >= total, 30_000);
      const drainStart = performance.now();
      const hardDeadline = Date.now() + settings.outageDrainSeconds * 1000;
      let lastSize = collector.arrived.size;
      let lastChange = Date.now();
      let lost = burst.acked.missingFrom(collector.arrived);
      // Bounded by hardDeadline.
      while (lost > 0 && Date.now() < hardDeadline && Date.now() - lastChange < idleSeconds * 1000) {
        await waitFor(() => false, 250);
        if (collector.arrived.size !== lastSize) {
          lastSize = collector.arrived.size;
          lastChange = Date.now();
        }
        lost = burst.acked.missingFrom(collector.arrived);
      }
      return {
        acked: burst.acked.size,
        lost,
        duplicates: collector.duplicates,
        drainSeconds: (performance.now() - drainStart) / 1000,
      };
    } finally {
      await transition.catch(() => {});
      // The restarted upstream is not the one withSetup stops.
      await restarted?.stop();
    }
  });
}

export async function runOutageBench(ctx: BenchContext, settings: BenchSettings): Promise<string> {
  const idleSeconds = Number(process.env.BENCH_OUTAGE_IDLE_SECONDS ?? 35);
  const systems = settings.systems;
  const runs = new Map<SystemName, OutageRun[]>(systems.map((s) => [s, []]));
  for (let r = 0; r < settings.runs; r++) {
    for (const name of orderForRun(systems, r)) {
      let result: OutageRun = {
        acked: Number.NaN,
        lost: Number.NaN,
        duplicates: Number.NaN,
        drainSeconds: Number.NaN,
      };
      try {
        result = await measureOutage(ctx, settings, name, idleSeconds);
      } catch (err) {
        console.error(`outage ${name} run ${r + 1} failed: ${(err as Error).message}`);
      }
      runs.get(name)!.push(result);
      console.error(
        `  outage run ${r + 1}/${settings.runs} ${name}: ${result.acked} acked, ${result.lost} lost, ${result.duplicates} duplicates, drain ${fmt(result.drainSeconds, 1)} s`,
      );
    }
  }
  const lostPct = (x: OutageRun) => (x.acked > 0 ? (100 * x.lost) / x.acked : Number.NaN);
  const rows = systems.map((name) => {
    const rs = runs.get(name)!;
    const med = median(rs.map(lostPct));
    const isGateway = name === 'gateway';
    return [
      SYSTEM_LABELS[name],
      fmt(median(rs.map((x) => x.acked))),
      fmt(median(rs.map((x) => x.lost))),
      `${fmt(med, 1)} %`,
      rs.map((x) => `${fmt(lostPct(x), 1)} %`).join(', '),
      fmt(median(rs.map((x) => x.duplicates))),
      fmt(median(rs.map((x) => x.drainSeconds)), 1),
      isGateway ? '0 %' : '–',
      isGateway ? verdict(med, (v) => v === 0) : '–',
    ];
  });
  return [
    `### Upstream outage: ${fmt(settings.outageMessages)} QoS 1 messages at ${fmt(settings.outageRate)} msg/s from ${settings.devices} devices; upstream stopped from ${DOWN_AT * 100} % to ${UP_AT * 100} % of the burst (${settings.runs} run(s))`,
    '',
    markdownTable(
      [
        'system',
        'acknowledged',
        'lost',
        'lost % of acked (median)',
        'lost % per run',
        'duplicates',
        'drain s',
        'target',
        'verdict',
      ],
      rows,
    ),
  ].join('\n');
}
