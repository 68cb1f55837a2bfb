import { randomUUID } from 'node:crypto';
import { Agent as HttpAgent, request as httpRequest, type IncomingMessage } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { createBackoff, type Backoff } from '../../common/backoff.js';
import { ErrorCodes, GatewayError } from '../../errors.js';
import type { Logger } from '../../logger.js';
import { throttled, type ProviderEvent } from '../provider.js';

/**
 * JSON over HTTP(S) for the Golioth management API: per-request timeout and abort, retries with
 * jittered backoff on 429 / 5xx / network errors honouring Retry-After (seconds or an HTTP
 * date, capped), an `x-request-id` per request, the SPEC §7 log events (`http_request`,
 * `http_response`, `retry_attempt`) and one provider event per request.
 *
 * On node:https rather than fetch so that a private CA (`settings.ca`, and the tests' CA) can be
 * trusted per client. The provider platform's shared HTTP client (src/providers/http-client.ts)
 * had not landed when this was written; this file is the piece to swap for it.
 */

export interface RestRequest {
  method: 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';
  path: string;
  query?: Record<string, string | number | boolean | undefined>;
  body?: unknown;
  signal?: AbortSignal;
}

export interface RestResponse<T> {
  status: number;
  json: T;
  requestId: string;
  latencyMs: number;
}

export interface RestTransport {
  request<T>(req: RestRequest): Promise<RestResponse<T>>;
  readonly stats: { requests: number; retries: number };
  close(): void;
}

export interface RestTransportOptions {
  baseUrl: string;
  headers: Record<string, string>;
  ca?: Buffer;
  timeoutMs: number;
  maxRetries?: number;
  /** No Retry-After wait is longer than this. */
  maxRetryAfterMs?: number;
  backoff?: Backoff;
  maxSockets?: number;
  logger: Logger;
  report?: (event: ProviderEvent) => void;
}

interface Raw {
  status: number;
  headers: IncomingMessage['headers'];
  text: string;
}

