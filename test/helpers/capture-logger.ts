import { Writable } from 'node:stream';
import { createLogger, type Logger, type LoggerOptions } from '../../src/logger.js';

/** One parsed JSON log line. */
export interface LogRecord {
  msg: string;
  [k: string]: unknown;
}

/**
 * A real pino logger whose JSON lines are parsed and pushed onto `into`, so a test can assert on
 * messages and fields. Several loggers may share one array to keep a single ordered record.
 */
export function createCaptureLogger(
  into: LogRecord[],
  options: Partial<Omit<LoggerOptions, 'destination'>> = {},
): Logger {
  return createLogger({
    level: options.level ?? 'debug',
    gatewayId: options.gatewayId ?? 'gw-test',
    destination: new Writable({
      write(chunk: Buffer, _enc, cb) {
        for (const line of chunk.toString('utf8').split('\n').filter(Boolean))
          into.push(JSON.parse(line) as LogRecord);
        cb();
      },
    }),
  });
}
