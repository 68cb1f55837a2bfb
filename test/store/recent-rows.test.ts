import { describe, expect, it } from 'vitest';
import { createRecentRows, type CachedRow } from '../../src/store/recent-rows.js';

const Q = 'q';

function row(id: number, size = 1 + (id % 7)): CachedRow {
  return {
    message: {
      id,
      deviceId: 'd',
      topic: 't',
      payload: Buffer.alloc(size),
      qos: 1,
      retain: false,
      enqueuedAt: 0,
      attempts: 0,
    },
    expiresAt: null,
  };
}

describe('recent rows', () => {
  it('removes acked ids (prefixes, holes, repeats, unknown ids) exactly like a filter would', () => {
    let seed = 11;
    const random = () => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    const cache = createRecentRows({ floor: 0, maxRows: 1_000_000, maxBytes: 1e12 });
    let model: number[] = [];
    let next = 1;
    for (let step = 0; step < 2000; step++) {
      const adds = Math.floor(random() * 20);
      for (let i = 0; i < adds; i++) {
        cache.add(Q, row(next));
        model.push(next++);
      }
      const ids: number[] = [];
      if (random() < 0.5) ids.push(...model.slice(0, Math.floor(random() * 10))); // oldest first
      for (let i = 0; i < 3; i++) if (model.length > 0) ids.push(model[Math.floor(random() * model.length)]!);
      ids.push(next + 5, ids[0] ?? 0); // unknown and repeated
      if (random() < 0.1) {
        const upTo = model[Math.floor(random() * model.length)] ?? 0;
        cache.removeUpTo(Q, upTo);
        model = model.filter((id) => id > upTo);
      } else {
        // span() may only name a range whose rows are exactly the acked ids.
        const span = cache.span(Q, ids);
        if (span !== undefined) {
          const inRange = model.filter((id) => id >= span.lo && id <= span.hi);
          expect(inRange).toEqual([...new Set(ids)].sort((a, b) => a - b));
        }
        cache.remove(Q, ids);
        const gone = new Set(ids);
        model = model.filter((id) => !gone.has(id));
      }
      const read = cache.read(Q, 0, 1_000_000, 0)!;
      expect(read.map((m) => m.id)).toEqual(model);
    }
  });

  it('names the range of a run of consecutive acked rows, and nothing else', () => {
    const cache = createRecentRows({ floor: 10, maxRows: 1000, maxBytes: 1e12 });
    for (const id of [11, 12, 13, 15, 16, 20]) cache.add(Q, row(id, id));
    // rows and bytes: what the range holds, each repeated id once (payloads of `id` bytes here).
    expect(cache.span(Q, [13, 11, 12, 12])).toEqual({ lo: 11, hi: 13, rows: 3, bytes: 36 });
    expect(cache.span(Q, [13, 15, 16])).toEqual({ lo: 13, hi: 16, rows: 3, bytes: 44 }); // 14 is no row of this queue
    expect(cache.span(Q, [11, 13])).toBeUndefined(); // 12 is not acked
    expect(cache.span(Q, [16, 21])).toBeUndefined(); // 21 is unknown
    expect(cache.span(Q, [10, 11])).toBeUndefined(); // at the floor: SQLite may hold rows the cache does not
    expect(cache.span('other', [11])).toBeUndefined();
  });

  it('keeps its byte count exact, so eviction by bytes keeps working', () => {
    const cache = createRecentRows({ floor: 0, maxRows: 1000, maxBytes: 10 });
    for (let id = 1; id <= 10; id++) cache.add(Q, row(id, 1));
    cache.remove(Q, [1, 2, 5]);
    cache.removeUpTo(Q, 3);
    // 4, 6..10 remain (6 bytes): four more fit, the fifth evicts the oldest.
    for (let id = 11; id <= 14; id++) cache.add(Q, row(id, 1));
    expect(cache.read(Q, 0, 100, 0)!.map((m) => m.id)).toEqual([4, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
    cache.add(Q, row(15, 1));
    expect(cache.read(Q, 0, 100, 0)).toBeUndefined(); // below the floor now
    expect(cache.read(Q, 4, 100, 0)!.map((m) => m.id)).toEqual([6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
  });
});
