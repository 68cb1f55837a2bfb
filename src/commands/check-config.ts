import { ConfigError, formatIssue, loadConfigFile } from '../config/load.js';
import { EXIT_FAILURE, EXIT_OK, type CommandIo } from './common.js';

/** `iot-gateway check-config`: every problem as `path: message (line N)`; exit 0 or 1. */
export function checkConfigCommand(io: CommandIo): number {
  try {
    const { config, file } = loadConfigFile(io.configPath, io.env);
    io.out(
      `${file}: OK (gateway ${config.gateway.id}, ${config.broker.listeners.length} listener(s), ${config.broker.devices.length} device(s), ${config.integrations.length} integration(s))`,
    );
    return EXIT_OK;
  } catch (err) {
    if (err instanceof ConfigError) {
      io.err(`${err.file}: ${err.issues.length} problem(s)`);
      for (const issue of err.issues) io.err(`  ${formatIssue(issue)}`);
      return EXIT_FAILURE;
    }
    throw err;
  }
}
