import { pino } from 'pino';
import { loadConfigFile, type LoadedConfig } from '../config/load.js';
import type { IntegrationConfig } from '../config/schema.js';
import { ErrorCodes, GatewayError } from '../errors.js';
import { createLogger, type Logger } from '../logger.js';
import { createActivityLog, type ActivityLog } from '../store/activity-log.js';
import { openStore, type Store } from '../store/database.js';

/** What every command gets: where to print, and the config path from -c or the default. */
export interface CommandIo {
  out: (line: string) => void;
  err: (line: string) => void;
  configPath: string;
  env: NodeJS.ProcessEnv;
}

/** Exit codes of SPEC §2. */
export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

export function usageError(message: string): GatewayError {
  return new GatewayError(ErrorCodes.USAGE, message);
}

/** One-shot commands log warnings as JSON to stderr, so stdout stays for the person. */
export function commandLogger(loaded: LoadedConfig): Logger {
  return createLogger({
    level: 'warn',
    gatewayId: loaded.config.gateway.id,
    destination: pino.destination({ fd: 2, sync: true }),
  });
}

export function loadForCommand(io: CommandIo): LoadedConfig {
  return loadConfigFile(io.configPath, io.env);
}

export function findIntegration(loaded: LoadedConfig, name: string): IntegrationConfig {
  const integration = loaded.config.integrations.find((i) => i.name === name || i.id === name);
  if (!integration) {
    const names = loaded.config.integrations.map((i) => i.name);
    throw new GatewayError(
      ErrorCodes.INTEGRATION_UNKNOWN,
      `no integration named "${name}" in ${loaded.file}; ${names.length ? `configured: ${names.join(', ')}` : 'none is configured'}`,
    );
  }
  return integration;
}

/** Opens the store next to a possibly running daemon (no lock: SQLite WAL serialises writers). */
export function openStoreForCommand(
  loaded: LoadedConfig,
  logger: Logger,
): { store: Store; activity: ActivityLog } {
  const store = openStore({
    dataDir: loaded.config.gateway.dataDir,
    logger,
    onCorrupt: 'refuse',
    lock: false,
  });
  const activity = createActivityLog({
    db: store.db,
    gatewayId: loaded.config.gateway.id,
    organizationId: loaded.config.gateway.organizationId,
    logger,
  });
  return { store, activity };
}
