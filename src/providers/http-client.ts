/**
 * An HTTP client for REST clouds (Golioth's management API, AWS/Azure REST sides), on Node's
 * global `fetch`. Shared by providers; no cloud specifics here.
 *
 * API
 * - `createHttpClient(options)` → `HttpClient`; `client.request<T>(req)` resolves with
 *   `{ status, headers, body, requestId, attempts, durationMs }` for a 2xx (or a status listed in
 *   `req.accept`). `body` is parsed JSON when the response says `application/json`, else text.
 * - Every request carries a request id (`options.requestIdHeader`, default `x-request-id`; one id
 *   for a request and all of its retries) and `options.headers()` (called per attempt, so tokens
 *   may be fresh). Secret headers (`authorization`, `x-api-key`, `proxy-authorization`, `cookie`
 *   and `options.secretHeaders`) are `[redacted]` in logs.
 * - Per-attempt timeout (`timeoutMs`) and the caller's `signal`. Retries (`retries`, default 3)
 *   with jittered backoff (src/common/backoff.ts) on 429, 5xx, timeouts and network errors; a
 *   `Retry-After` (seconds or HTTP date) is honoured, capped at `maxRetryAfterMs`. Methods that
 *   are not idempotent (POST, PATCH) are retried only with `req.retry: true`.
 * - Errors are GatewayErrors with `details: { status, method, path, requestId, attempts }`:
 *   401/403 → GW_ERR_PROVIDER_AUTH (not retryable); 404 → GW_ERR_PROVIDER_REJECTED (not
 *   retryable, names the path); 413 → GW_ERR_PROVIDER_TOO_LARGE; other 4xx → GW_ERR_PROVIDER_
 *   REJECTED (not retryable); 429 once retries are spent → `throttled()` with the Retry-After;
 *   5xx → GW_ERR_PROVIDER_REJECTED (retryable); network → GW_ERR_PROVIDER_CONNECT (retryable);
 *   timeout → GW_ERR_PROVIDER_TIMEOUT (retryable); the caller's abort → GW_ERR_ABORTED.
 * - Logs (SPEC §7): `http_request`, `http_response`, `retry_attempt`, each with `requestId`.
 * - `options.report(event)`: one ProviderEvent per request when it ends (activityType =
 *   `req.operation`), for the caller's activity rows.
 */
import { randomUUID } from 'node:crypto';
import { createBackoff, type Backoff } from '../common/backoff.js';
import { ErrorCodes, GatewayError, errorMessage, type ErrorCode } from '../errors.js';
import type { Logger } from '../logger.js';
import { throttled, type ProviderEvent } from './provider.js';

export type HttpMethod = 'GET' | 'HEAD' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';

export interface HttpClientOptions {
  /** e.g. `https://api.golioth.io/v1`; request paths are appended to it. */
  baseUrl: string;
  logger: Logger;
  /** Headers for every attempt (API keys, bearer tokens); called each time. */
  headers?: () => Record<string, string> | Promise<Record<string, string>>;
  /** ms per attempt, headers to the end of the body. Default 30 s. */
  timeoutMs?: number;
  /** Retries after the first attempt. Default 3. */
  retries?: number;
  /** Default: full jitter, 500 ms base, 10 s ceiling. */
  backoff?: Backoff;
  /** Longest Retry-After honoured. Default 60 s. */
  maxRetryAfterMs?: number;
  /** Default `x-request-id`. */
  requestIdHeader?: string;
  requestId?: () => string;
  /** More header names whose values never reach a log line (lower case). */
  secretHeaders?: string[];
  /** One event per request when it ends; the caller turns it into an activity row. */
  report?: (event: ProviderEvent) => void;
  /**
   * The fetch to use; default the global one. A provider that must trust a private CA passes
   * one with its own dispatcher (the global fetch of Node 20 takes no per-client CA).
   */
  fetch?: typeof fetch;
}

