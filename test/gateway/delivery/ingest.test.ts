import Database from 'better-sqlite3';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { configSchema, type ConfigInput, type IntegrationConfig } from '../../../src/config/schema.js';
import { ErrorCodes } from '../../../src/errors.js';
import { createIngest, type Ingest } from '../../../src/gateway/delivery/ingest.js';
import { createActivityLog } from '../../../src/store/activity-log.js';
import { openStore, type Store } from '../../../src/store/database.js';
import { createOutbox } from '../../../src/store/outbox.js';
import { createReportedState } from '../../../src/store/reported-state.js';
import type { IncomingMessage, Outbox } from '../../../src/store/outbox-types.js';
import { createCaptureLogger, type LogRecord } from '../../helpers/capture-logger.js';

const TELEMETRY = '0b7e0000-0000-4000-8000-000000000001';
const ALL = '0b7e0000-0000-4000-8000-000000000002';
const OFF = '0b7e0000-0000-4000-8000-000000000003';

type IntegrationInput = NonNullable<ConfigInput['integrations']>[number];

/** Integrations exactly as the daemon gets them: through the config schema, with its defaults. */
function integrations(list: Partial<IntegrationInput>[]): IntegrationConfig[] {
  return configSchema.parse({
    gateway: { id: 'gw-test' },
    integrations: list.map((i, n) => ({
      name: `int-${n}`,
      type: 'mqtt',
      settings: { url: 'mqtt://127.0.0.1:1883' },
      ...i,
    })),
  }).integrations;
}

const baseIntegrations = () =>
  integrations([
    { id: TELEMETRY, routes: [{ from: 'devices/+/telemetry/#', qos: 1 }] },
    {
      id: ALL,
      routes: [
        { from: 'devices/#', qos: 0 },
        { from: 'devices/+/state', qos: 2 },
      ],
      queue: { ttl: '1h', maxBytes: '1KB' },
    },
    { id: OFF, enabled: false, routes: [{ from: '#' }] },
  ]);

function msg(topic: string, qos: 0 | 1 | 2, payload = 'p', retain = false): IncomingMessage {
  return { deviceId: 'sensor-1', topic, payload: Buffer.from(payload), qos, retain };
}

function committedRows(
  file: string,
): { integration_id: string; topic: string; qos: number; retain: number }[] {
  const db = new Database(file, { readonly: true });
  try {
    return db
      .prepare(
        'SELECT integration_id, topic, qos, retain, enqueued_at, expires_at FROM queue_messages ORDER BY id',
      )
      .all() as { integration_id: string; topic: string; qos: number; retain: number }[];
  } finally {
    db.close();
  }
}

let dir: string;
let store: Store;
let outbox: Outbox;
let ingest: Ingest;
let logs: LogRecord[];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ingest-test-'));
  logs = [];
  const logger = createCaptureLogger(logs, { gatewayId: 'gw-test' });
  store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: true });
  const activity = createActivityLog({ db: store.db, gatewayId: 'gw-test', logger });
  outbox = createOutbox({ db: store.db, logger, activity });
  ingest = createIngest({ outbox, logger, integrations: baseIntegrations() });
});

