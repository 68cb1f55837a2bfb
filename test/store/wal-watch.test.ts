import Database from 'better-sqlite3';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createActivityLog, type ActivityLog } from '../../src/store/activity-log.js';
import { openStore, type Store } from '../../src/store/database.js';
import { createWalWatch } from '../../src/store/wal-watch.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';

describe('WAL watch (R19: a reader starving the checkpoint)', () => {
  let dir: string;
  let store: Store;
  let logs: LogRecord[];
  let activity: ActivityLog;

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'wal-watch-'));
    logs = [];
    store = openStore({ dataDir: dir, logger: createCaptureLogger(logs), onCorrupt: 'refuse', lock: false });
    store.db.exec('CREATE TABLE scratch (x BLOB)');
    activity = createActivityLog({ db: store.db, gatewayId: 'gw-test', logger: createCaptureLogger(logs) });
  });
  afterEach(() => {
    store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  /** Alarm at 1 MiB, so a few MB of writes are enough to cross it. */
  const watchWithSmallAlarm = () =>
    createWalWatch({
      db: store.db,
      file: store.file,
      logger: createCaptureLogger(logs),
      activity,
      alarmBytes: 1 << 20,
    });

  /** About 8 MB of commits, in small transactions like the device path makes. */
  function writeALot(): void {
    const insert = store.db.prepare('INSERT INTO scratch (x) VALUES (?)');
    const blob = Buffer.alloc(4000, 1);
    for (let i = 0; i < 200; i++)
      store.db.transaction(() => {
        for (let j = 0; j < 10; j++) insert.run(blob);
      })();
  }

  it('stays quiet while checkpoints keep up', () => {
    const watch = watchWithSmallAlarm();
    writeALot();
    const state = watch.check();
    expect(state).toMatchObject({ framesBehind: 0, starved: false });
    expect(logs.some((l) => l.msg === 'wal_checkpoint_starved')).toBe(false);
    expect(activity.list({ activityType: 'wal_checkpoint_starved' })).toEqual([]);
  });

  it('reports a WAL that a reader keeps from shrinking, once, and when it caught up', () => {
    const watch = watchWithSmallAlarm();
    // Another connection in a read transaction: an operator's sqlite3 shell left in BEGIN.
    const reader = new Database(store.file, { readonly: true });
    reader.exec('BEGIN');
    reader.prepare('SELECT count(*) FROM scratch').get();
    try {
      writeALot();
      const starved = watch.check();
      expect(starved.starved).toBe(true);
      expect(starved.framesBehind).toBeGreaterThan(0);
      expect(starved.bytes).toBeGreaterThan(1 << 20);
      writeALot();
      expect(watch.check().starved).toBe(true);
      expect(logs.filter((l) => l.msg === 'wal_checkpoint_starved')).toHaveLength(1);
    } finally {
      reader.exec('COMMIT');
      reader.close();
    }
    const after = watch.check();
    expect(after).toMatchObject({ framesBehind: 0, starved: false });
    expect(watch.state).toEqual(after);
    expect(logs.filter((l) => l.msg === 'wal_checkpoint_caught_up')).toHaveLength(1);
    // Both ends are activity rows too, so the fleet sees them centrally.
    expect(activity.list({ activityType: 'wal_checkpoint_starved' })).toMatchObject([
      { status: 'error', direction: 'internal', integrationId: null },
    ]);
    expect(activity.list({ activityType: 'wal_checkpoint_caught_up' })).toHaveLength(1);
  });
});
