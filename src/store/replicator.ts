import pg from 'pg';
import type { CentralConfig } from '../config/schema.js';
import { ErrorCodes, GatewayError, errorMessage } from '../errors.js';
import type { ReplicationStatus } from '../gateway/status.js';
import type { Logger } from '../logger.js';
import type { ActivityLog } from './activity-log.js';
import { classifyCentralError, type CentralFailure } from './central/central-errors.js';
import type { SqliteDatabase } from './database.js';

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

interface ActivitySqlRow {
  seq: number;
  id: string;
  organization_id: string | null;
  integration_id: string | null;
  gateway_id: string;
  activity_type: string;
  direction: string;
  status: string;
  response_time_ms: number | null;
  error_message: string | null;
  error_code: string | null;
  metadata: string;
  created_at: number;
}

interface SyncSqlRow {
  seq: number;
  id: string;
  organization_id: string | null;
  integration_id: string;
  gateway_id: string;
  sync_type: string;
  status: string;
  started_at: number;
  completed_at: number | null;
  duration_ms: number | null;
  records_processed: number;
  records_succeeded: number;
  records_failed: number;
  error_message: string | null;
  metadata: string;
  request_id: string | null;
}

// One statement per table per batch; ON CONFLICT DO NOTHING without a target needs no SELECT
// privilege, so the ingest role stays insert-only. Columns travel as arrays (one round trip).
const INSERT_ACTIVITY = `
  INSERT INTO integration_activity_log (id, organization_id, integration_id, gateway_id, activity_type, direction, status,
    response_time_ms, error_message, error_code, metadata, created_at)
  SELECT u.id, u.organization_id, u.integration_id, u.gateway_id, u.activity_type, u.direction, u.status,
    u.response_time_ms, u.error_message, u.error_code, u.metadata::jsonb, u.created_at
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], $8::integer[],
                $9::text[], $10::text[], $11::text[], $12::timestamptz[])
      AS u(id, organization_id, integration_id, gateway_id, activity_type, direction, status, response_time_ms,
           error_message, error_code, metadata, created_at)
  ON CONFLICT DO NOTHING`;
const ACTIVITY_COLUMNS = 12;

const INSERT_SYNC = `
  INSERT INTO integration_sync_log (id, organization_id, integration_id, gateway_id, sync_type, status, started_at,
    completed_at, duration_ms, records_processed, records_succeeded, records_failed, error_message, metadata, request_id)
  SELECT u.id, u.organization_id, u.integration_id, u.gateway_id, u.sync_type, u.status, u.started_at,
    u.completed_at, u.duration_ms, u.records_processed, u.records_succeeded, u.records_failed, u.error_message,
    u.metadata::jsonb, u.request_id
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::timestamptz[],
                $8::timestamptz[], $9::integer[], $10::integer[], $11::integer[], $12::integer[], $13::text[], $14::text[], $15::text[])
      AS u(id, organization_id, integration_id, gateway_id, sync_type, status, started_at, completed_at, duration_ms,
           records_processed, records_succeeded, records_failed, error_message, metadata, request_id)
  ON CONFLICT DO NOTHING`;
