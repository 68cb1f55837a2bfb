import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { scheduleJob } from '../../src/gateway/schedules.js';

describe('scheduled jobs', () => {
  it('never overlap themselves: a tick that finds the last run going is skipped and logged', async () => {
    const lines: Record<string, unknown>[] = [];
    const logger = pino(
      { level: 'info' },
      { write: (s: string) => lines.push(JSON.parse(s) as Record<string, unknown>) },
    );
    let running = 0;
    let maxConcurrent = 0;
    let runs = 0;
    const job = scheduleJob({
      name: 'slow',
      cron: '* * * * * *', // every second
      logger,
      job: async () => {
        runs++;
        running++;
        maxConcurrent = Math.max(maxConcurrent, running);
        await new Promise((r) => setTimeout(r, 2_500));
        running--;
      },
    });
    await new Promise((r) => setTimeout(r, 4_200));
    job.stop();
    expect(runs).toBeGreaterThanOrEqual(1);
    expect(maxConcurrent).toBe(1);
    expect(lines.filter((l) => l.msg === 'schedule_skipped_overlap').length).toBeGreaterThanOrEqual(1);
  });

  it('logs a failing run and keeps the schedule', async () => {
    const lines: Record<string, unknown>[] = [];
    const logger = pino(
      { level: 'info' },
      { write: (s: string) => lines.push(JSON.parse(s) as Record<string, unknown>) },
    );
    let runs = 0;
    const job = scheduleJob({
      name: 'failing',
      cron: '* * * * * *',
      logger,
      job: () => {
        runs++;
        return Promise.reject(new Error('boom'));
      },
    });
    await new Promise((r) => setTimeout(r, 2_300));
    job.stop();
    expect(runs).toBeGreaterThanOrEqual(2);
    expect(lines.filter((l) => l.msg === 'schedule_run_failed').length).toBe(runs);
  });
});