/** `Retry-After: 3` or an HTTP date → ms; undefined when absent or unreadable. */
export function parseRetryAfter(value: string | string[] | undefined, now = Date.now()): number | undefined {
  if (typeof value !== 'string' || value.trim() === '') return undefined;
  if (/^\d+$/.test(value.trim())) return Number(value.trim()) * 1000;
  const at = Date.parse(value);
  return Number.isNaN(at) ? undefined : Math.max(0, at - now);
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

export function createRestTransport(options: RestTransportOptions): RestTransport {
  const base = new URL(options.baseUrl);
  const secure = base.protocol === 'https:';
  const agentOptions = { keepAlive: true, maxSockets: options.maxSockets ?? 16 };
  const agent = secure
    ? new HttpsAgent({ ...agentOptions, ...(options.ca === undefined ? {} : { ca: options.ca }) })
    : new HttpAgent(agentOptions);
  const maxRetries = options.maxRetries ?? 4;
  const maxRetryAfterMs = options.maxRetryAfterMs ?? 60_000;
  const backoff = options.backoff ?? createBackoff({ baseMs: 500, maxMs: 10_000 });
  const stats = { requests: 0, retries: 0 };
  const log = options.logger;

  const once = (url: URL, req: RestRequest, requestId: string): Promise<Raw> =>
    new Promise((resolve, reject) => {
      const body = req.body === undefined ? undefined : Buffer.from(JSON.stringify(req.body));
      const send = secure ? httpsRequest : httpRequest;
      const r = send(
        url,
        {
          method: req.method,
          agent,
          headers: {
            ...options.headers,
            accept: 'application/json',
            'x-request-id': requestId,
            ...(body === undefined
              ? {}
              : { 'content-type': 'application/json', 'content-length': body.length }),
          },
          timeout: options.timeoutMs,
          ...(req.signal === undefined ? {} : { signal: req.signal }),
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () =>
            resolve({
              status: res.statusCode ?? 0,
              headers: res.headers,
              text: Buffer.concat(chunks).toString('utf8'),
            }),
          );
          res.on('error', reject);
        },
      );
      r.on('timeout', () =>
        r.destroy(
          new GatewayError(
            ErrorCodes.PROVIDER_TIMEOUT,
            `no answer from ${url.host} within ${options.timeoutMs} ms`,
            {
              retryable: true,
            },
          ),
        ),
      );
      r.on('error', reject);
      r.end(body);
    });

  async function request<T>(req: RestRequest): Promise<RestResponse<T>> {
    const url = new URL(base.pathname.replace(/\/$/, '') + req.path, base);
    for (const [k, v] of Object.entries(req.query ?? {}))
      if (v !== undefined) url.searchParams.set(k, String(v));
    const requestId = randomUUID();
    const fields = { method: req.method, path: req.path, requestId };
    const started = performance.now();
    for (let attempt = 0; ; attempt++) {
      req.signal?.throwIfAborted();
      stats.requests++;
      log.debug({ ...fields, attempt }, 'http_request');
      const t0 = performance.now();
      let failure: GatewayError;
      let waitMs: number | undefined;
      try {
        const raw = await once(url, req, requestId);
        const latencyMs = Math.round(performance.now() - t0);
        log.debug({ ...fields, attempt, status: raw.status, latencyMs }, 'http_response');
        let json: unknown;
        try {
          json = raw.text === '' ? {} : JSON.parse(raw.text);
        } catch {
          json = undefined;
        }
        if (raw.status >= 200 && raw.status < 300) {
          if (json === undefined) {
            throw new GatewayError(
              ErrorCodes.PROVIDER_REJECTED,
              `${req.method} ${req.path} answered with invalid JSON`,
              {
                details: { status: raw.status, requestId },
              },
            );
          }
          options.report?.({
            activityType: 'http_request',
            direction: 'outgoing',
            status: 'success',
            responseTimeMs: Math.round(performance.now() - started),
            metadata: { ...fields, status: raw.status, attempts: attempt + 1 },
          });
          return { status: raw.status, json: json as T, requestId, latencyMs };
        }
        failure = statusError(raw.status, json, req, requestId);
        if (raw.status === 429) waitMs = parseRetryAfter(raw.headers['retry-after']);
      } catch (err) {
        if (req.signal?.aborted) throw req.signal.reason;
        failure =
          err instanceof GatewayError
            ? err
            : new GatewayError(
                ErrorCodes.PROVIDER_CONNECT,
                `cannot reach ${url.host} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}): check settings.baseUrl and the network`,
                { retryable: true, cause: err, details: { requestId } },
              );
      }
      const status = failure.details?.status as number | undefined;
      const retryable = failure.retryable || status === 429;
      if (!retryable || attempt >= maxRetries) {
        options.report?.({
          activityType: 'http_request',
          direction: 'outgoing',
          status: 'failed',
          responseTimeMs: Math.round(performance.now() - started),
          errorCode: failure.code,
          errorMessage: failure.message,
          metadata: { ...fields, ...(status === undefined ? {} : { status }), attempts: attempt + 1 },
        });
        if (status === 429) {
          throw throttled(failure.message, Math.min(maxRetryAfterMs, waitMs ?? backoff.delay(attempt)));
        }
        throw failure;
      }
      const delayMs = Math.min(maxRetryAfterMs, waitMs ?? backoff.delay(attempt));
      stats.retries++;
      log.info(
        { ...fields, attempt: attempt + 1, delayMs, status, reason: failure.message },
        'retry_attempt',
      );
      await sleep(delayMs, req.signal);
    }
  }

  return {
    request,
    stats,
    close() {
      agent.destroy();
    },
  };
}

/** Golioth's error body is `{code, message, details}` (gRPC status, §3.1 Pagination and errors). */
function statusError(status: number, json: unknown, req: RestRequest, requestId: string): GatewayError {
  const body = (json ?? {}) as { code?: number; message?: string };
  const said = typeof body.message === 'string' && body.message !== '' ? `: ${body.message}` : '';
  const details = { status, grpcCode: body.code, path: req.path, requestId };
  const what = `${req.method} ${req.path} answered ${status}${said}`;
  if (status === 401 || status === 403) {
    return new GatewayError(ErrorCodes.PROVIDER_AUTH, what, { retryable: false, details });
  }
  if (status === 429)
    return new GatewayError(ErrorCodes.PROVIDER_THROTTLED, what, { retryable: true, details });
  if (status >= 500) return new GatewayError(ErrorCodes.PROVIDER_CONNECT, what, { retryable: true, details });
  if (status === 413)
    return new GatewayError(ErrorCodes.PROVIDER_TOO_LARGE, what, { retryable: false, details });
  return new GatewayError(ErrorCodes.PROVIDER_REJECTED, what, { retryable: false, details });
}
