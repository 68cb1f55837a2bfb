import type { IPublishPacket } from 'mqtt';
import { ErrorCodes, GatewayError, errorMessage, toGatewayError } from '../../errors.js';
import { matchTopic } from '../../common/topic-match.js';
import { expandTemplate } from '../../common/topic-template.js';
import type { Logger } from '../../logger.js';
import { redactUrl } from '../../logger.js';
import { DEFAULT_MAX_INFLIGHT, openMqttLink, type MqttLink, type MqttSubscription } from '../mqtt-link.js';
import {
  combineSyncResults,
  failedConnectionTest,
  type ConnectionTestResult,
  type InboundMessage,
  type OutboundMessage,
  type Provider,
  type ProviderContext,
  type SyncResult,
} from '../provider.js';
import { createEchoFilter } from './echo-filter.js';
import { mqttSettingsSchema, type MqttSettings } from './settings.js';

/** MQTT's own ceiling: the largest Remaining Length a packet can declare (256 MiB − 1). */
const MQTT_MAX_REMAINING_LENGTH = 268_435_455;
const DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024 * 1024;
/** How long `import` listens for the retained messages a fresh subscription brings. */
const IMPORT_WINDOW_MS = 1000;

/** (device, topic) pairs whose outbound mapping is remembered; the memo starts over when full. */
const OUTBOUND_MEMO_TOPICS = 10_000;

/** Publications remembered at most while they wait for their echo. */
const ECHO_MAX_ENTRIES = 10_000;
/**
 * On a link opened with the bridge flag: this many publications forgotten without an echo, and
 * none ever echoed, means the broker honours the flag; the filter then stops, so it can never
 * mistake someone else's identical message for our echo.
 */
const ECHO_PROBE = 20;
/** CONNACK return code 1: unacceptable protocol version. */
const CONNACK_BAD_PROTOCOL = 1;

/**
 * The generic `mqtt` provider: bridges the local canonical topics to any MQTT 3.1.1/5 broker
 * with per-rule topic templates in both directions (cloud-protocols.md §4).
 *
 * One `connect` is one attempt (`reconnectPeriod: 0`): the connection supervisor owns
 * reconnects. mqtt.js's offline queue and outgoing store are never relied on — a publish while
 * disconnected is rejected, and in-flight publishes are rejected when the link drops — because
 * the SQLite queue is the source of truth and the forwarder resends from it.
 *
 * Loops: with protocol 5 and `noLocal` (default) the inbound subscriptions carry No Local, so
 * a message we publish through an outbound rule is not delivered back to us even when an
 * inbound filter covers its remote topic. MQTT 3.1.1 has no standard equivalent: there the
 * provider connects as a bridge (`bridgeMode`, which Mosquitto answers with No Local on our
 * subscriptions), and an echo filter drops the copies of our own publications that a broker
 * ignoring the flag sends back, so they never reach the inbound rule's local topic.
 */
