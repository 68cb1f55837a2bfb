import { createBackoff, type Backoff } from '../../common/backoff.js';
import { ErrorCodes, GatewayError, isGatewayError } from '../../errors.js';
import type { Logger } from '../../logger.js';
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
 * with the device's PSK rather than posting everything as itself. Sessions open on a device's
 * first message, are bounded (`maxSessions`; the least recently used idle one closes to make
 * room), close after `idleTimeoutMs` unused, and a device whose session cannot be opened backs
 * off on its own (`deviceUnavailable`) while the others go on.
 *
 * The provider platform's generic device-link-pool (issue 10) had not landed when this was
 * written; it covers the same ground and is the piece to swap in.
 */

export interface DeviceCredential {
  identity: string;
  psk: string;
}

export interface DeviceSessions {
  request(deviceId: string, credential: DeviceCredential, request: CoapRequest): Promise<CoapResponse>;
  /** Counts for status: open sessions, handshakes under way, devices backing off. */
  counts(): { open: number; opening: number; backingOff: number };
  closeAll(): Promise<void>;
}

export interface DeviceSessionsOptions {
  host: string;
  port: number;
  handshakeTimeoutMs: number;
  maxSessions: number;
  idleTimeoutMs: number;
  coap?: CoapChannelOptions;
  backoff?: Backoff;
  logger: Logger;
  report?: (event: ProviderEvent) => void;
  /** The DTLS session opener; tests of the pool may pass another transport. */
  open?: (options: DtlsSessionOptions) => Promise<DtlsSession>;
}

interface Entry {
  deviceId: string;
  ready: Promise<{ session: DtlsSession; channel: CoapChannel }>;
  opened: { session: DtlsSession; channel: CoapChannel } | undefined;
  inflight: number;
  lastUsed: number;
  idleTimer: NodeJS.Timeout | undefined;
}

