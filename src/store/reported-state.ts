import type { Logger } from '../logger.js';
import type { SqliteDatabase } from './database.js';

export type DeviceState = Record<string, unknown>;

/**
 * The latest reported state of each device: what it published on `devices/{id}/state`, merged
 * (JSON merge patch, RFC 7396: a member set to null is deleted, objects merge, anything else
 * replaces). Providers export it (device shadows, twins, LightDB State) through
 * `context.reportedState()`. Kept in memory and written to the `device_state` table, so it
 * survives a restart.
 */
export interface ReportedState {
  /** Merges one state message. Returns false (and changes nothing) when it is not a JSON object. */
  merge(deviceId: string, payload: Buffer): boolean;
  get(deviceId: string): DeviceState | undefined;
  all(): ReadonlyMap<string, DeviceState>;
  /** Writes what is still pending; later merges are written again. */
  flush(): void;
  close(): void;
}

export interface ReportedStateOptions {
  db: SqliteDatabase;
  logger: Logger;
  /** Merged states are written in one transaction this long after the first change (ms). */
  writeDelayMs?: number;
  now?: () => number;
}

/** The merge patch nests at most this deep; deeper parts of a patch replace instead of merging. */
const MAX_DEPTH = 32;

export function createReportedState(options: ReportedStateOptions): ReportedState {
  const { db, logger } = options;
  const now = options.now ?? Date.now;
  const writeDelayMs = options.writeDelayMs ?? 100;
  const states = new Map<string, DeviceState>();
  for (const row of db.prepare('SELECT device_id AS id, state FROM device_state').all() as {
    id: string;
    state: string;
  }[]) {
    try {
      states.set(row.id, JSON.parse(row.state) as DeviceState);
    } catch (err) {
      logger.warn({ deviceId: row.id, err }, 'reported_state_unreadable');
    }
  }
  const upsert = db.prepare(
    `INSERT INTO device_state (device_id, state, updated_at) VALUES (?, ?, ?)
     ON CONFLICT (device_id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at`,
  );
  const writeAll = db.transaction((ids: readonly string[]) => {
    const t = now();
    for (const id of ids) upsert.run(id, JSON.stringify(states.get(id) ?? {}), t);
  });
  const dirty = new Set<string>();
  let timer: NodeJS.Timeout | undefined;
  let closed = false;

  function flush(): void {
    clearTimeout(timer);
    timer = undefined;
    if (dirty.size === 0) return;
    const ids = [...dirty];
    dirty.clear();
    try {
      writeAll(ids);
    } catch (err) {
      // The state stays in memory and the queued state messages still reach the cloud; the
      // next change of these devices writes them again.
      logger.error({ err, devices: ids.length }, 'reported_state_write_failed');
    }
  }

  return {
    merge(deviceId, payload) {
      let patch: unknown;
      try {
        patch = JSON.parse(payload.toString('utf8'));
      } catch {
        return false;
      }
      if (!isObject(patch)) return false;
      states.set(deviceId, mergePatch(states.get(deviceId) ?? {}, patch, 0));
      if (closed) return true;
      dirty.add(deviceId);
      timer ??= setTimeout(flush, writeDelayMs);
      return true;
    },
    get(deviceId) {
      return states.get(deviceId);
    },
    all() {
      return states;
    },
    flush,
    close() {
      flush();
      closed = true;
    },
  };
}

/** RFC 7396 on a JSON object target. */
export function mergePatch(target: DeviceState, patch: DeviceState, depth: number): DeviceState {
  const result: DeviceState = { ...target };
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete result[key];
    else if (isObject(value) && depth < MAX_DEPTH) {
      const current = result[key];
      result[key] = mergePatch(isObject(current) ? current : {}, value, depth + 1);
    } else result[key] = value;
  }
  return result;
}

function isObject(value: unknown): value is DeviceState {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}
