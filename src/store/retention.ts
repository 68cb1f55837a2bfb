import type { Config } from '../config/schema.js';
import type { Logger } from '../logger.js';
import type { ActivityLog } from './activity-log.js';
import type { SqliteDatabase } from './database.js';

export interface RetentionOptions {
  db: SqliteDatabase;
  retention: Pick<Config['retention'], 'localReplicated' | 'localUnreplicated'>;
  logger: Logger;
  activity: ActivityLog;
  now?: () => number;
  /** Rows deleted per transaction, so writers (the device path) wait for one short chunk at most. */
  chunkSize?: number;
}

export interface RetentionResult {
  /** Replicated rows older than retention.localReplicated, deleted as planned. */
  deletedReplicated: number;
  /** Rows never replicated (pending or set aside) older than retention.localUnreplicated: data lost centrally. */
  droppedUnreplicated: number;
}

export interface Retention {
  /** One pass; the daemon calls it on retention.schedule (node-cron). */
  run(): RetentionResult;
}

/** Upper bound of chunks per table and kind in one run; the next run continues. */
const MAX_CHUNKS = 2_000;

/**
 * Local retention of the activity and sync logs: replicated rows go after
 * `retention.localReplicated`; rows PostgreSQL never received are kept up to
 * `retention.localUnreplicated` and then dropped, every drop counted, logged and recorded.
 */
export function createRetention(options: RetentionOptions): Retention {
  const { db, retention, logger, activity } = options;
  const now = options.now ?? Date.now;
  const chunk = options.chunkSize ?? 5_000;

  // Constant SQL per table; seq subqueries keep each DELETE to one bounded chunk. A row is
  // replicated when the table's watermark has passed it and it was not set aside.
  const statements = {
    activityReplicated: db.prepare(
      `DELETE FROM activity_log WHERE seq IN (SELECT seq FROM activity_log WHERE created_at < ? AND replication_error IS NULL
         AND seq <= (SELECT seq FROM replication_watermark WHERE log = 'activity_log') LIMIT ?)`,
    ),
    activityUnreplicated: db.prepare(
      `DELETE FROM activity_log WHERE seq IN (SELECT seq FROM activity_log WHERE created_at < ? AND (replication_error IS NOT NULL
         OR seq > (SELECT seq FROM replication_watermark WHERE log = 'activity_log')) LIMIT ?)`,
    ),
    syncReplicated: db.prepare(
      `DELETE FROM sync_log WHERE seq IN (SELECT seq FROM sync_log WHERE started_at < ? AND replication_error IS NULL
         AND seq <= (SELECT seq FROM replication_watermark WHERE log = 'sync_log') LIMIT ?)`,
    ),
    syncUnreplicated: db.prepare(
      `DELETE FROM sync_log WHERE seq IN (SELECT seq FROM sync_log WHERE started_at < ? AND (replication_error IS NOT NULL
         OR seq > (SELECT seq FROM replication_watermark WHERE log = 'sync_log')) LIMIT ?)`,
    ),
  };

  function drain(statement: (typeof statements)[keyof typeof statements], cutoff: number): number {
    let total = 0;
    for (let i = 0; i < MAX_CHUNKS; i++) {
      // Each run() is its own implicit transaction.
      const { changes } = statement.run(cutoff, chunk);
      total += changes;
      if (changes < chunk) break;
    }
    return total;
  }

  return {
    run() {
      const t = now();
      const replicatedCutoff = t - retention.localReplicated;
      const unreplicatedCutoff = t - retention.localUnreplicated;
      const deletedReplicated =
        drain(statements.activityReplicated, replicatedCutoff) +
        drain(statements.syncReplicated, replicatedCutoff);
      const droppedActivity = drain(statements.activityUnreplicated, unreplicatedCutoff);
      const droppedSync = drain(statements.syncUnreplicated, unreplicatedCutoff);
      const droppedUnreplicated = droppedActivity + droppedSync;
      if (deletedReplicated > 0)
        logger.info({ deletedReplicated, olderThanMs: retention.localReplicated }, 'retention_deleted');
      if (droppedUnreplicated > 0) {
        logger.warn(
          { droppedActivity, droppedSync, olderThanMs: retention.localUnreplicated },
          'retention_dropped_unreplicated',
        );
        activity.record({
          activityType: 'retention_dropped',
          direction: 'internal',
          status: 'failed',
          errorMessage:
            'rows never replicated to central PostgreSQL were dropped by retention.localUnreplicated',
          metadata: {
            droppedActivity,
            droppedSync,
            olderThanMs: retention.localUnreplicated,
            cutoff: unreplicatedCutoff,
          },
        });
      }
      return { deletedReplicated, droppedUnreplicated };
    },
  };
}