export interface HttpRequest {
  method: HttpMethod;
  /** Appended to `baseUrl`; encode path segments yourself. */
  path: string;
  query?: Record<string, string | number | boolean | undefined>;
  /** A plain value is sent as JSON; a string or Buffer as is. */
  body?: unknown;
  headers?: Record<string, string>;
  signal?: AbortSignal;
  timeoutMs?: number;
  /** Names the request in logs and activity, e.g. `get_device`. Default `http_request`. */
  operation?: string;
  /** Retry a POST/PATCH too (the cloud deduplicates it). */
  retry?: boolean;
  /** Statuses returned instead of thrown, e.g. [404] to test for existence. */
  accept?: number[];
}

export interface HttpResponse<T = unknown> {
  status: number;
  headers: Headers;
  body: T;
  requestId: string;
  attempts: number;
  durationMs: number;
}

export interface HttpClient {
  request<T = unknown>(req: HttpRequest): Promise<HttpResponse<T>>;
}

const DEFAULT_SECRET_HEADERS = ['authorization', 'x-api-key', 'proxy-authorization', 'cookie'];
const IDEMPOTENT = new Set<HttpMethod>(['GET', 'HEAD', 'PUT', 'DELETE']);
/** The start of an error body kept in the error details, for a person. */
const ERROR_BODY_CHARS = 300;

/** What one attempt ended with. */
type Outcome =
  | { kind: 'response'; status: number; headers: Headers; text: string }
  | { kind: 'timeout' }
  | { kind: 'aborted' }
  | { kind: 'network'; error: unknown };

