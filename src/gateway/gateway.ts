import { accessSync, constants, readFileSync, statfsSync } from 'node:fs';
import type { Config, IntegrationConfig } from '../config/schema.js';
import { RESTART_REQUIRED_KEYS } from '../config/schema.js';
import { ConfigError, formatIssue, loadConfigFile } from '../config/load.js';
import { ErrorCodes, errorMessage, isGatewayError } from '../errors.js';
import type { Logger } from '../logger.js';
import type { Provider } from '../providers/provider.js';
import { createProvider } from '../providers/registry.js';
import { createActivityLog, type ActivityLog } from '../store/activity-log.js';
import { openStore, type Store } from '../store/database.js';
import { createOutbox } from '../store/outbox.js';
import type { Outbox } from '../store/outbox-types.js';
import type { Replicator } from '../store/replicator.js';
import { createRetention } from '../store/retention.js';
import { createWalWatch, type WalWatch } from '../store/wal-watch.js';
import { createClockWatch } from './clock-watch.js';
import { createBroker, type Broker } from './broker/broker.js';
import { watchConfigFile } from './config-watcher.js';
import { createConnectionSupervisor, type ConnectionSupervisor } from './delivery/connection-supervisor.js';
import { watchFailures } from './failure-alerts.js';
import { createForwarder, type Forwarder } from './delivery/forwarder.js';
import { createHttpServer, type HttpServer } from './http/http-server.js';
import { createIngest, type Ingest } from './delivery/ingest.js';
import type { Metrics } from './http/metrics.js';
import { runConnectionTest, runSync, type SyncDirection, type SyncOutcome } from './operations.js';
import { scheduleJob, type ScheduledJob } from './schedules.js';
import type { GatewayStatusSnapshot, IntegrationStatus, ReplicationStatus } from './http/status.js';
import { createSystemdNotifier, type SystemdNotifier } from './systemd-notify.js';
import { VERSION } from '../version.js';

export interface GatewayOptions {
  configFile: string;
  config: Readonly<Config>;
  logger: Logger;
  /** Changes the log level when a reload changes gateway.log.level. */
  setLogLevel?: (level: string) => void;
  notifier?: SystemdNotifier;
  now?: () => number;
}

