import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { isIP, type AddressInfo } from 'node:net';
import { ErrorCodes, GatewayError, errorMessage } from '../../errors.js';
import type { Logger } from '../../logger.js';
import {
  ACTIVITY_STATUSES,
  type ActivityFilter,
  type ActivityLog,
  type ActivityStatus,
} from '../../store/activity-log.js';
import { parseDuration } from '../../config/units.js';
import { DASHBOARD_ASSETS } from './dashboard.js';
import type { Metrics } from './metrics.js';
import type { GatewayStatusSnapshot } from './status.js';

export interface Readiness {
  ready: boolean;
  /** Why not, for a person: "store not writable", "broker not listening". */
  reasons: string[];
}

export interface HttpServerOptions {
  host: string;
  port: number;
  logger: Logger;
  getStatus: () => GatewayStatusSnapshot;
  isReady: () => Readiness;
  activity: ActivityLog;
  /** Serve the dashboard at `/` (config `features.dashboard`). */
  dashboard: boolean;
  /** What /metrics needs: text and its Content-Type (the registry itself stays private). */
  metrics: Pick<Metrics, 'contentType' | 'render'>;
}

export interface HttpServer {
  /** Resolves with the bound address (the real port when `port` is 0). */
  listen(): Promise<{ host: string; port: number }>;
  /** Stops accepting, ends open connections and resolves when the server is closed. Idempotent. */
  close(): Promise<void>;
}

/** Bounds: nothing here needs a body, a long URL or a long-lived request. */
const MAX_URL_LENGTH = 2048;
const MAX_CONNECTIONS = 64;
const HEADERS_TIMEOUT_MS = 10_000;
const REQUEST_TIMEOUT_MS = 15_000;
const KEEP_ALIVE_TIMEOUT_MS = 5_000;
const DEFAULT_ACTIVITY_LIMIT = 100;
const MAX_ACTIVITY_LIMIT = 1000;

const DASHBOARD_CSP = "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

interface Reply {
  status: number;
  contentType: string;
  body: string;
  headers?: Record<string, string>;
}

type Handler = (url: URL) => Reply | Promise<Reply>;

/**
 * The daemon's HTTP side (SPEC §9): health, readiness, status JSON, recent activity, Prometheus
 * metrics and the dashboard. Read-only: GET and HEAD only, bodies refused.
 */
