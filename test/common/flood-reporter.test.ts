import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { createFloodReporter, latestEvent } from '../../src/common/flood-reporter.js';

describe('createFloodReporter', () => {
  beforeEach(() => {
    vi.useFakeTimers();
  });
  afterEach(() => {
    vi.useRealTimers();
  });

  const reporter = (options: { maxKeys?: number } = {}) => {
    const reports: { key: string; last: string; count: number }[] = [];
    const flood = createFloodReporter<string>({
      windowMs: 1000,
      fold: latestEvent,
      overflowKey: (_key, event) => `${event.split(':')[0]}|*`,
      report: (key, last, count) => reports.push({ key, last, count }),
      ...options,
    });
    return { flood, reports };
  };

  it('reports the first event at once and the rest of its window once, with the count', () => {
    const { flood, reports } = reporter();
    for (let i = 1; i <= 500; i++) flood.note('login|10.0.0.1', `login:${i}`);
    expect(reports).toEqual([{ key: 'login|10.0.0.1', last: 'login:1', count: 1 }]);
    vi.advanceTimersByTime(1000);
    expect(reports).toEqual([
      { key: 'login|10.0.0.1', last: 'login:1', count: 1 },
      { key: 'login|10.0.0.1', last: 'login:500', count: 499 },
    ]);
    // A quiet window later, the next event is reported at once again.
    vi.advanceTimersByTime(5000);
    flood.note('login|10.0.0.1', 'login:501');
    expect(reports.at(-1)).toEqual({ key: 'login|10.0.0.1', last: 'login:501', count: 1 });
  });

  it('keeps keys apart and counts n events per note', () => {
    const { flood, reports } = reporter();
    flood.note('a', 'a:1', 3);
    flood.note('b', 'b:1');
    flood.note('a', 'a:2', 4);
    vi.advanceTimersByTime(1000);
    expect(reports).toEqual([
      { key: 'a', last: 'a:1', count: 3 },
      { key: 'b', last: 'b:1', count: 1 },
      { key: 'a', last: 'a:2', count: 4 },
    ]);
  });

  it('bounds its keys: past the cap, new keys share the overflow key', () => {
    const { flood, reports } = reporter({ maxKeys: 2 });
    flood.note('login|1', 'login:1');
    flood.note('login|2', 'login:2');
    flood.note('login|3', 'login:3');
    flood.note('login|4', 'login:4');
    expect(reports.map((r) => r.key)).toEqual(['login|1', 'login|2', 'login|*']);
    vi.advanceTimersByTime(1000);
    expect(reports.at(-1)).toEqual({ key: 'login|*', last: 'login:4', count: 1 });
    // Idle keys are forgotten when room is needed.
    vi.advanceTimersByTime(1000);
    flood.note('login|5', 'login:5');
    expect(reports.at(-1)).toEqual({ key: 'login|5', last: 'login:5', count: 1 });
  });

  it('flush reports what is pending at once and cancels the timers', () => {
    const { flood, reports } = reporter();
    flood.note('q', 'q:1');
    flood.note('q', 'q:2');
    flood.note('q', 'q:3');
    flood.flush();
    expect(reports).toEqual([
      { key: 'q', last: 'q:1', count: 1 },
      { key: 'q', last: 'q:3', count: 2 },
    ]);
    vi.advanceTimersByTime(5000);
    expect(reports).toHaveLength(2);
  });
});
