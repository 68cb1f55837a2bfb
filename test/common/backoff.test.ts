import { describe, expect, it } from 'vitest';
import { createBackoff, exponentialCeiling } from '../../src/common/backoff.js';

describe('backoff', () => {
  it('grows the ceiling by doubling up to the max, without overflowing', () => {
    expect([0, 1, 2, 3, 10, 2000].map((a) => exponentialCeiling(500, 60_000, a))).toEqual([
      500, 1000, 2000, 4000, 60_000, 60_000,
    ]);
    expect(exponentialCeiling(500, 60_000, -3)).toBe(500);
  });

  it('"equal" jitter never waits less than half the ceiling (replication retries)', () => {
    const low = createBackoff({ baseMs: 10_000, maxMs: 300_000, jitter: 'equal', random: () => 0 });
    const high = createBackoff({ baseMs: 10_000, maxMs: 300_000, jitter: 'equal', random: () => 0.9999 });
    expect([0, 1, 2, 5, 40].map((a) => low.delay(a))).toEqual([5000, 10_000, 20_000, 150_000, 150_000]);
    expect([0, 1, 2, 5, 40].map((a) => high.delay(a))).toEqual([10_000, 19_999, 39_998, 299_985, 299_985]);
  });
});
