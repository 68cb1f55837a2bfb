import { isIP } from 'node:net';
import { connect, type IClientOptions, type IPublishPacket, type MqttClient } from 'mqtt';
import { ErrorCodes, GatewayError, errorMessage } from '../../errors.js';
import {
  c2dFilter,
  DESIRED_PATCHES,
  METHOD_REQUESTS,
  parseTwinResponse,
  TWIN_RESPONSES,
  twinGetTopic,
  reportedPatchTopic,
} from './topics.js';

/** One child device's MQTT 3.1.1 connection to the hub (cloud-protocols.md §2.1). */
export interface DeviceLink {
  readonly deviceId: string;
  readonly isOpen: boolean;
  /** Publishes and twin requests waiting for the hub. */
  readonly inflight: number;
  /** QoS 1 publish; resolves on PUBACK. */
  publish(topic: string, payload: Buffer): Promise<void>;
  /** A twin GET (no body) or reported PATCH; resolves with the hub's answer, whatever its status. */
  twin(kind: 'GET' | 'PATCH', body?: Buffer): Promise<TwinAnswer>;
  /** Rejects what waits longer than its deadline; called by the provider's one sweep timer. */
  sweep(now: number): void;
  /** Resolves when nothing is in flight (or after `timeoutMs`). */
  drained(timeoutMs: number): Promise<void>;
  /** DISCONNECT and close; what is in flight is rejected with `reason`. */
  end(reason: GatewayError): Promise<void>;
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
  cert: Buffer | undefined;
  key: Buffer | undefined;
  password: string | undefined;
  apiVersion: string;
  keepaliveMs: number;
  connectTimeoutMs: number;
  requestTimeoutMs: number;
  signal: AbortSignal;
  onMessage(topic: string, payload: Buffer, packet: IPublishPacket): void;
}

interface Pending {
  deadline: number;
  fail(err: GatewayError): void;
}

const CLOSE_TIMEOUT_MS = 2000;
const noTrace = (): void => {};

/** CONNACK return codes of MQTT 3.1.1. */
const CONNACK_SERVER_UNAVAILABLE = 3;
const CONNACK_NOT_AUTHORIZED = 5;
const CONNACK_BAD_CREDENTIALS = 4;

/**
 * Opens the link and subscribes to the four documented filters (C2D, twin responses, desired
 * patches, methods: four of the five a device may hold, §2.3). One attempt; the provider owns
 * retries and backoff.
 */
export function openDeviceLink(options: DeviceLinkOptions): Promise<DeviceLink> {
  const { deviceId } = options;
  const endpoint = `${options.hostName}:${options.port}`;
  if (options.signal.aborted) return Promise.reject(abortedError());
  const clientOptions: IClientOptions = {
    protocolVersion: 4,
    clientId: deviceId,
    // §2.1: `{host}/{deviceId}/?api-version=…`
    username: `${options.hostName}/${deviceId}/?api-version=${options.apiVersion}`,
    ...(options.password === undefined ? {} : { password: options.password }),
    keepalive: Math.max(1, Math.round(options.keepaliveMs / 1000)),
    connectTimeout: options.connectTimeoutMs,
    reconnectPeriod: 0,
    // CleanSession 0: C2D messages queued while the link was closed arrive on the next one.
    clean: false,
    resubscribe: false,
    queueQoSZero: false,
    host: options.address ?? options.hostName,
    port: options.port,
    protocol: 'mqtts',
    ...(isIP(options.hostName) ? {} : { servername: options.hostName }),
    rejectUnauthorized: true,
    ...(options.ca ? { ca: options.ca } : {}),
    ...(options.cert ? { cert: options.cert, key: options.key } : {}),
    ...(process.env.DEBUG ? {} : { log: noTrace }),
  };

  return new Promise<DeviceLink>((resolve, reject) => {
    let settled = false;
    let lastError: Error | undefined;
    const client: MqttClient = connect(clientOptions);
    client.on('error', (err) => {
      lastError = err;
    });
    const safety = setTimeout(
      () =>
        fail(
          new GatewayError(
            ErrorCodes.PROVIDER_TIMEOUT,
            `no CONNACK from ${endpoint} within ${options.connectTimeoutMs} ms`,
            { retryable: true, details: { deviceId, scope: 'device' } },
          ),
        ),
      options.connectTimeoutMs + 1000,
    );
    const onAbort = () => fail(abortedError());
    options.signal.addEventListener('abort', onAbort, { once: true });
    const onCloseEarly = () => fail(classifyConnectError(lastError, endpoint, deviceId));
    client.on('close', onCloseEarly);

    function finish() {
      settled = true;
      clearTimeout(safety);
      options.signal.removeEventListener('abort', onAbort);
      client.removeListener('close', onCloseEarly);
    }
    function fail(err: GatewayError) {
      if (settled) return;
      finish();
      client.end(true);
      reject(err);
    }

    client.once('connect', () => {
      if (settled) return;
      const filters = {
        [c2dFilter(deviceId)]: { qos: 1 as const },
        [TWIN_RESPONSES]: { qos: 0 as const },
        [DESIRED_PATCHES]: { qos: 0 as const },
        [METHOD_REQUESTS]: { qos: 0 as const },
      };
      client.subscribe(filters, (err) => {
        if (settled) return;
        if (err) return fail(classifyConnectError(err, endpoint, deviceId));
        finish();
        resolve(createLink(client, options, () => lastError));
      });
    });
  });
}

