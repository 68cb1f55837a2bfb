import { ErrorCodes, GatewayError, errorMessage } from '../errors.js';
import type { Logger } from '../logger.js';
import { createRecentRows, type CachedRow } from './recent-rows.js';
import { createFloodReporter } from '../common/flood-reporter.js';
import type { OutboundMessage } from '../common/outbound-message.js';
import type { ActivityLog } from './activity-log.js';
import type { SqliteDatabase, Statement } from './database.js';
import type { EnqueueTarget, IncomingMessage, Outbox, QueueLimits, QueueStats } from './outbox-types.js';

export interface OutboxOptions {
  db: SqliteDatabase;
  logger: Logger;
  activity: ActivityLog;
  now?: () => number;
  /** Staged messages that trigger a commit at once instead of on the next turn of the loop. */
  maxBatch?: number;
  /**
   * The store's asynchronous WAL sync. With it, a batch committed under load (see
   * `asyncSyncBatch`) commits with synchronous=NORMAL and its promises settle only after a sync
   * that began after the COMMIT: the same durability as synchronous=FULL, without the event
   * loop waiting for the disk. Without it, every batch commits with synchronous=FULL.
   */
  syncWal?: (callback: (err: Error | null) => void) => void;
  /**
   * A batch of at least this many messages defers its sync to the thread pool (default 16), and
   * so does every batch while messages arrive at `asyncSyncRate` or faster. Otherwise a batch
   * commits with synchronous=FULL inline: below a few thousand messages a second that is the
   * shortest way to a PUBACK, since a sync on the thread pool while the next commits write to
   * the same file has a longer tail (measured: p99 0.6 ms inline, 3–5 ms deferred, at 2,000
   * msg/s). Above it, syncs inline would hold the event loop for most of its time.
   */
  asyncSyncBatch?: number;
  /** Messages per second (measured over 100 ms) from which every batch defers its sync; default 5,000. */
  asyncSyncRate?: number;
}

interface Staged {
  message: IncomingMessage;
  targets: readonly EnqueueTarget[];
  enqueuedAt: number;
  resolve: () => void;
  reject: (err: GatewayError) => void;
}

/** In-memory mirror of one queue; `depth` and `bytes` always equal what the table holds. */
interface QueueCounters {
  depth: number;
  bytes: number;
  dropped: number;
  expired: number;
  rejected: number;
  deadLettered: number;
}

type DropKind = 'dropped' | 'rejected';
type DropReason = 'max-messages' | 'max-bytes' | 'too-large';

interface DropEvent {
  kind: DropKind;
  integrationId: string;
  reason: DropReason;
}

/** Drops or refusals of one queue not yet logged, so a flood gives one line per second. */
interface DropReport {
  kind: DropKind;
  integrationId: string;
  reasons: Set<DropReason>;
}

/** A batch committed with synchronous=NORMAL whose promises wait for a WAL sync. */
interface Unsynced {
  batch: Staged[];
  outcomes: (GatewayError | undefined)[];
  settled: boolean;
}

interface BatchResult {
  outcomes: (GatewayError | undefined)[];
  touched: Set<string>;
  drafts: Map<string, { depth: number; bytes: number }>;
  drops: Map<string, Map<DropReason, number>>;
  rejects: Map<string, Map<DropReason, number>>;
  /** Rows inserted and drop-oldest cuts, applied to the in-memory cache only after COMMIT. */
  inserted: { integrationId: string; row: CachedRow }[];
  cuts: { integrationId: string; upTo: number }[];
}

const REPORT_INTERVAL_MS = 1000;
/** Rows per multi-row INSERT (8 parameters each, well under SQLite's 32,766). */
const INSERT_ROWS = 32;
const INSERT_COLUMNS = 8;
const MAKE_ROOM_CHUNK = 256;
const EXPIRE_CHUNK = 5000;
/** Rows read first from each queue's head when looking for expired rows. */
const EXPIRE_PROBE = 64;
/** Upper bound of chunks per queue in one expire(); the next run continues. */
const MAX_EXPIRE_CHUNKS = 1000;
/** Rows whose expiry moves in one transaction after a clock jump. */
const SHIFT_CHUNK = 50_000;

