/**
 * Request/response over MQTT topics: AWS shadow get/update (`clientToken`), Azure twin GET and
 * PATCH (`$rid`), Azure direct-method responses (`$rid`/request id). The tracker knows nothing of
 * topics: the caller publishes the request with the token it is given and hands every response
 * it receives back with the token it carried.
 *
 * API
 * - `createRequestTracker<R>(options)` → `RequestTracker<R>`.
 * - `tracker.request(send, { signal, timeoutMs })`: makes a correlation token, calls
 *   `send(token)` (which publishes the request) once fewer than `maxInFlight` requests are
 *   outstanding (later ones wait in a queue of at most `maxQueued`), and resolves with the
 *   response matched to the token. Rejections, all GatewayErrors:
 *   GW_ERR_PROVIDER_TIMEOUT (retryable) when no response came within `timeoutMs` of sending;
 *   GW_ERR_ABORTED when `signal` aborted (queued or in flight); GW_ERR_PROVIDER_THROTTLED when
 *   the queue is full; the error of `send` itself when the publish failed; the error given to
 *   `rejectAll` (link lost); the error given to `fail(token, error)` (a `rejected` topic, a
 *   non-2xx status).
 * - `tracker.settle(token, response)` / `tracker.fail(token, error)`: a response arrived; true
 *   when it matched a request in flight. A late response (after its timeout) or one with a token
 *   we never sent is ignored and counted in `stats.ignored`.
 * - `tracker.rejectAll(error)`: the link is gone; every request in flight and queued rejects with
 *   `error`, exactly once.
 * - `tracker.stats`: `{ inFlight, queued, ignored, timedOut }` for status and tests.
 * A response may arrive before `send` resolved (the broker delivers `accepted` before our PUBACK):
 * the request is registered before `send` is called.
 */
import { randomUUID } from 'node:crypto';
import { ErrorCodes, GatewayError, toGatewayError } from '../errors.js';
import type { Logger } from '../logger.js';
import { throttled } from './provider.js';

export interface RequestTrackerOptions {
  /** Requests outstanding at once; more wait in the queue (AWS: 10 shadow requests). Default 10. */
  maxInFlight?: number;
  /** Requests waiting beyond `maxInFlight`; more are refused as throttled. Default 1000. */
  maxQueued?: number;
  /** ms from sending to the response; per request overridable. Default 10 s. */
  timeoutMs?: number;
  /** Correlation tokens; a random UUID by default. Must be unique among outstanding requests. */
  token?: () => string;
  /** Names the requests in messages, e.g. `shadow`, `twin`. */
  name?: string;
  logger?: Logger;
}

export interface RequestOptions {
  signal?: AbortSignal;
  timeoutMs?: number;
}

export interface RequestTrackerStats {
  inFlight: number;
  queued: number;
  /** Responses with a token no request in flight carried (late or unknown). */
  ignored: number;
  timedOut: number;
}

export interface RequestTracker<R> {
  request(send: (token: string) => void | Promise<void>, options?: RequestOptions): Promise<R>;
  settle(token: string, response: R): boolean;
  fail(token: string, error: Error): boolean;
  rejectAll(error: Error): void;
  readonly stats: RequestTrackerStats;
}

interface Entry<R> {
  send: (token: string) => void | Promise<void>;
  timeoutMs: number;
  signal: AbortSignal | undefined;
  resolve(response: R): void;
  reject(err: Error): void;
  token?: string;
  timer?: NodeJS.Timeout;
  onAbort?: () => void;
  done: boolean;
}

