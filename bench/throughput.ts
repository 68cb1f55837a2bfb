import { readFile } from 'node:fs/promises';
import { closedLoopBurst, waitForArrivals } from './lib/load.js';
import { withSetup } from './lib/setup.js';
import { orderForRun, type BenchSettings } from './lib/settings.js';
import { median, ratio } from './lib/stats.js';
import { readPeakRss, withPinning } from './lib/process.js';
import { SYSTEM_LABELS, type BenchContext, type SystemName } from './lib/systems.js';
import { fmt, fmtRatio, markdownTable, verdict } from './lib/table.js';

const PHASE = 1;

export interface ThroughputRun {
  /** Messages per second until the last one arrived upstream. */
  endToEnd: number;
  /** Messages per second until the last PUBACK at the devices. */
  fanIn: number;
  missing: number;
  duplicates: number;
  /** CPU time (user + system) of the broker process per message delivered, µs: robust to a busy machine. */
  cpuUsPerMessage: number;
  /** Peak RSS (VmHWM) of the broker process over its life, load included, MiB. */
  peakRssMiB: number;
}

/**
 * QoS 1 device → upstream throughput: every device keeps `window` messages in flight; the
 * clock stops at the last arrival upstream (end to end) and at the last PUBACK (fan-in).
 */
export async function measureThroughput(
  ctx: BenchContext,
  settings: BenchSettings,
  name: SystemName,
): Promise<ThroughputRun> {
  return withSetup(ctx, settings, name, {}, async ({ collector, devices, system }) => {
    const cpuBefore = await processCpuMs(system.pid);
    const perDevice = settings.messagesPerDevice;
    const total = devices.length * perDevice;
    const timeoutMs = Math.max(60_000, total); // ≥ 1,000 msg/s or it counts as failed
    collector.expect(PHASE, devices.length, perDevice);
    const burst = await closedLoopBurst(
      devices,
      PHASE,
      perDevice,
      settings.window,
      settings.payloadSize,
      timeoutMs,
    );
    await waitForArrivals(collector, total, 3_000, timeoutMs);
    const cpuMs = (await processCpuMs(system.pid)) - cpuBefore;
    const peakRssMiB = (await readPeakRss(system.pid)) / (1024 * 1024);
    const arrived = collector.arrived.size;
    // Delivered messages per second: a system that drops (Mosquitto's bridge queue overflows
    // when devices outpace it) is credited only with what arrived; the loss shows in `missing`.
    return {
      endToEnd: arrived > 0 ? arrived / ((collector.lastArrival - burst.start) / 1000) : Number.NaN,
      fanIn: burst.acked.size === total ? total / ((burst.lastAck - burst.start) / 1000) : Number.NaN,
      missing: total - arrived,
      duplicates: collector.duplicates,
      cpuUsPerMessage: arrived > 0 ? (cpuMs * 1000) / arrived : Number.NaN,
      peakRssMiB,
    };
  });
}

export async function runThroughputBench(ctx: BenchContext, settings: BenchSettings): Promise<string> {
  const sections: string[] = [];
  for (const mode of settings.throughputPin) {
    sections.push(await withPinning(mode === 'pinned', () => runThroughputPass(ctx, settings, mode)));
  }
  return sections.join('\n\n');
}

const FAILED_RUN: ThroughputRun = {
  endToEnd: Number.NaN,
  fanIn: Number.NaN,
  missing: Number.NaN,
  duplicates: Number.NaN,
  cpuUsPerMessage: Number.NaN,
  peakRssMiB: Number.NaN,
};

/** Peak RSS of the gateway under load (issue 11). */
const RSS_TARGET_MIB = 128;

