import { randomUUID } from 'node:crypto';
import type { IntegrationConfig } from '../config/schema.js';
import { ErrorCodes, errorMessage, isGatewayError } from '../errors.js';
import type { Logger } from '../logger.js';
import type { ConnectionTestResult, Provider, SyncResult } from '../providers/provider.js';
import type { ActivityLog, SyncType } from '../store/activity-log.js';

export type SyncDirection = 'import' | 'export' | 'both';

export interface OperationContext {
  provider: Provider;
  integration: IntegrationConfig;
  activity: ActivityLog;
  logger: Logger;
  signal: AbortSignal;
  now?: () => number;
  /**
   * Resolves once what the provider handed to the local broker so far is published there (a
   * retained desired state stored): a sync reports done only after that, so a device that
   * subscribes when it ends gets the state as a retained message. Never rejects.
   */
  localPublished?: () => Promise<void>;
}

export interface SyncOutcome extends SyncResult {
  ok: boolean;
  syncType: SyncType;
  requestId: string;
  durationMs: number;
  error?: { code: string; message: string };
}

/**
 * Runs one connection test, logs `test_connection_started/_completed/_failed` and records a
 * `test_connection` activity row. Shared by the daemon and `iot-gateway test-connection`.
 */
export async function runConnectionTest(
  ctx: OperationContext,
): Promise<ConnectionTestResult & { requestId: string }> {
  const requestId = randomUUID();
  const log = ctx.logger.child({ requestId });
  const now = ctx.now ?? Date.now;
  const started = now();
  log.info('test_connection_started');
  let result: ConnectionTestResult;
  try {
    result = await ctx.provider.testConnection(ctx.signal);
  } catch (err) {
    result = {
      ok: false,
      latencyMs: now() - started,
      details: {},
      error: {
        code: isGatewayError(err) ? err.code : ErrorCodes.PROVIDER_CONNECT,
        message: errorMessage(err),
      },
    };
  }
  ctx.activity.record({
    integrationId: ctx.integration.id,
    activityType: 'test_connection',
    direction: 'outgoing',
    status: result.ok ? 'success' : 'failed',
    responseTimeMs: result.latencyMs,
    errorCode: result.error?.code ?? null,
    errorMessage: result.error?.message ?? null,
    metadata: { requestId, ...result.details },
  });
  if (result.ok) log.info({ latencyMs: result.latencyMs }, 'test_connection_completed');
  else log.warn({ latencyMs: result.latencyMs, error: result.error }, 'test_connection_failed');
  return { ...result, requestId };
}

/**
 * Runs one sync (import, export or both) and writes one sync log row plus an activity row.
 * Shared by the schedule, the daemon and `iot-gateway sync`.
 */
export async function runSync(ctx: OperationContext, direction: SyncDirection): Promise<SyncOutcome> {
  const requestId = randomUUID();
  const syncType: SyncType = direction === 'both' ? 'bidirectional' : direction;
  const operation = `sync_${syncType}`;
  const log = ctx.logger.child({ requestId });
  const now = ctx.now ?? Date.now;
  const startedAt = now();
  log.info({ direction }, `${operation}_started`);
  let result: SyncResult = { recordsProcessed: 0, recordsSucceeded: 0, recordsFailed: 0 };
  let error: { code: string; message: string } | undefined;
  try {
    result =
      direction === 'import'
        ? await ctx.provider.import(ctx.signal)
        : direction === 'export'
          ? await ctx.provider.export(ctx.signal)
          : await ctx.provider.bidirectionalSync(ctx.signal);
    await ctx.localPublished?.();
  } catch (err) {
    error = {
      code: isGatewayError(err) ? err.code : ErrorCodes.PROVIDER_CONNECT,
      message: errorMessage(err),
    };
  }
  const completedAt = now();
  const status = error ? 'failed' : result.recordsFailed > 0 ? 'error' : 'success';
  ctx.activity.recordSync({
    integrationId: ctx.integration.id,
    syncType,
    status,
    startedAt,
    completedAt,
    recordsProcessed: result.recordsProcessed,
    recordsSucceeded: result.recordsSucceeded,
    recordsFailed: result.recordsFailed,
    errorMessage: error?.message ?? null,
    requestId,
    metadata: { ...(result.details ?? {}), ...(error ? { errorCode: error.code } : {}) },
  });
  ctx.activity.record({
    integrationId: ctx.integration.id,
    activityType: operation,
    direction: syncType === 'import' ? 'incoming' : 'outgoing',
    status,
    responseTimeMs: completedAt - startedAt,
    errorCode: error?.code ?? null,
    errorMessage: error?.message ?? null,
    metadata: {
      requestId,
      recordsProcessed: result.recordsProcessed,
      recordsSucceeded: result.recordsSucceeded,
      recordsFailed: result.recordsFailed,
    },
  });
  const fields = { durationMs: completedAt - startedAt, ...result };
  if (error) log.warn({ ...fields, error }, `${operation}_failed`);
  else log.info(fields, `${operation}_completed`);
  return {
    ...result,
    ok: !error,
    syncType,
    requestId,
    durationMs: completedAt - startedAt,
    ...(error ? { error } : {}),
  };
}
