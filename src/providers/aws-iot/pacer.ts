import { createRateLimiter } from '../../common/rate-limiter.js';

/** Hands out send slots at a fixed rate, first come first served, so pacing never reorders. */
export interface Pacer {
  /** Resolves when this caller may send; callers are served in call order. */
  slot(): Promise<void>;
  /** Rejects every waiting caller (the link went away). */
  cancel(err: Error): void;
}

export function createPacer(perSecond: number): Pacer {
  const limiter = createRateLimiter({ rate: perSecond });
  const queue: { resolve(): void; reject(err: Error): void }[] = [];
  let timer: NodeJS.Timeout | undefined;

  const pump = () => {
    timer = undefined;
    while (queue.length > 0) {
      const wait = limiter.take();
      if (wait > 0) {
        timer = setTimeout(pump, wait);
        return;
      }
      queue.shift()!.resolve();
    }
  };

  return {
    slot() {
      if (queue.length === 0 && limiter.take() === 0) return Promise.resolve();
      return new Promise((resolve, reject) => {
        queue.push({ resolve, reject });
        if (timer === undefined) timer = setTimeout(pump, limiter.peek());
      });
    },
    cancel(err) {
      clearTimeout(timer);
      timer = undefined;
      for (const w of queue.splice(0)) w.reject(err);
    },
  };
}
