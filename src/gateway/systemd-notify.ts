import { createRequire } from 'node:module';
import { isAbsolute } from 'node:path';
import { errorMessage } from '../errors.js';
import type { Logger } from '../logger.js';

/**
 * sd_notify(3) over the AF_UNIX datagram socket named by `NOTIFY_SOCKET`, plus the watchdog.
 * Node has no AF_UNIX datagram sockets, so the `unix-dgram` addon sends the datagrams.
 */
export interface SystemdNotifier {
  /** True when `NOTIFY_SOCKET` names a socket we can send to. */
  readonly enabled: boolean;
  /** READY=1 (+ STATUS=): the broker listens and the store is open. */
  ready(status?: string): void;
  /** RELOADING=1 + MONOTONIC_USEC=<CLOCK_MONOTONIC µs> (systemd ≥ 253 wants the timestamp). */
  reloading(): void;
  /** READY=1 after a reload. */
  reloaded(): void;
  /** STOPPING=1. */
  stopping(): void;
  /** STATUS=, shown by `systemctl status`. */
  status(text: string): void;
  /**
   * Starts WATCHDOG=1 pings at half of WATCHDOG_USEC from a timer on the event loop (so a
   * blocked loop stops the pings and systemd restarts us); honours WATCHDOG_PID. An optional
   * health check runs before each ping: if it returns false the ping is skipped.
   */
  startWatchdog(isHealthy?: () => boolean): void;
  /** Stops the watchdog; later calls are no-ops. */
  close(): void;
}

export interface SystemdNotifierOptions {
  env?: NodeJS.ProcessEnv;
  logger: Logger;
  /** Our pid as WATCHDOG_PID is compared to; tests pass another to check the filter. */
  pid?: number;
}

/** Where `NOTIFY_SOCKET` points. */
export type NotifySocketAddress =
  | { kind: 'path'; path: string }
  | { kind: 'abstract'; name: string }
  | { kind: 'unsupported'; reason: string };

/** The subset of the `unix-dgram` socket we use (the package ships no types). */
interface UnixDgramSocket {
  on(event: 'error', listener: (err: Error) => void): void;
  send(buf: Buffer, offset: number, length: number, path: string, callback: (err?: Error) => void): void;
  close(): void;
}
interface UnixDgramModule {
  createSocket(type: 'unix_dgram'): UnixDgramSocket;
}

/** `sockaddr_un.sun_path` holds 108 bytes and the addon copies at most 107 of them. */
const MAX_SOCKET_PATH_BYTES = 107;

export function parseNotifySocket(value: string): NotifySocketAddress {
  if (value.startsWith('@')) return { kind: 'abstract', name: value.slice(1) };
  if (!isAbsolute(value)) return { kind: 'unsupported', reason: 'not an absolute path' };
  if (Buffer.byteLength(value) > MAX_SOCKET_PATH_BYTES)
    return { kind: 'unsupported', reason: 'path too long' };
  return { kind: 'path', path: value };
}

/** Parses WATCHDOG_USEC; undefined when absent or not a positive integer. */
export function parseWatchdogUsec(value: string | undefined): number | undefined {
  if (value === undefined || !/^\d+$/.test(value)) return undefined;
  const usec = Number(value);
  return usec > 0 && Number.isSafeInteger(usec) ? usec : undefined;
}

/** CLOCK_MONOTONIC in µs: libuv's hrtime reads CLOCK_MONOTONIC on Linux, as systemd does. */
export function monotonicUsec(): bigint {
  return process.hrtime.bigint() / 1000n;
}

/** A STATUS= value is one line of the datagram; a newline would start a bogus assignment. */
function oneLine(text: string): string {
  return text.replace(/[\r\n]+/g, ' ');
}

