import { createHash } from 'node:crypto';
import pg from 'pg';
import { ErrorCodes, GatewayError } from '../../errors.js';
import type { Logger } from '../../logger.js';
import { redactUrl } from '../../logger.js';
import { classifyCentralError } from './central-errors.js';
import { CENTRAL_MIGRATIONS, CentralRoles, type CentralMigration } from './central-schema.js';

/*
 * Why a small runner instead of node-pg-migrate or similar: installs here come from npm only
 * and the dependency list is fixed, and what we need is ~100 lines: ordered SQL strings,
 * checksums, one advisory lock and a transaction each. The parts a library would add (down
 * migrations, a CLI, JS migration files) are things we do not want on gateways: migrations
 * here are forward-only and ship inside the binary as constants.
 */

export interface MigrateCentralOptions {
  url: string;
  logger: Logger;
  connectTimeout?: number;
  /** For tests of tamper detection and upgrades; the shipped list otherwise. */
  migrations?: readonly CentralMigration[];
}

export interface MigrateCentralResult {
  /** Ids applied by this call, in order (empty when already up to date). */
  applied: string[];
  /** Id of the newest applied migration. */
  current: string;
}

/** A constant key: every gateway and operator serialises on it, per database. */
const MIGRATION_LOCK_KEY = 8271100000;

export function migrationChecksum(sql: string): string {
  return createHash('sha256').update(sql).digest('hex');
}

/**
 * Applies the central schema migrations: serialised with a session advisory lock so gateways
 * migrating at once are safe, each migration in its own transaction together with its record,
 * idempotent; a recorded migration whose checksum differs from the shipped one is an error.
 */
export async function migrateCentral(options: MigrateCentralOptions): Promise<MigrateCentralResult> {
  const { logger } = options;
  const migrations = options.migrations ?? CENTRAL_MIGRATIONS;
  const client = new pg.Client({
    connectionString: options.url,
    connectionTimeoutMillis: options.connectTimeout ?? 10_000,
    application_name: 'iot-gateway-migrate',
  });
  client.on('error', () => {}); // a dropped socket surfaces on the pending query instead
  try {
    await client.connect();
  } catch (err) {
    throw classifyCentralError(err, 'while connecting').error;
  }
  try {
    await client.query('SELECT pg_advisory_lock($1)', [MIGRATION_LOCK_KEY]);
    await ensureRoles(client);
    try {
      await client.query('SET ROLE ' + CentralRoles.owner);
    } catch (err) {
      throw new GatewayError(
        ErrorCodes.CENTRAL_AUTH,
        `the migrating login must be a member of ${CentralRoles.owner} (GRANT ${CentralRoles.owner} TO <login>), see docs/central-postgres.md`,
        { cause: err },
      );
    }
    await client.query(
      `CREATE TABLE IF NOT EXISTS iot_gateway_migrations (
         id         text PRIMARY KEY,
         checksum   text NOT NULL,
         applied_at timestamptz NOT NULL DEFAULT now()
       )`,
    );
    const done = new Map(
      (
        await client.query<{ id: string; checksum: string }>(
          'SELECT id, checksum FROM iot_gateway_migrations',
        )
      ).rows.map((r) => [r.id, r.checksum]),
    );
    const known = new Set(migrations.map((m) => m.id));
    for (const id of done.keys()) {
      if (!known.has(id)) {
        throw new GatewayError(
          ErrorCodes.CENTRAL_SCHEMA,
          `the central database has migration ${id} that this build does not know; run the newer iot-gateway that applied it`,
        );
      }
    }
    const applied: string[] = [];
    for (const migration of migrations) {
      const checksum = migrationChecksum(migration.sql);
      const recorded = done.get(migration.id);
      if (recorded !== undefined) {
        if (recorded !== checksum) {
          throw new GatewayError(
            ErrorCodes.CENTRAL_SCHEMA,
            `central migration ${migration.id} was applied with checksum ${recorded.slice(0, 12)}… but this build ships ${checksum.slice(0, 12)}…; a shipped migration was edited — restore it and add a new migration instead`,
            { details: { migration: migration.id } },
          );
        }
        continue;
      }
      await client.query('BEGIN');
      try {
        await client.query(migration.sql);
        await client.query('INSERT INTO iot_gateway_migrations (id, checksum) VALUES ($1, $2)', [
          migration.id,
          checksum,
        ]);
        await client.query('COMMIT');
      } catch (err) {
        await client.query('ROLLBACK').catch(() => {});
        const failure = classifyCentralError(err, `in migration ${migration.id}`);
        throw new GatewayError(
          failure.error.code,
          `central migration ${migration.id} failed: ${failure.error.message}`,
          { cause: err },
        );
      }
      applied.push(migration.id);
      logger.info({ migration: migration.id }, 'central_migration_applied');
    }
    const current = migrations.at(-1)?.id ?? '';
    logger.info({ applied, current, target: redactUrl(options.url) }, 'central_migrations_done');
    return { applied, current };
  } catch (err) {
    if (err instanceof GatewayError) throw err;
    throw classifyCentralError(err, 'while migrating').error;
  } finally {
    // Ending the session releases the advisory lock.
    await client.end().catch(() => {});
  }
}

/**
 * The group roles are cluster-wide. An operator normally creates them once (docs); when the
 * migrating login may create roles and they are missing, we create them. Two databases
 * migrating at once may race on CREATE ROLE; the loser's error is absorbed.
 */
async function ensureRoles(client: pg.Client): Promise<void> {
  const { rows } = await client.query<{ rolname: string }>(
    'SELECT rolname FROM pg_roles WHERE rolname = ANY($1::name[])',
    [Object.values(CentralRoles)],
  );
  const missing = Object.values(CentralRoles).filter((r) => !rows.some((row) => row.rolname === r));
  for (const role of missing) {
    try {
      // Role names come from the CentralRoles constants, never from input.
      await client.query('CREATE ROLE ' + role + ' NOLOGIN');
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (code === '42710' || code === '23505') continue; // created concurrently
      throw new GatewayError(
        ErrorCodes.CENTRAL_AUTH,
        `role ${role} does not exist and this login may not create it; run the one-time setup SQL in docs/central-postgres.md as a superuser`,
        { cause: err },
      );
    }
  }
  // The owner creates the tables in schema public. In PostgreSQL 15 only the database owner may
  // create there; grant it when the migrating login can (superuser or schema owner).
  const { rows: priv } = await client.query<{ ok: boolean }>(
    "SELECT has_schema_privilege($1, 'public', 'CREATE') AS ok",
    [CentralRoles.owner],
  );
  if (!priv[0]?.ok) {
    try {
      await client.query('GRANT USAGE, CREATE ON SCHEMA public TO ' + CentralRoles.owner);
    } catch (err) {
      throw new GatewayError(
        ErrorCodes.CENTRAL_AUTH,
        `${CentralRoles.owner} may not create tables in schema public; create the database with OWNER ${CentralRoles.owner} or GRANT CREATE ON SCHEMA public TO ${CentralRoles.owner}`,
        { cause: err },
      );
    }
  }
}
