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
 * SQLite, which stays the source of truth. Bounded in rows and bytes per queue.
 */
export interface RecentRows {
  /** After COMMIT: a row just inserted (ids grow per queue). */
  add(integrationId: string, row: CachedRow): void;
  /** Rows with id > afterId in id order, or undefined when the cache cannot answer. */
  read(integrationId: string, afterId: number, limit: number, now: number): OutboundMessage[] | undefined;
  /**
   * When `ids` are exactly the queue's rows from the lowest to the highest of them (every row of
   * that range is held here, none is missing from `ids`), that range: one range DELETE then
   * removes them, and no other row. Otherwise undefined.
   */
  span(integrationId: string, ids: readonly number[]): { lo: number; hi: number } | undefined;
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
}

export function createRecentRows(options: {
  floor: number;
  maxRows?: number;
  maxBytes?: number;
}): RecentRows {
  const maxRows = options.maxRows ?? 10_000;
  const maxBytes = options.maxBytes ?? 16 * 1024 * 1024;
  const queues = new Map<string, QueueCache>();
  const queueOf = (integrationId: string): QueueCache => {
    let q = queues.get(integrationId);
    if (q === undefined) {
      q = { floor: options.floor, rows: [], bytes: 0 };
      queues.set(integrationId, q);
    }
    return q;
  };

  return {
    add(integrationId, row) {
      const q = queueOf(integrationId);
      q.rows.push(row);
      q.bytes += row.message.payload.length;
      while (q.rows.length > maxRows || q.bytes > maxBytes) {
        const evicted = q.rows.shift()!;
        q.bytes -= evicted.message.payload.length;
        q.floor = evicted.message.id;
      }
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
      const sorted = [...ids].sort((a, b) => a - b);
      const lo = sorted[0]!;
      // Rows at or below the floor may exist in SQLite only.
      if (lo <= q.floor) return undefined;
      let i = indexOf(q.rows, lo);
      if (i < 0) return undefined;
      let previous = Number.NaN;
      for (const id of sorted) {
        if (id === previous) continue; // an id acked twice
        if (q.rows[i]?.message.id !== id) return undefined;
        previous = id;
        i++;
      }
      return { lo, hi: previous };
    },
    remove(integrationId, ids) {
      const q = queues.get(integrationId);
      if (q === undefined || q.rows.length === 0) return;
      // Acks come in batches of mostly the oldest rows: find each by binary search and compact
      // once from the first hit, instead of filtering the whole queue per call.
      const hits: number[] = [];
      for (const id of ids) {
        const i = indexOf(q.rows, id);
        if (i >= 0) hits.push(i);
      }
      if (hits.length === 0) return;
      hits.sort((a, b) => a - b);
      const gone = hits.filter((v, i) => i === 0 || v !== hits[i - 1]);
      for (const i of gone) q.bytes -= q.rows[i]!.message.payload.length;
      if (gone[gone.length - 1] === gone.length - 1) {
        q.rows.splice(0, gone.length); // the oldest rows: the usual case
        return;
      }
      let w = gone[0]!;
      let k = 0;
      for (let r = gone[0]!; r < q.rows.length; r++) {
        if (k < gone.length && gone[k] === r) {
          k++;
          continue;
        }
        q.rows[w++] = q.rows[r]!;
      }
      q.rows.length = w;
    },
    removeUpTo(integrationId, id) {
      const q = queues.get(integrationId);
      if (q === undefined || q.rows.length === 0) return;
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

/** Index of the row with this id, or -1. */
function indexOf(rows: readonly CachedRow[], id: number): number {
  const i = upperBound(rows, id) - 1;
  return i >= 0 && rows[i]!.message.id === id ? i : -1;
}
