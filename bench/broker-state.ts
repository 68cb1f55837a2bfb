import { connectRaw, type RawClient } from './lib/mqtt-raw.js';
import { readRss, sleep } from './lib/process.js';
import { orderForRun, type BenchSettings } from './lib/settings.js';
import { median, percentile, ratio } from './lib/stats.js';
import { startSystem, type BenchContext } from './lib/systems.js';
import { fmt, fmtRatio, markdownTable, verdict } from './lib/table.js';

/**
 * The broker's own state, SQLite persistence (broker.persistence: sqlite, the default) against
 * aedes' in-memory persistence, in the same run: `devices` devices that each have a retained
 * desired state connect with a persistent session (clean=false), subscribe to it and wait for
 * it; timed from the first CONNECT to the last retained message received. RSS of the gateway
 * after, with every session, subscription and retained message stored.
 */

type Mode = 'memory' | 'sqlite';

interface StateRun {
  seconds: number;
  perSecond: number;
  p50: number;
  p99: number;
  rss: number;
}

/** Devices connecting at once: a burst, as after a power cut of the site. */
const CONCURRENCY = 100;
const MB = 1024 * 1024;
const TIMEOUT_MS = 120_000;

async function measure(ctx: BenchContext, mode: Mode, devices: number): Promise<StateRun> {
  const system = await startSystem(ctx, 'gateway', 0, {
    broker: {
      persistence: mode,
      anonymousAcl: { publish: ['devices/#'], subscribe: ['devices/#'] },
      maxRetainedPerDevice: 10,
    },
    withoutIntegrations: true,
  });
  const clients: RawClient[] = [];
  try {
    // The cloud side's desired state for every device, retained (not timed).
    const seeder = await connectRaw({ port: system.port, clientId: 'bench-seeder' });
    clients.push(seeder);
    let acked = 0;
    for (let i = 0; i < devices; i++) {
      while (
        !seeder.publish(`devices/d${i}/desired`, Buffer.from(`{"on":true,"n":${i}}`), 1, () => acked++, true)
      )
        await sleep(1);
      if (seeder.inflight >= 100) while (seeder.inflight >= 50) await sleep(1);
    }
    const seeded = Date.now() + TIMEOUT_MS;
    while (acked < devices) {
      if (Date.now() > seeded)
        throw new Error(`${mode}: ${acked} of ${devices} retained messages acknowledged`);
      await sleep(5);
    }

    const latencies: number[] = [];
    let next = 0;
    const started = performance.now();
    const one = async (i: number) => {
      const t0 = performance.now();
      let received!: () => void;
      const got = new Promise<void>((resolve) => (received = resolve));
      const client = await connectRaw({ port: system.port, clientId: `bench-d${i}`, clean: false });
      clients.push(client);
      client.onMessage((topic) => {
        if (topic === `devices/d${i}/desired`) received();
      });
      await client.subscribe(`devices/d${i}/desired`, 1, TIMEOUT_MS);
      await got;
      latencies.push(performance.now() - t0);
    };
    const worker = async () => {
      while (next < devices) await one(next++);
    };
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      Promise.all(Array.from({ length: CONCURRENCY }, worker)),
      new Promise((_, reject) => {
        timer = setTimeout(
          () => reject(new Error(`${mode}: ${latencies.length} of ${devices} devices done in time`)),
          TIMEOUT_MS,
        );
      }),
    ]).finally(() => clearTimeout(timer));
    const seconds = (performance.now() - started) / 1000;
    await sleep(1_000);
    const rss = await readRss(system.pid);
    return {
      seconds,
      perSecond: devices / seconds,
      p50: percentile(latencies, 50),
      p99: percentile(latencies, 99),
      rss,
    };
  } finally {
    for (const c of clients) c.destroy();
    await system.stop();
  }
}

export async function runBrokerStateBench(ctx: BenchContext, settings: BenchSettings): Promise<string> {
  const devices = settings.stateDevices;
  const modes: Mode[] = ['memory', 'sqlite'];
  const runs = new Map<Mode, StateRun[]>(modes.map((m) => [m, []]));
  const failed: StateRun = { seconds: NaN, perSecond: NaN, p50: NaN, p99: NaN, rss: NaN };
  for (let r = 0; r < settings.runs; r++) {
    for (const mode of orderForRun(modes, r)) {
      let result = failed;
      try {
        result = await measure(ctx, mode, devices);
      } catch (err) {
        console.error(`broker-state ${mode} run ${r + 1} failed: ${(err as Error).message}`);
      }
      runs.get(mode)!.push(result);
      console.error(
        `  broker-state run ${r + 1}/${settings.runs} ${mode}: ${fmt(result.perSecond)} devices/s, p99 ${fmt(result.p99)} ms, RSS ${fmt(result.rss / MB, 1)} MB`,
      );
    }
  }
  const rows = modes.map((mode) => {
    const rs = runs.get(mode)!;
    return [
      mode === 'sqlite' ? 'SQLite (gateway default)' : 'aedes in-memory',
      fmt(median(rs.map((x) => x.seconds)), 2),
      fmt(median(rs.map((x) => x.perSecond))),
      fmt(median(rs.map((x) => x.p50))),
      fmt(median(rs.map((x) => x.p99))),
      fmt(median(rs.map((x) => x.rss)) / MB, 1),
    ];
  });
  const sqlite = runs.get('sqlite')!;
  const memory = runs.get('memory')!;
  const perRun = sqlite.map((s, i) => ratio(s.perSecond, memory[i]?.perSecond ?? NaN));
  const med = median(perRun);
  return [
    `### Broker state: ${fmt(devices)} devices connect (clean=false, ${CONCURRENCY} at a time), subscribe and get their retained message (${settings.runs} run(s))`,
    '',
    markdownTable(['persistence', 'total s', 'devices/s', 'p50 ms', 'p99 ms', 'RSS after, MB'], rows),
    '',
    markdownTable(
      ['ratio (higher is better)', 'per run', 'median', 'target', 'verdict'],
      [
        [
          'SQLite / in-memory devices/s',
          perRun.map(fmtRatio).join(', '),
          fmtRatio(med),
          '≥ 0.5×',
          verdict(med, (v) => v >= 0.5),
        ],
      ],
    ),
  ].join('\n');
}
