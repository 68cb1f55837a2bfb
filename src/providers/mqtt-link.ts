/**
 * One MQTT connection to a cloud or broker, for the providers that speak MQTT (mqtt, aws-iot,
 * azure-iot-hub). A link is one attempt: it never reconnects by itself (mqtt.js
 * `reconnectPeriod: 0`); the connection supervisor or a device link pool opens a new one.
 *
 * API
 * - `openMqttLink(options, signal): Promise<MqttLink>` resolves at CONNACK. It rejects with a
 *   GatewayError: GW_ERR_PROVIDER_AUTH (credentials, certificate or policy refused), GW_ERR_
 *   PROVIDER_CONNECT (other CONNACK refusals, TLS, network; `details.connackCode` when the
 *   server answered), GW_ERR_PROVIDER_TIMEOUT (no CONNACK in time) or GW_ERR_ABORTED.
 *   `options.credentials()` is called on every open, so username/password may be fresh tokens
 *   (Azure SAS, AWS custom authorizer). TLS: `tls.ca`/`cert`/`key` are file paths (read on every
 *   open, so renewed files are picked up) or PEM buffers; `alpnProtocols` (AWS on 443:
 *   `x-amzn-mqtt-ca`) and `servername` (SNI) go to the TLS handshake.
 * - `link.publish(topic, payload, { qos, retain, properties })` resolves when the server
 *   acknowledged it (PUBACK for QoS 1; written for QoS 0). Rejections:
 *   MQTT 5 reason 0x97 (quota exceeded) → `throttled()` (GW_ERR_PROVIDER_THROTTLED, wait
 *   `quotaRetryAfterMs`, no attempt counted); 0x87, 0x90, 0x99 → GW_ERR_PROVIDER_REJECTED and
 *   0x95 → GW_ERR_PROVIDER_TOO_LARGE, not retryable (dead letter); other reason codes →
 *   GW_ERR_PROVIDER_REJECTED, retryable; no ack within `publishTimeoutMs` →
 *   GW_ERR_PROVIDER_TIMEOUT, retryable. When the link is lost every pending publish and
 *   subscribe rejects exactly once with GW_ERR_PROVIDER_NOT_CONNECTED (retryable) naming the
 *   reason; on `close()` with GW_ERR_PROVIDER_CLOSED (retryable) unless another reason is given.
 * - `link.subscribe({ filter: { qos, nl, rap, rh } })` resolves with the filters the server
 *   refused (SUBACK ≥ 0x80); no SUBACK within `publishTimeoutMs` or a lost link rejects.
 * - `link.onMessage(handler)`: inbound PUBLISH packets (one handler; a later call replaces it;
 *   a handler that throws is logged, never breaks the link).
 * - `link.onLoss(handler)`: called once when the connection drops by itself (not after
 *   `close()`), with a retryable GW_ERR_PROVIDER_CONNECT naming the reason. A handler set after
 *   the loss is called at once.
 * - `link.close(reason?)` rejects what is pending, then ends the connection (a graceful
 *   DISCONNECT when nothing is outstanding, bounded in time).
 * - `link.maxInflight` (server Receive Maximum, else 65,535), `link.maxPacketSize` (server
 *   Maximum Packet Size), `link.connack`, `link.latencyMs`, `link.connected`.
 */
import { readFileSync } from 'node:fs';
import {
  connect,
  type IClientOptions,
  type IClientPublishOptions,
  type IConnackPacket,
  type IPublishPacket,
  type ISubscriptionMap,
  type MqttClient,
  type Packet,
} from 'mqtt';
import type { IPubackPacket } from 'mqtt-packet';
import { ErrorCodes, GatewayError, errorMessage, type ErrorCode } from '../errors.js';
import type { Logger } from '../logger.js';
import { redactUrl } from '../logger.js';
import { createPubackSplitter, encodePublish, PacketTooLargeError } from './mqtt-wire.js';
import { throttled } from './provider.js';

export interface MqttCredentials {
  username?: string;
  password?: string | Buffer;
}

