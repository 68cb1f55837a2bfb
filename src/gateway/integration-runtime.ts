import type { IntegrationConfig } from '../config/schema.js';
import type { Logger } from '../logger.js';
import type { InboundMessage, Provider } from '../providers/provider.js';
import { createProvider, type ProviderFactories } from '../providers/registry.js';
import type { ActivityLog } from '../store/activity-log.js';
import type { Outbox } from '../store/outbox-types.js';
import { createConnectionSupervisor, type ConnectionSupervisor } from './delivery/connection-supervisor.js';
import { createForwarder, type Forwarder } from './delivery/forwarder.js';
import { createProviderContext } from './provider-context.js';
import { runConnectionTest, runSync, type SyncDirection, type SyncOutcome } from './operations.js';
import { scheduleJob, type ScheduledJob } from './schedules.js';

export interface IntegrationRuntimeOptions {
  integration: IntegrationConfig;
  gatewayId: string;
  providers: ProviderFactories;
  outbox: Outbox;
  activity: ActivityLog;
  /** Hands cloud → device traffic to the local broker. */
  publishLocal(message: InboundMessage): Promise<void>;
  logger: Logger;
  /** The local device ids the gateway knows, for the provider's import. */
  knownDevices?: () => readonly string[];
  /** The latest reported state per device, for the provider's export. */
  reportedState?: () => ReadonlyMap<string, Record<string, unknown>>;
}

/** One running integration: its provider, connection supervisor, forwarder and sync schedule. */
export interface IntegrationRuntime {
  /** The integration's config as applied; `update` replaces it. */
  readonly config: IntegrationConfig;
  readonly provider: Provider;
  readonly supervisor: ConnectionSupervisor;
  readonly forwarder: Forwarder;
  /** Aborted by `stop`: operations in flight (sync, test) end with it. */
  readonly signal: AbortSignal;
  start(): void;
  /** Applies a config that differs only in what applies live (queue limits, schedule). */
  update(next: IntegrationConfig): void;
  /** Unacknowledged rows stay queued for the next start. */
  stop(): Promise<void>;
  testConnection(): ReturnType<typeof runConnectionTest>;
  sync(direction: SyncDirection): Promise<SyncOutcome>;
  /** Local presence: a device connected to (true) or left (false) the embedded broker. */
  tellPresence(deviceId: string, online: boolean): void;
}

export function createIntegrationRuntime(options: IntegrationRuntimeOptions): IntegrationRuntime {
  const { activity, logger } = options;
  let config = options.integration;
  const log = logger.child({ component: 'integration', integrationId: config.id, integration: config.name });
  const provider = createProvider(
    createProviderContext({
      gatewayId: options.gatewayId,
      integration: config,
      logger: log,
      activity,
      ...(options.knownDevices ? { knownDevices: options.knownDevices } : {}),
      ...(options.reportedState ? { reportedState: options.reportedState } : {}),
    }),
    options.providers,
  );
  /** Cloud → device publishes handed to the local broker and not yet done there. */
  const publishing = new Set<Promise<void>>();
  provider.onCommand((message) => {
    const done = options
      .publishLocal(message)
      .catch((err: unknown) => log.error({ err, topic: message.topic }, 'inbound_publish_failed'))
      .finally(() => publishing.delete(done));
    publishing.add(done);
  });
  const localPublished = async (): Promise<void> => {
    await Promise.all(publishing);
  };
  const supervisor = createConnectionSupervisor({
    provider,
    logger: log,
    activity,
    integrationId: config.id,
  });
  const forwarder = createForwarder({
    outbox: options.outbox,
    provider,
    supervisor,
    integrationId: config.id,
    logger: log,
    activity,
    queue: {
      rate: config.queue.rate,
      inflight: config.queue.inflight,
      maxAttempts: config.queue.maxAttempts,
    },
  });
  const abort = new AbortController();
  let syncJob: ScheduledJob | undefined;

  const operation = () => ({
    provider,
    integration: config,
    activity,
    logger: log,
    signal: abort.signal,
    localPublished,
  });

  /** (Re)creates the sync schedule from the current config. */
  function scheduleSync(): void {
    syncJob?.stop();
    syncJob = undefined;
    const cron = config.schedule.sync;
    if (!cron) return;
    syncJob = scheduleJob({
      name: `sync:${config.name}`,
      cron,
      logger: log,
      job: () => runSync(operation(), 'both'),
    });
  }

  return {
    get config() {
      return config;
    },
    provider,
    supervisor,
    forwarder,
    signal: abort.signal,
    start() {
      scheduleSync();
      supervisor.start();
      forwarder.start();
      log.info({ type: config.type }, 'integration_started');
    },
    update(next) {
      forwarder.setLimits({
        rate: next.queue.rate,
        inflight: next.queue.inflight,
        maxAttempts: next.queue.maxAttempts,
      });
      const scheduleChanged = JSON.stringify(config.schedule) !== JSON.stringify(next.schedule);
      config = next;
      if (scheduleChanged) scheduleSync();
    },
    async stop() {
      abort.abort();
      syncJob?.stop();
      // Forwarder first: it stops taking rows; unacknowledged rows stay queued for the next start.
      await forwarder.stop();
      await supervisor.stop();
      logger.info({ integrationId: config.id, integration: config.name }, 'integration_stopped');
    },
    testConnection() {
      return runConnectionTest({ ...operation(), logger });
    },
    sync(direction) {
      return runSync({ ...operation(), logger }, direction);
    },
    tellPresence(deviceId, online) {
      try {
        provider.onDevicePresence?.(deviceId, online);
      } catch (err) {
        log.error({ err, deviceId }, 'device_presence_failed');
      }
    },
  };
}
