import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { randomUUID } from 'node:crypto';
import type { IPublishPacket } from 'mqtt';
import { createBackoff } from '../../common/backoff.js';
import { createRateLimiter } from '../../common/rate-limiter.js';
import { ErrorCodes, GatewayError, errorMessage, toGatewayError } from '../../errors.js';
import type { Logger } from '../../logger.js';
import {
  combineSyncResults,
  failedConnectionTest,
  deviceUnavailable,
  throttled,
  type ConnectionTestResult,
  type InboundMessage,
  type OutboundMessage,
  type Provider,
  type ProviderContext,
  type ProviderEvent,
  type SyncResult,
} from '../provider.js';
import { hubUnreachable, openDeviceLink, type DeviceLink } from './device-link.js';
import { createDeviceLinkPool } from '../device-link-pool.js';
import { encodePropertyBag, type PropertyBag } from './property-bag.js';
import { createSasToken, deviceResource, parseSasToken } from './sas.js';
import { createServiceApi } from './service-api.js';
import { azureIotHubSettingsSchema, type AzureIotHubSettings } from './settings.js';
import {
  classifyLocalTopic,
  commandLocalTopic,
  desiredLocalTopic,
  methodResponseTopic,
  parseC2dTopic,
  parseDesiredPatchVersion,
  parseMethodRequest,
  telemetryTopic,
} from './topics.js';
import { isJsonObject, mergeTwinPatch, withoutTwinMeta, type JsonObject } from './twin-merge.js';

/** §2.1 / §2.4 */
const API_VERSION = '2021-04-12';
const D2C_MAX_BYTES = 256 * 1024;
const TWIN_SECTION_MAX_BYTES = 32 * 1024;
/** The forwarder's window is the integration's `queue.inflight`; the hub announces no limit (3.1.1). */
const MAX_INFLIGHT = 65_535;
/** One timer checks the direct methods waiting for an answer. */
const SWEEP_MS = 250;
/** No device link is tried again sooner than this after a failure. */
const MIN_RETRY_MS = 500;
/**
 * Links in the middle of opening at once: TLS handshakes cost CPU on both ends, and a storm of
 * them (a thousand devices after a restart) makes every CONNACK late.
 */
const MAX_OPENING = 16;
/** C2D request ids remembered per device, so a device's reply to a C2D message is not an error. */
const C2D_REMEMBERED = 64;

/** What the provider keeps per child device beside its link (the pool holds the link). */
interface DeviceState {
  id: string;
  /** A token renewal in progress: publishes wait for the new link instead of failing. */
  swap: Promise<void> | undefined;
  /** Connected to the local broker: its link stays open for C2D and methods. */
  present: boolean;
  /** Twin requests answered 429 in a row, for the wait before the next. */
  throttles: number;
  renewTimer: NodeJS.Timeout | undefined;
  retryTimer: NodeJS.Timeout | undefined;
  desiredVersion: number;
  desired: JsonObject;
  /** Direct methods waiting for the device's response: requestId ($rid) → name and deadline. */
  methods: Map<string, { name: string; expiresAt: number; startedAt: number }>;
  c2dIds: string[];
}

interface Credentials {
  password: string | undefined;
  cert: Buffer | undefined;
  key: Buffer | undefined;
  /** ms since the epoch; undefined for X.509. */
  expiresAt: number | undefined;
  /** False for tokens made elsewhere (`sas-tokens`): they cannot be renewed. */
  renewable: boolean;
}

/**
 * The `azure-iot-hub` provider: identity translation (cloud-protocols.md §2.5). Every active
 * child device gets its own MQTT 3.1.1 link, authenticated as that device with a SAS token from
 * its key or from a DeviceConnect policy key (or its X.509 certificate).
 *
 * Links open on demand (a row to send, a local connect, a sync), at most `maxLinks` at once; an
 * idle link closes unless its device is connected locally. A link whose token nears expiry is
 * replaced in sequence — drain, DISCONNECT, CONNECT with a fresh token — because a second
 * connection of the same device would kick the first (§2.1); rows wait for the new link meanwhile.
 *
 * Failures are scoped: a device the hub refuses, throttles (429002 closes its link) or kicks is
 * parked alone with `deviceUnavailable`/`throttled` carrying its id, so the others keep flowing.
 * Only a hub that cannot be reached at all (network, TLS) is reported through `onDisconnect`.
 */