export interface MqttLinkTls {
  /** A file path (read on every open) or the PEM itself. */
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
  /** SNI; by default the host name of the URL (never an IP address). */
  servername?: string;
  /** ALPN protocol names offered in the ClientHello, e.g. `x-amzn-mqtt-ca`. */
  alpnProtocols?: string[];
  rejectUnauthorized?: boolean;
}

export interface MqttLinkOptions {
  /** mqtt://, mqtts://, tcp://, tls://, ssl:// */
  url: string;
  clientId: string;
  protocolVersion: 4 | 5;
  logger: Logger;
  /** Called on every open: tokens that expire are made fresh for each CONNECT. */
  credentials?: () => MqttCredentials | Promise<MqttCredentials>;
  tls?: MqttLinkTls;
  /** ms; 0 turns keepalive off. Default 30 s. */
  keepaliveMs?: number;
  /** ms to wait for CONNACK. Default 10 s. */
  connectTimeoutMs?: number;
  /** ms a publish waits for its PUBACK, a subscribe for its SUBACK. Default 30 s. */
  publishTimeoutMs?: number;
  /** How long a publish refused with 0x97 (quota exceeded) waits before the next try. Default 1 s. */
  quotaRetryAfterMs?: number;
  /** Default true. */
  cleanSession?: boolean;
  /** MQTT 5 CONNECT properties (session expiry, receive maximum …). */
  properties?: IClientOptions['properties'];
  /** MQTT 3.1.1: set the bridge flag (protocol level 0x84, Mosquitto's try_private). */
  bridgeMode?: boolean;
  /** Names the configuration in error messages, e.g. `integration upstream`. */
  owner?: string;
  /** Log `purpose` field: stream, test, import, a device id … */
  purpose?: string;
}

export interface MqttPublishOptions {
  qos: 0 | 1 | 2;
  retain?: boolean;
  /** MQTT 5 PUBLISH properties (user properties, correlation data, content type …). */
  properties?: IClientPublishOptions['properties'];
}

export interface MqttSubscription {
  qos: 0 | 1 | 2;
  /** MQTT 5 No Local */
  nl?: boolean;
  /** MQTT 5 Retain As Published */
  rap?: boolean;
  /** MQTT 5 Retain Handling */
  rh?: number;
}

export interface MqttLink {
  readonly clientId: string;
  readonly connack: IConnackPacket;
  /** ms from the start of the attempt to CONNACK */
  readonly latencyMs: number;
  /** The server's Receive Maximum, else the packet id space. */
  readonly maxInflight: number;
  /** MQTT 5 Maximum Packet Size from CONNACK. */
  readonly maxPacketSize: number | undefined;
  /** False once lost or closed. */
  readonly connected: boolean;
  publish(topic: string, payload: Buffer | string, options: MqttPublishOptions): Promise<void>;
  /** Resolves with the filters the server refused. */
  subscribe(filters: Record<string, MqttSubscription>): Promise<{ refused: string[] }>;
  onMessage(handler: (topic: string, payload: Buffer, packet: IPublishPacket) => void): void;
  onLoss(handler: (error: GatewayError) => void): void;
  close(reason?: GatewayError): Promise<void>;
}

/** Unacknowledged publishes when the server announces no Receive Maximum (3.1.1): the packet id space. */
export const DEFAULT_MAX_INFLIGHT = 65_535;
/** Bound on a graceful DISCONNECT at close(). */
const CLOSE_TIMEOUT_MS = 2000;
/** How often a link looks for publishes past their deadline (one timer per link, not per message). */
const TIMEOUT_SWEEP_MS = 250;

/** PUBACK reasons that retrying cannot fix: the row goes to dead letters. */
const FINAL_PUBACK_CODES = new Set([
  0x87, // Not authorized
  0x90, // Topic Name invalid
  0x95, // Packet too large
  0x99, // Payload format invalid
]);
const PUBACK_QUOTA_EXCEEDED = 0x97;
const PUBACK_PACKET_TOO_LARGE = 0x95;

