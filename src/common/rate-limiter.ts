/** A token bucket: `take()` spends one token and returns 0, or returns the ms until one is due. */
export interface RateLimiter {
  take(): number;
  /** Like `take()` without spending: 0 when a token is there now, else the ms until one is. */
  peek(): number;
  /** Changes the rate live (config reload); 0 = unlimited. */
  setRate(perSecond: number): void;
}

export interface RateLimiterOptions {
  /** tokens per second; 0 = unlimited */
  rate: number;
  /** ms, monotonic enough for pacing; injectable for tests */
  now?: () => number;
}

/**
 * Paces deliveries to a cloud quota (e.g. AWS: 100 publishes/s per connection). The burst is
 * one second's worth (at least one token), so a drained backlog starts at the configured rate
 * instead of with a spike.
 */
export function createRateLimiter(options: RateLimiterOptions): RateLimiter {
  const now = options.now ?? (() => performance.now());
  let rate = 0;
  let burst = 1;
  let tokens = 1;
  let last = now();

  const configure = (perSecond: number) => {
    rate = Math.max(0, perSecond);
    burst = Math.max(1, rate);
    tokens = Math.min(tokens, burst);
  };
  configure(options.rate);
  tokens = burst;

  /** Adds the tokens earned since the last call; returns 0 or the ms until one token is due. */
  const refill = (): number => {
    if (rate === 0) return 0;
    const t = now();
    tokens = Math.min(burst, tokens + ((t - last) * rate) / 1000);
    last = t;
    if (tokens >= 1) return 0;
    return Math.max(1, Math.ceil(((1 - tokens) * 1000) / rate));
  };

  return {
    take() {
      const wait = refill();
      if (wait === 0 && rate > 0) tokens -= 1;
      return wait;
    },
    peek() {
      return refill();
    },
    setRate(perSecond) {
      configure(perSecond);
    },
  };
}
