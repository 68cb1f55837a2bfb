import { createPrivateKey, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { ErrorCodes, GatewayError, errorMessage } from '../../errors.js';
import type { Logger } from '../../logger.js';
import {
  combineSyncResults,
  failedConnectionTest,
  type ConnectionTestResult,
  type InboundMessage,
  type OutboundMessage,
  type Provider,
  type ProviderContext,
  type ProviderEvent,
  type ProviderLimits,
  type SyncResult,
} from '../provider.js';
import { openMqttLink, type MqttLink } from '../mqtt-link.js';
import { createPacer, type Pacer } from './pacer.js';
import { awsIotSettingsSchema, type AwsIotSettings } from './settings.js';
import { createShadowClient, type JsonObject, type ShadowClient } from './shadow.js';
import {
  awsTopicProblem,
  createCommandRoute,
  createThingNames,
  fill,
  parseLocalTopic,
  shadowFilters,
  THING_NAME,
} from './topics.js';

/** AWS IoT Core's message broker quotas (cloud-protocols.md §1.2), not adjustable. */
export const AWS_MAX_PAYLOAD_BYTES = 128 * 1024;
export const AWS_PUBLISHES_PER_SECOND = 100;
export const AWS_MAX_SUBSCRIPTIONS = 50;
const AWS_FILTERS_PER_SUBSCRIBE = 8;
/** At most 10 shadow requests in flight per connection (§1.3: the 11th gets 429). */
export const AWS_SHADOW_INFLIGHT = 10;
/** One CONNECT per second per client id (§1.2). */
const AWS_CONNECT_INTERVAL_MS = 1000;
/** Unacknowledged QoS 1 publishes per client (§1.2), when CONNACK names no Receive Maximum. */
const AWS_MAX_INFLIGHT = 100;
const ALPN_MQTT = 'x-amzn-mqtt-ca';

/** Why a session exists: the stream link, a connection test, or a sync while the stream is down. */
type Purpose = 'stream' | 'test' | 'sync';

/** One MQTT connection to the data endpoint and what hangs on it. */
interface Session {
  link: MqttLink;
  clientId: string;
  purpose: Purpose;
  shadow: ShadowClient;
  pacer: Pacer;
  established: boolean;
  /** Filters the broker refused at SUBACK. */
  refused: string[];
}

/**
 * The `aws-iot` provider (cloud-protocols.md §1): one MQTT connection as the gateway's thing,
 * mutual TLS on 8883 with SNI or on 443 with ALPN `x-amzn-mqtt-ca`. Telemetry goes to a topic
 * template; `devices/{id}/state` updates the child thing's shadow (classic or named), correlated
 * by clientToken; deltas and get/accepted come back as retained `devices/{id}/desired`; command
 * topics come back as `devices/{id}/commands/{name}` and their responses go out again.
 *
 * AWS's quotas are declared (limits, maxPayloadBytes, maxInflight) and also kept here: every
 * PUBLISH on a connection waits for a slot of a 100/s pacer, because shadow gets and syncs add
 * publishes the forwarder does not see; at most 10 shadow requests wait for an answer at once;
 * the subscriptions use `+` for thing names, so their number does not grow with the children.
 *
 * One `connect` is one attempt; the connection supervisor owns reconnects (`limits` tells it to
 * wait 1 s between CONNECTs of one client id). mqtt.js's offline queue is never used: the SQLite
 * queue is the source of truth.
 */
export function createAwsIotProvider(context: ProviderContext): Provider {
  const settings: AwsIotSettings = awsIotSettingsSchema.parse(context.integration.settings);
  const logger: Logger = context.logger.child({ component: 'aws-iot' });
  const name = context.integration.name;
  const clientId = settings.clientId ?? context.gatewayId;
  const endpoint = `${settings.endpoint}:${settings.port}`;
  const alpn = settings.alpn ?? settings.port === 443;
  const things = createThingNames(settings.thingName, context.gatewayId);
  const commands = settings.commands.map((rule) => createCommandRoute(rule, context.gatewayId));
  const filters = [...new Set([...shadowFilters(settings.shadowName), ...commands.map((c) => c.filter)])];
  const limits: ProviderLimits = {
    maxPublishRate: { perSecond: AWS_PUBLISHES_PER_SECOND, scope: 'connection' },
    minReconnectDelayMs: AWS_CONNECT_INTERVAL_MS,
  };

  let commandHandler: ((message: InboundMessage) => void) | undefined;
  let disconnectHandler: ((error: Error) => void) | undefined;
  let stream: Session | undefined;
  let closed = false;
  /** When each client id last sent CONNECT (performance.now()). */
  const lastConnect = new Map<string, number>();

  const report = (event: ProviderEvent) => {
    try {
      context.report?.(event);
    } catch (err) {
      logger.error({ err }, 'report_failed');
    }
  };

  logger.info(
    { endpoint, clientId, protocolVersion: settings.protocolVersion, filters: filters.length },
    'client_initialized',
  );

  /** Reads and checks the PEM files; every problem is one sentence naming the setting to fix. */
  function credentials(): { cert: Buffer; key: Buffer; ca: Buffer | undefined } {
    const read = (what: 'cert' | 'key' | 'ca', path: string) => {
      try {
        return readFileSync(path);
      } catch (err) {
        throw new GatewayError(
          ErrorCodes.PROVIDER_CONNECT,
          `cannot read the ${what} file ${path} (${(err as NodeJS.ErrnoException).code ?? errorMessage(err)}); fix settings.${what} of integration ${name}`,
          { retryable: false, cause: err, details: { file: path, setting: what } },
        );
      }
    };
    const cert = read('cert', settings.cert);
    const key = read('key', settings.key);
    const ca = settings.ca === undefined ? undefined : read('ca', settings.ca);
    let x509: X509Certificate;
    try {
      x509 = new X509Certificate(cert);
    } catch (err) {
      throw badSetting(
        'cert',
        `${settings.cert} is not a PEM certificate; give the thing certificate AWS IoT issued`,
        err,
      );
    }
    let privateKey;
    try {
      privateKey = createPrivateKey(key);
    } catch (err) {
      throw badSetting(
        'key',
        `${settings.key} is not a PEM private key; give the key of the thing certificate`,
        err,
      );
    }
    if (!x509.checkPrivateKey(privateKey)) {
      throw badSetting(
        'key',
        `the private key ${settings.key} does not belong to the certificate ${settings.cert}; give the key made with that certificate`,
      );
    }
    return { cert, key, ca };
  }

  function badSetting(setting: string, message: string, cause?: unknown): GatewayError {
    return new GatewayError(
      ErrorCodes.PROVIDER_CONNECT,
      `${message} (integration ${name}, settings.${setting})`,
      {
        retryable: false,
        cause,
        details: { setting },
      },
    );
  }

  /** A desired state or a command from AWS, handed to the gateway on its local topic. */
  function deliver(topic: string, payload: Buffer, retain: boolean): boolean {
    if (commandHandler === undefined) {
      logger.warn({ topic }, 'inbound_no_handler');
      return false;
    }
    try {
      commandHandler({ topic, payload, qos: 1, retain });
      logger.debug({ topic, retain }, 'inbound_delivered');
      return true;
    } catch (err) {
      logger.error({ err, topic }, 'inbound_handler_failed');
      return false;
    }
  }

  function deliverDesired(thingName: string, desired: JsonObject): boolean {
    const deviceId = things.deviceId(thingName);
    if (deviceId === undefined) {
      logger.debug({ thingName }, 'inbound_unknown_thing');
      return false;
    }
    return deliver(`devices/${deviceId}/desired`, Buffer.from(JSON.stringify(desired)), true);
  }

  function onInbound(session: Session, topic: string, payload: Buffer): void {
    if (topic.startsWith('$aws/things/')) {
      const desired = session.shadow.onMessage(topic, payload);
      // Our own gets (sync, conflict checks) deliver where they are made; a test delivers nothing.
      if (desired && !desired.ours && session.purpose !== 'test')
        deliverDesired(desired.thingName, desired.desired);
      return;
    }
    if (session.purpose === 'test') return;
    for (const route of commands) {
      const m = route.match(topic);
      if (m === undefined) continue;
      const deviceId = things.deviceId(m.thingName);
      if (deviceId === undefined) {
        logger.debug({ topic }, 'inbound_unknown_thing');
        return;
      }
      deliver(`devices/${deviceId}/commands/${m.name}`, payload, false);
      return;
    }
    logger.debug({ topic }, 'inbound_unmapped');
  }

  /** One PUBLISH on a session, paced to the quota; AWS's refusals explained. */
  async function send(session: Session, topic: string, payload: Buffer, qos: 0 | 1): Promise<void> {
    await session.pacer.slot();
    if (!session.link.connected) throw notConnected(`not connected to ${endpoint}`);
    try {
      await session.link.publish(topic, payload, { qos });
    } catch (err) {
      const e = asGatewayError(err);
      // The link says "rejected, 0x87"; for AWS that is the policy, which the operator can fix.
      if (e.details?.reasonCode === 0x87) {
        throw new GatewayError(
          ErrorCodes.PROVIDER_AUTH,
          `the AWS IoT policy of ${session.clientId} does not allow publishing to ${topic} (PUBACK 0x87); allow iot:Publish on it or change the topic template`,
          { retryable: false, cause: e, details: { reasonCode: 0x87, topic } },
        );
      }
      throw e;
    }
  }

  /** Opens one connection, resolves once CONNACK came and the response topics are subscribed. */
  async function openSession(id: string, purpose: Purpose, signal: AbortSignal): Promise<Session> {
    if (signal.aborted) throw aborted();
    const { cert, key, ca } = credentials();
    // AWS refuses a second CONNECT of one client id within a second (§1.2): the sync and test
    // connections, which the supervisor does not pace, wait here.
    const since = performance.now() - (lastConnect.get(id) ?? -Infinity);
    if (since < AWS_CONNECT_INTERVAL_MS) await delay(AWS_CONNECT_INTERVAL_MS - since, signal);
    let link: MqttLink;
    try {
      link = await openMqttLink(
        {
          url: `mqtts://${settings.address ?? settings.endpoint}:${settings.port}`,
          clientId: id,
          protocolVersion: settings.protocolVersion,
          logger,
          // SNI is required (§1.1), and the certificate must name the endpoint even via `address`.
          tls: {
            cert,
            key,
            ...(ca === undefined ? {} : { ca }),
            servername: settings.endpoint,
            ...(alpn ? { alpnProtocols: [ALPN_MQTT] } : {}),
            rejectUnauthorized: true,
          },
          keepaliveMs: settings.keepalive,
          connectTimeoutMs: settings.connectTimeout,
          publishTimeoutMs: settings.publishTimeout,
          quotaRetryAfterMs: 1000,
          cleanSession: true,
          owner: `integration ${name}`,
          purpose,
        },
        signal,
      );
    } catch (err) {
      throw explainConnectError(asGatewayError(err), id);
    } finally {
      // Counted from the end of the attempt: AWS saw the CONNECT before then, so a second
      // second from here is a second at AWS too, whatever the handshakes took.
      lastConnect.set(id, performance.now());
    }
    const session: Session = {
      link,
      clientId: id,
      purpose,
      pacer: createPacer(AWS_PUBLISHES_PER_SECOND),
      established: false,
      refused: [],
      shadow: createShadowClient({
        shadowName: settings.shadowName,
        publish: (topic, payload) => send(session, topic, payload, 1),
        maxInflight: AWS_SHADOW_INFLIGHT,
        timeoutMs: settings.shadowTimeout,
        maxConflictRetries: settings.maxConflictRetries,
        onConflict: ({ thingName, clientToken, outcome }) => {
          logger.info({ thingName, clientToken, outcome, clientId: id }, 'shadow_conflict');
          report({
            activityType: 'shadow_conflict',
            direction: 'outgoing',
            status: outcome === 'gave_up' ? 'failed' : 'success',
            metadata: { thingName, requestId: clientToken, outcome },
          });
        },
      }),
    };
    link.onMessage((topic, payload) => onInbound(session, topic, payload));
    link.onLoss((err) => {
      dropSession(session, notConnected(err.message));
      onSessionLost(session, err);
    });
    try {
      await subscribe(session);
    } catch (err) {
      await endSession(session);
      throw err;
    }
    if (signal.aborted) {
      await endSession(session);
      throw aborted();
    }
    return session;
  }

  /** The response and command topics, at most 8 filters per SUBSCRIBE (§1.2). */
  async function subscribe(session: Session): Promise<void> {
    for (let i = 0; i < filters.length; i += AWS_FILTERS_PER_SUBSCRIBE) {
      const chunk = filters.slice(i, i + AWS_FILTERS_PER_SUBSCRIBE);
      const { refused } = await session.link.subscribe(
        Object.fromEntries(chunk.map((f) => [f, { qos: 1 as const }])),
      );
      if (refused.length === 0) continue;
      session.refused.push(...refused);
      // The link still carries telemetry without these; the operator fixes the policy.
      logger.warn({ refused, clientId: session.clientId }, 'subscribe_refused');
      report({
        activityType: 'subscribe',
        direction: 'incoming',
        status: 'failed',
        errorCode: ErrorCodes.PROVIDER_REJECTED,
        errorMessage: `AWS IoT refused the subscriptions ${refused.join(', ')}; allow iot:Subscribe and iot:Receive on them in the policy of ${session.clientId}`,
        metadata: { refused, clientId: session.clientId },
      });
    }
  }

  function dropSession(session: Session, err: GatewayError): void {
    session.pacer.cancel(err);
    session.shadow.failAll(err);
  }

  function onSessionLost(session: Session, err: GatewayError): void {
    if (session.purpose !== 'stream') return;
    if (stream === session) stream = undefined;
    if (!session.established || closed) return;
    const takenOver = (err.cause as { reasonCode?: unknown } | undefined)?.reasonCode === 0x8e;
    try {
      disconnectHandler?.(
        takenOver
          ? new GatewayError(
              ErrorCodes.PROVIDER_CONNECT,
              `AWS IoT closed the connection because another client connected with the client id ${session.clientId}; give each gateway its own clientId`,
              { retryable: true, cause: err, details: { takenOver: true } },
            )
          : err,
      );
    } catch (e) {
      logger.error({ err: e }, 'disconnect_handler_failed');
    }
  }

  async function endSession(session: Session): Promise<void> {
    dropSession(session, closedError());
    await session.link.close(closedError());
  }

  /** The link's connect errors, said in AWS's terms: which setting or policy to look at. */
  function explainConnectError(err: GatewayError, id: string): GatewayError {
    if (err.code === ErrorCodes.ABORTED || err.code === ErrorCodes.PROVIDER_TIMEOUT) return err;
    const cause = err.cause instanceof Error ? err.cause : undefined;
    const explained = (code: GatewayError['code'], message: string, retryable: boolean) =>
      new GatewayError(code, message, { retryable, cause: err, details: err.details });
    if (cause === undefined) {
      return explained(
        ErrorCodes.PROVIDER_CONNECT,
        `${endpoint} closed the connection before CONNACK: the certificate may be inactive or unknown to AWS IoT, the policy may not allow iot:Connect for client id ${id}, or it connected less than 1 s ago`,
        true,
      );
    }
    const code = (cause as { code?: unknown }).code;
    if (typeof code === 'number') {
      if (code === 0x97 || code === 3) {
        return explained(
          ErrorCodes.PROVIDER_CONNECT,
          `AWS IoT refused the CONNECT of ${id}: too soon after the last one (1 per second per client id)`,
          true,
        );
      }
      if (code === 2 || code === 0x85) {
        return explained(
          ErrorCodes.PROVIDER_CONNECT,
          `AWS IoT refused the client id ${id} (CONNACK ${code}); use at most 128 bytes, not starting with $`,
          false,
        );
      }
      if (code === 4 || code === 5 || code === 0x86 || code === 0x87) {
        return explained(
          ErrorCodes.PROVIDER_AUTH,
          `AWS IoT did not authorise ${id} (CONNACK ${code}); attach a policy allowing iot:Connect for this client id to the certificate`,
          false,
        );
      }
      return err;
    }
    const text = typeof code === 'string' ? code : '';
    if (text === 'ERR_TLS_CERT_ALTNAME_INVALID') {
      return explained(
        ErrorCodes.PROVIDER_CONNECT,
        `the server certificate does not name ${settings.endpoint}; check settings.endpoint (aws iot describe-endpoint --endpoint-type iot:Data-ATS)`,
        false,
      );
    }
    if (/CERT|SELF_SIGNED|UNABLE_TO_VERIFY|UNABLE_TO_GET/i.test(text)) {
      return explained(
        ErrorCodes.PROVIDER_CONNECT,
        `the server certificate of ${settings.endpoint} is not trusted (${text}); set settings.ca to Amazon Root CA 1, or check settings.endpoint`,
        false,
      );
    }
    if (text === 'ENOTFOUND' || text === 'EAI_AGAIN') {
      return explained(
        ErrorCodes.PROVIDER_CONNECT,
        `cannot resolve ${settings.address ?? settings.endpoint}; check settings.endpoint (aws iot describe-endpoint --endpoint-type iot:Data-ATS) and DNS`,
        true,
      );
    }
    if (text === 'ECONNREFUSED') {
      return explained(
        ErrorCodes.PROVIDER_CONNECT,
        `nothing accepts connections on ${settings.address ?? settings.endpoint}:${settings.port}; check settings.endpoint and settings.port (8883, or 443)`,
        true,
      );
    }
    // OpenSSL alerts from the server (ERR_SSL_…_ALERT_…): it did not take our certificate.
    if (/^ERR_SSL_.*ALERT/.test(text) || text === 'ECONNRESET') {
      return explained(
        ErrorCodes.PROVIDER_CONNECT,
        `${settings.endpoint} refused the TLS handshake (${cause.message}); check that settings.cert is a registered, active AWS IoT certificate`,
        true,
      );
    }
    return err;
  }

  /** The stream link when it is up; otherwise a short-lived connection of its own (`-sync`). */
  async function withSession<T>(
    signal: AbortSignal,
    purpose: Purpose,
    run: (s: Session) => Promise<T>,
  ): Promise<T> {
    const current = stream;
    if (purpose === 'sync' && current && current.established && current.link.connected) return run(current);
    const session = await openSession(`${clientId}-${purpose}`, purpose, signal);
    try {
      return await run(session);
    } finally {
      await endSession(session);
    }
  }

  async function importDesired(session: Session, signal: AbortSignal): Promise<SyncResult> {
    const devices = context.knownDevices?.() ?? [];
    let succeeded = 0;
    let delivered = 0;
    let notFound = 0;
    const failures: { deviceId: string; code: string; message: string }[] = [];
    await Promise.all(
      devices.map(async (deviceId) => {
        if (signal.aborted) throw aborted();
        const thingName = things.thingName(deviceId);
        const started = performance.now();
        try {
          if (!THING_NAME.test(thingName)) throw invalidThing(deviceId, thingName);
          const got = await session.shadow.get(thingName);
          succeeded++;
          if (got.document === undefined) notFound++;
          else if (got.document.desired !== undefined && deliverDesired(thingName, got.document.desired))
            delivered++;
          report({
            activityType: 'shadow_get',
            direction: 'incoming',
            status: 'success',
            responseTimeMs: got.latencyMs,
            metadata: {
              deviceId,
              thingName,
              requestId: got.clientToken,
              found: got.document !== undefined,
              version: got.document?.version,
            },
          });
        } catch (err) {
          const e = asGatewayError(err);
          failures.push({ deviceId, code: e.code, message: e.message });
          report({
            activityType: 'shadow_get',
            direction: 'incoming',
            status: 'failed',
            responseTimeMs: Math.round(performance.now() - started),
            errorCode: e.code,
            errorMessage: e.message,
            metadata: { deviceId, thingName, requestId: e.details?.clientToken },
          });
        }
      }),
    );
    if (signal.aborted) throw aborted();
    return {
      recordsProcessed: devices.length,
      recordsSucceeded: succeeded,
      recordsFailed: failures.length,
      details: {
        delivered,
        notFound,
        shadow: settings.shadowName ?? 'classic',
        failures: failures.slice(0, 10),
      },
    };
  }

  async function exportReported(session: Session, signal: AbortSignal): Promise<SyncResult> {
    const state = context.reportedState?.() ?? new Map<string, Record<string, unknown>>();
    let succeeded = 0;
    let conflicts = 0;
    const failures: { deviceId: string; code: string; message: string }[] = [];
    await Promise.all(
      [...state].map(async ([deviceId, reported]) => {
        if (signal.aborted) throw aborted();
        const thingName = things.thingName(deviceId);
        const started = performance.now();
        try {
          if (!THING_NAME.test(thingName)) throw invalidThing(deviceId, thingName);
          const outcome = await session.shadow.updateReported(thingName, reported);
          succeeded++;
          conflicts += outcome.conflicts;
          report({
            activityType: 'shadow_update',
            direction: 'outgoing',
            status: 'success',
            responseTimeMs: Math.round(performance.now() - started),
            metadata: {
              deviceId,
              thingName,
              requestId: outcome.clientToken,
              version: outcome.version,
              conflicts: outcome.conflicts,
            },
          });
        } catch (err) {
          const e = asGatewayError(err);
          failures.push({ deviceId, code: e.code, message: e.message });
          report({
            activityType: 'shadow_update',
            direction: 'outgoing',
            status: 'failed',
            responseTimeMs: Math.round(performance.now() - started),
            errorCode: e.code,
            errorMessage: e.message,
            metadata: { deviceId, thingName, requestId: e.details?.clientToken },
          });
        }
      }),
    );
    if (signal.aborted) throw aborted();
    return {
      recordsProcessed: state.size,
      recordsSucceeded: succeeded,
      recordsFailed: failures.length,
      details: { conflicts, shadow: settings.shadowName ?? 'classic', failures: failures.slice(0, 10) },
    };
  }

  function invalidThing(deviceId: string, thingName: string): GatewayError {
    return new GatewayError(
      ErrorCodes.PROVIDER_REJECTED,
      `device ${deviceId} maps to the thing name "${thingName}", which AWS does not allow (1–128 of a-z A-Z 0-9 : _ -); change settings.thingName or the device id`,
      { retryable: false, details: { deviceId, thingName } },
    );
  }

  const provider: Provider = {
    get maxInflight() {
      return Math.min(stream?.link.maxInflight ?? AWS_MAX_INFLIGHT, AWS_MAX_INFLIGHT);
    },
    maxPayloadBytes: AWS_MAX_PAYLOAD_BYTES,
    limits,

    async connect(signal) {
      if (closed) throw closedError();
      const previous = stream;
      stream = undefined;
      if (previous) await endSession(previous);
      const session = await openSession(clientId, 'stream', signal);
      if (closed) {
        await endSession(session);
        throw closedError();
      }
      if (!session.link.connected)
        throw notConnected(`the connection to ${endpoint} closed right after CONNACK`);
      session.established = true;
      stream = session;
    },

    async publish(message: OutboundMessage) {
      if (closed) throw closedError();
      const session = stream;
      if (session === undefined || !session.link.connected)
        throw notConnected(`not connected to ${endpoint}`);
      const local = parseLocalTopic(message.topic);
      if (local.kind === 'other') {
        throw new GatewayError(
          ErrorCodes.PROVIDER_REJECTED,
          `the aws-iot provider maps devices/{id}/telemetry, devices/{id}/state and devices/{id}/commands/{name}/response; ${message.topic} has no AWS topic (integration ${name})`,
          { retryable: false, details: { topic: message.topic } },
        );
      }
      const thingName = things.thingName(local.deviceId);
      if (!THING_NAME.test(thingName)) throw invalidThing(local.deviceId, thingName);
      if (message.payload.length > AWS_MAX_PAYLOAD_BYTES) {
        throw new GatewayError(
          ErrorCodes.PROVIDER_TOO_LARGE,
          `a ${message.payload.length}-byte payload is larger than AWS IoT takes (${AWS_MAX_PAYLOAD_BYTES} bytes)`,
          {
            retryable: false,
            details: { payloadBytes: message.payload.length, maxPayloadBytes: AWS_MAX_PAYLOAD_BYTES },
          },
        );
      }
      const qos: 0 | 1 = message.qos === 0 ? 0 : 1;
      if (local.kind === 'state') {
        let patch: unknown;
        try {
          patch = JSON.parse(message.payload.toString('utf8'));
        } catch {
          patch = undefined;
        }
        if (typeof patch !== 'object' || patch === null || Array.isArray(patch)) {
          throw new GatewayError(
            ErrorCodes.PROVIDER_REJECTED,
            `the state of ${local.deviceId} is not a JSON object, so it cannot become the shadow's reported state`,
            { retryable: false, details: { topic: message.topic } },
          );
        }
        await session.shadow.updateReported(thingName, patch as JsonObject);
        return;
      }
      let topic: string;
      if (local.kind === 'telemetry') {
        const base = fill(settings.telemetryTopic, {
          thingName,
          deviceId: local.deviceId,
          gatewayId: context.gatewayId,
        });
        topic = local.stream === undefined ? base : `${base}/${local.stream}`;
      } else {
        const route = commands.find(
          (c) => c.takes(local.name) && c.response(thingName, local.name) !== undefined,
        );
        const target = route?.response(thingName, local.name);
        if (target === undefined) {
          throw new GatewayError(
            ErrorCodes.PROVIDER_REJECTED,
            `no command rule of integration ${name} has a responseTopic for the command ${local.name}; add one to settings.commands`,
            { retryable: false, details: { topic: message.topic } },
          );
        }
        topic = target;
      }
      const problem = awsTopicProblem(topic);
      if (problem !== undefined) {
        throw new GatewayError(
          ErrorCodes.PROVIDER_REJECTED,
          `the AWS topic ${topic} for ${message.topic} is ${problem}; shorten the template in the settings of integration ${name}`,
          { retryable: false, details: { topic } },
        );
      }
      await send(session, topic, message.payload, qos);
    },

    onCommand(handler) {
      commandHandler = handler;
    },

    onDisconnect(handler) {
      disconnectHandler = handler;
    },

    /** Endpoint, TLS, CONNACK, then a shadow round trip (a get of the gateway's own thing). */
    async testConnection(signal): Promise<ConnectionTestResult> {
      const details: Record<string, unknown> = {
        url: `mqtts://${settings.endpoint}:${settings.port}`,
        endpoint: settings.endpoint,
        port: settings.port,
        alpn: alpn ? ALPN_MQTT : undefined,
        clientId: `${clientId}-test`,
        protocolVersion: settings.protocolVersion,
      };
      const started = performance.now();
      try {
        return await withSession(signal, 'test', async (session) => {
          details.connectMs = session.link.latencyMs;
          details.refusedSubscriptions = session.refused.length > 0 ? session.refused : undefined;
          const got = await session.shadow.get(clientId);
          details.shadowRoundTripMs = got.latencyMs;
          details.shadowFound = got.document !== undefined;
          details.requestId = got.clientToken;
          return { ok: true, latencyMs: Math.round(performance.now() - started), details };
        });
      } catch (err) {
        return failedConnectionTest(started, details, asGatewayError(err));
      }
    },

    import(signal) {
      return withSession(signal, 'sync', (session) => importDesired(session, signal));
    },

    export(signal) {
      return withSession(signal, 'sync', (session) => exportReported(session, signal));
    },

    bidirectionalSync(signal) {
      return withSession(signal, 'sync', async (session) => {
        const imported = await importDesired(session, signal);
        return combineSyncResults(imported, await exportReported(session, signal));
      });
    },

    async close() {
      if (closed) return;
      closed = true;
      const session = stream;
      stream = undefined;
      if (session) await endSession(session);
    },
  };
  return provider;
}

function asGatewayError(err: unknown): GatewayError {
  return err instanceof GatewayError
    ? err
    : new GatewayError(ErrorCodes.PROVIDER_CONNECT, errorMessage(err), { retryable: true, cause: err });
}

function delay(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(aborted());
    };
    signal.addEventListener('abort', onAbort, { once: true });
  });
}

function aborted(): GatewayError {
  return new GatewayError(ErrorCodes.ABORTED, 'the operation was aborted', { retryable: false });
}

function closedError(): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_CLOSED, 'the provider was closed', { retryable: true });
}

function notConnected(message: string): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_NOT_CONNECTED, message, { retryable: true });
}