/** CONNACK return codes: MQTT 3.1.1 (1–5) and MQTT 5 (≥ 0x80), with what to do about each. */
const CONNACK_REASONS: Record<number, { text: string; auth?: true; transient?: true }> = {
  1: { text: 'unacceptable protocol version; check settings.protocolVersion' },
  2: { text: 'client identifier rejected; check the client id' },
  3: { text: 'server unavailable', transient: true },
  4: { text: 'bad user name or password', auth: true },
  5: { text: 'not authorized', auth: true },
  0x80: { text: 'unspecified error', transient: true },
  0x81: { text: 'malformed packet' },
  0x82: { text: 'protocol error' },
  0x83: { text: 'implementation specific error' },
  0x84: { text: 'unsupported protocol version; check settings.protocolVersion' },
  0x85: { text: 'client identifier not valid; check the client id' },
  0x86: { text: 'bad user name or password', auth: true },
  0x87: { text: 'not authorized', auth: true },
  0x88: { text: 'server unavailable', transient: true },
  0x89: { text: 'server busy', transient: true },
  0x8a: { text: 'banned', auth: true },
  0x8c: { text: 'bad authentication method', auth: true },
  0x90: { text: 'topic name invalid (will topic)' },
  0x95: { text: 'packet too large' },
  0x97: { text: 'quota exceeded', transient: true },
  0x99: { text: 'payload format invalid' },
  0x9a: { text: 'retain not supported' },
  0x9b: { text: 'QoS not supported' },
  0x9c: { text: 'use another server', transient: true },
  0x9d: { text: 'server moved', transient: true },
  0x9f: { text: 'connection rate exceeded', transient: true },
};

interface Pending {
  fail(err: GatewayError): void;
  /** performance.now() after which a publish or subscribe counts as unacknowledged */
  deadline: number;
  topic: string;
}

// mqtt.js traces every packet through the `debug` package, which allocates its arguments even
// when off: a sixth of what the gateway allocated per message (measured), so more young-
// generation GC pauses. DEBUG=mqttjs* still turns its trace on.
const noTrace = (): void => {};

