import { readFileSync } from 'node:fs';
import {
  connect,
  type IClientOptions,
  type IConnackPacket,
  type IPublishPacket,
  type MqttClient,
  type Packet,
} from 'mqtt';
import { ErrorCodes, GatewayError, errorMessage, type ErrorCode } from '../../errors.js';
import { matchTopic } from '../../common/topic-match.js';
import { expandTemplate } from '../../common/topic-template.js';
import type { Logger } from '../../logger.js';
import { redactUrl } from '../../logger.js';
import type {
  ConnectionTestResult,
  InboundMessage,
  OutboundMessage,
  Provider,
  ProviderContext,
  SyncResult,
} from '../provider.js';
import { createEchoFilter } from './echo-filter.js';
import { mqttSettingsSchema, type MqttSettings } from './settings.js';

/** MQTT's own ceiling: the largest Remaining Length a packet can declare (256 MiB − 1). */
const MQTT_MAX_REMAINING_LENGTH = 268_435_455;
const DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024 * 1024;
/**
 * Unacknowledged publishes when the server does not announce a Receive Maximum (3.1.1 has no
 * such limit): the packet id space. The integration's `queue.inflight` (default 100) is then
 * the window, as configured, instead of being cut to a guessed 100.
 */
const DEFAULT_MAX_INFLIGHT = 65_535;
/** How long `import` listens for the retained messages a fresh subscription brings. */
const IMPORT_WINDOW_MS = 1000;
/** Bound on a graceful DISCONNECT at close(). */
const CLOSE_TIMEOUT_MS = 2000;

/** PUBACK reason codes that say "not now" rather than "never": the row is retried. */
const RETRYABLE_PUBACK_CODES = new Set([
  0x89, // Server busy
  0x91, // Packet Identifier in use
  0x97, // Quota exceeded
]);

/** CONNACK codes that mean the credentials or the policy refused us (3.1.1 and 5). */
const AUTH_CONNACK_CODES = new Set([4, 5, 0x86, 0x87, 0x8a, 0x8c]);

interface PendingPublish {
  fail(err: GatewayError): void;
  /** performance.now() after which the publish counts as unacknowledged */
  deadline: number;
  topic: string;
}

/** How often a link looks for publishes past their deadline (one timer per link, not per message). */
const TIMEOUT_SWEEP_MS = 250;

/** One established (or establishing) connection and what hangs on it. */
interface Link {
  client: MqttClient;
  established: boolean;
  lost: boolean;
  /** Why it went down, when mqtt.js or the server said so. */
  lastError: Error | undefined;
  pending: Set<PendingPublish>;
  maxInflight: number;
  /** MQTT 5 Maximum Packet Size from CONNACK. */
  maxPacketSize: number | undefined;
  sweep: NodeJS.Timeout | undefined;
}

interface Opened {
  client: MqttClient;
  connack: IConnackPacket;
  latencyMs: number;
  /** The error mqtt.js reported last on this client; read it when the link closes. */
  lastError(): Error | undefined;
}

type Purpose = 'stream' | 'test' | 'import';

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
/** (device, topic) pairs whose outbound mapping is remembered; the memo starts over when full. */
const OUTBOUND_MEMO_TOPICS = 10_000;

