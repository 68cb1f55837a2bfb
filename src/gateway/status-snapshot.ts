import { accessSync, constants, statfsSync } from 'node:fs';
import type { Config, IntegrationConfig } from '../config/schema.js';
import type { ActivityLog } from '../store/activity-log.js';
import type { Store } from '../store/database.js';
import type { Outbox } from '../store/outbox-types.js';
import type { ReplicationStatus, Replicator } from '../store/replicator.js';
import type { WalState } from '../store/wal-watch.js';
import type { Broker } from './broker/broker.js';
import type { Readiness } from './http/http-server.js';
import type { GatewayStatusSnapshot, IntegrationStatus } from './http/status.js';
import type { IntegrationRuntime } from './integration-runtime.js';
import { VERSION } from '../version.js';

/** Below this much free space in dataDir the store counts as not writable (/readyz fails). */
const MIN_FREE_BYTES = 16 * 1024 * 1024;

/** Where the snapshot reads from; getters, because the parts come and go with start, stop and reload. */
export interface StatusSources {
  startedAt: number;
  now: () => number;
  config(): Readonly<Config>;
  configState(): GatewayStatusSnapshot['config'];
  broker(): Broker | undefined;
  listeners(): GatewayStatusSnapshot['broker']['listeners'];
  store(): Store | undefined;
  activity(): ActivityLog | undefined;
  outbox(): Outbox | undefined;
  wal(): WalState | undefined;
  replicator(): Replicator | undefined;
  integration(id: string): IntegrationRuntime | undefined;
  stopping(): boolean;
}

/** The daemon's state as /api/status, /metrics, the dashboard and /readyz see it. */
export interface GatewayStatus {
  snapshot(): GatewayStatusSnapshot;
  readiness(): Readiness;
}

const DISABLED_REPLICATION: ReplicationStatus = {
  configured: false,
  state: 'disabled',
  pendingRows: 0,
  oldestPendingAgeMs: null,
  replicatedRows: 0,
  rejectedRows: 0,
  lastSuccessAt: null,
  lastError: null,
};

export function createGatewayStatus(sources: StatusSources): GatewayStatus {
  const { now } = sources;

  function readiness(writable = storeWritable()): Readiness {
    const reasons: string[] = [];
    if (!sources.broker()?.listening) reasons.push('broker is not listening');
    if (!sources.store()) reasons.push('store is not open');
    else if (!writable) reasons.push('store is not writable');
    if (sources.stopping()) reasons.push('gateway is stopping');
    return { ready: reasons.length === 0, reasons };
  }

  function storeWritable(): boolean {
    const store = sources.store();
    if (!store) return false;
    try {
      accessSync(store.file, constants.W_OK);
      // Takes the write lock without writing: fails on a read-only or locked-out database.
      store.db.prepare('BEGIN IMMEDIATE').run();
      store.db.prepare('ROLLBACK').run();
      const fs = statfsSync(sources.config().gateway.dataDir);
      return fs.bavail * fs.bsize >= MIN_FREE_BYTES;
    } catch {
      return false;
    }
  }

  function integrationStatus(integration: IntegrationConfig): IntegrationStatus {
    const runtime = sources.integration(integration.id);
    const stats = sources.outbox()?.stats(integration.id);
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
      throttled: runtime?.forwarder.throttled ?? 0,
      parkedDevices: runtime?.forwarder.parkedDevices().map((p) => p.deviceId) ?? [],
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

  function snapshot(): GatewayStatusSnapshot {
    const t = now();
    const writable = storeWritable();
    const broker = sources.broker();
    const store = sources.store();
    const wal = sources.wal();
    const config = sources.config();
    return {
      gatewayId: config.gateway.id,
      version: VERSION,
      pid: process.pid,
      startedAt: sources.startedAt,
      now: t,
      ready: readiness(writable).ready,
      broker: {
        listening: broker?.listening ?? false,
        listeners: sources.listeners(),
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
        writeFailures: sources.activity()?.writeFailures ?? 0,
        walBytes: wal?.bytes ?? 0,
        walStarved: wal?.starved ?? false,
      },
      integrations: config.integrations.map(integrationStatus),
      replication: sources.replicator()?.status() ?? DISABLED_REPLICATION,
      config: sources.configState(),
    };
  }

  return { snapshot, readiness: () => readiness() };
}
