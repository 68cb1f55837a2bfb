/** Hands out send slots at a fixed rate, first come first served, so pacing never reorders. */
export interface Pacer {
  /** Resolves when this caller may send; callers are served in call order. */
  slot(): Promise<void>;
  /** Rejects every waiting caller (the link went away). */
  cancel(err: Error): void;
}

/**
 * A token bucket with a small burst. The endpoint counts a second's worth (AWS: 100/s per
 * connection); sending a full second's burst at once leaves no room for the network to bunch
 * packets together, so a link that never exceeds the rate could still look like it does. With
 * `burst` well below the rate the far side keeps `rate - burst` of slack.
 */
export function createPacer(perSecond: number, burst = Math.max(1, Math.floor(perSecond / 10))): Pacer {
  const queue: { resolve(): void; reject(err: Error): void }[] = [];
  let tokens = burst;
  let last = performance.now();
  let timer: NodeJS.Timeout | undefined;

  /** Spends a token and returns 0, or returns the ms until one is due. */
  const take = (): number => {
    const now = performance.now();
    tokens = Math.min(burst, tokens + ((now - last) * perSecond) / 1000);
    last = now;
    if (tokens >= 1) {
      tokens -= 1;
      return 0;
    }
    return Math.max(1, Math.ceil(((1 - tokens) * 1000) / perSecond));
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
