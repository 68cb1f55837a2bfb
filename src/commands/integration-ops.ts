import { redactUrl } from '../logger.js';
import {
  runConnectionTest,
  runSync,
  type OperationContext,
  type SyncDirection,
} from '../gateway/operations.js';
import { createProviderContext } from '../gateway/provider-context.js';
import { createProvider, loadProviders } from '../providers/registry.js';
import { createReportedState } from '../store/reported-state.js';
import {
  EXIT_FAILURE,
  EXIT_OK,
  commandLogger,
  findIntegration,
  loadForCommand,
  openStoreForCommand,
  usageError,
  type CommandIo,
} from './common.js';

const OP_TIMEOUT_MS = 60_000;

/**
 * Builds what one integration operation needs outside the daemon (its own provider and a
 * connection to the store, next to a running daemon if there is one), runs it, and cleans up.
 */
async function withIntegration<T>(
  io: CommandIo,
  name: string,
  run: (ctx: OperationContext) => Promise<T>,
): Promise<T> {
  const loaded = loadForCommand(io);
  const integration = findIntegration(loaded, name);
  const logger = commandLogger(loaded);
  await loadProviders([integration.type]);
  const { store, activity } = openStoreForCommand(loaded, logger);
  // Read once from the store: what the daemon last wrote (this process merges nothing).
  const reported = createReportedState({ db: store.db, logger });
  const provider = createProvider(
    createProviderContext({
      gatewayId: loaded.config.gateway.id,
      integration,
      logger,
      activity,
      knownDevices: () => [
        ...new Set([...loaded.config.broker.devices.map((d) => d.id), ...reported.all().keys()]),
      ],
      reportedState: () => reported.all(),
    }),
  );
  try {
    return await run({ provider, integration, activity, logger, signal: AbortSignal.timeout(OP_TIMEOUT_MS) });
  } finally {
    await provider.close().catch(() => {});
    store.close();
  }
}

/** `iot-gateway test-connection NAME`: outcome and latency, recorded as activity. */
export async function testConnectionCommand(io: CommandIo, name: string | undefined): Promise<number> {
  if (!name) throw usageError('test-connection needs the integration name: iot-gateway test-connection NAME');
  return withIntegration(io, name, async (ctx) => {
    const result = await runConnectionTest(ctx);
    const where =
      typeof result.details.url === 'string' ? redactUrl(result.details.url) : ctx.integration.type;
    if (result.ok) {
      io.out(`${ctx.integration.name}: OK in ${result.latencyMs} ms (${where})`);
    } else {
      io.out(`${ctx.integration.name}: FAILED after ${result.latencyMs} ms (${where})`);
      io.err(`${result.error?.code ?? 'error'}: ${result.error?.message ?? 'unknown error'}`);
    }
    return result.ok ? EXIT_OK : EXIT_FAILURE;
  });
}

/** `iot-gateway sync NAME [--direction import|export|both]`: counts and a sync log row. */
export async function syncCommand(
  io: CommandIo,
  name: string | undefined,
  direction: string | undefined,
): Promise<number> {
  if (!name)
    throw usageError(
      'sync needs the integration name: iot-gateway sync NAME [--direction import|export|both]',
    );
  const dir = (direction ?? 'both') as SyncDirection;
  if (!['import', 'export', 'both'].includes(dir)) {
    throw usageError(`--direction must be import, export or both, not "${direction}"`);
  }
  return withIntegration(io, name, async (ctx) => {
    const outcome = await runSync(ctx, dir);
    io.out(
      `${ctx.integration.name}: ${outcome.syncType} ${outcome.ok ? 'completed' : 'FAILED'} in ${outcome.durationMs} ms — processed ${outcome.recordsProcessed}, succeeded ${outcome.recordsSucceeded}, failed ${outcome.recordsFailed}`,
    );
    if (outcome.details?.note) io.out(`note: ${String(outcome.details.note)}`);
    if (outcome.error) io.err(`${outcome.error.code}: ${outcome.error.message}`);
    return outcome.ok ? EXIT_OK : EXIT_FAILURE;
  });
}