function createLink(
  client: MqttClient,
  options: DeviceLinkOptions,
  lastError: () => Error | undefined,
): DeviceLink {
  const { deviceId } = options;
  const pending = new Set<Pending>();
  const twinWaiters = new Map<string, (answer: TwinAnswer) => void>();
  const drainWaiters = new Set<() => void>();
  let open = true;
  let endedByUs = false;
  let lostHandler: ((err: GatewayError) => void) | undefined;
  let rid = 0;

  const settleDrain = () => {
    if (pending.size > 0) return;
    for (const w of [...drainWaiters]) w();
  };

  function track<T>(
    run: (done: (err: GatewayError | undefined, value?: T) => void) => void,
    timeoutMs: number,
  ) {
    return new Promise<T>((resolve, reject) => {
      let done = false;
      const entry: Pending = {
        deadline: performance.now() + timeoutMs,
        fail: (err) => finish(err),
      };
      function finish(err: GatewayError | undefined, value?: T) {
        if (done) return;
        done = true;
        pending.delete(entry);
        if (err) reject(err);
        else resolve(value as T);
        settleDrain();
      }
      pending.add(entry);
      run(finish);
    });
  }

  client.on('message', (topic, payload, packet) => {
    if (topic.startsWith('$iothub/twin/res/')) {
      const answer = parseTwinResponse(topic);
      if (!answer) return;
      const waiter = twinWaiters.get(answer.rid);
      if (waiter) waiter({ status: answer.status, version: answer.version, body: payload });
      return;
    }
    options.onMessage(topic, payload, packet);
  });

  client.on('close', () => {
    if (!open) return;
    open = false;
    const cause = lastError();
    const err = new GatewayError(
      ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE,
      `the hub closed the link of device ${deviceId}${cause ? `: ${cause.message}` : ''}`,
      { retryable: true, cause, details: { deviceId } },
    );
    for (const p of [...pending]) p.fail(err);
    if (!endedByUs) lostHandler?.(err);
  });

  const link: DeviceLink = {
    deviceId,
    get isOpen() {
      return open && client.connected;
    },
    get inflight() {
      return pending.size;
    },
    publish(topic, payload) {
      if (!link.isOpen) return Promise.reject(closedLink(deviceId));
      return track<void>((done) => {
        client.publish(topic, payload, { qos: 1 }, (err) => {
          done(
            err
              ? new GatewayError(
                  ErrorCodes.PROVIDER_NOT_CONNECTED,
                  `publish for device ${deviceId} failed: ${err.message}`,
                  { retryable: true, cause: err, details: { deviceId } },
                )
              : undefined,
          );
        });
      }, options.requestTimeoutMs);
    },
    twin(kind, body) {
      if (!link.isOpen) return Promise.reject(closedLink(deviceId));
      const id = (++rid).toString(16);
      return track<TwinAnswer>((done) => {
        twinWaiters.set(id, (answer) => {
          twinWaiters.delete(id);
          done(undefined, answer);
        });
        const topic = kind === 'GET' ? twinGetTopic(id) : reportedPatchTopic(id);
        client.publish(topic, body ?? Buffer.alloc(0), { qos: 0 }, (err) => {
          if (err) {
            twinWaiters.delete(id);
            done(
              new GatewayError(
                ErrorCodes.PROVIDER_NOT_CONNECTED,
                `twin ${kind} for device ${deviceId} failed: ${err.message}`,
                { retryable: true, cause: err, details: { deviceId } },
              ),
            );
          }
        });
      }, options.requestTimeoutMs);
    },
    sweep(now) {
      for (const p of [...pending]) {
        if (p.deadline > now) continue;
        p.fail(
          new GatewayError(
            ErrorCodes.PROVIDER_TIMEOUT,
            `no answer from the hub for device ${deviceId} within ${options.requestTimeoutMs} ms`,
            { retryable: true, details: { deviceId } },
          ),
        );
      }
    },
    drained(timeoutMs) {
      if (pending.size === 0) return Promise.resolve();
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
    end(reason) {
      endedByUs = true;
      for (const p of [...pending]) p.fail(reason);
      twinWaiters.clear();
      if (!open) return Promise.resolve();
      return new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          client.end(true);
          resolve();
        }, CLOSE_TIMEOUT_MS);
        client.end(!client.connected, () => {
          clearTimeout(timer);
          open = false;
          resolve();
        });
      });
    },
    onLost(handler) {
      lostHandler = handler;
    },
  };
  return link;
}

