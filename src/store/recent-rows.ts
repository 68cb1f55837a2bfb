import type { OutboundMessage } from '../providers/provider.js';

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
  /** After COMMIT: rows deleted (acked, dead-lettered). */
  remove(integrationId: string, ids: readonly number[]): void;
  /** After COMMIT: every row up to this id was deleted (drop-oldest). */
  removeUpTo(integrationId: string, id: number): void;
  bumpAttempts(integrationId: string, ids: readonly number[]): void;
  removeExpired(now: number): void;
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
  const keep = (q: QueueCache, predicate: (row: CachedRow) => boolean) => {
    const kept = q.rows.filter(predicate);
    if (kept.length === q.rows.length) return;
    q.rows = kept;
    q.bytes = kept.reduce((n, r) => n + r.message.payload.length, 0);
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
      let lo = 0;
      let hi = q.rows.length;
      while (lo < hi) {
        const mid = (lo + hi) >>> 1;
        if (q.rows[mid]!.message.id <= afterId) lo = mid + 1;
        else hi = mid;
      }
      const out: OutboundMessage[] = [];
      for (let i = lo; i < q.rows.length && out.length < limit; i++) {
        const row = q.rows[i]!;
        if (row.expiresAt === null || row.expiresAt > now) out.push(row.message);
      }
      return out;
    },
    remove(integrationId, ids) {
      const q = queues.get(integrationId);
      if (q === undefined || q.rows.length === 0) return;
      const gone = new Set(ids);
      keep(q, (row) => !gone.has(row.message.id));
    },
    removeUpTo(integrationId, id) {
      const q = queues.get(integrationId);
      if (q !== undefined) keep(q, (row) => row.message.id > id);
    },
    bumpAttempts(integrationId, ids) {
      const q = queues.get(integrationId);
      if (q === undefined) return;
      const bumped = new Set(ids);
      for (const row of q.rows) if (bumped.has(row.message.id)) row.message.attempts++;
    },
    removeExpired(now) {
      for (const q of queues.values()) keep(q, (row) => row.expiresAt === null || row.expiresAt > now);
    },
  };
}
