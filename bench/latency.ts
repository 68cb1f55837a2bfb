import { pacedBurst, waitFor, waitForArrivals } from './lib/load.js';
import { withSetup } from './lib/setup.js';
import { orderForRun, type BenchSettings } from './lib/settings.js';
import { median, percentile, ratio } from './lib/stats.js';
import { SYSTEM_LABELS, type BenchContext, type SystemName } from './lib/systems.js';
import { fmt, fmtRatio, markdownTable, verdict } from './lib/table.js';

const PHASE = 2;

export interface LatencyRun {
  pubackP50: number;
  pubackP99: number;
  e2eP50: number;
  e2eP99: number;
  /** Sent but never acknowledged or never arrived within the drain timeout. */
  unacked: number;
  missing: number;
}

const FAILED: LatencyRun = {
  pubackP50: Number.NaN,
  pubackP99: Number.NaN,
  e2eP50: Number.NaN,
  e2eP99: Number.NaN,
  unacked: Number.NaN,
  missing: Number.NaN,
};

/** Open-loop QoS 1 at a fixed rate: PUBACK latency at the device and publish → arrival upstream. */
export async function measureLatency(
  ctx: BenchContext,
  settings: BenchSettings,
  name: SystemName,
  rate: number,
): Promise<LatencyRun> {
  return withSetup(ctx, settings, name, {}, async ({ collector, devices }) => {
    const total = Math.round(rate * settings.latencySeconds);
    collector.expect(PHASE, devices.length, Math.ceil(total / devices.length));
    const burst = await pacedBurst(devices, PHASE, { rate, total, payloadSize: settings.payloadSize });
    await waitFor(() => burst.acked.size >= total, 30_000);
    await waitForArrivals(collector, total, 3_000, 30_000);
    return {
      pubackP50: percentile(burst.pubackMs, 50),
      pubackP99: percentile(burst.pubackMs, 99),
      e2eP50: percentile(collector.e2eMs, 50),
      e2eP99: percentile(collector.e2eMs, 99),
      unacked: total - burst.acked.size,
      missing: total - collector.arrived.size,
    };
  });
}

export async function runLatencyBench(ctx: BenchContext, settings: BenchSettings): Promise<string> {
  const sections: string[] = [];
  // The durable relay (the floor of durable-before-PUBACK on this disk) runs beside the relay.
  const systems: SystemName[] =
    settings.systems.includes('relay') && !settings.systems.includes('durable')
      ? [...settings.systems, 'durable']
      : settings.systems;
  for (const rate of settings.rates) {
    const runs = new Map<SystemName, LatencyRun[]>(systems.map((s) => [s, []]));
    for (let r = 0; r < settings.runs; r++) {
      for (const name of orderForRun(systems, r)) {
        let result = FAILED;
        try {
          result = await measureLatency(ctx, settings, name, rate);
        } catch (err) {
          console.error(`latency ${name} @${rate}/s run ${r + 1} failed: ${(err as Error).message}`);
        }
        runs.get(name)!.push(result);
        console.error(
          `  latency @${rate}/s run ${r + 1}/${settings.runs} ${name}: PUBACK p50 ${fmt(result.pubackP50, 2)} p99 ${fmt(result.pubackP99, 2)} ms, e2e p50 ${fmt(result.e2eP50, 2)} p99 ${fmt(result.e2eP99, 2)} ms`,
        );
      }
    }
    const rows = systems.map((name) => {
      const rs = runs.get(name)!;
      const med = (k: keyof LatencyRun) => median(rs.map((x) => x[k]));
      const sum = (k: keyof LatencyRun) => rs.reduce((a, x) => a + (Number.isFinite(x[k]) ? x[k] : 0), 0);
      return [
        SYSTEM_LABELS[name],
        fmt(med('pubackP50'), 2),
        fmt(med('pubackP99'), 2),
        fmt(med('e2eP50'), 2),
        fmt(med('e2eP99'), 2),
        rs.map((x) => fmt(x.pubackP99, 2)).join(', '),
        `${sum('unacked')} / ${sum('missing')}`,
      ];
    });
    const lines = [
      `### Latency at ${fmt(rate)} msg/s (QoS 1, open loop over ${settings.latencySeconds} s, ${settings.devices} devices, ${settings.runs} run(s); ms, medians over runs)`,
      '',
      markdownTable(
        [
          'system',
          'PUBACK p50',
          'PUBACK p99',
          'end to end p50',
          'end to end p99',
          'PUBACK p99 per run',
          'unacked / missing (all runs)',
        ],
        rows,
      ),
    ];
    const gw = runs.get('gateway');
    if (gw) {
      const ratioRows: string[][] = [];
      for (const other of ['relay', 'durable', 'bridge'] as const) {
        const base = runs.get(other);
        if (!base) continue;
        for (const metric of ['pubackP99', 'e2eP99'] as const) {
          const perRun = gw.map((g, i) => ratio(g[metric], base[i]?.[metric] ?? Number.NaN));
          const med = median(perRun);
          // The target (issue 11, restating issue 2's): PUBACK p99 at 2,000 msg/s ≤ 1.3× the
          // durable floor, in the same run.
          const targeted = other === 'durable' && metric === 'pubackP99' && rate === 2000;
          ratioRows.push([
            `gateway / ${SYSTEM_LABELS[other]} (${metric === 'pubackP99' ? 'PUBACK p99' : 'end to end p99'})`,
            perRun.map(fmtRatio).join(', '),
            fmtRatio(med),
            targeted ? '≤ 1.3×' : '–',
            targeted ? verdict(med, (v) => v <= 1.3) : '–',
          ]);
        }
      }
      if (rate === 2000) {
        // Issue 11: no stall of the loop at this modest load, in any run.
        const worst = Math.max(...gw.map((g) => (Number.isFinite(g.pubackP99) ? g.pubackP99 : Infinity)));
        ratioRows.push([
          'gateway PUBACK p99, worst run (ms)',
          gw.map((g) => fmt(g.pubackP99, 2)).join(', '),
          fmt(worst, 2),
          '≤ 10 ms',
          verdict(worst, (v) => v <= 10),
        ]);
      }
      const floor = runs.get('durable');
      const relay = runs.get('relay');
      if (floor && relay) {
        const perRun = floor.map((f, i) => ratio(f.pubackP99, relay[i]?.pubackP99 ?? Number.NaN));
        ratioRows.push([
          `${SYSTEM_LABELS.durable} / ${SYSTEM_LABELS.relay} (PUBACK p99)`,
          perRun.map(fmtRatio).join(', '),
          fmtRatio(median(perRun)),
          '–',
          '–',
        ]);
      }
      if (ratioRows.length > 0) {
        lines.push(
          '',
          markdownTable(['ratio (lower is better)', 'per run', 'median', 'target', 'verdict'], ratioRows),
        );
      }
    }
    sections.push(lines.join('\n'));
  }
  return sections.join('\n\n');
}
