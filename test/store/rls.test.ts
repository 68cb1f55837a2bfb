import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSilentLogger } from '../../src/logger.js';
import { migrateCentral } from '../../src/store/central/central-migrations.js';
import { createTestDatabase, type TestDatabase } from '../helpers/pg.js';

const ORG_A = randomUUID();
const ORG_B = randomUUID();
const INTEGRATION_A = randomUUID();
const INTEGRATION_B = randomUUID();

const INSERT_ACTIVITY = `INSERT INTO integration_activity_log (id, organization_id, integration_id, gateway_id, activity_type, direction, status, created_at)
  VALUES ($1, $2, $3, 'gw', 'publish', 'outgoing', 'success', $4) ON CONFLICT DO NOTHING`;
const INSERT_SYNC = `INSERT INTO integration_sync_log (id, organization_id, integration_id, gateway_id, sync_type, status, started_at)
  VALUES ($1, $2, $3, 'gw', 'export', 'success', now()) ON CONFLICT DO NOTHING`;

/** The SQLSTATE a statement fails with, or 'ok'. */
async function outcome(client: pg.Client, sql: string, params: unknown[] = []): Promise<string> {
  try {
    await client.query(sql, params);
    return 'ok';
  } catch (err) {
    return (err as { code?: string }).code ?? 'error';
  }
}

