import type { Backoff } from '../../common/backoff.js';
import { ErrorCodes, GatewayError, isGatewayError } from '../../errors.js';
import type { Logger } from '../../logger.js';
import { createDeviceLinkPool, type DeviceLinkPoolCounts } from '../device-link-pool.js';
import { deviceUnavailable, type ProviderEvent } from '../provider.js';
import {
  createCoapChannel,
  type CoapChannel,
  type CoapChannelOptions,
  type CoapRequest,
  type CoapResponse,
} from './coap-channel.js';
import { openDtlsSession, type DtlsSession, type DtlsSessionOptions } from './dtls-session.js';

/**
 * One DTLS-PSK session per child device, each as that device's own identity: Golioth
 * attributes stream data to the identity that posts it, so the gateway speaks for each device
 * with the device's PSK rather than posting everything as itself. The sessions live in the
 * shared device link pool (src/providers/device-link-pool.ts): opened on a device's first
 * message, bounded (`maxSessions`, least recently used idle one closed first), closed when idle,
 * and a device whose session fails backs off on its own (`deviceUnavailable`) while the others
 * go on.
 */

export interface DeviceCredential {
  identity: string;
  psk: string;
}

export interface DeviceSessions {
  request(deviceId: string, request: CoapRequest): Promise<CoapResponse>;
  counts(): DeviceLinkPoolCounts;
  closeAll(): Promise<void>;
}

export interface DeviceSessionsOptions {
  host: string;
  port: number;
  /** The device's identity and PSK; only asked for devices that have one. */
  credentialOf(deviceId: string): DeviceCredential;
  handshakeTimeoutMs: number;
  maxSessions: number;
  idleTimeoutMs: number;
  coap?: CoapChannelOptions;
  backoff?: Backoff;
  logger: Logger;
  report?: (event: ProviderEvent) => void;
  /** A session was ended by Golioth, not by us. */
  onPeerClose?(deviceId: string, error: Error): void;
  /** The DTLS session opener; a test of the sessions may pass another transport. */
  open?: (options: DtlsSessionOptions) => Promise<DtlsSession>;
}

interface Link {
  session: DtlsSession;
  channel: CoapChannel;
}

export function createDeviceSessions(options: DeviceSessionsOptions): DeviceSessions {
  const openSession = options.open ?? openDtlsSession;
  const log = options.logger;

  const pool = createDeviceLinkPool<Link>({
    maxLinks: options.maxSessions,
    idleTimeoutMs: options.idleTimeoutMs,
    ...(options.backoff ? { backoff: options.backoff } : {}),
    logger: log,
    async open(deviceId, signal) {
      const credential = options.credentialOf(deviceId);
      const started = performance.now();
      try {
        const session = await openSession({
          host: options.host,
          port: options.port,
          identity: credential.identity,
          psk: credential.psk,
          handshakeTimeoutMs: options.handshakeTimeoutMs,
          signal,
        });
        const link: Link = { session, channel: createCoapChannel(session, options.coap) };
        // Golioth ended the session (close_notify, fatal alert): what was waiting on it fails as
        // not connected; the next message opens a new session at once, without backoff.
        session.onClose((err) => {
          link.channel.close(
            new GatewayError(
              ErrorCodes.PROVIDER_NOT_CONNECTED,
              `Golioth closed the DTLS session of ${deviceId} (${err.message})`,
              { retryable: true, cause: err },
            ),
          );
          if (pool.peek(deviceId) === link) void pool.close(deviceId);
          options.onPeerClose?.(deviceId, err);
        });
        options.report?.({
          activityType: 'device_session_opened',
          direction: 'outgoing',
          status: 'success',
          responseTimeMs: Math.round(performance.now() - started),
          metadata: { deviceId, identity: credential.identity },
        });
        return link;
      } catch (err) {
        options.report?.({
          activityType: 'device_session_opened',
          direction: 'outgoing',
          status: 'failed',
          responseTimeMs: Math.round(performance.now() - started),
          errorCode: isGatewayError(err) ? err.code : ErrorCodes.PROVIDER_CONNECT,
          errorMessage: err instanceof Error ? err.message : String(err),
          metadata: { deviceId, identity: credential.identity },
        });
        log.warn({ deviceId, identity: credential.identity, err }, 'device_session_failed');
        throw err;
      }
    },
    async close(link) {
      link.channel.close(
        new GatewayError(ErrorCodes.PROVIDER_CLOSED, 'the device session closed', { retryable: true }),
      );
      await link.session.close();
    },
  });

  return {
    async request(deviceId, request) {
      const link = await pool.acquire(deviceId);
      try {
        return await pool.use(deviceId, (l) => l.channel.request(request));
      } catch (err) {
        // No ACK after every retransmission: the server may have dropped the session (restart,
        // NAT rebinding); a fresh one is opened next time rather than talking into the void.
        if (isGatewayError(err) && err.code === ErrorCodes.PROVIDER_TIMEOUT) {
          pool.lost(deviceId, link, err);
          throw deviceUnavailable(
            deviceId,
            `Golioth did not answer ${deviceId}'s request: ${err.message}`,
            1000,
            err,
          );
        }
        throw err;
      }
    },
    counts() {
      return pool.counts;
    },
    closeAll() {
      return pool.closeAll();
    },
  };
}
