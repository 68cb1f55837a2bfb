import type { IntegrationConfig } from '../config/schema.js';
import type { Logger } from '../logger.js';
import type { ActivityLog } from '../store/activity-log.js';

/**
 * Watches the activity log: `health.alertFailures` failures of one integration within
 * `health.alertWindow` produce one `alert` activity row and a warn line, then stay quiet for a
 * window so a flapping link does not flood the log.
 */
export function watchFailures(options: {
  activity: ActivityLog;
  logger: Logger;
  integrations: () => readonly IntegrationConfig[];
  now?: () => number;
}): () => void {
  const now = options.now ?? Date.now;
  const lastAlert = new Map<string, number>();
  return options.activity.onRecord((row) => {
    if (row.activityType === 'alert' || row.integrationId === null) return;
    if (row.status !== 'failed' && row.status !== 'error') return;
    const integration = options.integrations().find((i) => i.id === row.integrationId);
    if (!integration) return;
    const { alertFailures, alertWindow } = integration.health;
    const t = now();
    if ((lastAlert.get(integration.id) ?? -Infinity) > t - alertWindow) return;
    const failures = options.activity.countFailures(integration.id, t - alertWindow);
    if (failures < alertFailures) return;
    lastAlert.set(integration.id, t);
    options.logger.warn(
      {
        integrationId: integration.id,
        integration: integration.name,
        failures,
        windowMs: alertWindow,
        lastError: row.errorMessage,
      },
      'integration_failing',
    );
    options.activity.record({
      integrationId: integration.id,
      activityType: 'alert',
      direction: 'internal',
      status: 'error',
      errorCode: row.errorCode,
      errorMessage: `${failures} failures within ${Math.round(alertWindow / 1000)}s; last: ${row.errorMessage ?? row.activityType}`,
      metadata: { failures, windowMs: alertWindow, lastActivityType: row.activityType },
    });
  });
}
