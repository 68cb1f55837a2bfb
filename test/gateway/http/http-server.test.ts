import { mkdtempSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ErrorCodes, GatewayError } from '../../../src/errors.js';
import { createHttpServer, type HttpServer, type Readiness } from '../../../src/gateway/http/http-server.js';
import { createMetrics } from '../../../src/gateway/http/metrics.js';
import type { GatewayStatusSnapshot } from '../../../src/gateway/http/status.js';
import { createSilentLogger } from '../../../src/logger.js';
import { createActivityLog, type ActivityLog } from '../../../src/store/activity-log.js';
import { openStore, type Store } from '../../../src/store/database.js';
import { buildSnapshot } from '../../helpers/status-snapshot.js';

const logger = createSilentLogger();

interface Harness {
  base: string;
  port: number;
  server: HttpServer;
  setSnapshot(s: GatewayStatusSnapshot): void;
  setReady(r: Readiness): void;
}

let dir: string;
let store: Store;
let activity: ActivityLog;
const servers: HttpServer[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'gw-http-'));
  store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
  activity = createActivityLog({ db: store.db, gatewayId: 'site-a-gw1', logger });
});

afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.close()));
  store.close();
  rmSync(dir, { recursive: true, force: true });
});

async function start(opts: { dashboard?: boolean; port?: number } = {}): Promise<Harness> {
  let snapshot = buildSnapshot();
  let readiness: Readiness = { ready: true, reasons: [] };
  const getStatus = () => snapshot;
  const server = createHttpServer({
    host: '127.0.0.1',
    port: opts.port ?? 0,
    logger,
    getStatus,
    isReady: () => readiness,
    activity,
    dashboard: opts.dashboard ?? true,
    metrics: createMetrics({ getStatus }),
  });
  servers.push(server);
  const addr = await server.listen();
  return {
    base: `http://127.0.0.1:${addr.port}`,
    port: addr.port,
    server,
    setSnapshot: (s) => (snapshot = s),
    setReady: (r) => (readiness = r),
  };
}

/** Raw request, for headers fetch will not send (Host, a body on GET). */
function rawRequest(
  port: number,
  opts: { method?: string; path: string; headers?: Record<string, string>; body?: string },
): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(
      { host: '127.0.0.1', port, method: opts.method ?? 'GET', path: opts.path, headers: opts.headers },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (body += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
      },
    );
    req.on('error', reject);
    req.end(opts.body);
  });
}

/** `name{labels} value` lines of the Prometheus text format, keyed by `name{labels}`. */
function parseMetrics(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$/.exec(line);
    if (!m) throw new Error(`unparseable metrics line: ${line}`);
    out.set(m[1]!, Number(m[2]));
  }
  return out;
}

describe('health and readiness', () => {
  it('answers /healthz with ok while running', async () => {
    const h = await start();
    const res = await fetch(`${h.base}/healthz`);
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ status: 'ok' });
    expect(res.headers.get('x-content-type-options')).toBe('nosniff');
  });

  it('flips /readyz to 503 with the reasons when the daemon is not ready, and back', async () => {
    const h = await start();
    let res = await fetch(`${h.base}/readyz`);
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ status: 'ready', reasons: [] });

    h.setReady({ ready: false, reasons: ['store not writable', 'broker not listening'] });
    res = await fetch(`${h.base}/readyz`);
    expect(res.status).toBe(503);
    expect(await res.json()).toEqual({
      status: 'not_ready',
      reasons: ['store not writable', 'broker not listening'],
    });

    h.setReady({ ready: true, reasons: [] });
    expect((await fetch(`${h.base}/readyz`)).status).toBe(200);
  });
});

describe('/api/status', () => {
  it('returns the current snapshot as JSON', async () => {
    const h = await start();
    const snapshot = buildSnapshot({ gatewayId: 'gw-status-test' });
    h.setSnapshot(snapshot);
    const res = await fetch(`${h.base}/api/status`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^application\/json/);
    expect(res.headers.get('cache-control')).toBe('no-store');
    expect(await res.json()).toEqual(snapshot);
  });
});

