import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import type { GatewayStatusSnapshot, IntegrationState, IntegrationStatus } from './status.js';

/** Prometheus exposition of the status snapshot (SPEC §9), on a registry of its own. */
export interface Metrics {
  readonly registry: Registry;
  /** The Content-Type header value for `render()`'s text. */
  readonly contentType: string;
  /** Takes one snapshot and renders every metric from it. */
  render(): Promise<string>;
}

export interface MetricsOptions {
  getStatus: () => GatewayStatusSnapshot;
  /** Node process metrics (CPU, memory, event loop lag, GC); on by default. */
  processMetrics?: boolean;
}

/** A Record so that a new state in status.ts fails to compile here until it is exported too. */
const STATES: Record<IntegrationState, true> = {
  disabled: true,
  connecting: true,
  connected: true,
  degraded: true,
  backoff: true,
  stopped: true,
};
const STATE_NAMES = Object.keys(STATES) as IntegrationState[];

const DROP_REASONS = {
  dropped: (q: IntegrationStatus['queue']) => q.dropped,
  expired: (q: IntegrationStatus['queue']) => q.expired,
  rejected: (q: IntegrationStatus['queue']) => q.rejected,
  dead_letter: (q: IntegrationStatus['queue']) => q.deadLettered,
} as const;

type IntegrationLabel = 'integration' | 'type';

interface Sample<L extends string> {
  labels: Record<L, string>;
  value: number;
}

/**
 * Gauges and counters are filled at scrape time from one snapshot (collect callbacks), so the
 * numbers in one scrape agree with each other and with `/api/status`.
 */
