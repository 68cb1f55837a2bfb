import type { SystemName } from './systems.js';

/** Bench sizes, from the environment; BENCH_QUICK=1 shrinks everything for a smoke run. */
export interface BenchSettings {
  quick: boolean;
  runs: number;
  systems: SystemName[];
  only: Set<string>;
  payloadSize: number;
  devices: number;
  messagesPerDevice: number;
  window: number;
  warmupPerDevice: number;
  rates: number[];
  latencySeconds: number;
  rssDevices: number;
  /** Devices of the broker-state bench (connect, subscribe, retained delivery). */
  stateDevices: number;
  outageMessages: number;
  outageRate: number;
  outageDrainSeconds: number;
}

function num(env: NodeJS.ProcessEnv, key: string, fallback: number): number {
  const raw = env[key];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value <= 0) throw new Error(`${key}=${raw} must be a positive number`);
  return value;
}

export function readSettings(env: NodeJS.ProcessEnv = process.env): BenchSettings {
  const quick = env.BENCH_QUICK === '1';
  const systems = (env.BENCH_SYSTEMS ?? 'gateway,relay,bridge')
    .split(',')
    .map((s) => s.trim())
    .filter((s): s is SystemName => ['gateway', 'relay', 'bridge', 'durable'].includes(s));
  return {
    quick,
    runs: num(env, 'BENCH_RUNS', quick ? 1 : 3),
    systems,
    only: new Set(
      (env.BENCH_ONLY ?? 'throughput,latency,rss,outage,broker-state').split(',').map((s) => s.trim()),
    ),
    payloadSize: num(env, 'BENCH_PAYLOAD', 64),
    devices: num(env, 'BENCH_DEVICES', 10),
    messagesPerDevice: num(env, 'BENCH_MESSAGES', quick ? 1_000 : 10_000),
    window: num(env, 'BENCH_WINDOW', 100),
    warmupPerDevice: num(env, 'BENCH_WARMUP', quick ? 100 : 300),
    rates: (env.BENCH_RATES ?? '2000,10000')
      .split(',')
      .map(Number)
      .filter((r) => r > 0),
    latencySeconds: num(env, 'BENCH_LATENCY_SECONDS', quick ? 2 : 5),
    rssDevices: num(env, 'BENCH_RSS_DEVICES', quick ? 200 : 1_000),
    stateDevices: num(env, 'BENCH_STATE_DEVICES', quick ? 200 : 1_000),
    outageMessages: num(env, 'BENCH_OUTAGE_MESSAGES', quick ? 5_000 : 20_000),
    outageRate: num(env, 'BENCH_OUTAGE_RATE', 4_000),
    outageDrainSeconds: num(env, 'BENCH_OUTAGE_DRAIN_SECONDS', quick ? 40 : 45),
  };
}

/** Rotates the system order per run so no system always goes first on a cold machine. */
export function orderForRun<T>(items: readonly T[], run: number): T[] {
  if (items.length === 0) return [];
  const shift = run % items.length;
  return [...items.slice(shift), ...items.slice(0, shift)];
}
