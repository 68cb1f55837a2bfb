import type { OutboundMessage } from '../common/outbound-message.js';

export interface CachedRow {
  message: OutboundMessage;
  /** ms since epoch; null never expires */
  expiresAt: number | null;
}

/**
 * The newest committed rows of each queue, kept in memory so that a forwarder keeping up with
 * live traffic reads them without a query. It answers a read only when it holds every row of
 * that queue after the requested id (everything above its floor); otherwise the caller reads
 * SQLite, which stays the source of truth. Bounded in rows and bytes per queue. Below its floor
 * it keeps, per queue, the ids and sizes of the rows the last reads of SQLite found (a known
 * window, bounded in ids), so that acks of a backlog older than the cache are ranges too.
 */
export interface RecentRows {
  /** After COMMIT: a row just inserted (ids grow per queue). */
  add(integrationId: string, row: CachedRow): void;
  /** Rows with id > afterId in id order, or undefined when the cache cannot answer. */
  read(integrationId: string, afterId: number, limit: number, now: number): OutboundMessage[] | undefined;
  /**
   * When `ids` are exactly the queue's rows from the lowest to the highest of them (every row of
   * that range is held here, none is missing from `ids`), that range: one range DELETE then
   * removes them, and no other row. Otherwise undefined. `rows` and `bytes` are what that range
   * holds, so the caller's counters need no RETURNING from the DELETE.
   */
  span(
    integrationId: string,
    ids: readonly number[],
  ): { lo: number; hi: number; rows: number; bytes: number } | undefined;
  /**
   * A read of SQLite found exactly these rows of the queue with afterId < id <= the last of them
   * (ids ascending, no row of that range left out). Their ids and sizes are kept, without
   * payloads, so that acks of rows read below the floor can still be deleted as one range.
   */
  noteRead(integrationId: string, afterId: number, rows: readonly OutboundMessage[]): void;
  /** After COMMIT: rows deleted (acked, dead-lettered). */
  remove(integrationId: string, ids: readonly number[]): void;
  /** After COMMIT: every row up to this id was deleted (drop-oldest). */
  removeUpTo(integrationId: string, id: number): void;
  bumpAttempts(integrationId: string, ids: readonly number[]): void;
  /** After COMMIT: every row's expiry moved by `deltaMs` (a wall-clock jump). */
  shiftExpiry(deltaMs: number): void;
}

interface QueueCache {
  /** Every row of the queue with id > floor is in `rows`. */
  floor: number;
  rows: CachedRow[];
  bytes: number;
  /** Every row of the queue with known.lo < id <= known.hi has its id in known.ids. */
  known: KnownWindow | undefined;
}

/** Ids and sizes of a stretch of a queue read from SQLite (see noteRead). */
interface KnownWindow {
  lo: number;
  hi: number;
  ids: number[];
  sizes: number[];
}