export function createHttpClient(options: HttpClientOptions): HttpClient {
  const logger = options.logger;
  const baseUrl = options.baseUrl.replace(/\/+$/, '');
  const retries = Math.max(0, options.retries ?? 3);
  const backoff = options.backoff ?? createBackoff({ baseMs: 500, maxMs: 10_000 });
  const maxRetryAfterMs = options.maxRetryAfterMs ?? 60_000;
  const requestIdHeader = (options.requestIdHeader ?? 'x-request-id').toLowerCase();
  const makeRequestId = options.requestId ?? randomUUID;
  const secret = new Set([
    ...DEFAULT_SECRET_HEADERS,
    ...(options.secretHeaders ?? []).map((h) => h.toLowerCase()),
  ]);

  const redacted = (headers: Record<string, string>) =>
    Object.fromEntries(
      Object.entries(headers).map(([k, v]) => [k, secret.has(k.toLowerCase()) ? '[redacted]' : v]),
    );

  function report(event: ProviderEvent): void {
    if (options.report === undefined) return;
    try {
      options.report(event);
    } catch (err) {
      logger.error({ err }, 'report_failed');
    }
  }

  async function attempt(
    url: string,
    init: { method: HttpMethod; headers: Record<string, string>; body: string | Buffer | undefined },
    timeoutMs: number,
    signal: AbortSignal | undefined,
  ): Promise<Outcome> {
    const timeout = AbortSignal.timeout(timeoutMs);
    const combined = signal ? AbortSignal.any([signal, timeout]) : timeout;
    try {
      const response = await (options.fetch ?? fetch)(url, { ...init, signal: combined });
      // The body is read under the same timeout: a server that stalls mid-body is a timeout too.
      const text = await response.text();
      return { kind: 'response', status: response.status, headers: response.headers, text };
    } catch (err) {
      if (signal?.aborted) return { kind: 'aborted' };
      if (timeout.aborted) return { kind: 'timeout' };
      return { kind: 'network', error: err };
    }
  }

  return {
    async request<T>(req: HttpRequest): Promise<HttpResponse<T>> {
      const requestId = makeRequestId();
      const operation = req.operation ?? 'http_request';
      const log = logger.child({ requestId });
      const url = baseUrl + req.path + queryString(req.query);
      const timeoutMs = req.timeoutMs ?? options.timeoutMs ?? 30_000;
      const mayRetry = req.retry ?? IDEMPOTENT.has(req.method);
      const jsonBody =
        req.body !== undefined &&
        typeof req.body !== 'string' &&
        !Buffer.isBuffer(req.body) &&
        !(req.body instanceof Uint8Array);
      const body =
        req.body === undefined
          ? undefined
          : jsonBody
            ? JSON.stringify(req.body)
            : (req.body as string | Buffer);
      const where = { method: req.method, path: req.path, requestId };
      const started = performance.now();
      let attempts = 0;

      const fail = (err: GatewayError): never => {
        const durationMs = Math.round(performance.now() - started);
        report({
          activityType: operation,
          direction: 'outgoing',
          status: 'failed',
          responseTimeMs: durationMs,
          errorCode: err.code,
          errorMessage: err.message,
          metadata: { ...where, attempts, status: err.details?.status },
        });
        throw err;
      };

      for (;;) {
        if (req.signal?.aborted) fail(abortedError(req));
        attempts++;
        const headers: Record<string, string> = {
          accept: 'application/json',
          ...(jsonBody ? { 'content-type': 'application/json' } : {}),
          ...(options.headers ? await options.headers() : {}),
          ...req.headers,
          [requestIdHeader]: requestId,
        };
        log.info(
          { method: req.method, path: req.path, attempt: attempts, headers: redacted(headers) },
          'http_request',
        );
        const attemptStarted = performance.now();
        const outcome = await attempt(url, { method: req.method, headers, body }, timeoutMs, req.signal);
        const attemptMs = Math.round(performance.now() - attemptStarted);

        let err: GatewayError;
        let retryAfterMs: number | undefined;
        if (outcome.kind === 'aborted') return fail(abortedError(req));
        if (outcome.kind === 'response') {
          log.info({ status: outcome.status, durationMs: attemptMs, attempt: attempts }, 'http_response');
          const ok =
            (outcome.status >= 200 && outcome.status < 300) || (req.accept ?? []).includes(outcome.status);
          if (ok) {
            let parsed: unknown;
            try {
              parsed = parseBody(outcome);
            } catch (e) {
              return fail(e as GatewayError);
            }
            const durationMs = Math.round(performance.now() - started);
            report({
              activityType: operation,
              direction: 'outgoing',
              status: 'success',
              responseTimeMs: durationMs,
              metadata: { ...where, attempts, status: outcome.status },
            });
            return {
              status: outcome.status,
              headers: outcome.headers,
              body: parsed as T,
              requestId,
              attempts,
              durationMs,
            };
          }
          retryAfterMs = parseRetryAfter(outcome.headers.get('retry-after'), maxRetryAfterMs);
          err = statusError(outcome.status, outcome.text, req, { ...where, attempts }, retryAfterMs);
        } else if (outcome.kind === 'timeout') {
          log.warn({ durationMs: attemptMs, attempt: attempts, timeoutMs }, 'http_timeout');
          err = new GatewayError(
            ErrorCodes.PROVIDER_TIMEOUT,
            `${req.method} ${req.path} got no complete response within ${timeoutMs} ms`,
            { retryable: true, details: { ...where, attempts } },
          );
        } else {
          const cause =
            outcome.error instanceof Error && outcome.error.cause instanceof Error
              ? outcome.error.cause
              : outcome.error;
          log.warn({ err: errorMessage(cause), attempt: attempts }, 'http_network_error');
          err = new GatewayError(
            ErrorCodes.PROVIDER_CONNECT,
            `${req.method} ${redactQuery(url)} failed: ${errorMessage(cause)}; check the address and the network`,
            {
              retryable: true,
              cause,
              details: { ...where, attempts, network: (cause as { code?: unknown })?.code },
            },
          );
        }

        const status = outcome.kind === 'response' ? outcome.status : undefined;
        const retryableStatus = status === undefined || status === 429 || status >= 500;
        if (!err.retryable && status !== 429) return fail(err);
        if (!mayRetry || !retryableStatus || attempts > retries) {
          if (status === 429) {
            return fail(
              throttled(
                `${req.method} ${req.path} was throttled (HTTP 429) ${attempts} times; the cloud asked to slow down`,
                retryAfterMs ?? backoff.delay(attempts),
              ),
            );
          }
          return fail(err);
        }
        const delayMs = retryAfterMs ?? backoff.delay(attempts - 1);
        log.warn({ attempt: attempts, delayMs, status, reason: err.code }, 'retry_attempt');
        if (!(await sleep(delayMs, req.signal))) return fail(abortedError(req));
      }
    },
  };
}

