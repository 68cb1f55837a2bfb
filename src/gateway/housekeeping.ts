import type { Config } from '../config/schema.js';
import type { Logger } from '../logger.js';
import type { ActivityLog } from '../store/activity-log.js';
import type { Store } from '../store/database.js';
import type { Outbox } from '../store/outbox-types.js';
import { createRetention } from '../store/retention.js';
import { createWalWatch, type WalState } from '../store/wal-watch.js';
import { createClockWatch } from './clock-watch.js';
import { scheduleJob, type ScheduledJob } from './schedules.js';

const QUEUE_EXPIRY_INTERVAL_MS = 60_000;
/** How often the wall clock is compared with the monotonic one (R17). */
const CLOCK_CHECK_INTERVAL_MS = 1_000;
/** How often the WAL gets a PASSIVE checkpoint and a size check (R19). */
const WAL_CHECK_INTERVAL_MS = 30_000;

export interface HousekeepingOptions {
  store: Store;
  outbox: Outbox;
  activity: ActivityLog;
  retention: Config['retention'];
  logger: Logger;
}

/** The gateway's timers: retention schedule, clock-jump watch, queue expiry, WAL checkpoints. */
export interface Housekeeping {
  readonly wal: WalState;
  /** Reschedules retention after a reload changed `retention`. */
  setRetention(retention: Config['retention']): void;
  stop(): void;
}

export function startHousekeeping(options: HousekeepingOptions): Housekeeping {
  const { store, outbox, activity, logger } = options;
  let retentionJob: ScheduledJob | undefined;

  const scheduleRetention = (config: Config['retention']) => {
    retentionJob?.stop();
    const retention = createRetention({
      db: store.db,
      retention: config,
      logger: logger.child({ component: 'retention' }),
      activity,
    });
    retentionJob = scheduleJob({
      name: 'retention',
      cron: config.schedule,
      logger,
      job: async () => retention.run(),
    });
  };
  const walWatch = createWalWatch({
    db: store.db,
    file: store.file,
    logger: logger.child({ component: 'store' }),
    activity,
  });
  // The one step that can throw comes before any timer exists, so a failed start leaks none.
  walWatch.check();
  scheduleRetention(options.retention);

  const clock = createClockWatch({
    logger,
    onForwardJump: (deltaMs) => {
      try {
        const rows = outbox.shiftExpiry(deltaMs);
        activity.record({
          activityType: 'clock_jumped',
          direction: 'internal',
          status: 'success',
          metadata: { deltaMs, queuedRowsShifted: rows },
        });
      } catch (err) {
        logger.error({ err, deltaMs }, 'queue_expiry_shift_failed');
      }
    },
  });
  const clockTimer = setInterval(() => clock.check(), CLOCK_CHECK_INTERVAL_MS);
  clockTimer.unref();
  const expiryTimer = setInterval(() => {
    try {
      clock.check();
      // A clock still in 1970 would make the ttl of what it queues meaningless; the jump to
      // the real time moves those rows' expiry (shiftExpiry) before anything expires.
      if (clock.sane) outbox.expire();
    } catch (err) {
      logger.error({ err }, 'queue_expiry_failed');
    }
  }, QUEUE_EXPIRY_INTERVAL_MS);
  expiryTimer.unref();
  const walTimer = setInterval(() => walWatch.check(), WAL_CHECK_INTERVAL_MS);
  walTimer.unref();

  return {
    get wal() {
      return walWatch.state;
    },
    setRetention: scheduleRetention,
    stop() {
      retentionJob?.stop();
      clearInterval(expiryTimer);
      clearInterval(walTimer);
      clearInterval(clockTimer);
    },
  };
}
