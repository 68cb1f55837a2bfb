import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { createSilentLogger } from '../src/logger.js';
import { createActivityLog, type ActivityLog } from '../src/store/activity-log.js';
import { migrateCentral } from '../src/store/central/central-migrations.js';
import { openStore, type Store } from '../src/store/database.js';
import { createReplicator } from '../src/store/replicator.js';
import { createTestDatabase, PG_HOST, PG_PORT } from '../test/helpers/pg.js';

const run = promisify(execFile);
const BATCH_SIZES = [1, 100, 500, 2000];
/** central.batchSize's default; the target is ≥ 0.6× COPY for it. */
const DEFAULT_BATCH = 500;
const TARGET_RATIO = 0.6;
const ROWS = envInt('BENCH_REPL_ROWS', 20_000);
/** Single-row batches are slow by nature; a smaller sample keeps the bench short. */
const ROWS_BATCH_1 = Math.min(ROWS, 2_000);
const REPS = envInt('BENCH_REPL_REPS', 3);
const ORG = randomUUID();
const COLUMNS =
  'id, organization_id, integration_id, gateway_id, activity_type, direction, status, response_time_ms, error_message, error_code, metadata, created_at';

/** One line of the result (flat, so bench/run.ts can tabulate it). */
export interface ReplicationBenchRow {
  path: string;
  rows: number;
  'COPY rows/s': number;
  'replicator rows/s': number;
  '× COPY per pair': string;
  '× COPY (median)': string;
}

interface Pair {
  copy: number;
  replicator: number;
}

/**
 * Replication throughput, end to end from the SQLite file through the replicator (as an ingest
 * login, through RLS) into PostgreSQL, per batch size, against a COPY of the same rows as the
 * ceiling (`psql \copy` as the superuser: COPY FROM is not allowed under RLS).
 *
 * Fair on a noisy machine: every replicator run is paired with a COPY run right next to it
 * (the order alternates per repetition, so drift in the machine's load hits both sides), the
 * ratio is taken per pair and the median of the ratios is reported. Both sides load into a
 * fresh, migrated database (same partitioned table, same indexes, the month's partition
 * present) and both are timed without connection setup: COPY by psql's `\timing` of the
 * `\copy` command, the replicator by `runOnce()` on a connection already open and verified.
 * The replicator's time includes reading SQLite and marking the rows replicated there. A
 * warm-up pair runs first and is not counted.
 *
 * Needs PostgreSQL on 127.0.0.1:5432 (trust, postgres) and psql. BENCH_REPL_ROWS (20,000) and
 * BENCH_REPL_REPS (3) resize it.
 */