function queryString(query: HttpRequest['query']): string {
  if (query === undefined) return '';
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined) params.set(k, String(v));
  const s = params.toString();
  return s === '' ? '' : `?${s}`;
}

/** Query values may be signatures or tokens (SAS `sig`, presigned URLs): errors name only the keys. */
function redactQuery(url: string): string {
  const i = url.indexOf('?');
  if (i < 0) return url;
  const keys = [...new URLSearchParams(url.slice(i + 1)).keys()];
  return `${url.slice(0, i)}?${keys.map((k) => `${k}=…`).join('&')}`;
}

/** `Retry-After` as ms: delta seconds or an HTTP date; capped; undefined when absent or unreadable. */
export function parseRetryAfter(value: string | null, capMs: number, now = Date.now()): number | undefined {
  if (value === null || value.trim() === '') return undefined;
  const text = value.trim();
  let ms: number;
  if (/^\d+$/.test(text)) ms = Number(text) * 1000;
  else {
    const at = Date.parse(text);
    if (Number.isNaN(at)) return undefined;
    ms = at - now;
  }
  return Math.min(capMs, Math.max(0, ms));
}

function parseBody(outcome: { headers: Headers; text: string }): unknown {
  const type = outcome.headers.get('content-type') ?? '';
  if (outcome.text === '' || !/\bjson\b/i.test(type)) return outcome.text;
  try {
    return JSON.parse(outcome.text);
  } catch (err) {
    throw new GatewayError(
      ErrorCodes.PROVIDER_REJECTED,
      `the response claims JSON but does not parse: ${errorMessage(err)}`,
      {
        retryable: false,
        cause: err,
      },
    );
  }
}

function statusError(
  status: number,
  text: string,
  req: HttpRequest,
  where: Record<string, unknown>,
  retryAfterMs: number | undefined,
): GatewayError {
  const details = {
    ...where,
    status,
    body: text.slice(0, ERROR_BODY_CHARS),
    ...(retryAfterMs === undefined ? {} : { retryAfterMs }),
  };
  const what = `${req.method} ${req.path}`;
  let code: ErrorCode = ErrorCodes.PROVIDER_REJECTED;
  let retryable = false;
  let message: string;
  if (status === 401 || status === 403) {
    code = ErrorCodes.PROVIDER_AUTH;
    message = `${what} was refused (HTTP ${status}); check the API key or credentials and their permissions`;
  } else if (status === 404) {
    message = `${what} found nothing (HTTP 404); check the path ${req.path} and the ids in it`;
  } else if (status === 413) {
    code = ErrorCodes.PROVIDER_TOO_LARGE;
    message = `${what} was too large for the cloud (HTTP 413)`;
  } else if (status === 429) {
    retryable = true;
    message = `${what} was throttled (HTTP 429)`;
  } else if (status >= 500) {
    retryable = true;
    message = `${what} failed on the cloud side (HTTP ${status}); try again later`;
  } else {
    message = `${what} was rejected (HTTP ${status}): ${text.slice(0, 120) || 'no body'}`;
  }
  return new GatewayError(code, message, { retryable, details });
}

function abortedError(req: HttpRequest): GatewayError {
  return new GatewayError(ErrorCodes.ABORTED, `${req.method} ${req.path} was aborted`, { retryable: false });
}

/** Resolves true after `ms`, false at once when `signal` aborts. */
function sleep(ms: number, signal: AbortSignal | undefined): Promise<boolean> {
  if (signal?.aborted) return Promise.resolve(false);
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve(true);
    }, ms);
    function onAbort() {
      clearTimeout(timer);
      resolve(false);
    }
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
