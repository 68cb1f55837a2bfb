import type { IntegrationConfig } from '../config/schema.js';
import type { Logger } from '../logger.js';
import type { ProviderContext, ProviderEvent } from '../providers/provider.js';
import type { ActivityLog } from '../store/activity-log.js';

export interface ProviderContextOptions {
  gatewayId: string;
  integration: IntegrationConfig;
  logger: Logger;
  activity: ActivityLog;
  /** The local device ids the gateway knows; none outside the daemon (CLI operations). */
  knownDevices?: () => readonly string[];
  reportedState?: () => ReadonlyMap<string, Record<string, unknown>>;
}

/**
 * What a provider gets from the gateway: its settings, a logger, and `report`, which turns a
 * provider event into an activity row of this integration — providers never touch the store.
 */
export function createProviderContext(options: ProviderContextOptions): ProviderContext {
  const { activity, integration } = options;
  return {
    gatewayId: options.gatewayId,
    integration,
    logger: options.logger,
    // ActivityLog.record never throws: a failed write is logged with the row.
    report: (event: ProviderEvent) => {
      activity.record({ ...event, integrationId: integration.id });
    },
    knownDevices: options.knownDevices ?? (() => []),
    reportedState: options.reportedState ?? (() => new Map()),
  };
}
