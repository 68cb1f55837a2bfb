import { describe, expect, it } from 'vitest';
import { refillTokens, type TokenBucket } from '../../src/common/rate-limiter.js';

describe('refillTokens', () => {
  it('earns tokens at the rate up to the burst, and nothing when the clock steps back', () => {
    const bucket: TokenBucket = { tokens: 0, at: 1000 };
    refillTokens(bucket, 4, 10, 1500);
    expect(bucket).toEqual({ tokens: 2, at: 1500 });
    refillTokens(bucket, 4, 10, 900);
    expect(bucket).toEqual({ tokens: 2, at: 900 });
    refillTokens(bucket, 4, 10, 100_000);
    expect(bucket.tokens).toBe(10);
  });
});
