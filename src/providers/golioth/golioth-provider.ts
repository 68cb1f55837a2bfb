import { readFileSync } from 'node:fs';
import { Agent, fetch as undiciFetch } from 'undici';
import { createRateLimiter, type RateLimiter } from '../../common/rate-limiter.js';
import { ErrorCodes, GatewayError, errorMessage, isGatewayError } from '../../errors.js';
import {
  combineSyncResults,
  failedConnectionTest,
  type ConnectionTestResult,
  type InboundMessage,
  type OutboundMessage,
  type Provider,
  type ProviderContext,
  type ProviderEvent,
  type SyncResult,
} from '../provider.js';
import { createHttpClient } from '../http-client.js';
import { throttled } from '../provider.js';
import type { CoapResponse } from './coap-channel.js';
import { createDeviceSessions, type DeviceCredential } from './device-sessions.js';
import { createManagementApi, type GoliothDevice } from './management-api.js';
import { goliothSettingsSchema, type GoliothSettings } from './settings.js';

/**
 * The `golioth` provider (SPEC §6, cloud-protocols §3). Golioth has no MQTT: the management
 * REST API (`x-api-key`) serves testConnection, import (devices, LightDB State at `desiredPath`,
 * effective settings → retained `devices/{id}/desired`) and export (reported state → LightDB
 * State at `reportedPath`); telemetry goes to LightDB Stream the only way Golioth takes it, CoAP
 * `POST /.s/<streamPath>[/<stream>]` over DTLS-PSK as the device itself (see device-sessions.ts).
 * `devices/{id}/state` on a route is written to LightDB State through the REST API.
 */

/** Golioth's device rate limit (§3.2 Limits). */
const DEVICE_REQUESTS_PER_SECOND = 20;
/** Payloads above ~1 KB fragment at the IP layer; Golioth asks devices to stay below (§3.2). */
const MAX_PAYLOAD_BYTES = 1024;
const CONTENT_FORMAT_JSON = 50;
const CONTENT_FORMAT_OCTET_STREAM = 42;

const TELEMETRY = /^devices\/([^/]+)\/telemetry(?:\/(.+))?$/;
const STATE = /^devices\/([^/]+)\/state$/;

function rejected(message: string, details?: Record<string, unknown>): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_REJECTED, message, {
    retryable: false,
    ...(details ? { details } : {}),
  });
}

function parseJsonObject(payload: Buffer): unknown {
  try {
    return JSON.parse(payload.toString('utf8'));
  } catch {
    return undefined;
  }
}

/** Runs `work` over `items`, at most `limit` at once. */
async function eachLimited<T>(
  items: readonly T[],
  limit: number,
  work: (item: T) => Promise<void>,
): Promise<void> {
  let next = 0;
  const runners = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const item = items[next++]!;
      await work(item);
    }
  });
  await Promise.all(runners);
}

