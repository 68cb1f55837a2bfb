import { execFile } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCodes, GatewayError } from '../../src/errors.js';
import { createLogger, createSilentLogger } from '../../src/logger.js';
import { createActivityLog, type ActivityLog } from '../../src/store/activity-log.js';
import { migrateCentral } from '../../src/store/central/central-migrations.js';
import { openStore, type Store } from '../../src/store/database.js';
import { createReplicator, type Replicator } from '../../src/store/replicator.js';
import { CLI } from '../helpers/daemon.js';
import { startScramCluster, type ScramCluster } from '../helpers/pg-scram.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';

const ORG = randomUUID();
const INTEGRATION = randomUUID();
const DATABASE = 'central';
const FRESH_DATABASE = 'fresh';
const ACTIVITY_ROWS = 25;
const SYNC_ROWS = 3;

interface Local {
  store: Store;
  activity: ActivityLog;
  lines: LogRecord[];
  logger: ReturnType<typeof createLogger>;
}

/**
 * Credentials against a real PostgreSQL that asks for them (scram-sha-256): the machine's own
 * server trusts loopback logins, where a wrong password is never even looked at.
 */
describe('central PostgreSQL with password authentication', () => {
  let cluster: ScramCluster;
  let admin: pg.Pool;
  let ingestUser: string;
  let ingestPassword: string;
  const dirs: string[] = [];
  const cleanups: (() => Promise<void> | void)[] = [];

  beforeAll(async () => {
    cluster = await startScramCluster();
    const c = new pg.Client({ connectionString: cluster.url() });
    await c.connect();
    try {
      await c.query('CREATE DATABASE ' + DATABASE);
      await c.query('CREATE DATABASE ' + FRESH_DATABASE);
    } finally {
      await c.end();
    }
    admin = new pg.Pool({ connectionString: cluster.url({ database: DATABASE }), max: 2 });
    admin.on('error', () => {});
    await migrateCentral({ url: cluster.url({ database: DATABASE }), logger: createSilentLogger() });
    // The ingest login of a real deployment: a password, the group role, an organization.
    ingestUser = 'gw_ingest_' + randomBytes(3).toString('hex');
    ingestPassword = randomBytes(12).toString('base64url');
    const { rows } = await admin.query<{ sql: string }>(
      "SELECT format('CREATE ROLE %I LOGIN PASSWORD %L IN ROLE iot_gateway_ingest', $1::text, $2::text) AS sql",
      [ingestUser, ingestPassword],
    );
    await admin.query(rows[0]!.sql);
    await admin.query('SELECT iot_gateway_register_login($1, $2)', [ingestUser, ORG]);
  }, 120_000);
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });
  afterAll(async () => {
    await admin?.end();
    await cluster?.stop();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  function openLocal(): Local {
    const dir = mkdtempSync(join(tmpdir(), 'iot-central-auth-'));
    dirs.push(dir);
    const lines: LogRecord[] = [];
    const logger = createCaptureLogger(lines, { gatewayId: 'gw-auth' });
    const store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
    cleanups.push(() => store.close());
    const activity = createActivityLog({ db: store.db, gatewayId: 'gw-auth', organizationId: ORG, logger });
    store.db.transaction(() => {
      for (let i = 0; i < ACTIVITY_ROWS; i++) {
        activity.record({
          integrationId: INTEGRATION,
          activityType: 'publish',
          direction: 'outgoing',
          status: i % 5 === 0 ? 'failed' : 'success',
          responseTimeMs: i,
          metadata: { i },
        });
      }
      for (let i = 0; i < SYNC_ROWS; i++) {
        activity.recordSync({
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
    })();
    return { store, activity, lines, logger };
  }

  function replicatorFor(local: Local, url: string): Replicator {
    const r = createReplicator({
      db: local.store.db,
      central: { url, batchSize: 10, interval: 50, connectTimeout: 5_000 },
      organizationId: ORG,
      gatewayId: 'gw-auth',
      logger: local.logger,
      activity: local.activity,
    });
    cleanups.push(() => r.stop());
    return r;
  }

  function pendingLocal(local: Local, table: 'activity_log' | 'sync_log'): number {
    return (
      local.store.db
        .prepare(
          'SELECT count(*) AS n FROM ' +
            table +
            ' WHERE replication_error IS NULL AND seq > (SELECT seq FROM replication_watermark WHERE log = ?)',
        )
        .get(table) as { n: number }
    ).n;
  }

  function localIds(local: Local, table: 'activity_log' | 'sync_log'): string[] {
    return (local.store.db.prepare('SELECT id FROM ' + table + ' ORDER BY id').all() as { id: string }[]).map(
      (r) => r.id,
    );
  }

  async function centralIds(table: 'integration_activity_log' | 'integration_sync_log'): Promise<string[]> {
    const { rows } = await admin.query<{ id: string }>(
      'SELECT id::text AS id FROM ' + table + ' ORDER BY id',
    );
    return rows.map((r) => r.id);
  }

  it('db migrate is refused with a clear message for a wrong password and works with the right one', async () => {
    const logger = createSilentLogger();
    const wrong = 'wrong-' + randomBytes(6).toString('hex');
    const err = await migrateCentral({
      url: cluster.url({ password: wrong, database: FRESH_DATABASE }),
      logger,
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GatewayError);
    expect((err as GatewayError).code).toBe(ErrorCodes.CENTRAL_AUTH);
    expect((err as GatewayError).message).toBe(
      'central PostgreSQL refused the password for user "postgres" (28P01); put the right user and password in the connection URL (central.url, or --url for db migrate)',
    );
    const fresh = new pg.Client({ connectionString: cluster.url({ database: FRESH_DATABASE }) });
    await fresh.connect();
    try {
      const tables = async () =>
        (
          await fresh.query<{ n: number }>(
            "SELECT count(*)::int AS n FROM pg_tables WHERE tablename = 'integration_activity_log'",
          )
        ).rows[0]!.n;
      expect(await tables()).toBe(0);
      const result = await migrateCentral({ url: cluster.url({ database: FRESH_DATABASE }), logger });
      expect(result.applied.length).toBeGreaterThan(0);
      expect(result.applied.at(-1)).toBe(result.current);
      expect(await tables()).toBe(1);
    } finally {
      await fresh.end();
    }
  });

  it('a replicator with a wrong password fails with one clear error and keeps every local row', async () => {
    const local = openLocal();
    const wrong = ingestPassword + 'x';
    const replicator = replicatorFor(
      local,
      cluster.url({ user: ingestUser, password: wrong, database: DATABASE }),
    );
    for (let attempt = 0; attempt < 3; attempt++) {
      const err = await replicator.runOnce().catch((e: unknown) => e);
      expect(err).toBeInstanceOf(GatewayError);
      expect((err as GatewayError).code).toBe(ErrorCodes.CENTRAL_AUTH);
      expect((err as GatewayError).message).toBe(
        `central PostgreSQL refused the password for user "${ingestUser}" (28P01); put the right user and password in the connection URL (central.url, or --url for db migrate)`,
      );
      expect((err as GatewayError).details?.sqlstate).toBe('28P01');
    }
    // One error line for the kind of trouble, not one per retry; the password never appears.
    const errors = local.lines.filter((l) => l.level === 'error');
    expect(errors).toHaveLength(1);
    expect(errors[0]).toMatchObject({
      msg: 'replication_failed',
      code: ErrorCodes.CENTRAL_AUTH,
      sqlstate: '28P01',
    });
    expect(JSON.stringify(local.lines)).not.toContain(wrong);
    expect(replicator.status()).toMatchObject({
      state: 'idle',
      replicatedRows: 0,
      lastError: { code: ErrorCodes.CENTRAL_AUTH },
    });
    // Every row still waits, plus the one activity row that records the failure.
    expect(pendingLocal(local, 'activity_log')).toBe(ACTIVITY_ROWS + 1);
    expect(pendingLocal(local, 'sync_log')).toBe(SYNC_ROWS);
    expect(await centralIds('integration_activity_log')).toEqual([]);
    expect(await centralIds('integration_sync_log')).toEqual([]);
    await replicator.stop();

    // With the password corrected, the kept rows all arrive, exactly once.
    const fixed = replicatorFor(
      local,
      cluster.url({ user: ingestUser, password: ingestPassword, database: DATABASE }),
    );
    const result = await fixed.runOnce();
    expect(result).toEqual({ replicated: ACTIVITY_ROWS + 1 + SYNC_ROWS, rejected: 0, pending: 0 });
    expect(await centralIds('integration_activity_log')).toEqual(localIds(local, 'activity_log'));
    expect(await centralIds('integration_sync_log')).toEqual(localIds(local, 'sync_log'));
  });

  it('a URL without a password, where one is required, names the missing password', async () => {
    const local = openLocal();
    const replicator = replicatorFor(
      local,
      cluster.url({ user: ingestUser, password: null, database: DATABASE }),
    );
    const err = await replicator.runOnce().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GatewayError);
    expect((err as GatewayError).code).toBe(ErrorCodes.CENTRAL_AUTH);
    expect((err as GatewayError).message).toMatch(
      /^central PostgreSQL asks for a password but the connection URL has none;/,
    );
    expect(pendingLocal(local, 'activity_log')).toBe(ACTIVITY_ROWS + 1);
    expect(pendingLocal(local, 'sync_log')).toBe(SYNC_ROWS);
  });

  it('`iot-gateway db migrate --url` with a wrong password exits 1 with one line and no stack trace', async () => {
    expect(existsSync(CLI), 'run `npm run build` first (npm test does)').toBe(true);
    const cli = (url: string) =>
      new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
        execFile(
          process.execPath,
          [CLI, 'db', 'migrate', '--url', url],
          { timeout: 30_000, env: { ...process.env, IOT_GATEWAY_DEBUG: '' } },
          (error, stdout, stderr) => {
            const code = error ? (typeof error.code === 'number' ? error.code : null) : 0;
            resolve({ code, stdout, stderr });
          },
        );
      });

    const wrong = 'not-' + randomBytes(6).toString('hex');
    const refused = await cli(cluster.url({ password: wrong, database: DATABASE }));
    expect(refused.code).toBe(1);
    expect(refused.stdout).toBe('');
    expect(refused.stderr.trimEnd().split('\n')).toEqual([
      'error: central PostgreSQL refused the password for user "postgres" (28P01); put the right user and password in the connection URL (central.url, or --url for db migrate)',
    ]);
    expect(refused.stderr).not.toContain(wrong);

    // The same command with the right password: the URL form itself is fine.
    const ok = await cli(cluster.url({ database: DATABASE }));
    expect(ok).toMatchObject({ code: 0, stderr: '' });
    expect(ok.stdout).toMatch(/schema is up to date/);
    expect(ok.stdout).not.toContain(cluster.password);
  });
});