async function runThroughputPass(
  ctx: BenchContext,
  settings: BenchSettings,
  mode: 'pinned' | 'unpinned',
): Promise<string> {
  const runs = new Map<SystemName, ThroughputRun[]>(settings.systems.map((s) => [s, []]));
  for (let r = 0; r < settings.runs; r++) {
    for (const name of orderForRun(settings.systems, r)) {
      let result: ThroughputRun;
      try {
        result = await measureThroughput(ctx, settings, name);
      } catch (err) {
        console.error(`throughput ${name} (${mode}) run ${r + 1} failed: ${(err as Error).message}`);
        result = FAILED_RUN;
      }
      runs.get(name)!.push(result);
      console.error(
        `  throughput ${mode} run ${r + 1}/${settings.runs} ${name}: ${fmt(result.endToEnd)} msg/s end to end, ${fmt(result.fanIn)} fan-in, ${result.missing} missing, ${result.cpuUsPerMessage.toFixed(1)} µs/msg, peak RSS ${result.peakRssMiB.toFixed(0)} MiB`,
      );
    }
  }
  const total = settings.devices * settings.messagesPerDevice;
  const systemRows = settings.systems.map((name) => {
    const rs = runs.get(name)!;
    return [
      SYSTEM_LABELS[name],
      fmt(median(rs.map((x) => x.endToEnd))),
      fmt(median(rs.map((x) => x.fanIn))),
      rs.map((x) => fmt(x.endToEnd)).join(', '),
      String(rs.reduce((a, x) => a + (Number.isFinite(x.missing) ? x.missing : 0), 0)),
      String(rs.reduce((a, x) => a + (Number.isFinite(x.duplicates) ? x.duplicates : 0), 0)),
      median(rs.map((x) => x.cpuUsPerMessage)).toFixed(1),
      fmt(Math.max(...rs.map((x) => (Number.isFinite(x.peakRssMiB) ? x.peakRssMiB : 0)))),
    ];
  });
  const pinning =
    mode === 'pinned'
      ? 'pinned: the system on one core, the load on the other'
      : 'unpinned: every process may use every core, as a user runs it';
  const lines = [
    `### Throughput (${pinning}): QoS 1, ${settings.devices} devices × ${fmt(settings.messagesPerDevice)} messages (${fmt(total)}), window ${settings.window}, ${settings.payloadSize}-byte payload, ${ctx.auth ? 'password logins' : 'anonymous devices'}, ${settings.runs} run(s)`,
    '',
    markdownTable(
      [
        'system',
        'delivered end to end msg/s (median)',
        'fan-in msg/s (median)',
        'end to end per run',
        'missing (all runs)',
        'duplicates (all runs)',
        'broker CPU µs/msg (median)',
        'peak RSS MiB (max)',
      ],
      systemRows,
    ),
  ];
  // Targets: issue 2 against the defaults bridge and the relay; issue 11 against the loss-free
  // bridge, judged on the unpinned pass (as a user runs it).
  const issue11 = mode === 'unpinned';
  const ratioRows = ratioRowsFor(runs, [
    { other: 'lossfree', metric: 'endToEnd', target: issue11 ? 1.0 : undefined, label: 'end to end' },
    { other: 'bridge', metric: 'endToEnd', target: 1.0, label: 'end to end' },
    { other: 'relay', metric: 'endToEnd', target: 0.8, label: 'end to end' },
    { other: 'lossfree', metric: 'fanIn', label: 'fan-in' },
    { other: 'relay', metric: 'fanIn', label: 'fan-in' },
  ]);
  if (ratioRows.length > 0) {
    lines.push(
      '',
      markdownTable(['ratio (higher is better)', 'per run', 'median', 'target', 'verdict'], ratioRows),
    );
  }
  const gw = runs.get('gateway');
  const lossfree = runs.get('lossfree');
  if (gw) {
    const costRows: string[][] = [];
    if (lossfree) {
      const perRun = gw.map((g, i) => ratio(g.cpuUsPerMessage, lossfree[i]?.cpuUsPerMessage ?? Number.NaN));
      const med = median(perRun);
      costRows.push([
        `gateway / ${SYSTEM_LABELS.lossfree} (CPU µs per delivered message)`,
        perRun.map(fmtRatio).join(', '),
        fmtRatio(med),
        issue11 ? '≤ 1.5×' : '–',
        issue11 ? verdict(med, (v) => v <= 1.5) : '–',
      ]);
    }
    const peak = Math.max(...gw.map((g) => (Number.isFinite(g.peakRssMiB) ? g.peakRssMiB : 0)));
    costRows.push([
      'gateway peak RSS under load, MiB (max over runs)',
      gw.map((g) => fmt(g.peakRssMiB)).join(', '),
      fmt(peak),
      `≤ ${RSS_TARGET_MIB}`,
      verdict(peak, (v) => v > 0 && v <= RSS_TARGET_MIB),
    ]);
    lines.push(
      '',
      markdownTable(['cost (lower is better)', 'per run', 'median / max', 'target', 'verdict'], costRows),
    );
  }
  return lines.join('\n');
}

/** utime + stime of a process from /proc, ms (clock ticks of 10 ms). */
async function processCpuMs(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command (which may hold spaces) start after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

function ratioRowsFor(
  runs: Map<SystemName, ThroughputRun[]>,
  specs: { other: SystemName; metric: 'endToEnd' | 'fanIn'; target?: number | undefined; label: string }[],
): string[][] {
  const gw = runs.get('gateway');
  if (!gw) return [];
  return specs.flatMap((spec) => {
    const base = runs.get(spec.other);
    if (!base) return [];
    const perRun = gw.map((g, i) => ratio(g[spec.metric], base[i]?.[spec.metric] ?? Number.NaN));
    const med = median(perRun);
    return [
      [
        `gateway / ${SYSTEM_LABELS[spec.other]} (${spec.label})`,
        perRun.map(fmtRatio).join(', ') || 'n/a',
        fmtRatio(med),
        spec.target === undefined ? '–' : `≥ ${spec.target.toFixed(1)}×`,
        spec.target === undefined ? '–' : verdict(med, (v) => v >= spec.target!),
      ],
    ];
  });
}
