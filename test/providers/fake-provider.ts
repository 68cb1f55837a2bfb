import { ErrorCodes, GatewayError } from '../../src/errors.js';
import {
  deviceUnavailable,
  plannedReconnect,
  throttled,
  type InboundMessage,
  type OutboundMessage,
  type Provider,
  type ProviderContext,
  type ProviderFactory,
  type ProviderLimits,
} from '../../src/providers/provider.js';

/**
 * An in-memory cloud and the provider that talks to it, for testing what sits above a provider
 * (the forwarder, the supervisor, the gateway) without a broker. The cloud side has knobs a test
 * turns while the provider runs: acknowledgement delay or hold, throttling, one device's link
 * failing, a dropped link, a planned reconnect, a stalled or refused CONNECT, a message that
 * drops the link. It records what it received and what it acknowledged.
 *
 * The provider keeps the interface's promises (SPEC §6): one attempt per `connect`, `publish`
 * resolves at the cloud's ack, a lost link fails pending publishes with a retryable
 * GW_ERR_PROVIDER_NOT_CONNECTED and is reported once, `close` fails them with
 * GW_ERR_PROVIDER_CLOSED. The contract suite (contract.ts) checks it like any other provider.
 */
export interface FakeCloud {
  /** Every publish that reached the cloud (acknowledged or not), in arrival order. */
  readonly received: readonly OutboundMessage[];
  /** performance.now() of each arrival in `received`. */
  readonly receivedAt: readonly number[];
  /** Publishes the cloud acknowledged, in ack order. */
  readonly published: readonly OutboundMessage[];
  /** Local presence the provider was told about, in order. */
  readonly presence: readonly { deviceId: string; online: boolean }[];
  /** Accepted CONNECTs, and the performance.now() of each connect attempt. */
  readonly connects: number;
  readonly connectAttempts: readonly number[];
  /** The most unacknowledged publishes seen at once on one link. */
  readonly peakInflight: number;
  /** Publishes refused as throttled, and as device-unavailable. */
  readonly throttledCount: number;
  readonly deviceFailures: number;
  readonly connected: boolean;
  /** The context of every factory call, in order (report, knownDevices, reportedState). */
  readonly contexts: readonly ProviderContext[];
  /** The provider of the current (or last) factory call. */
  readonly provider: Provider;
  /** A ProviderFactory for gateway tests; every call makes a fresh provider on this cloud. */
  readonly factory: ProviderFactory;

  /** Acknowledge each publish after this many ms (0: on the next turn of the event loop). */
  setAckDelay(ms: number): void;
  /** Keep every acknowledgement until `releaseAcks`. */
  holdAcks(): void;
  /** Sends the held acknowledgements and stops holding; with `count`, only the oldest `count`, and holds on. */
  releaseAcks(count?: number): void;
  /** Refuse the next `n` publishes as throttled (link-wide, or for `deviceId` only). */
  throttleNext(n: number, retryAfterMs: number, deviceId?: string): void;
  /** Refuse this device's publishes as device-unavailable until `restoreDevice`. */
  failDevice(deviceId: string, retryAfterMs: number): void;
  restoreDevice(deviceId: string): void;
  /** Refuse CONNECTs (retryable) until `acceptConnects`. */
  refuseConnects(): void;
  acceptConnects(): void;
  /** Leave CONNECTs unanswered until `releaseConnects` (an attempt then waits for its abort). */
  stallConnects(): void;
  releaseConnects(): void;
  /** Drops the link from the cloud side, as a network loss. */
  dropLink(): void;
  /** Drops the link whenever a publish matches (a broker that closes on a forbidden topic). */
  dropLinkOn(predicate: ((message: OutboundMessage) => boolean) | undefined): void;
  /**
   * The provider replaces its link on purpose (credential renewal). `settle: 'ack'` lets the
   * in-flight publishes be acknowledged first; `'fail'` fails them back with the planned error.
   */
  plannedReconnect(settle?: 'ack' | 'fail'): void;
  /** Sends a cloud → device message to the provider's command handler. */
  sendCommand(message: InboundMessage): void;
}

export interface FakeCloudOptions {
  maxInflight?: number;
  maxPayloadBytes?: number;
  limits?: ProviderLimits;
  /** ms before a CONNECT is accepted (0: next turn). */
  connectDelayMs?: number;
}

interface Pending {
  message: OutboundMessage;
  link: number;
  timer: NodeJS.Timeout | undefined;
  resolve(): void;
  reject(err: GatewayError): void;
}

