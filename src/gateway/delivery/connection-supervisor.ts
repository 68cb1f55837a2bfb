import { ErrorCodes, errorMessage, toGatewayError } from '../../errors.js';
import type { Logger } from '../../logger.js';
import type { Provider } from '../../providers/provider.js';
import type { ActivityLog } from '../../store/activity-log.js';
import { createBackoff, type Backoff } from '../../common/backoff.js';

export type SupervisorState = 'connecting' | 'connected' | 'backoff' | 'stopped';

export interface ConnectionSupervisor {
  start(): void;
  /** Aborts a pending connect or backoff wait and closes the provider. */
  stop(): Promise<void>;
  readonly state: SupervisorState;
  readonly connectedSince: number | null;
  readonly lastError: { code: string; message: string; at: number } | null;
  /** Times the link came back after it had been up once. */
  readonly reconnects: number;
  /**
   * Listeners run synchronously on every change; one that throws cannot break the supervisor.
   * `cause` is the error that ended the link when it was lost (a planned reconnect carries
   * GW_ERR_PROVIDER_PLANNED_RECONNECT), absent otherwise.
   */
  onStateChange(listener: (state: SupervisorState, cause?: Error) => void): () => void;
}

export interface ConnectionSupervisorOptions {
  provider: Provider;
  logger: Logger;
  activity: ActivityLog;
  integrationId: string;
  backoff?: Backoff;
  /** ms since epoch, for the status snapshot and activity rows */
  now?: () => number;
  /** The backoff attempt counter resets only after the link stayed up this long (ms). */
  stableAfterMs?: number;
}

/** Failed attempts in a row are recorded as activity on the 1st and then every 10th. */
const RECORD_EVERY = 10;

/**
 * The only owner of reconnects (SPEC §6): connect → connected; on loss → backoff → connect.
 * A link that drops before `stableAfterMs` does not reset the backoff, so a broker that kicks
 * us right after CONNACK (duplicate client id, policy) gets ever longer pauses instead of a
 * tight reconnect loop.
 */