export async function runReplicationBench(): Promise<ReplicationBenchRow[]> {
  const logger = createSilentLogger();
  const dir = mkdtempSync(join(tmpdir(), 'iot-bench-repl-'));
  const loadAtStart = loadNow();
  // One SQLite file per sample size (replication goes in seq order up to a watermark, so a file
  // holds exactly the rows to move), and the same rows as CSV for COPY.
  const locals = new Map<number, { store: Store; activity: ActivityLog; csv: string }>();
  try {
    for (const rows of new Set([ROWS, ROWS_BATCH_1])) {
      const dataDir = join(dir, `store-${rows}`);
      const store = openStore({ dataDir, logger, onCorrupt: 'refuse', lock: false });
      const activity = createActivityLog({
        db: store.db,
        gatewayId: 'gw-bench',
        organizationId: ORG,
        logger,
      });
      locals.set(rows, { store, activity, csv: join(dir, `rows-${rows}.csv`) });
      seed(activity, store, rows);
      writeFileSync(
        locals.get(rows)!.csv,
        toCsv(store.db.prepare('SELECT * FROM activity_log ORDER BY seq').all() as Record<string, unknown>[]),
      );
    }

    const pairOf = async (batchSize: number, copyFirst: boolean): Promise<Pair> => {
      const rows = batchSize === 1 ? ROWS_BATCH_1 : ROWS;
      const local = locals.get(rows)!;
      const copy = () => timeCopy(local.csv, rows);
      const replicate = () => timeReplicator(local.store, local.activity, batchSize, rows);
      if (copyFirst) {
        const c = await copy();
        return { copy: c, replicator: await replicate() };
      }
      const r = await replicate();
      return { copy: await copy(), replicator: r };
    };

    progress(`replication bench: ${ROWS} rows, ${REPS} repetition(s), warm-up`);
    await pairOf(DEFAULT_BATCH, true);

    const pairs = new Map<number, Pair[]>(BATCH_SIZES.map((b) => [b, []]));
    for (let rep = 0; rep < REPS; rep++) {
      for (const batchSize of BATCH_SIZES) {
        const pair = await pairOf(batchSize, rep % 2 === 0);
        pairs.get(batchSize)!.push(pair);
        progress(
          `  rep ${rep + 1} batch ${batchSize}: COPY ${Math.round(pair.copy)} rows/s, replicator ${Math.round(pair.replicator)} rows/s, ${(pair.replicator / pair.copy).toFixed(2)}×`,
        );
      }
    }

    const results: ReplicationBenchRow[] = BATCH_SIZES.map((batchSize) => {
      const list = pairs.get(batchSize)!;
      const ratios = list.map((p) => p.replicator / p.copy);
      return {
        path: `replicator batch ${batchSize}${batchSize === DEFAULT_BATCH ? ' (default)' : ''}`,
        rows: batchSize === 1 ? ROWS_BATCH_1 : ROWS,
        'COPY rows/s': Math.round(median(list.map((p) => p.copy))),
        'replicator rows/s': Math.round(median(list.map((p) => p.replicator))),
        '× COPY per pair': ratios.map((r) => r.toFixed(2)).join(' / '),
        '× COPY (median)': median(ratios).toFixed(2),
      };
    });
    const headers = Object.keys(results[0]!) as (keyof ReplicationBenchRow)[];
    const cell = (v: string | number) => (typeof v === 'number' ? v.toLocaleString('en-US') : v);
    const defaultRatio = Number(
      results.find((r) => r.path.startsWith(`replicator batch ${DEFAULT_BATCH} `))!['× COPY (median)'],
    );
    const lines = [
      `| ${headers.join(' | ')} |`,
      `|${headers.map((h) => (h === 'path' || h === '× COPY per pair' ? '---' : '---:')).join('|')}|`,
      ...results.map((r) => `| ${headers.map((h) => cell(r[h])).join(' | ')} |`),
      '',
      `Target: batch ${DEFAULT_BATCH} ≥ ${TARGET_RATIO}× COPY (median of per-pair ratios): ${defaultRatio.toFixed(2)}× → ${defaultRatio >= TARGET_RATIO ? 'PASS' : 'MISS'}. ` +
        `${REPS} repetition(s) after a warm-up; load average ${loadAtStart} at start, ${loadNow()} at end.`,
    ];
    process.stdout.write('\nReplication to central PostgreSQL\n' + lines.join('\n') + '\n');
    return results;
  } finally {
    for (const local of locals.values()) local.store.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

function seed(activity: ActivityLog, store: Store, rows: number): void {
  const integration = randomUUID();
  store.db.transaction(() => {
    for (let i = 0; i < rows; i++) {
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
}

/** rows/s of the replicator moving every row of the SQLite file (`rows` of them) into a fresh database. */
async function timeReplicator(
  store: Store,
  activity: ActivityLog,
  batchSize: number,
  rows: number,
): Promise<number> {
  const logger = createSilentLogger();
  const db = await createTestDatabase('bench_repl');
  try {
    await migrateCentral({ url: db.url, logger });
    const login = await db.createLogin('iot_gateway_ingest', ORG);
    const replicator = createReplicator({
      db: store.db,
      central: { url: db.urlFor(login), batchSize, interval: 1_000, connectTimeout: 5_000 },
      organizationId: ORG,
      gatewayId: 'gw-bench',
      logger,
      activity,
    });
    try {
      // Nothing pending: this run only opens and verifies the connection (COPY's is untimed too).
      store.db.prepare("UPDATE replication_watermark SET seq = 1e9 WHERE log = 'activity_log'").run();
      await replicator.runOnce();
      // Every row is pending again.
      store.db.prepare("UPDATE replication_watermark SET seq = 0 WHERE log = 'activity_log'").run();
      // The reset's WAL must not be checkpointed on the replicator's time.
      store.db.pragma('wal_checkpoint(TRUNCATE)');
      const started = process.hrtime.bigint();
      let moved = 0;
      for (let round = 0; round < 10 && moved < rows; round++)
        moved += (await replicator.runOnce()).replicated;
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      if (moved !== rows) throw new Error(`bench replicated ${moved} of ${rows} rows`);
      const { rows: count } = await db.admin.query<{ n: number }>(
        'SELECT count(*)::int AS n FROM integration_activity_log',
      );
      if (count[0]?.n !== rows) throw new Error(`central has ${count[0]?.n} of ${rows} rows`);
      return rows / seconds;
    } finally {
      await replicator.stop();
    }
  } finally {
    await db.drop();
  }
}

/** rows/s of `psql \copy` of the same rows (as CSV) into a fresh database; psql's own timing of the command. */
async function timeCopy(csv: string, rows: number): Promise<number> {
  const db = await createTestDatabase('bench_copy');
  try {
    await migrateCentral({ url: db.url, logger: createSilentLogger() });
    const { stdout } = await run('psql', [
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
      '\\timing on',
      '-c',
      `\\copy integration_activity_log (${COLUMNS}) from '${csv}' csv`,
    ]);
    const ms = /Time: ([0-9.]+) ms/.exec(stdout)?.[1];
    if (ms === undefined) throw new Error(`psql printed no timing: ${stdout}`);
    const { rows: count } = await db.admin.query<{ n: number }>(
      'SELECT count(*)::int AS n FROM integration_activity_log',
    );
    if (count[0]?.n !== rows) throw new Error(`COPY loaded ${count[0]?.n} of ${rows} rows`);
    return rows / (Number(ms) / 1000);
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
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

function envInt(key: string, fallback: number): number {
  const raw = process.env[key];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value <= 0) throw new Error(`${key}=${raw} must be a positive integer`);
  return value;
}

function loadNow(): string {
  return loadavg()
    .map((l) => l.toFixed(2))
    .join(' / ');
}

function progress(line: string): void {
  process.stderr.write(`${line}\n`);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  runReplicationBench().catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  });
}