afterEach(async () => {
  await outbox.close();
  store.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('ingest', () => {
  it('commits a QoS 1 message to every matching enabled integration before resolving', async () => {
    const pending = ingest.accept(msg('devices/sensor-1/telemetry/temp', 1, 'p', true));
    expect(pending).not.toBeNull();
    expect(committedRows(store.file)).toEqual([]);
    await pending;
    const rows = committedRows(store.file);
    expect(rows.map((r) => [r.integration_id, r.qos, r.retain]).sort()).toEqual(
      [
        [TELEMETRY, 1, 1],
        [ALL, 0, 1], // route qos 0 caps the queued row
      ].sort(),
    );
    expect(rows.every((r) => r.topic === 'devices/sensor-1/telemetry/temp')).toBe(true);
  });

  it('queues with the lower of message and route QoS, taking the best matching route', async () => {
    await ingest.accept(msg('devices/sensor-1/state', 2));
    await ingest.accept(msg('devices/sensor-1/state', 1));
    expect(committedRows(store.file).map((r) => [r.integration_id, r.qos])).toEqual([
      [ALL, 2],
      [ALL, 1],
    ]);
  });

  it('applies the integration queue limits and ttl', async () => {
    await ingest.accept(msg('devices/sensor-1/state', 1));
    const [row] = committedRows(store.file) as unknown as { enqueued_at: number; expires_at: number }[];
    expect(row!.expires_at - row!.enqueued_at).toBe(3_600_000);
    // ALL holds 1KB: a larger message is refused, and reaches no queue at all.
    await expect(ingest.accept(msg('devices/sensor-1/telemetry', 1, 'x'.repeat(2000)))).rejects.toMatchObject(
      {
        code: ErrorCodes.QUEUE_FULL,
      },
    );
    expect(committedRows(store.file)).toHaveLength(1);
  });

  it('returns null for a topic no route matches, and for disabled integrations', async () => {
    expect(ingest.accept(msg('other/topic', 1))).toBeNull();
    expect(ingest.accept(msg('$SYS/x', 1))).toBeNull(); // only the disabled '#' route would take it
    await outbox.flush();
    expect(committedRows(store.file)).toEqual([]);
  });

  it('queues QoS 0 without holding the publisher up', async () => {
    expect(ingest.accept(msg('devices/sensor-1/telemetry', 0))).toBeNull();
    await outbox.flush();
    expect(
      committedRows(store.file)
        .map((r) => [r.integration_id, r.qos])
        .sort(),
    ).toEqual(
      [
        [TELEMETRY, 0],
        [ALL, 0],
      ].sort(),
    );
  });

  it('logs and counts QoS 0 messages that cannot be queued, without throwing', async () => {
    const frozen = createIngest({
      outbox,
      logger: createCaptureLogger(logs, { gatewayId: 'gw-test' }),
      integrations: integrations([
        { id: TELEMETRY, routes: [{ from: '#' }], queue: { maxMessages: 1, onFull: 'reject-new' } },
      ]),
      now: () => 0,
    });
    for (let i = 0; i < 5; i++) expect(frozen.accept(msg('devices/sensor-1/telemetry', 0))).toBeNull();
    await outbox.flush();
    await new Promise((resolve) => setImmediate(resolve));
    expect(frozen.qos0Failures).toBe(4);
    const lines = () => logs.filter((l) => l.msg === 'qos0_message_not_queued');
    // A flood gives one line per second with the count since the last, not one per message.
    expect(lines()).toHaveLength(1);
    expect(lines()[0]).toMatchObject({ level: 'warn', code: ErrorCodes.QUEUE_FULL, count: 1, total: 1 });
    await vi.waitFor(() => expect(lines()).toHaveLength(2), { timeout: 5000, interval: 50 });
    expect(lines()[1]).toMatchObject({ count: 3, total: 4 });
    expect(committedRows(store.file)).toHaveLength(1);
  });

  it('rejects a QoS 1 message a full reject-new queue refuses, so it is not acknowledged', async () => {
    ingest.setIntegrations(
      integrations([
        { id: TELEMETRY, routes: [{ from: '#' }], queue: { maxMessages: 1, onFull: 'reject-new' } },
      ]),
    );
    await ingest.accept(msg('a', 1));
    await expect(ingest.accept(msg('b', 1))).rejects.toMatchObject({
      code: ErrorCodes.QUEUE_FULL,
      retryable: false,
    });
  });

  it('applies new routes to the next message after a live reload', async () => {
    expect(ingest.accept(msg('plant/line-1/temp', 1))).toBeNull();
    ingest.setIntegrations(integrations([{ id: OFF, routes: [{ from: 'plant/+/temp', qos: 1 }] }]));
    await ingest.accept(msg('plant/line-1/temp', 1));
    expect(ingest.accept(msg('devices/sensor-1/telemetry', 1))).toBeNull();
    expect(committedRows(store.file).map((r) => r.integration_id)).toEqual([OFF]);
  });

  it('merges devices/{id}/state into the reported state of the device the topic names, routed or not', async () => {
    const logger = createCaptureLogger(logs, { gatewayId: 'gw-test' });
    const state = createReportedState({ db: store.db, logger });
    const withState = createIngest({
      outbox,
      logger,
      integrations: integrations([{ id: TELEMETRY, routes: [{ from: 'devices/+/telemetry', qos: 1 }] }]),
      reportedState: state,
    });
    expect(withState.accept(msg('devices/sensor-1/state', 1, '{"on":true,"level":3}'))).toBeNull();
    withState.accept(msg('devices/child-7/state', 0, '{"level":9}'));
    withState.accept(msg('devices/sensor-1/state', 1, '{"on":null}'));
    withState.accept(msg('devices/sensor-1/state', 1, 'not json'));
    withState.accept(msg('devices/sensor-1/state/extra', 1, '{"x":1}'));
    await withState.accept(msg('devices/sensor-1/telemetry', 1, '{"t":1}'));
    expect(Object.fromEntries(state.all())).toEqual({ 'sensor-1': { level: 3 }, 'child-7': { level: 9 } });
    expect(logs.some((l) => l.msg === 'state_not_json_object')).toBe(true);
    state.close();
  });
});