export function createHttpServer(options: HttpServerOptions): HttpServer {
  // the caller passes a child logger carrying component: 'http'
  const logger = options.logger;

  const routes = new Map<string, Handler>([
    ['/healthz', () => json(200, { status: 'ok' })],
    [
      '/readyz',
      () => {
        const r = options.isReady();
        return r.ready
          ? json(200, { status: 'ready', reasons: [] })
          : json(503, { status: 'not_ready', reasons: r.reasons });
      },
    ],
    ['/api/status', () => json(200, options.getStatus())],
    ['/api/activity', (url) => activity(url)],
    [
      '/metrics',
      async () => ({
        status: 200,
        contentType: options.metrics.contentType,
        body: await options.metrics.render(),
      }),
    ],
  ]);
  if (options.dashboard) {
    for (const [path, asset] of Object.entries(DASHBOARD_ASSETS)) {
      routes.set(path, () => ({
        status: 200,
        contentType: asset.contentType,
        body: asset.body,
        headers: { 'Content-Security-Policy': DASHBOARD_CSP, 'X-Frame-Options': 'DENY' },
      }));
    }
  }

  function activity(url: URL): Reply {
    const q = url.searchParams;
    const filter: ActivityFilter = { limit: DEFAULT_ACTIVITY_LIMIT };
    const integration = q.get('integration');
    if (integration) {
      // a name or an id; an id that is not configured any more still finds its old rows
      const match = options
        .getStatus()
        .integrations.find((i) => i.name === integration || i.id === integration);
      filter.integrationId = match?.id ?? integration;
    }
    const status = q.get('status');
    if (status) {
      if (!ACTIVITY_STATUSES.includes(status as ActivityStatus)) {
        return badRequest(`status must be one of ${ACTIVITY_STATUSES.join(', ')}`);
      }
      filter.status = status as ActivityStatus;
    }
    const limit = q.get('limit');
    if (limit) {
      const n = Number(limit);
      if (!Number.isInteger(n) || n < 1 || n > MAX_ACTIVITY_LIMIT) {
        return badRequest(`limit must be a whole number from 1 to ${MAX_ACTIVITY_LIMIT}`);
      }
      filter.limit = n;
    }
    const since = q.get('since');
    if (since) {
      const at = parseSince(since, Date.now());
      if (at === undefined) {
        return badRequest(
          'since must be a duration back from now (30s, 5m, 1h, 7d), an ISO time or ms since epoch',
        );
      }
      filter.since = at;
    }
    return json(200, { rows: options.activity.list(filter) });
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<Reply> {
    const method = req.method ?? 'GET';
    const rawUrl = req.url ?? '/';
    if (rawUrl.length > MAX_URL_LENGTH) return error(414, 'uri_too_long', 'the request URL is too long');
    if (!hostAllowed(req.headers.host, options.host)) {
      // DNS rebinding: a web page must not reach a loopback-only service under its own name
      return error(403, 'forbidden_host', 'requests to this loopback service must use a loopback host name');
    }
    if (hasBody(req)) {
      res.setHeader('Connection', 'close');
      return error(413, 'body_not_accepted', 'this API is read-only and accepts no request body');
    }
    let url: URL;
    try {
      url = new URL(rawUrl, 'http://localhost');
    } catch {
      return error(400, 'bad_request', 'the request URL cannot be parsed');
    }
    const handler = routes.get(url.pathname);
    if (!handler) return error(404, 'not_found', `no such resource: ${url.pathname}`);
    if (method !== 'GET' && method !== 'HEAD') {
      return {
        ...error(405, 'method_not_allowed', `${method} is not allowed here; use GET`),
        headers: { Allow: 'GET, HEAD' },
      };
    }
    return handler(url);
  }

  const server = createServer(
    {
      headersTimeout: HEADERS_TIMEOUT_MS,
      requestTimeout: REQUEST_TIMEOUT_MS,
      keepAliveTimeout: KEEP_ALIVE_TIMEOUT_MS,
    },
    (req, res) => {
      const started = performance.now();
      handle(req, res)
        .catch((err: unknown) => {
          logger.error({ err, method: req.method, path: safePath(req.url) }, 'http_handler_failed');
          return error(500, 'internal_error', 'the gateway could not answer this request; see its log');
        })
        .then((reply) => {
          send(res, reply);
          logger.debug(
            {
              method: req.method,
              path: safePath(req.url),
              status: reply.status,
              durationMs: Math.round(performance.now() - started),
            },
            'http_request_served',
          );
        })
        .catch((err: unknown) => {
          logger.warn({ err }, 'http_response_failed');
          res.destroy();
        });
    },
  );
  server.maxConnections = MAX_CONNECTIONS;
  server.on('clientError', (err: NodeJS.ErrnoException, socket) => {
    logger.debug({ err: errorMessage(err), code: err.code }, 'http_client_error');
    if (socket.writable && !socket.writableEnded)
      socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n');
    else socket.destroy();
  });

  let listening = false;
  let closing: Promise<void> | undefined;

  return {
    listen() {
      return new Promise((resolve, reject) => {
        const onError = (err: NodeJS.ErrnoException) => {
          server.off('listening', onListening);
          reject(listenError(err, options.host, options.port));
        };
        const onListening = () => {
          server.off('error', onError);
          listening = true;
          server.on('error', (err) => logger.error({ err }, 'http_server_error'));
          const addr = server.address() as AddressInfo;
          logger.info({ host: addr.address, port: addr.port }, 'http_listening');
          resolve({ host: addr.address, port: addr.port });
        };
        server.once('error', onError);
        server.once('listening', onListening);
        server.listen(options.port, options.host);
      });
    },
    close() {
      closing ??= new Promise<void>((resolve) => {
        if (!listening) {
          resolve();
          return;
        }
        server.close(() => resolve());
        // keep-alive sockets would otherwise hold close() open until they time out
        server.closeAllConnections();
      });
      return closing;
    },
  };
}

function send(res: ServerResponse, reply: Reply): void {
  res.statusCode = reply.status;
  res.setHeader('Content-Type', reply.contentType);
  res.setHeader('Content-Length', Buffer.byteLength(reply.body));
  res.setHeader('Cache-Control', 'no-store');
  res.setHeader('X-Content-Type-Options', 'nosniff');
  res.setHeader('Referrer-Policy', 'no-referrer');
  for (const [name, value] of Object.entries(reply.headers ?? {})) res.setHeader(name, value);
  // Node omits the body itself for HEAD
  res.end(reply.body);
}

function json(status: number, value: unknown): Reply {
  return { status, contentType: 'application/json; charset=utf-8', body: JSON.stringify(value) };
}

function error(status: number, code: string, message: string): Reply {
  return json(status, { error: code, message });
}

function badRequest(message: string): Reply {
  return error(400, 'bad_request', message);
}

function hasBody(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return (length !== undefined && length !== '0') || req.headers['transfer-encoding'] !== undefined;
}

/** The path without its query, which may carry filter values not worth a log line each. */
function safePath(url: string | undefined): string {
  return (url ?? '/').split('?')[0]!.slice(0, 200);
}

function isLoopback(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase();
  return (
    h === 'localhost' || h.endsWith('.localhost') || h === '::1' || (isIP(h) === 4 && h.startsWith('127.'))
  );
}

/** When bound to loopback only, the Host header must name loopback too. */
function hostAllowed(hostHeader: string | undefined, boundHost: string): boolean {
  if (!isLoopback(boundHost)) return true;
  if (hostHeader === undefined) return true; // HTTP/1.0 clients and raw probes
  const name = /^\[[^\]]*\]/.exec(hostHeader)?.[0] ?? hostHeader.split(':')[0]!;
  return isLoopback(name);
}

/** `30s`/`5m`/`1h`/`7d` back from now, an ISO time, or ms since epoch. */
export function parseSince(input: string, now: number): number | undefined {
  if (/^\d+$/.test(input)) return Number(input);
  const back = parseDuration(input);
  if (back !== undefined) return now - back;
  const t = Date.parse(input);
  return Number.isNaN(t) ? undefined : t;
}

function listenError(err: NodeJS.ErrnoException, host: string, port: number): GatewayError {
  if (err.code === 'EADDRINUSE') {
    return new GatewayError(
      ErrorCodes.LISTEN_IN_USE,
      `port ${port} on ${host} is already in use (http.port); stop the other program or change http.port`,
      { cause: err, details: { host, port } },
    );
  }
  return new GatewayError(
    ErrorCodes.LISTEN_FAILED,
    `cannot listen for HTTP on ${host}:${port} (${err.code ?? errorMessage(err)}); check http.host and http.port`,
    { cause: err, details: { host, port } },
  );
}
