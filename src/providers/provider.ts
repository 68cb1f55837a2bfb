import type { IntegrationConfig } from '../config/schema.js';
import type { Logger } from '../logger.js';
import type { ActivityLog } from '../store/activity-log.js';

/** A message taken from an integration's durable queue, on its way to the cloud. */
export interface OutboundMessage {
  /** Queue row id: our own monotonic id, never an MQTT packet id. */
  id: number;
  deviceId: string;
  /** The canonical local topic (SPEC §4); the provider maps it to its cloud's idiom. */
  topic: string;
  payload: Buffer;
  qos: 0 | 1 | 2;
  retain: boolean;
  enqueuedAt: number;
  attempts: number;
}

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

export interface ProviderContext {
  gatewayId: string;
  integration: IntegrationConfig;
  /** Child logger carrying `component` and `integrationId`. */
  logger: Logger;
  activity: ActivityLog;
}

/**
 * One interface for every cloud (SPEC §6). A provider makes one connection attempt per
 * `connect`; reconnecting with backoff belongs to the connection supervisor, not here.
 * Errors are GatewayErrors: `retryable: false` on `publish` sends the row to dead letters.
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
  /** How many unacknowledged publishes the link allows at once (e.g. MQTT Receive Maximum). */
  readonly maxInflight: number;
  /** The largest payload the cloud takes; larger rows are dead-lettered without trying. */
  readonly maxPayloadBytes: number;
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