export function createGoliothProvider(context: ProviderContext): Provider {
  const settings: GoliothSettings = goliothSettingsSchema.parse(context.integration.settings);
  const log = context.logger;
  const report = (event: ProviderEvent) => context.report?.(event);
  /** REST attempts made, for the sync details (requests per sync). */
  const restStats = { requests: 0 };
  // A private CA (settings.ca) needs a dispatcher of its own; Node 20's global fetch takes none.
  const dispatcher =
    settings.ca === undefined
      ? undefined
      : new Agent({ connect: { ca: readFileSync(settings.ca) }, connections: settings.syncConcurrency });
  const http = createHttpClient({
    baseUrl: settings.baseUrl,
    logger: log,
    headers: () => ({ 'x-api-key': settings.apiKey }),
    timeoutMs: settings.requestTimeout,
    report: (event) => {
      restStats.requests += Number(event.metadata?.attempts ?? 1);
      report(event);
    },
    ...(dispatcher === undefined
      ? {}
      : {
          fetch: ((url: string, init: object) =>
            undiciFetch(url, { ...init, dispatcher })) as unknown as typeof fetch,
        }),
  });
  const api = createManagementApi(http, settings.projectId);
  const sessions = createDeviceSessions({
    onPeerClose: (deviceId, err) => lose(deviceId, err),
    credentialOf: (deviceId) => {
      const credential = credentialOf(deviceId);
      // publishTelemetry checks for a PSK before it asks for a session.
      if (credential === undefined) throw new Error(`no PSK for ${deviceId}`);
      return credential;
    },
    host: settings.coapHost,
    port: settings.coapPort,
    handshakeTimeoutMs: settings.handshakeTimeout,
    maxSessions: settings.maxSessions,
    idleTimeoutMs: settings.sessionIdleTimeout,
    coap: { ackTimeoutMs: settings.coapAckTimeout, maxRetransmit: settings.coapMaxRetransmit },
    logger: log,
    report,
  });
  const limiters = new Map<string, RateLimiter>();
  /** Local device id → Golioth device id, from the last device list. */
  let deviceIds = new Map<string, string>();
  let commandHandler: ((message: InboundMessage) => void) | undefined;
  let disconnectHandler: ((error: Error) => void) | undefined;
  let closed = false;
  /**
   * Golioth's side is connectionless REST plus one DTLS session per device, so "connected" is
   * the provider's own state: set by connect(), cleared when Golioth ends a session (a server
   * restart ends them all). That loss is reported once; the supervisor's reconnect is cheap, and
   * sessions reopen on the next message.
   */
  let connected = false;

  function lose(deviceId: string, err: Error) {
    if (!connected || closed) return;
    connected = false;
    disconnectHandler?.(
      new GatewayError(ErrorCodes.PROVIDER_NOT_CONNECTED, `Golioth closed the DTLS session of ${deviceId}`, {
        retryable: true,
        cause: err,
        details: { deviceId },
      }),
    );
  }

  const nameOf = (localId: string) => settings.devices[localId]?.name ?? localId;

  const credentialOf = (localId: string): DeviceCredential | undefined => {
    const d = settings.devices[localId];
    if (d?.psk === undefined) return undefined;
    return { identity: d.identity ?? `${nameOf(localId)}@${settings.projectId}`, psk: d.psk };
  };

  /** Which Golioth device a local id is: by name, by hardware ID, or either (settings.match). */
  const matcher = (devices: readonly GoliothDevice[]) => {
    const byName = new Map(devices.map((d) => [d.name, d]));
    const byHardware = new Map<string, GoliothDevice>();
    for (const d of devices) for (const h of d.hardwareIds ?? []) byHardware.set(h, d);
    return (localId: string): GoliothDevice | undefined => {
      const name = nameOf(localId);
      if (settings.match !== 'hardwareId' && byName.has(name)) return byName.get(name);
      if (settings.match !== 'name') return byHardware.get(localId) ?? byHardware.get(name);
      return undefined;
    };
  };

  const localDevices = (): string[] => {
    const known = new Set(context.knownDevices?.() ?? []);
    for (const id of Object.keys(settings.devices)) known.add(id);
    return [...known];
  };

  const coapError = (deviceId: string, path: string, res: CoapResponse): GatewayError => {
    const what = `Golioth answered ${res.code} to ${deviceId}'s POST ${path}`;
    if (res.code === '4.29') {
      return throttled(what, Math.max(1000, (res.maxAgeSeconds ?? 1) * 1000), deviceId);
    }
    if (res.code === '4.01' || res.code === '4.03') {
      return new GatewayError(ErrorCodes.PROVIDER_AUTH, `${what}: the device's identity may not post there`, {
        retryable: false,
        details: { deviceId, code: res.code },
      });
    }
    if (res.code === '4.13') {
      return new GatewayError(ErrorCodes.PROVIDER_TOO_LARGE, `${what}: the payload is too large`, {
        retryable: false,
        details: { deviceId, code: res.code },
      });
    }
    if (res.code.startsWith('4.')) return rejected(what, { deviceId, code: res.code });
    return new GatewayError(ErrorCodes.PROVIDER_CONNECT, what, {
      retryable: true,
      details: { deviceId, code: res.code },
    });
  };

  const publishTelemetry = async (message: OutboundMessage, deviceId: string, stream: string | undefined) => {
    const credential = credentialOf(deviceId);
    if (credential === undefined) {
      throw new GatewayError(
        ErrorCodes.PROVIDER_AUTH,
        `device ${deviceId} has no PSK in settings.devices: Golioth takes telemetry only over CoAP with the device's own PSK`,
        { retryable: false, details: { deviceId } },
      );
    }
    // `/.s` takes any content format and Pipelines route it (§3.2); the lightdb-stream
    // destination keeps only JSON (§3.1 Ingest), so JSON is labelled as such and anything else
    // goes as octet-stream for a pipeline that transforms it.
    const contentFormat =
      parseJsonObject(message.payload) === undefined ? CONTENT_FORMAT_OCTET_STREAM : CONTENT_FORMAT_JSON;
    let limiter = limiters.get(deviceId);
    if (limiter === undefined) {
      limiter = createRateLimiter({ rate: DEVICE_REQUESTS_PER_SECOND });
      limiters.set(deviceId, limiter);
    }
    const waitMs = limiter.take();
    if (waitMs > 0) throw throttled(`${deviceId} is at Golioth's 20 requests/s`, waitMs, deviceId);
    const path = `/.s/${settings.streamPath}${stream === undefined ? '' : `/${stream}`}`;
    const res = await sessions.request(deviceId, {
      method: 'POST',
      path,
      contentFormat,
      payload: message.payload,
    });
    if (!res.code.startsWith('2.')) throw coapError(deviceId, path, res);
  };

  const goliothIdOf = async (localId: string, signal?: AbortSignal): Promise<string | undefined> => {
    const known = deviceIds.get(localId);
    if (known !== undefined) return known;
    const { devices } = await api.listDevices({ ...(signal ? { signal } : {}) });
    const match = matcher(devices);
    deviceIds = new Map(
      localDevices()
        .concat(localId)
        .flatMap((id) => {
          const d = match(id);
          return d === undefined ? [] : [[id, d.id] as const];
        }),
    );
    return deviceIds.get(localId);
  };

  const publishState = async (message: OutboundMessage, deviceId: string) => {
    const state = parseJsonObject(message.payload);
    if (state === undefined || state === null || typeof state !== 'object' || Array.isArray(state)) {
      throw rejected(`state of ${deviceId} is not a JSON object`, { deviceId });
    }
    const id = await goliothIdOf(deviceId);
    if (id === undefined) {
      throw rejected(
        `Golioth project ${settings.projectId} has no device for ${deviceId}: create it, or map it with settings.devices.${deviceId}.name`,
        {
          deviceId,
        },
      );
    }
    await api.writeState(id, settings.reportedPath, state);
  };

  const provider: Provider = {
    maxInflight: 64,
    maxPayloadBytes: MAX_PAYLOAD_BYTES,
    limits: { maxPublishRate: { perSecond: DEVICE_REQUESTS_PER_SECOND, scope: 'device' } },

    /** Nothing to open: sessions are per device and open with its first message. */
    async connect(signal) {
      if (signal.aborted) {
        throw new GatewayError(ErrorCodes.ABORTED, 'the connect attempt was aborted', { retryable: true });
      }
      if (closed) {
        throw new GatewayError(ErrorCodes.PROVIDER_CLOSED, 'the provider is closed', { retryable: false });
      }
      connected = true;
    },

    async publish(message) {
      if (closed) {
        throw new GatewayError(ErrorCodes.PROVIDER_CLOSED, 'the provider is closed', { retryable: true });
      }
      if (!connected) {
        throw new GatewayError(ErrorCodes.PROVIDER_NOT_CONNECTED, 'the golioth provider is not connected', {
          retryable: true,
        });
      }
      const telemetry = TELEMETRY.exec(message.topic);
      if (telemetry) return publishTelemetry(message, telemetry[1]!, telemetry[2]);
      const state = STATE.exec(message.topic);
      if (state) return publishState(message, state[1]!);
      throw rejected(
        `Golioth takes telemetry and state from devices; ${message.topic} has no Golioth mapping: remove it from the routes`,
        { topic: message.topic },
      );
    },

    onCommand(handler) {
      commandHandler = handler;
    },

    onDisconnect(handler) {
      disconnectHandler = handler;
    },

    async testConnection(signal): Promise<ConnectionTestResult> {
      const details = {
        endpoint: settings.baseUrl,
        projectId: settings.projectId,
        coap: `${settings.coapHost}:${settings.coapPort}`,
        devicesWithPsk: Object.values(settings.devices).filter((d) => d.psk !== undefined).length,
      };
      const started = performance.now();
      try {
        const project = await api.getProject(signal);
        return {
          ok: true,
          latencyMs: Math.round(performance.now() - started),
          details: { ...details, projectName: project.name },
        };
      } catch (err) {
        return failedConnectionTest(started, details, explain(err, settings));
      }
    },

    async import(signal): Promise<SyncResult> {
      const requestsBefore = restStats.requests;
      const { devices, pages } = await api
        .listDevices({ statePath: settings.desiredPath, signal })
        .catch((err) => {
          throw explain(err, settings);
        });
      const match = matcher(devices);
      const locals = localDevices();
      const matched = locals.flatMap((id) => {
        const d = match(id);
        return d === undefined ? [] : [{ localId: id, device: d }];
      });
      deviceIds = new Map(matched.map((m) => [m.localId, m.device.id]));
      let succeeded = 0;
      const failed: { deviceId: string; error: string }[] = [];
      await eachLimited(matched, settings.syncConcurrency, async ({ localId, device }) => {
        try {
          const settingsList = settings.importSettings ? await api.deviceSettings(device.id, signal) : [];
          const desired = {
            state: device.data ?? null,
            ...(settings.importSettings
              ? { settings: Object.fromEntries(settingsList.map((s) => [s.key, s.value])) }
              : {}),
          };
          commandHandler?.({
            topic: `devices/${localId}/desired`,
            payload: Buffer.from(JSON.stringify(desired)),
            qos: 1,
            retain: true,
          });
          succeeded++;
        } catch (err) {
          if (signal.aborted) throw err;
          failed.push({ deviceId: localId, error: errorMessage(err) });
        }
      });
      signal.throwIfAborted();
      return {
        recordsProcessed: matched.length,
        recordsSucceeded: succeeded,
        recordsFailed: failed.length,
        details: {
          cloudDevices: devices.length,
          localDevices: locals.length,
          matched: matched.length,
          pages,
          requests: restStats.requests - requestsBefore,
          ...(failed.length > 0 ? { failures: failed.slice(0, 20) } : {}),
        },
      };
    },

    async export(signal): Promise<SyncResult> {
      const requestsBefore = restStats.requests;
      const reported = context.reportedState?.() ?? new Map<string, Record<string, unknown>>();
      if (reported.size === 0) {
        return { recordsProcessed: 0, recordsSucceeded: 0, recordsFailed: 0, details: { requests: 0 } };
      }
      const { devices, pages } = await api.listDevices({ signal }).catch((err) => {
        throw explain(err, settings);
      });
      const match = matcher(devices);
      let succeeded = 0;
      const failed: { deviceId: string; error: string }[] = [];
      await eachLimited([...reported], settings.syncConcurrency, async ([localId, state]) => {
        const device = match(localId);
        if (device === undefined) {
          failed.push({ deviceId: localId, error: `no Golioth device named ${nameOf(localId)}` });
          return;
        }
        try {
          await api.writeState(device.id, settings.reportedPath, state, signal);
          succeeded++;
        } catch (err) {
          if (signal.aborted) throw err;
          failed.push({ deviceId: localId, error: errorMessage(err) });
        }
      });
      signal.throwIfAborted();
      return {
        recordsProcessed: reported.size,
        recordsSucceeded: succeeded,
        recordsFailed: failed.length,
        details: {
          cloudDevices: devices.length,
          pages,
          path: settings.reportedPath,
          requests: restStats.requests - requestsBefore,
          ...(failed.length > 0 ? { failures: failed.slice(0, 20) } : {}),
        },
      };
    },

    async bidirectionalSync(signal): Promise<SyncResult> {
      const imported = await provider.import(signal);
      return combineSyncResults(imported, await provider.export(signal));
    },

    async close() {
      if (closed) return;
      closed = true;
      await sessions.closeAll();
      await dispatcher?.close();
    },
  };
  return provider;
}

/** One sentence naming the cause and the fix for the REST failures a person can act on. */
function explain(err: unknown, settings: GoliothSettings): GatewayError {
  if (!isGatewayError(err))
    return new GatewayError(ErrorCodes.PROVIDER_CONNECT, errorMessage(err), { retryable: true, cause: err });
  const status = err.details?.status;
  const p = settings.projectId;
  const wrap = (message: string) =>
    new GatewayError(err.code, message, {
      retryable: err.retryable,
      cause: err,
      ...(err.details ? { details: err.details } : {}),
    });
  if (status === 401)
    return wrap(
      'Golioth refused the API key (401): check settings.apiKey (an API key of the project, from the console)',
    );
  if (status === 403) {
    return wrap(
      `the API key has no access to project ${p} (403): an API key works only in its own project; check settings.projectId and settings.apiKey`,
    );
  }
  if (status === 404)
    return wrap(`Golioth has no project ${p} (404): check settings.projectId (the project ID, not its name)`);
  if (err.code === ErrorCodes.PROVIDER_CONNECT && status === undefined) {
    return wrap(
      `cannot reach the Golioth API at ${settings.baseUrl} (${errorMessage(err.cause ?? err)}): check settings.baseUrl and the network`,
    );
  }
  return err;
}
