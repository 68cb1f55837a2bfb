import { isIP } from 'node:net';
import type { IPublishPacket } from 'mqtt';
import { ErrorCodes, GatewayError } from '../../errors.js';
import type { Logger } from '../../logger.js';
import { openMqttLink, type MqttCredentials, type MqttLink } from '../mqtt-link.js';
import { createRequestTracker } from '../request-tracker.js';
import {
  c2dFilter,
  DESIRED_PATCHES,
  METHOD_REQUESTS,
  parseTwinResponse,
  reportedPatchTopic,
  TWIN_RESPONSES,
  twinGetTopic,
} from './topics.js';

/**
 * One child device's MQTT 3.1.1 connection to the hub (cloud-protocols.md §2.1), on the shared
 * MQTT link, with the twin's `$rid` requests matched by a request tracker.
 */
export interface DeviceLink {
  readonly deviceId: string;
  readonly isOpen: boolean;
  /** Publishes and twin requests waiting for the hub. */
  readonly inflight: number;
  /** QoS 1 publish; resolves on PUBACK. */
  publish(topic: string, payload: Buffer): Promise<void>;
  /** A twin GET (no body) or reported PATCH; resolves with the hub's answer, whatever its status. */
  twin(kind: 'GET' | 'PATCH', body?: Buffer): Promise<TwinAnswer>;
  /** Resolves when nothing is in flight (or after `timeoutMs`). */
  drained(timeoutMs: number): Promise<void>;
  /** DISCONNECT and close; what is in flight is rejected with `reason`. */
  end(reason?: GatewayError): Promise<void>;
  /** Called once when the link closes without `end` (kicked, throttled, token expired, network). */
  onLost(handler: (err: GatewayError) => void): void;
}

export interface TwinAnswer {
  status: number;
  version: number | undefined;
  body: Buffer;
}

export interface DeviceLinkOptions {
  deviceId: string;
  hostName: string;
  address: string | undefined;
  port: number;
  ca: Buffer | undefined;
  /** Called on every open: a fresh SAS token, or a certificate (X.509). */
  credentials(): DeviceCredentials;
  apiVersion: string;
  keepaliveMs: number;
  connectTimeoutMs: number;
  requestTimeoutMs: number;
  logger: Logger;
  owner: string;
  onMessage(topic: string, payload: Buffer, packet: IPublishPacket): void;
}

export interface DeviceCredentials {
  password: string | undefined;
  cert: Buffer | undefined;
  key: Buffer | undefined;
}

/** Twin requests a device has outstanding at once; the rest queue on its link. */
const TWIN_MAX_IN_FLIGHT = 10;

/**
 * Opens the link and subscribes to the four documented filters (C2D, twin responses, desired
 * patches, methods: four of the five a device may hold, §2.3). One attempt; the device link pool
 * owns retries and backoff.
 */