const SYNC_COLUMNS = 15;

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
  const random = options.random ?? Math.random;
  const log = logger;

  const pool = new pg.Pool({
    connectionString: central.url,
    max: 1,
    connectionTimeoutMillis: central.connectTimeout,
    // Bounds a batch on a half-open link (blackholed PostgreSQL); stop() waits at most this long.
    query_timeout: Math.max(30_000, central.connectTimeout * 3),
    keepAlive: true,
    idleTimeoutMillis: 60_000,
    application_name: 'iot-gateway-replicator',
  });
  pool.on('error', (err) => log.debug({ err }, 'central_idle_connection_lost'));

  // `seq > ?`: within a run the next batch is read while the previous one is still in flight.
  const readActivity = db.prepare<[number, number], ActivitySqlRow>(
    `SELECT seq, id, organization_id, integration_id, gateway_id, activity_type, direction, status, response_time_ms,
            error_message, error_code, metadata, created_at
       FROM activity_log WHERE replicated_at IS NULL AND replication_error IS NULL AND seq > ? ORDER BY seq LIMIT ?`,
  );
  const readSync = db.prepare<[number, number], SyncSqlRow>(
    `SELECT seq, id, organization_id, integration_id, gateway_id, sync_type, status, started_at, completed_at, duration_ms,
            records_processed, records_succeeded, records_failed, error_message, metadata, request_id
       FROM sync_log WHERE replicated_at IS NULL AND replication_error IS NULL AND seq > ? ORDER BY seq LIMIT ?`,
  );
  const markActivity = db.prepare(
    'UPDATE activity_log SET replicated_at = ? WHERE seq IN (SELECT value FROM json_each(?))',
  );
  const markSync = db.prepare(
    'UPDATE sync_log SET replicated_at = ? WHERE seq IN (SELECT value FROM json_each(?))',
  );
  const asideActivity = db.prepare('UPDATE activity_log SET replication_error = ? WHERE seq = ?');
  const asideSync = db.prepare('UPDATE sync_log SET replication_error = ? WHERE seq = ?');
  const pendingQuery = db.prepare<[], { n: number; oldest: number | null }>(
    `SELECT (SELECT count(*) FROM activity_log WHERE replicated_at IS NULL AND replication_error IS NULL)
          + (SELECT count(*) FROM sync_log WHERE replicated_at IS NULL AND replication_error IS NULL) AS n,
            min((SELECT created_at FROM activity_log WHERE replicated_at IS NULL AND replication_error IS NULL ORDER BY seq LIMIT 1),
                coalesce((SELECT started_at FROM sync_log WHERE replicated_at IS NULL AND replication_error IS NULL ORDER BY seq LIMIT 1), 9e15)) AS oldest`,
  );
  const markReplicated = db.transaction((items: Item[], at: number) => {
    const activitySeqs = items.filter((i) => i.table === 'activity').map((i) => i.seq);
    const syncSeqs = items.filter((i) => i.table === 'sync').map((i) => i.seq);
    if (activitySeqs.length) markActivity.run(at, JSON.stringify(activitySeqs));
    if (syncSeqs.length) markSync.run(at, JSON.stringify(syncSeqs));
  });

  let state: ReplicationStatus['state'] = 'idle';
  let replicatedRows = 0;
  let rejectedRows = 0;
  let lastSuccessAt: number | null = null;
  let lastError: ReplicationStatus['lastError'] = null;
  let pendingCache: { at: number; n: number; oldest: number | null } | undefined;
  let verified = false;
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
    for (const r of readActivity.all(after.activity, size)) {
      items.push({
        table: 'activity',
        seq: r.seq,
        id: r.id,
        activityType: r.activity_type,
        values: [
          r.id,
          r.organization_id ?? organizationId,
          r.integration_id,
          r.gateway_id,
          r.activity_type,
          r.direction,
          r.status,
          r.response_time_ms,
          r.error_message,
          r.error_code,
          r.metadata,
          toTimestamp(r.created_at),
        ],
      });
    }
    for (const r of readSync.all(after.sync, size)) {
      items.push({
        table: 'sync',
        seq: r.seq,
        id: r.id,
        activityType: undefined,
        values: [
          r.id,
          r.organization_id ?? organizationId,
          r.integration_id,
          r.gateway_id,
          r.sync_type,
          r.status,
          toTimestamp(r.started_at),
          r.completed_at === null ? null : toTimestamp(r.completed_at),
          r.duration_ms,
          r.records_processed,
          r.records_succeeded,
          r.records_failed,
          r.error_message,
          r.metadata,
          r.request_id,
        ],
      });
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

  /** Creates missing monthly partitions for the batch's rows (outside the insert transaction: it takes locks). */
  async function ensurePartitions(client: pg.PoolClient, items: Item[]): Promise<void> {
    const t = now();
    // The function clamps to [now - 2 years, now + 3 months]; rows outside go to the default
    // partition. ISO strings of the same width compare like the times they name.
    const lo = new Date(t - 700 * 86_400_000).toISOString();
    const hi = new Date(t + 60 * 86_400_000).toISOString();
    const months = new Map<string, string>();
    for (const item of items) {
      if (item.table !== 'activity') continue;
      const at = item.values[11] as string;
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

  /**
   * One transaction per batch. `whileWaiting` runs once the first INSERT is on the wire: the
   * SQLite work of the neighbouring batches (mark the previous, read the next) overlaps with
   * PostgreSQL's instead of adding to it.
   */
  async function insert(client: pg.PoolClient, items: Item[], whileWaiting?: () => void): Promise<void> {
    const activityItems = items.filter((i) => i.table === 'activity');
    const syncItems = items.filter((i) => i.table === 'sync');
    await client.query('BEGIN');
    try {
      const first = activityItems.length
        ? client.query({
            name: 'iot_gw_insert_activity',
            text: INSERT_ACTIVITY,
            values: columns(activityItems, ACTIVITY_COLUMNS),
          })
        : client.query({
            name: 'iot_gw_insert_sync',
            text: INSERT_SYNC,
            values: columns(syncItems, SYNC_COLUMNS),
          });
      let overlapError: unknown;
      try {
        whileWaiting?.();
      } catch (err) {
        overlapError = new GatewayError(
          ErrorCodes.STORE_WRITE,
          `cannot update the local log: ${errorMessage(err)}`,
          { retryable: true, cause: err },
        );
      }
      await first;
      if (overlapError !== undefined) throw overlapError;
      if (activityItems.length && syncItems.length) {
        await client.query({
          name: 'iot_gw_insert_sync',
          text: INSERT_SYNC,
          values: columns(syncItems, SYNC_COLUMNS),
        });
      }
      await client.query('COMMIT');
    } catch (err) {
      await client.query('ROLLBACK').catch(() => {});
      throw err;
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
    whileWaiting?: () => void,
  ): Promise<Item[]> {
    try {
      await insert(client, items, whileWaiting);
      return items;
    } catch (err) {
      const failure =
        err instanceof GatewayError
          ? { kind: 'local' as const, error: err }
          : classifyCentralError(err, 'while inserting');
      if (failure.kind !== 'rejected') throw failure.error;
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

  async function doRun(): Promise<ReplicationRunResult> {
    if (closed) throw new GatewayError(ErrorCodes.ABORTED, 'the replicator is stopped');
    state = 'replicating';
    const result = { replicated: 0, rejected: 0, pending: 0 };
    const rejected: Rejection[] = [];
    // Committed in PostgreSQL, not yet marked in SQLite.
    let unmarked: Item[] = [];
    const flush = () => {
      if (unmarked.length === 0) return;
      markReplicated(unmarked, now());
      unmarked = [];
    };
    let client: pg.PoolClient | undefined;
    let clientError: unknown;
    try {
      try {
        client = await pool.connect();
      } catch (err) {
        throw classifyCentralError(err, 'while connecting').error;
      }
      // While checked out, a dropped socket is emitted on the client as well as failing the
      // pending query; the query's rejection is what we act on.
      client.on('error', ignoreSocketError);
      if (!verified) {
        await verifySession(client);
        verified = true;
      }
      // Bounded: at most the batches needed for what is pending now, plus one for rows arriving meanwhile.
      const maxBatches = Math.ceil(pending(true).n / central.batchSize) + 1;
      let cursor: Cursor = { activity: 0, sync: 0 };
      let items = readBatch(cursor);
      for (let batch = 0; batch < maxBatches && items.length > 0 && !stopping; batch++) {
        await ensurePartitions(client, items);
        const activityCount = items.filter((i) => i.table === 'activity').length;
        const full = activityCount >= central.batchSize || items.length - activityCount >= central.batchSize;
        cursor = {
          activity: Math.max(
            cursor.activity,
            ...items.filter((i) => i.table === 'activity').map((i) => i.seq),
          ),
          sync: Math.max(cursor.sync, ...items.filter((i) => i.table === 'sync').map((i) => i.seq)),
        };
        const after = cursor;
        let next: Item[] | undefined;
        const overlap = () => {
          flush();
          next = full ? readBatch(after) : [];
        };
        const before = rejected.length;
        const committed = await ship(client, items, rejected, overlap);
        if (next === undefined) overlap(); // a bisect ran instead of the overlapped path
        unmarked = committed;
        const rejectedNow = rejected.length - before;
        result.replicated += committed.length;
        result.rejected += rejectedNow;
        // Counted per batch: a later batch failing does not undo this one.
        replicatedRows += committed.length;
        rejectedRows += rejectedNow;
        report.batches++;
        report.rows += committed.filter((i) => !OWN_ACTIVITY_TYPES.has(i.activityType ?? '')).length;
        items = next ?? [];
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
      clientError = failure;
      verified = false;
      onFailure(failure);
      throw failure;
    } finally {
      // A failure after a COMMIT must not lose that batch's mark (a lost mark only means a resend).
      try {
        flush();
      } catch (err) {
        log.error({ err }, 'replication_mark_failed');
      }
      client?.removeListener('error', ignoreSocketError);
      client?.release(clientError instanceof Error ? clientError : undefined);
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
          const cap = Math.min(MAX_BACKOFF_MS, central.interval * 2 ** Math.min(failures - 1, 20));
          const delay = Math.round(cap / 2 + (random() * cap) / 2);
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

/** Column-major arrays for unnest. */
function columns(items: Item[], width: number): unknown[][] {
  const cols: unknown[][] = Array.from({ length: width }, () => new Array<unknown>(items.length));
  items.forEach((item, r) => {
    for (let c = 0; c < width; c++) cols[c]![r] = item.values[c];
  });
  return cols;
}

/**
 * ms since epoch → ISO text; always the same text for the same value, so a resend carries the
 * same created_at (part of the partitioned table's unique key). A value no Date can hold is
 * sent as is and rejected by PostgreSQL as that row's problem.
 */
function toTimestamp(ms: number): string {
  return Number.isFinite(ms) && Math.abs(ms) <= 8.64e15 ? new Date(ms).toISOString() : String(ms);
}