export function createDeviceSessions(options: DeviceSessionsOptions): DeviceSessions {
  const open = options.open ?? openDtlsSession;
  const backoff = options.backoff ?? createBackoff({ baseMs: 1000, maxMs: 60_000 });
  const entries = new Map<string, Entry>();
  const failures = new Map<string, { count: number; until: number }>();
  let closed = false;
  const log = options.logger;

  const drop = (entry: Entry, reason: string) => {
    if (entries.get(entry.deviceId) !== entry) return;
    entries.delete(entry.deviceId);
    if (entry.idleTimer !== undefined) clearTimeout(entry.idleTimer);
    const opened = entry.opened;
    if (opened !== undefined) {
      opened.channel.close(
        new GatewayError(
          ErrorCodes.PROVIDER_CLOSED,
          `the DTLS session of ${entry.deviceId} closed (${reason})`,
          {
            retryable: true,
          },
        ),
      );
      void opened.session.close();
    }
    log.debug({ deviceId: entry.deviceId, reason }, 'device_session_closed');
  };

  const armIdle = (entry: Entry) => {
    if (entry.idleTimer !== undefined) clearTimeout(entry.idleTimer);
    entry.idleTimer = setTimeout(() => {
      if (entry.inflight === 0) drop(entry, 'idle');
    }, options.idleTimeoutMs);
    entry.idleTimer.unref();
  };

  const makeRoom = (): boolean => {
    if (entries.size < options.maxSessions) return true;
    let lru: Entry | undefined;
    for (const e of entries.values()) {
      if (e.inflight === 0 && e.opened !== undefined && (lru === undefined || e.lastUsed < lru.lastUsed))
        lru = e;
    }
    if (lru === undefined) return false;
    drop(lru, 'evicted');
    return true;
  };

  const entryFor = (deviceId: string, credential: DeviceCredential): Entry => {
    const existing = entries.get(deviceId);
    if (existing !== undefined) return existing;
    if (!makeRoom()) {
      throw deviceUnavailable(
        deviceId,
        `all ${options.maxSessions} DTLS sessions are busy; raise settings.maxSessions if this persists`,
        1000,
      );
    }
    const entry: Entry = {
      deviceId,
      ready: undefined as unknown as Entry['ready'],
      opened: undefined,
      inflight: 0,
      lastUsed: Date.now(),
      idleTimer: undefined,
    };
    const started = performance.now();
    entry.ready = open({
      host: options.host,
      port: options.port,
      identity: credential.identity,
      psk: credential.psk,
      handshakeTimeoutMs: options.handshakeTimeoutMs,
    }).then(
      (session) => {
        const channel = createCoapChannel(session, options.coap);
        entry.opened = { session, channel };
        session.onClose((err) => drop(entry, err.message));
        failures.delete(deviceId);
        if (closed || entries.get(deviceId) !== entry) {
          void session.close();
          throw new GatewayError(ErrorCodes.PROVIDER_CLOSED, 'the provider closed', { retryable: true });
        }
        options.report?.({
          activityType: 'device_session_opened',
          direction: 'outgoing',
          status: 'success',
          responseTimeMs: Math.round(performance.now() - started),
          metadata: { deviceId, identity: credential.identity },
        });
        return entry.opened;
      },
      (err: unknown) => {
        entries.delete(deviceId);
        const f = failures.get(deviceId) ?? { count: 0, until: 0 };
        const waitMs = Math.max(1000, backoff.delay(f.count));
        failures.set(deviceId, { count: f.count + 1, until: Date.now() + waitMs });
        const message = isGatewayError(err) ? err.message : String(err);
        options.report?.({
          activityType: 'device_session_opened',
          direction: 'outgoing',
          status: 'failed',
          responseTimeMs: Math.round(performance.now() - started),
          errorCode: isGatewayError(err) ? err.code : ErrorCodes.PROVIDER_CONNECT,
          errorMessage: message,
          metadata: { deviceId, identity: credential.identity, retryAfterMs: waitMs },
        });
        log.warn(
          { deviceId, identity: credential.identity, retryAfterMs: waitMs, err },
          'device_session_failed',
        );
        throw deviceUnavailable(deviceId, message, waitMs, err);
      },
    );
    entries.set(deviceId, entry);
    return entry;
  };

  return {
    async request(deviceId, credential, request) {
      if (closed)
        throw new GatewayError(ErrorCodes.PROVIDER_CLOSED, 'the provider closed', { retryable: true });
      const f = failures.get(deviceId);
      if (f !== undefined && f.until > Date.now()) {
        throw deviceUnavailable(
          deviceId,
          `the DTLS session of ${deviceId} failed recently; retrying later`,
          f.until - Date.now(),
        );
      }
      const entry = entryFor(deviceId, credential);
      entry.inflight++;
      entry.lastUsed = Date.now();
      try {
        const { channel } = await entry.ready;
        return await channel.request(request);
      } catch (err) {
        // No ACK after every retransmission: the server may have dropped the session (restart,
        // NAT rebinding); open a fresh one next time rather than talk into the void.
        if (isGatewayError(err) && err.code === ErrorCodes.PROVIDER_TIMEOUT) {
          drop(entry, 'no answer');
          throw deviceUnavailable(
            deviceId,
            `Golioth did not answer ${deviceId}'s request: ${err.message}`,
            1000,
            err,
          );
        }
        throw err;
      } finally {
        entry.inflight--;
        entry.lastUsed = Date.now();
        if (entries.get(deviceId) === entry) armIdle(entry);
      }
    },
    counts() {
      let open = 0;
      let opening = 0;
      for (const e of entries.values()) {
        if (e.opened === undefined) opening++;
        else open++;
      }
      const now = Date.now();
      const backingOff = [...failures.values()].filter((f) => f.until > now).length;
      return { open, opening, backingOff };
    },
    async closeAll() {
      closed = true;
      const all = [...entries.values()];
      for (const e of all) drop(e, 'provider closed');
    },
  };
}
