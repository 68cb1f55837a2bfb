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
    // 4, 6..10 remain (6 bytes): four more fit.
    for (let id = 11; id <= 14; id++) cache.add(Q, row(id, 1));
    expect(cache.read(Q, 0, 100, 0)!.map((m) => m.id)).toEqual([4, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
    // Over the bound, the oldest tenth goes: down to 9 bytes, 4 and 6.
    cache.add(Q, row(15, 1));
    expect(cache.read(Q, 4, 100, 0)).toBeUndefined(); // below the floor now
    expect(cache.read(Q, 6, 100, 0)!.map((m) => m.id)).toEqual([7, 8, 9, 10, 11, 12, 13, 14, 15]);
  });

  it('learns the rows a read of SQLite found below the floor, and names ranges of them', () => {
    const cache = createRecentRows({ floor: 0, maxRows: 3, maxBytes: 1e12, maxKnown: 5 });
    const read = (...ids: number[]) => ids.map((id) => row(id, id).message); // payloads of `id` bytes
    for (const id of [1, 2, 3, 5, 6, 7, 8]) cache.add(Q, row(id, id)); // holds 6, 7, 8: floor 5
    expect(cache.span(Q, [1, 2])).toBeUndefined(); // below the floor, never read
    cache.noteRead(Q, 0, read(1, 2, 3));
    expect(cache.span(Q, [2, 1])).toEqual({ lo: 1, hi: 2, rows: 2, bytes: 3 });
    expect(cache.span(Q, [1, 3])).toBeUndefined(); // 2 is not acked
    expect(cache.span(Q, [3, 6])).toBeUndefined(); // 5 lies between the window (0, 3] and the floor
    cache.noteRead(Q, 3, read(5, 6)); // goes on from the window: (0, 6]
    expect(cache.span(Q, [3, 5, 6, 7])).toEqual({ lo: 3, hi: 7, rows: 4, bytes: 21 }); // window, then cache
    expect(cache.span(Q, [3, 5, 7])).toBeUndefined(); // 6 is not acked
    cache.remove(Q, [2]);
    expect(cache.span(Q, [1, 3])).toEqual({ lo: 1, hi: 3, rows: 2, bytes: 4 }); // 2 is no row any more
    cache.removeUpTo(Q, 1);
    expect(cache.span(Q, [3])).toEqual({ lo: 3, hi: 3, rows: 1, bytes: 3 });
    for (const id of [9, 10]) cache.add(Q, row(id, id)); // holds 8, 9, 10: floor 7
    cache.noteRead(Q, 6, read(7, 8, 9, 10)); // 7 ids: the oldest two go, the window is (5, 10]
    expect(cache.span(Q, [5])).toBeUndefined();
    expect(cache.span(Q, [6, 7])).toEqual({ lo: 6, hi: 7, rows: 2, bytes: 13 });
    cache.noteRead(Q, 0, read(3, 5)); // a rewind: a new window (0, 5] replaces the old one
    expect(cache.span(Q, [6])).toBeUndefined(); // 6 is neither in the window nor above the floor
    expect(cache.span(Q, [3, 5])).toEqual({ lo: 3, hi: 5, rows: 2, bytes: 8 });
  });

  it('names ranges below the floor from reads of SQLite, only when no row in them is left out', () => {
    let seed = 7;
    const random = () => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    // A small cache: most rows fall below its floor, as under a backlog.
    const cache = createRecentRows({ floor: 0, maxRows: 20, maxBytes: 1e12, maxKnown: 60 });
    const size = (id: number) => 1 + (id % 7);
    let model: number[] = []; // the queue's rows, as SQLite holds them
    let next = 1;
    let cursor = 0;
    let belowFloor = 0;
    for (let step = 0; step < 3000; step++) {
      for (let i = Math.floor(random() * 9); i > 0; i--) {
        if (random() < 0.2) next++; // a row of another queue takes this id
        cache.add(Q, row(next, size(next)));
        model.push(next++);
      }
      // A read of SQLite: on from the cursor, or from the oldest row after a rewind.
      if (random() < 0.5) {
        if (random() < 0.1) cursor = 0;
        const read = model.filter((id) => id > cursor).slice(0, 1 + Math.floor(random() * 30));
        if (read.length > 0) {
          cache.noteRead(
            Q,
            cursor,
            read.map((id) => row(id, size(id)).message),
          );
          cursor = read[read.length - 1]!;
        }
      }
      const r = random();
      if (r < 0.4) continue;
      if (r < 0.43) {
        const upTo = model[Math.floor(random() * model.length)] ?? 0;
        cache.removeUpTo(Q, upTo);
        model = model.filter((id) => id > upTo);
        continue;
      }
      // Acks: a stretch of the oldest rows (the usual case), a stretch with a hole, or any rows.
      const start = r < 0.6 ? 0 : Math.floor(random() * model.length);
      let ids = model.slice(start, start + 1 + Math.floor(random() * 10));
      if (r > 0.8 && ids.length > 2) ids.splice(1 + Math.floor(random() * (ids.length - 2)), 1);
      if (r > 0.9) ids = [...ids, next + 3];
      const span = cache.span(Q, ids);
      if (span !== undefined) {
        const inRange = model.filter((id) => id >= span.lo && id <= span.hi);
        const unique = [...new Set(ids)].sort((a, b) => a - b);
        expect(inRange).toEqual(unique);
        expect(span.rows).toBe(unique.length);
        expect(span.bytes).toBe(unique.reduce((n, id) => n + size(id), 0));
        if (cache.read(Q, span.lo - 1, 0, 0) === undefined) belowFloor++; // lo is at or below the floor
      }
      cache.remove(Q, ids);
      const gone = new Set(ids);
      model = model.filter((id) => !gone.has(id));
    }
    // The test names ranges below the floor often, or it would prove nothing.
    expect(belowFloor).toBeGreaterThan(100);
  });
});
