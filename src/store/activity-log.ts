import { v7 as uuidv7 } from 'uuid';
import type { Logger } from '../logger.js';
import type { SqliteDatabase } from './database.js';

export type ActivityDirection = 'outgoing' | 'incoming' | 'internal';
export const ACTIVITY_STATUSES = ['started', 'success', 'failed', 'error'] as const;
export type ActivityStatus = (typeof ACTIVITY_STATUSES)[number];
export type SyncType = 'import' | 'export' | 'bidirectional';

export interface ActivityEntry {
  /** NULL for the gateway's own operations (auth failures, config reloads, store events). */
  integrationId?: string | null;
  activityType: string;
  direction: ActivityDirection;
  status: ActivityStatus;
  responseTimeMs?: number | null;
  errorMessage?: string | null;
  errorCode?: string | null;
  /** requestId, attempt, counts …; never secrets. */
  metadata?: Record<string, unknown>;
}

export interface ActivityRow extends Required<Omit<ActivityEntry, 'metadata'>> {
  id: string;
  organizationId: string | null;
  gatewayId: string;
  metadata: Record<string, unknown>;
  createdAt: number;
  /** In central PostgreSQL: the replication watermark has passed it and it was not set aside. */
  replicated: boolean;
}

export interface SyncEntry {
  integrationId: string;
  syncType: SyncType;
  status: ActivityStatus;
  startedAt: number;
  completedAt: number;
  recordsProcessed: number;
  recordsSucceeded: number;
  recordsFailed: number;
  errorMessage?: string | null;
  requestId: string;
  metadata?: Record<string, unknown>;
}

export interface ActivityFilter {
  integrationId?: string;
  status?: ActivityStatus;
  activityType?: string;
  /** ms since epoch */
  since?: number;
  limit?: number;
}

/** The one module the rest of the code reports operations to (SPEC §7). */
export interface ActivityLog {
  /** Records a row and returns its UUIDv7. Never throws: a failed write is logged with the row. */
  record(entry: ActivityEntry): string;
  recordSync(entry: SyncEntry): string;
  list(filter?: ActivityFilter): ActivityRow[];
  /** Failures (`failed`/`error`) of one integration since a time, for alerting. */
  countFailures(integrationId: string, since: number): number;
  /** Called after each successful `record`; listeners cannot break recording. */
  onRecord(listener: (row: ActivityRow) => void): () => void;
  /** Rows that could not be written (disk full, …) since start. */
  readonly writeFailures: number;
}

export interface ActivityLogOptions {
  db: SqliteDatabase;
  gatewayId: string;
  organizationId?: string | undefined;
  logger: Logger;
  now?: () => number;
}

