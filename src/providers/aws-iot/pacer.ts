import { createQuotaLimiter } from '../../common/quota-limiter.js';
import { refillTokens, type TokenBucket } from '../../common/rate-limiter.js';

/** Hands out send slots at a fixed rate, first come first served, so pacing never reorders. */
export interface Pacer {
  /** Resolves when this caller may send; callers are served in call order. */
  slot(): Promise<void>;
  /** Rejects every waiting caller (the link went away). */
  cancel(err: Error): void;
}

/**
 * Two rules together. No window of one second ever holds more than `perSecond` sends (a log of
 * the last `perSecond` send times: common/quota-limiter), whichever way the far side counts: a sliding window, fixed
 * windows or a bucket of a second's worth. And a token bucket (common/rate-limiter) with a small burst spreads them
 * out: a full second's worth sent at once leaves no room for the network to bunch packets
 * together, so a link that never exceeds the rate could still look as if it did.
 */
export function createPacer(
  perSecond: number,
  options: { burst?: number; onSlot?: (at: number) => void } = {},
): Pacer {
  const burst = options.burst ?? Math.max(1, Math.floor(perSecond / 10));
  const queue: { resolve(): void; reject(err: Error): void }[] = [];
  let timer: NodeJS.Timeout | undefined;
  const bucket: TokenBucket = { tokens: burst, at: performance.now() };
  const window = createQuotaLimiter({ rate: perSecond });

  /** Takes a slot and returns 0, or returns the ms until one is due. */
  const take = (): number => {
    const now = performance.now();
    refillTokens(bucket, perSecond, burst, now);
    const windowWait = window.peek();
    if (bucket.tokens >= 1 && windowWait === 0) {
      bucket.tokens -= 1;
      window.take();
      options.onSlot?.(now);
      return 0;
    }
    const bucketWait = bucket.tokens >= 1 ? 0 : ((1 - bucket.tokens) * 1000) / perSecond;
    return Math.max(1, Math.ceil(Math.max(bucketWait, windowWait)));
  };

  const pump = () => {
    timer = undefined;
    while (queue.length > 0) {
      const wait = take();
      if (wait > 0) {
        timer = setTimeout(pump, wait);
        return;
      }
      queue.shift()!.resolve();
    }
  };

  return {
    slot() {
      if (queue.length === 0 && take() === 0) return Promise.resolve();
      return new Promise((resolve, reject) => {
        queue.push({ resolve, reject });
        timer ??= setTimeout(pump, 1);
      });
    },
    cancel(err) {
      clearTimeout(timer);
      timer = undefined;
      for (const w of queue.splice(0)) w.reject(err);
    },
  };
}
