import type { Logger } from '../logger.js';

export interface ClockWatchOptions {
  logger: Logger;
  /** Called when the wall clock jumped forward by more than `thresholdMs`. */
  onForwardJump: (deltaMs: number) => void;
  /** Wall clock (ms since epoch) and a monotonic clock (ms); injectable for tests. */
  wall?: () => number;
  monotonic?: () => number;
  /** Steps smaller than this are ordinary NTP corrections (default 60 s). */
  thresholdMs?: number;
  /** A wall clock before this is not set yet (default 2025-01-01 UTC). */
  minSaneMs?: number;
}

export interface ClockWatch {
  /** Compares the wall clock with the monotonic one since the last check. */
  check(): void;
  /** Whether the wall clock looks set; queue expiry waits while it does not. */
  readonly sane: boolean;
}

const DEFAULT_MIN_SANE_MS = Date.UTC(2025, 0, 1);

/**
 * Notices wall-clock steps (R17). A box without a battery-backed clock boots in 1970 or at the
 * time it last saved, queues messages with those timestamps, and steps its clock when NTP
 * answers; without this the step would make every queued message look older than its ttl and
 * the next expiry run would delete the queue. Timers are unaffected (Node schedules them on the
 * monotonic clock); queue order follows our own ids, never the clock.
 */
export function createClockWatch(options: ClockWatchOptions): ClockWatch {
  const wall = options.wall ?? Date.now;
  const monotonic = options.monotonic ?? (() => performance.now());
  const threshold = options.thresholdMs ?? 60_000;
  const minSane = options.minSaneMs ?? DEFAULT_MIN_SANE_MS;
  const { logger } = options;
  let offset = wall() - monotonic();
  let saneLogged = false;

  const sane = (): boolean => {
    const ok = wall() >= minSane;
    if (!ok && !saneLogged) {
      saneLogged = true;
      logger.warn({ now: new Date(wall()).toISOString() }, 'clock_not_set');
    } else if (ok) saneLogged = false;
    return ok;
  };

  return {
    check() {
      const next = wall() - monotonic();
      const delta = next - offset;
      offset = next;
      if (Math.abs(delta) <= threshold) return;
      logger.warn({ deltaMs: Math.round(delta), now: new Date(wall()).toISOString() }, 'clock_jumped');
      // Backwards, queued rows only live longer than their ttl: nothing is lost, nothing to do.
      if (delta > 0) options.onForwardJump(Math.round(delta));
    },
    get sane() {
      return sane();
    },
  };
}
