import cron from 'node-cron';
import type { Logger } from '../logger.js';

export interface ScheduledJob {
  stop(): void;
  /** True while a run is in progress. */
  readonly running: boolean;
}

/**
 * Runs `job` on a cron expression; a run never overlaps itself (a tick that finds the previous
 * run still going is skipped and logged). Errors are logged, never thrown into node-cron.
 */
export function scheduleJob(options: {
  name: string;
  cron: string;
  logger: Logger;
  job: () => Promise<unknown>;
}): ScheduledJob {
  let running = false;
  const task = cron.schedule(options.cron, () => {
    if (running) {
      options.logger.warn({ job: options.name }, 'schedule_skipped_overlap');
      return;
    }
    running = true;
    options
      .job()
      .catch((err: unknown) => options.logger.error({ err, job: options.name }, 'schedule_run_failed'))
      .finally(() => {
        running = false;
      });
  });
  return {
    get running() {
      return running;
    },
    stop() {
      task.stop();
    },
  };
}
