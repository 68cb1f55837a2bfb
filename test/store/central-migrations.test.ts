import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCodes, GatewayError } from '../../src/errors.js';
import { createSilentLogger } from '../../src/logger.js';
import { migrateCentral } from '../../src/store/central/central-migrations.js';
import { CENTRAL_MIGRATIONS } from '../../src/store/central/central-schema.js';
import { createTestDatabase, type TestDatabase } from '../helpers/pg.js';

const logger = createSilentLogger();
const allIds = CENTRAL_MIGRATIONS.map((m) => m.id);

describe('central migrations', () => {
  let db: TestDatabase;
  beforeAll(async () => {
    db = await createTestDatabase('mig');
  });
  afterAll(async () => {
    await db.drop();
  });

  it('applies every migration once even when two run at once, then nothing', async () => {
    const [a, b] = await Promise.all([
      migrateCentral({ url: db.url, logger }),
      migrateCentral({ url: db.url, logger }),
    ]);
    // One of them applied everything, the other waited on the lock and found nothing to do.
    expect([a.applied, b.applied].sort((x, y) => x.length - y.length)).toEqual([[], allIds]);
    expect(a.current).toBe(allIds.at(-1));
    const again = await migrateCentral({ url: db.url, logger });
    expect(again).toEqual({ applied: [], current: allIds.at(-1) });
    const { rows } = await db.admin.query<{ id: string }>(
      'SELECT id FROM iot_gateway_migrations ORDER BY id',
    );
    expect(rows.map((r) => r.id)).toEqual(allIds);
  });

  it('makes the NOLOGIN owner role own the tables, functions and partitions', async () => {
    const { rows } = await db.admin.query<{ relname: string; owner: string }>(
      `SELECT c.relname, pg_get_userbyid(c.relowner) AS owner FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')`,
    );
    expect(rows.length).toBeGreaterThanOrEqual(6); // 2 log tables, logins, migrations, default + monthly partitions
    expect(new Set(rows.map((r) => r.owner))).toEqual(new Set(['iot_gateway_owner']));
    const { rows: owner } = await db.admin.query(
      "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'iot_gateway_owner'",
    );
    expect(owner[0]).toEqual({ rolcanlogin: false });
    const { rows: parts } = await db.admin.query<{ relname: string }>(
      "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'integration_activity_log'::regclass",
    );
    const month = new Date().toISOString().slice(0, 7).replace('-', '');
    expect(parts.map((p) => p.relname)).toContain(`integration_activity_log_p${month}`);
    expect(parts.map((p) => p.relname)).toContain('integration_activity_log_default');
  });

  it('refuses to run when a shipped migration was edited after it was applied', async () => {
    const tampered = CENTRAL_MIGRATIONS.map((m, i) => (i === 1 ? { ...m, sql: m.sql + '\n-- edited' } : m));
    const err = await migrateCentral({ url: db.url, logger, migrations: tampered }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GatewayError);
    expect((err as GatewayError).code).toBe(ErrorCodes.CENTRAL_SCHEMA);
    expect((err as GatewayError).message).toMatch(/0002_activity_log.*checksum/);
  });

  it('applies a new migration appended later, and only that one', async () => {
    const extra = [
      ...CENTRAL_MIGRATIONS,
      { id: '9999_test_extra', sql: 'CREATE TABLE iot_gateway_test_extra (x int)' },
    ];
    const result = await migrateCentral({ url: db.url, logger, migrations: extra });
    expect(result).toEqual({ applied: ['9999_test_extra'], current: '9999_test_extra' });
    // And the shipped list now meets a database that knows more than it does.
    const err = await migrateCentral({ url: db.url, logger }).catch((e: unknown) => e);
    expect((err as GatewayError).code).toBe(ErrorCodes.CENTRAL_SCHEMA);
    await db.admin.query('DROP TABLE iot_gateway_test_extra');
    await db.admin.query("DELETE FROM iot_gateway_migrations WHERE id = '9999_test_extra'");
  });

  it('rolls a failing migration back whole and records nothing for it', async () => {
    const broken = [
      ...CENTRAL_MIGRATIONS,
      { id: '9998_broken', sql: 'CREATE TABLE iot_gateway_half (x int); SELECT 1/0;' },
    ];
    const err = await migrateCentral({ url: db.url, logger, migrations: broken }).catch((e: unknown) => e);
    expect((err as GatewayError).message).toMatch(/9998_broken/);
    const { rows } = await db.admin.query(
      "SELECT to_regclass('iot_gateway_half') AS t, (SELECT count(*)::int FROM iot_gateway_migrations WHERE id = '9998_broken') AS n",
    );
    expect(rows[0]).toEqual({ t: null, n: 0 });
  });

  it('uses the indexes for the seed queries (EXPLAIN on analysed data)', async () => {
    // 60k rows over 30 days, 40 integrations, ~10% failures: enough that a seq scan is not cheaper.
    const integrations = Array.from({ length: 40 }, () => randomUUID());
    const org = randomUUID();
    await db.admin.query(
      `INSERT INTO integration_activity_log (id, organization_id, integration_id, gateway_id, activity_type, direction, status, response_time_ms, created_at)
       SELECT gen_random_uuid(), $1, ($2::uuid[])[1 + (g % 40)], 'gw-' || (g % 7), (ARRAY['publish', 'connect', 'sync', 'command'])[1 + (g % 4)],
              'outgoing', CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'success' END, (g % 500), now() - (g * interval '43 seconds')
         FROM generate_series(1, 60000) g`,
      [org, integrations],
    );
    await db.admin.query('VACUUM (ANALYZE) integration_activity_log');
    const plan = async (sql: string, params: unknown[]) =>
      (await db.admin.query<{ 'QUERY PLAN': string }>('EXPLAIN ' + sql, params)).rows
        .map((r) => r['QUERY PLAN'])
        .join('\n');
    const target = integrations[3]!;
    // Partition index names are generated (and truncated); map them to the index we declared.
    const { rows: idx } = await db.admin.query<{ child: string; parent: string }>(
      `SELECT c.relname AS child, p.relname AS parent FROM pg_inherits i
         JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent WHERE c.relkind = 'i'`,
    );
    const parentOf = new Map(idx.map((r) => [r.child, r.parent]));
    // Empty partitions are rightly seq-scanned (0 pages); the populated ones must not be.
    const { rows: populated } = await db.admin.query<{ part: string }>(
      'SELECT DISTINCT tableoid::regclass::text AS part FROM integration_activity_log',
    );
    const seqScansOfData = (text: string) =>
      [...text.matchAll(/Seq Scan on (\S+)/g)]
        .map((m) => m[1]!)
        .filter((t) => populated.some((p) => p.part === t));
    const indexesUsed = (text: string, kind: 'Index Scan' | 'Index Only Scan') =>
      new Set(
        [...text.matchAll(new RegExp(kind + ' using (\\S+)', 'g'))].map((m) => parentOf.get(m[1]!) ?? m[1]!),
      );

    const recent = await plan(
      'SELECT * FROM integration_activity_log WHERE integration_id = $1 ORDER BY created_at DESC LIMIT 50',
      [target],
    );
    expect(indexesUsed(recent, 'Index Scan')).toEqual(new Set(['integration_activity_log_recent']));
    expect(seqScansOfData(recent)).toEqual([]);

    const failures = await plan(
      "SELECT * FROM integration_activity_log WHERE integration_id = $1 AND status IN ('failed', 'error') ORDER BY created_at DESC LIMIT 50",
      [target],
    );
    expect(indexesUsed(failures, 'Index Scan')).toEqual(new Set(['integration_activity_log_failures']));
    expect(seqScansOfData(failures)).toEqual([]);

    const stats = await plan(
      `SELECT activity_type, status, count(*), avg(response_time_ms) FROM integration_activity_log
        WHERE integration_id = $1 AND created_at >= now() - interval '24 hours' GROUP BY activity_type, status`,
      [target],
    );
    expect(indexesUsed(stats, 'Index Only Scan')).toEqual(new Set(['integration_activity_log_recent']));
    expect(seqScansOfData(stats)).toEqual([]);

    // The helper returns the same numbers as the query it wraps.
    const { rows } = await db.admin.query<{ n: string }>(
      'SELECT sum(count) AS n FROM iot_gateway_activity_stats($1)',
      [target],
    );
    const { rows: direct } = await db.admin.query<{ n: string }>(
      "SELECT count(*) AS n FROM integration_activity_log WHERE integration_id = $1 AND created_at >= now() - interval '24 hours'",
      [target],
    );
    expect(Number(rows[0]!.n)).toBe(Number(direct[0]!.n));
    expect(Number(direct[0]!.n)).toBeGreaterThan(0);
  });

  it('records one activity through the helper and purges by dropping old partitions', async () => {
    const org = randomUUID();
    const id = randomUUID();
    await db.admin.query(
      "SELECT iot_gateway_record_activity('gw-1', 'config_reload', 'internal', 'success', p_id => $1, p_organization_id => $2)",
      [id, org],
    );
    // The same id again changes nothing.
    await db.admin.query(
      "SELECT iot_gateway_record_activity('gw-1', 'config_reload', 'internal', 'success', p_id => $1, p_organization_id => $2, p_created_at => (SELECT created_at FROM integration_activity_log WHERE id = $1))",
      [id, org],
    );
    const { rows } = await db.admin.query(
      'SELECT count(*)::int AS n FROM integration_activity_log WHERE id = $1',
      [id],
    );
    expect(rows[0]).toEqual({ n: 1 });

    // Rows 40 days old: their month partition is made on demand (moved out of the default one).
    const old = new Date(Date.now() - 400 * 86_400_000);
    await db.admin.query(
      `INSERT INTO integration_activity_log (id, organization_id, gateway_id, activity_type, direction, status, created_at)
       SELECT gen_random_uuid(), $1, 'gw-1', 'publish', 'outgoing', 'success', $2::timestamptz + g * interval '1 minute' FROM generate_series(1, 100) g`,
      [org, old],
    );
    const { rows: created } = await db.admin.query<{ n: number }>(
      'SELECT iot_gateway_ensure_partitions($1, $1) AS n',
      [old],
    );
    expect(created[0]!.n).toBe(1);
    const { rows: inDefault } = await db.admin.query<{ n: number }>(
      "SELECT count(*)::int AS n FROM integration_activity_log_default WHERE created_at < now() - interval '300 days'",
    );
    expect(inDefault[0]!.n).toBe(0);

    const { rows: purged } = await db.admin.query('SELECT * FROM iot_gateway_purge()');
    expect(purged[0]).toMatchObject({ dropped_partitions: 1 });
    const { rows: left } = await db.admin.query<{ n: number }>(
      "SELECT count(*)::int AS n FROM integration_activity_log WHERE created_at < now() - interval '90 days'",
    );
    expect(left[0]!.n).toBe(0);
  });
});
