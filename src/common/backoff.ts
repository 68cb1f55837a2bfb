/** How long to wait before reconnect attempt `attempt` (0-based). */
export interface Backoff {
  delay(attempt: number): number;
}

export interface BackoffOptions {
  /** ms; the ceiling of the first attempt's range */
  baseMs?: number;
  /** ms; no wait is longer than this */
  maxMs?: number;
  /** [0, 1); injectable so tests can pin the draw */
  random?: () => number;
}

/**
 * Exponential backoff with "full jitter": a uniform draw in [0, min(max, base·2^attempt)].
 * The jitter spreads the reconnects of many gateways after a shared outage, so a cloud that
 * comes back is not hit by all of them in the same second.
 */
export function createBackoff(options: BackoffOptions = {}): Backoff {
  const baseMs = options.baseMs ?? 1000;
  const maxMs = options.maxMs ?? 60_000;
  const random = options.random ?? Math.random;
  return {
    delay(attempt) {
      // 2^attempt overflows to Infinity long after it passed maxMs; min() keeps it finite.
      const ceiling = Math.min(maxMs, baseMs * 2 ** Math.max(0, attempt));
      return Math.floor(random() * ceiling);
    },
  };
}