const noTrace = (): void => {};

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
  let outboundMemo = new Map<string, OutboundMapping>();
  const mapOutbound = (message: OutboundMessage): OutboundMapping => {
    const key = `${message.deviceId}\u0000${message.topic}`;
    let mapped = outboundMemo.get(key);
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
    if (outboundMemo.size >= OUTBOUND_MEMO_TOPICS) outboundMemo = new Map();
    outboundMemo.set(key, mapped);
    return mapped;
  };
  const logger: Logger = context.logger.child({ component: 'mqtt' });
  const clientId = settings.clientId ?? `${context.gatewayId}-${context.integration.name}`;
  const endpoint = redactUrl(settings.url);
  const configuredMaxPayload = settings.maxPayloadSize ?? DEFAULT_MAX_PAYLOAD_BYTES;

  let commandHandler: ((message: InboundMessage) => void) | undefined;
  let disconnectHandler: ((error: Error) => void) | undefined;
  let link: Link | undefined;
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

  function tlsOptions(): Pick<IClientOptions, 'ca' | 'cert' | 'key'> {
    const read = (what: string, path: string | undefined) => {
      if (path === undefined) return undefined;
      try {
        return readFileSync(path);
      } catch (err) {
        throw new GatewayError(
          ErrorCodes.PROVIDER_CONNECT,
          `cannot read the ${what} file ${path} (${(err as NodeJS.ErrnoException).code ?? errorMessage(err)}); fix settings.${what} of integration ${context.integration.name}`,
          { retryable: false, cause: err, details: { file: path } },
        );
      }
    };
    return { ca: read('ca', settings.ca), cert: read('cert', settings.cert), key: read('key', settings.key) };
  }

  /** Opens one client and resolves at CONNACK; every failure ends the client before rejecting. */
  function openClient(id: string, purpose: Purpose, signal: AbortSignal, bridge = false): Promise<Opened> {
    if (signal.aborted) return Promise.reject(aborted());
    const log = logger.child({ clientId: id, purpose });
    const options: IClientOptions = {
      protocolVersion: settings.protocolVersion,
      // Connected below, once the bridge flag is in place.
      manualConnect: true,
      clientId: id,
      username: settings.username,
      password: settings.password,
      // mqtt.js takes seconds; a sub-second setting must not become 0 (= keepalive off).
      keepalive: settings.keepalive === 0 ? 0 : Math.max(1, Math.ceil(settings.keepalive / 1000)),
      connectTimeout: settings.connectTimeout,
      reconnectPeriod: 0,
      clean: settings.cleanSession,
      queueQoSZero: false,
      resubscribe: false,
      rejectUnauthorized: settings.rejectUnauthorized,
      ...tlsOptions(),
      ...(settings.servername === undefined ? {} : { servername: settings.servername }),
      // mqtt.js traces every packet through the `debug` package, which allocates its arguments
      // even when off: a sixth of what the gateway allocated per message (measured), so more
      // young-generation GC pauses. DEBUG=mqttjs* still turns its trace on.
      ...(process.env.DEBUG ? {} : { log: noTrace }),
    };
    log.info({ endpoint, protocolVersion: settings.protocolVersion, bridge }, 'connect_started');
    const started = performance.now();

    return new Promise<Opened>((resolve, reject) => {
      let settled = false;
      let lastError: Error | undefined;
      const client = connect(settings.url, options);
      if (bridge) setBridgeFlag(client);
      client.connect();
      // Without an 'error' listener mqtt.js would throw; errors are read when the link closes.
      client.on('error', (err) => {
        lastError = err;
      });
      client.on('disconnect', (packet) => {
        lastError = new Error(`the server sent DISCONNECT (reason code ${packet.reasonCode ?? 0})`);
      });

      const safety = setTimeout(
        () =>
          fail(
            new GatewayError(
              ErrorCodes.PROVIDER_TIMEOUT,
              `no CONNACK from ${endpoint} within ${settings.connectTimeout} ms`,
              {
                retryable: true,
              },
            ),
          ),
        settings.connectTimeout + 1000,
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
        fail(classifyConnectError(lastError, endpoint));
      }
      client.on('close', onCloseBeforeConnack);
      client.once('connect', (connack) => {
        if (settled) return;
        finish();
        const latencyMs = Math.round(performance.now() - started);
        log.info(
          {
            latencyMs,
            receiveMaximum: connack.properties?.receiveMaximum,
            maximumPacketSize: connack.properties?.maximumPacketSize,
          },
          'connect_completed',
        );
        resolve({ client, connack, latencyMs, lastError: () => lastError });
      });
    });
  }

  /**
   * The stream connection: with the bridge flag when configured. Under `auto`, a broker that
   * refuses the flag (CONNACK 1, or closing the connection before CONNACK) is tried again at
   * once without it, and the flag stays off for this provider; the echo filter still guards.
   */
  async function openStream(signal: AbortSignal): Promise<Opened> {
    bridgedLink = false;
    if (!bridgeFlag) return openClient(clientId, 'stream', signal);
    try {
      const opened = await openClient(clientId, 'stream', signal, true);
      bridgedLink = true;
      return opened;
    } catch (err) {
      const refusal =
        err instanceof GatewayError &&
        (err.details?.connackCode === CONNACK_BAD_PROTOCOL || err.details?.beforeConnack === true);
      if (settings.bridgeMode !== 'auto' || !refusal || signal.aborted) throw err;
      const opened = await openClient(clientId, 'stream', signal);
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

  function subscribeInbound(client: MqttClient, retainHandling: 0 | 1 | 2): Promise<void> {
    if (settings.inbound.length === 0) return Promise.resolve();
    const v5 = settings.protocolVersion === 5;
    const map: Record<string, { qos: 0 | 1 | 2; nl?: boolean; rap?: boolean; rh?: number }> = {};
    for (const rule of settings.inbound) {
      // Retain As Published keeps retained desired state retained on the local side.
      map[rule.remote] = v5
        ? { qos: rule.qos, nl: settings.noLocal, rap: true, rh: retainHandling }
        : { qos: rule.qos };
    }
    return new Promise((resolve) => {
      client.subscribe(map, (err, granted) => {
        const refused = (granted ?? []).filter((g) => (g.qos & 0x80) !== 0).map((g) => g.topic);
        if (err || refused.length > 0) {
          // Outbound still works without the inbound subscription, so the link stays up.
          logger.warn({ err: err?.message, refused }, 'subscribe_failed');
          context.activity?.record({
            integrationId: context.integration.id,
            activityType: 'subscribe',
            direction: 'incoming',
            status: 'failed',
            errorCode: ErrorCodes.PROVIDER_REJECTED,
            errorMessage: err ? err.message : `the broker refused the subscriptions ${refused.join(', ')}`,
            metadata: { filters: Object.keys(map) },
          });
        }
        resolve();
      });
    });
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

  function endClient(client: MqttClient): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        client.end(true);
        resolve();
      }, CLOSE_TIMEOUT_MS);
      // A graceful end waits for unacknowledged publishes; those are abandoned here (the queue
      // still holds them), so force when any are outstanding.
      const force = !client.connected || Object.keys(client.outgoing).length > 0;
      client.end(force, () => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  function dropLink(current: Link, err: GatewayError): void {
    clearInterval(current.sweep);
    current.sweep = undefined;
    for (const pending of [...current.pending]) pending.fail(err);
    current.pending.clear();
  }

  function sweepTimeouts(current: Link): void {
    const t = performance.now();
    for (const pending of current.pending) {
      if (pending.deadline > t) continue;
      pending.fail(
        new GatewayError(
          ErrorCodes.PROVIDER_TIMEOUT,
          `no acknowledgement from ${endpoint} within ${settings.publishTimeout} ms`,
          { retryable: true, details: { topic: pending.topic } },
        ),
      );
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
      if (previous) {
        // Marked lost first, so its close is not reported as a loss of the new link.
        previous.lost = true;
        dropLink(previous, notConnected('the previous connection was replaced'));
        previous.client.end(true);
      }
      const opened = await openStream(signal);
      const { client, connack } = opened;
      if (closed) {
        client.end(true);
        throw closedError();
      }
      const current: Link = {
        client,
        established: false,
        lost: false,
        lastError: undefined,
        pending: new Set(),
        maxInflight: connack.properties?.receiveMaximum ?? DEFAULT_MAX_INFLIGHT,
        maxPacketSize: connack.properties?.maximumPacketSize,
        sweep: undefined,
      };
      current.sweep = setInterval(
        () => sweepTimeouts(current),
        Math.min(TIMEOUT_SWEEP_MS, settings.publishTimeout),
      );
      current.sweep.unref();
      link = current;
      client.on('message', (topic, payload, packet) => {
        if (echoActive && echoFilter?.isEcho(topic, payload)) {
          noteEcho(topic);
          return;
        }
        deliverInbound(topic, payload, packet);
      });
      const onLost = () => {
        if (current.lost) return;
        current.lost = true;
        const reason = opened.lastError() ?? new Error('the connection closed');
        dropLink(current, notConnected(`the connection was lost: ${reason.message}`));
        if (link === current) link = undefined;
        if (!current.established || closed) return;
        logger.warn({ err: reason.message }, 'connection_lost');
        try {
          disconnectHandler?.(
            new GatewayError(
              ErrorCodes.PROVIDER_CONNECT,
              `the connection to ${endpoint} was lost: ${reason.message}`,
              {
                retryable: true,
                cause: reason,
              },
            ),
          );
        } catch (err) {
          logger.error({ err }, 'disconnect_handler_failed');
        }
      };
      client.on('close', onLost);
      // The broker may have closed the socket already (kick right after CONNACK).
      if (!client.connected) onLost();
      else await subscribeInbound(client, 0);
      if (current.lost) {
        // Lost while subscribing: report it as a failed attempt, the supervisor retries.
        throw notConnected(`the connection to ${endpoint} closed right after CONNACK`);
      }
      if (signal.aborted) {
        current.lost = true;
        link = undefined;
        client.end(true);
        throw aborted();
      }
      current.established = true;
    },

    publish(message: OutboundMessage) {
      if (closed) return Promise.reject(closedError());
      const current = link;
      if (current === undefined || current.lost || !current.client.connected) {
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
      return new Promise<void>((resolve, reject) => {
        let done = false;
        const settle = (err: GatewayError | undefined) => {
          if (done) return;
          done = true;
          current.pending.delete(pending);
          if (err) reject(err);
          else resolve();
        };
        const pending: PendingPublish = {
          fail: (err) => settle(err),
          deadline: performance.now() + settings.publishTimeout,
          topic: target,
        };
        current.pending.add(pending);
        current.client.publish(target, message.payload, { qos, retain }, (err) => {
          settle(err ? classifyPublishError(err, endpoint, target) : undefined);
        });
      });
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
        const opened = await openClient(testId, 'test', signal);
        await endClient(opened.client);
        return { ok: true, latencyMs: opened.latencyMs, details };
      } catch (err) {
        const e = err instanceof GatewayError ? err : classifyConnectError(err as Error, endpoint);
        return {
          ok: false,
          latencyMs: Math.round(performance.now() - started),
          details,
          error: { code: e.code, message: e.message },
        };
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
      const opened = await openClient(`${clientId}-import`, 'import', signal);
      let seen = 0;
      let delivered = 0;
      try {
        opened.client.on('message', (topic, payload, packet) => {
          if (!packet.retain) return;
          seen++;
          if (deliverInbound(topic, payload, packet)) delivered++;
        });
        await subscribeInbound(opened.client, 0);
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
        await endClient(opened.client);
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
      const exported = await provider.export(signal);
      return {
        recordsProcessed: imported.recordsProcessed + exported.recordsProcessed,
        recordsSucceeded: imported.recordsSucceeded + exported.recordsSucceeded,
        recordsFailed: imported.recordsFailed + exported.recordsFailed,
        details: { import: imported.details, export: exported.details },
      };
    },

    async close() {
      if (closed) return;
      closed = true;
      const current = link;
      link = undefined;
      if (current === undefined) return;
      current.lost = true;
      dropLink(current, closedError());
      await endClient(current.client);
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

/**
 * Sets the bridge flag (0x80) in the protocol level of this client's CONNECT: mqtt-packet writes
 * it from the packet's `bridgeMode`, which mqtt.js has no option for. The provider's tests
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
function classifyConnectError(err: Error | undefined, endpoint: string): GatewayError {
  if (err === undefined) {
    return new GatewayError(ErrorCodes.PROVIDER_CONNECT, `${endpoint} closed the connection before CONNACK`, {
      retryable: true,
      details: { beforeConnack: true },
    });
  }
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'number') {
    const auth = AUTH_CONNACK_CODES.has(code);
    const errorCode: ErrorCode = auth ? ErrorCodes.PROVIDER_AUTH : ErrorCodes.PROVIDER_CONNECT;
    return new GatewayError(
      errorCode,
      `${endpoint} refused the connection: ${err.message} (CONNACK ${code})${auth ? '; check username, password, client certificate and the broker ACL' : ''}`,
      // Retrying cannot fix bad credentials; the supervisor still retries with backoff in case
      // the broker side is fixed.
      { retryable: false, cause: err, details: { connackCode: code } },
    );
  }
  const text = typeof code === 'string' ? code : '';
  if (
    /CERT|SSL|TLS|SELF_SIGNED|UNABLE_TO|HOSTNAME|ERR_TLS/i.test(text) ||
    /TLS|certificate/i.test(err.message)
  ) {
    return new GatewayError(
      ErrorCodes.PROVIDER_CONNECT,
      `TLS with ${endpoint} failed: ${err.message}; check settings.ca, settings.servername and the broker certificate`,
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

function classifyPublishError(err: Error, endpoint: string, topic: string): GatewayError {
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'number' && code >= 0x80) {
    return new GatewayError(
      ErrorCodes.PROVIDER_REJECTED,
      `${endpoint} rejected the message on ${topic}: ${err.message} (reason code 0x${code.toString(16)})`,
      { retryable: RETRYABLE_PUBACK_CODES.has(code), cause: err, details: { reasonCode: code, topic } },
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
