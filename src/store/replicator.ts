import pg from 'pg';
import { createBackoff } from '../common/backoff.js';
import type { CentralConfig } from '../config/schema.js';
import { ErrorCodes, GatewayError, errorMessage } from '../errors.js';
import type { Logger } from '../logger.js';
import type { ActivityLog } from './activity-log.js';
import { classifyCentralError, type CentralFailure } from './central/central-errors.js';
import type { SqliteDatabase } from './database.js';

/** Replication health as the status snapshot, metrics and `status` show it. */
export interface ReplicationStatus {
  configured: boolean;
  state: 'disabled' | 'idle' | 'replicating' | 'backoff';
  pendingRows: number;
  oldestPendingAgeMs: number | null;
  replicatedRows: number;
  rejectedRows: number;
  lastSuccessAt: number | null;
  lastError: { code: string; message: string; at: number } | null;
}

export interface ReplicatorOptions {
  db: SqliteDatabase;
  central: CentralConfig;
  /** gateway.organizationId: sent for rows that carry none. */
  organizationId: string;
  gatewayId: string;
  logger: Logger;
  activity: ActivityLog;
  now?: () => number;
  /** Jitter source; tests pin it. */
  random?: () => number;
}

export interface ReplicationRunResult {
  replicated: number;
  rejected: number;
  /** Rows still waiting after the run. */
  pending: number;
}

export interface Replicator {
  /** Replicates every central.interval; jittered exponential backoff (max 5 min) while PostgreSQL is down. */
  start(): void;
  /** Waits for the current batch (bounded by the query timeout) and closes the pool. */
  stop(): Promise<void>;
  /** Drains what is pending now (`iot-gateway replicate --once`); throws a GatewayError when PostgreSQL is unusable. */
  runOnce(): Promise<ReplicationRunResult>;
  status(): ReplicationStatus;
}

/** The replicator's own activity rows: never counted as "moved rows", so they cannot feed themselves. */
const OWN_ACTIVITY_TYPES = new Set(['replicate', 'replication_rejected']);
const MAX_BACKOFF_MS = 5 * 60_000;
const REPORT_EVERY_MS = 60_000;
const STATUS_CACHE_MS = 1_000;
/** The SQLite watermark moves over committed rows once this many have gathered, or this long after the last move, and at the end of a run. */
const MARK_EVERY_ROWS = 2_000;
const MARK_EVERY_MS = 50;

interface Item {
  table: 'activity' | 'sync';
  seq: number;
  id: string;
  activityType: string | undefined;
  values: unknown[];
}

interface Cursor {
  activity: number;
  sync: number;
}

interface Rejection {
  item: Item;
  failure: CentralFailure;
}

/**
 * A local row as read (`.raw()`: an array, cheaper than an object per row): the central columns in
 * INSERT order (the local seq taken off the front), times already as ISO text. Sent as is, one
 * JSON array per row.
 */
type RawRow = unknown[];

