#!/usr/bin/env node
// First: MQTT packages must find a quiet `debug` when they load (see quiet-debug.ts).
import './quiet-debug.js';
import { realpathSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { ConfigError, defaultConfigPath, formatIssue } from './config/load.js';
import { ErrorCodes, isGatewayError, errorMessage } from './errors.js';
import { EXIT_FAILURE, EXIT_USAGE, usageError, type CommandIo } from './commands/common.js';
import { VERSION } from './version.js';

const USAGE = `iot-gateway ${VERSION} — on-premise IoT gateway

Usage: iot-gateway <command> [options]

Commands:
  run                                   run the daemon in the foreground
  check-config                          validate the config file
  hash-password                         hash a device password (stdin or prompt)
  test-connection NAME                  test one integration's connection
  sync NAME [--direction D]             run one sync now (import|export|both)
  status [--json]                       ask the running daemon for its state
  activity [--integration NAME] [--status S] [--since 1h] [--limit N] [--json]
  db migrate [--url URL]                apply the central PostgreSQL migrations
  replicate [--once]                    replicate pending log rows to PostgreSQL now

Options:
  -c, --config FILE   config file (default: $IOT_GATEWAY_CONFIG, /etc/iot-gateway/gateway.yaml, config/gateway.yaml)
  -h, --help          this help
  -v, --version       the version
`;

/** Codes that mean "fix the invocation or the config", exit 2 (SPEC §2). */
const USAGE_CODES = new Set<string>([
  ErrorCodes.USAGE,
  ErrorCodes.CONFIG_INVALID,
  ErrorCodes.CONFIG_NOT_FOUND,
  ErrorCodes.CONFIG_SECRET,
  ErrorCodes.LISTEN_IN_USE,
  ErrorCodes.INTEGRATION_UNKNOWN,
  ErrorCodes.CENTRAL_NOT_CONFIGURED,
]);

export async function main(argv: string[], io: Omit<CommandIo, 'configPath'>): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        config: { type: 'string', short: 'c' },
        help: { type: 'boolean', short: 'h' },
        version: { type: 'boolean', short: 'v' },
        json: { type: 'boolean' },
        once: { type: 'boolean' },
        url: { type: 'string' },
        direction: { type: 'string' },
        integration: { type: 'string' },
        status: { type: 'string' },
        since: { type: 'string' },
        limit: { type: 'string' },
      },
    });
  } catch (err) {
    io.err(`${errorMessage(err)}; see iot-gateway --help`);
    return EXIT_USAGE;
  }
  const { values, positionals } = parsed;
  if (values.version) {
    io.out(VERSION);
    return 0;
  }
  const [command, ...rest] = positionals;
  if (values.help || command === undefined || command === 'help') {
    io.out(USAGE);
    return command === undefined && !values.help ? EXIT_USAGE : 0;
  }
  const cmdIo: CommandIo = { ...io, configPath: values.config ?? defaultConfigPath(io.env) };
  try {
    // Commands are loaded on demand: `run` never pays for pg, `status` never for aedes.
    switch (command) {
      case 'run':
        return await (await import('./commands/run.js')).runCommand(cmdIo);
      case 'check-config':
        return (await import('./commands/check-config.js')).checkConfigCommand(cmdIo);
      case 'hash-password':
        return await (await import('./commands/hash-password.js')).hashPasswordCommand(cmdIo);
      case 'test-connection':
        return await (await import('./commands/integration-ops.js')).testConnectionCommand(cmdIo, rest[0]);
      case 'sync':
        return await (
          await import('./commands/integration-ops.js')
        ).syncCommand(cmdIo, rest[0], values.direction);
      case 'status':
        return await (await import('./commands/status.js')).statusCommand(cmdIo, values.json ?? false);
      case 'activity':
        return (await import('./commands/activity.js')).activityCommand(cmdIo, values);
      case 'db':
        if (rest[0] !== 'migrate')
          throw usageError('the db command has one subcommand: iot-gateway db migrate [--url URL]');
        return await (await import('./commands/central.js')).dbMigrateCommand(cmdIo, values.url);
      case 'replicate':
        return await (await import('./commands/central.js')).replicateCommand(cmdIo, values.once ?? false);
      default:
        throw usageError(`unknown command "${command}"; see iot-gateway --help`);
    }
  } catch (err) {
    return reportError(err, io);
  }
}

/** One clear sentence naming the cause and the fix; never a bare stack trace. */
function reportError(err: unknown, io: Pick<CommandIo, 'err'>): number {
  if (err instanceof ConfigError) {
    io.err(`invalid configuration in ${err.file}:`);
    for (const issue of err.issues) io.err(`  ${formatIssue(issue)}`);
    return EXIT_USAGE;
  }
  if (isGatewayError(err)) {
    io.err(`error: ${err.message}`);
    return USAGE_CODES.has(err.code) ? EXIT_USAGE : EXIT_FAILURE;
  }
  io.err(`error: ${errorMessage(err)}`);
  if (process.env.IOT_GATEWAY_DEBUG) io.err(String((err as Error)?.stack ?? ''));
  return EXIT_FAILURE;
}

/** Run when executed (node dist/cli.js, the npm bin link, a wrapper), not when imported by tests. */
function isEntry(): boolean {
  const script = process.argv[1];
  if (script === undefined) return false;
  try {
    return realpathSync(script) === realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

if (isEntry()) {
  main(process.argv.slice(2), {
    out: (line) => process.stdout.write(`${line}\n`),
    err: (line) => process.stderr.write(`${line}\n`),
    env: process.env,
  }).then(
    (code) => {
      process.exitCode = code;
      // Let stdout drain, then leave even if a library left a handle open.
      setTimeout(() => process.exit(code), 50).unref();
    },
    (err: unknown) => {
      process.stderr.write(`error: ${errorMessage(err)}\n`);
      process.exit(EXIT_FAILURE);
    },
  );
}