describe('central least privilege and row-level security (as each role)', () => {
  let db: TestDatabase;
  let ingestA: pg.Client;
  let readerA: pg.Client;
  let readerB: pg.Client;
  let ingestALogin: string;
  const clients: pg.Client[] = [];

  async function connectAs(role: string): Promise<pg.Client> {
    const c = new pg.Client({ connectionString: db.urlFor(role) });
    await c.connect();
    clients.push(c);
    return c;
  }

  beforeAll(async () => {
    db = await createTestDatabase('rls');
    await migrateCentral({ url: db.url, logger: createSilentLogger() });
    ingestALogin = await db.createLogin('iot_gateway_ingest', ORG_A);
    ingestA = await connectAs(ingestALogin);
    readerA = await connectAs(await db.createLogin('iot_gateway_reader', ORG_A));
    readerB = await connectAs(await db.createLogin('iot_gateway_reader', ORG_B));
    // Rows of both organizations, written by the superuser.
    for (let i = 0; i < 5; i++) {
      await db.admin.query(INSERT_ACTIVITY, [randomUUID(), ORG_A, INTEGRATION_A, new Date()]);
      await db.admin.query(INSERT_ACTIVITY, [randomUUID(), ORG_B, INTEGRATION_B, new Date()]);
      await db.admin.query(INSERT_SYNC, [randomUUID(), ORG_A, INTEGRATION_A]);
      await db.admin.query(INSERT_SYNC, [randomUUID(), ORG_B, INTEGRATION_B]);
    }
  });
  afterAll(async () => {
    for (const c of clients) await c.end().catch(() => {});
    await db.drop();
  });

  it('the ingest login is an ordinary role: not owner, not superuser, no BYPASSRLS; tables FORCE RLS', async () => {
    const { rows } = await db.admin.query(
      'SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = $1',
      [ingestALogin],
    );
    expect(rows[0]).toEqual({
      rolsuper: false,
      rolbypassrls: false,
      rolcreaterole: false,
      rolcreatedb: false,
    });
    const { rows: tables } = await db.admin.query(
      `SELECT relname, relrowsecurity, relforcerowsecurity, pg_get_userbyid(relowner) AS owner FROM pg_class
        WHERE relname IN ('integration_activity_log', 'integration_sync_log') ORDER BY relname`,
    );
    expect(tables).toEqual([
      {
        relname: 'integration_activity_log',
        relrowsecurity: true,
        relforcerowsecurity: true,
        owner: 'iot_gateway_owner',
      },
      {
        relname: 'integration_sync_log',
        relrowsecurity: true,
        relforcerowsecurity: true,
        owner: 'iot_gateway_owner',
      },
    ]);
  });

  it('ingest: inserts its own organization, idempotently, with ON CONFLICT DO NOTHING and no SELECT grant', async () => {
    const id = randomUUID();
    const at = new Date();
    expect(await outcome(ingestA, INSERT_ACTIVITY, [id, ORG_A, INTEGRATION_A, at])).toBe('ok');
    expect(await outcome(ingestA, INSERT_ACTIVITY, [id, ORG_A, INTEGRATION_A, at])).toBe('ok');
    expect(await outcome(ingestA, INSERT_SYNC, [randomUUID(), ORG_A, INTEGRATION_A])).toBe('ok');
    const { rows } = await db.admin.query(
      'SELECT count(*)::int AS n FROM integration_activity_log WHERE id = $1',
      [id],
    );
    expect(rows[0]).toEqual({ n: 1 });
    // The helper derives the organization from the login.
    const { rows: rec } = await ingestA.query(
      "SELECT iot_gateway_record_activity('gw', 'config_reload', 'internal', 'success') AS id",
    );
    const { rows: stored } = await db.admin.query(
      'SELECT organization_id FROM integration_activity_log WHERE id = $1',
      [rec[0].id],
    );
    expect(stored[0]).toEqual({ organization_id: ORG_A });
    // A conflict target would need SELECT: refused, which is why the replicator uses none.
    expect(
      await outcome(
        ingestA,
        INSERT_ACTIVITY.replace('ON CONFLICT DO NOTHING', 'ON CONFLICT (id, created_at) DO NOTHING'),
        [randomUUID(), ORG_A, INTEGRATION_A, at],
      ),
    ).toBe('42501');
  });

  it('ingest: another organization, reads, updates, deletes, truncates and side doors are refused', async () => {
    expect(await outcome(ingestA, INSERT_ACTIVITY, [randomUUID(), ORG_B, INTEGRATION_B, new Date()])).toBe(
      '42501',
    );
    expect(await outcome(ingestA, INSERT_SYNC, [randomUUID(), ORG_B, INTEGRATION_B])).toBe('42501');
    expect(
      await outcome(
        ingestA,
        "SELECT iot_gateway_record_activity('gw', 'x', 'internal', 'success', p_organization_id => $1)",
        [ORG_B],
      ),
    ).toBe('42501');
    for (const table of ['integration_activity_log', 'integration_sync_log']) {
      expect(await outcome(ingestA, 'SELECT count(*) FROM ' + table)).toBe('42501');
      expect(await outcome(ingestA, 'UPDATE ' + table + " SET gateway_id = 'x'")).toBe('42501');
      expect(await outcome(ingestA, 'DELETE FROM ' + table)).toBe('42501');
      expect(await outcome(ingestA, 'TRUNCATE ' + table)).toBe('42501');
    }
    const month = new Date().toISOString().slice(0, 7).replace('-', '');
    expect(await outcome(ingestA, 'SELECT count(*) FROM integration_activity_log_p' + month)).toBe('42501');
    expect(
      await outcome(
        ingestA,
        "INSERT INTO integration_activity_log_default (id, organization_id, gateway_id, activity_type, direction, status, created_at) VALUES (gen_random_uuid(), $1, 'gw', 'x', 'internal', 'success', now())",
        [ORG_B],
      ),
    ).toBe('42501');
    expect(await outcome(ingestA, 'SELECT * FROM iot_gateway_logins')).toBe('42501');
    expect(await outcome(ingestA, 'SELECT iot_gateway_register_login(session_user, $1)', [ORG_B])).toBe(
      '42501',
    );
    expect(await outcome(ingestA, 'SET ROLE iot_gateway_owner')).toBe('42501');
    expect(await outcome(ingestA, 'SELECT * FROM iot_gateway_purge()')).toBe('42501');
    expect(await outcome(ingestA, 'CREATE TABLE ingest_was_here (x int)')).toBe('42501');
    // Still exactly five rows of B.
    const { rows } = await db.admin.query(
      'SELECT count(*)::int AS n FROM integration_activity_log WHERE organization_id = $1',
      [ORG_B],
    );
    expect(rows[0]).toEqual({ n: 5 });
  });

  it('ingest: SET row_security = off raises instead of bypassing', async () => {
    await ingestA.query('SET row_security = off');
    try {
      expect(await outcome(ingestA, INSERT_ACTIVITY, [randomUUID(), ORG_B, INTEGRATION_B, new Date()])).toBe(
        '42501',
      );
      expect(await outcome(ingestA, INSERT_ACTIVITY, [randomUUID(), ORG_A, INTEGRATION_A, new Date()])).toBe(
        '42501',
      );
    } finally {
      await ingestA.query('RESET row_security');
    }
  });

  it('reader: sees only its organization, also through the stats helper, and cannot write', async () => {
    const { rows: a } = await readerA.query<{ org: string }>(
      'SELECT DISTINCT organization_id AS org FROM integration_activity_log',
    );
    expect(a).toEqual([{ org: ORG_A }]);
    const { rows: b } = await readerB.query<{ org: string; n: number }>(
      'SELECT organization_id AS org, count(*)::int AS n FROM integration_sync_log GROUP BY 1',
    );
    expect(b).toEqual([{ org: ORG_B, n: 5 }]);
    expect(
      (
        await readerA.query('SELECT * FROM integration_activity_log WHERE integration_id = $1', [
          INTEGRATION_B,
        ])
      ).rowCount,
    ).toBe(0);
    expect(
      (await readerA.query('SELECT * FROM iot_gateway_activity_stats($1)', [INTEGRATION_B])).rowCount,
    ).toBe(0);
    const { rows: stats } = await readerB.query<{ count: string }>(
      'SELECT * FROM iot_gateway_activity_stats($1)',
      [INTEGRATION_B],
    );
    expect(stats.reduce((s, r) => s + Number(r.count), 0)).toBe(5);

    expect(await outcome(readerA, INSERT_ACTIVITY, [randomUUID(), ORG_A, INTEGRATION_A, new Date()])).toBe(
      '42501',
    );
    for (const table of ['integration_activity_log', 'integration_sync_log']) {
      expect(await outcome(readerA, 'UPDATE ' + table + " SET gateway_id = 'x'")).toBe('42501');
      expect(await outcome(readerA, 'DELETE FROM ' + table)).toBe('42501');
      expect(await outcome(readerA, 'TRUNCATE ' + table)).toBe('42501');
    }
    await readerA.query('SET row_security = off');
    try {
      expect(await outcome(readerA, 'SELECT count(*) FROM integration_activity_log')).toBe('42501');
    } finally {
      await readerA.query('RESET row_security');
    }
  });
});
