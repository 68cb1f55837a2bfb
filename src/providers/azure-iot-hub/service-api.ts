import { request } from 'node:https';
import { isIP } from 'node:net';
import { randomUUID } from 'node:crypto';
import { ErrorCodes, GatewayError, errorMessage } from '../../errors.js';
import { createSasToken } from './sas.js';

/**
 * The hub's service REST API, for `import` (cloud-protocols.md §2.5): the twin query, paged with
 * `x-ms-continuation`, signed with a service policy (RegistryRead). Node's https, no SDK.
 */
export interface ServiceApi {
  /** Every twin, page by page (`pageSize` ≤ 1000); `onPage` gets each page as it arrives. */
  queryTwins(
    signal: AbortSignal,
    onPage: (twins: ServiceTwin[], meta: PageMeta) => void,
    pageSize?: number,
    maxPages?: number,
  ): Promise<number>;
}

export interface ServiceTwin {
  deviceId: string;
  properties?: { desired?: Record<string, unknown>; reported?: Record<string, unknown> };
}

export interface PageMeta {
  requestId: string;
  status: number;
  latencyMs: number;
  items: number;
}

export interface ServiceApiOptions {
  hostName: string;
  address: string | undefined;
  port: number;
  ca: Buffer | undefined;
  policyName: string;
  key: string;
  apiVersion: string;
  timeoutMs: number;
  /** Called for every request, for activity rows and logs. */
  onRequest(meta: PageMeta & { error?: GatewayError }): void;
}

/** Most pages one query reads: 10,000 pages of 1,000 twins; a loop guard, not a product limit. */
const MAX_PAGES = 10_000;
/** Tries of one page answered 429 or 5xx before giving up. */
const MAX_TRIES = 5;
const TOKEN_TTL_S = 3600;

export function createServiceApi(options: ServiceApiOptions): ServiceApi {
  const endpoint = `https://${options.hostName}${options.port === 443 ? '' : `:${options.port}`}`;

  function post(path: string, body: string, headers: Record<string, string>, signal: AbortSignal) {
    return new Promise<{
      status: number;
      headers: Record<string, string | string[] | undefined>;
      body: string;
    }>((resolve, reject) => {
      const req = request(
        {
          host: options.address ?? options.hostName,
          ...(isIP(options.hostName) ? {} : { servername: options.hostName }),
          port: options.port,
          path,
          method: 'POST',
          ...(options.ca ? { ca: options.ca } : {}),
          headers: {
            'content-type': 'application/json; charset=utf-8',
            'content-length': Buffer.byteLength(body),
            ...headers,
          },
          signal,
          timeout: options.timeoutMs,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () =>
            resolve({
              status: res.statusCode ?? 0,
              headers: res.headers,
              body: Buffer.concat(chunks).toString('utf8'),
            }),
          );
          res.on('error', reject);
        },
      );
      req.on('timeout', () => req.destroy(new Error(`no answer within ${options.timeoutMs} ms`)));
      req.on('error', reject);
      req.end(body);
    });
  }

  return {
    async queryTwins(signal, onPage, pageSize = 1000, maxPages = MAX_PAGES) {
      let continuation: string | undefined;
      let total = 0;
      for (let page = 0; page < Math.min(maxPages, MAX_PAGES); page++) {
        let tries = 0;
        for (;;) {
          const requestId = randomUUID();
          const started = performance.now();
          const auth = createSasToken({
            resource: options.hostName,
            key: options.key,
            policyName: options.policyName,
            expiresAt: Math.floor(Date.now() / 1000) + TOKEN_TTL_S,
          });
          let res: Awaited<ReturnType<typeof post>>;
          try {
            res = await post(
              `/devices/query?api-version=${options.apiVersion}`,
              JSON.stringify({ query: 'SELECT * FROM devices' }),
              {
                authorization: auth,
                'x-ms-max-item-count': String(Math.min(1000, pageSize)),
                'x-ms-client-request-id': requestId,
                ...(continuation ? { 'x-ms-continuation': continuation } : {}),
              },
              signal,
            );
          } catch (err) {
            const error = new GatewayError(
              ErrorCodes.PROVIDER_CONNECT,
              `cannot reach the hub's service API at ${endpoint}: ${errorMessage(err)}; check settings.hostName and settings.service.port`,
              { retryable: true, cause: err, details: { requestId } },
            );
            options.onRequest({
              requestId,
              status: 0,
              latencyMs: Math.round(performance.now() - started),
              items: 0,
              error,
            });
            throw error;
          }
          const latencyMs = Math.round(performance.now() - started);
          if (res.status === 429 || res.status >= 500) {
            const retryAfter = Number(res.headers['retry-after'] ?? 1);
            const error = new GatewayError(
              ErrorCodes.PROVIDER_THROTTLED,
              `the hub's service API answered ${res.status}`,
              {
                retryable: true,
                details: { requestId, status: res.status },
              },
            );
            options.onRequest({ requestId, status: res.status, latencyMs, items: 0, error });
            if (++tries >= MAX_TRIES) throw error;
            await sleep(Math.min(30_000, (Number.isFinite(retryAfter) ? retryAfter : 1) * 1000), signal);
            continue;
          }
          if (res.status === 401 || res.status === 403) {
            const error = new GatewayError(
              ErrorCodes.PROVIDER_AUTH,
              `the hub's service API refused policy ${options.policyName} (HTTP ${res.status}); check settings.service.key and that the policy has RegistryRead`,
              { retryable: false, details: { requestId, status: res.status } },
            );
            options.onRequest({ requestId, status: res.status, latencyMs, items: 0, error });
            throw error;
          }
          if (res.status !== 200) {
            const error = new GatewayError(
              ErrorCodes.PROVIDER_REJECTED,
              `the hub's twin query failed with HTTP ${res.status}: ${res.body.slice(0, 200)}`,
              {
                retryable: false,
                details: { requestId, status: res.status },
              },
            );
            options.onRequest({ requestId, status: res.status, latencyMs, items: 0, error });
            throw error;
          }
          let twins: ServiceTwin[];
          try {
            twins = JSON.parse(res.body) as ServiceTwin[];
            if (!Array.isArray(twins)) throw new Error('not an array');
          } catch (err) {
            throw new GatewayError(
              ErrorCodes.PROVIDER_REJECTED,
              `the hub's twin query answered something that is not a JSON array: ${errorMessage(err)}`,
              {
                retryable: false,
                details: { requestId },
              },
            );
          }
          const meta = { requestId, status: res.status, latencyMs, items: twins.length };
          options.onRequest(meta);
          onPage(twins, meta);
          total += twins.length;
          const next = res.headers['x-ms-continuation'];
          continuation = typeof next === 'string' && next !== '' ? next : undefined;
          break;
        }
        if (continuation === undefined) return total;
      }
      return total;
    },
  };
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted)
      return reject(new GatewayError(ErrorCodes.ABORTED, 'the sync was aborted', { retryable: false }));
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(new GatewayError(ErrorCodes.ABORTED, 'the sync was aborted', { retryable: false }));
    };
    signal.addEventListener('abort', onAbort, { once: true });
  });
}