describe('/api/activity', () => {
  const xId = '0190a1b2-0000-7000-8000-000000000001';
  const awsId = '0190a1b2-0000-7000-8000-000000000002';

  beforeEach(() => {
    activity.record({
      integrationId: xId,
      activityType: 'delivery',
      direction: 'outgoing',
      status: 'success',
    });
    activity.record({
      integrationId: awsId,
      activityType: 'connect',
      direction: 'outgoing',
      status: 'failed',
      errorCode: 'GW_ERR_PROVIDER_CONNECT',
      errorMessage: 'connect ECONNREFUSED',
    });
    activity.record({ integrationId: xId, activityType: 'sync', direction: 'incoming', status: 'error' });
    activity.record({
      integrationId: null,
      activityType: 'config_reload',
      direction: 'internal',
      status: 'success',
    });
  });

  async function rows(base: string, query: string): Promise<Array<Record<string, unknown>>> {
    const res = await fetch(`${base}/api/activity${query}`);
    expect(res.status).toBe(200);
    return ((await res.json()) as { rows: Array<Record<string, unknown>> }).rows;
  }

  it('lists the newest rows first', async () => {
    const h = await start();
    const all = await rows(h.base, '');
    expect(all.map((r) => r.activityType)).toEqual(['config_reload', 'sync', 'connect', 'delivery']);
    expect(all[2]).toMatchObject({ errorCode: 'GW_ERR_PROVIDER_CONNECT', integrationId: awsId });
  });

  it('filters by integration name or id, by status, and limits', async () => {
    const h = await start();
    expect((await rows(h.base, '?integration=x')).map((r) => r.activityType)).toEqual(['sync', 'delivery']);
    expect((await rows(h.base, `?integration=${awsId}`)).map((r) => r.activityType)).toEqual(['connect']);
    expect((await rows(h.base, '?status=failed')).map((r) => r.activityType)).toEqual(['connect']);
    expect((await rows(h.base, '?integration=x&status=error')).map((r) => r.activityType)).toEqual(['sync']);
    expect(await rows(h.base, '?limit=2')).toHaveLength(2);
  });

  it('filters by since, as a duration back from now or as ms since epoch', async () => {
    const h = await start();
    expect(await rows(h.base, '?since=1h')).toHaveLength(4);
    expect(await rows(h.base, `?since=${Date.now() + 60_000}`)).toHaveLength(0);
  });

  it('refuses bad filter values with 400 and a message', async () => {
    const h = await start();
    for (const q of ['?status=bogus', '?limit=0', '?limit=abc', '?limit=100000', '?since=yesterday-ish']) {
      const res = await fetch(`${h.base}/api/activity${q}`);
      expect(res.status, q).toBe(400);
      const body = (await res.json()) as { error: string; message: string };
      expect(body.error).toBe('bad_request');
      expect(body.message.length).toBeGreaterThan(10);
    }
  });
});

