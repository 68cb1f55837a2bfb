import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCodes, GatewayError } from '../../src/errors.js';
import { createLogger } from '../../src/logger.js';
import { createActivityLog, type ActivityLog } from '../../src/store/activity-log.js';
import { migrateCentral } from '../../src/store/central/central-migrations.js';
import { openStore, type Store } from '../../src/store/database.js';
import { createReplicator, toTimestamp, type Replicator } from '../../src/store/replicator.js';
import { createTestDatabase, type TestDatabase } from '../helpers/pg.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';

const ORG = randomUUID();
const OTHER_ORG = randomUUID();
const INTEGRATION = randomUUID();

interface Local {
  store: Store;
  activity: ActivityLog;
  lines: LogRecord[];
  logger: ReturnType<typeof createLogger>;
}

const dirs: string[] = [];
const cleanups: (() => Promise<void> | void)[] = [];

function openLocal(now: () => number = Date.now): Local {
  const dir = mkdtempSync(join(tmpdir(), 'iot-repl-'));
  dirs.push(dir);
  const lines: LogRecord[] = [];
  const logger = createCaptureLogger(lines, { gatewayId: 'gw-test' });
  const store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
  cleanups.push(() => store.close());
  const activity = createActivityLog({
    db: store.db,
    gatewayId: 'gw-test',
    organizationId: ORG,
    logger,
    now,
  });
  return { store, activity, lines, logger };
}

function replicatorFor(
  local: Local,
  url: string,
  extra: { batchSize?: number; now?: () => number; organizationId?: string } = {},
): Replicator {
  const r = createReplicator({
    db: local.store.db,
    central: { url, batchSize: extra.batchSize ?? 100, interval: 50, connectTimeout: 2_000 },
    organizationId: extra.organizationId ?? ORG,
    gatewayId: 'gw-test',
    logger: local.logger,
    activity: local.activity,
    ...(extra.now ? { now: extra.now } : {}),
  });
  cleanups.push(() => r.stop());
  return r;
}

function seed(local: Local, activityRows: number, syncRows = 0): void {
  // One transaction: the store runs synchronous=FULL, a commit per row would cost an fsync each.
  local.store.db.transaction(() => seedRows(local, activityRows, syncRows))();
}

function seedRows(local: Local, activityRows: number, syncRows: number): void {
  for (let i = 0; i < activityRows; i++) {
    local.activity.record({
      integrationId: i % 5 === 0 ? null : INTEGRATION,
      activityType: 'publish',
      direction: 'outgoing',
      status: i % 7 === 0 ? 'failed' : 'success',
      responseTimeMs: i % 300,
      metadata: { i, quote: `it's "quoted" \\ {}` },
    });
  }
  for (let i = 0; i < syncRows; i++) {
    local.activity.recordSync({
      integrationId: INTEGRATION,
      syncType: 'export',
      status: 'success',
      startedAt: Date.now() - 1000,
      completedAt: Date.now(),
      recordsProcessed: i,
      recordsSucceeded: i,
      recordsFailed: 0,
      requestId: `req-${i}`,
    });
  }
}

function localIds(local: Local, table: 'activity_log' | 'sync_log'): string[] {
  return (local.store.db.prepare('SELECT id FROM ' + table + ' ORDER BY id').all() as { id: string }[]).map(
    (r) => r.id,
  );
}

async function centralIds(
  db: TestDatabase,
  table: 'integration_activity_log' | 'integration_sync_log',
): Promise<string[]> {
  const { rows } = await db.admin.query<{ id: string }>(
    'SELECT id::text AS id FROM ' + table + ' ORDER BY id',
  );
  return rows.map((r) => r.id);
}

