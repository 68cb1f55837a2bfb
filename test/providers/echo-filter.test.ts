import { describe, expect, it } from 'vitest';
import { createEchoFilter } from '../../src/providers/mqtt/echo-filter.js';

const b = (s: string) => Buffer.from(s);

describe('echo filter (MQTT 3.1.1 loop guard)', () => {
  it('cancels one arrival per publication: same topic and payload only', () => {
    const f = createEchoFilter({ ttlMs: 1000, maxEntries: 100 });
    f.sent('t/a', b('x'));
    f.sent('t/a', b('x'));
    expect(f.isEcho('t/b', b('x'))).toBe(false);
    expect(f.isEcho('t/a', b('y'))).toBe(false);
    expect(f.isEcho('t/a', b('x'))).toBe(true);
    expect(f.isEcho('t/a', b('x'))).toBe(true);
    // A third copy is somebody else's message.
    expect(f.isEcho('t/a', b('x'))).toBe(false);
    expect(f.size).toBe(0);
  });

  it('forgets publications after the ttl', () => {
    let t = 0;
    const f = createEchoFilter({ ttlMs: 1000, maxEntries: 100, now: () => t });
    f.sent('t/a', b('x'));
    t = 999;
    f.sent('t/b', b('y'));
    t = 1001;
    expect(f.isEcho('t/a', b('x'))).toBe(false);
    expect(f.isEcho('t/b', b('y'))).toBe(true);
    expect({ matched: f.matched, unmatched: f.unmatched }).toEqual({ matched: 1, unmatched: 1 });
  });

  it('stays within maxEntries, forgetting the oldest first', () => {
    const f = createEchoFilter({ ttlMs: 60_000, maxEntries: 3 });
    for (const p of ['1', '2', '3', '4']) f.sent('t', b(p));
    expect(f.size).toBe(3);
    expect(f.isEcho('t', b('1'))).toBe(false);
    expect(f.isEcho('t', b('4'))).toBe(true);
  });

  it('tells payloads of equal length and digest prefix apart (no false drop of a changed value)', () => {
    const f = createEchoFilter({ ttlMs: 60_000, maxEntries: 10 });
    const big = Buffer.alloc(1 << 20, 7);
    f.sent('t', big);
    const changed = Buffer.from(big);
    changed[changed.length - 1] = 8;
    expect(f.isEcho('t', changed)).toBe(false);
    expect(f.isEcho('t', big)).toBe(true);
  });
});
