import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  createSystemdNotifier,
  parseNotifySocket,
  parseWatchdogUsec,
  type SystemdNotifier,
} from '../../src/gateway/systemd-notify.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';

/** The part of `unix-dgram` the test uses to play systemd's side of NOTIFY_SOCKET. */
interface UnixDgramSocket {
  on(event: 'message', listener: (buf: Buffer) => void): void;
  on(event: 'error', listener: (err: Error) => void): void;
  bind(path: string): void;
  close(): void;
}
const unixDgram = createRequire(import.meta.url)('unix-dgram') as {
  createSocket(type: 'unix_dgram'): UnixDgramSocket;
};

const CHILD = fileURLToPath(new URL('../fixtures/watchdog-child.mjs', import.meta.url));
const COMPILED = fileURLToPath(new URL('../../dist/gateway/systemd-notify.js', import.meta.url));

let dir: string;
let socketPath: string;
let socket: UnixDgramSocket;
let messages: string[];
let logLines: LogRecord[];
let socketErrors: Error[];
const notifiers: SystemdNotifier[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'iotgw-notify-'));
  socketPath = join(dir, 'notify.sock');
  messages = [];
  logLines = [];
  socket = unixDgram.createSocket('unix_dgram');
  socket.on('message', (buf) => messages.push(buf.toString('utf8')));
  socketErrors = [];
  socket.on('error', (err) => socketErrors.push(err));
  socket.bind(socketPath);
  expect(socketErrors).toEqual([]);
});

afterEach(() => {
  for (const n of notifiers.splice(0)) n.close();
  socket.close();
  expect(socketErrors).toEqual([]);
  rmSync(dir, { recursive: true, force: true });
});

function notifier(env: NodeJS.ProcessEnv, pid?: number): SystemdNotifier {
  const logger = createCaptureLogger(logLines, { gatewayId: 'gw-test' });
  const n = createSystemdNotifier({ env, logger, ...(pid === undefined ? {} : { pid }) });
  notifiers.push(n);
  return n;
}

function logged(msg: string): Array<Record<string, unknown>> {
  return logLines.filter((l) => l.msg === msg);
}

async function waitFor(what: string, predicate: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!predicate()) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

let flushes = 0;
/**
 * Waits until everything sent so far has been received: datagrams reach the receive queue
 * synchronously and in send order, so once a marker sent now arrives, so has all before it.
 */
async function flush(): Promise<void> {
  flushes += 1;
  const marker = `STATUS=flush-${flushes}`;
  notifier({ NOTIFY_SOCKET: socketPath }).status(marker.slice('STATUS='.length));
  await waitFor(marker, () => messages.includes(marker));
}

const pings = (list: string[] = messages): number => list.filter((m) => m === 'WATCHDOG=1').length;

/** Messages strictly between two STATUS= markers. */
function between(list: string[], from: string, to: string): string[] {
  const start = list.indexOf(`STATUS=${from}`);
  const end = list.indexOf(`STATUS=${to}`);
  expect(start, `marker ${from}`).toBeGreaterThanOrEqual(0);
  expect(end, `marker ${to}`).toBeGreaterThan(start);
  return list.slice(start + 1, end);
}

describe('parsing the environment', () => {
  it('tells paths, abstract names and junk apart', () => {
    expect(parseNotifySocket('/run/systemd/notify')).toEqual({ kind: 'path', path: '/run/systemd/notify' });
    expect(parseNotifySocket('@/org/freedesktop/systemd1/notify')).toEqual({
      kind: 'abstract',
      name: '/org/freedesktop/systemd1/notify',
    });
    expect(parseNotifySocket('relative/notify').kind).toBe('unsupported');
    expect(parseNotifySocket(`/${'x'.repeat(120)}`).kind).toBe('unsupported');
  });

  it('accepts only positive integer WATCHDOG_USEC', () => {
    expect(parseWatchdogUsec('30000000')).toBe(30_000_000);
    expect(parseWatchdogUsec(undefined)).toBeUndefined();
    expect(parseWatchdogUsec('0')).toBeUndefined();
    expect(parseWatchdogUsec('-5')).toBeUndefined();
    expect(parseWatchdogUsec('30s')).toBeUndefined();
  });
});