export function createAzureIotHubProvider(context: ProviderContext): Provider {
  const settings: AzureIotHubSettings = azureIotHubSettingsSchema.parse(context.integration.settings);
  const logger: Logger = context.logger.child({ component: 'azure-iot-hub' });
  const endpoint = `${settings.hostName}:${settings.port}`;
  const devices = new Map<string, DeviceState>();
  const backoff = createBackoff({ baseMs: 1000, maxMs: 60_000 });
  const connectPacer = createRateLimiter({ rate: settings.connectsPerSecond });
  let commandHandler: ((message: InboundMessage) => void) | undefined;
  let disconnectHandler: ((error: Error) => void) | undefined;
  /** The hub was reachable at the last `connect` and has not been lost since. */
  let connected = false;
  let closed = false;
  let lifetime = new AbortController();
  let sweepTimer: NodeJS.Timeout | undefined;
  let caCache: Buffer | undefined;
  const pool = createDeviceLinkPool<DeviceLink>({
    open: (deviceId, signal) => openLink(deviceId, signal),
    close: (link) => link.end(),
    maxLinks: settings.maxLinks,
    idleTimeoutMs: settings.idleTimeout,
    backoff,
    minRetryMs: MIN_RETRY_MS,
    logger,
  });

  logger.info(
    {
      endpoint,
      auth: settings.auth.type,
      maxLinks: settings.maxLinks,
      service: settings.service !== undefined,
    },
    'client_initialized',
  );

  const report = (event: ProviderEvent) => {
    try {
      context.report?.(event);
    } catch (err) {
      logger.error({ err }, 'report_failed');
    }
  };

  function readCa(): Buffer | undefined {
    if (settings.ca === undefined) return undefined;
    if (caCache) return caCache;
    try {
      caCache = readFileSync(settings.ca);
      return caCache;
    } catch (err) {
      throw new GatewayError(
        ErrorCodes.PROVIDER_CONNECT,
        `cannot read the ca file ${settings.ca} (${(err as NodeJS.ErrnoException).code ?? errorMessage(err)}); fix settings.ca of integration ${context.integration.name}`,
        { retryable: false, cause: err },
      );
    }
  }

  function stateOf(deviceId: string): DeviceState {
    let state = devices.get(deviceId);
    if (!state) {
      state = {
        id: deviceId,
        swap: undefined,
        present: false,
        throttles: 0,
        renewTimer: undefined,
        retryTimer: undefined,
        desiredVersion: 0,
        desired: {},
        methods: new Map(),
        c2dIds: [],
      };
      devices.set(deviceId, state);
    }
    return state;
  }

  function credentials(deviceId: string): Credentials {
    const auth = settings.auth;
    const now = Date.now();
    switch (auth.type) {
      case 'device-keys': {
        const key = auth.keys[deviceId];
        if (key === undefined) {
          throw new GatewayError(
            ErrorCodes.PROVIDER_AUTH,
            `settings.auth.keys has no key for device ${deviceId}; add its primary key or use a DeviceConnect policy`,
            { retryable: false, details: { deviceId, scope: 'device' } },
          );
        }
        const se = Math.floor((now + settings.tokenTtl) / 1000);
        return {
          password: createSasToken({
            resource: deviceResource(settings.hostName, deviceId),
            key,
            expiresAt: se,
          }),
          cert: undefined,
          key: undefined,
          expiresAt: se * 1000,
          renewable: true,
        };
      }
      case 'policy': {
        const se = Math.floor((now + settings.tokenTtl) / 1000);
        return {
          password: createSasToken({
            resource: deviceResource(settings.hostName, deviceId),
            key: auth.key,
            policyName: auth.policyName,
            expiresAt: se,
          }),
          cert: undefined,
          key: undefined,
          expiresAt: se * 1000,
          renewable: true,
        };
      }
      case 'sas-tokens': {
        const token = auth.tokens[deviceId];
        const parsed = token === undefined ? undefined : parseSasToken(token);
        if (token === undefined || parsed === undefined) {
          throw new GatewayError(
            ErrorCodes.PROVIDER_AUTH,
            `settings.auth.tokens has no token for device ${deviceId}; add one`,
            { retryable: false, details: { deviceId, scope: 'device' } },
          );
        }
        if (parsed.expiresAt * 1000 <= now) throw expiredToken(deviceId, parsed.expiresAt);
        return {
          password: token,
          cert: undefined,
          key: undefined,
          expiresAt: parsed.expiresAt * 1000,
          renewable: false,
        };
      }
      case 'x509': {
        const read = (what: 'cert' | 'key', template: string) => {
          const path = template.replaceAll('{deviceId}', deviceId);
          try {
            return readFileSync(path);
          } catch (err) {
            throw new GatewayError(
              ErrorCodes.PROVIDER_AUTH,
              `cannot read the ${what} file ${path} of device ${deviceId} (${(err as NodeJS.ErrnoException).code ?? errorMessage(err)}); fix settings.auth.${what}`,
              { retryable: false, cause: err, details: { deviceId, scope: 'device' } },
            );
          }
        };
        return {
          password: undefined,
          cert: read('cert', auth.cert),
          key: read('key', auth.key),
          expiresAt: undefined,
          renewable: false,
        };
      }
    }
  }

  function expiredToken(deviceId: string, se: number): GatewayError {
    return new GatewayError(
      ErrorCodes.PROVIDER_AUTH,
      `the SAS token of device ${deviceId} in settings.auth.tokens expired at ${new Date(se * 1000).toISOString()}; make a new one with a later se, or give the device key instead`,
      { retryable: false, details: { deviceId, expiresAt: se, scope: 'device' } },
    );
  }

  function startSweep() {
    if (sweepTimer) return;
    sweepTimer = setInterval(sweepMethods, SWEEP_MS);
    sweepTimer.unref();
  }

  function sweepMethods() {
    const now = Date.now();
    for (const state of devices.values()) {
      for (const [requestId, method] of state.methods) {
        if (method.expiresAt > now) continue;
        state.methods.delete(requestId);
        logger.warn({ deviceId: state.id, requestId, method: method.name }, 'method_timed_out');
        report({
          activityType: 'direct_method',
          direction: 'incoming',
          status: 'failed',
          responseTimeMs: now - method.startedAt,
          errorCode: ErrorCodes.PROVIDER_TIMEOUT,
          errorMessage: `device ${state.id} did not answer method ${method.name} within ${settings.methodTimeout} ms`,
          metadata: { deviceId: state.id, requestId, method: method.name },
        });
      }
    }
  }

  let opening = 0;
  const openSlots: (() => void)[] = [];

  /** Waits for an opening slot (MAX_OPENING) and a connect token (connectsPerSecond). */
  async function pace(signal: AbortSignal): Promise<void> {
    if (opening >= MAX_OPENING) await new Promise<void>((resolve) => openSlots.push(resolve));
    opening++;
    try {
      for (let i = 0; i < 10_000; i++) {
        const wait = connectPacer.take();
        if (wait === 0) return;
        await sleep(wait, signal);
      }
    } catch (err) {
      releaseSlot();
      throw err;
    }
  }

  function releaseSlot(): void {
    opening--;
    openSlots.shift()?.();
  }

  /** The pool's `open`: one attempt, paced; what failed is reported, a hub gone is reported up. */
  async function openLink(deviceId: string, poolSignal: AbortSignal): Promise<DeviceLink> {
    const signal = AbortSignal.any([poolSignal, lifetime.signal]);
    const state = stateOf(deviceId);
    await pace(signal);
    const started = performance.now();
    let link: DeviceLink;
    let creds: Credentials;
    try {
      creds = credentials(deviceId);
      const fixed = creds;
      link = await openDeviceLink(
        {
          deviceId,
          hostName: settings.hostName,
          address: settings.address,
          port: settings.port,
          ca: readCa(),
          credentials: () => fixed,
          apiVersion: API_VERSION,
          keepaliveMs: settings.keepalive,
          connectTimeoutMs: settings.connectTimeout,
          requestTimeoutMs: settings.publishTimeout,
          logger,
          owner: `integration ${context.integration.name} (device ${deviceId})`,
          onMessage: (topic, payload, packet) => onInbound(state, topic, payload, packet),
        },
        signal,
      );
    } catch (err) {
      if (!(err instanceof GatewayError) || err.code !== ErrorCodes.ABORTED) {
        if (hubUnreachable(err)) hubLost(err as GatewayError);
        else {
          report({
            activityType: 'device_link',
            direction: 'outgoing',
            status: 'failed',
            errorCode: err instanceof GatewayError ? err.code : ErrorCodes.PROVIDER_CONNECT,
            errorMessage: errorMessage(err),
            metadata: { deviceId },
          });
        }
      }
      throw err;
    } finally {
      releaseSlot();
    }
    startSweep();
    link.onLost((err) => linkLost(state, link, err));
    logger.debug({ deviceId, latencyMs: Math.round(performance.now() - started) }, 'device_link_opened');
    if (creds.expiresAt !== undefined) scheduleRenewal(state, link, creds);
    // §2.3: after (re)connecting, GET the twin; patches up to its $version are then ignored.
    void refreshDesired(state, link).catch((err: unknown) =>
      logger.warn({ deviceId, err: errorMessage(err) }, 'twin_get_failed'),
    );
    return link;
  }

  /** The hub closed a device's link (429002 throttling, a duplicate, token expiry, network). */
  function linkLost(state: DeviceState, link: DeviceLink, err: GatewayError): void {
    pool.lost(state.id, link, err);
    clearTimeout(state.renewTimer);
    state.renewTimer = undefined;
    if (closed) return;
    report({
      activityType: 'device_link',
      direction: 'outgoing',
      status: 'failed',
      errorCode: ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE,
      errorMessage: err.message,
      metadata: { deviceId: state.id },
    });
    checkHub();
    keepPresent(state, 0);
  }

  /** A device connected locally keeps its link, so C2D messages and methods reach it. */
  function keepPresent(state: DeviceState, delayMs: number): void {
    clearTimeout(state.retryTimer);
    state.retryTimer = undefined;
    if (!state.present || closed || !connected) return;
    const attempt = () => {
      state.retryTimer = undefined;
      if (!state.present || closed || !connected) return;
      pool.acquire(state.id).then(
        () => undefined,
        (err: unknown) => {
          const wait = err instanceof GatewayError ? Number(err.details?.retryAfterMs ?? 1000) : 1000;
          keepPresent(state, Number.isFinite(wait) ? wait : 1000);
        },
      );
    };
    if (delayMs <= 0) return attempt();
    state.retryTimer = setTimeout(attempt, delayMs + 10);
    state.retryTimer.unref();
  }

  let hubCheck: Promise<void> | undefined;
  /** After a lost link: is the hub still there? A hub outage closes every link at once. */
  function checkHub(): void {
    if (hubCheck || !connected) return;
    hubCheck = probeHub(lifetime.signal)
      .then(
        () => undefined,
        (err: unknown) => {
          if (hubUnreachable(err)) hubLost(err as GatewayError);
        },
      )
      .finally(() => {
        hubCheck = undefined;
      });
  }

  /** Hub unreachable: every link closes and the supervisor reconnects (connect probes the hub). */
  function hubLost(err: GatewayError): void {
    if (!connected) return;
    connected = false;
    lifetime.abort();
    lifetime = new AbortController();
    for (const state of devices.values()) {
      clearTimeout(state.retryTimer);
      clearTimeout(state.renewTimer);
      state.retryTimer = undefined;
      state.renewTimer = undefined;
      void pool.close(state.id);
    }
    logger.warn({ err: err.message }, 'connection_lost');
    try {
      disconnectHandler?.(
        new GatewayError(
          ErrorCodes.PROVIDER_CONNECT,
          `the hub at ${endpoint} is unreachable: ${err.message}`,
          {
            retryable: true,
            cause: err,
          },
        ),
      );
    } catch (handlerErr) {
      logger.error({ err: handlerErr }, 'disconnect_handler_failed');
    }
  }

  /**
   * Sequential swap (§2.1: a second connection would kick the first): publishes already on the
   * old link finish, new ones wait, then the pool closes the old link and opens the new one.
   */
  function scheduleRenewal(state: DeviceState, link: DeviceLink, creds: Credentials): void {
    clearTimeout(state.renewTimer);
    state.renewTimer = undefined;
    if (creds.expiresAt === undefined) return;
    if (!creds.renewable) {
      state.renewTimer = setTimeout(
        () => logger.warn({ deviceId: state.id }, 'sas_token_expired'),
        Math.max(0, creds.expiresAt - Date.now()),
      );
      state.renewTimer.unref();
      return;
    }
    // Spread the renewals of links opened together over a tenth of the margin.
    const jitter = Math.random() * Math.min(settings.tokenRenewBefore / 10, 60_000);
    const delay = Math.max(0, creds.expiresAt - settings.tokenRenewBefore - jitter - Date.now());
    state.renewTimer = setTimeout(() => {
      state.renewTimer = undefined;
      renew(state, link);
    }, delay);
    state.renewTimer.unref();
  }

  function renew(state: DeviceState, link: DeviceLink): void {
    if (pool.peek(state.id) !== link || closed || state.swap) return;
    const started = performance.now();
    state.swap = (async () => {
      try {
        await link.drained(settings.publishTimeout);
        await pool.reconnect(state.id, lifetime.signal);
        const latencyMs = Math.round(performance.now() - started);
        logger.info({ deviceId: state.id, latencyMs }, 'token_renewed');
        report({
          activityType: 'token_renewal',
          direction: 'internal',
          status: 'success',
          responseTimeMs: latencyMs,
          metadata: { deviceId: state.id },
        });
      } catch (err) {
        report({
          activityType: 'token_renewal',
          direction: 'internal',
          status: 'failed',
          errorCode: err instanceof GatewayError ? err.code : ErrorCodes.PROVIDER_CONNECT,
          errorMessage: errorMessage(err),
          metadata: { deviceId: state.id },
        });
        keepPresent(state, 1000);
      } finally {
        state.swap = undefined;
      }
    })();
  }

  /** Runs `fn` on the device's link once no renewal is in progress; errors stay scoped to it. */
  async function withLink<T>(state: DeviceState, fn: (link: DeviceLink) => Promise<T>): Promise<T> {
    for (let i = 0; i < 10 && state.swap; i++) await state.swap;
    try {
      return await pool.use(state.id, fn);
    } catch (err) {
      if (closed) throw closedError();
      if (err instanceof GatewayError && err.details?.linkLost === true) {
        // The link dropped under this row: the hub check started by the loss says whether the
        // hub is gone (the row waits for the reconnect) or only this device's link (parked).
        if (hubCheck) await hubCheck;
        if (!connected) throw notConnected(`the hub at ${endpoint} is unreachable: ${err.message}`);
      }
      throw scoped(state, err);
    }
  }

  function emit(topic: string, payload: Buffer, retain: boolean): void {
    if (commandHandler === undefined) {
      logger.warn({ topic }, 'inbound_no_handler');
      return;
    }
    try {
      commandHandler({ topic, payload, qos: 1, retain });
    } catch (err) {
      logger.error({ err, topic }, 'inbound_handler_failed');
    }
  }

  function emitDesired(state: DeviceState): void {
    emit(desiredLocalTopic(state.id), Buffer.from(JSON.stringify(state.desired)), true);
  }

  async function refreshDesired(state: DeviceState, link: DeviceLink): Promise<boolean> {
    const answer = await link.twin('GET');
    if (answer.status !== 200) {
      throw new GatewayError(
        ErrorCodes.PROVIDER_REJECTED,
        `the hub answered the twin GET of device ${state.id} with ${answer.status}`,
        {
          retryable: true,
          details: { deviceId: state.id, status: answer.status },
        },
      );
    }
    const body = JSON.parse(answer.body.toString('utf8')) as unknown;
    const desired = isJsonObject(body) && isJsonObject(body.desired) ? body.desired : {};
    const version = typeof desired.$version === 'number' ? desired.$version : 0;
    if (version === state.desiredVersion && state.desiredVersion !== 0) return false;
    state.desiredVersion = version;
    state.desired = withoutTwinMeta(desired);
    emitDesired(state);
    return true;
  }

  function parseBody(payload: Buffer): unknown {
    if (payload.length === 0) return null;
    const text = payload.toString('utf8');
    try {
      return JSON.parse(text);
    } catch {
      return text;
    }
  }

  function onInbound(state: DeviceState, topic: string, payload: Buffer, packet: IPublishPacket): void {
    const bag = parseC2dTopic(topic, state.id);
    if (bag !== undefined) return onC2d(state, bag, payload);
    const method = parseMethodRequest(topic);
    if (method) {
      state.methods.set(method.rid, {
        name: method.name,
        expiresAt: Date.now() + settings.methodTimeout,
        startedAt: Date.now(),
      });
      const body = { requestId: method.rid, kind: 'method', payload: parseBody(payload) };
      emit(commandLocalTopic(state.id, safeName(method.name)), Buffer.from(JSON.stringify(body)), false);
      return;
    }
    const version = parseDesiredPatchVersion(topic);
    if (version !== undefined) {
      if (version <= state.desiredVersion) return;
      const link = pool.peek(state.id);
      if (version !== state.desiredVersion + 1 && state.desiredVersion !== 0 && link) {
        // A patch was missed: read the whole twin instead of merging a gap.
        void refreshDesired(state, link).catch((err: unknown) =>
          logger.warn({ deviceId: state.id, err: errorMessage(err) }, 'twin_get_failed'),
        );
        return;
      }
      const patch = parseBody(payload);
      if (!isJsonObject(patch)) return;
      state.desired = mergeTwinPatch(state.desired, withoutTwinMeta(patch));
      state.desiredVersion = version;
      emitDesired(state);
      return;
    }
    logger.debug({ deviceId: state.id, topic, qos: packet.qos }, 'inbound_unmapped');
  }

  function onC2d(state: DeviceState, bag: PropertyBag, payload: Buffer): void {
    const properties: Record<string, string | null> = {};
    for (const [k, v] of Object.entries(bag)) if (!k.startsWith('$.')) properties[k] = v;
    const requestId = bag['$.mid'] ?? randomUUID();
    const name = safeName(properties.name ?? properties.command ?? 'message');
    state.c2dIds.push(requestId);
    if (state.c2dIds.length > C2D_REMEMBERED) state.c2dIds.shift();
    const body = { requestId, kind: 'c2d', payload: parseBody(payload), properties };
    emit(commandLocalTopic(state.id, name), Buffer.from(JSON.stringify(body)), false);
  }

  async function sendTelemetry(
    state: DeviceState,
    link: DeviceLink,
    message: OutboundMessage,
    stream: string | undefined,
  ) {
    const properties: PropertyBag = { '$.mid': `${context.gatewayId}-${message.id}` };
    const first = message.payload.length > 0 ? message.payload[0] : undefined;
    // `{` or `[`: JSON, so the hub can route on the body (§2.3).
    if (first === 0x7b || first === 0x5b) {
      properties['$.ct'] = 'application/json';
      properties['$.ce'] = 'utf-8';
    }
    if (stream !== undefined) properties.stream = stream;
    await link.publish(telemetryTopic(state.id, encodePropertyBag(properties)), message.payload);
  }

  async function sendState(state: DeviceState, link: DeviceLink, message: OutboundMessage): Promise<void> {
    if (message.payload.length > TWIN_SECTION_MAX_BYTES) throw tooLarge(message, TWIN_SECTION_MAX_BYTES);
    const patch = parseBody(message.payload);
    if (!isJsonObject(patch)) {
      throw rejected(
        `the state of device ${state.id} is not a JSON object; a twin takes reported properties as an object`,
        message,
      );
    }
    const answer = await link.twin('PATCH', message.payload);
    twinAnswer(state, answer.status, 'reported update', message);
  }

  function twinAnswer(state: DeviceState, status: number, what: string, message?: OutboundMessage): void {
    if (status === 200 || status === 204) {
      state.throttles = 0;
      return;
    }
    if (status === 429) {
      const delay = Math.max(MIN_RETRY_MS, backoff.delay(state.throttles++));
      throw throttled(`the hub throttled the twin ${what} of device ${state.id} (429)`, delay, state.id);
    }
    if (status >= 500) {
      throw new GatewayError(
        ErrorCodes.PROVIDER_REJECTED,
        `the hub failed the twin ${what} of device ${state.id} (${status})`,
        {
          retryable: true,
          details: { deviceId: state.id, status },
        },
      );
    }
    throw rejected(
      `the hub refused the twin ${what} of device ${state.id} (${status}); check the property names and sizes`,
      message,
      status,
    );
  }

  async function sendMethodResponse(
    state: DeviceState,
    link: DeviceLink,
    message: OutboundMessage,
  ): Promise<void> {
    const body = parseBody(message.payload);
    const requestId = isJsonObject(body) && typeof body.requestId === 'string' ? body.requestId : undefined;
    if (!isJsonObject(body) || requestId === undefined) {
      throw rejected(
        `a command response of device ${state.id} needs a JSON object with the command's requestId`,
        message,
      );
    }
    const method = state.methods.get(requestId);
    if (!method) {
      if (state.c2dIds.includes(requestId)) {
        // A C2D message has no reply channel (§2.3); the reply is only logged.
        logger.debug({ deviceId: state.id, requestId }, 'c2d_response_dropped');
        return;
      }
      throw rejected(
        `no direct method ${requestId} of device ${state.id} is waiting: it timed out after ${settings.methodTimeout} ms (settings.methodTimeout), was answered already, or never came`,
        message,
      );
    }
    const status = typeof body.status === 'number' && Number.isInteger(body.status) ? body.status : 200;
    let response: unknown;
    if ('payload' in body) response = body.payload;
    else {
      const { requestId: _r, status: _s, ...rest } = body;
      response = rest;
    }
    await link.publish(methodResponseTopic(status, requestId), Buffer.from(JSON.stringify(response ?? null)));
    state.methods.delete(requestId);
    report({
      activityType: 'direct_method',
      direction: 'incoming',
      status: 'success',
      responseTimeMs: Date.now() - method.startedAt,
      metadata: { deviceId: state.id, requestId, method: method.name, status },
    });
  }

  /** Device-scoped errors from a link carry when to try again. */
  function scoped(state: DeviceState, err: unknown): unknown {
    if (!(err instanceof GatewayError)) return err;
    if (
      err.code === ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE &&
      typeof err.details?.retryAfterMs !== 'number'
    ) {
      // The link dropped under this request; the pool backs the device off before reopening.
      return deviceUnavailable(state.id, err.message, MIN_RETRY_MS, err);
    }
    return err;
  }

  async function syncPaced<T>(
    ids: readonly string[],
    signal: AbortSignal,
    run: (state: DeviceState, link: DeviceLink) => Promise<T>,
  ): Promise<{ ok: number; failed: number; errors: { deviceId: string; code: string; message: string }[] }> {
    const pacer = createRateLimiter({ rate: settings.twinOpsPerSecond });
    let ok = 0;
    let failed = 0;
    const errors: { deviceId: string; code: string; message: string }[] = [];
    for (const id of ids) {
      if (signal.aborted)
        throw new GatewayError(ErrorCodes.ABORTED, 'the sync was aborted', { retryable: false });
      for (let wait = pacer.take(); wait > 0; wait = pacer.take()) await sleep(wait, signal);
      const state = stateOf(id);
      try {
        await withLink(state, (link) => run(state, link));
        ok++;
      } catch (err) {
        failed++;
        const e =
          err instanceof GatewayError
            ? err
            : new GatewayError(ErrorCodes.PROVIDER_REJECTED, errorMessage(err));
        if (errors.length < 20) errors.push({ deviceId: id, code: e.code, message: e.message });
      }
    }
    return { ok, failed, errors };
  }

  function syncDevices(): string[] {
    const ids = new Set(context.knownDevices?.() ?? []);
    if (settings.auth.type === 'device-keys') for (const id of Object.keys(settings.auth.keys)) ids.add(id);
    if (settings.auth.type === 'sas-tokens') for (const id of Object.keys(settings.auth.tokens)) ids.add(id);
    return [...ids].sort();
  }

  function twinReport(
    kind: 'twin_get' | 'twin_patch',
    state: DeviceState,
    started: number,
    status: number,
    err?: unknown,
  ) {
    report({
      activityType: kind,
      direction: kind === 'twin_get' ? 'incoming' : 'outgoing',
      status: err === undefined ? 'success' : 'failed',
      responseTimeMs: Math.round(performance.now() - started),
      errorCode:
        err instanceof GatewayError ? err.code : err === undefined ? null : ErrorCodes.PROVIDER_REJECTED,
      errorMessage: err === undefined ? null : errorMessage(err),
      metadata: { deviceId: state.id, status },
    });
  }

  function probeHub(signal: AbortSignal): Promise<number> {
    const started = performance.now();
    return new Promise((resolve, reject) => {
      if (signal.aborted)
        return reject(
          new GatewayError(ErrorCodes.ABORTED, 'the connection attempt was aborted', { retryable: false }),
        );
      const socket = tlsConnect({
        host: settings.address ?? settings.hostName,
        port: settings.port,
        ...(isIP(settings.hostName) ? {} : { servername: settings.hostName }),
        ...(readCa() ? { ca: readCa() } : {}),
        minVersion: 'TLSv1.2',
        timeout: settings.connectTimeout,
      });
      const done = (err?: GatewayError) => {
        signal.removeEventListener('abort', onAbort);
        socket.destroy();
        if (err) reject(err);
        else resolve(Math.round(performance.now() - started));
      };
      const onAbort = () =>
        done(
          new GatewayError(ErrorCodes.ABORTED, 'the connection attempt was aborted', { retryable: false }),
        );
      signal.addEventListener('abort', onAbort, { once: true });
      socket.once('secureConnect', () => done());
      socket.once('timeout', () =>
        done(
          new GatewayError(
            ErrorCodes.PROVIDER_TIMEOUT,
            `no TLS handshake with ${endpoint} within ${settings.connectTimeout} ms`,
            { retryable: true },
          ),
        ),
      );
      socket.once('error', (err) => done(hubError(err, endpoint)));
    });
  }

  const provider: Provider = {
    maxInflight: MAX_INFLIGHT,
    maxPayloadBytes: D2C_MAX_BYTES,

    async connect(signal) {
      if (closed) throw closedError();
      readCa();
      if (settings.auth.type === 'sas-tokens') {
        const ids = Object.keys(settings.auth.tokens);
        const live = ids.filter(
          (id) =>
            (parseSasToken(settings.auth.type === 'sas-tokens' ? settings.auth.tokens[id]! : '')?.expiresAt ??
              0) *
              1000 >
            Date.now(),
        );
        if (ids.length > 0 && live.length === 0) {
          const first = parseSasToken(settings.auth.tokens[ids[0]!]!)!;
          throw expiredToken(ids[0]!, first.expiresAt);
        }
      }
      const latencyMs = await probeHub(signal);
      if (closed) throw closedError();
      connected = true;
      logger.info({ endpoint, latencyMs }, 'connect_completed');
      startSweep();
      for (const state of devices.values()) keepPresent(state, 0);
    },

    async publish(message) {
      if (closed) throw closedError();
      if (!connected) throw notConnected(`not connected to ${endpoint}`);
      const kind = classifyLocalTopic(message.topic);
      if (kind.kind === 'other') {
        throw rejected(
          `the azure-iot-hub provider maps devices/{id}/telemetry, /state and /commands/{name}/response only, not ${message.topic}`,
          message,
        );
      }
      if (message.payload.length > D2C_MAX_BYTES) throw tooLarge(message, D2C_MAX_BYTES);
      const state = stateOf(kind.deviceId);
      await withLink(state, (link) => {
        if (kind.kind === 'telemetry') return sendTelemetry(state, link, message, kind.stream);
        if (kind.kind === 'state') return sendState(state, link, message);
        return sendMethodResponse(state, link, message);
      });
    },

    onCommand(handler) {
      commandHandler = handler;
    },

    onDisconnect(handler) {
      disconnectHandler = handler;
    },

    onDevicePresence(deviceId, online) {
      const state = stateOf(deviceId);
      state.present = online;
      pool.pin(deviceId, online);
      keepPresent(state, 0);
    },

    async testConnection(signal): Promise<ConnectionTestResult> {
      const started = performance.now();
      const details: Record<string, unknown> = {
        hostName: settings.hostName,
        port: settings.port,
        protocol: 'MQTT 3.1.1 over TLS',
        auth: settings.auth.type,
      };
      try {
        details.tlsMs = await probeHub(signal);
        const deviceId = syncDevices()[0];
        if (deviceId === undefined) {
          details.note = 'no device known yet, so only TLS was checked';
        } else {
          details.deviceId = deviceId;
          // A second connection would kick the device's live link (§2.1): use that one if open.
          if (!pool.peek(deviceId)?.isOpen) {
            const creds = credentials(deviceId);
            const link = await openDeviceLink(
              {
                deviceId,
                hostName: settings.hostName,
                address: settings.address,
                port: settings.port,
                ca: readCa(),
                credentials: () => creds,
                apiVersion: API_VERSION,
                keepaliveMs: settings.keepalive,
                connectTimeoutMs: settings.connectTimeout,
                requestTimeoutMs: settings.publishTimeout,
                logger,
                owner: `integration ${context.integration.name} (device ${deviceId})`,
                onMessage: () => {},
              },
              signal,
            );
            await link.end();
          }
        }
        if (settings.service) {
          const service = serviceApi();
          await service.queryTwins(signal, () => {}, 1, 1);
          details.service = 'twin query accepted';
        }
        return { ok: true, latencyMs: Math.round(performance.now() - started), details };
      } catch (err) {
        return failedConnectionTest(started, details, toGatewayError(err, ErrorCodes.PROVIDER_CONNECT));
      }
    },

    async import(signal): Promise<SyncResult> {
      const known = new Set(syncDevices());
      if (settings.service) {
        let processed = 0;
        let delivered = 0;
        let unknown = 0;
        let pages = 0;
        await serviceApi().queryTwins(signal, (twins) => {
          pages++;
          for (const twin of twins) {
            processed++;
            if (known.size > 0 && !known.has(twin.deviceId)) {
              unknown++;
              continue;
            }
            const desired = twin.properties?.desired ?? {};
            const state = stateOf(twin.deviceId);
            const version = typeof desired.$version === 'number' ? desired.$version : state.desiredVersion;
            state.desired = withoutTwinMeta(desired as JsonObject);
            state.desiredVersion = version;
            emitDesired(state);
            delivered++;
          }
        });
        return {
          recordsProcessed: processed,
          recordsSucceeded: delivered,
          recordsFailed: 0,
          details: { source: 'service twin query', pages, notLocal: unknown },
        };
      }
      const ids = [...known];
      const result = await syncPaced(ids, signal, async (state, link) => {
        const started = performance.now();
        try {
          await refreshDesired(state, link);
          // Emitted even when unchanged: an import hands the device its desired state.
          emitDesired(state);
          twinReport('twin_get', state, started, 200);
        } catch (err) {
          twinReport('twin_get', state, started, 0, err);
          throw err;
        }
      });
      return {
        recordsProcessed: ids.length,
        recordsSucceeded: result.ok,
        recordsFailed: result.failed,
        details: { source: 'twin GET per device', errors: result.errors },
      };
    },

    async export(signal): Promise<SyncResult> {
      const states = context.reportedState?.() ?? new Map<string, Record<string, unknown>>();
      const ids = [...states.keys()].sort();
      const result = await syncPaced(ids, signal, async (state, link) => {
        const started = performance.now();
        const body = Buffer.from(JSON.stringify(states.get(state.id) ?? {}));
        try {
          if (body.length > TWIN_SECTION_MAX_BYTES) {
            throw new GatewayError(
              ErrorCodes.PROVIDER_TOO_LARGE,
              `the state of device ${state.id} is over 32 KB, the twin limit`,
              {
                retryable: false,
              },
            );
          }
          const answer = await link.twin('PATCH', body);
          twinAnswer(state, answer.status, 'reported update');
          twinReport('twin_patch', state, started, answer.status);
        } catch (err) {
          twinReport('twin_patch', state, started, 0, err);
          throw err;
        }
      });
      return {
        recordsProcessed: ids.length,
        recordsSucceeded: result.ok,
        recordsFailed: result.failed,
        details: { target: 'twin reported properties', errors: result.errors },
      };
    },

    async bidirectionalSync(signal): Promise<SyncResult> {
      const imported = await provider.import(signal);
      return combineSyncResults(imported, await provider.export(signal));
    },

    async close() {
      if (closed) return;
      closed = true;
      connected = false;
      lifetime.abort();
      clearInterval(sweepTimer);
      sweepTimer = undefined;
      for (const state of devices.values()) {
        clearTimeout(state.retryTimer);
        clearTimeout(state.renewTimer);
      }
      await pool.closeAll();
    },
  };

  function serviceApi() {
    const service = settings.service!;
    return createServiceApi({
      hostName: settings.hostName,
      address: settings.address,
      port: service.port,
      ca: readCa(),
      policyName: service.policyName,
      key: service.key,
      apiVersion: API_VERSION,
      timeoutMs: settings.publishTimeout,
      onRequest: (meta) =>
        report({
          activityType: 'twin_query',
          direction: 'incoming',
          status: meta.error ? 'failed' : 'success',
          responseTimeMs: meta.latencyMs,
          errorCode: meta.error?.code ?? null,
          errorMessage: meta.error?.message ?? null,
          metadata: { requestId: meta.requestId, status: meta.status, items: meta.items },
        }),
    });
  }

  return provider;
}