export async function openDeviceLink(options: DeviceLinkOptions, signal: AbortSignal): Promise<DeviceLink> {
  const { deviceId } = options;
  const creds = options.credentials();
  const endpoint = `${options.hostName}:${options.port}`;
  const link: MqttLink = await openMqttLink(
    {
      url: `mqtts://${options.address ?? options.hostName}:${options.port}`,
      clientId: deviceId,
      protocolVersion: 4,
      logger: options.logger,
      // §2.1: `{host}/{deviceId}/?api-version=…`; the password is a SAS token (none for X.509).
      credentials: (): MqttCredentials => ({
        username: `${options.hostName}/${deviceId}/?api-version=${options.apiVersion}`,
        ...(creds.password === undefined ? {} : { password: creds.password }),
      }),
      tls: {
        ...(options.ca ? { ca: options.ca } : {}),
        ...(creds.cert ? { cert: creds.cert, key: creds.key } : {}),
        ...(isIP(options.hostName) ? {} : { servername: options.hostName }),
      },
      keepaliveMs: options.keepaliveMs,
      connectTimeoutMs: options.connectTimeoutMs,
      publishTimeoutMs: options.requestTimeoutMs,
      // CleanSession 0: C2D messages queued while the link was closed arrive on the next one.
      cleanSession: false,
      owner: options.owner,
      purpose: deviceId,
    },
    signal,
  ).catch((err: unknown) => {
    if (err instanceof GatewayError && err.code === ErrorCodes.PROVIDER_AUTH) {
      // §2.1: the hub answers CONNACK 5 to a wrong host in the username, an unknown device, a
      // wrong key, an expired token or a policy without DeviceConnect alike.
      throw new GatewayError(
        ErrorCodes.PROVIDER_AUTH,
        `${endpoint} refused device ${deviceId} as not authorized (CONNACK ${String(err.details?.connackCode ?? 5)}); check settings.hostName, that the device exists in the hub, and its key, policy or token`,
        { retryable: false, cause: err, details: { deviceId, ...err.details } },
      );
    }
    throw err;
  });

  let rid = 0;
  const twins = createRequestTracker<TwinAnswer>({
    name: `twin request of device ${deviceId}`,
    maxInFlight: TWIN_MAX_IN_FLIGHT,
    timeoutMs: options.requestTimeoutMs,
    token: () => (++rid).toString(16),
  });
  let publishing = 0;
  const drainWaiters = new Set<() => void>();
  let open = true;
  let endedByUs = false;
  let lostHandler: ((err: GatewayError) => void) | undefined;

  const inflight = () => publishing + twins.stats.inFlight + twins.stats.queued;
  const settleDrain = () => {
    if (inflight() > 0) return;
    for (const w of [...drainWaiters]) w();
  };

  link.onMessage((topic, payload, packet) => {
    if (topic.startsWith('$iothub/twin/res/')) {
      const answer = parseTwinResponse(topic);
      if (answer) twins.settle(answer.rid, { status: answer.status, version: answer.version, body: payload });
      settleDrain();
      return;
    }
    options.onMessage(topic, payload, packet);
  });

  link.onLoss((cause) => {
    open = false;
    const err = new GatewayError(
      ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE,
      `the hub closed the link of device ${deviceId}: ${cause.message}`,
      { retryable: true, cause, details: { deviceId } },
    );
    twins.rejectAll(err);
    if (!endedByUs) lostHandler?.(err);
  });

  const { refused } = await link
    .subscribe({
      [c2dFilter(deviceId)]: { qos: 1 },
      [TWIN_RESPONSES]: { qos: 0 },
      [DESIRED_PATCHES]: { qos: 0 },
      [METHOD_REQUESTS]: { qos: 0 },
    })
    .catch(async (err: unknown) => {
      await link.close();
      throw err;
    });
  if (refused.length > 0) {
    await link.close();
    throw new GatewayError(
      ErrorCodes.PROVIDER_REJECTED,
      `the hub refused the subscriptions ${refused.join(', ')} of device ${deviceId}`,
      {
        retryable: true,
        details: { deviceId, refused },
      },
    );
  }

  /** A failure of a device's link is that device's alone: the others keep flowing. */
  const scoped = (err: unknown): unknown => {
    if (!(err instanceof GatewayError)) return err;
    if (err.code === ErrorCodes.PROVIDER_NOT_CONNECTED || err.code === ErrorCodes.PROVIDER_CLOSED) {
      return new GatewayError(ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE, err.message, {
        retryable: true,
        cause: err,
        details: { deviceId, linkLost: true },
      });
    }
    return err;
  };

  const deviceLink: DeviceLink = {
    deviceId,
    get isOpen() {
      return open && link.connected;
    },
    get inflight() {
      return inflight();
    },
    async publish(topic, payload) {
      publishing++;
      try {
        await link.publish(topic, payload, { qos: 1 });
      } catch (err) {
        throw scoped(err);
      } finally {
        publishing--;
        settleDrain();
      }
    },
    async twin(kind, body) {
      try {
        return await twins.request((token) =>
          link.publish(
            kind === 'GET' ? twinGetTopic(token) : reportedPatchTopic(token),
            body ?? Buffer.alloc(0),
            {
              qos: 0,
            },
          ),
        );
      } catch (err) {
        throw scoped(err);
      } finally {
        settleDrain();
      }
    },
    drained(timeoutMs) {
      if (inflight() === 0) return Promise.resolve();
      return new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          drainWaiters.delete(done);
          resolve();
        };
        const timer = setTimeout(done, timeoutMs);
        drainWaiters.add(done);
      });
    },
    async end(reason) {
      endedByUs = true;
      open = false;
      const why =
        reason ??
        new GatewayError(
          ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE,
          `the link of device ${deviceId} was closed`,
          {
            retryable: true,
            details: { deviceId },
          },
        );
      twins.rejectAll(why);
      await link.close(why);
    },
    onLost(handler) {
      lostHandler = handler;
    },
  };
  return deviceLink;
}

/**
 * Whether a failure to open a link means the hub as a whole is unreachable (network, TLS: no
 * CONNACK code) rather than this one device being refused, throttled or answered late.
 */
export function hubUnreachable(err: unknown): boolean {
  if (!(err instanceof GatewayError)) return false;
  if (err.code !== ErrorCodes.PROVIDER_CONNECT) return false;
  return typeof err.details?.connackCode !== 'number';
}