export function createMqttProvider(context: ProviderContext): Provider {
  const settings: MqttSettings = mqttSettingsSchema.parse(context.integration.settings);
  // The outbound rule and remote topic of each (device, topic) pair, worked out once: devices
  // publish to the same few topics over and over. Settings never change for this provider.
  type OutboundRule = MqttSettings['outbound'][number];
  /** `echoes`: an inbound filter covers the remote topic, so on 3.1.1 the broker sends it back. */
  type OutboundMapping = { remote: string; rule: OutboundRule; echoes: boolean } | { error: unknown } | null;
  const bothWays = settings.inbound.length > 0 && settings.outbound.length > 0;
  const echoFilter =
    settings.protocolVersion === 4 && bothWays
      ? createEchoFilter({ ttlMs: settings.echoWindow, maxEntries: ECHO_MAX_ENTRIES })
      : undefined;
  /** Off once a bridge-flag link showed that the broker does not echo (see ECHO_PROBE). */
  let echoActive = echoFilter !== undefined;
  /** The current stream link was opened with the bridge flag. */
  let bridgedLink = false;
  /** Whether the stream connection sets the bridge flag; `auto` clears it when refused. */
  let bridgeFlag =
    settings.protocolVersion === 4 &&
    (settings.bridgeMode === true || (settings.bridgeMode === 'auto' && bothWays));
  // Per device, then per topic: no key string built per message.
  let outboundMemo = new Map<string, Map<string, OutboundMapping>>();
  let outboundMemoSize = 0;
  const mapOutbound = (message: OutboundMessage): OutboundMapping => {
    let byTopic = outboundMemo.get(message.deviceId);
    let mapped = byTopic?.get(message.topic);
    if (mapped !== undefined) return mapped;
    mapped = null;
    try {
      for (const rule of settings.outbound) {
        const captures = matchTopic(rule.local, message.topic);
        if (captures === null) continue;
        const remote = expandTemplate(rule.remote, {
          topic: message.topic,
          deviceId: message.deviceId,
          gatewayId: context.gatewayId,
          captures,
        });
        const echoes =
          echoFilter !== undefined && settings.inbound.some((r) => matchTopic(r.remote, remote) !== null);
        mapped = { remote, rule, echoes };
        break;
      }
    } catch (err) {
      mapped = { error: err };
    }
    if (outboundMemoSize >= OUTBOUND_MEMO_TOPICS) {
      outboundMemo = new Map();
      outboundMemoSize = 0;
      byTopic = undefined;
    }
    if (byTopic === undefined) outboundMemo.set(message.deviceId, (byTopic = new Map()));
    byTopic.set(message.topic, mapped);
    outboundMemoSize++;
    return mapped;
  };
  const logger: Logger = context.logger.child({ component: 'mqtt' });
  const clientId = settings.clientId ?? `${context.gatewayId}-${context.integration.name}`;
  const endpoint = redactUrl(settings.url);
  const configuredMaxPayload = settings.maxPayloadSize ?? DEFAULT_MAX_PAYLOAD_BYTES;

  let commandHandler: ((message: InboundMessage) => void) | undefined;
  let disconnectHandler: ((error: Error) => void) | undefined;
  let link: MqttLink | undefined;
  let closed = false;

  logger.info(
    {
      endpoint,
      protocolVersion: settings.protocolVersion,
      clientId,
      outboundRules: settings.outbound.length,
      inboundRules: settings.inbound.length,
    },
    'client_initialized',
  );
  if (settings.protocolVersion === 4 && settings.inbound.length > 0 && settings.outbound.length > 0) {
    logger.debug('no_local_unavailable');
  }

  /** Opens one connection with this integration's settings; resolves at CONNACK. */
  function open(id: string, purpose: string, signal: AbortSignal, bridge = false): Promise<MqttLink> {
    return openMqttLink(
      {
        url: settings.url,
        clientId: id,
        protocolVersion: settings.protocolVersion,
        logger,
        credentials: () => ({ username: settings.username, password: settings.password }),
        tls: {
          ca: settings.ca,
          cert: settings.cert,
          key: settings.key,
          servername: settings.servername,
          rejectUnauthorized: settings.rejectUnauthorized,
        },
        keepaliveMs: settings.keepalive,
        connectTimeoutMs: settings.connectTimeout,
        publishTimeoutMs: settings.publishTimeout,
        cleanSession: settings.cleanSession,
        bridgeMode: bridge,
        owner: `integration ${context.integration.name}`,
        purpose,
      },
      signal,
    );
  }

  /**
   * The stream connection: with the bridge flag when configured. Under `auto`, a broker that
   * refuses the flag (CONNACK 1, or closing the connection before CONNACK) is tried again at
   * once without it, and the flag stays off for this provider; the echo filter still guards.
   */
  async function openStream(signal: AbortSignal): Promise<MqttLink> {
    bridgedLink = false;
    if (!bridgeFlag) return open(clientId, 'stream', signal);
    try {
      const opened = await open(clientId, 'stream', signal, true);
      bridgedLink = true;
      return opened;
    } catch (err) {
      const refusal =
        err instanceof GatewayError &&
        (err.details?.connackCode === CONNACK_BAD_PROTOCOL || err.details?.beforeConnack === true);
      if (settings.bridgeMode !== 'auto' || !refusal || signal.aborted) throw err;
      const opened = await open(clientId, 'stream', signal);
      bridgeFlag = false;
      logger.info({ endpoint, err: errorMessage(err) }, 'bridge_mode_refused');
      return opened;
    }
  }

  let echoesDropped = 0;
  /** The first echo is logged at info (it explains the drops), the rest at debug. */
  function noteEcho(topic: string): void {
    echoesDropped++;
    if (echoesDropped === 1) logger.info({ topic }, 'inbound_echo_dropped');
    else logger.debug({ topic, total: echoesDropped }, 'inbound_echo_dropped');
  }

  async function subscribeInbound(current: MqttLink, retainHandling: 0 | 1 | 2): Promise<void> {
    if (settings.inbound.length === 0) return;
    const v5 = settings.protocolVersion === 5;
    const map: Record<string, MqttSubscription> = {};
    for (const rule of settings.inbound) {
      // Retain As Published keeps retained desired state retained on the local side.
      map[rule.remote] = v5
        ? { qos: rule.qos, nl: settings.noLocal, rap: true, rh: retainHandling }
        : { qos: rule.qos };
    }
    let failure: string | undefined;
    let refused: string[] = [];
    try {
      refused = (await current.subscribe(map)).refused;
    } catch (err) {
      failure = errorMessage(err);
    }
    if (failure === undefined && refused.length === 0) return;
    // Outbound still works without the inbound subscription, so the link stays up.
    logger.warn({ err: failure, refused }, 'subscribe_failed');
    const event = {
      activityType: 'subscribe',
      direction: 'incoming',
      status: 'failed',
      errorCode: ErrorCodes.PROVIDER_REJECTED,
      errorMessage: failure ?? `the broker refused the subscriptions ${refused.join(', ')}`,
      metadata: { filters: Object.keys(map) },
    } as const;
    context.report?.(event);
  }

  /** The local topic for a remote one: the first inbound rule whose filter matches. */
  function mapInbound(topic: string): string | undefined {
    for (const rule of settings.inbound) {
      const captures = matchTopic(rule.remote, topic);
      if (captures === null) continue;
      return expandTemplate(rule.local, { topic, gatewayId: context.gatewayId, captures });
    }
    return undefined;
  }

  function deliverInbound(topic: string, payload: Buffer, packet: IPublishPacket): boolean {
    let local: string | undefined;
    try {
      local = mapInbound(topic);
    } catch (err) {
      logger.warn({ topic, err: errorMessage(err) }, 'inbound_unmapped');
      return false;
    }
    if (local === undefined) {
      logger.debug({ topic }, 'inbound_unmapped');
      return false;
    }
    if (commandHandler === undefined) {
      logger.warn({ topic, local }, 'inbound_no_handler');
      return false;
    }
    try {
      commandHandler({ topic: local, payload, qos: packet.qos, retain: packet.retain });
      return true;
    } catch (err) {
      logger.error({ err, topic: local }, 'inbound_handler_failed');
      return false;
    }
  }

  function packetSize(topic: string, payload: Buffer, qos: number): number {
    const remaining =
      2 +
      Buffer.byteLength(topic) +
      (qos > 0 ? 2 : 0) +
      (settings.protocolVersion === 5 ? 1 : 0) +
      payload.length;
    const lengthBytes = remaining < 128 ? 1 : remaining < 16_384 ? 2 : remaining < 2_097_152 ? 3 : 4;
    return 1 + lengthBytes + remaining;
  }

  function effectiveMaxPayload(): number {
    return Math.min(configuredMaxPayload, link?.maxPacketSize ?? Infinity);
  }

  const provider: Provider = {
    get maxInflight() {
      return link?.maxInflight ?? DEFAULT_MAX_INFLIGHT;
    },
    get maxPayloadBytes() {
      return effectiveMaxPayload();
    },

    async connect(signal) {
      if (closed) throw closedError();
      const previous = link;
      link = undefined;
      // Closed, not lost: a replaced link is not reported as a loss of the new one.
      if (previous) void previous.close(notConnected('the previous connection was replaced'));
      const current = await openStream(signal);
      if (closed) {
        void current.close();
        throw closedError();
      }
      let established = false;
      link = current;
      current.onMessage((topic, payload, packet) => {
        if (echoActive && echoFilter?.isEcho(topic, payload)) {
          noteEcho(topic);
          return;
        }
        deliverInbound(topic, payload, packet);
      });
      current.onLoss((reason) => {
        if (link === current) link = undefined;
        if (!established || closed) return;
        try {
          disconnectHandler?.(reason);
        } catch (err) {
          logger.error({ err }, 'disconnect_handler_failed');
        }
      });
      // The broker may have closed the socket already (kick right after CONNACK).
      if (current.connected) await subscribeInbound(current, 0);
      if (!current.connected) {
        // Lost while subscribing: report it as a failed attempt, the supervisor retries.
        if (link === current) link = undefined;
        throw notConnected(`the connection to ${endpoint} closed right after CONNACK`);
      }
      if (signal.aborted) {
        link = undefined;
        void current.close();
        throw aborted();
      }
      established = true;
    },

    publish(message: OutboundMessage) {
      if (closed) return Promise.reject(closedError());
      const current = link;
      if (current === undefined || !current.connected) {
        return Promise.reject(notConnected(`not connected to ${endpoint}`));
      }
      const mapped = mapOutbound(message);
      if (mapped !== null && 'error' in mapped) {
        const err = mapped.error;
        return Promise.reject(
          new GatewayError(ErrorCodes.PROVIDER_REJECTED, errorMessage(err), { retryable: false, cause: err }),
        );
      }
      const remote = mapped?.remote;
      const rule = mapped?.rule;
      const qos: 0 | 1 | 2 = rule?.qos ?? message.qos;
      const retain = rule === undefined || rule.retain === 'as-published' ? message.retain : rule.retain;
      if (remote === undefined) {
        return Promise.reject(
          new GatewayError(
            ErrorCodes.PROVIDER_REJECTED,
            `no outbound rule of integration ${context.integration.name} matches the topic ${message.topic}`,
            { retryable: false, details: { topic: message.topic } },
          ),
        );
      }
      const size = packetSize(remote, message.payload, qos);
      const maxPayload = effectiveMaxPayload();
      if (
        message.payload.length > maxPayload ||
        size > (current.maxPacketSize ?? Infinity) ||
        size - 5 > MQTT_MAX_REMAINING_LENGTH
      ) {
        return Promise.reject(
          new GatewayError(
            ErrorCodes.PROVIDER_TOO_LARGE,
            `a ${message.payload.length}-byte payload is larger than ${endpoint} accepts (${Math.min(maxPayload, current.maxPacketSize ?? Infinity)} bytes)`,
            {
              retryable: false,
              details: {
                payloadBytes: message.payload.length,
                packetBytes: size,
                maxPayloadBytes: maxPayload,
              },
            },
          ),
        );
      }

      const target = remote;
      // Before the publish, so an echo that overtakes our PUBACK is still recognised.
      if (mapped?.echoes && echoActive && echoFilter !== undefined) {
        echoFilter.sent(target, message.payload);
        if (bridgedLink && echoFilter.matched === 0 && echoFilter.unmatched >= ECHO_PROBE) {
          echoActive = false;
          logger.info({ endpoint, unmatched: echoFilter.unmatched }, 'echo_filter_off');
        }
      }
      return current.publish(target, message.payload, { qos, retain });
    },

    onCommand(handler) {
      commandHandler = handler;
    },

    onDisconnect(handler) {
      disconnectHandler = handler;
    },

    async testConnection(signal): Promise<ConnectionTestResult> {
      const testId = `${clientId}-test`;
      const details = { url: endpoint, protocolVersion: settings.protocolVersion, clientId: testId };
      const started = performance.now();
      try {
        const opened = await open(testId, 'test', signal);
        await opened.close();
        return { ok: true, latencyMs: opened.latencyMs, details };
      } catch (err) {
        return failedConnectionTest(started, details, toGatewayError(err, ErrorCodes.PROVIDER_CONNECT));
      }
    },

    /**
     * A plain broker has no device registry. What it can hold for us is retained state on the
     * inbound filters (desired state, configuration): a short-lived extra client subscribes,
     * collects the retained messages that a fresh subscription brings for one second, and hands
     * each to the command handler like live inbound traffic. Live (non-retained) messages in that
     * second are ignored here — the streaming connection delivers those.
     */
    async import(signal): Promise<SyncResult> {
      if (settings.inbound.length === 0) {
        return {
          recordsProcessed: 0,
          recordsSucceeded: 0,
          recordsFailed: 0,
          details: { note: 'a plain MQTT broker has no device registry; nothing to import' },
        };
      }
      const opened = await open(`${clientId}-import`, 'import', signal);
      let seen = 0;
      let delivered = 0;
      try {
        opened.onMessage((topic, payload, packet) => {
          if (!packet.retain) return;
          seen++;
          if (deliverInbound(topic, payload, packet)) delivered++;
        });
        await subscribeInbound(opened, 0);
        await new Promise<void>((resolve) => {
          const timer = setTimeout(done, IMPORT_WINDOW_MS);
          function done() {
            clearTimeout(timer);
            signal.removeEventListener('abort', done);
            resolve();
          }
          signal.addEventListener('abort', done, { once: true });
        });
      } finally {
        await opened.close();
      }
      if (signal.aborted) throw aborted();
      return {
        recordsProcessed: seen,
        recordsSucceeded: delivered,
        recordsFailed: seen - delivered,
        details: {
          note: 'retained messages on the inbound filters, delivered to local topics',
          filters: settings.inbound.map((r) => r.remote),
        },
      };
    },

    /** Nothing to push beyond the queue: device state reaches the broker through the forwarder. */
    export(): Promise<SyncResult> {
      return Promise.resolve({
        recordsProcessed: 0,
        recordsSucceeded: 0,
        recordsFailed: 0,
        details: {
          note: 'a plain MQTT broker takes device state as queued messages; nothing else to export',
        },
      });
    },

    async bidirectionalSync(signal): Promise<SyncResult> {
      const imported = await provider.import(signal);
      return combineSyncResults(imported, await provider.export(signal));
    },

    async close() {
      if (closed) return;
      closed = true;
      const current = link;
      link = undefined;
      if (current === undefined) return;
      await current.close(closedError());
    },
  };
  return provider;
}

function aborted(): GatewayError {
  return new GatewayError(ErrorCodes.ABORTED, 'the connection attempt was aborted', { retryable: false });
}

function closedError(): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_CLOSED, 'the provider was closed', { retryable: true });
}

function notConnected(message: string): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_NOT_CONNECTED, message, { retryable: true });
}