export function createConnectionSupervisor(options: ConnectionSupervisorOptions): ConnectionSupervisor {
  const { provider, activity, integrationId } = options;
  const logger = options.logger.child({ component: 'supervisor' });
  const backoff = options.backoff ?? createBackoff();
  const now = options.now ?? Date.now;
  const stableAfterMs = options.stableAfterMs ?? 10_000;

  let state: SupervisorState = 'stopped';
  let connectedSince: number | null = null;
  let lastError: { code: string; message: string; at: number } | null = null;
  let reconnects = 0;
  let everConnected = false;
  let running: Promise<void> | undefined;
  /** Aborts the connect attempt or the backoff wait in progress. */
  let stopController: AbortController | undefined;
  /** Resolves the wait for the current link to drop. */
  let linkLost: ((error: Error) => void) | undefined;
  let lostBeforeWait: Error | undefined;
  const listeners = new Set<(state: SupervisorState, cause?: Error) => void>();
  /** performance.now() of the last connect attempt, for the provider's minReconnectDelayMs. */
  let lastAttemptAt: number | undefined;

  const setState = (next: SupervisorState, cause?: Error) => {
    if (state === next) return;
    state = next;
    for (const listener of listeners) {
      try {
        listener(next, cause);
      } catch (err) {
        logger.error({ err }, 'state_listener_failed');
      }
    }
  };

  provider.onDisconnect((error) => {
    if (linkLost) {
      const resolve = linkLost;
      linkLost = undefined;
      resolve(error);
    } else {
      lostBeforeWait = error;
    }
  });

  const sleep = (ms: number, signal: AbortSignal) =>
    new Promise<void>((resolve) => {
      if (signal.aborted) return resolve();
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        signal.removeEventListener('abort', done);
        resolve();
      }
      signal.addEventListener('abort', done, { once: true });
    });

  async function run(signal: AbortSignal): Promise<void> {
    let attempt = 0;
    while (!signal.aborted) {
      setState('connecting');
      const started = now();
      lastAttemptAt = performance.now();
      try {
        lostBeforeWait = undefined;
        await provider.connect(signal);
      } catch (err) {
        if (signal.aborted) break;
        const e = toGatewayError(err, ErrorCodes.PROVIDER_CONNECT);
        lastError = { code: e.code, message: e.message, at: now() };
        attempt++;
        logger.warn({ code: e.code, err: e.message, attempt }, 'connect_failed');
        if (attempt === 1 || attempt % RECORD_EVERY === 0) {
          activity.record({
            integrationId,
            activityType: 'connect',
            direction: 'outgoing',
            status: 'failed',
            responseTimeMs: now() - started,
            errorCode: e.code,
            errorMessage: e.message,
            metadata: { attempt },
          });
        }
        await wait(attempt, signal);
        continue;
      }

      if (everConnected) reconnects++;
      everConnected = true;
      connectedSince = now();
      const responseTimeMs = connectedSince - started;
      logger.info({ responseTimeMs, attempt }, 'connected');
      activity.record({
        integrationId,
        activityType: 'connect',
        direction: 'outgoing',
        status: 'success',
        responseTimeMs,
        metadata: { attempt, reconnects },
      });
      setState('connected');

      const lost = await new Promise<Error | undefined>((resolve) => {
        if (lostBeforeWait) return resolve(lostBeforeWait);
        const onAbort = () => resolve(undefined);
        signal.addEventListener('abort', onAbort, { once: true });
        linkLost = (error) => {
          signal.removeEventListener('abort', onAbort);
          resolve(error);
        };
      });
      linkLost = undefined;
      const upFor = now() - (connectedSince ?? now());
      connectedSince = null;
      if (lost === undefined || signal.aborted) break;

      const e = toGatewayError(lost, ErrorCodes.PROVIDER_CONNECT);
      if (e.code === ErrorCodes.PROVIDER_PLANNED_RECONNECT) {
        // The provider replaces its link on purpose (credential renewal): no failure, no
        // backoff, the attempt counter untouched; only the cloud's minimum delay applies.
        logger.info({ reason: e.details?.reason, upForMs: upFor }, 'planned_reconnect');
        activity.record({
          integrationId,
          activityType: 'reconnect',
          direction: 'internal',
          status: 'success',
          metadata: { reason: e.details?.reason ?? e.message, upForMs: upFor },
        });
        await wait(0, signal, e);
        continue;
      }
      lastError = { code: e.code, message: e.message, at: now() };
      if (upFor >= stableAfterMs) attempt = 0;
      attempt++;
      logger.warn({ code: e.code, err: e.message, upForMs: upFor, attempt }, 'disconnected');
      activity.record({
        integrationId,
        activityType: 'disconnect',
        direction: 'outgoing',
        status: 'error',
        errorCode: e.code,
        errorMessage: e.message,
        metadata: { upForMs: upFor, attempt },
      });
      await wait(attempt, signal, e);
    }
  }

  /**
   * Waits before the next attempt: the backoff of `attempt` (none for 0), and at least the
   * provider's minReconnectDelayMs since the previous attempt began (AWS refuses a CONNECT of the
   * same client id sooner than one second after the last).
   */
  async function wait(attempt: number, signal: AbortSignal, cause?: Error): Promise<void> {
    if (signal.aborted) return;
    const minDelayMs = provider.limits?.minReconnectDelayMs ?? 0;
    const sinceLast = lastAttemptAt === undefined ? Infinity : performance.now() - lastAttemptAt;
    const delayMs = Math.max(
      attempt > 0 ? backoff.delay(attempt - 1) : 0,
      Math.ceil(minDelayMs - sinceLast),
      0,
    );
    setState('backoff', cause);
    logger.info({ attempt, delayMs }, 'retry_attempt');
    await sleep(delayMs, signal);
  }

  return {
    get state() {
      return state;
    },
    get connectedSince() {
      return connectedSince;
    },
    get lastError() {
      return lastError;
    },
    get reconnects() {
      return reconnects;
    },
    onStateChange(listener) {
      listeners.add(listener);
      return () => {
        listeners.delete(listener);
      };
    },
    start() {
      if (running) return;
      const controller = new AbortController();
      stopController = controller;
      running = run(controller.signal)
        .catch((err: unknown) => {
          // run() handles every provider error itself; reaching here is a bug worth a loud line.
          logger.error({ err: errorMessage(err) }, 'supervisor_crashed');
        })
        .finally(() => setState('stopped'));
    },
    async stop() {
      stopController?.abort();
      const wasRunning = running;
      running = undefined;
      stopController = undefined;
      if (wasRunning) await wasRunning;
      try {
        await provider.close();
      } catch (err) {
        logger.warn({ err: errorMessage(err) }, 'provider_close_failed');
      }
      setState('stopped');
    },
  };
}
