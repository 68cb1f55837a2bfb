import { existsSync } from 'node:fs';
import { mkdtemp, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';
import { freePort } from './ports.js';
import { startMosquitto, writeMosquittoConf, type MosquittoInstance } from './mosquitto.js';
import { pin, waitForPort, type Child, type ProcessGroup } from './process.js';

/**
 * g: the gateway; relay: plain aedes + mqtt.js (a); bridge: Mosquitto's bridge (b); aedes: bare
 * aedes (RSS reference); durable: the relay with one SQLite commit (synchronous=FULL) per turn
 * of the loop before each PUBACK, the latency floor of durable-before-PUBACK on this disk.
 */
export type SystemName = 'gateway' | 'relay' | 'bridge' | 'aedes' | 'durable';

export const SYSTEM_LABELS: Record<SystemName, string> = {
  gateway: 'gateway (g)',
  relay: 'aedes relay (a)',
  bridge: 'mosquitto bridge (b)',
  aedes: 'bare aedes',
  durable: 'durable relay (floor)',
};

/** A broker under test that devices connect to on `port`; `pid` is the process whose RSS counts. */
export interface SystemUnderTest {
  readonly name: SystemName;
  readonly port: number;
  readonly pid: number;
  readonly child: Child;
  stop(): Promise<void>;
}

export interface BenchContext {
  readonly group: ProcessGroup;
  /** Parent of every temp dir the bench makes. */
  readonly tmpRoot: string;
  /** Repository root (where dist/cli.js lives). */
  readonly root: string;
}

/** dist-bench/bench/lib/systems.js → repository root. */
export function repoRoot(): string {
  return fileURLToPath(new URL('../../../', import.meta.url));
}

export function gatewayCliPath(root: string): string {
  return join(root, 'dist', 'cli.js');
}

export function gatewayAvailable(root: string): boolean {
  return existsSync(gatewayCliPath(root));
}

const READY_TIMEOUT_MS = 30_000;

/** Changes to the gateway's bench config: broker keys merged in; no integration at all. */
export interface GatewayOverrides {
  broker?: Record<string, unknown>;
  withoutIntegrations?: boolean;
}

export async function startSystem(
  ctx: BenchContext,
  name: SystemName,
  upstreamPort: number,
  overrides: GatewayOverrides = {},
): Promise<SystemUnderTest> {
  const dir = await mkdtemp(join(ctx.tmpRoot, `${name}-`));
  const port = await freePort();
  switch (name) {
    case 'aedes':
    case 'relay':
    case 'durable': {
      const script = fileURLToPath(new URL('./relay-child.js', import.meta.url));
      const args =
        name === 'aedes'
          ? ['bare', String(port)]
          : name === 'relay'
            ? ['relay', String(port), String(upstreamPort)]
            : ['durable', String(port), String(upstreamPort), dir];
      const child = ctx.group.spawn(name, process.execPath, [script, ...args]);
      pin(child.pid, 'system');
      await readyOrStop(child, /^ready$/);
      return { name, port, pid: child.pid, child, stop: () => child.stop() };
    }
    case 'bridge': {
      // Mosquitto's bridge with its defaults: only the connection and the topic are configured.
      const conf = await writeMosquittoConf(dir, 'bridge', port, [
        'connection bench-bridge',
        `address 127.0.0.1:${upstreamPort}`,
        'topic devices/# out 1',
      ]);
      const local: MosquittoInstance = await startMosquitto(
        ctx.group,
        'mosquitto-bridge',
        conf,
        port,
        'system',
      );
      return { name, port, pid: local.child.pid, child: local.child, stop: local.stop };
    }
    case 'gateway': {
      const httpPort = await freePort();
      const config = {
        gateway: { id: 'bench-gw', dataDir: join(dir, 'data'), log: { level: 'info' } },
        broker: {
          listeners: [{ type: 'tcp', host: '127.0.0.1', port }],
          // Anonymous devices with an ACL: no scrypt cost in connection storms, like the baselines.
          allowAnonymous: true,
          anonymousAcl: { publish: ['devices/#'], subscribe: [] },
          // Every bench device connects from 127.0.0.1 at once, without retrying; the baselines
          // have no connect-rate limit either.
          connectRate: { perIp: 0, total: 0 },
          ...overrides.broker,
        },
        http: { host: '127.0.0.1', port: httpPort },
        integrations: overrides.withoutIntegrations
          ? []
          : [
              {
                name: 'up',
                id: randomUUID(),
                type: 'mqtt',
                settings: { url: `mqtt://127.0.0.1:${upstreamPort}` },
                routes: [{ from: 'devices/#', qos: 1 }],
                queue: { inflight: 1000 },
              },
            ],
      };
      const confPath = join(dir, 'gateway.yaml');
      await writeFile(confPath, stringify(config));
      const child = ctx.group.spawn(
        'gateway',
        process.execPath,
        [
          // BENCH_PROFILE=DIR writes a V8 CPU profile of the gateway there (open it in Chrome DevTools).
          ...(process.env.BENCH_PROFILE ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_PROFILE}`] : []),
          gatewayCliPath(ctx.root),
          'run',
          '-c',
          confPath,
        ],
        {
          cwd: dir,
        },
      );
      pin(child.pid, 'system');
      await readyOrStop(child, /"msg":"gateway_ready"/);
      await waitForPort(port, 5_000);
      await waitReadyz(httpPort, 10_000);
      return { name, port, pid: child.pid, child, stop: () => child.stop(25_000) };
    }
  }
}

async function readyOrStop(child: Child, pattern: RegExp): Promise<void> {
  try {
    await child.waitForLine(pattern, READY_TIMEOUT_MS);
  } catch (err) {
    await child.stop(1_000);
    throw err;
  }
}

async function waitReadyz(port: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = '';
  while (Date.now() < deadline) {
    try {
      const res = await fetch(`http://127.0.0.1:${port}/readyz`, { signal: AbortSignal.timeout(1_000) });
      if (res.status === 200) return;
      last = `status ${res.status}`;
    } catch (err) {
      last = (err as Error).message;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`gateway /readyz not 200 within ${timeoutMs} ms (${last})`);
}
