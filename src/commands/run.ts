import { createGateway } from '../gateway/gateway.js';
import { createSystemdNotifier } from '../gateway/systemd-notify.js';
import { createLogger } from '../logger.js';
import { loadForCommand, type CommandIo } from './common.js';

/**
 * `iot-gateway run`: the daemon in the foreground. Owns the process signals; the gateway owns
 * the order of start and stop and reports an exit code instead of exiting itself.
 */
export async function runCommand(io: CommandIo): Promise<number> {
  const loaded = loadForCommand(io);
  const { config } = loaded;
  const logger = createLogger({ level: config.gateway.log.level, gatewayId: config.gateway.id });
  const notifier = createSystemdNotifier({ env: io.env, logger: logger.child({ component: 'systemd' }) });
  const gateway = createGateway({
    configFile: loaded.file,
    config,
    logger,
    notifier,
    setLogLevel: (level) => {
      logger.level = level;
    },
  });

  const abort = new AbortController();
  let stopRequested: ((reason: string) => void) | undefined;
  const stopped = new Promise<string>((resolve) => {
    stopRequested = resolve;
  });
  const onSignal = (signal: NodeJS.Signals) => {
    logger.info({ signal }, 'signal_received');
    abort.abort();
    stopRequested?.(signal);
  };
  const onHup = () => {
    logger.info({ signal: 'SIGHUP' }, 'signal_received');
    void gateway.reload();
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  process.on('SIGHUP', onHup);
  const onFatal = (err: unknown) => {
    logger.fatal({ err }, 'uncaught_exception');
    stopRequested?.('uncaught exception');
  };
  process.on('uncaughtException', onFatal);
  process.on('unhandledRejection', onFatal);

  try {
    await gateway.start(abort.signal);
  } catch (err) {
    logger.flush();
    throw err;
  }
  const reason = await stopped;
  // Bounded stop: systemd's TimeoutStopSec is the outer bound, shutdownTimeout ours.
  const timer = setTimeout(() => {
    logger.error({ timeoutMs: config.gateway.shutdownTimeout }, 'stop_timed_out');
    logger.flush();
    process.exit(1);
  }, config.gateway.shutdownTimeout);
  timer.unref();
  const code = await gateway.stop(reason);
  clearTimeout(timer);
  process.off('SIGHUP', onHup);
  logger.flush();
  return reason === 'uncaught exception' ? 1 : code;
}