function unreplicated(local: Local): number {
  return (
    local.store.db
      .prepare(
        "SELECT count(*) AS n FROM activity_log WHERE replication_error IS NULL AND seq > (SELECT seq FROM replication_watermark WHERE log = 'activity_log')",
      )
      .get() as { n: number }
  ).n;
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

describe('replicator', () => {
  let db: TestDatabase;
  let ingestUrl: string;
  let otherOrgUrl: string;

  beforeAll(async () => {
    db = await createTestDatabase('repl');
    await migrateCentral({ url: db.url, logger: createLogger({ level: 'silent', gatewayId: 't' }) });
    ingestUrl = db.urlFor(await db.createLogin('iot_gateway_ingest', ORG));
    otherOrgUrl = db.urlFor(await db.createLogin('iot_gateway_ingest', OTHER_ORG));
  });
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
    await db.admin.query('TRUNCATE integration_activity_log, integration_sync_log');
  });
  afterAll(async () => {
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
    await db.drop();
  });

  it('copies every row exactly once, and a resend after a lost mark changes nothing', async () => {
    const local = openLocal();
    seed(local, 1234, 57);
    const replicator = replicatorFor(local, ingestUrl);
    expect(replicator.status().pendingRows).toBe(1234 + 57);

    const first = await replicator.runOnce();
    expect(first).toEqual({ replicated: 1234 + 57, rejected: 0, pending: 0 });
    expect(await centralIds(db, 'integration_activity_log')).toEqual(localIds(local, 'activity_log'));
    expect(await centralIds(db, 'integration_sync_log')).toEqual(localIds(local, 'sync_log'));
    expect(await replicator.runOnce()).toEqual({ replicated: 0, rejected: 0, pending: 0 });

    // Values arrive intact, including quotes, backslashes and NULL integration ids.
    const sample = local.activity.list({ limit: 1 })[0]!;
    const { rows } = await db.admin.query('SELECT * FROM integration_activity_log WHERE id = $1', [
      sample.id,
    ]);
    expect(rows[0]).toMatchObject({
      organization_id: ORG,
      integration_id: sample.integrationId,
      gateway_id: 'gw-test',
      status: sample.status,
      response_time_ms: sample.responseTimeMs,
      metadata: sample.metadata,
    });
    expect((rows[0] as { created_at: Date }).created_at.getTime()).toBe(sample.createdAt);

    // The process died after COMMIT but before the SQLite mark: everything is sent again.
    local.store.db.exec('UPDATE replication_watermark SET seq = 0');
    const resend = await replicator.runOnce();
    expect(resend.replicated).toBe(1234 + 57);
    const { rows: counts } = await db.admin.query<{ n: number; d: number }>(
      'SELECT count(*)::int AS n, count(DISTINCT id)::int AS d FROM integration_activity_log',
    );
    expect(counts[0]).toEqual({ n: 1234, d: 1234 });
    expect(await centralIds(db, 'integration_sync_log')).toEqual(localIds(local, 'sync_log'));

    // A batch that mixes resent rows with new ones: the new ones land, the others once.
    local.store.db.exec(
      "UPDATE replication_watermark SET seq = 1000 WHERE log = 'activity_log'; UPDATE replication_watermark SET seq = 30 WHERE log = 'sync_log'",
    );
    seed(local, 40, 3);
    const mixed = await replicator.runOnce();
    expect(mixed.rejected).toBe(0);
    expect(mixed.pending).toBe(0);
    expect(await centralIds(db, 'integration_activity_log')).toEqual(localIds(local, 'activity_log'));
    expect(await centralIds(db, 'integration_sync_log')).toEqual(localIds(local, 'sync_log'));
  });

  it('sets rows PostgreSQL rejects aside with the reason and replicates the rest', async () => {
    const local = openLocal();
    seed(local, 30);
    const insert = local.store.db.prepare(
      `INSERT INTO activity_log (id, organization_id, integration_id, gateway_id, activity_type, direction, status, metadata, created_at)
       VALUES (?, ?, ?, 'gw-test', 'publish', 'outgoing', 'success', ?, ?)`,
    );
    const foreign = randomUUID();
    const badIntegration = randomUUID();
    const badJson = randomUUID();
    insert.run(foreign, OTHER_ORG, INTEGRATION, '{}', Date.now()); // RLS WITH CHECK: another organization
    insert.run(badIntegration, ORG, 'not-a-uuid', '{}', Date.now()); // invalid uuid
    insert.run(badJson, ORG, INTEGRATION, '{"truncated', Date.now()); // invalid json
    seed(local, 30);

    const replicator = replicatorFor(local, ingestUrl, { batchSize: 50 });
    const result = await replicator.runOnce();
    expect(result.rejected).toBe(3);
    expect(result.replicated).toBe(60);

    const aside = local.store.db
      .prepare(
        'SELECT id, replication_error FROM activity_log WHERE replication_error IS NOT NULL ORDER BY seq',
      )
      .all() as {
      id: string;
      replication_error: string;
    }[];
    expect(aside.map((r) => r.id)).toEqual([foreign, badIntegration, badJson]);
    expect(aside[0]!.replication_error).toMatch(/^42501/);
    expect(aside[1]!.replication_error).toMatch(/^22P02/);
    expect(aside[2]!.replication_error).toMatch(/^22P02/);
    const central = new Set(await centralIds(db, 'integration_activity_log'));
    expect(central.has(foreign) || central.has(badIntegration) || central.has(badJson)).toBe(false);
    expect(central.size).toBe(60);

    // One aggregated activity row tells the operator; it replicates like any other row.
    const rejectedRows = local.activity.list({ activityType: 'replication_rejected' });
    expect(rejectedRows).toHaveLength(1);
    expect(rejectedRows[0]!.metadata).toMatchObject({ count: 3, ids: [foreign, badIntegration, badJson] });
    expect(await replicator.runOnce()).toEqual({ replicated: 1, rejected: 0, pending: 0 });
    expect(replicator.status()).toMatchObject({ rejectedRows: 3, replicatedRows: 61, pendingRows: 0 });
  });

  it('reports lag (pending rows, age of the oldest) and logs it', async () => {
    let t = 1_700_000_000_000;
    const now = () => t;
    const local = openLocal(now);
    seed(local, 10);
    t += 90_000;
    const replicator = replicatorFor(local, `postgres://nobody@127.0.0.1:${await freePort()}/x`, { now });
    expect(replicator.status()).toMatchObject({
      configured: true,
      pendingRows: 10,
      oldestPendingAgeMs: 90_000,
      lastError: null,
    });
    await expect(replicator.runOnce()).rejects.toThrow(GatewayError);
    const lag = local.lines.filter((l) => l.msg === 'replication_lag');
    expect(lag).toHaveLength(1);
    expect(lag[0]).toMatchObject({ level: 'info', pendingRows: 11, oldestPendingAgeMs: 90_000 });
  });

  it('records one aggregated replicate row per minute at most, and none about its own rows', async () => {
    let t = Date.now();
    const now = () => t;
    const local = openLocal(now);
    const replicator = replicatorFor(local, ingestUrl, { now });
    for (let i = 0; i < 5; i++) {
      seed(local, 3);
      await replicator.runOnce();
      t += 15_000;
    }
    // 75 s passed with 15 moved rows: one row reporting them.
    let reports = local.activity.list({ activityType: 'replicate' });
    expect(reports).toHaveLength(1);
    expect(reports[0]!.metadata).toMatchObject({ rows: 15 });
    // Later runs move only that report row: no further report, so no feedback loop.
    for (let i = 0; i < 6; i++) {
      await replicator.runOnce();
      t += 61_000;
    }
    reports = local.activity.list({ activityType: 'replicate' });
    expect(reports).toHaveLength(1);
    expect(unreplicated(local)).toBe(0);
  });

  it('wrong address, unknown login and missing schema each give one clear error and keep the rows', async () => {
    const bare = await createTestDatabase('repl_bare');
    cleanups.push(() => bare.drop());
    const cases: { url: string; code: string; text: RegExp }[] = [
      {
        url: `postgres://postgres@127.0.0.1:${await freePort()}/postgres`,
        code: ErrorCodes.CENTRAL_CONNECT,
        text: /cannot reach central PostgreSQL/,
      },
      {
        url: db.urlFor('no_such_login_' + randomUUID().slice(0, 8)),
        code: ErrorCodes.CENTRAL_AUTH,
        text: /refused the login/,
      },
      { url: bare.url, code: ErrorCodes.CENTRAL_SCHEMA, text: /db migrate/ },
      {
        url: otherOrgUrl,
        code: ErrorCodes.CENTRAL_AUTH,
        text: /belongs to organization .* but gateway.organizationId/,
      },
    ];
    for (const c of cases) {
      const local = openLocal();
      seed(local, 20);
      const replicator = replicatorFor(local, c.url);
      for (let attempt = 0; attempt < 3; attempt++) {
        const err = await replicator.runOnce().catch((e: unknown) => e);
        expect(err).toBeInstanceOf(GatewayError);
        expect((err as GatewayError).code).toBe(c.code);
        expect((err as GatewayError).message).toMatch(c.text);
      }
      const errors = local.lines.filter((l) => l.level === 'error');
      expect(errors).toHaveLength(1);
      expect(errors[0]).toMatchObject({ msg: 'replication_failed', code: c.code });
      expect(replicator.status()).toMatchObject({ lastError: { code: c.code }, replicatedRows: 0 });
      // 20 rows plus one activity row recording the failure, all still waiting.
      expect(unreplicated(local)).toBe(21);
    }
    expect(await centralIds(db, 'integration_activity_log')).toEqual([]);
  });

  it('a login that loses its INSERT grant after connecting sets nothing aside, and every row arrives once it is back', async () => {
    const local = openLocal();
    const replicator = replicatorFor(local, ingestUrl, { batchSize: 50 });
    seed(local, 10);
    expect(await replicator.runOnce()).toMatchObject({ replicated: 10, rejected: 0 });

    // A DBA's mistake while the gateway's session is already verified and pooled.
    const tables = 'integration_activity_log, integration_sync_log';
    await db.admin.query('REVOKE INSERT ON ' + tables + ' FROM iot_gateway_ingest');
    cleanups.push(async () => {
      await db.admin.query('GRANT INSERT ON ' + tables + ' TO iot_gateway_ingest');
    });
    seed(local, 120, 5);
    for (let attempt = 0; attempt < 3; attempt++) {
      const err = await replicator.runOnce().catch((e: unknown) => e);
      expect(err).toBeInstanceOf(GatewayError);
      expect((err as GatewayError).code).toBe(ErrorCodes.CENTRAL_AUTH);
      expect((err as GatewayError).message).toMatch(/may not insert into the log tables/);
    }
    const aside = (table: 'activity_log' | 'sync_log') =>
      (
        local.store.db
          .prepare('SELECT count(*) AS n FROM ' + table + ' WHERE replication_error IS NOT NULL')
          .get() as { n: number }
      ).n;
    expect(aside('activity_log') + aside('sync_log')).toBe(0);
    expect(replicator.status()).toMatchObject({ rejectedRows: 0 });

    await db.admin.query('GRANT INSERT ON ' + tables + ' TO iot_gateway_ingest');
    expect(await replicator.runOnce()).toMatchObject({ rejected: 0 });
    await replicator.runOnce(); // the row recording the recovery
    expect(await centralIds(db, 'integration_activity_log')).toEqual(localIds(local, 'activity_log'));
    expect(await centralIds(db, 'integration_sync_log')).toEqual(localIds(local, 'sync_log'));
  });

  it('a column dropped from the central table gives one schema error and keeps every row until it is back', async () => {
    const own = await createTestDatabase('repl_drop');
    cleanups.push(() => own.drop());
    await migrateCentral({ url: own.url, logger: createLogger({ level: 'silent', gatewayId: 't' }) });
    const url = own.urlFor(await own.createLogin('iot_gateway_ingest', ORG));
    const local = openLocal();
    const replicator = replicatorFor(local, url, { batchSize: 50 });
    seed(local, 5);
    expect(await replicator.runOnce()).toMatchObject({ replicated: 5, rejected: 0 });

    await own.admin.query('ALTER TABLE integration_activity_log DROP COLUMN error_code');
    seed(local, 60);
    for (let attempt = 0; attempt < 2; attempt++) {
      const err = await replicator.runOnce().catch((e: unknown) => e);
      expect((err as GatewayError).code).toBe(ErrorCodes.CENTRAL_SCHEMA);
      expect((err as GatewayError).message).toMatch(/42703.*run `iot-gateway db migrate`/);
    }
    expect(replicator.status()).toMatchObject({ rejectedRows: 0 });

    await own.admin.query('ALTER TABLE integration_activity_log ADD COLUMN error_code text');
    expect(await replicator.runOnce()).toMatchObject({ rejected: 0 });
    await replicator.runOnce();
    const { rows } = await own.admin.query<{ id: string }>(
      'SELECT id::text AS id FROM integration_activity_log ORDER BY id',
    );
    expect(rows.map((r) => r.id)).toEqual(localIds(local, 'activity_log'));
  });

  it('start() backs off while PostgreSQL is away and drains once it is reachable', async () => {
    const local = openLocal();
    seed(local, 250);
    const replicator = replicatorFor(local, ingestUrl, { batchSize: 40 });
    replicator.start();
    for (let i = 0; i < 200 && replicator.status().pendingRows > 0; i++)
      await new Promise((r) => setTimeout(r, 25));
    expect(replicator.status()).toMatchObject({ pendingRows: 0, state: 'idle' });
    await replicator.stop();
    expect(await centralIds(db, 'integration_activity_log')).toEqual(localIds(local, 'activity_log'));

    const down = openLocal();
    seed(down, 5);
    const failing = replicatorFor(down, `postgres://postgres@127.0.0.1:${await freePort()}/postgres`);
    failing.start();
    for (let i = 0; i < 200 && failing.status().state !== 'backoff'; i++)
      await new Promise((r) => setTimeout(r, 10));
    expect(failing.status().state).toBe('backoff');
    await failing.stop();
    expect(unreplicated(down)).toBe(6);
  });
});

describe('toTimestamp', () => {
  it('gives the same ISO text as Date for any millisecond, also across seconds and before 1970', () => {
    const samples = [0, 1, 999, 1000, -1, -1001, 1_764_380_000_123, 1_764_380_000_999, 1_764_380_001_000];
    for (let i = 0; i < 2000; i++) samples.push(Math.floor(Math.random() * 4e12) - 1e12);
    for (const ms of samples) expect(toTimestamp(ms)).toBe(new Date(ms).toISOString());
    expect(toTimestamp(Number.NaN)).toBe('NaN');
    expect(toTimestamp(1.5)).toBe(new Date(1.5).toISOString());
  });
});