/** Opens one connection and resolves at CONNACK; every failure ends the client before rejecting. */
export async function openMqttLink(options: MqttLinkOptions, signal: AbortSignal): Promise<MqttLink> {
  if (signal.aborted) throw aborted();
  const endpoint = redactUrl(options.url);
  const owner = options.owner ?? `client ${options.clientId}`;
  const connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
  const publishTimeoutMs = options.publishTimeoutMs ?? 30_000;
  const keepaliveMs = options.keepaliveMs ?? 30_000;
  const log = options.logger.child({ clientId: options.clientId, purpose: options.purpose ?? 'stream' });

  let credentials: MqttCredentials = {};
  if (options.credentials) {
    try {
      credentials = await options.credentials();
    } catch (err) {
      if (err instanceof GatewayError) throw err;
      throw new GatewayError(
        ErrorCodes.PROVIDER_AUTH,
        `cannot make the credentials of ${owner}: ${errorMessage(err)}; check its key or token settings`,
        { retryable: false, cause: err },
      );
    }
    if (signal.aborted) throw aborted();
  }
  const tls = options.tls ?? {};
  const clientOptions: IClientOptions = {
    protocolVersion: options.protocolVersion,
    // Connected below, once the bridge flag is in place.
    manualConnect: true,
    clientId: options.clientId,
    username: credentials.username,
    password: credentials.password as IClientOptions['password'],
    // mqtt.js takes seconds; a sub-second setting must not become 0 (= keepalive off).
    keepalive: keepaliveMs === 0 ? 0 : Math.max(1, Math.ceil(keepaliveMs / 1000)),
    connectTimeout: connectTimeoutMs,
    reconnectPeriod: 0,
    clean: options.cleanSession ?? true,
    queueQoSZero: false,
    resubscribe: false,
    rejectUnauthorized: tls.rejectUnauthorized ?? true,
    ca: readPem('ca', tls.ca, owner),
    cert: readPem('cert', tls.cert, owner),
    key: readPem('key', tls.key, owner),
    ...(tls.servername === undefined ? {} : { servername: tls.servername }),
    ...(tls.alpnProtocols === undefined ? {} : { ALPNProtocols: tls.alpnProtocols }),
    ...(options.properties === undefined ? {} : { properties: options.properties }),
    ...(process.env.DEBUG ? {} : { log: noTrace }),
  };
  log.info(
    { endpoint, protocolVersion: options.protocolVersion, bridge: options.bridgeMode === true },
    'connect_started',
  );
  const started = performance.now();

  /**
   * QoS 0 and 1 publishes without properties bypass mqtt.js (see mqtt-wire.ts): each is one
   * buffer written on the link's socket, its PUBACK taken out of the incoming bytes before
   * mqtt.js parses them and matched here by packet id. Packet ids come from mqtt.js's own
   * allocator, so they never clash with its subscribes and publishes, whose PUBACKs it still gets.
   */
  const fastAcks = new Map<number, { acked(reasonCode: number | undefined): void }>();
  const claimAck = (messageId: number, reasonCode: number | undefined): boolean => {
    const waiting = fastAcks.get(messageId);
    if (waiting === undefined) return false;
    fastAcks.delete(messageId);
    releaseId(messageId);
    waiting.acked(reasonCode);
    return true;
  };
  let releaseId = (_messageId: number): void => {};
  /**
   * A QoS 1 publish of the fast path waiting for its PUBACK: one object per message (no closures),
   * settled once by its PUBACK, its deadline, the loss of the link or close().
   */
  class AckWait implements Pending {
    private done = false;
    constructor(
      readonly topic: string,
      readonly deadline: number,
      private readonly messageId: number,
      private readonly resolve: () => void,
      private readonly reject: (err: GatewayError) => void,
    ) {}

    acked(reasonCode: number | undefined): void {
      // MQTT 5: below 0x80 is success (0x10: no matching subscribers).
      if (reasonCode === undefined || reasonCode < 0x80) this.settle(undefined);
      else
        this.settle(
          classifyPublishError(
            Object.assign(new Error(`Publish error: reason code ${reasonCode}`), { code: reasonCode }),
            endpoint,
            this.topic,
            options.quotaRetryAfterMs ?? 1000,
          ),
        );
    }

    fail(err: GatewayError): void {
      // A publish that timed out must not keep its id waiting for a PUBACK.
      if (fastAcks.get(this.messageId) === this) fastAcks.delete(this.messageId);
      this.settle(err);
    }

    private settle(err: GatewayError | undefined): void {
      if (this.done) return;
      this.done = true;
      pending.delete(this);
      if (err === undefined) this.resolve();
      else this.reject(err);
    }
  }

  const opened = await new Promise<{
    client: MqttClient;
    connack: IConnackPacket;
    lastError(): Error | undefined;
  }>((resolve, reject) => {
    let settled = false;
    let lastError: Error | undefined;
    const client = connect(options.url, clientOptions);
    if (options.bridgeMode) setBridgeFlag(client);
    const ids = client.messageIdProvider;
    releaseId = (messageId) => ids.deallocate(messageId);
    client.connect();
    splitIncoming(client, createPubackSplitter(options.protocolVersion, claimAck));
    // Without an 'error' listener mqtt.js would throw; errors are read when the link closes.
    client.on('error', (err) => {
      lastError = err;
    });
    client.on('disconnect', (packet) => {
      // The reason code rides along so a provider can branch on it (AWS: 0x8E session taken over).
      lastError = Object.assign(
        new Error(`the server sent DISCONNECT (reason code 0x${(packet.reasonCode ?? 0).toString(16)})`),
        { reasonCode: packet.reasonCode ?? 0 },
      );
    });
    const safety = setTimeout(
      () =>
        fail(
          new GatewayError(
            ErrorCodes.PROVIDER_TIMEOUT,
            `no CONNACK from ${endpoint} within ${connectTimeoutMs} ms`,
            {
              retryable: true,
            },
          ),
        ),
      connectTimeoutMs + 1000,
    );
    const onAbort = () => fail(aborted());
    signal.addEventListener('abort', onAbort, { once: true });
    const finish = () => {
      settled = true;
      clearTimeout(safety);
      signal.removeEventListener('abort', onAbort);
      client.removeListener('close', onCloseBeforeConnack);
    };
    function fail(err: GatewayError) {
      if (settled) return;
      finish();
      client.end(true);
      log.warn(
        { code: err.code, err: err.message, latencyMs: Math.round(performance.now() - started) },
        'connect_failed',
      );
      reject(err);
    }
    function onCloseBeforeConnack() {
      fail(classifyConnectError(lastError, endpoint, owner));
    }
    client.on('close', onCloseBeforeConnack);
    client.once('connect', (connack) => {
      if (settled) return;
      finish();
      resolve({ client, connack, lastError: () => lastError });
    });
  });
  const latencyMs = Math.round(performance.now() - started);
  const { client, connack } = opened;
  log.info(
    {
      latencyMs,
      receiveMaximum: connack.properties?.receiveMaximum,
      maximumPacketSize: connack.properties?.maximumPacketSize,
      sessionPresent: connack.sessionPresent,
    },
    'connect_completed',
  );

  const pending = new Set<Pending>();
  let state: 'up' | 'lost' | 'closed' = 'up';
  let lossError: GatewayError | undefined;
  let lossHandler: ((error: GatewayError) => void) | undefined;
  let messageHandler: ((topic: string, payload: Buffer, packet: IPublishPacket) => void) | undefined;

  const sweep = setInterval(
    () => {
      const t = performance.now();
      for (const p of pending) {
        if (p.deadline > t) continue;
        p.fail(
          new GatewayError(
            ErrorCodes.PROVIDER_TIMEOUT,
            `no acknowledgement from ${endpoint} within ${publishTimeoutMs} ms`,
            {
              retryable: true,
              details: { topic: p.topic },
            },
          ),
        );
      }
    },
    Math.min(TIMEOUT_SWEEP_MS, publishTimeoutMs),
  );
  sweep.unref();

  const ids = client.messageIdProvider;
  // Where the splitter could not be put in front of mqtt.js, PUBACKs arrive here instead.
  client.on('packetreceive', (packet) => {
    if (packet.cmd !== 'puback' || fastAcks.size === 0) return;
    const { messageId, reasonCode } = packet as IPubackPacket;
    if (messageId !== undefined) claimAck(messageId, reasonCode);
  });
  // The publishes of one turn of the loop leave in one writev, not one syscall each.
  let corked = false;
  const uncork = () => {
    corked = false;
    client.stream.uncork();
  };
  const write = (bytes: Buffer, callback?: () => void) => {
    if (!corked) {
      corked = true;
      client.stream.cork();
      process.nextTick(uncork);
    }
    client.stream.write(bytes, callback);
  };

  const failPending = (err: GatewayError) => {
    clearInterval(sweep);
    for (const p of [...pending]) p.fail(err);
    pending.clear();
    fastAcks.clear();
  };

  const notifyLoss = (err: GatewayError) => {
    const handler = lossHandler;
    if (handler === undefined) return;
    try {
      handler(err);
    } catch (e) {
      log.error({ err: e }, 'loss_handler_failed');
    }
  };

  const onClose = () => {
    if (state !== 'up') return;
    state = 'lost';
    const reason = opened.lastError() ?? new Error('the connection closed');
    failPending(
      new GatewayError(
        ErrorCodes.PROVIDER_NOT_CONNECTED,
        `the connection to ${endpoint} was lost: ${reason.message}`,
        {
          retryable: true,
          cause: reason,
        },
      ),
    );
    lossError = new GatewayError(
      ErrorCodes.PROVIDER_CONNECT,
      `the connection to ${endpoint} was lost: ${reason.message}`,
      {
        retryable: true,
        cause: reason,
      },
    );
    log.warn({ err: reason.message }, 'connection_lost');
    notifyLoss(lossError);
  };
  client.on('close', onClose);
  client.on('message', (topic, payload, packet) => {
    if (messageHandler === undefined) {
      log.debug({ topic }, 'message_unhandled');
      return;
    }
    try {
      messageHandler(topic, payload, packet);
    } catch (err) {
      log.error({ err, topic }, 'message_handler_failed');
    }
  });
  // The broker may have closed the socket already (a kick right after CONNACK).
  if (!client.connected) onClose();

  /** Tracks one operation until it settles; `fail` settles it with an error exactly once. */
  function track<T>(
    topic: string,
    deadline: number,
    run: (settle: (err: GatewayError | undefined, value?: T) => void) => void,
    /** Runs once however the operation settles (ack, timeout, loss, close). */
    cleanup?: () => void,
  ) {
    return new Promise<T>((resolve, reject) => {
      let done = false;
      const entry: Pending = { fail: (err) => settle(err), deadline, topic };
      function settle(err: GatewayError | undefined, value?: T) {
        if (done) return;
        done = true;
        pending.delete(entry);
        cleanup?.();
        if (err) reject(err);
        else resolve(value as T);
      }
      pending.add(entry);
      run(settle);
    });
  }

  const unavailable = (): GatewayError =>
    state === 'closed'
      ? closedError()
      : new GatewayError(ErrorCodes.PROVIDER_NOT_CONNECTED, `not connected to ${endpoint}`, {
          retryable: true,
          cause: lossError,
        });

  const link: MqttLink = {
    clientId: options.clientId,
    connack,
    latencyMs,
    maxInflight: connack.properties?.receiveMaximum ?? DEFAULT_MAX_INFLIGHT,
    maxPacketSize: connack.properties?.maximumPacketSize,
    get connected() {
      return state === 'up' && client.connected;
    },

    publish(topic, payload, publishOptions) {
      if (state !== 'up' || !client.connected) return Promise.reject(unavailable());
      const { qos } = publishOptions;
      if ((qos === 0 || qos === 1) && publishOptions.properties === undefined) {
        // QoS 0 takes the same path as QoS 1, so a queue's QoS 0 and 1 rows leave in their order.
        const messageId = qos === 1 ? ids.allocate() : 0;
        // Only with 65,535 publishes outstanding could an id still be waiting: mqtt.js then decides.
        if (messageId !== null && (qos === 0 || !fastAcks.has(messageId))) {
          let bytes: Buffer;
          try {
            bytes = encodePublish(
              topic,
              payload,
              qos,
              publishOptions.retain ?? false,
              messageId,
              options.protocolVersion,
            );
          } catch (err) {
            if (qos === 1) ids.deallocate(messageId);
            return Promise.reject(tooLarge(err, endpoint, topic));
          }
          if (qos === 0) {
            return track<void>(topic, performance.now() + publishTimeoutMs, (settle) =>
              write(bytes, () => settle(undefined)),
            );
          }
          return new Promise<void>((resolve, reject) => {
            const waiting = new AckWait(
              topic,
              performance.now() + publishTimeoutMs,
              messageId,
              resolve,
              reject,
            );
            pending.add(waiting);
            fastAcks.set(messageId, waiting);
            write(bytes);
          });
        }
      }
      return track<void>(topic, performance.now() + publishTimeoutMs, (settle) => {
        client.publish(
          topic,
          payload,
          {
            qos: publishOptions.qos,
            retain: publishOptions.retain ?? false,
            ...(publishOptions.properties === undefined ? {} : { properties: publishOptions.properties }),
          },
          (err) =>
            settle(
              err ? classifyPublishError(err, endpoint, topic, options.quotaRetryAfterMs ?? 1000) : undefined,
            ),
        );
      });
    },

    subscribe(filters) {
      if (state !== 'up' || !client.connected) return Promise.reject(unavailable());
      const topics = Object.keys(filters).join(', ');
      return track<{ refused: string[] }>(topics, performance.now() + publishTimeoutMs, (settle) => {
        const names = Object.keys(filters);
        client.subscribe(filters as ISubscriptionMap, (err, granted) => {
          // mqtt.js reports a SUBACK that refuses any filter as an error carrying the packet.
          const codes = (err as { packet?: { granted?: unknown } } | null)?.packet?.granted;
          if (err && Array.isArray(codes) && codes.length === names.length) {
            settle(undefined, { refused: names.filter((_, i) => ((codes[i] as number) & 0x80) !== 0) });
            return;
          }
          if (err) {
            settle(
              new GatewayError(
                ErrorCodes.PROVIDER_REJECTED,
                `subscribing to ${topics} at ${endpoint} failed: ${err.message}`,
                { retryable: true, cause: err, details: { filters: names } },
              ),
            );
            return;
          }
          settle(undefined, {
            refused: (granted ?? []).filter((g) => (g.qos & 0x80) !== 0).map((g) => g.topic),
          });
        });
      });
    },

    onMessage(handler) {
      messageHandler = handler;
    },

    onLoss(handler) {
      lossHandler = handler;
      if (state === 'lost' && lossError !== undefined) {
        const err = lossError;
        queueMicrotask(() => {
          if (lossHandler === handler) notifyLoss(err);
        });
      }
    },

    close(reason) {
      if (state === 'closed') return Promise.resolve();
      const wasUp = state === 'up';
      state = 'closed';
      // A graceful end waits for unacknowledged publishes; those are abandoned here (the queue
      // still holds them), so force when any are outstanding.
      const force =
        !wasUp || !client.connected || pending.size > 0 || Object.keys(client.outgoing).length > 0;
      failPending(reason ?? closedError());
      return new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          client.end(true);
          resolve();
        }, CLOSE_TIMEOUT_MS);
        client.end(force, () => {
          clearTimeout(timer);
          resolve();
        });
      });
    },
  };
  return link;
}

