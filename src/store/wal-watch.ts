import { statSync } from 'node:fs';
import type { Logger } from '../logger.js';
import type { ActivityLog } from './activity-log.js';
import type { SqliteDatabase } from './database.js';

export interface WalWatchOptions {
  db: SqliteDatabase;
  /** The store file; its WAL is `${file}-wal`. */
  file: string;
  logger: Logger;
  /** Records the start and the end of a starved checkpoint, for the fleet's central view. */
  activity?: ActivityLog;
  /** A WAL larger than this that a checkpoint cannot shrink is reported (default 256 MiB). */
  alarmBytes?: number;
}

export interface WalState {
  /** Size of the WAL file now. */
  bytes: number;
  /** Frames the last checkpoint could not copy into the database because a reader holds them. */
  framesBehind: number;
  /** The WAL is over the alarm size and a reader keeps the checkpoint from catching up (R19). */
  starved: boolean;
}

export interface WalWatch {
  /** A PASSIVE checkpoint (never waits for readers or writers), then the WAL's state. */
  check(): WalState;
  readonly state: WalState;
}

const DEFAULT_ALARM_BYTES = 256 * 1024 * 1024;

/**
 * Keeps the WAL from growing without anyone knowing (R19). SQLite checkpoints on its own
 * after each 1,000 pages, but a checkpoint cannot pass a reader: a connection that keeps a read
 * transaction open (an `sqlite3` shell left in a transaction, a backup tool) makes the WAL grow
 * with every write. The daemon calls `check()` periodically; a starved checkpoint is logged once
 * when it starts and once when it ends, and `status` and the metrics show the WAL's size.
 */
export function createWalWatch(options: WalWatchOptions): WalWatch {
  const { db, logger } = options;
  const alarmBytes = options.alarmBytes ?? DEFAULT_ALARM_BYTES;
  const checkpoint = db.prepare('PRAGMA wal_checkpoint(PASSIVE)');
  let state: WalState = { bytes: 0, framesBehind: 0, starved: false };

  const walBytes = (): number => {
    try {
      return statSync(`${options.file}-wal`).size;
    } catch {
      return 0; // no WAL yet, or removed at a clean close
    }
  };

  return {
    check() {
      let framesBehind = 0;
      try {
        // busy = 1 when another connection held a lock the checkpoint needed; log = frames in the
        // WAL; checkpointed = frames now in the database.
        const row = checkpoint.get() as { busy: number; log: number; checkpointed: number };
        framesBehind = Math.max(0, row.log - row.checkpointed);
      } catch (err) {
        logger.warn({ err }, 'wal_checkpoint_failed');
      }
      const bytes = walBytes();
      const starved = bytes > alarmBytes && framesBehind > 0;
      if (starved && !state.starved) {
        logger.warn({ walBytes: bytes, framesBehind, alarmBytes }, 'wal_checkpoint_starved');
        options.activity?.record({
          activityType: 'wal_checkpoint_starved',
          direction: 'internal',
          status: 'error',
          errorMessage: `the WAL is ${bytes} bytes and another connection keeps ${framesBehind} frames from being checkpointed`,
          metadata: { walBytes: bytes, framesBehind, alarmBytes },
        });
      } else if (!starved && state.starved) {
        logger.info({ walBytes: bytes }, 'wal_checkpoint_caught_up');
        options.activity?.record({
          activityType: 'wal_checkpoint_caught_up',
          direction: 'internal',
          status: 'success',
          metadata: { walBytes: bytes },
        });
      }
      state = { bytes, framesBehind, starved };
      return state;
    },
    get state() {
      return state;
    },
  };
}
