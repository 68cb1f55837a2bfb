import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';
import { freePort } from './ports.js';
import { startMosquitto, writeMosquittoConf, type MosquittoInstance } from './mosquitto.js';
import { benchDeviceId, writeMosquittoPasswords, type DeviceAuth } from './credentials.js';
import { pin, waitForPort, type Child, type ProcessGroup } from './process.js';

/**
 * g: the gateway; relay: plain aedes + mqtt.js (a); bridge: Mosquitto's bridge (b); aedes: bare
 * aedes (RSS reference); durable: the relay with one SQLite commit (synchronous=FULL) per turn
 * of the loop before each PUBACK, the latency floor of durable-before-PUBACK on this disk.
 */
export type SystemName = 'gateway' | 'relay' | 'bridge' | 'lossfree' | 'aedes' | 'durable';

export const SYSTEM_LABELS: Record<SystemName, string> = {
  gateway: 'gateway (g)',
  relay: 'aedes relay (a)',
  bridge: 'mosquitto bridge (b)',
  lossfree: 'mosquitto bridge, no drop (b0)',
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
  /** Password logins for the devices; undefined: anonymous devices (BENCH_AUTH=0). */
  readonly auth?: DeviceAuth;
  /** How many bench devices the systems must know (password file, gateway device list). */
  readonly authDevices: number;
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

/** How the systemd unit starts the daemon: node's options before the script, and the environment. */
export interface UnitLaunch {
  nodeArgs: string[];
  env: Record<string, string>;
}

/**
 * The gateway runs in the bench as its unit runs it in production: the node options of
 * `ExecStart=` and the `Environment=` settings of systemd/iot-gateway.service (the allocator
 * and heap settings that bound its memory), except the config path, which the bench sets.
 */
export function unitLaunch(root: string): UnitLaunch {
  const unit = readFileSync(join(root, 'systemd', 'iot-gateway.service'), 'utf8');
  const env: Record<string, string> = {};
  let nodeArgs: string[] = [];
  for (const line of unit.split('\n')) {
    const setting = /^(Environment|ExecStart)=(.*)$/.exec(line.trim());
    if (setting === null) continue;
    const value = setting[2]!;
    if (setting[1] === 'Environment') {
      const eq = value.indexOf('=');
      const key = value.slice(0, eq);
      if (eq > 0 && key !== 'IOT_GATEWAY_CONFIG') env[key] = value.slice(eq + 1);
    } else {
      const words = value.split(/\s+/);
      const script = words.findIndex((w) => w.endsWith('/dist/cli.js'));
      if (script < 1) throw new Error(`cannot read the node options of ExecStart=${value}`);
      nodeArgs = words.slice(1, script);
    }
  }
  return { nodeArgs, env };
}

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
      if (ctx.auth && name !== 'aedes') args.push(`--password=${ctx.auth.password}`);
      const child = ctx.group.spawn(name, process.execPath, [script, ...args]);
      pin(child.pid, 'system');
      await readyOrStop(child, /^ready$/);
      return { name, port, pid: child.pid, child, stop: () => child.stop() };
    }
    case 'bridge':
    case 'lossfree': {
      // Mosquitto's bridge with its defaults: only the connection and the topic are configured.
      // `lossfree` raises the queue so that nothing is dropped: what a user who cares about
      // loss would run (issue 11); every other setting stays at its default.
      const passwords = ctx.auth ? await writeMosquittoPasswords(dir, ctx.authDevices) : undefined;
      const conf = await writeMosquittoConf(dir, 'bridge', port, [
        ...(passwords ? [`password_file ${passwords}`] : []),
        ...(name === 'lossfree' ? ['max_queued_messages 1000000'] : []),
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
          ...(ctx.auth
            ? {
                devices: Array.from({ length: ctx.authDevices }, (_, i) => ({
                  id: benchDeviceId(i),
                  passwordHash: ctx.auth!.gatewayHash,
                  acl: { publish: ['devices/#'], subscribe: [] },
                })),
              }
            : {}),
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
      const launch = unitLaunch(ctx.root);
      const child = ctx.group.spawn(
        'gateway',
        process.execPath,
        [
          ...launch.nodeArgs,
          // BENCH_PROFILE=DIR writes a V8 CPU profile of the gateway there (open it in Chrome DevTools).
          ...(process.env.BENCH_PROFILE ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_PROFILE}`] : []),
          // BENCH_GATEWAY_NODE_ARGS: extra node options for the gateway only (e.g. --heapsnapshot-signal=SIGUSR2).
          ...(process.env.BENCH_GATEWAY_NODE_ARGS?.split(' ').filter((a) => a !== '') ?? []),
          gatewayCliPath(ctx.root),
          'run',
          '-c',
          confPath,
        ],
        { cwd: dir, env: launch.env },
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
