import { mkdtemp } from 'node:fs/promises';
import { join } from 'node:path';
import { connectDevices } from './lib/load.js';
import { startMosquitto, upstreamConfLines, writeMosquittoConf } from './lib/mosquitto.js';
import type { RawClient } from './lib/mqtt-raw.js';
import { freePort } from './lib/ports.js';
import { readRss, sleep } from './lib/process.js';
import { orderForRun, type BenchSettings } from './lib/settings.js';
import { median, ratio } from './lib/stats.js';
import { SYSTEM_LABELS, startSystem, type BenchContext, type SystemName } from './lib/systems.js';
import { fmt, fmtRatio, markdownTable, verdict } from './lib/table.js';

export interface RssRun {
  idle: number;
  connected: number;
}

/** Settling time before a reading, so start-up allocations and connection bursts are counted. */
const SETTLE_MS = 2_000;
const MB = 1024 * 1024;

/** VmRSS of the broker process idle after start, and with `rssDevices` connected idle devices. */
export async function measureRss(
  ctx: BenchContext,
  settings: BenchSettings,
  name: SystemName,
): Promise<RssRun> {
  const dir = await mkdtemp(join(ctx.tmpRoot, 'rss-upstream-'));
  const upstreamPort = await freePort();
  const conf = await writeMosquittoConf(dir, 'upstream', upstreamPort, upstreamConfLines(dir, false));
  const upstream = await startMosquitto(ctx.group, 'mosquitto-upstream', conf, upstreamPort);
  let clients: RawClient[] = [];
  try {
    const system = await startSystem(ctx, name, upstreamPort);
    try {
      await sleep(SETTLE_MS);
      const idle = await readRss(system.pid);
      clients = await connectDevices(system.port, settings.rssDevices, `rss-${name}`);
      await sleep(SETTLE_MS);
      const alive = clients.filter((c) => c.connected).length;
      if (alive < clients.length)
        throw new Error(`${name}: only ${alive} of ${clients.length} devices stayed connected`);
      const connected = await readRss(system.pid);
      return { idle, connected };
    } finally {
      for (const c of clients) c.destroy();
      await system.stop();
    }
  } finally {
    await upstream.stop();
  }
}

export async function runRssBench(ctx: BenchContext, settings: BenchSettings): Promise<string> {
  const systems: SystemName[] = ['aedes', ...settings.systems];
  const runs = new Map<SystemName, RssRun[]>(systems.map((s) => [s, []]));
  for (let r = 0; r < settings.runs; r++) {
    for (const name of orderForRun(systems, r)) {
      let result: RssRun = { idle: Number.NaN, connected: Number.NaN };
      try {
        result = await measureRss(ctx, settings, name);
      } catch (err) {
        console.error(`rss ${name} run ${r + 1} failed: ${(err as Error).message}`);
      }
      runs.get(name)!.push(result);
      console.error(
        `  rss run ${r + 1}/${settings.runs} ${name}: idle ${fmt(result.idle / MB, 1)} MB, ${settings.rssDevices} devices ${fmt(result.connected / MB, 1)} MB`,
      );
    }
  }
  const rows = systems.map((name) => {
    const rs = runs.get(name)!;
    return [
      SYSTEM_LABELS[name],
      fmt(median(rs.map((x) => x.idle)) / MB, 1),
      fmt(median(rs.map((x) => x.connected)) / MB, 1),
      rs.map((x) => fmt(x.connected / MB, 1)).join(', '),
    ];
  });
  const lines = [
    `### RSS (VmRSS of the broker process, MB; idle ${SETTLE_MS / 1000} s after start, and with ${fmt(settings.rssDevices)} connected idle devices; ${settings.runs} run(s))`,
    '',
    markdownTable(
      [
        'system',
        'idle',
        `${fmt(settings.rssDevices)} devices`,
        `${fmt(settings.rssDevices)} devices per run`,
      ],
      rows,
    ),
  ];
  const gw = runs.get('gateway');
  const bare = runs.get('aedes')!;
  if (gw) {
    const ratioRows = (['idle', 'connected'] as const).map((k) => {
      const perRun = gw.map((g, i) => ratio(g[k], bare[i]?.[k] ?? Number.NaN));
      const med = median(perRun);
      return [
        `gateway / bare aedes (${k === 'idle' ? 'idle' : `${fmt(settings.rssDevices)} devices`})`,
        perRun.map(fmtRatio).join(', '),
        fmtRatio(med),
        '≤ 1.3×',
        verdict(med, (v) => v <= 1.3),
      ];
    });
    lines.push(
      '',
      markdownTable(['ratio (lower is better)', 'per run', 'median', 'target', 'verdict'], ratioRows),
    );
  }
  return lines.join('\n');
}