export function createFakeCloud(options: FakeCloudOptions = {}): FakeCloud {
  const received: OutboundMessage[] = [];
  const receivedAt: number[] = [];
  const published: OutboundMessage[] = [];
  const presence: { deviceId: string; online: boolean }[] = [];
  const connectAttempts: number[] = [];
  const contexts: ProviderContext[] = [];
  let connects = 0;
  let peakInflight = 0;
  let throttledCount = 0;
  let deviceFailures = 0;
  let ackDelayMs = 0;
  let holding = false;
  let throttle = { left: 0, retryAfterMs: 0, deviceId: undefined as string | undefined };
  const failedDevices = new Map<string, number>();
  let refusing = false;
  let stalled = false;
  const stallWaiters = new Set<() => void>();
  let dropOn: ((message: OutboundMessage) => boolean) | undefined;

  /** The current link: a number bumped on every connect and loss; 0 = none. */
  let link = 0;
  let nextLink = 1;
  const pending = new Set<Pending>();
  let current: FakeProviderHandle | undefined;

  interface FakeProviderHandle {
    provider: Provider;
    lost(error: Error): void;
    command(message: InboundMessage): void;
  }

  function ack(p: Pending): void {
    if (!pending.has(p)) return;
    pending.delete(p);
    published.push(p.message);
    p.resolve();
  }

  function scheduleAck(p: Pending): void {
    if (holding) return;
    p.timer = ackDelayMs > 0 ? setTimeout(() => ack(p), ackDelayMs) : setTimeout(() => ack(p), 0);
  }

  function failPending(err: GatewayError): void {
    for (const p of [...pending]) {
      clearTimeout(p.timer);
      pending.delete(p);
      p.reject(err);
    }
  }

  /** Ends the current link; reports the loss to the provider's handler when `report`. */
  function endLink(err: GatewayError, report: Error | undefined): void {
    if (link === 0) return;
    link = 0;
    failPending(err);
    if (report) current?.lost(report);
  }

  function makeProvider(context?: ProviderContext): Provider {
    if (context) contexts.push(context);
    let closed = false;
    let commandHandler: ((message: InboundMessage) => void) | undefined;
    let disconnectHandler: ((error: Error) => void) | undefined;
    const provider: Provider = {
      maxInflight: options.maxInflight ?? 100,
      maxPayloadBytes: options.maxPayloadBytes ?? 256 * 1024,
      ...(options.limits ? { limits: options.limits } : {}),
      async connect(signal) {
        connectAttempts.push(performance.now());
        if (closed) throw closed_();
        if (signal.aborted) throw aborted();
        // A new connect replaces the previous link without reporting it lost.
        endLink(notConnected('the previous connection was replaced'), undefined);
        await new Promise<void>((resolve, reject) => {
          const onAbort = () => {
            stallWaiters.delete(proceed);
            clearTimeout(timer);
            reject(aborted());
          };
          let timer: NodeJS.Timeout | undefined;
          function proceed() {
            stallWaiters.delete(proceed);
            timer = setTimeout(() => {
              signal.removeEventListener('abort', onAbort);
              if (refusing)
                reject(
                  new GatewayError(ErrorCodes.PROVIDER_CONNECT, 'the fake cloud refused the connection', {
                    retryable: true,
                  }),
                );
              else resolve();
            }, options.connectDelayMs ?? 0);
          }
          signal.addEventListener('abort', onAbort, { once: true });
          if (stalled) stallWaiters.add(proceed);
          else proceed();
        });
        if (closed) throw closed_();
        connects++;
        link = nextLink++;
      },
      publish(message) {
        if (closed) return Promise.reject(closed_());
        if (link === 0) return Promise.reject(notConnected('not connected to the fake cloud'));
        if (message.payload.length > provider.maxPayloadBytes) {
          return Promise.reject(
            new GatewayError(
              ErrorCodes.PROVIDER_TOO_LARGE,
              `a ${message.payload.length}-byte payload is larger than the fake cloud takes`,
              {
                retryable: false,
              },
            ),
          );
        }
        if (
          throttle.left > 0 &&
          (throttle.deviceId === undefined || throttle.deviceId === message.deviceId)
        ) {
          throttle.left--;
          throttledCount++;
          return Promise.reject(
            throttled('the fake cloud throttles', throttle.retryAfterMs, throttle.deviceId),
          );
        }
        const deviceRetry = failedDevices.get(message.deviceId);
        if (deviceRetry !== undefined) {
          deviceFailures++;
          return Promise.reject(
            deviceUnavailable(
              message.deviceId,
              `the fake cloud refuses device ${message.deviceId}`,
              deviceRetry,
            ),
          );
        }
        received.push(message);
        receivedAt.push(performance.now());
        if (dropOn?.(message)) {
          const result = Promise.reject(notConnected('the fake cloud dropped the link on this message'));
          queueMicrotask(() => endLink(notConnected('the fake cloud dropped the link'), lostError()));
          return result;
        }
        return new Promise<void>((resolve, reject) => {
          const p: Pending = { message, link, timer: undefined, resolve, reject };
          pending.add(p);
          peakInflight = Math.max(peakInflight, pending.size);
          scheduleAck(p);
        });
      },
      onCommand(handler) {
        commandHandler = handler;
      },
      onDisconnect(handler) {
        disconnectHandler = handler;
      },
      onDevicePresence(deviceId, online) {
        presence.push({ deviceId, online });
      },
      testConnection() {
        return Promise.resolve({ ok: !refusing, latencyMs: 0, details: { cloud: 'fake' } });
      },
      import() {
        return Promise.resolve({ recordsProcessed: 0, recordsSucceeded: 0, recordsFailed: 0 });
      },
      export() {
        return Promise.resolve({ recordsProcessed: 0, recordsSucceeded: 0, recordsFailed: 0 });
      },
      bidirectionalSync() {
        return Promise.resolve({ recordsProcessed: 0, recordsSucceeded: 0, recordsFailed: 0 });
      },
      close() {
        if (closed) return Promise.resolve();
        closed = true;
        if (current?.provider === provider) endLink(closed_(), undefined);
        return Promise.resolve();
      },
    };
    current = {
      provider,
      lost: (error) => {
        if (!closed) disconnectHandler?.(error);
      },
      command: (message) => commandHandler?.(message),
    };
    return provider;
  }

  const cloud: FakeCloud = {
    get received() {
      return received;
    },
    get receivedAt() {
      return receivedAt;
    },
    get published() {
      return published;
    },
    get presence() {
      return presence;
    },
    get connects() {
      return connects;
    },
    get connectAttempts() {
      return connectAttempts;
    },
    get peakInflight() {
      return peakInflight;
    },
    get throttledCount() {
      return throttledCount;
    },
    get deviceFailures() {
      return deviceFailures;
    },
    get connected() {
      return link !== 0;
    },
    get contexts() {
      return contexts;
    },
    get provider() {
      return (current ?? { provider: makeProvider() }).provider;
    },
    factory: (context) => makeProvider(context),
    setAckDelay(ms) {
      ackDelayMs = ms;
    },
    holdAcks() {
      holding = true;
    },
    releaseAcks(count = Infinity) {
      const held = [...pending].filter((p) => p.timer === undefined).slice(0, count);
      const was = holding;
      holding = false;
      for (const p of held) scheduleAck(p);
      holding = was && count !== Infinity;
    },
    throttleNext(n, retryAfterMs, deviceId) {
      throttle = { left: n, retryAfterMs, deviceId };
    },
    failDevice(deviceId, retryAfterMs) {
      failedDevices.set(deviceId, retryAfterMs);
    },
    restoreDevice(deviceId) {
      failedDevices.delete(deviceId);
    },
    refuseConnects() {
      refusing = true;
    },
    acceptConnects() {
      refusing = false;
    },
    stallConnects() {
      stalled = true;
    },
    releaseConnects() {
      stalled = false;
      for (const proceed of [...stallWaiters]) proceed();
    },
    dropLink() {
      endLink(notConnected('the fake cloud dropped the link'), lostError());
    },
    dropLinkOn(predicate) {
      dropOn = predicate;
    },
    plannedReconnect(settle = 'fail') {
      if (link === 0) return;
      const error = plannedReconnect('the fake cloud renews its credentials');
      if (settle === 'ack') {
        for (const p of [...pending]) {
          clearTimeout(p.timer);
          ack(p);
        }
      }
      // The handler hears of the replacement first, then in-flight work fails back with the
      // same planned error: neither counts as a failure.
      current?.lost(error);
      link = 0;
      failPending(error);
    },
    sendCommand(message) {
      current?.command(message);
    },
  };
  return cloud;
}

function lostError(): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_CONNECT, 'the connection to the fake cloud was lost', {
    retryable: true,
  });
}

function notConnected(message: string): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_NOT_CONNECTED, message, { retryable: true });
}

function closed_(): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_CLOSED, 'the provider was closed', { retryable: true });
}

function aborted(): GatewayError {
  return new GatewayError(ErrorCodes.ABORTED, 'the connection attempt was aborted', { retryable: false });
}