// One statement per batch: the sync rows' INSERT is a data-modifying CTE of the activity rows'
// (a CTE runs to completion even though nothing reads it). A single statement commits on its own,
// atomically, in one round trip, so the next batch can be read from SQLite while PostgreSQL
// inserts this one. Each table's rows travel as one jsonb parameter, an array of row arrays:
// JSON.stringify is native and several times cheaper than pg's encoding of a text[] literal per
// column (unnest), and the server's cost is the same (measured). A value that does not cast
// fails the statement, and the bisect finds its row.
//
// A batch is first sent as a plain INSERT: ON CONFLICT's speculative insertion costs the server
// about a fifth more per row (measured). Only a resend (rows committed before a crash but not yet
// marked) can collide; the unique violation (23505) sends that batch again with ON CONFLICT DO
// NOTHING, which skips the rows already there. Without a conflict target it needs no SELECT
// privilege, so the ingest role stays insert-only.
function insertBatch(onConflict: string): string {
  return `
  WITH activity AS (
    INSERT INTO integration_activity_log (id, organization_id, integration_id, gateway_id, activity_type, direction, status,
      response_time_ms, error_message, error_code, metadata, created_at)
    SELECT (r->>0)::uuid, (r->>1)::uuid, (r->>2)::uuid, r->>3, r->>4, r->>5, r->>6,
      (r->>7)::integer, r->>8, r->>9, (r->>10)::jsonb, (r->>11)::timestamptz
      FROM jsonb_array_elements($1::jsonb) AS r
    ${onConflict})
  INSERT INTO integration_sync_log (id, organization_id, integration_id, gateway_id, sync_type, status, started_at,
    completed_at, duration_ms, records_processed, records_succeeded, records_failed, error_message, metadata, request_id)
  SELECT (r->>0)::uuid, (r->>1)::uuid, (r->>2)::uuid, r->>3, r->>4, r->>5, (r->>6)::timestamptz,
    (r->>7)::timestamptz, (r->>8)::integer, (r->>9)::integer, (r->>10)::integer, (r->>11)::integer, r->>12,
    (r->>13)::jsonb, r->>14
    FROM jsonb_array_elements($2::jsonb) AS r
  ${onConflict}`;
}
const INSERT_BATCH = insertBatch('');
const INSERT_BATCH_IDEMPOTENT = insertBatch('ON CONFLICT DO NOTHING');
/** unique_violation: a row of the batch is already in PostgreSQL. */
const UNIQUE_VIOLATION = '23505';
/** Index of created_at in an activity RawRow. */
const ACTIVITY_CREATED_AT = 11;

/** A batch as read, with its statement parameters encoded (while the previous batch is in flight). */
interface Batch {
  items: Item[];
  params: [string, string];
  /** The highest seq of each log in this batch or before it. */
  to: Cursor;
}

function encodeBatch(items: Item[]): [string, string] {
  const activity: unknown[] = [];
  const sync: unknown[] = [];
  for (const item of items) (item.table === 'activity' ? activity : sync).push(item.values);
  return [JSON.stringify(activity), JSON.stringify(sync)];
}

const VERIFY_SESSION = `
  SELECT session_user::text AS login,
         iot_gateway_login_org()::text AS org,
         (r.rolsuper OR r.rolbypassrls) AS bypass,
         has_table_privilege('integration_activity_log', 'INSERT') AND has_table_privilege('integration_sync_log', 'INSERT') AS can_insert
    FROM pg_roles r WHERE r.rolname = session_user`;

/**
 * Replicates the local activity and sync logs to central PostgreSQL exactly once in effect:
 * rows are read in `seq` order in small batches, inserted idempotently (ON CONFLICT DO NOTHING
 * on the gateway-made UUID) in one transaction, and marked replicated in SQLite only after
 * COMMIT. A crash in between resends rows that change nothing. Rows PostgreSQL rejects for good
 * are found by bisecting the batch and set aside with the reason.
 */
