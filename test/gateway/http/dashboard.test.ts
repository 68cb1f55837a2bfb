import { mkdirSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium, type Browser, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHttpServer, type HttpServer } from '../../../src/gateway/http/http-server.js';
import { createMetrics } from '../../../src/gateway/http/metrics.js';
import { createSilentLogger } from '../../../src/logger.js';
import { createActivityLog, type ActivityEntry } from '../../../src/store/activity-log.js';
import { openStore, type Store } from '../../../src/store/database.js';
import { buildIntegration, buildSnapshot } from '../../helpers/status-snapshot.js';

/** Written on every run so a person can look at the page (CI keeps it as an artifact). */
const SCREENSHOT = fileURLToPath(new URL('../../../test-output/dashboard.png', import.meta.url));
const WAIT = { timeout: 15_000 };

const X_ID = '0190a1b2-0000-7000-8000-000000000001';
const AWS_ID = '0190a1b2-0000-7000-8000-000000000002';
const AZ_ID = '0190a1b2-0000-7000-8000-000000000003';
const XSS = '<img src=x onerror="document.body.dataset.pwned=1">';

const logger = createSilentLogger();
let dir: string;
let store: Store;
let server: HttpServer;
let browser: Browser;
let page: Page;
let base: string;
const pageErrors: string[] = [];

const now = Date.now();
const base0 = buildSnapshot({ now });
const snapshot = buildSnapshot({
  now,
  integrations: [
    buildIntegration({ name: 'x', id: X_ID, type: 'mqtt', lastAckAt: now - 1_200 }),
    buildIntegration({
      name: 'aws-main',
      id: AWS_ID,
      type: 'aws-iot',
      state: 'backoff',
      connectedSince: null,
      lastAckAt: now - 420_000,
      reconnects: 7,
      queue: { ...base0.integrations[0]!.queue, depth: 1834, bytes: 3_400_000, oldestAgeMs: 420_000 },
      lastError: {
        code: 'GW_ERR_PROVIDER_CONNECT',
        message: 'connect ECONNREFUSED 10.1.1.1:8883',
        at: now - 30_000,
      },
    }),
    buildIntegration({
      name: 'azure-hub',
      id: AZ_ID,
      type: 'azure-iot-hub',
      state: 'degraded',
      lastAckAt: now - 95_000,
      queue: {
        ...base0.integrations[0]!.queue,
        depth: 310,
        bytes: 51_200,
        oldestAgeMs: 95_000,
        deadLetters: 0,
      },
    }),
  ],
  config: {
    ...base0.config,
    lastError: {
      message: 'the edit to gateway.yaml was refused',
      issues: [{ path: 'integrations[2].type', message: 'unknown integration type "azure"', line: 41 }],
      at: now - 90_000,
    },
  },
});

const entries: ActivityEntry[] = [
  {
    integrationId: X_ID,
    activityType: 'delivery',
    direction: 'outgoing',
    status: 'success',
    responseTimeMs: 38,
  },
  {
    integrationId: AWS_ID,
    activityType: 'connect',
    direction: 'outgoing',
    status: 'failed',
    responseTimeMs: 5003,
    errorCode: 'GW_ERR_PROVIDER_TIMEOUT',
    errorMessage: 'no CONNACK within 5s',
  },
  { integrationId: AZ_ID, activityType: 'sync', direction: 'incoming', status: 'started' },
  {
    integrationId: X_ID,
    activityType: 'export',
    direction: 'outgoing',
    status: 'error',
    errorCode: 'GW_ERR_PROVIDER_REJECTED',
    errorMessage: XSS,
  },
  {
    integrationId: null,
    activityType: 'config_reload',
    direction: 'internal',
    status: 'failed',
    errorMessage: 'unknown integration type "azure"',
  },
  {
    integrationId: AZ_ID,
    activityType: 'test_connection',
    direction: 'outgoing',
    status: 'success',
    responseTimeMs: 212,
  },
  {
    integrationId: AWS_ID,
    activityType: 'delivery',
    direction: 'outgoing',
    status: 'failed',
    errorCode: 'GW_ERR_PROVIDER_NOT_CONNECTED',
    errorMessage: 'not connected',
  },
  {
    integrationId: X_ID,
    activityType: 'delivery',
    direction: 'outgoing',
    status: 'success',
    responseTimeMs: 41,
  },
];
const failedCount = entries.filter((e) => e.status === 'failed').length;
const failureCount = entries.filter((e) => e.status === 'failed' || e.status === 'error').length;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'gw-dash-'));
  store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
  const activity = createActivityLog({ db: store.db, gatewayId: snapshot.gatewayId, logger });
  for (const e of entries) activity.record(e);
  const getStatus = () => ({ ...snapshot, now: Date.now() });
  server = createHttpServer({
    host: '127.0.0.1',
    port: 0,
    logger,
    getStatus,
    isReady: () => ({ ready: true, reasons: [] }),
    activity,
    dashboard: true,
    metrics: createMetrics({ getStatus, processMetrics: false }),
  });
  const addr = await server.listen();
  base = `http://127.0.0.1:${addr.port}`;
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  page = await browser.newPage({ viewport: { width: 1440, height: 900 } });
  // CSP violations and script errors surface here
  page.on('pageerror', (err) => pageErrors.push(err.message));
  page.on('console', (msg) => {
    if (msg.type() === 'error') pageErrors.push(msg.text());
  });
  await page.goto(`${base}/`, WAIT);
});

