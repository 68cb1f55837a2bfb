import { redactUrl } from '../logger.js';
import { migrateCentral } from '../store/central/central-migrations.js';
import { createReplicator } from '../store/replicator.js';
import { ErrorCodes, GatewayError } from '../errors.js';
import {
  EXIT_FAILURE,
  EXIT_OK,
  commandLogger,
  loadForCommand,
  openStoreForCommand,
  type CommandIo,
} from './common.js';

/** `iot-gateway db migrate [--url URL]`: applies the central schema migrations (idempotent). */
export async function dbMigrateCommand(io: CommandIo, url: string | undefined): Promise<number> {
  let target = url;
  let logger;
  if (target === undefined) {
    const loaded = loadForCommand(io);
    logger = commandLogger(loaded);
    target = loaded.config.central?.url;
    if (!target) {
      throw new GatewayError(
        ErrorCodes.CENTRAL_NOT_CONFIGURED,
        `no PostgreSQL to migrate: pass --url postgres://… or set central.url in ${loaded.file}`,
      );
    }
  } else {
    const { createSilentLogger } = await import('../logger.js');
    logger = createSilentLogger();
  }
  const result = await migrateCentral({ url: target, logger });
  io.out(
    result.applied.length === 0
      ? `${redactUrl(target)}: schema is up to date (${result.current})`
      : `${redactUrl(target)}: applied ${result.applied.join(', ')}; now at ${result.current}`,
  );
  return EXIT_OK;
}

/** `iot-gateway replicate [--once]`: pushes pending log rows now; --once runs a single batch. */
export async function replicateCommand(io: CommandIo, once: boolean): Promise<number> {
  const loaded = loadForCommand(io);
  const { central, gateway } = loaded.config;
  if (!central || !gateway.organizationId) {
    throw new GatewayError(
      ErrorCodes.CENTRAL_NOT_CONFIGURED,
      `replication is not configured: set central.url and gateway.organizationId in ${loaded.file}`,
    );
  }
  const logger = commandLogger(loaded);
  const { store, activity } = openStoreForCommand(loaded, logger);
  const replicator = createReplicator({
    db: store.db,
    central,
    organizationId: gateway.organizationId,
    gatewayId: gateway.id,
    logger,
    activity,
  });
  let replicated = 0;
  let rejected = 0;
  let pending = 0;
  try {
    // Bounded: each round moves at least one batch or stops.
    for (let round = 0; round < 100_000; round++) {
      const r = await replicator.runOnce();
      replicated += r.replicated;
      rejected += r.rejected;
      pending = r.pending;
      if (once || pending === 0 || r.replicated + r.rejected === 0) break;
    }
  } finally {
    await replicator.stop();
    store.close();
  }
  io.out(`replicated ${replicated} row(s), set aside ${rejected}, ${pending} pending`);
  return rejected > 0 ? EXIT_FAILURE : EXIT_OK;
}
