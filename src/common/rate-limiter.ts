/** A token bucket's state: plain data, so a table of many buckets (one per source) stays small. */
export interface TokenBucket {
  tokens: number;
  /** ms of the last refill */
  at: number;
}

/** Adds the tokens earned since `bucket.at`, up to `burst`. A clock that steps back earns nothing. */
export function refillTokens(bucket: TokenBucket, perSecond: number, burst: number, t: number): void {
  const elapsed = Math.max(0, t - bucket.at);
  bucket.tokens = Math.min(burst, bucket.tokens + (elapsed * perSecond) / 1000);
  bucket.at = t;
}

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
  const bucket: TokenBucket = { tokens: 1, at: now() };

  const configure = (perSecond: number) => {
    rate = Math.max(0, perSecond);
    burst = Math.max(1, rate);
    bucket.tokens = Math.min(bucket.tokens, burst);
  };
  configure(options.rate);
  bucket.tokens = burst;

  /** Adds the tokens earned since the last call; returns 0 or the ms until one token is due. */
  const refill = (): number => {
    if (rate === 0) return 0;
    refillTokens(bucket, rate, burst, now());
    if (bucket.tokens >= 1) return 0;
    return Math.max(1, Math.ceil(((1 - bucket.tokens) * 1000) / rate));
  };

  return {
    take() {
      const wait = refill();
      if (wait === 0 && rate > 0) bucket.tokens -= 1;
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