afterAll(async () => {
  await browser?.close();
  await server?.close();
  store?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function activityTable(query: string) {
  return page.locator(`[data-testid="activity-table"][data-query="${query}"]`);
}

describe('dashboard in headless Chromium', () => {
  it('renders the gateway, integrations with state badges, devices and the config error', async () => {
    await expect.poll(() => page.getByTestId('integration-row').count(), WAIT).toBe(3);
    expect(await page.getByTestId('gateway-id').textContent()).toBe('site-a-gw1');
    expect(await page.getByTestId('readiness').textContent()).toBe('ready');

    const states = await page
      .getByTestId('integration-row')
      .evaluateAll((rows) =>
        rows.map((r) => [
          r.getAttribute('data-integration'),
          r.querySelector('[data-testid="integration-state"]')!.textContent,
          r.querySelector('[data-testid="integration-state"]')!.className,
        ]),
      );
    expect(states).toEqual([
      ['x', 'connected', 'badge state-connected'],
      ['aws-main', 'backoff', 'badge state-backoff'],
      ['azure-hub', 'degraded', 'badge state-degraded'],
    ]);
    const aws = page.locator('[data-testid="integration-row"][data-integration="aws-main"]');
    expect(await aws.textContent()).toContain('1,834');
    expect(await aws.textContent()).toContain('GW_ERR_PROVIDER_CONNECT');

    expect(await page.getByTestId('device-row').count()).toBe(2);
    expect(await page.getByTestId('config-error').isVisible()).toBe(true);
    expect(await page.getByTestId('config-error-issues').textContent()).toContain(
      'integrations[2].type: unknown integration type "azure" (line 41)',
    );
  });

  it('lists recent activity with failures highlighted and data shown as text, not markup', async () => {
    await activityTable('limit=100').waitFor(WAIT);
    const rows = page.getByTestId('activity-row');
    expect(await rows.count()).toBe(entries.length);
    const marks = await rows.evaluateAll((trs) =>
      trs.map((tr) => [tr.getAttribute('data-status'), tr.classList.contains('row-failed')]),
    );
    for (const [status, highlighted] of marks) {
      expect(highlighted, String(status)).toBe(status === 'failed' || status === 'error');
    }
    expect(marks.filter(([, h]) => h)).toHaveLength(failureCount);
    // the hostile error message is on screen verbatim and never became an element
    expect(await page.getByTestId('activity-table').textContent()).toContain(XSS);
    expect(await page.locator('[data-testid="activity-table"] img').count()).toBe(0);
    expect(await page.locator('body').getAttribute('data-pwned')).toBeNull();
  });

  it('filters by status: only failed rows remain, all highlighted', async () => {
    await page.getByTestId('filter-status').selectOption('failed');
    await activityTable('status=failed&limit=100').waitFor(WAIT);
    const marks = await page
      .getByTestId('activity-row')
      .evaluateAll((trs) =>
        trs.map((tr) => [tr.getAttribute('data-status'), tr.classList.contains('row-failed')]),
      );
    expect(marks).toHaveLength(failedCount);
    expect(marks.every(([status, highlighted]) => status === 'failed' && highlighted === true)).toBe(true);

    mkdirSync(join(SCREENSHOT, '..'), { recursive: true });
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    expect(statSync(SCREENSHOT).size).toBeGreaterThan(10_000);
  });

  it('filters by integration, combined with the status filter', async () => {
    await page.getByTestId('filter-integration').selectOption({ label: 'aws-main' });
    await activityTable(`integration=${AWS_ID}&status=failed&limit=100`).waitFor(WAIT);
    const types = await page
      .getByTestId('activity-row')
      .evaluateAll((trs) => trs.map((tr) => tr.children[2]!.textContent));
    expect(types).toEqual(['delivery', 'connect']);

    await page.getByTestId('filter-status').selectOption('');
    await page.getByTestId('filter-integration').selectOption('');
    await activityTable('limit=100').waitFor(WAIT);
    expect(await page.getByTestId('activity-row').count()).toBe(entries.length);
  });

  it('ran without script errors or CSP violations', () => {
    expect(pageErrors).toEqual([]);
  });
});
