import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { createSilentLogger } from '../src/logger.js';
import { createActivityLog } from '../src/store/activity-log.js';
import { migrateCentral } from '../src/store/central/central-migrations.js';
import { openStore } from '../src/store/database.js';
import { createReplicator } from '../src/store/replicator.js';
import { createTestDatabase, PG_HOST, PG_PORT } from '../test/helpers/pg.js';

const run = promisify(execFile);
const BATCH_SIZES = [1, 100, 500, 2000];
const ROWS = 20_000;
/** Single-row batches are slow by nature; a smaller sample keeps the bench short. */
const ROWS_BATCH_1 = 2_000;
const RUNS = 3;
const ORG = randomUUID();

interface Measurement {
  label: string;
  rows: number;
  rowsPerSecond: number;
}

/**
 * Replication throughput, end to end from the SQLite file through the replicator (as an ingest
 * login, through RLS) into a fresh database, per batch size, against `psql \copy` of the same
 * rows as the ceiling (COPY runs as the superuser: COPY FROM is not allowed under RLS).
 * Median of RUNS runs each. Prints a table; needs PostgreSQL on 127.0.0.1:5432 (trust, postgres).
 */
export async function runReplicationBench(): Promise<Measurement[]> {
  const logger = createSilentLogger();
  const dir = mkdtempSync(join(tmpdir(), 'iot-bench-repl-'));
  const store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
  try {
    const activity = createActivityLog({ db: store.db, gatewayId: 'gw-bench', organizationId: ORG, logger });
    const integration = randomUUID();
    store.db.transaction(() => {
      for (let i = 0; i < ROWS; i++) {
        activity.record({
          integrationId: integration,
          activityType: i % 4 === 0 ? 'connect' : 'publish',
          direction: 'outgoing',
          status: i % 10 === 0 ? 'failed' : 'success',
          responseTimeMs: i % 500,
          errorMessage: i % 10 === 0 ? 'upstream timeout' : null,
          metadata: { requestId: randomUUID(), attempt: 1, bytes: i },
        });
      }
    })();

    const results: Measurement[] = [];
    const copyRates: number[] = [];
    const csv = join(dir, 'rows.csv');
    writeFileSync(
      csv,
      toCsv(store.db.prepare('SELECT * FROM activity_log ORDER BY seq').all() as Record<string, unknown>[]),
    );
    for (let i = 0; i < RUNS; i++) copyRates.push(await timeCopy(csv));
    const copy = median(copyRates);
    results.push({ label: 'COPY (psql \\copy)', rows: ROWS, rowsPerSecond: copy });

    for (const batchSize of BATCH_SIZES) {
      const rows = batchSize === 1 ? ROWS_BATCH_1 : ROWS;
      const rates: number[] = [];
      for (let i = 0; i < RUNS; i++) {
        const db = await createTestDatabase('bench_repl');
        try {
          await migrateCentral({ url: db.url, logger });
          const login = await db.createLogin('iot_gateway_ingest', ORG);
          // Only the first `rows` rows are pending; the rest count as already replicated.
          store.db
            .prepare('UPDATE activity_log SET replicated_at = CASE WHEN seq <= ? THEN NULL ELSE 1 END')
            .run(rows);
          const replicator = createReplicator({
            db: store.db,
            central: { url: db.urlFor(login), batchSize, interval: 1_000, connectTimeout: 5_000 },
            organizationId: ORG,
            gatewayId: 'gw-bench',
            logger,
            activity,
          });
          const started = process.hrtime.bigint();
          let moved = 0;
          for (let round = 0; round < 10 && moved < rows; round++)
            moved += (await replicator.runOnce()).replicated;
          const seconds = Number(process.hrtime.bigint() - started) / 1e9;
          await replicator.stop();
          if (moved !== rows) throw new Error(`bench replicated ${moved} of ${rows} rows`);
          rates.push(rows / seconds);
        } finally {
          await db.drop();
        }
      }
      results.push({ label: `replicator batch ${batchSize}`, rows, rowsPerSecond: median(rates) });
    }

    const lines = [
      '| path | rows | rows/s (median of 3) | × COPY |',
      '|---|---:|---:|---:|',
      ...results.map(
        (r) =>
          `| ${r.label} | ${r.rows} | ${Math.round(r.rowsPerSecond).toLocaleString('en-US')} | ${(r.rowsPerSecond / copy).toFixed(2)} |`,
      ),
    ];
    process.stdout.write('\nReplication to central PostgreSQL\n' + lines.join('\n') + '\n');
    return results;
  } finally {
    store.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

async function timeCopy(csv: string): Promise<number> {
  const db = await createTestDatabase('bench_copy');
  try {
    await migrateCentral({ url: db.url, logger: createSilentLogger() });
    const started = process.hrtime.bigint();
    await run('psql', [
      '-X',
      '-q',
      '-v',
      'ON_ERROR_STOP=1',
      '-h',
      PG_HOST,
      '-p',
      String(PG_PORT),
      '-U',
      'postgres',
      '-d',
      db.name,
      '-c',
      `\\copy integration_activity_log (id, organization_id, integration_id, gateway_id, activity_type, direction, status, response_time_ms, error_message, error_code, metadata, created_at) from '${csv}' csv`,
    ]);
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    const { rows } = await db.admin.query<{ n: number }>(
      'SELECT count(*)::int AS n FROM integration_activity_log',
    );
    if (rows[0]?.n !== ROWS) throw new Error(`COPY loaded ${rows[0]?.n} of ${ROWS} rows`);
    return ROWS / seconds;
  } finally {
    await db.drop();
  }
}

function toCsv(rows: Record<string, unknown>[]): string {
  const field = (v: unknown) => (v === null || v === undefined ? '' : `"${String(v).replace(/"/g, '""')}"`);
  return rows
    .map((r) =>
      [
        r.id,
        r.organization_id ?? ORG,
        r.integration_id,
        r.gateway_id,
        r.activity_type,
        r.direction,
        r.status,
        r.response_time_ms,
        r.error_message,
        r.error_code,
        r.metadata,
        new Date(r.created_at as number).toISOString(),
      ]
        .map(field)
        .join(','),
    )
    .join('\n')
    .concat('\n');
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  runReplicationBench().catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  });
}