function closedLink(deviceId: string): GatewayError {
  return new GatewayError(
    ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE,
    `the link of device ${deviceId} is closed`,
    {
      retryable: true,
      details: { deviceId },
    },
  );
}

function abortedError(): GatewayError {
  return new GatewayError(ErrorCodes.ABORTED, 'the connection attempt was aborted', { retryable: false });
}

/**
 * What went wrong opening a device link, as one sentence with its fix. `details.scope` tells the
 * provider whether the hub as a whole is unreachable (`hub`) or only this device refused (`device`).
 */
export function classifyConnectError(
  err: Error | undefined,
  endpoint: string,
  deviceId: string,
): GatewayError {
  if (err === undefined) {
    return new GatewayError(
      ErrorCodes.PROVIDER_CONNECT,
      `${endpoint} closed the connection of device ${deviceId} before CONNACK`,
      {
        retryable: true,
        details: { deviceId, scope: 'hub' },
      },
    );
  }
  const code = (err as { code?: unknown }).code;
  if (code === CONNACK_NOT_AUTHORIZED || code === CONNACK_BAD_CREDENTIALS) {
    return new GatewayError(
      ErrorCodes.PROVIDER_AUTH,
      `${endpoint} refused device ${deviceId} as not authorized (CONNACK ${code}); check hostName, that the device exists in the hub, and its key, policy or token`,
      { retryable: false, cause: err, details: { deviceId, connackCode: code, scope: 'device' } },
    );
  }
  if (code === CONNACK_SERVER_UNAVAILABLE) {
    return new GatewayError(
      ErrorCodes.PROVIDER_THROTTLED,
      `${endpoint} turned device ${deviceId} away as busy (CONNACK 3); it is retried later`,
      {
        retryable: true,
        cause: err,
        details: { deviceId, connackCode: code, scope: 'device' },
      },
    );
  }
  if (typeof code === 'number') {
    return new GatewayError(
      ErrorCodes.PROVIDER_CONNECT,
      `${endpoint} refused device ${deviceId}: ${err.message} (CONNACK ${code})`,
      {
        retryable: false,
        cause: err,
        details: { deviceId, connackCode: code, scope: 'device' },
      },
    );
  }
  if (/connack timeout/i.test(err.message)) {
    // TLS and CONNECT got through, the answer is late: a busy hub, not a missing one.
    return new GatewayError(
      ErrorCodes.PROVIDER_TIMEOUT,
      `no CONNACK from ${endpoint} for device ${deviceId} in time`,
      {
        retryable: true,
        cause: err,
        details: { deviceId, scope: 'device' },
      },
    );
  }
  const text = typeof code === 'string' ? code : '';
  if (text === 'ENOTFOUND' || text === 'EAI_AGAIN') {
    return new GatewayError(
      ErrorCodes.PROVIDER_CONNECT,
      `the hub host name in ${endpoint} does not resolve (${text}); check settings.hostName`,
      {
        retryable: true,
        cause: err,
        details: { network: text, scope: 'hub' },
      },
    );
  }
  if (/CERT|SSL|TLS|SELF_SIGNED|UNABLE_TO|HOSTNAME|ERR_TLS/i.test(text) || /certificate/i.test(err.message)) {
    return new GatewayError(
      ErrorCodes.PROVIDER_CONNECT,
      `TLS with ${endpoint} failed: ${err.message}; check settings.hostName and settings.ca`,
      {
        retryable: false,
        cause: err,
        details: { tls: text || undefined, scope: 'hub' },
      },
    );
  }
  return new GatewayError(
    ErrorCodes.PROVIDER_CONNECT,
    `cannot reach the hub at ${endpoint}: ${errorMessage(err)}`,
    {
      retryable: true,
      cause: err,
      details: { network: text || undefined, scope: 'hub' },
    },
  );
}
