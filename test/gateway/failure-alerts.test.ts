import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { parseConfigText } from '../../src/config/load.js';
import { watchFailures } from '../../src/gateway/failure-alerts.js';
import { createActivityLog } from '../../src/store/activity-log.js';
import { openStore } from '../../src/store/database.js';

describe('alerts on repeated failures', () => {
  it('records one alert row and a warn line after N failures within the window, then stays quiet', () => {
    const store = openStore({
      dataDir: mkdtempSync(join(tmpdir(), 'gw-alert-')),
      logger: pino({ level: 'silent' }),
      onCorrupt: 'refuse',
      lock: false,
    });
    const lines: Record<string, unknown>[] = [];
    const logger = pino(
      { level: 'info' },
      { write: (s: string) => lines.push(JSON.parse(s) as Record<string, unknown>) },
    );
    let t = 1_000_000;
    const now = () => t;
    const activity = createActivityLog({ db: store.db, gatewayId: 'gw', logger, now });
    const config = parseConfigText(
      [
        'gateway: { id: gw }',
        'integrations:',
        '  - name: up',
        '    id: 0b7e6f2a-1c3d-4e5f-8a9b-7c6d5e4f3a21',
        '    type: mqtt',
        '    settings: { url: "mqtt://127.0.0.1:1883" }',
        '    health: { alertFailures: 3, alertWindow: 60s }',
      ].join('\n'),
      '/tmp/x.yaml',
      {},
    );
    const stop = watchFailures({ activity, logger, integrations: () => config.integrations, now });
    const fail = () =>
      activity.record({
        integrationId: config.integrations[0]!.id,
        activityType: 'connect',
        direction: 'outgoing',
        status: 'failed',
        errorMessage: 'ECONNREFUSED',
      });
    const alerts = () => activity.list({ activityType: 'alert' });

    fail();
    fail();
    expect(alerts()).toHaveLength(0);
    // Success rows don't count.
    activity.record({
      integrationId: config.integrations[0]!.id,
      activityType: 'deliver',
      direction: 'outgoing',
      status: 'success',
    });
    expect(alerts()).toHaveLength(0);
    fail();
    expect(alerts()).toHaveLength(1);
    expect(alerts()[0]).toMatchObject({ status: 'error', integrationId: config.integrations[0]!.id });
    expect(alerts()[0]!.errorMessage).toMatch(/3 failures within 60s; last: ECONNREFUSED/);
    expect(lines.some((l) => l.msg === 'integration_failing' && l.level === 40)).toBe(true);

    // More failures inside the same window: no second alert.
    fail();
    fail();
    expect(alerts()).toHaveLength(1);
    // Old failures leave the window: a new burst alerts again.
    t += 61_000;
    fail();
    expect(alerts()).toHaveLength(1);
    fail();
    fail();
    expect(alerts()).toHaveLength(2);
    stop();
    store.close();
  });
});
