import { describe, expect, it } from 'vitest';
import { createClockWatch } from '../../src/gateway/clock-watch.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';

function world(startWall: number) {
  const t = { wall: startWall, mono: 1_000 };
  const logs: LogRecord[] = [];
  const jumps: number[] = [];
  const watch = createClockWatch({
    logger: createCaptureLogger(logs),
    onForwardJump: (d) => jumps.push(d),
    wall: () => t.wall,
    monotonic: () => t.mono,
  });
  /** Real time passes: both clocks move together. */
  const pass = (ms: number) => {
    t.wall += ms;
    t.mono += ms;
  };
  return { t, logs, jumps, watch, pass };
}

describe('clock watch (R17)', () => {
  it('reports a forward step of the wall clock, not the passing of time or small corrections', () => {
    const w = world(Date.UTC(2026, 0, 1));
    w.pass(3_600_000);
    w.watch.check();
    w.t.wall += 30_000; // an ordinary NTP step
    w.watch.check();
    expect(w.jumps).toEqual([]);
    w.pass(1_000);
    w.t.wall += 86_400_000;
    w.watch.check();
    expect(w.jumps).toEqual([86_400_000]);
    w.watch.check();
    expect(w.jumps).toHaveLength(1);
    expect(w.logs.filter((l) => l.msg === 'clock_jumped')).toHaveLength(1);
  });

  it('logs a backward step but moves nothing (rows only live longer)', () => {
    const w = world(Date.UTC(2026, 0, 1));
    w.t.wall -= 86_400_000;
    w.watch.check();
    expect(w.jumps).toEqual([]);
    expect(w.logs.filter((l) => l.msg === 'clock_jumped')).toHaveLength(1);
  });

  it('calls a clock before 2025 not set, once, until it is', () => {
    const w = world(0);
    expect(w.watch.sane).toBe(false);
    expect(w.watch.sane).toBe(false);
    expect(w.logs.filter((l) => l.msg === 'clock_not_set')).toHaveLength(1);
    w.t.wall = Date.UTC(2026, 10, 29);
    w.watch.check();
    expect(w.watch.sane).toBe(true);
    expect(w.jumps).toEqual([Date.UTC(2026, 10, 29)]);
  });
});