/**
 * Puts `split` between the link's socket and mqtt.js's parser, which reads the socket through
 * `pipe` (one 'data' listener). Where that is not what it finds, it changes nothing and the
 * PUBACKs of the fast path reach the 'packetreceive' handler instead.
 */
function splitIncoming(client: MqttClient, split: (chunk: Buffer) => Buffer | undefined): void {
  const stream = client.stream;
  const readers = stream.listeners('data');
  if (readers.length !== 1) return;
  const parse = readers[0] as (chunk: Buffer) => void;
  stream.removeListener('data', parse);
  stream.on('data', (chunk: Buffer) => {
    const rest = split(chunk);
    if (rest !== undefined) parse.call(stream, rest);
  });
}

/** A message MQTT cannot carry (topic over 64 KiB, packet over 256 MiB) goes to dead letters. */
function tooLarge(err: unknown, endpoint: string, topic: string): GatewayError {
  const final = err instanceof PacketTooLargeError;
  return new GatewayError(
    final ? ErrorCodes.PROVIDER_TOO_LARGE : ErrorCodes.PROVIDER_REJECTED,
    `cannot publish to ${endpoint} on ${topic.slice(0, 200)}: ${errorMessage(err)}`,
    { retryable: !final, cause: err, details: { topic: topic.slice(0, 200) } },
  );
}

