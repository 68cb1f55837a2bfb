import type { RateLimiter } from './rate-limiter.js';

export interface QuotaLimiterOptions {
  /** takes per second; 0 = unlimited */
  rate: number;
  /** ms, monotonic; injectable for tests */
  now?: () => number;
}

/** The most takes remembered: a rate above this is paced as this many per its window. */
const MAX_SLOTS = 10_000;

/**
 * A cloud's hard quota (AWS IoT: 100 publishes per second per connection): never more than
 * `rate` takes in any one-second window, and all of them when there is work. A token bucket
 * with a burst lets twice the rate through the first second; this keeps the time of the last
 * `rate` takes and allows one more only when the oldest of them is a second old. A rate below
 * one per second allows one take per 1/rate seconds.
 */
export function createQuotaLimiter(options: QuotaLimiterOptions): RateLimiter {
  const now = options.now ?? (() => performance.now());
  let slots = 0;
  let windowMs = 1000;
  /** Ring of the last `slots` take times; `next` is the oldest. */
  let times: number[] = [];
  let next = 0;

  let current = -1;
  const configure = (perSecond: number) => {
    const rate = Math.max(0, perSecond);
    // The same rate again (every reconnect reads the provider's limits) keeps the history.
    if (rate === current) return;
    current = rate;
    slots = rate === 0 ? 0 : Math.min(MAX_SLOTS, Math.max(1, Math.floor(rate)));
    windowMs = rate === 0 ? 0 : (1000 * slots) / rate;
    times = [];
    next = 0;
  };
  configure(options.rate);

  const wait = (): number => {
    if (slots === 0 || times.length < slots) return 0;
    const due = times[next]! + windowMs - now();
    return due <= 0 ? 0 : Math.ceil(due);
  };

  return {
    take() {
      const ms = wait();
      if (ms > 0 || slots === 0) return ms;
      const t = now();
      if (times.length < slots) times.push(t);
      else {
        times[next] = t;
        next = (next + 1) % slots;
      }
      return 0;
    },
    peek: wait,
    setRate(perSecond) {
      configure(perSecond);
    },
  };
}