export function createActivityLog(options: ActivityLogOptions): ActivityLog {
  const { db, gatewayId, logger } = options;
  const organizationId = options.organizationId ?? null;
  const now = options.now ?? Date.now;
  const listeners = new Set<(row: ActivityRow) => void>();
  let writeFailures = 0;

  const insertActivity = db.prepare(
    `INSERT INTO activity_log (id, organization_id, integration_id, gateway_id, activity_type, direction, status,
       response_time_ms, error_message, error_code, metadata, created_at)
     VALUES (@id, @organizationId, @integrationId, @gatewayId, @activityType, @direction, @status,
       @responseTimeMs, @errorMessage, @errorCode, @metadata, @createdAt)`,
  );
  const insertSync = db.prepare(
    `INSERT INTO sync_log (id, organization_id, integration_id, gateway_id, sync_type, status, started_at, completed_at,
       duration_ms, records_processed, records_succeeded, records_failed, error_message, metadata, request_id)
     VALUES (@id, @organizationId, @integrationId, @gatewayId, @syncType, @status, @startedAt, @completedAt,
       @durationMs, @recordsProcessed, @recordsSucceeded, @recordsFailed, @errorMessage, @metadata, @requestId)`,
  );
  const failures = db.prepare(
    `SELECT count(*) AS n FROM activity_log
      WHERE integration_id = ? AND created_at >= ? AND status IN ('failed', 'error') AND activity_type <> 'alert'`,
  );

  return {
    get writeFailures() {
      return writeFailures;
    },
    record(entry) {
      const row: ActivityRow = {
        id: uuidv7(),
        organizationId,
        gatewayId,
        integrationId: entry.integrationId ?? null,
        activityType: entry.activityType,
        direction: entry.direction,
        status: entry.status,
        responseTimeMs: entry.responseTimeMs ?? null,
        errorMessage: entry.errorMessage ?? null,
        errorCode: entry.errorCode ?? null,
        metadata: entry.metadata ?? {},
        createdAt: now(),
        replicated: false,
      };
      try {
        insertActivity.run({ ...row, metadata: JSON.stringify(row.metadata) });
      } catch (err) {
        writeFailures++;
        logger.error({ err, activity: row }, 'activity_write_failed');
        return row.id;
      }
      for (const listener of listeners) {
        try {
          listener(row);
        } catch (err) {
          logger.error({ err }, 'activity_listener_failed');
        }
      }
      return row.id;
    },
    recordSync(entry) {
      const id = uuidv7();
      const row = {
        id,
        organizationId,
        gatewayId,
        integrationId: entry.integrationId,
        syncType: entry.syncType,
        status: entry.status,
        startedAt: entry.startedAt,
        completedAt: entry.completedAt,
        durationMs: entry.completedAt - entry.startedAt,
        recordsProcessed: entry.recordsProcessed,
        recordsSucceeded: entry.recordsSucceeded,
        recordsFailed: entry.recordsFailed,
        errorMessage: entry.errorMessage ?? null,
        metadata: JSON.stringify(entry.metadata ?? {}),
        requestId: entry.requestId,
      };
      try {
        insertSync.run(row);
      } catch (err) {
        writeFailures++;
        logger.error({ err, sync: row }, 'sync_log_write_failed');
      }
      return id;
    },
    list(filter = {}) {
      const where: string[] = [];
      const params: unknown[] = [];
      if (filter.integrationId !== undefined) {
        where.push('integration_id = ?');
        params.push(filter.integrationId);
      }
      if (filter.status !== undefined) {
        where.push('status = ?');
        params.push(filter.status);
      }
      if (filter.activityType !== undefined) {
        where.push('activity_type = ?');
        params.push(filter.activityType);
      }
      if (filter.since !== undefined) {
        where.push('created_at >= ?');
        params.push(filter.since);
      }
      params.push(Math.min(Math.max(filter.limit ?? 50, 1), 10_000));
      // The WHERE clause is assembled from the constant fragments above only; values are parameters.
      const sql =
        "SELECT *, seq <= (SELECT seq FROM replication_watermark WHERE log = 'activity_log') AND replication_error IS NULL AS replicated FROM activity_log" +
        (where.length ? ' WHERE ' + where.join(' AND ') : '') +
        ' ORDER BY seq DESC LIMIT ?';
      return (db.prepare(sql).all(...params) as Record<string, unknown>[]).map(toActivityRow);
    },
    countFailures(integrationId, since) {
      return (failures.get(integrationId, since) as { n: number }).n;
    },
    onRecord(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
  };
}

function toActivityRow(r: Record<string, unknown>): ActivityRow {
  return {
    id: r.id as string,
    organizationId: (r.organization_id as string | null) ?? null,
    integrationId: (r.integration_id as string | null) ?? null,
    gatewayId: r.gateway_id as string,
    activityType: r.activity_type as string,
    direction: r.direction as ActivityDirection,
    status: r.status as ActivityStatus,
    responseTimeMs: (r.response_time_ms as number | null) ?? null,
    errorMessage: (r.error_message as string | null) ?? null,
    errorCode: (r.error_code as string | null) ?? null,
    metadata: JSON.parse(r.metadata as string) as Record<string, unknown>,
    createdAt: r.created_at as number,
    replicated: r.replicated === 1,
  };
}
