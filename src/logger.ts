import { pino, type DestinationStream, type Logger, type LevelWithSilent } from 'pino';

export type { Logger };

/** Keys whose values never reach a log line, at any of the depths our objects use. */
const SECRET_KEYS = [
  'password',
  'passwordHash',
  'key',
  'apiKey',
  'sasKey',
  'token',
  'secret',
  'sharedAccessKey',
  'psk',
  'authorization',
];
const REDACT_PATHS = [
  ...SECRET_KEYS,
  ...SECRET_KEYS.map((k) => `*.${k}`),
  ...SECRET_KEYS.map((k) => `*.*.${k}`),
  ...SECRET_KEYS.map((k) => `*.*.*.${k}`),
  'url',
  '*.url',
  'headers.authorization',
  'headers["x-api-key"]',
];

export interface LoggerOptions {
  level: LevelWithSilent;
  gatewayId: string;
  /** Where JSON lines go; stdout by default. Tests pass a stream to read them. */
  destination?: DestinationStream;
}

/**
 * JSON lines for journald. Every line carries `gatewayId`; child loggers add `component`,
 * `integrationId`, `requestId` and `clientId`. URLs are redacted whole since they may carry
 * passwords; log `redactUrl(url)` under another key when the address helps debugging.
 */
export function createLogger(options: LoggerOptions): Logger {
  return pino(
    {
      level: options.level,
      base: { gatewayId: options.gatewayId },
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    options.destination ?? pino.destination({ fd: 1, sync: false }),
  );
}

/** A logger that writes nothing, for CLI commands that print for a person instead. */
export function createSilentLogger(): Logger {
  return pino({ level: 'silent' });
}

/** `postgres://user:secret@host/db` → `postgres://user:***@host/db`. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return '[unparseable url]';
  }
}
