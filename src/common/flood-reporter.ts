/**
 * Turns a flood of like events (refused logins, dropped rows, failed QoS 0 messages) into at
 * most one report per key and window: the first event of a quiet key is reported at once, the
 * rest of its window once the window is over, with how many events the report stands for.
 */
export interface FloodReporter<E> {
  /** Notes `n` events like `event` under `key`. */
  note(key: string, event: E, n?: number): void;
  /** Reports everything pending now and forgets every key (shutdown). */
  flush(): void;
}

export interface FloodReporterOptions<E, S> {
  /** ms between two reports of one key */
  windowMs: number;
  /** Folds an event into the pending summary of its key (`undefined` after each report). */
  fold(summary: S | undefined, event: E, n: number): S;
  /** Called with the summary of `count` events; should not throw (it runs from timers). */
  report(key: string, summary: S, count: number): void;
  /** Past this many keys, idle ones are forgotten, then new ones share `overflowKey`. */
  maxKeys?: number;
  overflowKey?(key: string, event: E): string;
  now?: () => number;
}

interface Slot<S> {
  lastReportAt: number;
  count: number;
  summary: S | undefined;
  timer: NodeJS.Timeout | undefined;
}

const DEFAULT_MAX_KEYS = 10_000;

/** The summary that keeps only the latest event. */
export const latestEvent = <E>(_summary: E | undefined, event: E): E => event;

export function createFloodReporter<E, S = E>(options: FloodReporterOptions<E, S>): FloodReporter<E> {
  const { windowMs } = options;
  const now = options.now ?? Date.now;
  const maxKeys = options.maxKeys ?? DEFAULT_MAX_KEYS;
  const slots = new Map<string, Slot<S>>();

  const emit = (key: string, slot: Slot<S>) => {
    if (slot.timer !== undefined) clearTimeout(slot.timer);
    slot.timer = undefined;
    slot.lastReportAt = now();
    const { count, summary } = slot;
    if (count === 0 || summary === undefined) return;
    slot.count = 0;
    slot.summary = undefined;
    options.report(key, summary, count);
  };

  const forgetIdle = (t: number) => {
    for (const [key, slot] of slots)
      if (slot.timer === undefined && t - slot.lastReportAt >= windowMs) slots.delete(key);
  };

  return {
    note(key, event, n = 1) {
      if (n <= 0) return;
      const t = now();
      if (!slots.has(key) && slots.size >= maxKeys) {
        forgetIdle(t);
        // Still full (a spoofed-address storm): the newcomers share one key, memory stays bounded.
        if (slots.size >= maxKeys) key = options.overflowKey?.(key, event) ?? '*';
      }
      let slot = slots.get(key);
      if (slot === undefined) {
        slot = { lastReportAt: -Infinity, count: 0, summary: undefined, timer: undefined };
        slots.set(key, slot);
      }
      slot.count += n;
      slot.summary = options.fold(slot.summary, event, n);
      const sinceLast = t - slot.lastReportAt;
      if (sinceLast >= windowMs) {
        emit(key, slot);
      } else if (slot.timer === undefined) {
        // The rest of a flood is reported once the window is over, even if nothing follows it.
        const pending = slot;
        pending.timer = setTimeout(() => emit(key, pending), Math.min(windowMs - sinceLast, windowMs));
        pending.timer.unref();
      }
    },
    flush() {
      for (const [key, slot] of slots) emit(key, slot);
      slots.clear();
    },
  };
}
