import { parseDuration } from '../config/units.js';
import { ACTIVITY_STATUSES, type ActivityStatus } from '../store/activity-log.js';
import {
  EXIT_OK,
  commandLogger,
  findIntegration,
  loadForCommand,
  openStoreForCommand,
  usageError,
  type CommandIo,
} from './common.js';

export interface ActivityArgs {
  integration?: string;
  status?: string;
  since?: string;
  limit?: string;
  json?: boolean;
}

/** `iot-gateway activity`: reads the local activity log, newest first. */
export function activityCommand(io: CommandIo, args: ActivityArgs): number {
  const loaded = loadForCommand(io);
  if (args.status !== undefined && !ACTIVITY_STATUSES.includes(args.status as ActivityStatus)) {
    throw usageError(`--status must be one of ${ACTIVITY_STATUSES.join(', ')}, not "${args.status}"`);
  }
  let since: number | undefined;
  if (args.since !== undefined) {
    const ms = parseDuration(args.since);
    if (ms === undefined)
      throw usageError(`--since takes a duration like 30m, 1h or 7d, not "${args.since}"`);
    since = Date.now() - ms;
  }
  const limit = args.limit === undefined ? 50 : Number(args.limit);
  if (!Number.isInteger(limit) || limit < 1 || limit > 10_000)
    throw usageError('--limit takes a whole number from 1 to 10000');
  const integrationId =
    args.integration === undefined ? undefined : findIntegration(loaded, args.integration).id;
  const names = new Map(loaded.config.integrations.map((i) => [i.id, i.name]));
  const logger = commandLogger(loaded);
  const { store, activity } = openStoreForCommand(loaded, logger);
  try {
    const rows = activity.list({
      ...(integrationId ? { integrationId } : {}),
      ...(args.status ? { status: args.status as ActivityStatus } : {}),
      ...(since !== undefined ? { since } : {}),
      limit,
    });
    if (args.json) {
      for (const row of rows) io.out(JSON.stringify(row));
      return EXIT_OK;
    }
    if (rows.length === 0) {
      io.out('no activity matches');
      return EXIT_OK;
    }
    const table = rows.map((r) => [
      new Date(r.createdAt).toISOString(),
      r.integrationId ? (names.get(r.integrationId) ?? r.integrationId) : '-',
      r.activityType,
      r.status,
      r.responseTimeMs === null ? '' : `${r.responseTimeMs}ms`,
      r.errorMessage ?? '',
    ]);
    const header = ['time', 'integration', 'activity', 'status', 'latency', 'error'];
    const widths = header.map((h, i) =>
      Math.min(40, Math.max(h.length, ...table.map((row) => row[i]!.length))),
    );
    const fmt = (cells: string[]) =>
      cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!))).join('  ');
    io.out(fmt(header));
    for (const row of table) io.out(fmt(row));
    return EXIT_OK;
  } finally {
    store.close();
  }
}