describe('/metrics', () => {
  it('exposes the snapshot figures in Prometheus text format', async () => {
    const h = await start();
    const res = await fetch(`${h.base}/metrics`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
    const m = parseMetrics(await res.text());

    expect(m.get('iot_gateway_queue_depth{integration="x",type="mqtt"}')).toBe(42);
    expect(m.get('iot_gateway_queue_bytes{integration="x",type="mqtt"}')).toBe(4096);
    expect(m.get('iot_gateway_queue_oldest_age_seconds{integration="x",type="mqtt"}')).toBe(1.5);
    expect(m.get('iot_gateway_dead_letters{integration="x",type="mqtt"}')).toBe(4);
    expect(m.get('iot_gateway_inflight{integration="x",type="mqtt"}')).toBe(2);
    expect(m.get('iot_gateway_parked_devices{integration="x",type="mqtt"}')).toBe(1);
    expect(m.get('iot_gateway_throttled_total{integration="x",type="mqtt"}')).toBe(5);
    expect(m.get('iot_gateway_connections')).toBe(2);
    expect(m.get('iot_gateway_messages_in_total')).toBe(12_345);
    expect(m.get('iot_gateway_auth_failures_total')).toBe(3);
    expect(m.get('iot_gateway_connections_refused_total{reason="connect_rate"}')).toBe(7);
    expect(m.get('iot_gateway_connections_refused_total{reason="login_backoff"}')).toBe(2);
    expect(m.get('iot_gateway_messages_out_total{integration="x",type="mqtt"}')).toBe(100);
    expect(m.get('iot_gateway_messages_dropped_total{integration="x",type="mqtt",reason="expired"}')).toBe(2);
    expect(
      m.get('iot_gateway_messages_dropped_total{integration="x",type="mqtt",reason="dead_letter"}'),
    ).toBe(4);
    expect(m.get('iot_gateway_integration_up{integration="x",type="mqtt"}')).toBe(1);
    expect(m.get('iot_gateway_integration_up{integration="aws-main",type="aws-iot"}')).toBe(0);
    expect(
      m.get('iot_gateway_integration_state{integration="aws-main",type="aws-iot",state="backoff"}'),
    ).toBe(1);
    expect(
      m.get('iot_gateway_integration_state{integration="aws-main",type="aws-iot",state="connected"}'),
    ).toBe(0);
    expect(m.get('iot_gateway_replication_pending_rows')).toBe(12);
    expect(m.get('iot_gateway_replication_lag_seconds')).toBe(4);
    expect(m.get('iot_gateway_replicated_rows_total')).toBe(1000);
    expect(m.get('iot_gateway_config_last_reload_success')).toBe(1);
    // the private registry still carries Node's process metrics
    expect(m.has('process_resident_memory_bytes')).toBe(true);
  });

  it('reflects a refused config reload and a changed queue on the next scrape', async () => {
    const h = await start();
    const base = buildSnapshot();
    h.setSnapshot({
      ...base,
      integrations: [{ ...base.integrations[0]!, queue: { ...base.integrations[0]!.queue, depth: 7 } }],
      config: { ...base.config, lastError: { message: 'bad yaml', issues: [], at: base.now } },
    });
    const m = parseMetrics(await (await fetch(`${h.base}/metrics`)).text());
    expect(m.get('iot_gateway_queue_depth{integration="x",type="mqtt"}')).toBe(7);
    expect(m.get('iot_gateway_config_last_reload_success')).toBe(0);
    // a removed integration's series disappear instead of freezing at their last value
    expect([...m.keys()].some((k) => k.includes('integration="aws-main"'))).toBe(false);
  });
});

describe('dashboard', () => {
  it('serves the page and its assets with a same-origin CSP and nosniff', async () => {
    const h = await start();
    const page = await fetch(`${h.base}/`);
    expect(page.status).toBe(200);
    expect(page.headers.get('content-type')).toMatch(/^text\/html/);
    expect(page.headers.get('content-security-policy')).toMatch(/^default-src 'self'/);
    expect(page.headers.get('x-content-type-options')).toBe('nosniff');
    const html = await page.text();
    expect(html).toContain('<script src="/app.js"');

    const js = await fetch(`${h.base}/app.js`);
    expect(js.headers.get('content-type')).toMatch(/^text\/javascript/);
    expect(await js.text()).toContain('/api/status');
    const css = await fetch(`${h.base}/style.css`);
    expect(css.headers.get('content-type')).toMatch(/^text\/css/);
    expect(await css.text()).toContain('.row-failed');
  });

  it('is absent when disabled, while the API still answers', async () => {
    const h = await start({ dashboard: false });
    expect((await fetch(`${h.base}/`)).status).toBe(404);
    expect((await fetch(`${h.base}/app.js`)).status).toBe(404);
    expect((await fetch(`${h.base}/api/status`)).status).toBe(200);
  });
});

describe('requests outside the API', () => {
  it('answers unknown paths with 404 JSON', async () => {
    const h = await start();
    const res = await fetch(`${h.base}/nope`);
    expect(res.status).toBe(404);
    expect(await res.json()).toMatchObject({ error: 'not_found' });
  });

  it('answers other methods with 405 and Allow', async () => {
    const h = await start();
    for (const method of ['POST', 'PUT', 'DELETE']) {
      const res = await rawRequest(h.port, { method, path: '/api/status' });
      expect(res.status, method).toBe(405);
      expect(res.headers.allow).toBe('GET, HEAD');
      expect(JSON.parse(res.body)).toMatchObject({ error: 'method_not_allowed' });
    }
  });

  it('answers HEAD without a body', async () => {
    const h = await start();
    const res = await rawRequest(h.port, { method: 'HEAD', path: '/healthz' });
    expect(res.status).toBe(200);
    expect(res.body).toBe('');
  });

  it('refuses request bodies and over-long URLs', async () => {
    const h = await start();
    const body = '{"a":1}';
    for (const method of ['GET', 'POST']) {
      const withBody = await rawRequest(h.port, {
        method,
        path: '/api/status',
        body,
        headers: { 'content-type': 'application/json', 'content-length': String(body.length) },
      });
      expect(withBody.status, method).toBe(413);
    }
    const chunked = await rawRequest(h.port, {
      method: 'POST',
      path: '/api/status',
      body,
      headers: { 'transfer-encoding': 'chunked' },
    });
    expect(chunked.status).toBe(413);
    const longUrl = await rawRequest(h.port, { path: `/api/activity?integration=${'a'.repeat(3000)}` });
    expect(longUrl.status).toBe(414);
  });

  it('refuses a foreign Host header on a loopback bind (DNS rebinding)', async () => {
    const h = await start();
    const evil = await rawRequest(h.port, {
      path: '/api/status',
      headers: { host: `attacker.example:${h.port}` },
    });
    expect(evil.status).toBe(403);
    for (const host of [`localhost:${h.port}`, `127.0.0.1:${h.port}`, `[::1]:${h.port}`]) {
      expect((await rawRequest(h.port, { path: '/api/status', headers: { host } })).status, host).toBe(200);
    }
  });
});

describe('listen and close', () => {
  it('reports a port in use as GW_ERR_LISTEN_IN_USE naming http.port', async () => {
    const h = await start();
    const err = await start({ port: h.port }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GatewayError);
    expect((err as GatewayError).code).toBe(ErrorCodes.LISTEN_IN_USE);
    expect((err as GatewayError).message).toBe(
      `port ${h.port} on 127.0.0.1 is already in use (http.port); stop the other program or change http.port`,
    );
  });

  it('closes with keep-alive connections open, and close is idempotent', async () => {
    const h = await start();
    expect((await fetch(`${h.base}/healthz`)).status).toBe(200); // leaves a keep-alive socket
    await h.server.close();
    await h.server.close();
    await expect(fetch(`${h.base}/healthz`)).rejects.toThrow();
  });
});
