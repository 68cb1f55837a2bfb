import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createActivityLog } from '../../src/store/activity-log.js';
import { openStore, type Store } from '../../src/store/database.js';
import { createRetention } from '../../src/store/retention.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';

const DAY = 86_400_000;

describe('local retention', () => {
  let dir: string;
  let store: Store;
  afterEach(() => {
    store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('deletes replicated rows after localReplicated and drops unreplicated ones only after localUnreplicated, counted', () => {
    dir = mkdtempSync(join(tmpdir(), 'iot-retention-'));
    const lines: LogRecord[] = [];
    const logger = createCaptureLogger(lines, { level: 'info', gatewayId: 'gw' });
    store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
    let t = Date.now() - 100 * DAY;
    const activity = createActivityLog({ db: store.db, gatewayId: 'gw', logger, now: () => t });
    const record = (n: number) =>
      store.db.transaction(() => {
        for (let i = 0; i < n; i++)
          activity.record({ activityType: 'publish', direction: 'outgoing', status: 'success' });
      })();
    // Replicated: 1,200 rows of 100 days ago and 300 of 10 days ago, one of the old ones set aside.
    // Never replicated: 700 rows of 100 days ago (written while the clock was wrong) and 50 pending.
    record(1200);
    t = Date.now() - 10 * DAY;
    record(300);
    store.db.exec("UPDATE replication_watermark SET seq = 1500 WHERE log = 'activity_log'");
    store.db.exec("UPDATE activity_log SET replication_error = '42501: rejected' WHERE seq = 1100");
    t = Date.now() - 100 * DAY;
    record(700);
    t = Date.now() - 10 * DAY;
    record(50);
    t = Date.now();

    const retention = createRetention({
      db: store.db,
      retention: { localReplicated: 7 * DAY, localUnreplicated: 90 * DAY },
      logger,
      activity,
      chunkSize: 250,
    });
    expect(retention.run()).toEqual({ deletedReplicated: 1499, droppedUnreplicated: 701 });
    const left = store.db
      .prepare(
        "SELECT count(*) AS n, sum(seq > (SELECT seq FROM replication_watermark WHERE log = 'activity_log')) AS pending FROM activity_log",
      )
      .get();
    // 50 pending of 10 days ago survive, plus the retention_dropped row.
    expect(left).toEqual({ n: 51, pending: 51 });
    const dropped = activity.list({ activityType: 'retention_dropped' });
    expect(dropped).toHaveLength(1);
    expect(dropped[0]!.metadata).toMatchObject({ droppedActivity: 701, droppedSync: 0 });
    expect(lines.filter((l) => l.msg === 'retention_dropped_unreplicated')).toEqual([
      expect.objectContaining({ level: 'warn', droppedActivity: 701 }),
    ]);

    expect(retention.run()).toEqual({ deletedReplicated: 0, droppedUnreplicated: 0 });
  });
});