function readPem(what: string, value: string | Buffer | undefined, owner: string): Buffer | undefined {
  if (value === undefined || Buffer.isBuffer(value)) return value;
  try {
    return readFileSync(value);
  } catch (err) {
    throw new GatewayError(
      ErrorCodes.PROVIDER_CONNECT,
      `cannot read the ${what} file ${value} (${(err as NodeJS.ErrnoException).code ?? errorMessage(err)}); fix settings.${what} of ${owner}`,
      { retryable: false, cause: err, details: { file: value } },
    );
  }
}

function aborted(): GatewayError {
  return new GatewayError(ErrorCodes.ABORTED, 'the connection attempt was aborted', { retryable: false });
}

function closedError(): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_CLOSED, 'the connection was closed', { retryable: true });
}

/**
 * Sets the bridge flag (0x80) in the protocol level of this client's CONNECT: mqtt-packet writes
 * it from the packet's `bridgeMode`, which mqtt.js has no option for. The mqtt provider's tests
 * check on the wire that it arrives (a broker sees `bridgeMode`, Mosquitto stops echoing).
 */
function setBridgeFlag(client: MqttClient): void {
  const internals = client as unknown as { _writePacket?: (packet: Packet, cb?: unknown) => void };
  const write = internals._writePacket;
  if (typeof write !== 'function') return;
  internals._writePacket = function (this: MqttClient, packet: Packet, cb?: unknown) {
    if (packet.cmd === 'connect') (packet as Packet & { bridgeMode?: boolean }).bridgeMode = true;
    write.call(this, packet, cb);
  };
}

