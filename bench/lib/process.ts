import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { cpus } from 'node:os';
import { readFile } from 'node:fs/promises';
import { connect } from 'node:net';

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** A child process the bench started; its last output lines are kept for error messages. */
export interface Child {
  readonly name: string;
  readonly pid: number;
  readonly process: ChildProcess;
  /** The last lines of stdout and stderr together. */
  tail(): string;
  /** Resolves with the first output line that matches, rejects after timeoutMs or on exit. */
  waitForLine(pattern: RegExp, timeoutMs: number): Promise<string>;
  exited(): boolean;
  /** SIGTERM, then SIGKILL after graceMs; resolves once the process is gone. */
  stop(graceMs?: number): Promise<void>;
}

/**
 * Every child the bench starts goes through one group, so a failure or Ctrl-C anywhere still
 * ends them all (`killAll` is synchronous for use in exit handlers).
 */
export interface ProcessGroup {
  spawn(
    name: string,
    command: string,
    args: readonly string[],
    opts?: { cwd?: string; env?: Readonly<Record<string, string>> },
  ): Child;
  killAll(): void;
  stopAll(): Promise<void>;
}

const TAIL_LINES = 40;

export function createProcessGroup(): ProcessGroup {
  const live = new Set<Child>();

  const spawnChild = (
    name: string,
    command: string,
    args: readonly string[],
    opts: { cwd?: string; env?: Readonly<Record<string, string>> } = {},
  ) => {
    const proc = spawn(command, args, {
      cwd: opts.cwd,
      env: opts.env === undefined ? process.env : { ...process.env, ...opts.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    if (proc.pid === undefined) throw new Error(`could not start ${name}: ${command}`);
    const lines: string[] = [];
    const waiters = new Set<{ pattern: RegExp; resolve: (line: string) => void }>();
    let exitedFlag = false;
    let exitInfo = '';
    const exitListeners = new Set<() => void>();

    // Reading every line keeps the pipe drained, so a chatty child never blocks on stdout.
    const onData = (buffered: { rest: string }) => (chunk: Buffer) => {
      const text = buffered.rest + chunk.toString('utf8');
      const parts = text.split('\n');
      buffered.rest = parts.pop() ?? '';
      for (const line of parts) {
        lines.push(line);
        if (lines.length > TAIL_LINES) lines.shift();
        for (const waiter of waiters) {
          if (waiter.pattern.test(line)) {
            waiters.delete(waiter);
            waiter.resolve(line);
          }
        }
      }
    };
    proc.stdout?.on('data', onData({ rest: '' }));
    proc.stderr?.on('data', onData({ rest: '' }));
    proc.on('error', (err) => lines.push(`spawn error: ${err.message}`));
    proc.on('exit', (code, signal) => {
      exitedFlag = true;
      exitInfo = `exit code ${code ?? '-'} signal ${signal ?? '-'}`;
      live.delete(child);
      for (const listener of exitListeners) listener();
    });

    const child: Child = {
      name,
      pid: proc.pid,
      process: proc,
      tail: () => lines.join('\n'),
      exited: () => exitedFlag,
      waitForLine(pattern, timeoutMs) {
        const seen = lines.find((l) => pattern.test(l));
        if (seen !== undefined) return Promise.resolve(seen);
        return new Promise<string>((resolve, reject) => {
          const waiter = {
            pattern,
            resolve: (line: string) => {
              cleanup();
              resolve(line);
            },
          };
          const onExit = () => {
            cleanup();
            reject(new Error(`${name} exited (${exitInfo}) before ${pattern}:\n${child.tail()}`));
          };
          const timer = setTimeout(() => {
            cleanup();
            reject(new Error(`${name}: no ${pattern} within ${timeoutMs} ms:\n${child.tail()}`));
          }, timeoutMs);
          const cleanup = () => {
            clearTimeout(timer);
            waiters.delete(waiter);
            exitListeners.delete(onExit);
          };
          if (exitedFlag) return onExit();
          waiters.add(waiter);
          exitListeners.add(onExit);
        });
      },
      async stop(graceMs = 10_000) {
        if (exitedFlag) return;
        const gone = new Promise<void>((resolve) => exitListeners.add(resolve));
        proc.kill('SIGTERM');
        const timer = setTimeout(() => proc.kill('SIGKILL'), graceMs);
        await gone;
        clearTimeout(timer);
      },
    };
    live.add(child);
    return child;
  };

  return {
    spawn: spawnChild,
    killAll() {
      for (const child of live) child.process.kill('SIGKILL');
    },
    async stopAll() {
      await Promise.all([...live].map((c) => c.stop(5_000)));
    },
  };
}

/** VmRSS of a process in bytes, from /proc/<pid>/status. */
export async function readRss(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const match = /^VmRSS:\s+(\d+)\s+kB/m.exec(status);
  if (!match) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(match[1]) * 1024;
}

/** VmHWM: the peak resident set of a process since it started, bytes. */
export async function readPeakRss(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const match = /^VmHWM:\s+(\d+)\s+kB/m.exec(status);
  if (!match) throw new Error(`no VmHWM for pid ${pid}`);
  return Number(match[1]) * 1024;
}

/** Resolves once a TCP connect to the port succeeds; rejects after timeoutMs. */
export async function waitForPort(port: number, timeoutMs: number, host = '127.0.0.1'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const socket = connect({ port, host });
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on ${host}:${port} after ${timeoutMs} ms`);
    await sleep(50);
  }
}

/** Polls until check() is true; rejects with `what` after timeoutMs. */
export async function waitUntil(
  check: () => boolean,
  timeoutMs: number,
  what: string,
  stepMs = 20,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(stepMs);
  }
}

/**
 * CPU pinning (BENCH_PIN, on by default with two or more CPUs): the system under test gets the
 * last CPU to itself, and everything else (this process with the devices and the upstream
 * subscriber, the upstream broker) shares the others. Every system gets the same one core, so a
 * load generator that happens to land on the system's core no longer decides the result; runs
 * repeat far better than unpinned ones on a two-core machine.
 */
export type PinRole = 'system' | 'load' | 'any';

/** Set by withPinning for one pass of a bench; otherwise BENCH_PIN decides. */
let pinningOverride: boolean | undefined;

export function pinningEnabled(): boolean {
  if (pinningOverride !== undefined) return pinningOverride && cpus().length >= 2;
  return process.env.BENCH_PIN !== '0' && cpus().length >= 2;
}

/**
 * Runs `fn` with pinning on or off (the throughput bench measures both: pinned figures repeat,
 * unpinned ones are what a user sees). Unpinned, this process (devices and subscriber) may use
 * every CPU too; afterwards it is put back where BENCH_PIN wants it.
 */
export async function withPinning<T>(enabled: boolean, fn: () => Promise<T>): Promise<T> {
  const before = pinningOverride;
  const wasEnabled = pinningEnabled();
  if (wasEnabled && !enabled) pin(process.pid, 'any');
  pinningOverride = enabled;
  if (enabled) pin(process.pid, 'load');
  try {
    return await fn();
  } finally {
    pinningOverride = before;
    if (pinningEnabled()) pin(process.pid, 'load');
    else if (enabled && cpus().length >= 2) {
      pinningOverride = true;
      pin(process.pid, 'any');
      pinningOverride = before;
    }
  }
}

export function pinDescription(): string {
  if (!pinningEnabled()) return 'CPUs not pinned';
  const n = cpus().length;
  return `system under test pinned to CPU ${n - 1}, load generator and upstream to CPU ${n === 2 ? '0' : `0-${n - 2}`}`;
}

/** Pins every thread of `pid` (threads started later inherit it); a no-op when pinning is off. */
export function pin(pid: number, role: PinRole): void {
  if (!pinningEnabled()) return;
  const n = cpus().length;
  const list =
    role === 'system' ? String(n - 1) : role === 'any' ? `0-${n - 1}` : n === 2 ? '0' : `0-${n - 2}`;
  try {
    execFileSync('taskset', ['-a', '-p', '-c', list, String(pid)], { stdio: 'ignore' });
  } catch (err) {
    throw new Error(
      `taskset could not pin pid ${pid} to CPU ${list} (${(err as Error).message}); set BENCH_PIN=0`,
    );
  }
}