export function createSystemdNotifier(options: SystemdNotifierOptions): SystemdNotifier {
  const env = options.env ?? process.env;
  const pid = options.pid ?? process.pid;
  // Callers may already pass a child with a component; a second one would repeat the key.
  const logger =
    options.logger.bindings().component === undefined
      ? options.logger.child({ component: 'systemd' })
      : options.logger;
  const socketValue = env.NOTIFY_SOCKET;

  let socketPath: string | undefined;
  if (socketValue !== undefined && socketValue !== '') {
    const address = parseNotifySocket(socketValue);
    if (address.kind === 'path') {
      socketPath = address.path;
    } else {
      // The addon copies the address with strncpy and passes sizeof(sockaddr_un) as its
      // length, so it can neither start a name with NUL nor give its exact length: abstract
      // sockets are out of reach. systemd itself hands services a path (/run/systemd/notify).
      const reason = address.kind === 'abstract' ? 'abstract sockets are not supported' : address.reason;
      logger.warn({ notifySocket: socketValue, reason }, 'systemd_notify_socket_unsupported');
    }
  }

  let dgram: UnixDgramModule | undefined;
  let warned = false;
  let closed = false;
  let watchdogTimer: NodeJS.Timeout | undefined;
  let lastPingSkipped = false;

  function warnOnce(err: unknown, message: string): void {
    if (warned) return;
    warned = true;
    logger.warn({ err: errorMessage(err), notifySocket: socketPath, message }, 'systemd_notify_failed');
  }

  /**
   * One short-lived socket per datagram: the addon's socket holds a libuv poll handle that
   * would keep the process alive and cannot be unref'd, and a datagram every few seconds
   * costs nothing to open. sendmsg is synchronous, so messages arrive in call order.
   */
  function send(message: string): void {
    if (socketPath === undefined || closed) return;
    let socket: UnixDgramSocket | undefined;
    try {
      dgram ??= createRequire(import.meta.url)('unix-dgram') as UnixDgramModule;
      socket = dgram.createSocket('unix_dgram');
      socket.on('error', (err) => warnOnce(err, message));
      const buf = Buffer.from(message);
      socket.send(buf, 0, buf.length, socketPath, (err) => {
        if (err) warnOnce(err, message);
      });
    } catch (err) {
      warnOnce(err, message);
    } finally {
      try {
        socket?.close();
      } catch (err) {
        warnOnce(err, message);
      }
    }
  }

  function stopWatchdog(): void {
    if (watchdogTimer !== undefined) clearInterval(watchdogTimer);
    watchdogTimer = undefined;
  }

  return {
    enabled: socketPath !== undefined,
    ready(status) {
      send(status === undefined ? 'READY=1' : `READY=1\nSTATUS=${oneLine(status)}`);
    },
    reloading() {
      send(`RELOADING=1\nMONOTONIC_USEC=${monotonicUsec()}`);
    },
    reloaded() {
      send('READY=1');
    },
    stopping() {
      send('STOPPING=1');
    },
    status(text) {
      send(`STATUS=${oneLine(text)}`);
    },
    startWatchdog(isHealthy) {
      if (socketPath === undefined || closed) return;
      const usec = parseWatchdogUsec(env.WATCHDOG_USEC);
      if (usec === undefined) return;
      // WATCHDOG_PID names the process systemd watches; a child that inherited the
      // environment must not ping on the main process's behalf.
      const watchdogPid = env.WATCHDOG_PID;
      if (watchdogPid !== undefined && watchdogPid !== '' && watchdogPid !== String(pid)) return;
      stopWatchdog();
      const intervalMs = Math.max(1, Math.floor(usec / 2000));
      const tick = (): void => {
        let healthy = true;
        if (isHealthy) {
          try {
            healthy = isHealthy();
          } catch (err) {
            healthy = false;
            logger.warn({ err: errorMessage(err) }, 'systemd_watchdog_check_failed');
          }
        }
        if (healthy) {
          if (lastPingSkipped) logger.info('systemd_watchdog_resumed');
          lastPingSkipped = false;
          send('WATCHDOG=1');
        } else if (!lastPingSkipped) {
          // Logged on the transition only: the check runs every few seconds.
          lastPingSkipped = true;
          logger.warn({ watchdogUsec: usec }, 'systemd_watchdog_ping_skipped');
        }
      };
      // A plain timer on the event loop, on purpose: if the loop blocks, pings stop.
      watchdogTimer = setInterval(tick, intervalMs);
      watchdogTimer.unref();
      logger.debug({ intervalMs }, 'systemd_watchdog_started');
      tick();
    },
    close() {
      stopWatchdog();
      closed = true;
    },
  };
}
