/**
 * `npm run bench`: every bench in sequence, tables printed as markdown on stdout (progress on
 * stderr) and written to dist-bench/results.md (or BENCH_OUT). Sizes: see bench/lib/settings.ts
 * and docs/benchmarks.md; BENCH_QUICK=1 is a smoke run.
 */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runBrokerStateBench } from './broker-state.js';
import { runLatencyBench } from './latency.js';
import { createProcessGroup, pin, pinDescription } from './lib/process.js';
import { readSettings } from './lib/settings.js';
import { fmt, markdownTable } from './lib/table.js';
import { gatewayAvailable, gatewayCliPath, repoRoot, type BenchContext } from './lib/systems.js';
import { runOutageBench } from './outage-loss.js';
import { runRssBench } from './rss.js';
import { runThroughputBench } from './throughput.js';

async function runReplication(quiet: Set<string>): Promise<string | undefined> {
  const compiled = fileURLToPath(new URL('./replication.js', import.meta.url));
  if (!existsSync(compiled)) {
    console.error('replication bench: bench/replication.ts not present, skipped');
    return undefined;
  }
  const mod = (await import('./replication.js' as string)) as {
    runReplicationBench?: () => Promise<unknown>;
  };
  if (typeof mod.runReplicationBench !== 'function') {
    console.error('replication bench: bench/replication.ts has no runReplicationBench export, skipped');
    return undefined;
  }
  const out = await mod.runReplicationBench();
  if (typeof out === 'string') return out;
  // An array of flat records (e.g. { label, rows, rowsPerSecond }) becomes a table.
  if (Array.isArray(out) && out.length > 0 && typeof out[0] === 'object' && out[0] !== null) {
    const rows = out as Record<string, unknown>[];
    const headers = Object.keys(rows[0]!);
    const cell = (v: unknown) => (typeof v === 'number' ? fmt(v) : String(v));
    // It printed its own table already; this copy is for the results file only.
    quiet.add('replication');
    return [
      '### Replication',
      '',
      markdownTable(
        headers,
        rows.map((r) => headers.map((h) => cell(r[h]))),
      ),
    ].join('\n');
  }
  return undefined;
}

function mosquittoVersion(): string {
  try {
    return execFileSync('mosquitto', ['-h'], { encoding: 'utf8' }).split('\n')[0] ?? 'mosquitto';
  } catch (err) {
    // `mosquitto -h` exits 3 after printing its usage.
    const out = (err as { stdout?: string }).stdout ?? '';
    return out.split('\n')[0] || 'mosquitto (version unknown)';
  }
}

const loadNow = () =>
  loadavg()
    .map((l) => l.toFixed(2))
    .join(' / ');

async function main(): Promise<number> {
  const settings = readSettings();
  const root = repoRoot();
  const group = createProcessGroup();
  const onSignal = () => {
    group.killAll();
    process.exit(130);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('exit', () => group.killAll());

  if (!gatewayAvailable(root) && settings.systems.includes('gateway')) {
    console.error(`gateway: ${gatewayCliPath(root)} not built, measuring the baselines only`);
    settings.systems = settings.systems.filter((s) => s !== 'gateway');
  }
  // This process runs the devices and the upstream subscriber: part of the load.
  pin(process.pid, 'load');
  const tmpRoot = await mkdtemp(join(tmpdir(), 'iot-gateway-bench-'));
  const ctx: BenchContext = { group, tmpRoot, root };
  const started = Date.now();
  const loadAtStart = loadNow();
  const sections: string[] = [
    `## Bench run ${new Date().toISOString()}`,
    '',
    `${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, Node ${process.version}, ${mosquittoVersion()}; ` +
      `systems: ${settings.systems.join(', ')}${settings.quick ? ' (BENCH_QUICK=1)' : ''}; ${pinDescription()}`,
  ];
  const quiet = new Set<string>();
  const benches: [string, () => Promise<string | undefined>][] = [
    ['throughput', () => runThroughputBench(ctx, settings)],
    ['latency', () => runLatencyBench(ctx, settings)],
    ['rss', () => runRssBench(ctx, settings)],
    ['outage', () => runOutageBench(ctx, settings)],
    ['broker-state', () => runBrokerStateBench(ctx, settings)],
    ['replication', () => runReplication(quiet)],
  ];
  let failures = 0;
  try {
    for (const [name, bench] of benches) {
      if (name !== 'replication' && !settings.only.has(name)) continue;
      if (name === 'replication' && !settings.only.has('replication') && process.env.BENCH_ONLY !== undefined)
        continue;
      console.error(`== ${name}`);
      // Replication runs in this process against PostgreSQL and psql: no system under test to
      // give a core to, so the replicator may use every CPU, like COPY does.
      if (name === 'replication') pin(process.pid, 'any');
      try {
        const table = await bench();
        if (table !== undefined) {
          sections.push('', table);
          if (!quiet.has(name)) console.log(`\n${table}\n`);
        }
      } catch (err) {
        failures++;
        console.error(`${name} bench failed: ${(err as Error).stack ?? String(err)}`);
      }
    }
  } finally {
    await group.stopAll();
    if (process.env.BENCH_KEEP_TMP !== '1') await rm(tmpRoot, { recursive: true, force: true });
  }
  // Other work on the machine skews absolute numbers; the load average says how much.
  sections.push(
    '',
    `Total bench time: ${((Date.now() - started) / 1000).toFixed(0)} s; load average at start ${loadAtStart}, at end ${loadNow()}`,
  );
  const out = process.env.BENCH_OUT ?? join(root, 'dist-bench', 'results.md');
  await writeFile(out, `${sections.join('\n')}\n`);
  console.error(`results written to ${out} (${((Date.now() - started) / 1000).toFixed(0)} s)`);
  return failures === 0 ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error((err as Error).stack ?? String(err));
    process.exit(1);
  },
);