export function createRequestTracker<R>(options: RequestTrackerOptions = {}): RequestTracker<R> {
  const maxInFlight = Math.max(1, options.maxInFlight ?? 10);
  const maxQueued = Math.max(0, options.maxQueued ?? 1000);
  const defaultTimeoutMs = options.timeoutMs ?? 10_000;
  const makeToken = options.token ?? randomUUID;
  const name = options.name ?? 'request';
  const logger = options.logger;

  const inFlight = new Map<string, Entry<R>>();
  const queue: Entry<R>[] = [];
  let ignored = 0;
  let timedOut = 0;

  function finish(entry: Entry<R>): boolean {
    if (entry.done) return false;
    entry.done = true;
    clearTimeout(entry.timer);
    if (entry.onAbort) entry.signal?.removeEventListener('abort', entry.onAbort);
    if (entry.token !== undefined) inFlight.delete(entry.token);
    else {
      const i = queue.indexOf(entry);
      if (i >= 0) queue.splice(i, 1);
    }
    return true;
  }

  /** Starts queued requests while there is room; a freed slot always calls this. */
  function pump(): void {
    while (inFlight.size < maxInFlight && queue.length > 0) start(queue.shift()!);
  }

  function start(entry: Entry<R>): void {
    let token = makeToken();
    // A token generator that repeats itself must not pair one response with two requests.
    for (let i = 0; inFlight.has(token) && i < 10; i++) token = makeToken();
    if (inFlight.has(token)) {
      entry.done = true;
      entry.reject(
        new GatewayError(
          ErrorCodes.PROVIDER_REJECTED,
          `the ${name} token ${token} is already in use; tokens must be unique`,
          {
            retryable: true,
          },
        ),
      );
      return;
    }
    entry.token = token;
    inFlight.set(token, entry);
    entry.timer = setTimeout(() => {
      if (!finish(entry)) return;
      timedOut++;
      logger?.warn({ token, timeoutMs: entry.timeoutMs }, 'request_timed_out');
      entry.reject(
        new GatewayError(ErrorCodes.PROVIDER_TIMEOUT, `no ${name} response within ${entry.timeoutMs} ms`, {
          retryable: true,
          details: { token },
        }),
      );
      pump();
    }, entry.timeoutMs);
    let sent: void | Promise<void>;
    try {
      sent = entry.send(token);
    } catch (err) {
      sent = Promise.reject(err as Error);
    }
    if (sent instanceof Promise) {
      sent.catch((err: unknown) => {
        if (!finish(entry)) return;
        entry.reject(toGatewayError(err, ErrorCodes.PROVIDER_NOT_CONNECTED));
        pump();
      });
    }
  }

  function complete(token: string, outcome: { response: R } | { error: Error }): boolean {
    const entry = inFlight.get(token);
    if (entry === undefined || !finish(entry)) {
      ignored++;
      logger?.debug({ token }, 'response_ignored');
      return false;
    }
    if ('error' in outcome) entry.reject(outcome.error);
    else entry.resolve(outcome.response);
    pump();
    return true;
  }

  return {
    request(send, requestOptions = {}) {
      const signal = requestOptions.signal;
      if (signal?.aborted) return Promise.reject(abortedError(name));
      if (inFlight.size >= maxInFlight && queue.length >= maxQueued) {
        return Promise.reject(
          throttled(
            `${maxInFlight + maxQueued} ${name} requests are outstanding already; wait`,
            defaultTimeoutMs,
          ),
        );
      }
      return new Promise<R>((resolve, reject) => {
        const entry: Entry<R> = {
          send,
          timeoutMs: requestOptions.timeoutMs ?? defaultTimeoutMs,
          signal,
          resolve,
          reject,
          done: false,
        };
        if (signal) {
          entry.onAbort = () => {
            if (!finish(entry)) return;
            reject(abortedError(name));
            pump();
          };
          signal.addEventListener('abort', entry.onAbort, { once: true });
        }
        queue.push(entry);
        pump();
      });
    },

    settle(token, response) {
      return complete(token, { response });
    },

    fail(token, error) {
      return complete(token, { error });
    },

    rejectAll(error) {
      const all = [...inFlight.values(), ...queue];
      for (const entry of all) if (finish(entry)) entry.reject(error);
    },

    get stats() {
      return { inFlight: inFlight.size, queued: queue.length, ignored, timedOut };
    },
  };
}

function abortedError(name: string): GatewayError {
  return new GatewayError(ErrorCodes.ABORTED, `the ${name} request was aborted`, { retryable: false });
}