/** CONNACK refusals, TLS verification and network errors, each with a code callers can branch on. */
export function classifyConnectError(
  err: Error | undefined,
  endpoint: string,
  owner = 'the integration',
): GatewayError {
  if (err === undefined) {
    return new GatewayError(ErrorCodes.PROVIDER_CONNECT, `${endpoint} closed the connection before CONNACK`, {
      retryable: true,
      details: { beforeConnack: true },
    });
  }
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'number') {
    const reason = CONNACK_REASONS[code] ?? { text: `reason code 0x${code.toString(16)}` };
    const errorCode: ErrorCode = reason.auth ? ErrorCodes.PROVIDER_AUTH : ErrorCodes.PROVIDER_CONNECT;
    const fix = reason.auth
      ? `; check the user name, password or token, client certificate and policy of ${owner}`
      : '';
    return new GatewayError(
      errorCode,
      `${endpoint} refused the connection: ${reason.text} (CONNACK ${code})${fix}`,
      // Retrying cannot fix bad credentials; the supervisor still retries with backoff in case
      // the server side is fixed.
      { retryable: reason.transient === true, cause: err, details: { connackCode: code } },
    );
  }
  const text = typeof code === 'string' ? code : '';
  if (
    /CERT|SSL|TLS|SELF_SIGNED|UNABLE_TO|HOSTNAME|ERR_TLS/i.test(text) ||
    /TLS|certificate/i.test(err.message)
  ) {
    return new GatewayError(
      ErrorCodes.PROVIDER_CONNECT,
      `TLS with ${endpoint} failed: ${err.message}; check settings.ca and settings.servername of ${owner} and the server certificate`,
      { retryable: false, cause: err, details: { tls: text || undefined } },
    );
  }
  if (/connack timeout/i.test(err.message)) {
    return new GatewayError(ErrorCodes.PROVIDER_TIMEOUT, `no CONNACK from ${endpoint} in time`, {
      retryable: true,
      cause: err,
    });
  }
  return new GatewayError(ErrorCodes.PROVIDER_CONNECT, `cannot connect to ${endpoint}: ${err.message}`, {
    retryable: true,
    cause: err,
    // A reset after the TCP handshake is how some brokers refuse a CONNECT they do not like.
    details: text ? { network: text, ...(text === 'ECONNRESET' ? { beforeConnack: true } : {}) } : undefined,
  });
}

function classifyPublishError(
  err: Error,
  endpoint: string,
  topic: string,
  quotaRetryAfterMs: number,
): GatewayError {
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'number' && code >= 0x80) {
    const hex = `0x${code.toString(16)}`;
    if (code === PUBACK_QUOTA_EXCEEDED) {
      return throttled(
        `${endpoint} refused the message on ${topic}: quota exceeded (reason code ${hex})`,
        quotaRetryAfterMs,
      );
    }
    return new GatewayError(
      code === PUBACK_PACKET_TOO_LARGE ? ErrorCodes.PROVIDER_TOO_LARGE : ErrorCodes.PROVIDER_REJECTED,
      `${endpoint} rejected the message on ${topic}: ${err.message} (reason code ${hex})`,
      { retryable: !FINAL_PUBACK_CODES.has(code), cause: err, details: { reasonCode: code, topic } },
    );
  }
  // "client disconnecting", "Connection closed", store errors: the link is going away.
  return new GatewayError(
    ErrorCodes.PROVIDER_NOT_CONNECTED,
    `publish to ${endpoint} failed: ${err.message}`,
    {
      retryable: true,
      cause: err,
    },
  );
}