export interface ReloadResult {
  ok: boolean;
  changed: string[];
  pendingRestart: string[];
  error?: string;
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

interface IntegrationRuntime {
  config: IntegrationConfig;
  provider: Provider;
  supervisor: ConnectionSupervisor;
  forwarder: Forwarder;
  syncJob: ScheduledJob | undefined;
  abort: AbortController;
}

const QUEUE_EXPIRY_INTERVAL_MS = 60_000;
/** How often the wall clock is compared with the monotonic one (R17). */
const CLOCK_CHECK_INTERVAL_MS = 1_000;
/** How often the WAL gets a PASSIVE checkpoint and a size check (R19). */
const WAL_CHECK_INTERVAL_MS = 30_000;
const PROMETHEUS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';
/** Below this much free space in dataDir the store counts as not writable (/readyz fails). */
const MIN_FREE_BYTES = 16 * 1024 * 1024;

export function createGateway(options: GatewayOptions): Gateway {
  const { logger, configFile } = options;
  const now = options.now ?? Date.now;
  const notifier = options.notifier ?? createSystemdNotifier({ logger });
  let config = options.config;
  let configText = safeRead(configFile);
  let configLoadedAt = now();
  let lastConfigError: GatewayStatusSnapshot['config']['lastError'] = null;
  let pendingRestart: string[] = [];
  const startedAt = now();

  // Created in start(), in this order; stop() undoes them in reverse.
  let store: Store | undefined;
  let activity: ActivityLog | undefined;
  let outbox: Outbox | undefined;
  let ingest: Ingest | undefined;
  let broker: Broker | undefined;
  let http: HttpServer | undefined;
  let replicator: Replicator | undefined;
  let retentionJob: ScheduledJob | undefined;
  let expiryTimer: NodeJS.Timeout | undefined;
  let walTimer: NodeJS.Timeout | undefined;
  let clockTimer: NodeJS.Timeout | undefined;
  let walWatch: WalWatch | undefined;
  let stopWatching: (() => void) | undefined;
  let stopAlerts: (() => void) | undefined;
  let stopWake: (() => void) | undefined;
  const integrations = new Map<string, IntegrationRuntime>();
  let boundListeners: GatewayStatusSnapshot['broker']['listeners'] = [];
  let httpAddress: { host: string; port: number } | undefined;
  let stopping = false;
  let reloading: Promise<ReloadResult> | undefined;

  const requireStarted = () => {
    if (!activity || !outbox || !broker) throw new Error('the gateway is not started');
    return { activity, outbox, broker };
  };

  function startIntegration(integration: IntegrationConfig): void {
    const started = requireStarted();
    const log = logger.child({
      component: 'integration',
      integrationId: integration.id,
      integration: integration.name,
    });
    const provider = createProvider({
      gatewayId: config.gateway.id,
      integration,
      logger: log,
      activity: started.activity,
    });
    provider.onCommand((message) => {
      started.broker
        .publish(message)
        .catch((err: unknown) => log.error({ err, topic: message.topic }, 'inbound_publish_failed'));
    });
    const supervisor = createConnectionSupervisor({
      provider,
      logger: log,
      activity: started.activity,
      integrationId: integration.id,
    });
    const forwarder = createForwarder({
      outbox: started.outbox,
      provider,
      supervisor,
      integrationId: integration.id,
      logger: log,
      activity: started.activity,
      queue: {
        rate: integration.queue.rate,
        inflight: integration.queue.inflight,
        maxAttempts: integration.queue.maxAttempts,
      },
    });
    const abort = new AbortController();
    const runtime: IntegrationRuntime = {
      config: integration,
      provider,
      supervisor,
      forwarder,
      syncJob: undefined,
      abort,
    };
    scheduleSync(runtime, log);
    integrations.set(integration.id, runtime);
    supervisor.start();
    forwarder.start();
    log.info({ type: integration.type }, 'integration_started');
  }

  /** (Re)creates the integration's sync schedule from its current config. */
  function scheduleSync(runtime: IntegrationRuntime, log: Logger): void {
    runtime.syncJob?.stop();
    runtime.syncJob = undefined;
    const cron = runtime.config.schedule.sync;
    if (!cron) return;
    const { activity: act } = requireStarted();
    runtime.syncJob = scheduleJob({
      name: `sync:${runtime.config.name}`,
      cron,
      logger: log,
      job: () =>
        runSync(
          {
            provider: runtime.provider,
            integration: runtime.config,
            activity: act,
            logger: log,
            signal: runtime.abort.signal,
          },
          'both',
        ),
    });
  }

  async function stopIntegration(runtime: IntegrationRuntime): Promise<void> {
    runtime.abort.abort();
    runtime.syncJob?.stop();
    integrations.delete(runtime.config.id);
    // Forwarder first: it stops taking rows; unacknowledged rows stay queued for the next start.
    await runtime.forwarder.stop();
    await runtime.supervisor.stop();
    logger.info(
      { integrationId: runtime.config.id, integration: runtime.config.name },
      'integration_stopped',
    );
  }

  function scheduleRetention(): void {
    if (!store || !activity) return;
    retentionJob?.stop();
    const retention = createRetention({
      db: store.db,
      retention: config.retention,
      logger: logger.child({ component: 'retention' }),
      activity,
    });
    retentionJob = scheduleJob({
      name: 'retention',
      cron: config.retention.schedule,
      logger,
      job: async () => retention.run(),
    });
  }

  function isReady(writable = storeWritable()): { ready: boolean; reasons: string[] } {
    const reasons: string[] = [];
    if (!broker?.listening) reasons.push('broker is not listening');
    if (!store) reasons.push('store is not open');
    else if (!writable) reasons.push('store is not writable');
    if (stopping) reasons.push('gateway is stopping');
    return { ready: reasons.length === 0, reasons };
  }

  function storeWritable(): boolean {
    if (!store) return false;
    try {
      accessSync(store.file, constants.W_OK);
      // Takes the write lock without writing: fails on a read-only or locked-out database.
      store.db.prepare('BEGIN IMMEDIATE').run();
      store.db.prepare('ROLLBACK').run();
      const fs = statfsSync(config.gateway.dataDir);
      return fs.bavail * fs.bsize >= MIN_FREE_BYTES;
    } catch {
      return false;
    }
  }

  function integrationStatus(integration: IntegrationConfig): IntegrationStatus {
    const runtime = integrations.get(integration.id);
    const stats = outbox?.stats(integration.id);
    const t = now();
    let state: IntegrationStatus['state'] = 'disabled';
    if (runtime) {
      state = runtime.supervisor.state;
      if (state === 'connected' && stats && stats.depth > 0) {
        const since = Math.max(runtime.forwarder.lastAckAt ?? 0, runtime.supervisor.connectedSince ?? 0);
        if (t - since > integration.health.degradedAfter) state = 'degraded';
      }
    }
    return {
      name: integration.name,
      id: integration.id,
      type: integration.type,
      enabled: integration.enabled,
      state,
      connectedSince: runtime?.supervisor.connectedSince ?? null,
      lastAckAt: runtime?.forwarder.lastAckAt ?? null,
      lastError: runtime?.supervisor.lastError ?? null,
      reconnects: runtime?.supervisor.reconnects ?? 0,
      delivered: runtime?.forwarder.delivered ?? 0,
      inflight: runtime?.forwarder.inflight ?? 0,
      queue: {
        depth: stats?.depth ?? 0,
        bytes: stats?.bytes ?? 0,
        oldestAgeMs: stats?.oldestEnqueuedAt == null ? null : t - stats.oldestEnqueuedAt,
        dropped: stats?.dropped ?? 0,
        expired: stats?.expired ?? 0,
        rejected: stats?.rejected ?? 0,
        deadLettered: stats?.deadLettered ?? 0,
        deadLetters: stats?.deadLetters ?? 0,
      },
    };
  }

  const disabledReplication: ReplicationStatus = {
    configured: false,
    state: 'disabled',
    pendingRows: 0,
    oldestPendingAgeMs: null,
    replicatedRows: 0,
    rejectedRows: 0,
    lastSuccessAt: null,
    lastError: null,
  };

  function status(): GatewayStatusSnapshot {
    const t = now();
    const writable = storeWritable();
    return {
      gatewayId: config.gateway.id,
      version: VERSION,
      pid: process.pid,
      startedAt,
      now: t,
      ready: isReady(writable).ready,
      broker: {
        listening: broker?.listening ?? false,
        listeners: boundListeners,
        connections: broker?.stats.connections ?? 0,
        devices: broker?.connectedDevices() ?? [],
        messagesIn: broker?.stats.messagesIn ?? 0,
        authFailures: broker?.stats.authFailures ?? 0,
        refused: {
          maxConnections: broker?.stats.rejectedConnections ?? 0,
          connectRate: broker?.stats.rateLimitedConnections ?? 0,
          packetTooLarge: broker?.stats.rejectedPackets ?? 0,
          loginBackoff: broker?.stats.loginBackoffRefusals ?? 0,
        },
      },
      store: {
        file: store?.file ?? '',
        writable,
        writeFailures: activity?.writeFailures ?? 0,
        walBytes: walWatch?.state.bytes ?? 0,
        walStarved: walWatch?.state.starved ?? false,
      },
      integrations: config.integrations.map(integrationStatus),
      replication: replicator?.status() ?? disabledReplication,
      config: { file: configFile, loadedAt: configLoadedAt, lastError: lastConfigError, pendingRestart },
    };
  }

  async function start(signal?: AbortSignal): Promise<void> {
    const checkAbort = () => {
      if (signal?.aborted) throw new Error('start aborted');
    };
    try {
      store = openStore({
        dataDir: config.gateway.dataDir,
        logger,
        onCorrupt: config.gateway.onCorruptStore,
        lock: true,
      });
      activity = createActivityLog({
        db: store.db,
        gatewayId: config.gateway.id,
        organizationId: config.gateway.organizationId,
        logger,
      });
      if (store.quarantinedTo) {
        activity.record({
          activityType: 'store_quarantined',
          direction: 'internal',
          status: 'error',
          errorCode: 'GW_ERR_STORE_CORRUPT',
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
      ingest = createIngest({
        outbox,
        logger: logger.child({ component: 'ingest' }),
        integrations: config.integrations,
      });
      const ingestRef = ingest;
      broker = createBroker({
        config: config.broker,
        gatewayId: config.gateway.id,
        retainedStatus: config.features.retainedStatus,
        logger: logger.child({ component: 'broker' }),
        activity,
        ingest: (message) => ingestRef.accept(message),
      });
      stopWake = outbox.onEnqueue((ids) => {
        for (const id of ids) integrations.get(id)?.forwarder.wake();
      });
      stopAlerts = watchFailures({ activity, logger, integrations: () => config.integrations });
      boundListeners = await broker.listen();
      checkAbort();
      for (const integration of config.integrations) if (integration.enabled) startIntegration(integration);
      if (config.http.enabled) {
        http = createHttpServer({
          host: config.http.host,
          port: config.http.port,
          logger: logger.child({ component: 'http' }),
          getStatus: status,
          isReady,
          activity,
          dashboard: config.features.dashboard,
          metrics: lazyMetrics(status),
        });
        httpAddress = await http.listen();
      }
      checkAbort();
      if (config.central && config.gateway.organizationId) {
        // pg is loaded only when replication is configured (~15 MB of RSS otherwise).
        const { createReplicator } = await import('../store/replicator.js');
        replicator = createReplicator({
          db: store.db,
          central: config.central,
          organizationId: config.gateway.organizationId,
          gatewayId: config.gateway.id,
          logger: logger.child({ component: 'replicator' }),
          activity,
        });
        replicator.start();
      }
      scheduleRetention();
      const outboxRef = outbox;
      const activityRef = activity;
      const clock = createClockWatch({
        logger,
        onForwardJump: (deltaMs) => {
          try {
            const rows = outboxRef.shiftExpiry(deltaMs);
            activityRef.record({
              activityType: 'clock_jumped',
              direction: 'internal',
              status: 'success',
              metadata: { deltaMs, queuedRowsShifted: rows },
            });
          } catch (err) {
            logger.error({ err, deltaMs }, 'queue_expiry_shift_failed');
          }
        },
      });
      clockTimer = setInterval(() => clock.check(), CLOCK_CHECK_INTERVAL_MS);
      clockTimer.unref();
      expiryTimer = setInterval(() => {
        try {
          clock.check();
          // A clock still in 1970 would make the ttl of what it queues meaningless; the jump to
          // the real time moves those rows' expiry (shiftExpiry) before anything expires.
          if (clock.sane) outboxRef.expire();
        } catch (err) {
          logger.error({ err }, 'queue_expiry_failed');
        }
      }, QUEUE_EXPIRY_INTERVAL_MS);
      expiryTimer.unref();
      const watch = createWalWatch({
        db: store.db,
        file: store.file,
        logger: logger.child({ component: 'store' }),
        activity,
      });
      walWatch = watch;
      watch.check();
      walTimer = setInterval(() => watch.check(), WAL_CHECK_INTERVAL_MS);
      walTimer.unref();
      stopWatching = watchConfigFile({
        file: configFile,
        logger,
        onChange: () => {
          void reload();
        },
      });
      activity.record({
        activityType: 'gateway_started',
        direction: 'internal',
        status: 'success',
        metadata: { version: VERSION, pid: process.pid, listeners: boundListeners },
      });
      logger.info(
        { listeners: boundListeners, http: httpAddress, version: VERSION, dataDir: config.gateway.dataDir },
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
    await step('schedules', () => {
      retentionJob?.stop();
      clearInterval(expiryTimer);
      clearInterval(walTimer);
      clearInterval(clockTimer);
    });
    await step('replicator', () => replicator?.stop());
    await step('http', () => http?.close());
    // The broker stops taking messages before the queues are flushed, so nothing arrives after.
    await step('broker', () => broker?.close());
    await step('integrations', () => Promise.all([...integrations.values()].map(stopIntegration)));
    await step('wake', () => stopWake?.());
    await step('alerts', () => stopAlerts?.());
    await step('outbox', () => outbox?.close());
    await step('activity', () =>
      activity?.record({
        activityType: 'gateway_stopped',
        direction: 'internal',
        status: 'success',
        metadata: { reason },
      }),
    );
    await step('store', () => store?.close());
    notifier.close();
    logger.info({ reason, failedSteps: failed }, 'gateway_stopped');
    return failed === 0 ? 0 : 1;
  }

  function refreshTlsFiles(): void {
    if (!broker || !config.broker.listeners.some((l) => l.type === 'tls')) return;
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

  async function applyConfig(next: Readonly<Config>): Promise<{ changed: string[]; restart: string[] }> {
    const prev = config;
    const changed = diffPaths(prev, next);
    const restart = changed.filter((p) =>
      RESTART_REQUIRED_KEYS.some((k) => p === k || p.startsWith(`${k}.`) || p.startsWith(`${k}[`)),
    );
    // Keys that need a restart keep their running values; the rest applies now.
    config = withRunningValues(next, prev, RESTART_REQUIRED_KEYS);
    if (next.gateway.log.level !== prev.gateway.log.level) options.setLogLevel?.(next.gateway.log.level);
    if (changed.some((p) => p.startsWith('broker.'))) broker?.updateConfig(config.broker);
    ingest?.setIntegrations(config.integrations);
    const nextById = new Map(config.integrations.map((i) => [i.id, i]));
    for (const runtime of [...integrations.values()]) {
      const wanted = nextById.get(runtime.config.id);
      if (!wanted || !wanted.enabled) {
        await stopIntegration(runtime);
      } else if (integrationNeedsRestart(runtime.config, wanted)) {
        await stopIntegration(runtime);
        startIntegration(wanted);
      } else if (JSON.stringify(runtime.config) !== JSON.stringify(wanted)) {
        runtime.forwarder.setLimits({
          rate: wanted.queue.rate,
          inflight: wanted.queue.inflight,
          maxAttempts: wanted.queue.maxAttempts,
        });
        const scheduleChanged = JSON.stringify(runtime.config.schedule) !== JSON.stringify(wanted.schedule);
        runtime.config = wanted;
        if (scheduleChanged)
          scheduleSync(runtime, logger.child({ integrationId: wanted.id, integration: wanted.name }));
      }
    }
    for (const integration of config.integrations) {
      if (integration.enabled && !integrations.has(integration.id)) startIntegration(integration);
    }
    if (changed.some((p) => p.startsWith('retention.'))) scheduleRetention();
    return { changed, restart };
  }

  async function doReload(): Promise<ReloadResult> {
    // Certificate and CRL files are read again on every reload (SIGHUP), also when the config
    // itself did not change: replacing them and running `systemctl reload` is how they rotate.
    refreshTlsFiles();
    const text = safeRead(configFile);
    if (text === configText) return { ok: true, changed: [], pendingRestart };
    notifier.reloading();
    try {
      const loaded = loadConfigFile(configFile);
      const { changed, restart } = await applyConfig(loaded.config);
      configText = loaded.text;
      configLoadedAt = now();
      lastConfigError = null;
      pendingRestart = [...new Set([...pendingRestart, ...restart])];
      if (restart.length > 0) logger.warn({ keys: restart }, 'config_restart_required');
      logger.info({ changed }, 'config_reloaded');
      activity?.record({
        activityType: 'config_reload',
        direction: 'internal',
        status: 'success',
        metadata: { changed: changed.slice(0, 50), restartRequired: restart },
      });
      return { ok: true, changed, pendingRestart };
    } catch (err) {
      // The running configuration stays in force; never fall back to defaults or open access.
      configText = text;
      const issues = err instanceof ConfigError ? err.issues : [];
      const message = err instanceof ConfigError ? err.issues.map(formatIssue).join('; ') : errorMessage(err);
      lastConfigError = { message, issues, at: now() };
      logger.error({ file: configFile, issues, error: message }, 'config_reload_failed');
      activity?.record({
        activityType: 'config_reload',
        direction: 'internal',
        status: 'failed',
        errorCode: isGatewayError(err) ? err.code : 'GW_ERR_CONFIG_INVALID',
        errorMessage: message,
        metadata: { issues: issues.slice(0, 20) },
      });
      return { ok: false, changed: [], pendingRestart, error: message };
    } finally {
      notifier.reloaded();
    }
  }

  function reload(): Promise<ReloadResult> {
    if (stopping) return Promise.resolve({ ok: false, changed: [], pendingRestart, error: 'stopping' });
    // Serialise reloads: a burst of file events and a SIGHUP apply one after the other.
    const run = (reloading ?? Promise.resolve()).then(doReload, doReload);
    reloading = run;
    return run;
  }

  function runtimeOf(name: string): IntegrationRuntime {
    const integration = config.integrations.find((i) => i.name === name);
    const runtime = integration && integrations.get(integration.id);
    if (!runtime) throw new Error(`no running integration named "${name}"`);
    return runtime;
  }

  return {
    start,
    stop,
    reload,
    status,
    testConnection(name) {
      const runtime = runtimeOf(name);
      return runConnectionTest({
        provider: runtime.provider,
        integration: runtime.config,
        activity: requireStarted().activity,
        logger,
        signal: runtime.abort.signal,
      });
    },
    sync(name, direction) {
      const runtime = runtimeOf(name);
      return runSync(
        {
          provider: runtime.provider,
          integration: runtime.config,
          activity: requireStarted().activity,
          logger,
          signal: runtime.abort.signal,
        },
        direction,
      );
    },
  };
}

/** Which parts of an integration restart it: its identity, type and provider settings. */
function integrationNeedsRestart(a: IntegrationConfig, b: IntegrationConfig): boolean {
  return a.type !== b.type || a.name !== b.name || JSON.stringify(a.settings) !== JSON.stringify(b.settings);
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

/** `next` with the values of `keys` (dotted paths) taken from `running`: they wait for a restart. */
function withRunningValues(
  next: Readonly<Config>,
  running: Readonly<Config>,
  keys: readonly string[],
): Readonly<Config> {
  const merged = structuredClone(next) as unknown as Record<string, unknown>;
  for (const key of keys) {
    const path = key.split('.');
    let from: unknown = running;
    let to: Record<string, unknown> = merged;
    for (let i = 0; i < path.length - 1; i++) {
      from = (from as Record<string, unknown>)[path[i]!];
      to = to[path[i]!] as Record<string, unknown>;
    }
    to[path[path.length - 1]!] = structuredClone((from as Record<string, unknown>)[path[path.length - 1]!]);
  }
  return Object.freeze(merged as unknown as Config);
}

/** Dotted paths of leaves that differ between two configs (arrays compared per item). */
export function diffPaths(a: unknown, b: unknown, path = ''): string[] {
  if (JSON.stringify(a) === JSON.stringify(b)) return [];
  const isObj = (v: unknown) => v !== null && typeof v === 'object' && !Array.isArray(v);
  if (Array.isArray(a) && Array.isArray(b)) {
    if (a.length !== b.length) return [path];
    return a.flatMap((v, i) => diffPaths(v, b[i], `${path}[${i}]`));
  }
  if (isObj(a) && isObj(b)) {
    const keys = new Set([...Object.keys(a as object), ...Object.keys(b as object)]);
    return [...keys].flatMap((k) =>
      diffPaths(
        (a as Record<string, unknown>)[k],
        (b as Record<string, unknown>)[k],
        path ? `${path}.${k}` : k,
      ),
    );
  }
  return [path];
}

function safeRead(file: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}
