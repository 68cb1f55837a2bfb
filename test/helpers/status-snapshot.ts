import type { GatewayStatusSnapshot, IntegrationStatus } from '../../src/gateway/http/status.js';

/** A plausible daemon snapshot; tests override what they assert on. */
export function buildSnapshot(overrides: Partial<GatewayStatusSnapshot> = {}): GatewayStatusSnapshot {
  const now = overrides.now ?? 1_750_000_000_000;
  return {
    gatewayId: 'site-a-gw1',
    version: '0.1.0',
    pid: 4242,
    startedAt: now - (3 * 3_600_000 + 12 * 60_000),
    now,
    ready: true,
    broker: {
      listening: true,
      listeners: [{ type: 'tcp', host: '0.0.0.0', port: 1883 }],
      connections: 2,
      devices: [
        { id: 'sensor-1', connectedAt: now - 125_000, remoteAddress: '10.0.0.5:50312' },
        { id: 'sensor-2', connectedAt: now - 7_200_000, remoteAddress: '10.0.0.6:41022' },
      ],
      messagesIn: 12_345,
      authFailures: 3,
      refused: { maxConnections: 0, connectRate: 7, packetTooLarge: 1, loginBackoff: 2 },
    },
    store: {
      file: '/var/lib/iot-gateway/gateway.db',
      writable: true,
      writeFailures: 0,
      walBytes: 4_194_304,
      walStarved: false,
    },
    integrations: [
      buildIntegration({ name: 'x', id: '0190a1b2-0000-7000-8000-000000000001', type: 'mqtt' }),
      buildIntegration({
        name: 'aws-main',
        id: '0190a1b2-0000-7000-8000-000000000002',
        type: 'aws-iot',
        state: 'backoff',
        connectedSince: null,
        lastError: {
          code: 'GW_ERR_PROVIDER_CONNECT',
          message: 'connect ECONNREFUSED 10.1.1.1:8883',
          at: now - 30_000,
        },
      }),
    ],
    replication: {
      configured: true,
      state: 'idle',
      pendingRows: 12,
      oldestPendingAgeMs: 4_000,
      replicatedRows: 1_000,
      rejectedRows: 0,
      lastSuccessAt: now - 5_000,
      lastError: null,
    },
    config: {
      file: '/etc/iot-gateway/gateway.yaml',
      loadedAt: now - 600_000,
      lastError: null,
      pendingRestart: [],
    },
    ...overrides,
  };
}

export function buildIntegration(
  overrides: Partial<IntegrationStatus> & Pick<IntegrationStatus, 'name' | 'id'>,
): IntegrationStatus {
  return {
    type: 'mqtt',
    enabled: true,
    state: 'connected',
    connectedSince: 1_749_999_000_000,
    lastAckAt: 1_749_999_999_000,
    lastError: null,
    reconnects: 1,
    delivered: 100,
    inflight: 2,
    throttled: 5,
    parkedDevices: ['child-3'],
    queue: {
      depth: 42,
      bytes: 4096,
      oldestAgeMs: 1_500,
      dropped: 1,
      expired: 2,
      rejected: 3,
      deadLettered: 4,
      deadLetters: 4,
    },
    ...overrides,
  };
}
