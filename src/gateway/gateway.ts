import type { Config, IntegrationConfig } from '../config/schema.js';
import { ErrorCodes } from '../errors.js';
import type { Logger } from '../logger.js';
import { loadProviders, providerRegistry, type ProviderFactories } from '../providers/registry.js';
import { createActivityLog, type ActivityLog } from '../store/activity-log.js';
import {
  createBrokerPersistence,
  type BrokerPersistence,
  type BrokerPersistenceLimits,
} from '../store/broker-persistence.js';
import { openStore, type Store } from '../store/database.js';
import { createOutbox } from '../store/outbox.js';
import { createReportedState, type ReportedState } from '../store/reported-state.js';
import type { Outbox } from '../store/outbox-types.js';
import type { Replicator } from '../store/replicator.js';
import { createBroker, type Broker } from './broker/broker.js';
import { watchConfigFile } from './config-watcher.js';
import { createIngest, type Ingest } from './delivery/ingest.js';
import { watchFailures } from './failure-alerts.js';
import { startHousekeeping, type Housekeeping } from './housekeeping.js';
import { createHttpServer, type HttpServer } from './http/http-server.js';
import type { Metrics } from './http/metrics.js';
import type { GatewayStatusSnapshot } from './http/status.js';
import { createIntegrationRuntime, type IntegrationRuntime } from './integration-runtime.js';
import type { runConnectionTest, SyncDirection, SyncOutcome } from './operations.js';
import { createReloader, reconcileIntegrations, type ReloadResult } from './reload.js';
import { createGatewayStatus } from './status-snapshot.js';
import { createSystemdNotifier, type SystemdNotifier } from './systemd-notify.js';
import { VERSION } from '../version.js';

export type { ReloadResult };

export interface GatewayOptions {
  configFile: string;
  config: Readonly<Config>;
  logger: Logger;
  /** Changes the log level when a reload changes gateway.log.level. */
  setLogLevel?: (level: string) => void;
  notifier?: SystemdNotifier;
  now?: () => number;
  /** Provider factories by integration type; the registry when absent (tests inject fakes). */
  providers?: ProviderFactories;
  /**
   * An already-open store to use instead of opening gateway.dataDir; its owner closes it
   * (stop() does not).
   */
  store?: Store;
}

export interface Gateway {
  /** Ordered start; a failure or an abort stops what was started, in reverse, and rethrows. */
  start(signal?: AbortSignal): Promise<void>;
  /** Reverse-ordered, bounded stop; returns the exit code (0, or 1 when a step failed). */
  stop(reason: string): Promise<number>;
  /** Re-reads the config file and applies the difference (SIGHUP, file watcher). */
  reload(): Promise<ReloadResult>;
  status(): GatewayStatusSnapshot;
  testConnection(name: string): ReturnType<typeof runConnectionTest>;
  sync(name: string, direction: SyncDirection): Promise<SyncOutcome>;
}

const PROMETHEUS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';
/** Device ids seen connecting that knownDevices() remembers, at most. */
const MAX_SEEN_DEVICES = 100_000;

