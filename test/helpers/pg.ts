import { randomBytes } from 'node:crypto';
import pg from 'pg';

export const PG_HOST = '127.0.0.1';
export const PG_PORT = 5432;
const ADMIN_URL = `postgres://postgres@${PG_HOST}:${PG_PORT}/postgres`;

export interface TestDatabase {
  readonly name: string;
  /** As the superuser `postgres`. */
  readonly url: string;
  /** URL of this database for another login, optionally through another port (a fault proxy). */
  urlFor(role: string, port?: number): string;
  /** A pool on this database as `postgres` (superuser: bypasses RLS). */
  readonly admin: pg.Pool;
  /** Creates a login in a group role, registered to an organization; returns its name. */
  createLogin(group: 'iot_gateway_ingest' | 'iot_gateway_reader', organizationId: string): Promise<string>;
  /** Drops the database (terminating sessions) and the logins made for it. */
  drop(): Promise<void>;
}

/**
 * A fresh database per test file on the local PostgreSQL (trust auth, user postgres). Roles are
 * cluster-wide, so logins get a per-run random suffix and are dropped with the database; the
 * group roles (iot_gateway_*) are shared and created idempotently by the migrations.
 */
export async function createTestDatabase(prefix: string): Promise<TestDatabase> {
  const suffix = randomBytes(4).toString('hex');
  const name = `${prefix.replace(/[^a-z0-9_]/g, '_')}_${suffix}`;
  const adminClient = new pg.Client({ connectionString: ADMIN_URL });
  await adminClient.connect();
  try {
    // Identifiers cannot be parameters; the name is built from [a-z0-9_] above.
    const create = 'CREATE DATABASE ' + name;
    await adminClient.query(create);
  } finally {
    await adminClient.end();
  }
  const url = `postgres://postgres@${PG_HOST}:${PG_PORT}/${name}`;
  const admin = new pg.Pool({ connectionString: url, max: 4 });
  admin.on('error', () => {});
  const logins: string[] = [];

  return {
    name,
    url,
    admin,
    urlFor(role, port = PG_PORT) {
      return `postgres://${role}@${PG_HOST}:${port}/${name}`;
    },
    async createLogin(group, organizationId) {
      const role = `gw_t_${suffix}_${logins.length + 1}`;
      logins.push(role);
      const createRole = 'CREATE ROLE ' + role + ' LOGIN IN ROLE ' + group;
      await admin.query(createRole);
      await admin.query('SELECT iot_gateway_register_login($1, $2)', [role, organizationId]);
      return role;
    },
    async drop() {
      await admin.end();
      const c = new pg.Client({ connectionString: ADMIN_URL });
      await c.connect();
      try {
        const dropDb = 'DROP DATABASE IF EXISTS ' + name + ' WITH (FORCE)';
        await c.query(dropDb);
        for (const role of logins) {
          const dropRole = 'DROP ROLE IF EXISTS ' + role;
          await c.query(dropRole);
        }
      } finally {
        await c.end();
      }
    },
  };
}