export function createReplicator(options: ReplicatorOptions): Replicator {
  const { db, central, organizationId, logger, activity } = options;
  const now = options.now ?? Date.now;
  const backoff = createBackoff({
    baseMs: central.interval,
    maxMs: MAX_BACKOFF_MS,
    jitter: 'equal',
    random: options.random ?? Math.random,
  });
  const log = logger;

  const pool = new pg.Pool({
    connectionString: central.url,
    // One connection per gateway: a fleet of gateways must not exhaust max_connections.
    max: 1,
    connectionTimeoutMillis: central.connectTimeout,
    // Bounds a batch on a half-open link (blackholed PostgreSQL); stop() waits at most this long.
    query_timeout: Math.max(30_000, central.connectTimeout * 3),
    keepAlive: true,
    idleTimeoutMillis: 60_000,
    application_name: 'iot-gateway-replicator',
  });
  pool.on('error', (err) => log.debug({ err }, 'central_idle_connection_lost'));

  // Rows after the watermark, in seq order: a range of the primary key. `seq > ?` is the run's
  // cursor (the next batch is read while the previous one is in flight); set-aside rows are
  // skipped.
  const readActivity = db
    .prepare<[string, number, number], RawRow>(
      `SELECT seq, id, coalesce(organization_id, ?), integration_id, gateway_id, activity_type, direction, status,
              response_time_ms, error_message, error_code, metadata, created_at
         FROM activity_log WHERE seq > ? AND replication_error IS NULL ORDER BY seq LIMIT ?`,
    )
    .raw(true);
  const readSync = db
    .prepare<[string, number, number], RawRow>(
      `SELECT seq, id, coalesce(organization_id, ?), integration_id, gateway_id, sync_type, status, started_at,
              completed_at, duration_ms, records_processed, records_succeeded, records_failed, error_message, metadata,
              request_id
         FROM sync_log WHERE seq > ? AND replication_error IS NULL ORDER BY seq LIMIT ?`,
    )
    .raw(true);
  const asideActivity = db.prepare('UPDATE activity_log SET replication_error = ? WHERE seq = ?');
  const asideSync = db.prepare('UPDATE sync_log SET replication_error = ? WHERE seq = ?');
  const watermarkQuery = db.prepare<[], { log: string; seq: number }>(
    'SELECT log, seq FROM replication_watermark',
  );
  // Only ever forward: a late write can never take the watermark back over committed rows.
  const advanceWatermark = db.prepare('UPDATE replication_watermark SET seq = ? WHERE log = ? AND seq < ?');
  const pendingQuery = db.prepare<[], { n: number; oldest: number | null }>(
    `WITH w AS (SELECT (SELECT seq FROM replication_watermark WHERE log = 'activity_log') AS a,
                       (SELECT seq FROM replication_watermark WHERE log = 'sync_log') AS s)
     SELECT (SELECT count(*) FROM activity_log, w WHERE seq > w.a AND replication_error IS NULL)
          + (SELECT count(*) FROM sync_log, w WHERE seq > w.s AND replication_error IS NULL) AS n,
            min((SELECT created_at FROM activity_log, w WHERE seq > w.a AND replication_error IS NULL ORDER BY seq LIMIT 1),
                coalesce((SELECT started_at FROM sync_log, w WHERE seq > w.s AND replication_error IS NULL ORDER BY seq LIMIT 1), 9e15)) AS oldest`,
  );
  const persistWatermark = db.transaction((to: Cursor) => {
    advanceWatermark.run(to.activity, 'activity_log', to.activity);
    advanceWatermark.run(to.sync, 'sync_log', to.sync);
  });

  function readWatermark(): Cursor {
    const cursor: Cursor = { activity: 0, sync: 0 };
    for (const row of watermarkQuery.all()) {
      if (row.log === 'activity_log') cursor.activity = row.seq;
      else if (row.log === 'sync_log') cursor.sync = row.seq;
    }
    return cursor;
  }

  let state: ReplicationStatus['state'] = 'idle';
  let replicatedRows = 0;
  let rejectedRows = 0;
  let lastSuccessAt: number | null = null;
  let lastError: ReplicationStatus['lastError'] = null;
  let pendingCache: { at: number; n: number; oldest: number | null } | undefined;
  let verified = false;
  /** Set once a run has checked the session again after a 42501 (see ship). */
  let sessionRechecked = false;
  const ensuredMonths = new Set<string>();
  let lastLagLogAt = -Infinity;
  let report = { rows: 0, rejected: 0, batches: 0, since: now() };
  let lastReportAt = now();

  let started = false;
  let stopping = false;
  let closed = false;
  let timer: NodeJS.Timeout | undefined;
  let failures = 0;
  let chain: Promise<unknown> = Promise.resolve();
  let current: Promise<unknown> | undefined;

  function pending(force = false): { n: number; oldest: number | null } {
    const t = now();
    if (force || pendingCache === undefined || t - pendingCache.at >= STATUS_CACHE_MS) {
      const r = pendingQuery.get()!;
      pendingCache = { at: t, n: r.n, oldest: r.oldest !== null && r.oldest < 9e15 ? r.oldest : null };
    }
    return pendingCache;
  }

  function readBatch(after: Cursor): Item[] {
    const size = central.batchSize;
    const items: Item[] = [];
    for (const row of readActivity.all(organizationId, after.activity, size)) {
      const seq = row.shift() as number;
      row[ACTIVITY_CREATED_AT] = toTimestamp(row[ACTIVITY_CREATED_AT] as number);
      items.push({
        table: 'activity',
        seq,
        id: row[0] as string,
        activityType: row[4] as string,
        values: row,
      });
    }
    for (const row of readSync.all(organizationId, after.sync, size)) {
      const seq = row.shift() as number;
      row[6] = toTimestamp(row[6] as number);
      if (row[7] !== null) row[7] = toTimestamp(row[7] as number);
      items.push({ table: 'sync', seq, id: row[0] as string, activityType: undefined, values: row });
    }
    return items;
  }

  async function verifySession(client: pg.PoolClient): Promise<void> {
    let row: { login: string; org: string | null; bypass: boolean; can_insert: boolean } | undefined;
    try {
      row = (await client.query(VERIFY_SESSION)).rows[0];
    } catch (err) {
      const failure = classifyCentralError(err, 'while checking the login');
      // A missing EXECUTE grant shows up as 42501 here: the login, not a row, is at fault.
      if (failure.kind === 'rejected') {
        throw new GatewayError(
          ErrorCodes.CENTRAL_AUTH,
          `the central login may not use the gateway schema (${failure.error.message}); make it a member of iot_gateway_ingest`,
          {
            retryable: true,
            cause: err,
          },
        );
      }
      throw failure.error;
    }
    if (row === undefined)
      throw new GatewayError(ErrorCodes.CENTRAL_AUTH, 'the central login has no role entry', {
        retryable: true,
      });
    if (!row.can_insert) {
      throw new GatewayError(
        ErrorCodes.CENTRAL_AUTH,
        `the central login ${row.login} may not insert into the log tables; make it a member of iot_gateway_ingest`,
        {
          retryable: true,
        },
      );
    }
    if (!row.bypass && row.org === null) {
      throw new GatewayError(
        ErrorCodes.CENTRAL_AUTH,
        `the central login ${row.login} is not registered to an organization; run SELECT iot_gateway_register_login('${row.login}', '<organization uuid>') as the owner`,
        { retryable: true },
      );
    }
    if (!row.bypass && row.org !== organizationId) {
      // Every row would fail the RLS check; that is a configuration error, not poison data.
      throw new GatewayError(
        ErrorCodes.CENTRAL_AUTH,
        `the central login ${row.login} belongs to organization ${row.org} but gateway.organizationId is ${organizationId}; fix one of them`,
        { retryable: true },
      );
    }
  }

  /** Creates missing monthly partitions for the batch's rows (before its insert: it takes locks). */
  async function ensurePartitions(client: pg.PoolClient, items: Item[]): Promise<void> {
    const t = now();
    // The function clamps to [now - 2 years, now + 3 months]; rows outside go to the default
    // partition. ISO strings of the same width compare like the times they name.
    const lo = new Date(t - 700 * 86_400_000).toISOString();
    const hi = new Date(t + 60 * 86_400_000).toISOString();
    const months = new Map<string, string>();
    for (const item of items) {
      if (item.table !== 'activity') continue;
      const at = item.values[ACTIVITY_CREATED_AT] as string;
      const key = at.slice(0, 7);
      if (ensuredMonths.has(key) || at.length !== lo.length || at < lo || at > hi) continue;
      months.set(key, at);
    }
    if (months.size === 0) return;
    const stamps = [...months.values()].sort();
    try {
      await client.query('SELECT iot_gateway_ensure_partitions($1::timestamptz, $2::timestamptz)', [
        stamps[0],
        stamps.at(-1),
      ]);
      for (const key of months.keys()) ensuredMonths.add(key);
    } catch (err) {
      const failure = classifyCentralError(err, 'while creating partitions');
      if (failure.kind !== 'rejected') throw failure.error;
      // Not fatal: the rows land in the default partition.
      log.warn({ code: failure.sqlstate, reason: failure.error.message }, 'central_partitions_not_created');
      for (const key of months.keys()) ensuredMonths.add(key);
    }
  }

  /** One statement per batch: it commits on its own, all of its rows or none. */
  async function insert(client: pg.PoolClient, items: Item[], params = encodeBatch(items)): Promise<void> {
    try {
      await client.query({ name: 'iot_gw_insert_batch', text: INSERT_BATCH, values: params });
    } catch (err) {
      if ((err as { code?: unknown }).code !== UNIQUE_VIOLATION) throw err;
      // A resend: nothing of this batch was stored by the failed statement; skip what is there.
      await client.query({
        name: 'iot_gw_insert_batch_idempotent',
        text: INSERT_BATCH_IDEMPOTENT,
        values: params,
      });
    }
  }

  /**
   * Inserts items; on a rejection, bisects to find the rows PostgreSQL refuses and sets them
   * aside. Returns the committed items: the caller marks them in SQLite (only after COMMIT; a
   * crash before that resends rows that then change nothing).
   */
  async function ship(
    client: pg.PoolClient,
    items: Item[],
    rejected: Rejection[],
    params?: [string, string],
  ): Promise<Item[]> {
    try {
      await insert(client, items, params);
      return items;
    } catch (err) {
      const failure =
        err instanceof GatewayError
          ? { kind: 'local' as const, error: err }
          : classifyCentralError(err, 'while inserting');
      if (failure.kind !== 'rejected') throw failure.error;
      // 42501 is also what every row gets when the login lost its grant after verifySession (a
      // REVOKE on a pooled session): ask again, once per run, before setting any row aside.
      if (failure.sqlstate === '42501' && !sessionRechecked) {
        sessionRechecked = true;
        await verifySession(client);
      }
      if (items.length === 1) {
        const item = items[0]!;
        const reason = `${failure.sqlstate ?? ''}: ${failure.error.message}`.slice(0, 1000);
        (item.table === 'activity' ? asideActivity : asideSync).run(reason, item.seq);
        rejected.push({ item, failure });
        log.warn(
          { table: item.table, id: item.id, code: failure.sqlstate, reason: failure.error.message },
          'replication_row_rejected',
        );
        return [];
      }
      const mid = Math.ceil(items.length / 2);
      const left = await ship(client, items.slice(0, mid), rejected);
      return left.concat(await ship(client, items.slice(mid), rejected));
    }
  }

  async function connect(): Promise<pg.PoolClient> {
    let client: pg.PoolClient;
    try {
      client = await pool.connect();
    } catch (err) {
      throw classifyCentralError(err, 'while connecting').error;
    }
    // While checked out, a dropped socket is emitted on the client as well as failing the
    // pending query; the query's rejection is what we act on.
    client.on('error', ignoreSocketError);
    return client;
  }

  async function doRun(): Promise<ReplicationRunResult> {
    if (closed) throw new GatewayError(ErrorCodes.ABORTED, 'the replicator is stopped');
    state = 'replicating';
    sessionRechecked = false;
    const result = { replicated: 0, rejected: 0, pending: 0 };
    const rejected: Rejection[] = [];
    // How far PostgreSQL has committed (every row up to here is there or set aside), and how
    // much of that the SQLite watermark does not say yet.
    let committedTo: Cursor | undefined;
    let unmarkedRows = 0;
    let flushedAt = performance.now();
    const flush = () => {
      if (committedTo === undefined || unmarkedRows === 0) return;
      persistWatermark(committedTo);
      unmarkedRows = 0;
      flushedAt = performance.now();
    };
    let client: pg.PoolClient | undefined;
    // Set on any failure: the connection is then discarded, not returned to the pool.
    let broken: Error | undefined;
    try {
      client = await connect();
      if (!verified) {
        await verifySession(client);
        verified = true;
      }
      // Bounded: at most the batches needed for what is pending now, plus one for rows arriving meanwhile.
      const maxBatches = Math.ceil(pending(true).n / central.batchSize) + 1;
      let cursor = readWatermark();
      let batches = 0;
      let exhausted = false;
      /** The next batch in seq order, or undefined when the run is done. */
      const nextBatch = (): Batch | undefined => {
        if (exhausted || stopping || batches >= maxBatches) return undefined;
        let items: Item[];
        try {
          // Moves the watermark over what was committed so far. Every move is a synchronous
          // SQLite commit (an fsync); a move that waits costs at most a harmless resend after a crash.
          if (unmarkedRows >= MARK_EVERY_ROWS || performance.now() - flushedAt >= MARK_EVERY_MS) flush();
          items = readBatch(cursor);
        } catch (err) {
          throw new GatewayError(
            ErrorCodes.STORE_WRITE,
            `cannot update the local log: ${errorMessage(err)}`,
            {
              retryable: true,
              cause: err,
            },
          );
        }
        let activityCount = 0;
        let activityMax = cursor.activity;
        let syncMax = cursor.sync;
        for (const item of items) {
          if (item.table === 'activity') {
            activityCount++;
            if (item.seq > activityMax) activityMax = item.seq;
          } else if (item.seq > syncMax) syncMax = item.seq;
        }
        // A short read means nothing more is pending now: no further read this run.
        if (activityCount < central.batchSize && items.length - activityCount < central.batchSize)
          exhausted = true;
        if (items.length === 0) return undefined;
        cursor = { activity: activityMax, sync: syncMax };
        batches++;
        return { items, params: encodeBatch(items), to: cursor };
      };
      // Pipelined on one connection: while PostgreSQL inserts batch n, this process marks the
      // batches before it and reads and encodes batch n + 1. Each batch is one statement that
      // commits on its own, and its rows are marked only after that.
      for (let batch = nextBatch(); batch !== undefined;) {
        await ensurePartitions(client, batch.items);
        const before = rejected.length;
        const shipping = ship(client, batch.items, rejected, batch.params);
        let next: Batch | undefined;
        let readFailure: unknown;
        try {
          next = nextBatch();
        } catch (err) {
          readFailure = err;
        }
        const committed = await shipping;
        // Every row of the batch is committed or set aside: the watermark may pass it, with a
        // later read or at the end of the run, never before.
        committedTo = batch.to;
        unmarkedRows += batch.items.length;
        const rejectedNow = rejected.length - before;
        result.replicated += committed.length;
        result.rejected += rejectedNow;
        // Counted per batch: a later batch failing does not undo this one.
        replicatedRows += committed.length;
        rejectedRows += rejectedNow;
        report.batches++;
        report.rows += committed.filter((i) => !OWN_ACTIVITY_TYPES.has(i.activityType ?? '')).length;
        if (readFailure !== undefined) throw readFailure;
        batch = next;
      }
      flush();
      lastSuccessAt = now();
      if (lastError !== null) log.info({ after: lastError.code }, 'replication_recovered');
      lastError = null;
      failures = 0;
      state = 'idle';
    } catch (err) {
      const failure =
        err instanceof GatewayError ? err : classifyCentralError(err, 'while replicating').error;
      verified = false;
      broken = failure;
      onFailure(failure);
      throw failure;
    } finally {
      // A failure after a COMMIT must not lose that batch's mark (a lost mark only means a resend).
      try {
        flush();
      } catch (err) {
        log.error({ err }, 'replication_mark_failed');
      }
      if (client !== undefined) {
        client.removeListener('error', ignoreSocketError);
        // The connection stays open between runs unless something went wrong on it.
        client.release(broken);
      }
      recordRejections(rejected);
      result.pending = pending(true).n;
      afterRun(result.pending);
    }
    return result;
  }

  function onFailure(err: GatewayError): void {
    state = started && !stopping ? 'backoff' : 'idle';
    const same = lastError?.code === err.code;
    lastError = { code: err.code, message: err.message, at: now() };
    if (same) {
      log.debug({ code: err.code, reason: err.message }, 'replication_failed');
      return;
    }
    // One clear line per kind of trouble, not one per retry.
    log.error({ code: err.code, reason: err.message, sqlstate: err.details?.sqlstate }, 'replication_failed');
    activity.record({
      activityType: 'replicate',
      direction: 'outgoing',
      status: 'error',
      errorCode: err.code,
      errorMessage: err.message,
      metadata: { sqlstate: err.details?.sqlstate ?? null },
    });
  }

  function recordRejections(rejected: Rejection[]): void {
    if (rejected.length === 0) return;
    // Rejections of our own rejection rows are not reported again: no loop of rows about rows.
    if (rejected.every((r) => OWN_ACTIVITY_TYPES.has(r.item.activityType ?? ''))) return;
    activity.record({
      activityType: 'replication_rejected',
      direction: 'outgoing',
      status: 'failed',
      errorCode: ErrorCodes.CENTRAL_REJECTED,
      errorMessage: rejected[0]!.failure.error.message,
      metadata: {
        count: rejected.length,
        ids: rejected.slice(0, 20).map((r) => r.item.id),
        sqlstates: [...new Set(rejected.map((r) => r.failure.sqlstate))],
      },
    });
  }

  function afterRun(pendingRows: number): void {
    const t = now();
    if (pendingRows > 0 && t - lastLagLogAt >= REPORT_EVERY_MS) {
      lastLagLogAt = t;
      log.info(
        { pendingRows, oldestPendingAgeMs: pendingCache?.oldest == null ? null : t - pendingCache.oldest },
        'replication_lag',
      );
    }
    if (t - lastReportAt >= REPORT_EVERY_MS && report.rows > 0) {
      activity.record({
        activityType: 'replicate',
        direction: 'outgoing',
        status: 'success',
        metadata: { rows: report.rows, batches: report.batches, since: report.since, pending: pendingRows },
      });
      lastReportAt = t;
      report = { rows: 0, rejected: 0, batches: 0, since: t };
    }
  }

  function runOnce(): Promise<ReplicationRunResult> {
    const run = chain.then(doRun);
    chain = run.catch(() => {});
    return run;
  }

  function schedule(delay: number): void {
    if (stopping) return;
    timer = setTimeout(() => {
      timer = undefined;
      const run = runOnce().then(
        (r) => {
          // A full drain left rows behind (they arrived meanwhile): go again soon, yielding first.
          schedule(r.pending > 0 ? 0 : central.interval);
        },
        () => {
          failures++;
          const delay = backoff.delay(failures - 1);
          log.debug({ failures, retryInMs: delay }, 'replication_backoff');
          schedule(delay);
        },
      );
      current = run;
    }, delay);
  }

  return {
    start() {
      if (started) return;
      started = true;
      schedule(0);
    },
    async stop() {
      if (closed) return;
      stopping = true;
      if (timer) clearTimeout(timer);
      const bound = Math.max(30_000, central.connectTimeout * 3) + 1_000;
      let boundTimer: NodeJS.Timeout | undefined;
      await Promise.race([
        Promise.allSettled([current, chain]),
        new Promise((resolve) => {
          boundTimer = setTimeout(resolve, bound);
        }),
      ]);
      clearTimeout(boundTimer);
      closed = true;
      await pool.end().catch((err: unknown) => log.debug({ err }, 'central_pool_close_failed'));
    },
    runOnce,
    status() {
      const p = pending();
      return {
        configured: true,
        state,
        pendingRows: p.n,
        oldestPendingAgeMs: p.oldest === null ? null : Math.max(0, now() - p.oldest),
        replicatedRows,
        rejectedRows,
        lastSuccessAt,
        lastError,
      };
    },
  };
}

function ignoreSocketError(): void {}

/** The last second turned into ISO text ("…T12:34:56."): log rows come in runs of the same second. */
let isoSecond = Number.NaN;
let isoPrefix = '';

/**
 * ms since epoch → ISO text; always the same text for the same value, so a resend carries the
 * same created_at (part of the partitioned table's unique key). A value no Date can hold is
 * sent as is and rejected by PostgreSQL as that row's problem.
 */
export function toTimestamp(ms: number): string {
  if (!Number.isFinite(ms) || Math.abs(ms) > 8.64e15) return String(ms);
  if (!Number.isInteger(ms)) return new Date(ms).toISOString();
  const second = Math.floor(ms / 1000);
  if (second !== isoSecond) {
    // Every ISO form ends in ".sssZ"; what comes before it is the second.
    isoPrefix = new Date(second * 1000).toISOString().slice(0, -4);
    isoSecond = second;
  }
  const millis = ms - second * 1000;
  return isoPrefix + (millis < 10 ? '00' : millis < 100 ? '0' : '') + millis + 'Z';
}