describe('sd_notify messages', () => {
  it('sends READY, STATUS, RELOADING with MONOTONIC_USEC, READY after reload and STOPPING in order', async () => {
    const n = notifier({ NOTIFY_SOCKET: socketPath });
    expect(n.enabled).toBe(true);
    const before = process.hrtime.bigint() / 1000n;
    n.ready('listening on 1 listener');
    n.status('two\nlines');
    n.reloading();
    n.reloaded();
    n.stopping();
    const after = process.hrtime.bigint() / 1000n;
    await waitFor('5 messages', () => messages.length >= 5);

    expect(messages[0]).toBe('READY=1\nSTATUS=listening on 1 listener');
    // A newline inside STATUS= would start a second (bogus) assignment.
    expect(messages[1]).toBe('STATUS=two lines');
    const reload = messages[2]!.split('\n');
    expect(reload[0]).toBe('RELOADING=1');
    const match = /^MONOTONIC_USEC=(\d+)$/.exec(reload[1] ?? '');
    expect(match, reload[1]).not.toBeNull();
    const usec = BigInt(match![1]!);
    expect(usec).toBeGreaterThanOrEqual(before);
    expect(usec).toBeLessThanOrEqual(after);
    // Units check against an independent clock: CLOCK_MONOTONIC in µs is close to the
    // uptime in seconds × 10⁶ (they differ only by time spent suspended); ns or ms would be
    // off by a factor of 1000.
    const uptimeSec = Number(readFileSync('/proc/uptime', 'utf8').split(' ')[0]);
    expect(Math.abs(Number(usec) / 1e6 - uptimeSec)).toBeLessThan(60);
    expect(messages[3]).toBe('READY=1');
    expect(messages[4]).toBe('STOPPING=1');
    expect(messages).toHaveLength(5);
  });

  it('is a silent no-op without NOTIFY_SOCKET', () => {
    const n = notifier({ WATCHDOG_USEC: '200000' });
    expect(n.enabled).toBe(false);
    let checks = 0;
    n.ready('x');
    n.reloading();
    n.startWatchdog(() => {
      checks += 1;
      return true;
    });
    n.stopping();
    expect(checks).toBe(0);
    expect(logLines.filter((l) => l.level === 'warn')).toEqual([]);
  });

  it('never throws when the socket is gone, and warns once', () => {
    const n = notifier({ NOTIFY_SOCKET: join(dir, 'missing.sock') });
    expect(n.enabled).toBe(true);
    expect(() => {
      n.ready();
      n.status('still here');
      n.stopping();
    }).not.toThrow();
    expect(logged('systemd_notify_failed')).toHaveLength(1);
  });

  it('reports an abstract NOTIFY_SOCKET as unsupported instead of failing', () => {
    const n = notifier({ NOTIFY_SOCKET: '@iot-gateway-test' });
    expect(n.enabled).toBe(false);
    expect(() => n.ready()).not.toThrow();
    expect(logged('systemd_notify_socket_unsupported')).toHaveLength(1);
  });
});