export function createMetrics(options: MetricsOptions): Metrics {
  const registry = new Registry();
  if (options.processMetrics ?? true) collectDefaultMetrics({ register: registry });

  // render() takes the snapshot once for all collect callbacks of a scrape; a direct
  // registry.metrics() still works, at the price of one snapshot per metric.
  let scrapeSnapshot: GatewayStatusSnapshot | undefined;
  const snap = (): GatewayStatusSnapshot => scrapeSnapshot ?? options.getStatus();

  const gauge = <L extends string>(
    name: string,
    help: string,
    labelNames: readonly L[],
    read: (s: GatewayStatusSnapshot) => Sample<L>[],
  ): void => {
    const metric: Gauge<L> = new Gauge<L>({
      name,
      help,
      labelNames,
      registers: [registry],
      collect() {
        // reset first: series of integrations that were removed must disappear, not freeze
        metric.reset();
        for (const { labels, value } of read(snap())) metric.set(labels, value);
      },
    });
  };

  const integrationGauge = (name: string, help: string, read: (i: IntegrationStatus) => number): void =>
    gauge(name, help, ['integration', 'type'], (s) =>
      s.integrations.map((i) => ({ labels: { integration: i.name, type: i.type }, value: read(i) })),
    );

  gauge('iot_gateway_ready', 'Whether the gateway is ready (broker listening, store writable)', [], (s) => [
    { labels: {}, value: s.ready ? 1 : 0 },
  ]);
  gauge('iot_gateway_connections', 'MQTT clients connected to the embedded broker', [], (s) => [
    { labels: {}, value: s.broker.connections },
  ]);
  gauge('iot_gateway_store_writable', 'Whether the local SQLite store accepts writes', [], (s) => [
    { labels: {}, value: s.store.writable ? 1 : 0 },
  ]);
  gauge('iot_gateway_store_wal_bytes', 'Size of the SQLite WAL at the last periodic check', [], (s) => [
    { labels: {}, value: s.store.walBytes },
  ]);
  gauge(
    'iot_gateway_store_wal_starved',
    'Whether a reader keeps checkpoints from shrinking an oversized WAL (1) or not (0)',
    [],
    (s) => [{ labels: {}, value: s.store.walStarved ? 1 : 0 }],
  );
  snapshotCounter(
    registry,
    snap,
    'iot_gateway_messages_in_total',
    'Messages accepted from local devices',
    [],
    (s) => [{ labels: {}, value: s.broker.messagesIn }],
  );
  snapshotCounter(registry, snap, 'iot_gateway_auth_failures_total', 'Refused device logins', [], (s) => [
    { labels: {}, value: s.broker.authFailures },
  ]);
  snapshotCounter(
    registry,
    snap,
    'iot_gateway_connections_refused_total',
    'Device connections and logins refused at the door, by the limit that refused them',
    ['reason'],
    (s) => [
      { labels: { reason: 'max_connections' }, value: s.broker.refused.maxConnections },
      { labels: { reason: 'connect_rate' }, value: s.broker.refused.connectRate },
      { labels: { reason: 'packet_too_large' }, value: s.broker.refused.packetTooLarge },
      { labels: { reason: 'login_backoff' }, value: s.broker.refused.loginBackoff },
    ],
  );
  snapshotCounter(
    registry,
    snap,
    'iot_gateway_store_write_failures_total',
    'Failed writes to the local store',
    [],
    (s) => [{ labels: {}, value: s.store.writeFailures }],
  );

  integrationGauge(
    'iot_gateway_integration_up',
    'Whether the integration is connected (1) or not (0)',
    (i) => (i.state === 'connected' ? 1 : 0),
  );
  gauge(
    'iot_gateway_integration_state',
    'Current state of each integration (1 for the current state, 0 for the others)',
    ['integration', 'type', 'state'],
    (s) =>
      s.integrations.flatMap((i) =>
        STATE_NAMES.map((state) => ({
          labels: { integration: i.name, type: i.type, state },
          value: i.state === state ? 1 : 0,
        })),
      ),
  );
  integrationGauge(
    'iot_gateway_queue_depth',
    'Messages waiting in the integration queue',
    (i) => i.queue.depth,
  );
  integrationGauge(
    'iot_gateway_queue_bytes',
    'Payload bytes waiting in the integration queue',
    (i) => i.queue.bytes,
  );
  integrationGauge(
    'iot_gateway_queue_oldest_age_seconds',
    'Age of the oldest queued message (0 when the queue is empty)',
    (i) => (i.queue.oldestAgeMs ?? 0) / 1000,
  );
  integrationGauge(
    'iot_gateway_dead_letters',
    'Messages currently held as dead letters',
    (i) => i.queue.deadLetters,
  );
  integrationGauge(
    'iot_gateway_inflight',
    'Messages sent upstream and not yet acknowledged',
    (i) => i.inflight,
  );
  integrationGauge(
    'iot_gateway_parked_devices',
    'Devices whose messages wait because their cloud link failed or is throttled',
    (i) => i.parkedDevices.length,
  );
  snapshotCounter(
    registry,
    snap,
    'iot_gateway_throttled_total',
    'Publishes the cloud refused as throttled (retried after its wait, never failures)',
    ['integration', 'type'],
    (s) => s.integrations.map((i) => ({ labels: integrationLabels(i), value: i.throttled })),
  );
  gauge(
    'iot_gateway_integration_last_ack_age_seconds',
    'Seconds since the last upstream acknowledgement (absent before the first)',
    ['integration', 'type'],
    (s) =>
      s.integrations.flatMap((i) =>
        i.lastAckAt === null
          ? []
          : [{ labels: integrationLabels(i), value: Math.max(0, s.now - i.lastAckAt) / 1000 }],
      ),
  );
  snapshotCounter(
    registry,
    snap,
    'iot_gateway_messages_out_total',
    'Messages delivered upstream and acknowledged',
    ['integration', 'type'],
    (s) => s.integrations.map((i) => ({ labels: integrationLabels(i), value: i.delivered })),
  );
  snapshotCounter(
    registry,
    snap,
    'iot_gateway_messages_dropped_total',
    'Messages that left a queue without delivery, by reason',
    ['integration', 'type', 'reason'],
    (s) =>
      s.integrations.flatMap((i) =>
        Object.entries(DROP_REASONS).map(([reason, read]) => ({
          labels: { ...integrationLabels(i), reason },
          value: read(i.queue),
        })),
      ),
  );
  snapshotCounter(
    registry,
    snap,
    'iot_gateway_integration_reconnects_total',
    'Reconnections of the integration to its upstream',
    ['integration', 'type'],
    (s) => s.integrations.map((i) => ({ labels: integrationLabels(i), value: i.reconnects })),
  );

  gauge('iot_gateway_replication_pending_rows', 'Log rows not yet replicated to PostgreSQL', [], (s) => [
    { labels: {}, value: s.replication.pendingRows },
  ]);
  gauge(
    'iot_gateway_replication_lag_seconds',
    'Age of the oldest log row not yet replicated (0 when none are pending)',
    [],
    (s) => [{ labels: {}, value: (s.replication.oldestPendingAgeMs ?? 0) / 1000 }],
  );
  snapshotCounter(
    registry,
    snap,
    'iot_gateway_replicated_rows_total',
    'Log rows replicated to PostgreSQL',
    [],
    (s) => [{ labels: {}, value: s.replication.replicatedRows }],
  );
  gauge(
    'iot_gateway_config_last_reload_success',
    'Whether the last configuration load or reload succeeded (1) or was refused (0)',
    [],
    (s) => [{ labels: {}, value: s.config.lastError === null ? 1 : 0 }],
  );
  gauge(
    'iot_gateway_config_pending_restart',
    'Configuration keys changed on disk that apply only after a restart',
    [],
    (s) => [{ labels: {}, value: s.config.pendingRestart.length }],
  );

  return {
    registry,
    get contentType() {
      return registry.contentType;
    },
    async render() {
      scrapeSnapshot = options.getStatus();
      try {
        // every collect callback runs synchronously inside this call, before its first await
        const text = registry.metrics();
        scrapeSnapshot = undefined;
        return await text;
      } finally {
        scrapeSnapshot = undefined;
      }
    },
  };
}

function integrationLabels(i: IntegrationStatus): Record<IntegrationLabel, string> {
  return { integration: i.name, type: i.type };
}

/**
 * A Prometheus counter fed from a running total in the snapshot. It adds the difference since
 * the last scrape, so it never goes down; when the source total falls (an integration was
 * restarted and counts from zero again) the new total is all new. Series whose source is gone
 * are removed rather than frozen.
 */
function snapshotCounter<L extends string>(
  registry: Registry,
  snap: () => GatewayStatusSnapshot,
  name: string,
  help: string,
  labelNames: readonly L[],
  read: (s: GatewayStatusSnapshot) => Sample<L>[],
): void {
  const last = new Map<string, { labels: Record<L, string>; raw: number }>();
  const metric: Counter<L> = new Counter<L>({
    name,
    help,
    labelNames,
    registers: [registry],
    collect() {
      const seen = new Set<string>();
      for (const { labels, value } of read(snap())) {
        const key = labelNames.map((l) => labels[l]).join('\u0000');
        seen.add(key);
        const prev = last.get(key)?.raw;
        const raw = Number.isFinite(value) && value > 0 ? value : 0;
        const delta = prev === undefined || raw < prev ? raw : raw - prev;
        metric.inc(labels, delta);
        last.set(key, { labels, raw });
      }
      for (const [key, entry] of last) {
        if (seen.has(key)) continue;
        last.delete(key);
        if (labelNames.length > 0) metric.remove(entry.labels);
      }
    },
  });
}