export function createGateway(options: GatewayOptions): Gateway {
  const { logger, configFile } = options;
  const now = options.now ?? Date.now;
  const notifier = options.notifier ?? createSystemdNotifier({ logger });
  const providers = options.providers ?? providerRegistry;
  /** Built-in providers are loaded on first use (injected ones are already there). */
  const loadProvidersOf = (list: readonly IntegrationConfig[]): Promise<void> =>
    options.providers ? Promise.resolve() : loadProviders(list.filter((i) => i.enabled).map((i) => i.type));
  const startedAt = now();

  // Created in start(), in this order; stop() undoes them in reverse.
  let store: Store | undefined;
  let activity: ActivityLog | undefined;
  let outbox: Outbox | undefined;
  let reportedState: ReportedState | undefined;
  let ingest: Ingest | undefined;
  let brokerPersistence: BrokerPersistence | undefined;
  /** Device ids seen connecting since start, for providers' knownDevices(). */
  const seenDevices = new Set<string>();
  let broker: Broker | undefined;
  let http: HttpServer | undefined;
  let replicator: Replicator | undefined;
  let housekeeping: Housekeeping | undefined;
  let stopWatching: (() => void) | undefined;
  let stopAlerts: (() => void) | undefined;
  let stopWake: (() => void) | undefined;
  const integrations = new Map<string, IntegrationRuntime>();
  let boundListeners: GatewayStatusSnapshot['broker']['listeners'] = [];
  let httpAddress: { host: string; port: number } | undefined;
  let stopping = false;

  const reloader = createReloader({
    configFile,
    config: options.config,
    logger,
    notifier,
    now,
    activity: () => activity,
    stopping: () => stopping,
    refreshFiles: refreshTlsFiles,
    async apply(next, prev, changed) {
      // First, so that a provider module that cannot load leaves nothing half applied.
      await loadProvidersOf(next.integrations);
      if (next.gateway.log.level !== prev.gateway.log.level) options.setLogLevel?.(next.gateway.log.level);
      if (changed.some((p) => p.startsWith('broker.'))) {
        broker?.updateConfig(next.broker);
        brokerPersistence?.updateLimits(brokerPersistenceLimits(next.broker));
      }
      ingest?.setIntegrations(next.integrations);
      await reconcileIntegrations(integrations, next.integrations, {
        start: startIntegration,
        stop: stopIntegration,
      });
      if (changed.some((p) => p.startsWith('retention.'))) housekeeping?.setRetention(next.retention);
    },
  });
  const config = () => reloader.config;

  const gatewayStatus = createGatewayStatus({
    startedAt,
    now,
    config,
    configState: () => reloader.state(),
    broker: () => broker,
    brokerPersistence: () => brokerPersistence,
    listeners: () => boundListeners,
    store: () => store,
    activity: () => activity,
    outbox: () => outbox,
    wal: () => housekeeping?.wal,
    replicator: () => replicator,
    integration: (id) => integrations.get(id),
    stopping: () => stopping,
  });
  const status = gatewayStatus.snapshot;

  function startIntegration(integration: IntegrationConfig): void {
    if (!activity || !outbox || !broker) throw new Error('the gateway is not started');
    const local = broker;
    const runtime = createIntegrationRuntime({
      integration,
      gatewayId: config().gateway.id,
      providers,
      outbox,
      activity,
      publishLocal: (message) => local.publish(message),
      logger,
      knownDevices,
      reportedState: () => reportedState?.all() ?? new Map(),
    });
    integrations.set(integration.id, runtime);
    for (const device of local.connectedDevices()) runtime.tellPresence(device.id, true);
    runtime.start();
  }

  /** Configured device ids, and those seen connecting or reporting state. */
  function knownDevices(): string[] {
    const ids = new Set(config().broker.devices.map((d) => d.id));
    for (const id of seenDevices) ids.add(id);
    for (const id of reportedState?.all().keys() ?? []) ids.add(id);
    return [...ids];
  }

  function onPresence(deviceId: string, online: boolean): void {
    if (online && seenDevices.size < MAX_SEEN_DEVICES) seenDevices.add(deviceId);
    for (const runtime of integrations.values()) runtime.tellPresence(deviceId, online);
  }

  async function stopIntegration(runtime: IntegrationRuntime): Promise<void> {
    integrations.delete(runtime.config.id);
    await runtime.stop();
  }

  async function start(signal?: AbortSignal): Promise<void> {
    const checkAbort = () => {
      if (signal?.aborted) throw new Error('start aborted');
    };
    const cfg = config();
    try {
      store =
        options.store ??
        openStore({
          dataDir: cfg.gateway.dataDir,
          logger,
          onCorrupt: cfg.gateway.onCorruptStore,
          lock: true,
        });
      activity = createActivityLog({
        db: store.db,
        gatewayId: cfg.gateway.id,
        organizationId: cfg.gateway.organizationId,
        logger,
      });
      if (store.quarantinedTo) {
        activity.record({
          activityType: 'store_quarantined',
          direction: 'internal',
          status: 'error',
          errorCode: ErrorCodes.STORE_CORRUPT,
          errorMessage: `corrupt store moved to ${store.quarantinedTo}; a new empty store was created`,
          metadata: { quarantinedTo: store.quarantinedTo },
        });
      }
      checkAbort();
      outbox = createOutbox({
        db: store.db,
        logger: logger.child({ component: 'outbox' }),
        activity,
        syncWal: store.syncWal,
      });
      reportedState = createReportedState({ db: store.db, logger: logger.child({ component: 'state' }) });
      ingest = createIngest({
        outbox,
        logger: logger.child({ component: 'ingest' }),
        integrations: cfg.integrations,
        reportedState,
      });
      const ingestRef = ingest;
      if (cfg.broker.persistence === 'sqlite') {
        brokerPersistence = createBrokerPersistence({
          db: store.db,
          syncWal: store.syncWal,
          logger: logger.child({ component: 'broker-persistence' }),
          limits: brokerPersistenceLimits(cfg.broker),
        });
      }
      broker = createBroker({
        persistence: brokerPersistence,
        config: cfg.broker,
        gatewayId: cfg.gateway.id,
        retainedStatus: cfg.features.retainedStatus,
        logger: logger.child({ component: 'broker' }),
        activity,
        ingest: (message) => ingestRef.accept(message),
        onPresence,
      });
      stopWake = outbox.onEnqueue((ids) => {
        for (const id of ids) integrations.get(id)?.forwarder.wake();
      });
      stopAlerts = watchFailures({ activity, logger, integrations: () => config().integrations });
      boundListeners = await broker.listen();
      await loadProvidersOf(cfg.integrations);
      checkAbort();
      for (const integration of cfg.integrations) if (integration.enabled) startIntegration(integration);
      if (cfg.http.enabled) {
        http = createHttpServer({
          host: cfg.http.host,
          port: cfg.http.port,
          logger: logger.child({ component: 'http' }),
          getStatus: status,
          isReady: gatewayStatus.readiness,
          activity,
          dashboard: cfg.features.dashboard,
          metrics: lazyMetrics(status),
        });
        httpAddress = await http.listen();
      }
      checkAbort();
      if (cfg.central && cfg.gateway.organizationId) {
        // pg is loaded only when replication is configured (~15 MB of RSS otherwise).
        const { createReplicator } = await import('../store/replicator.js');
        replicator = createReplicator({
          db: store.db,
          central: cfg.central,
          organizationId: cfg.gateway.organizationId,
          gatewayId: cfg.gateway.id,
          logger: logger.child({ component: 'replicator' }),
          activity,
        });
        replicator.start();
      }
      housekeeping = startHousekeeping({ store, outbox, activity, retention: cfg.retention, logger });
      stopWatching = watchConfigFile({
        file: configFile,
        logger,
        onChange: () => {
          void reloader.reload();
        },
      });
      activity.record({
        activityType: 'gateway_started',
        direction: 'internal',
        status: 'success',
        metadata: { version: VERSION, pid: process.pid, listeners: boundListeners },
      });
      logger.info(
        { listeners: boundListeners, http: httpAddress, version: VERSION, dataDir: cfg.gateway.dataDir },
        'gateway_ready',
      );
      notifier.ready(`${boundListeners.length} listener(s), ${integrations.size} integration(s)`);
      // Liveness, not readiness: a full disk must not make systemd restart us in a loop; the pings
      // themselves stop when the event loop is blocked.
      notifier.startWatchdog(() => stopping || (broker?.listening ?? false));
    } catch (err) {
      await stop('start failed');
      throw err;
    }
  }

  async function stop(reason: string): Promise<number> {
    if (stopping) return 0;
    stopping = true;
    notifier.stopping();
    logger.info({ reason }, 'gateway_stopping');
    let failed = 0;
    const step = async (name: string, fn: () => unknown) => {
      try {
        await fn();
      } catch (err) {
        failed++;
        logger.error({ err, step: name }, 'stop_step_failed');
      }
    };
    await step('config watcher', () => stopWatching?.());
    await step('schedules', () => housekeeping?.stop());
    await step('replicator', () => replicator?.stop());
    await step('http', () => http?.close());
    // The broker stops taking messages before the queues are flushed, so nothing arrives after.
    await step('broker', () => broker?.close());
    // After the broker: what aedes handed over while closing (a clean session's wipe) lands.
    await step('broker persistence', () => brokerPersistence?.destroy());
    await step('integrations', () => Promise.all([...integrations.values()].map(stopIntegration)));
    await step('wake', () => stopWake?.());
    await step('alerts', () => stopAlerts?.());
    await step('outbox', () => outbox?.close());
    await step('reported state', () => reportedState?.close());
    await step('activity', () =>
      activity?.record({
        activityType: 'gateway_stopped',
        direction: 'internal',
        status: 'success',
        metadata: { reason },
      }),
    );
    // A store handed in by the caller is the caller's to close.
    if (!options.store) await step('store', () => store?.close());
    notifier.close();
    logger.info({ reason, failedSteps: failed }, 'gateway_stopped');
    return failed === 0 ? 0 : 1;
  }

  function refreshTlsFiles(): void {
    if (!broker || !config().broker.listeners.some((l) => l.type === 'tls')) return;
    const failures = broker.refreshTls();
    if (failures.length === 0) {
      logger.info('tls_files_reloaded');
      return;
    }
    for (const error of failures) logger.error({ error }, 'tls_reload_failed');
    activity?.record({
      activityType: 'tls_reload',
      direction: 'internal',
      status: 'failed',
      errorCode: ErrorCodes.CONFIG_INVALID,
      errorMessage: failures.join('; '),
    });
  }

  function runtimeOf(name: string): IntegrationRuntime {
    const integration = config().integrations.find((i) => i.name === name);
    const runtime = integration && integrations.get(integration.id);
    if (!runtime) throw new Error(`no running integration named "${name}"`);
    return runtime;
  }

  return {
    start,
    stop,
    reload: () => reloader.reload(),
    status,
    testConnection: (name) => runtimeOf(name).testConnection(),
    sync: (name, direction) => runtimeOf(name).sync(direction),
  };
}

/** prom-client is loaded on the first scrape, not at start: a gateway nobody scrapes saves ~12 MB. */
function lazyMetrics(getStatus: () => GatewayStatusSnapshot): Pick<Metrics, 'contentType' | 'render'> {
  let metrics: Promise<Metrics> | undefined;
  return {
    contentType: PROMETHEUS_CONTENT_TYPE,
    async render() {
      metrics ??= import('./http/metrics.js').then((m) => m.createMetrics({ getStatus }));
      return (await metrics).render();
    },
  };
}

function brokerPersistenceLimits(config: Config['broker']): BrokerPersistenceLimits {
  return {
    maxQueuedMessages: config.offlineQueue.maxMessages,
    maxQueuedBytes: config.offlineQueue.maxBytes,
    maxRetainedPerDevice: config.maxRetainedPerDevice,
    sessionExpiryMs: config.sessionExpiry,
  };
}
