/**
 * `npm run soak`: the gateway at a steady load for SOAK_MINUTES (default 10) with its upstream
 * down for part of every minute (R21, the short form of a 24 h soak). A minute is a 40 s burst
 * and then the drain of its backlog, stretched when the drain runs past the minute. After each
 * drain it reads the gateway's RSS and checks that every acknowledged message of that minute
 * arrived (within DRAIN_MS, else it counts as lost);
 * at the end it prints one row per minute, the RSS trend (least squares, MB per hour) and any
 * MaxListenersExceededWarning the gateway printed. Run it for hours on a target box with
 * SOAK_MINUTES=1440.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pacedBurst, waitFor } from './lib/load.js';
import { startMosquitto, type MosquittoInstance } from './lib/mosquitto.js';
import { createProcessGroup, pin, readRss } from './lib/process.js';
import { readSettings } from './lib/settings.js';
import { withSetup } from './lib/setup.js';
import { gatewayAvailable, gatewayCliPath, repoRoot, type BenchContext } from './lib/systems.js';
import { fmt, markdownTable } from './lib/table.js';

const CYCLE_MS = 60_000;
/** Of each minute: messages flow for the first 40 s, the upstream is down from 25 % to 60 % of them. */
const BURST_MS = 40_000;
const DOWN_AT = 0.25;
const UP_AT = 0.6;
/** How long a minute's acknowledged messages may take to arrive after its burst. */
const DRAIN_MS = 120_000;

function positive(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value <= 0) throw new Error(`${name}=${raw} must be a positive number`);
  return value;
}

/** Least-squares slope of y over x. */
function slope(xs: readonly number[], ys: readonly number[]): number {
  const n = xs.length;
  const mx = xs.reduce((a, b) => a + b, 0) / n;
  const my = ys.reduce((a, b) => a + b, 0) / n;
  let num = 0;
  let den = 0;
  for (let i = 0; i < n; i++) {
    num += (xs[i]! - mx) * (ys[i]! - my);
    den += (xs[i]! - mx) ** 2;
  }
  return den === 0 ? 0 : num / den;
}

async function main(): Promise<number> {
  const minutes = Math.round(positive('SOAK_MINUTES', 10));
  const rate = positive('SOAK_RATE', 1_000);
  const settings = readSettings();
  const root = repoRoot();
  if (!gatewayAvailable(root)) throw new Error(`${gatewayCliPath(root)} is not built: run npm run build`);
  const group = createProcessGroup();
  process.on('exit', () => group.killAll());
  pin(process.pid, 'load');
  const tmpRoot = await mkdtemp(join(tmpdir(), 'iot-gateway-soak-'));
  // Anonymous devices: the soak measures the queue and memory over time, not logins.
  const ctx: BenchContext = { group, tmpRoot, root, authDevices: 0 };
  const rows: { minute: number; acked: number; lost: number; rssMb: number; drainS: number }[] = [];
  let warnings = 0;
  try {
    await withSetup(ctx, settings, 'gateway', { persistentUpstream: true }, async (setup) => {
      const { collector, devices, system } = setup;
      let upstream: MosquittoInstance = setup.upstream;
      try {
        for (let minute = 0; minute < minutes; minute++) {
          // Phases 10…255 then again: the collector tells the minutes apart by this byte.
          const phase = 10 + (minute % 240);
          const cycleStart = performance.now();
          const total = Math.round((rate * BURST_MS) / 1000);
          collector.expect(phase, devices.length, Math.ceil(total / devices.length));
          let state: 'up' | 'down' | 'back' = 'up';
          let transition: Promise<void> = Promise.resolve();
          const burst = await pacedBurst(devices, phase, {
            rate,
            total,
            payloadSize: settings.payloadSize,
            onProgress(fraction) {
              if (state === 'up' && fraction >= DOWN_AT) {
                state = 'down';
                transition = upstream.stop();
              } else if (state === 'down' && fraction >= UP_AT) {
                state = 'back';
                const port = upstream.port;
                transition = transition.then(async () => {
                  upstream = await startMosquitto(group, 'mosquitto-upstream', setup.upstreamConf, port);
                });
              }
            },
          });
          await transition;
          const drainStart = performance.now();
          await waitFor(() => burst.acked.size >= total, 30_000);
          // A minute stretches while its backlog drains (the gateway's reconnect backoff after the
          // outage included); what has not arrived DRAIN_MS after the burst counts as lost.
          await waitFor(() => burst.acked.missingFrom(collector.arrived) === 0, DRAIN_MS, 100);
          const lost = burst.acked.missingFrom(collector.arrived);
          const rssMb = (await readRss(system.pid)) / 1024 / 1024;
          rows.push({
            minute: minute + 1,
            acked: burst.acked.size,
            lost,
            rssMb,
            drainS: (performance.now() - drainStart) / 1000,
          });
          console.error(
            `soak: minute ${minute + 1}/${minutes}: ${burst.acked.size} acknowledged, ${lost} lost, RSS ${fmt(rssMb, 1)} MB`,
          );
          const rest = cycleStart + CYCLE_MS - performance.now();
          if (rest > 0) await waitFor(() => false, rest, 250);
        }
      } finally {
        if (upstream !== setup.upstream) await upstream.stop();
      }
      warnings = (system.child.tail().match(/MaxListenersExceededWarning/g) ?? []).length;
    });
  } finally {
    await group.stopAll();
    await rm(tmpRoot, { recursive: true, force: true });
  }
  const xs = rows.map((r) => r.minute / 60);
  const ys = rows.map((r) => r.rssMb);
  // The first minutes include JIT and heap growth to a working size; the trend is over the rest.
  const settled = rows.length > 4 ? 2 : 0;
  const trend = slope(xs.slice(settled), ys.slice(settled));
  const lost = rows.reduce((n, r) => n + r.lost, 0);
  console.log(
    [
      `### Soak: ${minutes} min at ${fmt(rate)} msg/s QoS 1, upstream down ${DOWN_AT * 100}–${UP_AT * 100} % of every burst`,
      '',
      markdownTable(
        ['minute', 'acknowledged', 'lost', 'drain s', 'RSS MB'],
        rows.map((r) => [String(r.minute), fmt(r.acked), fmt(r.lost), fmt(r.drainS, 1), fmt(r.rssMb, 1)]),
      ),
      '',
      `RSS trend after minute ${settled}: ${fmt(trend, 1)} MB per hour; lost in all: ${lost}; MaxListenersExceededWarning: ${warnings}`,
    ].join('\n'),
  );
  return lost === 0 && warnings === 0 ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error((err as Error).stack ?? String(err));
    process.exit(1);
  },
);
