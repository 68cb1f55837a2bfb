import type { IntegrationConfig } from '../config/schema.js';
import { ErrorCodes, GatewayError } from '../errors.js';
import type { Logger } from '../logger.js';
import type { OutboundMessage } from '../common/outbound-message.js';

export type { OutboundMessage };

/** A message from the cloud, already mapped to a canonical local topic. */
export interface InboundMessage {
  topic: string;
  payload: Buffer;
  qos: 0 | 1 | 2;
  retain: boolean;
}

export interface ConnectionTestResult {
  ok: boolean;
  latencyMs: number;
  /** What was checked, for a person: endpoint, protocol, identity (no secrets). */
  details: Record<string, unknown>;
  error?: { code: string; message: string };
}

export interface SyncResult {
  recordsProcessed: number;
  recordsSucceeded: number;
  recordsFailed: number;
  details?: Record<string, unknown>;
}

/**
 * Something a provider did that an operator should find in the activity log (a subscription
 * refused, a token renewed, a device throttled). The gateway turns it into an activity row with
 * the integration id; providers never write the store themselves.
 */
export interface ProviderEvent {
  activityType: string;
  direction: 'outgoing' | 'incoming' | 'internal';
  status: 'started' | 'success' | 'failed' | 'error';
  responseTimeMs?: number | null;
  errorCode?: string | null;
  errorMessage?: string | null;
  /** requestId, deviceId, counts …; never secrets. */
  metadata?: Record<string, unknown>;
}

export interface ProviderContext {
  gatewayId: string;
  integration: IntegrationConfig;
  /** Child logger carrying `component` and `integrationId`. */
  logger: Logger;
  /**
   * Records a provider event as an activity row of this integration. Never throws. Providers
   * report through it (they do not import src/store/); absent in some unit tests.
   */
  report?(event: ProviderEvent): void;
  /** The local device ids the gateway knows (configured and seen), for import matching. */
  knownDevices?(): readonly string[];
  /** The latest merged reported state of each device (`devices/{id}/state`), for export. */
  reportedState?(): ReadonlyMap<string, Record<string, unknown>>;
}

/** Limits a cloud imposes, honoured by the forwarder and the supervisor alongside the config. */
export interface ProviderLimits {
  /** The most publishes per second the cloud takes, per connection or per child device. */
  maxPublishRate?: { perSecond: number; scope: 'connection' | 'device' };
  /** The cloud refuses a CONNECT sooner than this after the previous one (AWS: 1 s per client id). */
  minReconnectDelayMs?: number;
}

/**
 * One interface for every cloud (SPEC §6). A provider makes one connection attempt per
 * `connect`; reconnecting with backoff belongs to the connection supervisor, not here.
 *
 * `publish` rejects with GatewayErrors, and the forwarder branches on their code:
 * - `retryable: false`: the row goes to dead letters (too large, not authorised);
 * - GW_ERR_PROVIDER_THROTTLED (`throttled()`): wait `retryAfterMs`, count no attempt — scoped to
 *   one device when `deviceId` is given, else the whole link;
 * - GW_ERR_PROVIDER_DEVICE_UNAVAILABLE (`deviceUnavailable()`): park that device's rows only,
 *   for `retryAfterMs`; the other devices keep flowing; no attempt counted;
 * - GW_ERR_PROVIDER_NOT_CONNECTED: the link is gone (a publish before connect, or pending
 *   when the link is lost); the rows are sent again after the reconnect;
 * - any other retryable error: try again later, counted as an attempt.
 * `onDisconnect` with GW_ERR_PROVIDER_PLANNED_RECONNECT (`plannedReconnect()`) is a replacement
 * of the link the provider chose (credential renewal): the supervisor reconnects at once (after
 * `limits.minReconnectDelayMs`), and in-flight rows go back to the queue uncounted. Publishes
 * still pending then either settle (acknowledged on the old link) or reject with that same
 * planned error, never with GW_ERR_PROVIDER_NOT_CONNECTED (which may count an attempt).
 *
 * test/providers/contract.ts checks these promises; every provider runs it.
 */
export interface Provider {
  /** Opens the streaming connection; resolves once the cloud accepted it (CONNACK). */
  connect(signal: AbortSignal): Promise<void>;
  /** Resolves when the cloud acknowledged the message (PUBACK, HTTP 2xx). */
  publish(message: OutboundMessage): Promise<void>;
  /** Cloud → device traffic, mapped to local topics. One handler; a later call replaces it. */
  onCommand(handler: (message: InboundMessage) => void): void;
  /** Called once per established connection when it is lost, with the reason. */
  onDisconnect(handler: (error: Error) => void): void;
  /**
   * Local presence: a device connected to (true) or left (false) the embedded broker. Clouds
   * that deliver commands only to an open device connection (Azure) open or keep its link.
   */
  onDevicePresence?(deviceId: string, online: boolean): void;
  /** How many unacknowledged publishes the link allows at once (e.g. MQTT Receive Maximum). */
  readonly maxInflight: number;
  /** The largest payload the cloud takes; larger rows are dead-lettered without trying. */
  readonly maxPayloadBytes: number;
  readonly limits?: ProviderLimits;
  testConnection(signal: AbortSignal): Promise<ConnectionTestResult>;
  /** Cloud → gateway: devices, desired state, settings. */
  import(signal: AbortSignal): Promise<SyncResult>;
  /** Gateway → cloud: reported state. */
  export(signal: AbortSignal): Promise<SyncResult>;
  bidirectionalSync(signal: AbortSignal): Promise<SyncResult>;
  /** Ends the connection; pending publishes reject with GW_ERR_PROVIDER_CLOSED (retryable). */
  close(): Promise<void>;
}

export type ProviderFactory = (context: ProviderContext) => Provider;

/** The cloud asked to slow down: wait `retryAfterMs`; for one device when `deviceId` is set. */
export function throttled(message: string, retryAfterMs: number, deviceId?: string): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_THROTTLED, message, {
    retryable: true,
    details: { retryAfterMs, ...(deviceId === undefined ? {} : { deviceId }) },
  });
}

/** One child device's cloud link failed: park its rows for `retryAfterMs`, others go on. */
export function deviceUnavailable(deviceId: string, message: string, retryAfterMs: number, cause?: unknown) {
  return new GatewayError(ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE, message, {
    retryable: true,
    cause,
    details: { deviceId, retryAfterMs },
  });
}

/** The provider replaces its link on purpose; pass to the disconnect handler. */
export function plannedReconnect(reason: string): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_PLANNED_RECONNECT, `planned reconnect: ${reason}`, {
    retryable: true,
    details: { reason },
  });
}

/** The result of an import followed by an export: counts added, each side's details kept. */
export function combineSyncResults(imported: SyncResult, exported: SyncResult): SyncResult {
  return {
    recordsProcessed: imported.recordsProcessed + exported.recordsProcessed,
    recordsSucceeded: imported.recordsSucceeded + exported.recordsSucceeded,
    recordsFailed: imported.recordsFailed + exported.recordsFailed,
    details: { import: imported.details, export: exported.details },
  };
}

/** A connection test that failed: the time it took from `startedAt` (performance.now()), what was checked, why. */
export function failedConnectionTest(
  startedAt: number,
  details: Record<string, unknown>,
  error: GatewayError,
): ConnectionTestResult {
  return {
    ok: false,
    latencyMs: Math.round(performance.now() - startedAt),
    details,
    error: { code: error.code, message: error.message },
  };
}
