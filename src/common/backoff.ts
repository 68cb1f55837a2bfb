/** How long to wait before reconnect attempt `attempt` (0-based). */
export interface Backoff {
  delay(attempt: number): number;
}

export interface BackoffOptions {
  /** ms; the ceiling of the first attempt's range */
  baseMs?: number;
  /** ms; no wait is longer than this */
  maxMs?: number;
  /**
   * `full`: a uniform draw in [0, ceiling] (the default); `equal`: in [ceiling/2, ceiling], for a
   * retry that must not come back at once (replication to PostgreSQL).
   */
  jitter?: 'full' | 'equal';
  /** [0, 1); injectable so tests can pin the draw */
  random?: () => number;
}

/** min(maxMs, baseMs·2^attempt): the exponential ceiling every backoff here grows by. */
export function exponentialCeiling(baseMs: number, maxMs: number, attempt: number): number {
  // 2^attempt overflows to Infinity long after it passed maxMs; min() keeps it finite.
  return Math.min(maxMs, baseMs * 2 ** Math.max(0, attempt));
}

/**
 * Exponential backoff with jitter ("full" by default: a uniform draw in [0, min(max, base·2^attempt)]).
 * The jitter spreads the reconnects of many gateways after a shared outage, so a cloud that
 * comes back is not hit by all of them in the same second.
 */
export function createBackoff(options: BackoffOptions = {}): Backoff {
  const baseMs = options.baseMs ?? 1000;
  const maxMs = options.maxMs ?? 60_000;
  const random = options.random ?? Math.random;
  const equal = options.jitter === 'equal';
  return {
    delay(attempt) {
      const ceiling = exponentialCeiling(baseMs, maxMs, attempt);
      return equal ? Math.round(ceiling / 2 + (random() * ceiling) / 2) : Math.floor(random() * ceiling);
    },
  };
}