export function createRecentRows(options: {
  floor: number;
  maxRows?: number;
  maxBytes?: number;
  /** Ids a queue's known window holds at most (16 bytes each). */
  maxKnown?: number;
}): RecentRows {
  const maxRows = options.maxRows ?? 10_000;
  const maxBytes = options.maxBytes ?? 16 * 1024 * 1024;
  const maxKnown = options.maxKnown ?? 20_000;
  const queues = new Map<string, QueueCache>();
  const queueOf = (integrationId: string): QueueCache => {
    let q = queues.get(integrationId);
    if (q === undefined) {
      q = { floor: options.floor, rows: [], bytes: 0, known: undefined };
      queues.set(integrationId, q);
    }
    return q;
  };

  return {
    add(integrationId, row) {
      const q = queueOf(integrationId);
      q.rows.push(row);
      q.bytes += row.message.payload.length;
      if (q.rows.length <= maxRows && q.bytes <= maxBytes) return;
      // Over a bound: evict the oldest tenth at once, so that a backlog growing past the bound
      // costs one splice per thousand rows, not a shift of the whole array per row.
      const rowsGoal = maxRows - Math.ceil(maxRows / 10);
      const bytesGoal = maxBytes - Math.ceil(maxBytes / 10);
      let n = 0;
      let bytes = q.bytes;
      while (n < q.rows.length && (q.rows.length - n > rowsGoal || bytes > bytesGoal))
        bytes -= q.rows[n++]!.message.payload.length;
      q.floor = q.rows[n - 1]!.message.id;
      q.bytes = bytes;
      q.rows.splice(0, n);
    },
    read(integrationId, afterId, limit, now) {
      const q = queueOf(integrationId);
      if (afterId < q.floor) return undefined;
      const lo = upperBound(q.rows, afterId);
      const out: OutboundMessage[] = [];
      for (let i = lo; i < q.rows.length && out.length < limit; i++) {
        const row = q.rows[i]!;
        if (row.expiresAt === null || row.expiresAt > now) out.push(row.message);
      }
      return out;
    },
    span(integrationId, ids) {
      const q = queues.get(integrationId);
      if (q === undefined || ids.length === 0) return undefined;
      const sorted = [...new Set(ids)].sort((a, b) => a - b);
      const lo = sorted[0]!;
      const hi = sorted[sorted.length - 1]!;
      // Rows at or below the floor may exist in SQLite only, unless a read found them all. The
      // known window covers (known.lo, known.hi], the cache (floor, ∞): their union must hold the
      // range without a gap.
      const known = q.known !== undefined && lo > q.known.lo ? q.known : undefined;
      if (lo <= q.floor && (known === undefined || (hi > known.hi && known.hi < q.floor))) return undefined;
      // Below `split` the known window answers, above it the cache.
      const split = known === undefined ? q.floor : Math.max(known.hi, q.floor);
      let rows = 0;
      let bytes = 0;
      let k = known === undefined ? 0 : lowerBound(known.ids, lo);
      let c = upperBound(q.rows, Math.max(lo - 1, split));
      for (const id of sorted) {
        if (id <= split && known !== undefined) {
          if (known.ids[k] !== id) return undefined; // not a row, or a row in between is not acked
          bytes += known.sizes[k++]!;
        } else {
          if (q.rows[c]?.message.id !== id) return undefined;
          bytes += q.rows[c++]!.message.payload.length;
        }
        rows++;
      }
      // A row of the range below `split` after the last acked id would be one left out.
      if (known !== undefined && hi > split && k < known.ids.length && known.ids[k]! <= split)
        return undefined;
      return { lo, hi, rows, bytes };
    },
    noteRead(integrationId, afterId, read) {
      const q = queueOf(integrationId);
      if (read.length === 0) return;
      const last = read[read.length - 1]!.id;
      let known = q.known;
      // A read that goes on from where the window ends extends it; any other replaces it.
      if (known === undefined || afterId !== known.hi) {
        known = { lo: afterId, hi: afterId, ids: [], sizes: [] };
        q.known = known;
      }
      for (const row of read) {
        known.ids.push(row.id);
        known.sizes.push(row.payload.length);
      }
      known.hi = last;
      if (known.ids.length > maxKnown) {
        const cut = known.ids.length - maxKnown;
        known.lo = known.ids[cut - 1]!;
        known.ids.splice(0, cut);
        known.sizes.splice(0, cut);
      }
    },
    remove(integrationId, ids) {
      const q = queues.get(integrationId);
      if (q === undefined) return;
      if (q.known !== undefined) removeKnown(q.known, ids);
      if (q.rows.length === 0) return;
      const gone = sortedHits(ids, (id) => indexOf(q.rows, id));
      for (const i of gone) q.bytes -= q.rows[i]!.message.payload.length;
      removeAt(q.rows, gone);
    },
    removeUpTo(integrationId, id) {
      const q = queues.get(integrationId);
      if (q === undefined) return;
      if (q.known !== undefined) {
        const end = lowerBound(q.known.ids, id + 1);
        q.known.ids.splice(0, end);
        q.known.sizes.splice(0, end);
      }
      if (q.rows.length === 0) return;
      const end = upperBound(q.rows, id);
      if (end === 0) return;
      for (let i = 0; i < end; i++) q.bytes -= q.rows[i]!.message.payload.length;
      q.rows.splice(0, end);
    },
    bumpAttempts(integrationId, ids) {
      const q = queues.get(integrationId);
      if (q === undefined) return;
      const bumped = new Set(ids);
      for (const row of q.rows) if (bumped.has(row.message.id)) row.message.attempts++;
    },
    shiftExpiry(deltaMs) {
      for (const q of queues.values()) {
        for (const row of q.rows) if (row.expiresAt !== null) row.expiresAt += deltaMs;
      }
    },
  };
}

/** Index of the first row with id > `id` (rows are in id order). */
function upperBound(rows: readonly CachedRow[], id: number): number {
  let lo = 0;
  let hi = rows.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (rows[mid]!.message.id <= id) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Index of the first id >= `id` in ascending ids. */
function lowerBound(ids: readonly number[], id: number): number {
  let lo = 0;
  let hi = ids.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (ids[mid]! < id) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Drops these ids from a known window (they are no rows any more); the window stays exact. */
function removeKnown(known: KnownWindow, ids: readonly number[]): void {
  const gone = sortedHits(ids, (id) => {
    const i = lowerBound(known.ids, id);
    return known.ids[i] === id ? i : -1;
  });
  removeAt(known.ids, gone);
  removeAt(known.sizes, gone);
}

/** The distinct indexes `find` gives for these ids (-1: not held), ascending. */
function sortedHits(ids: readonly number[], find: (id: number) => number): number[] {
  const hits: number[] = [];
  for (const id of ids) {
    const i = find(id);
    if (i >= 0) hits.push(i);
  }
  hits.sort((x, y) => x - y);
  return hits.filter((v, i) => i === 0 || v !== hits[i - 1]);
}

/**
 * Removes the entries at these ascending, distinct indexes. Acks come in batches of mostly the
 * oldest entries: one splice then, else one compaction from the first index (never a filter of
 * the whole list per call).
 */
function removeAt<T>(list: T[], gone: readonly number[]): void {
  if (gone.length === 0) return;
  if (gone[gone.length - 1] === gone.length - 1) {
    list.splice(0, gone.length);
    return;
  }
  let w = gone[0]!;
  let k = 0;
  for (let r = gone[0]!; r < list.length; r++) {
    if (k < gone.length && gone[k] === r) {
      k++;
      continue;
    }
    list[w++] = list[r]!;
  }
  list.length = w;
}

/** Index of the row with this id, or -1. */
function indexOf(rows: readonly CachedRow[], id: number): number {
  const i = upperBound(rows, id) - 1;
  return i >= 0 && rows[i]!.message.id === id ? i : -1;
}