/**
 * The durable queues over `queue_messages`. Enqueues are staged and committed together in one
 * transaction per turn of the event loop (or per `maxBatch` messages), and made durable by a
 * WAL sync that every batch committed meanwhile shares (group commit): while one sync runs on
 * the thread pool, the event loop parses, commits and forwards the next messages, and their
 * promises (the devices' PUBACKs) wait for the next sync.
 */
export function createOutbox(options: OutboxOptions): Outbox {
  const { db, activity, logger } = options;
  const now = options.now ?? Date.now;
  const maxBatch = Math.max(1, options.maxBatch ?? 1000);

  // Rows go in with multi-row INSERTs of up to INSERT_ROWS rows: one statement per chunk costs
  // less than one per row (measured). The statement for each chunk size is prepared on first use.
  const insertStatements = new Map<number, Statement>();
  const insertRows = (rows: number): Statement => {
    let statement = insertStatements.get(rows);
    if (statement === undefined) {
      // Only placeholders are repeated; every value is a parameter.
      const sql =
        'INSERT INTO queue_messages (integration_id, device_id, topic, payload, qos, retain, enqueued_at, expires_at) VALUES ' +
        Array.from({ length: rows }, () => '(?, ?, ?, ?, ?, ?, ?, ?)').join(', ');
      statement = db.prepare(sql);
      insertStatements.set(rows, statement);
    }
    return statement;
  };
  const selectOldest = db.prepare(
    'SELECT id, length(payload) AS size FROM queue_messages WHERE integration_id = ? ORDER BY id LIMIT ?',
  );
  const deleteUpTo = db.prepare(
    'DELETE FROM queue_messages WHERE integration_id = ? AND id <= ? RETURNING length(payload) AS size',
  );
  const selectRows = db
    .prepare(
      `SELECT id, device_id, topic, payload, qos, retain, enqueued_at, attempts FROM queue_messages
      WHERE integration_id = ? AND id > ? AND (expires_at IS NULL OR expires_at > ?)
      ORDER BY id LIMIT ?`,
    )
    .raw(true);
  const countRange = db.prepare(
    'SELECT count(*) AS n FROM queue_messages WHERE integration_id = ? AND id > ? AND id <= ?',
  );
  const deleteOne = db.prepare(
    'DELETE FROM queue_messages WHERE id = ? AND integration_id = ? RETURNING length(payload) AS size',
  );
  const deleteSpan = db.prepare('DELETE FROM queue_messages WHERE integration_id = ? AND id BETWEEN ? AND ?');
  const countQueue = db.prepare(
    'SELECT count(*) AS n, coalesce(sum(length(payload)), 0) AS b FROM queue_messages WHERE integration_id = ?',
  );
  const deleteMany = db.prepare(
    `DELETE FROM queue_messages WHERE id IN (SELECT value FROM json_each(?)) AND integration_id = ?
     RETURNING length(payload) AS size`,
  );
  const bumpAttempts = db.prepare(
    'UPDATE queue_messages SET attempts = attempts + 1 WHERE id = ? AND integration_id = ?',
  );
  const copyToDeadLetters = db.prepare(
    `INSERT INTO dead_letters (message_id, integration_id, device_id, topic, payload, qos, retain, enqueued_at,
       failed_at, attempts, error_code, reason)
     SELECT id, integration_id, device_id, topic, payload, qos, retain, enqueued_at, ?, attempts, ?, ?
       FROM queue_messages WHERE id = ? AND integration_id = ?`,
  );
  // Expiry walks each queue from its oldest row (see expire()), so inserts and deletes keep no
  // index on expires_at up to date.
  const selectHead = db.prepare(
    'SELECT id, expires_at AS expiresAt FROM queue_messages WHERE integration_id = ? AND id > ? ORDER BY id LIMIT ?',
  );
  const selectOldestTime = db.prepare(
    'SELECT enqueued_at AS t FROM queue_messages WHERE integration_id = ? ORDER BY id LIMIT 1',
  );
  const selectBacklog = db.prepare(
    'SELECT device_id AS deviceId, max(id) AS maxId FROM queue_messages WHERE integration_id = ? GROUP BY device_id',
  );
  const countDeadLetters = db.prepare('SELECT count(*) AS n FROM dead_letters WHERE integration_id = ?');
  /** The last id of the next chunk of rows after an id. */
  const selectChunkEnd = db.prepare(
    'SELECT max(id) AS hi FROM (SELECT id FROM queue_messages WHERE id > ? ORDER BY id LIMIT ?)',
  );
  const shiftRange = db.prepare(
    'UPDATE queue_messages SET expires_at = expires_at + ? WHERE id > ? AND id <= ? AND expires_at IS NOT NULL',
  );

  const counters = new Map<string, QueueCounters>();
  const countersOf = (integrationId: string): QueueCounters => {
    let c = counters.get(integrationId);
    if (c === undefined) {
      c = { depth: 0, bytes: 0, dropped: 0, expired: 0, rejected: 0, deadLettered: 0 };
      counters.set(integrationId, c);
    }
    return c;
  };
  const initial = db
    .prepare(
      'SELECT integration_id AS id, count(*) AS n, sum(length(payload)) AS b FROM queue_messages GROUP BY integration_id',
    )
    .all() as { id: string; n: number; b: number | null }[];
  for (const row of initial) {
    const c = countersOf(row.id);
    c.depth = row.n;
    c.bytes = row.b ?? 0;
  }

  const maxId =
    (db.prepare('SELECT max(id) AS id FROM queue_messages').get() as { id: number | null }).id ?? 0;
  // Rows committed from now on are also kept in memory, so a caught-up forwarder does not query.
  const recent = createRecentRows({ floor: maxId });

  let staged: Staged[] = [];
  let flushScheduled = false;
  const syncWal = options.syncWal;
  const asyncSyncBatch = Math.max(1, options.asyncSyncBatch ?? 16);
  const asyncSyncRate = options.asyncSyncRate ?? 5_000;
  /** Messages committed in the current 100 ms window, and the rate of the last full window. */
  let rateWindowStart = performance.now();
  let rateWindowMessages = 0;
  let recentRate = 0;
  const synchronousNormal = db.prepare('PRAGMA synchronous = NORMAL');
  const synchronousFull = db.prepare('PRAGMA synchronous = FULL');
  /** Committed batches waiting for a WAL sync that starts after their COMMIT. */
  let unsynced: Unsynced[] = [];
  /** Batches the running sync covers. */
  let covered: Unsynced[] = [];
  let syncing = false;
  /** Staged messages wait for the running sync to end (see flushNow). */
  let flushAfterSync = false;
  const onSyncIdle: (() => void)[] = [];
  let closed = false;
  const listeners = new Set<(integrationIds: ReadonlySet<string>) => void>();
  const drops = createFloodReporter<DropEvent, DropReport>({
    windowMs: REPORT_INTERVAL_MS,
    now,
    fold(summary, { kind, integrationId, reason }) {
      const next = summary ?? { kind, integrationId, reasons: new Set<DropReason>() };
      next.reasons.add(reason);
      return next;
    },
    report: (_key, summary, count) => report(summary, count),
  });

  /**
   * Runs inside the transaction. Counter changes go to drafts that are applied only after
   * COMMIT, so a rolled-back batch leaves the counters exactly as the table is.
   */
  const writeBatch = db.transaction((batch: readonly Staged[]): BatchResult => {
    const result: BatchResult = {
      outcomes: new Array<GatewayError | undefined>(batch.length),
      touched: new Set(),
      drafts: new Map(),
      drops: new Map(),
      rejects: new Map(),
      inserted: [],
      cuts: [],
    };
    let values: unknown[] = [];
    const draftOf = (integrationId: string) => {
      let d = result.drafts.get(integrationId);
      if (d === undefined) {
        const c = counters.get(integrationId);
        d = { depth: c?.depth ?? 0, bytes: c?.bytes ?? 0 };
        result.drafts.set(integrationId, d);
      }
      return d;
    };

    for (let i = 0; i < batch.length; i++) {
      const { message, targets, enqueuedAt } = batch[i]!;
      const size = message.payload.length;

      // Decide for every target before inserting into any: a refused message must reach no
      // queue, so the device gets no PUBACK and keeps its copy.
      let refusal: { integrationId: string; reason: DropReason } | undefined;
      for (const target of targets) {
        const reason = refusalReason(target.limits, draftOf(target.integrationId), size);
        if (reason !== undefined) {
          refusal = { integrationId: target.integrationId, reason };
          break;
        }
      }
      if (refusal !== undefined) {
        addCount(result.rejects, refusal.integrationId, refusal.reason, 1);
        result.outcomes[i] = new GatewayError(
          ErrorCodes.QUEUE_FULL,
          refusal.reason === 'too-large'
            ? `a ${size}-byte message is larger than the queue of integration ${refusal.integrationId} may hold`
            : `the queue of integration ${refusal.integrationId} is full (${refusal.reason}) and refuses new messages`,
          { retryable: false, details: { integrationId: refusal.integrationId, reason: refusal.reason } },
        );
        continue;
      }

      for (const target of targets) {
        const draft = draftOf(target.integrationId);
        if (target.limits.onFull === 'drop-oldest' && overflows(target.limits, draft, size)) {
          // Making room deletes from the table: the rows waiting to go in must be in it first.
          insertPending();
          makeRoom(target.integrationId, target.limits, draft, size, result);
        }
        const qos = target.qos ?? message.qos;
        const expiresAt = target.limits.ttlMs > 0 ? enqueuedAt + target.limits.ttlMs : null;
        values.push(
          target.integrationId,
          message.deviceId,
          message.topic,
          message.payload,
          qos,
          message.retain ? 1 : 0,
          enqueuedAt,
          expiresAt,
        );
        result.inserted.push({
          integrationId: target.integrationId,
          row: {
            message: {
              id: 0, // set by insertPending
              deviceId: message.deviceId,
              topic: message.topic,
              payload: message.payload,
              qos,
              retain: message.retain,
              enqueuedAt,
              attempts: 0,
            },
            expiresAt,
          },
        });
        if (values.length === INSERT_ROWS * INSERT_COLUMNS) insertPending();
        draft.depth++;
        draft.bytes += size;
        result.touched.add(target.integrationId);
      }
    }
    insertPending();
    return result;

    /** Inserts the rows gathered in `values`; one statement gives them consecutive ids. */
    function insertPending(): void {
      const rows = values.length / INSERT_COLUMNS;
      if (rows === 0) return;
      const last = Number(insertRows(rows).run(values).lastInsertRowid);
      const inserted = result.inserted;
      for (let k = 0; k < rows; k++)
        inserted[inserted.length - rows + k]!.row.message.id = last - rows + 1 + k;
      values = [];
    }
  });

  /** Deletes the oldest rows of a queue until one more message of `size` bytes fits. */
  function makeRoom(
    integrationId: string,
    limits: QueueLimits,
    draft: { depth: number; bytes: number },
    size: number,
    result: BatchResult,
  ): void {
    if (!overflows(limits, draft, size)) return;
    const reason: DropReason = draft.depth + 1 > limits.maxMessages ? 'max-messages' : 'max-bytes';
    // At the cap a flood drops one row per insert: fetch just what the row count needs, and
    // widen the window when bytes need more.
    let chunk = Math.min(Math.max(draft.depth + 1 - limits.maxMessages, 4), MAKE_ROOM_CHUNK);
    while (overflows(limits, draft, size) && draft.depth > 0) {
      const oldest = selectOldest.all(integrationId, chunk) as { id: number; size: number }[];
      chunk = Math.min(chunk * 4, MAKE_ROOM_CHUNK);
      if (oldest.length === 0) {
        // The counters say rows exist but the table has none: never loop on a drifted counter.
        logger.error({ integrationId, depth: draft.depth, bytes: draft.bytes }, 'queue_counter_drift');
        draft.depth = 0;
        draft.bytes = 0;
        break;
      }
      let depth = draft.depth;
      let bytes = draft.bytes;
      let cutId = oldest[0]!.id;
      for (const row of oldest) {
        cutId = row.id;
        depth--;
        bytes -= row.size;
        if (depth + 1 <= limits.maxMessages && bytes + size <= limits.maxBytes) break;
      }
      const deleted = deleteUpTo.all(integrationId, cutId) as { size: number }[];
      result.cuts.push({ integrationId, upTo: cutId });
      for (const row of deleted) {
        draft.depth--;
        draft.bytes -= row.size;
      }
      addCount(result.drops, integrationId, reason, deleted.length);
    }
  }

  function flushNow(force = false): void {
    if (staged.length === 0) return;
    // Under load, what arrives while a sync runs is committed when it ends, as one batch: the
    // next sync covers it either way, and one bigger commit writes each hot page to the WAL
    // once instead of once per turn of the loop (less WAL, fewer checkpoints, less CPU).
    if (
      !force &&
      syncing &&
      staged.length < maxBatch &&
      (staged.length >= asyncSyncBatch || recentRate >= asyncSyncRate)
    ) {
      flushAfterSync = true;
      return;
    }
    const batch = staged;
    staged = [];
    let result: BatchResult;
    // Deferred: under load (a big batch, a high rate) the loop must not wait for the disk. A
    // small batch commits with synchronous=FULL, whose sync of the WAL covers every batch
    // committed before it.
    const t = performance.now();
    rateWindowMessages += batch.length;
    if (t - rateWindowStart >= 100) {
      recentRate = (rateWindowMessages * 1000) / (t - rateWindowStart);
      rateWindowStart = t;
      rateWindowMessages = 0;
    }
    const deferSync =
      syncWal !== undefined && (batch.length >= asyncSyncBatch || recentRate >= asyncSyncRate);
    try {
      if (!deferSync) result = writeBatch(batch);
      else {
        // The sync comes after the COMMIT, on the thread pool; see syncWal.
        synchronousNormal.run();
        try {
          result = writeBatch(batch);
        } finally {
          synchronousFull.run();
        }
      }
    } catch (err) {
      const sqliteCode = (err as { code?: unknown }).code;
      logger.error({ err, messages: batch.length, sqliteCode }, 'queue_commit_failed');
      const error = new GatewayError(
        ErrorCodes.STORE_WRITE,
        `cannot commit ${batch.length} messages to the queue store: ${errorMessage(err)}`,
        { retryable: true, cause: err, details: { sqliteCode } },
      );
      for (const s of batch) s.reject(error);
      return;
    }

    // Cuts after adds: a cut removes every row up to its id, including rows of this batch.
    for (const { integrationId, row } of result.inserted) recent.add(integrationId, row);
    for (const cut of result.cuts) recent.removeUpTo(cut.integrationId, cut.upTo);
    for (const [integrationId, draft] of result.drafts) {
      const c = countersOf(integrationId);
      c.depth = draft.depth;
      c.bytes = draft.bytes;
    }
    for (const [integrationId, reasons] of result.drops) {
      for (const [reason, n] of reasons) {
        countersOf(integrationId).dropped += n;
        noteDrop('dropped', integrationId, reason, n);
      }
    }
    for (const [integrationId, reasons] of result.rejects) {
      for (const [reason, n] of reasons) {
        countersOf(integrationId).rejected += n;
        noteDrop('rejected', integrationId, reason, n);
      }
    }
    if (!deferSync) {
      // Durable too now: the FULL commit synced the WAL, their frames included. Oldest first:
      // a device gets its PUBACKs in the order it published (MQTT 3.1.1 4.6).
      for (const entry of covered) settleOnce(entry);
      for (const entry of unsynced) settleOnce(entry);
      unsynced = [];
      settle(batch, result.outcomes);
    } else {
      unsynced.push({ batch, outcomes: result.outcomes, settled: false });
      if (!syncing) startSync(syncWal!);
    }
    // The forwarder may send before the sync: a copy upstream of a message whose device got no
    // PUBACK (the sync failed, or power was lost) is a duplicate at worst, never a loss.
    if (result.touched.size > 0) {
      for (const listener of listeners) {
        try {
          listener(result.touched);
        } catch (err) {
          logger.error({ err }, 'queue_listener_failed');
        }
      }
    }
  }

  function settle(batch: readonly Staged[], outcomes: readonly (GatewayError | undefined)[]): void {
    for (let i = 0; i < batch.length; i++) {
      const outcome = outcomes[i];
      if (outcome === undefined) batch[i]!.resolve();
      else batch[i]!.reject(outcome);
    }
  }

  function settleOnce(entry: Unsynced): void {
    if (entry.settled) return;
    entry.settled = true;
    settle(entry.batch, entry.outcomes);
  }

  /** One WAL sync for every batch committed so far; batches committed meanwhile wait for the next. */
  function startSync(sync: NonNullable<OutboxOptions['syncWal']>): void {
    covered = unsynced;
    unsynced = [];
    syncing = true;
    sync((err) => {
      const done = covered;
      covered = [];
      syncing = false;
      const waiting = done.filter((entry) => !entry.settled);
      if (err === null) {
        for (const entry of waiting) settleOnce(entry);
      } else if (waiting.length > 0) {
        // Not durable: no PUBACK, the devices keep their copies and send them again.
        const messages = waiting.reduce((n, c) => n + c.batch.length, 0);
        logger.error({ err, messages }, 'queue_sync_failed');
        const error = new GatewayError(
          ErrorCodes.STORE_WRITE,
          `cannot make ${messages} messages durable (sync of the store's WAL failed: ${errorMessage(err)})`,
          { retryable: true, cause: err },
        );
        for (const entry of waiting) {
          entry.settled = true;
          for (const s of entry.batch) s.reject(error);
        }
      }
      if (flushAfterSync) {
        flushAfterSync = false;
        flushNow(); // commits what waited and starts the next sync
      }
      if (!syncing && unsynced.length > 0) startSync(sync);
      if (!syncing) for (const resolve of onSyncIdle.splice(0)) resolve();
    });
  }

  function noteDrop(kind: DropKind, integrationId: string, reason: DropReason, n: number): void {
    drops.note(`${kind}\u0000${integrationId}`, { kind, integrationId, reason }, n);
  }

  function report({ kind, integrationId, reasons }: DropReport, count: number): void {
    const reason = [...reasons].join(',');
    const c = countersOf(integrationId);
    const activityType = kind === 'dropped' ? 'queue_dropped' : 'queue_rejected';
    logger.warn(
      { integrationId, count, reason, depth: c.depth, bytes: c.bytes, total: c[kind] },
      activityType,
    );
    activity.record({
      integrationId,
      activityType,
      direction: 'internal',
      status: 'failed',
      errorCode: ErrorCodes.QUEUE_FULL,
      errorMessage:
        kind === 'dropped'
          ? `${count} oldest queued messages dropped to make room (${reason})`
          : `${count} new messages refused by a full queue (${reason})`,
      metadata: { count, reason },
    });
  }

  function scheduleFlush(): void {
    if (flushScheduled) return;
    flushScheduled = true;
    setImmediate(() => {
      flushScheduled = false;
      flushNow();
    });
  }

  return {
    enqueue(message, targets) {
      if (closed) {
        return Promise.reject(
          new GatewayError(ErrorCodes.STORE_WRITE, 'the store is closing', { retryable: false }),
        );
      }
      if (targets.length === 0) return Promise.resolve();
      const promise = new Promise<void>((resolve, reject) => {
        staged.push({ message, targets, enqueuedAt: now(), resolve, reject });
      });
      if (staged.length >= maxBatch) flushNow();
      else scheduleFlush();
      return promise;
    },

    backlogByDevice(integrationId) {
      return selectBacklog.all(integrationId) as { deviceId: string; maxId: number }[];
    },

    read(integrationId, afterId, limit) {
      const cached = recent.read(integrationId, afterId, limit, now());
      if (cached !== undefined) return cached;
      // Arrays, not objects: one allocation less per row on the backlog's hot path.
      const rows = selectRows.all(integrationId, afterId, now(), limit) as [
        id: number,
        deviceId: string,
        topic: string,
        payload: Buffer,
        qos: number,
        retain: number,
        enqueuedAt: number,
        attempts: number,
      ][];
      const messages = rows.map(
        ([id, deviceId, topic, payload, qos, retain, enqueuedAt, attempts]): OutboundMessage => ({
          id,
          deviceId,
          topic,
          payload,
          qos: qos as 0 | 1 | 2,
          retain: retain !== 0,
          enqueuedAt,
          attempts,
        }),
      );
      // When the query skipped no row of the range (no expired row in it), the cache learns the
      // range's ids: acks of these rows can then delete them as one range (see ack).
      if (messages.length > 0) {
        const last = messages[messages.length - 1]!.id;
        if ((countRange.get(integrationId, afterId, last) as { n: number }).n === messages.length)
          recent.noteRead(integrationId, afterId, messages);
      }
      return messages;
    },

    ack(integrationId, ids) {
      if (ids.length === 0) return;
      // A lost delete only means the row is sent again (at-least-once), so acks skip the fsync:
      // the next WAL sync (an enqueue's) covers these frames too, in order.
      // Acks mostly cover a run of consecutive rows: a range of the index is several times
      // cheaper to delete than the same rows one by one (measured).
      const span = recent.span(integrationId, ids);
      synchronousNormal.run();
      let deleted: { size: number }[] | undefined;
      let spanDeleted = 0;
      try {
        // A span's rows and bytes are known from the cache: no RETURNING row per deleted message.
        if (span === undefined)
          deleted = deleteMany.all(JSON.stringify(ids), integrationId) as { size: number }[];
        else spanDeleted = deleteSpan.run(integrationId, span.lo, span.hi).changes;
      } finally {
        synchronousFull.run();
      }
      recent.remove(integrationId, ids);
      const c = countersOf(integrationId);
      if (deleted !== undefined) {
        c.depth -= deleted.length;
        for (const row of deleted) c.bytes -= row.size;
      } else if (spanDeleted === span!.rows) {
        c.depth -= span!.rows;
        c.bytes -= span!.bytes;
      } else {
        // The cache promised exactly these rows; never let the counters drift if it was wrong.
        const actual = countQueue.get(integrationId) as { n: number; b: number };
        logger.error(
          { integrationId, expected: span!.rows, deleted: spanDeleted, depth: actual.n },
          'queue_counter_drift',
        );
        c.depth = actual.n;
        c.bytes = actual.b;
      }
    },

    markAttempt(integrationId, ids) {
      if (ids.length === 0) return;
      db.transaction(() => {
        for (const id of ids) bumpAttempts.run(id, integrationId);
      })();
      recent.bumpAttempts(integrationId, ids);
    },

    deadLetter(integrationId, message, code, reason) {
      const moved = db.transaction(() => {
        const copied = copyToDeadLetters.run(now(), code, reason, message.id, integrationId).changes;
        if (copied === 0) return undefined;
        return deleteOne.get(message.id, integrationId) as { size: number } | undefined;
      })();
      recent.remove(integrationId, [message.id]);
      if (moved === undefined) {
        // Already gone (acked, dropped or expired meanwhile): nothing to move, nothing to count.
        logger.debug({ integrationId, messageId: message.id }, 'dead_letter_row_missing');
        return;
      }
      const c = countersOf(integrationId);
      c.depth--;
      c.bytes -= moved.size;
      c.deadLettered++;
      logger.warn(
        {
          integrationId,
          messageId: message.id,
          topic: message.topic,
          deviceId: message.deviceId,
          code,
          reason,
        },
        'queue_dead_lettered',
      );
      activity.record({
        integrationId,
        activityType: 'dead_letter',
        direction: 'outgoing',
        status: 'failed',
        errorCode: code,
        errorMessage: reason,
        metadata: { messageId: message.id, topic: message.topic, deviceId: message.deviceId, reason },
      });
    },

    stats(integrationId): QueueStats {
      const c = counters.get(integrationId);
      const oldest = selectOldestTime.get(integrationId) as { t: number } | undefined;
      return {
        depth: c?.depth ?? 0,
        bytes: c?.bytes ?? 0,
        oldestEnqueuedAt: oldest?.t ?? null,
        dropped: c?.dropped ?? 0,
        expired: c?.expired ?? 0,
        rejected: c?.rejected ?? 0,
        deadLettered: c?.deadLettered ?? 0,
        deadLetters: (countDeadLetters.get(integrationId) as { n: number }).n,
      };
    },

    expire(at) {
      const cutoff = at ?? now();
      const perQueue = new Map<string, number>();
      // A queue's rows expire in the order they were queued (expires_at = enqueued_at + the
      // queue's ttl), so each queue is walked from its oldest row and the walk stops at the first
      // stretch with nothing expired: usually after one small probe. (After a ttl change, rows
      // behind an older row that has not expired wait for it; they are never sent meanwhile.)
      // Chunks keep each transaction (and the WAL) small when a long outage expires a lot at once.
      for (const [integrationId, c] of counters) {
        let after = 0;
        let chunk = EXPIRE_PROBE;
        for (let i = 0; i < MAX_EXPIRE_CHUNKS && c.depth > 0; i++) {
          const rows = selectHead.all(integrationId, after, chunk) as {
            id: number;
            expiresAt: number | null;
          }[];
          const expired: number[] = [];
          for (const row of rows) if (row.expiresAt !== null && row.expiresAt <= cutoff) expired.push(row.id);
          if (expired.length > 0) {
            const deleted = db.transaction(
              () => deleteMany.all(JSON.stringify(expired), integrationId) as { size: number }[],
            )();
            recent.remove(integrationId, expired);
            c.depth -= deleted.length;
            for (const row of deleted) c.bytes -= row.size;
            c.expired += deleted.length;
            perQueue.set(integrationId, (perQueue.get(integrationId) ?? 0) + deleted.length);
          }
          if (expired.length === 0 || rows.length < chunk) break;
          after = rows[rows.length - 1]!.id;
          chunk = EXPIRE_CHUNK;
        }
      }
      let total = 0;
      for (const [integrationId, count] of perQueue) {
        total += count;
        const c = countersOf(integrationId);
        logger.warn(
          { integrationId, count, depth: c.depth, bytes: c.bytes, total: c.expired },
          'queue_expired',
        );
        activity.record({
          integrationId,
          activityType: 'queue_expired',
          direction: 'internal',
          status: 'failed',
          errorMessage: `${count} queued messages expired before delivery`,
          metadata: { count, reason: 'ttl' },
        });
      }
      return total;
    },

    shiftExpiry(deltaMs) {
      if (!(deltaMs > 0)) return 0;
      // Rows staged but not committed yet got their expiry from the clock before the jump too.
      flushNow(true);
      let moved = 0;
      let after = 0;
      // Chunks of ids keep each transaction short on a big queue; bounded by the rows there are.
      for (let i = 0; i < MAX_EXPIRE_CHUNKS; i++) {
        const { hi } = selectChunkEnd.get(after, SHIFT_CHUNK) as { hi: number | null };
        if (hi === null) break;
        moved += db.transaction(() => shiftRange.run(deltaMs, after, hi).changes)();
        after = hi;
      }
      recent.shiftExpiry(deltaMs);
      logger.warn({ deltaMs, rows: moved }, 'queue_expiry_shifted');
      return moved;
    },

    onEnqueue(listener) {
      listeners.add(listener);
      return () => {
        listeners.delete(listener);
      };
    },

    flush() {
      flushNow(true);
      return Promise.resolve();
    },

    close() {
      if (!closed) {
        closed = true;
        flushNow(true);
        drops.flush();
      }
      // The last batches' PUBACKs wait for their sync; the store closes after it.
      if (!syncing) return Promise.resolve();
      return new Promise<void>((resolve) => {
        onSyncIdle.push(resolve);
      });
    },
  };
}

/** Whether one more message of `size` bytes goes over a queue's limits. */
function overflows(limits: QueueLimits, state: { depth: number; bytes: number }, size: number): boolean {
  return state.depth + 1 > limits.maxMessages || state.bytes + size > limits.maxBytes;
}

/** Why a queue refuses one more message of `size` bytes, or undefined when it takes it. */
function refusalReason(
  limits: QueueLimits,
  state: { depth: number; bytes: number },
  size: number,
): DropReason | undefined {
  if (size > limits.maxBytes) return 'too-large';
  if (limits.onFull !== 'reject-new') return undefined;
  if (state.depth + 1 > limits.maxMessages) return 'max-messages';
  if (state.bytes + size > limits.maxBytes) return 'max-bytes';
  return undefined;
}

function addCount(
  map: Map<string, Map<DropReason, number>>,
  integrationId: string,
  reason: DropReason,
  n: number,
) {
  if (n === 0) return;
  let reasons = map.get(integrationId);
  if (reasons === undefined) {
    reasons = new Map();
    map.set(integrationId, reasons);
  }
  reasons.set(reason, (reasons.get(reason) ?? 0) + n);
}
