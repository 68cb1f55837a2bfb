/**
 * The catalog of coded errors. Callers branch on `code`, never on message text.
 * `retryable` tells the supervisor, the forwarder and the replicator whether trying again can help.
 */
export const ErrorCodes = {
  CONFIG_INVALID: 'GW_ERR_CONFIG_INVALID',
  CONFIG_NOT_FOUND: 'GW_ERR_CONFIG_NOT_FOUND',
  CONFIG_SECRET: 'GW_ERR_CONFIG_SECRET',
  USAGE: 'GW_ERR_USAGE',
  LISTEN_IN_USE: 'GW_ERR_LISTEN_IN_USE',
  LISTEN_FAILED: 'GW_ERR_LISTEN_FAILED',
  STORE_LOCKED: 'GW_ERR_STORE_LOCKED',
  STORE_CORRUPT: 'GW_ERR_STORE_CORRUPT',
  STORE_NOT_DURABLE: 'GW_ERR_STORE_NOT_DURABLE',
  STORE_WRITE: 'GW_ERR_STORE_WRITE',
  STORE_OPEN: 'GW_ERR_STORE_OPEN',
  QUEUE_FULL: 'GW_ERR_QUEUE_FULL',
  AUTH_FAILED: 'GW_ERR_AUTH_FAILED',
  ACL_DENIED: 'GW_ERR_ACL_DENIED',
  BROKER_PUBLISH: 'GW_ERR_BROKER_PUBLISH',
  PROVIDER_CONNECT: 'GW_ERR_PROVIDER_CONNECT',
  PROVIDER_TIMEOUT: 'GW_ERR_PROVIDER_TIMEOUT',
  PROVIDER_AUTH: 'GW_ERR_PROVIDER_AUTH',
  PROVIDER_REJECTED: 'GW_ERR_PROVIDER_REJECTED',
  PROVIDER_TOO_LARGE: 'GW_ERR_PROVIDER_TOO_LARGE',
  PROVIDER_NOT_CONNECTED: 'GW_ERR_PROVIDER_NOT_CONNECTED',
  PROVIDER_CLOSED: 'GW_ERR_PROVIDER_CLOSED',
  PROVIDER_UNSUPPORTED: 'GW_ERR_PROVIDER_UNSUPPORTED',
  /** The cloud asked us to slow down (MQTT 5 PUBACK 0x97, HTTP 429, Azure 429002): wait, never a failure. */
  PROVIDER_THROTTLED: 'GW_ERR_PROVIDER_THROTTLED',
  /** One child device's cloud link is down or refused: park that device's rows only. */
  PROVIDER_DEVICE_UNAVAILABLE: 'GW_ERR_PROVIDER_DEVICE_UNAVAILABLE',
  /** The provider replaces its link on purpose (credential renewal): not a failure. */
  PROVIDER_PLANNED_RECONNECT: 'GW_ERR_PROVIDER_PLANNED_RECONNECT',
  INTEGRATION_UNKNOWN: 'GW_ERR_INTEGRATION_UNKNOWN',
  CENTRAL_CONNECT: 'GW_ERR_CENTRAL_CONNECT',
  CENTRAL_AUTH: 'GW_ERR_CENTRAL_AUTH',
  CENTRAL_SCHEMA: 'GW_ERR_CENTRAL_SCHEMA',
  CENTRAL_REJECTED: 'GW_ERR_CENTRAL_REJECTED',
  CENTRAL_NOT_CONFIGURED: 'GW_ERR_CENTRAL_NOT_CONFIGURED',
  DAEMON_UNREACHABLE: 'GW_ERR_DAEMON_UNREACHABLE',
  ABORTED: 'GW_ERR_ABORTED',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

export interface GatewayErrorOptions {
  retryable?: boolean;
  cause?: unknown;
  /** Structured detail for logs and activity metadata; never secrets. */
  details?: Record<string, unknown>;
}

export class GatewayError extends Error {
  readonly code: ErrorCode;
  readonly retryable: boolean;
  readonly details: Record<string, unknown> | undefined;

  constructor(code: ErrorCode, message: string, options: GatewayErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'GatewayError';
    this.code = code;
    this.retryable = options.retryable ?? false;
    this.details = options.details;
  }
}

export function isGatewayError(err: unknown): err is GatewayError {
  return err instanceof GatewayError;
}

/** Wraps anything thrown into a GatewayError so callers can always branch on `code`. */
export function toGatewayError(err: unknown, fallback: ErrorCode, retryable = true): GatewayError {
  if (err instanceof GatewayError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new GatewayError(fallback, message, { retryable, cause: err });
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
