import { spawn, type ChildProcess } from 'node:child_process';
import { resolve } from 'node:path';

export const CLI = resolve('dist/cli.js');

export interface DaemonHandle {
  proc: ChildProcess;
  /** Parsed JSON log lines seen so far. */
  lines: Record<string, unknown>[];
  stderr: string[];
  /** Resolves with the gateway_ready line; rejects if the process exits first. */
  ready: Promise<Record<string, unknown>>;
  exited: Promise<number | null>;
  waitForLine(
    predicate: (line: Record<string, unknown>) => boolean,
    timeoutMs?: number,
  ): Promise<Record<string, unknown>>;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** Runs `iot-gateway run -c FILE` from dist/ as a child process, as systemd would. */
export function startDaemon(configFile: string, env: NodeJS.ProcessEnv = {}): DaemonHandle {
  const proc = spawn(process.execPath, [CLI, 'run', '-c', configFile], {
    env: { ...process.env, NOTIFY_SOCKET: '', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: Record<string, unknown>[] = [];
  const stderr: string[] = [];
  const waiters = new Set<{
    predicate: (l: Record<string, unknown>) => boolean;
    resolve: (l: Record<string, unknown>) => void;
  }>();
  let buffer = '';
  proc.stdout!.on('data', (chunk: Buffer) => {
    buffer += chunk.toString('utf8');
    let nl: number;
    while ((nl = buffer.indexOf('\n')) >= 0) {
      const text = buffer.slice(0, nl);
      buffer = buffer.slice(nl + 1);
      let line: Record<string, unknown>;
      try {
        line = JSON.parse(text) as Record<string, unknown>;
      } catch {
        line = { msg: 'non_json', text };
      }
      lines.push(line);
      for (const w of [...waiters]) {
        if (w.predicate(line)) {
          waiters.delete(w);
          w.resolve(line);
        }
      }
    }
  });
  proc.stderr!.on('data', (chunk: Buffer) => stderr.push(chunk.toString('utf8')));
  const exited = new Promise<number | null>((res) => proc.once('exit', (code) => res(code)));

  const waitForLine = (predicate: (line: Record<string, unknown>) => boolean, timeoutMs = 30_000) =>
    new Promise<Record<string, unknown>>((res, rej) => {
      const seen = lines.find(predicate);
      if (seen) return res(seen);
      const waiter = { predicate, resolve: res };
      waiters.add(waiter);
      const timer = setTimeout(() => {
        waiters.delete(waiter);
        rej(
          new Error(
            `timed out waiting for a log line; stderr: ${stderr.join('')}; last lines: ${JSON.stringify(lines.slice(-5))}`,
          ),
        );
      }, timeoutMs);
      void exited.then((code) => {
        if (waiters.delete(waiter)) {
          clearTimeout(timer);
          rej(
            new Error(
              `daemon exited with ${code} before the line appeared; stderr: ${stderr.join('')}; last lines: ${JSON.stringify(lines.slice(-5))}`,
            ),
          );
        }
      });
    });

  const ready = waitForLine((l) => l.msg === 'gateway_ready');
  ready.catch(() => {});
  return {
    proc,
    lines,
    stderr,
    ready,
    exited,
    waitForLine,
    async stop(signal = 'SIGTERM') {
      if (proc.exitCode !== null || proc.signalCode !== null) return proc.exitCode;
      proc.kill(signal);
      return exited;
    },
  };
}

/** Bound address of the first broker listener, from the gateway_ready line. */
export function brokerPort(ready: Record<string, unknown>): number {
  const listeners = ready.listeners as { port: number }[];
  return listeners[0]!.port;
}