/** A hub that cannot be reached at all: network or TLS, in one sentence with the settings to check. */
function hubError(err: Error, endpoint: string): GatewayError {
  const code = (err as NodeJS.ErrnoException).code ?? '';
  if (/CERT|SSL|TLS|SELF_SIGNED|UNABLE_TO|HOSTNAME/i.test(code) || /certificate/i.test(err.message)) {
    return new GatewayError(
      ErrorCodes.PROVIDER_CONNECT,
      `TLS with the hub at ${endpoint} failed: ${err.message}; check settings.hostName and settings.ca`,
      { retryable: false, cause: err, details: { tls: code || undefined } },
    );
  }
  const hint =
    code === 'ENOTFOUND' || code === 'EAI_AGAIN'
      ? 'settings.hostName'
      : 'settings.hostName, settings.address and settings.port';
  return new GatewayError(
    ErrorCodes.PROVIDER_CONNECT,
    `cannot reach the hub at ${endpoint}: ${err.message}; check ${hint}`,
    {
      retryable: true,
      cause: err,
      details: { network: code || undefined },
    },
  );
}

/** A command name that is one local topic level. */
function safeName(name: string): string {
  return /^[^/+#]{1,128}$/.test(name) && !name.includes(String.fromCharCode(0)) ? name : 'message';
}

function rejected(message: string, row?: OutboundMessage, status?: number): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_REJECTED, message, {
    retryable: false,
    details: { ...(row ? { topic: row.topic, deviceId: row.deviceId } : {}), ...(status ? { status } : {}) },
  });
}

function tooLarge(message: OutboundMessage, limit: number): GatewayError {
  return new GatewayError(
    ErrorCodes.PROVIDER_TOO_LARGE,
    `a ${message.payload.length}-byte payload is larger than IoT Hub takes on ${message.topic} (${limit} bytes)`,
    { retryable: false, details: { payloadBytes: message.payload.length, maxPayloadBytes: limit } },
  );
}

function closedError(): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_CLOSED, 'the provider was closed', { retryable: true });
}

function notConnected(message: string): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_NOT_CONNECTED, message, { retryable: true });
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(new GatewayError(ErrorCodes.ABORTED, 'aborted', { retryable: false }));
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(new GatewayError(ErrorCodes.ABORTED, 'aborted', { retryable: false }));
    };
    signal.addEventListener('abort', onAbort, { once: true });
  });
}
