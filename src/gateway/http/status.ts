import type { ReplicationStatus } from '../../store/replicator.js';

export type { ReplicationStatus };

/** The daemon's state as one snapshot: /api/status, /metrics, the dashboard and `iot-gateway status` read it. */

export type IntegrationState =
  | 'disabled'
  | 'connecting'
  | 'connected'
  /** connected, but no upstream ack for longer than health.degradedAfter while rows wait */
  | 'degraded'
  | 'backoff'
  | 'stopped';

export interface IntegrationStatus {
  name: string;
  id: string;
  type: string;
  enabled: boolean;
  state: IntegrationState;
  connectedSince: number | null;
  lastAckAt: number | null;
  lastError: { code: string; message: string; at: number } | null;
  reconnects: number;
  delivered: number;
  inflight: number;
  /** Publishes the cloud refused as throttled since start (waited for, never failures). */
  throttled: number;
  /** Devices whose rows wait because their cloud link failed or is throttled. */
  parkedDevices: string[];
  queue: {
    depth: number;
    bytes: number;
    oldestAgeMs: number | null;
    dropped: number;
    expired: number;
    rejected: number;
    deadLettered: number;
    deadLetters: number;
  };
}

export interface GatewayStatusSnapshot {
  gatewayId: string;
  version: string;
  pid: number;
  startedAt: number;
  now: number;
  ready: boolean;
  broker: {
    listening: boolean;
    listeners: { type: string; host: string; port: number }[];
    connections: number;
    devices: { id: string; connectedAt: number; remoteAddress: string | null }[];
    messagesIn: number;
    authFailures: number;
    /** Refused at the door: broker.maxConnections, broker.connectRate, broker.maxPacketSize, broker.loginBackoff. */
    refused: { maxConnections: number; connectRate: number; packetTooLarge: number; loginBackoff: number };
  };
  store: {
    file: string;
    writable: boolean;
    writeFailures: number;
    /** Size of the WAL at the last periodic check. */
    walBytes: number;
    /** The WAL is over its alarm size and a reader keeps checkpoints from catching up (R19). */
    walStarved: boolean;
  };
  integrations: IntegrationStatus[];
  replication: ReplicationStatus;
  config: {
    file: string;
    loadedAt: number;
    lastError: {
      message: string;
      issues: { path: string; message: string; line?: number }[];
      at: number;
    } | null;
    pendingRestart: string[];
  };
}