describe('watchdog', () => {
  it('pings at half of WATCHDOG_USEC, once per health check', async () => {
    const n = notifier({ NOTIFY_SOCKET: socketPath, WATCHDOG_USEC: '400000' });
    const checkedAt: number[] = [];
    n.startWatchdog(() => {
      checkedAt.push(performance.now());
      return true;
    });
    await waitFor('7 pings', () => pings() >= 7);
    n.close();
    await flush();
    expect(pings()).toBe(checkedAt.length);
    const gaps = checkedAt.slice(1).map((t, i) => t - checkedAt[i]!);
    const median = [...gaps].sort((a, b) => a - b)[Math.floor(gaps.length / 2)]!;
    // Half of 400 ms is 200 ms; timers never fire early, and pinging at the full
    // WATCHDOG_USEC (400 ms) would miss systemd's deadline whenever one ping is late.
    expect(median).toBeGreaterThanOrEqual(190);
    expect(median).toBeLessThan(350);
  });

  it('skips pings while the health check fails and resumes after', async () => {
    const n = notifier({ NOTIFY_SOCKET: socketPath, WATCHDOG_USEC: '100000' });
    let healthy = true;
    let failedChecks = 0;
    n.startWatchdog(() => {
      if (!healthy) failedChecks += 1;
      return healthy;
    });
    await waitFor('2 pings', () => pings() >= 2);
    healthy = false;
    n.status('unhealthy');
    await waitFor('3 failed checks', () => failedChecks >= 3);
    n.status('healthy');
    healthy = true;
    await waitFor('2 more pings', () => pings(messages.slice(messages.indexOf('STATUS=healthy'))) >= 2);

    expect(between(messages, 'unhealthy', 'healthy')).toEqual([]);
    expect(logged('systemd_watchdog_ping_skipped')).toHaveLength(1);
    expect(logged('systemd_watchdog_resumed')).toHaveLength(1);
  });

  it('treats a throwing health check as unhealthy', async () => {
    const n = notifier({ NOTIFY_SOCKET: socketPath, WATCHDOG_USEC: '100000' });
    let calls = 0;
    n.startWatchdog(() => {
      calls += 1;
      throw new Error('boom');
    });
    await waitFor('3 checks', () => calls >= 3);
    expect(pings()).toBe(0);
    expect(logged('systemd_watchdog_check_failed').length).toBeGreaterThanOrEqual(3);
  });

  it('does not ping for another WATCHDOG_PID, nor without WATCHDOG_USEC', async () => {
    let checks = 0;
    const check = (): boolean => {
      checks += 1;
      return true;
    };
    notifier(
      { NOTIFY_SOCKET: socketPath, WATCHDOG_USEC: '100000', WATCHDOG_PID: '4241' },
      4242,
    ).startWatchdog(check);
    notifier({ NOTIFY_SOCKET: socketPath }).startWatchdog(check);
    const own = notifier({ NOTIFY_SOCKET: socketPath, WATCHDOG_USEC: '100000', WATCHDOG_PID: '4242' }, 4242);
    let ownChecks = 0;
    own.startWatchdog(() => {
      ownChecks += 1;
      return true;
    });
    // The matching notifier's pings show that time passed for the others to have pinged too.
    await waitFor('4 checks of the matching notifier', () => ownChecks >= 4);
    own.close();
    await flush();
    expect(checks).toBe(0);
    expect(pings()).toBe(ownChecks);
  });

  it('stops pinging after close()', async () => {
    const n = notifier({ NOTIFY_SOCKET: socketPath, WATCHDOG_USEC: '100000' });
    let checks = 0;
    n.startWatchdog(() => {
      checks += 1;
      return true;
    });
    await waitFor('2 pings', () => pings() >= 2);
    n.close();
    await flush();
    const atClose = pings();
    const control = notifier({ NOTIFY_SOCKET: socketPath, WATCHDOG_USEC: '100000' });
    let controlChecks = 0;
    control.startWatchdog(() => {
      controlChecks += 1;
      return true;
    });
    await waitFor('3 control checks', () => controlChecks >= 3);
    control.close();
    await flush();
    expect(checks).toBe(atClose);
    expect(pings()).toBe(atClose + controlChecks);
  });
});

describe('watchdog in a child process (compiled dist/)', () => {
  function runChild(env: NodeJS.ProcessEnv): Promise<{ code: number | null; stderr: string }> {
    return new Promise((resolve, reject) => {
      const child = spawn(process.execPath, [CHILD], {
        env: { ...process.env, ...env },
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new Error(`child did not exit: ${stderr}`));
      }, 20_000);
      child.on('error', reject);
      child.on('exit', (code) => {
        clearTimeout(timer);
        resolve({ code, stderr });
      });
    });
  }

  it('needs the compiled notifier', () => {
    // `npm test` builds dist/ first; run `npx tsc -p tsconfig.build.json` when running vitest alone.
    expect(readFileSync(COMPILED, 'utf8')).toContain('WATCHDOG=1');
  });

  it('stops pinging while its event loop is blocked and resumes after', async () => {
    const intervalMs = 100;
    const { code, stderr } = await runChild({
      NOTIFY_SOCKET: socketPath,
      WATCHDOG_USEC: String(intervalMs * 2000),
      BLOCK_MS: String(intervalMs * 3),
      // In case the test runner itself runs under a systemd watchdog.
      WATCHDOG_PID: '',
    });
    expect(stderr).toBe('');
    expect(code).toBe(0);
    await waitFor('done marker', () => messages.includes('STATUS=done'));

    const beforeBlock = messages.slice(0, messages.indexOf('STATUS=blocking'));
    expect(pings(beforeBlock)).toBeGreaterThanOrEqual(2);
    // Three intervals' worth of pings were due during the busy loop; none was sent.
    expect(between(messages, 'blocking', 'unblocked')).toEqual([]);
    expect(pings(between(messages, 'unblocked', 'done'))).toBeGreaterThanOrEqual(2);
  });

  it('lets the process exit without close()', async () => {
    const { code, stderr } = await runChild({
      NOTIFY_SOCKET: socketPath,
      WATCHDOG_USEC: '200000',
      MODE: 'no-close',
    });
    expect(stderr).toBe('');
    expect(code).toBe(0);
    await waitFor('end marker', () => messages.includes('STATUS=end-of-script'));
    expect(messages).toContain('READY=1\nSTATUS=up');
    expect(pings()).toBeGreaterThanOrEqual(1);
  });
});
