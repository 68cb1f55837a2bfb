import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { GatewayError } from '../../src/errors.js';
import { createSilentLogger } from '../../src/logger.js';
import { createActivityLog, type ActivityLog } from '../../src/store/activity-log.js';
import { migrateCentral } from '../../src/store/central/central-migrations.js';
import { openStore, type Store } from '../../src/store/database.js';
import { createReplicator, type Replicator } from '../../src/store/replicator.js';
import { createTestDatabase, PG_PORT, type TestDatabase } from '../helpers/pg.js';
import { startTcpProxy, type TcpProxy } from '../helpers/tcp-proxy.js';

const ORG = randomUUID();
const INTEGRATION = randomUUID();
const here = dirname(fileURLToPath(import.meta.url));
const logger = createSilentLogger();

describe('replication under faults', () => {
  let db: TestDatabase;
  let login: string;
  let proxy: TcpProxy;
  let dir: string;
  let store: Store;
  let activity: ActivityLog;
  const replicators: Replicator[] = [];

  beforeAll(async () => {
    db = await createTestDatabase('repl_faults');
    await migrateCentral({ url: db.url, logger });
    login = await db.createLogin('iot_gateway_ingest', ORG);
    proxy = await startTcpProxy(PG_PORT);
  });
  afterEach(async () => {
    for (const r of replicators.splice(0)) await r.stop();
    store?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
    await db.admin.query('TRUNCATE integration_activity_log, integration_sync_log');
  });
  afterAll(async () => {
    await proxy.close();
    await db.drop();
  });

  function openLocal(): void {
    dir = mkdtempSync(join(tmpdir(), 'iot-repl-faults-'));
    store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
    activity = createActivityLog({ db: store.db, gatewayId: 'gw-faults', organizationId: ORG, logger });
  }

  /** Rows of identical encoded size, so every batch of n rows costs the same bytes on the wire. */
  function seed(n: number): string[] {
    const ids: string[] = [];
    // One transaction: the store runs synchronous=FULL, a commit per row would cost an fsync each.
    store.db.transaction(() => {
      for (let i = 0; i < n; i++) {
        ids.push(
          activity.record({
            integrationId: INTEGRATION,
            activityType: 'publish',
            direction: 'outgoing',
            status: 'success',
            responseTimeMs: 100,
            metadata: { k: 'x' },
          }),
        );
      }
    })();
    return ids;
  }

  /** A fresh replicator: new connection, session check and partition check every time, so the bytes repeat. */
  function fresh(batchSize = 100): Replicator {
    const r = createReplicator({
      db: store.db,
      central: { url: db.urlFor(login, proxy.port), batchSize, interval: 20, connectTimeout: 2_000 },
      organizationId: ORG,
      gatewayId: 'gw-faults',
      logger,
      activity,
      // A frozen clock: no aggregated `replicate` row appears between runs and changes the byte counts.
      now: () => 1_800_000_000_000,
    });
    replicators.push(r);
    return r;
  }

  async function inCentral(ids: string[]): Promise<number> {
    const { rows } = await db.admin.query<{ n: number }>(
      'SELECT count(*)::int AS n FROM integration_activity_log WHERE id = ANY($1::uuid[])',
      [ids],
    );
    return rows[0]!.n;
  }

  function marked(ids: string[]): number {
    const r = store.db
      .prepare(
        "SELECT count(*) AS n FROM activity_log WHERE seq <= (SELECT seq FROM replication_watermark WHERE log = 'activity_log') AND id IN (SELECT value FROM json_each(?))",
      )
      .get(JSON.stringify(ids));
    return (r as { n: number }).n;
  }

  async function expectExactlyOnce(): Promise<void> {
    const local = (store.db.prepare('SELECT id FROM activity_log ORDER BY id').all() as { id: string }[]).map(
      (r) => r.id,
    );
    const { rows } = await db.admin.query<{ id: string }>(
      'SELECT id::text AS id FROM integration_activity_log ORDER BY id',
    );
    const central = rows.map((r) => r.id);
    expect(new Set(central).size).toBe(central.length); // none duplicated
    expect(central).toEqual(local); // none missing, none extra
    const pending = store.db
      .prepare(
        "SELECT count(*) AS n FROM activity_log WHERE seq > (SELECT seq FROM replication_watermark WHERE log = 'activity_log')",
      )
      .get() as { n: number };
    expect(pending.n).toBe(0);
  }

  it('cuts mid-batch and around COMMIT, repeatedly: every row ends up in PostgreSQL exactly once', async () => {
    openLocal();
    const N = 40;
    // Calibrate: the bytes one fresh run of N rows sends and receives; it ends with COMMIT
    // (client: 'Q' + len + "COMMIT\0" = 12 bytes; server: CommandComplete + ReadyForQuery = 18 bytes).
    seed(N);
    const before = { ...proxy.stats };
    expect(await fresh().runOnce()).toMatchObject({ replicated: N, pending: 0 });
    const clientBytes = proxy.stats.clientBytes - before.clientBytes;
    const serverBytes = proxy.stats.serverBytes - before.serverBytes;
    const again = { ...proxy.stats };
    seed(N);
    await fresh().runOnce();
    expect(proxy.stats.clientBytes - again.clientBytes).toBe(clientBytes); // the calibration holds
    expect(proxy.stats.serverBytes - again.serverBytes).toBe(serverBytes);

    const modes = [
      {
        name: 'mid-batch',
        arm: () => proxy.cutAfterClientBytes(50 + Math.floor(Math.random() * (clientBytes - 12 - 50))),
        committed: false as boolean | null,
      },
      {
        name: 'COMMIT truncated',
        arm: () => proxy.cutAfterClientBytes(clientBytes - 6),
        committed: false as boolean | null,
      },
      { name: 'COMMIT sent, link reset', arm: () => proxy.cutAfterClientBytes(clientBytes), committed: null },
      {
        name: 'COMMIT done, reply lost',
        arm: () => proxy.cutAfterServerBytes(serverBytes - 17),
        committed: true as boolean | null,
      },
    ];
    for (let round = 0; round < 4; round++) {
      for (const mode of modes) {
        const ids = seed(N);
        const replicator = fresh();
        mode.arm();
        const err = await replicator.runOnce().catch((e: unknown) => e);
        expect(err, mode.name).toBeInstanceOf(GatewayError);
        expect(marked(ids), mode.name).toBe(0); // never marked without a COMMIT acknowledgement
        if (mode.committed !== null) expect(await inCentral(ids), mode.name).toBe(mode.committed ? N : 0);
        // The next run resends; ON CONFLICT DO NOTHING makes the resend harmless.
        const result = await replicator.runOnce();
        expect(result.pending, mode.name).toBe(0);
        expect(await inCentral(ids), mode.name).toBe(N);
        expect(marked(ids), mode.name).toBe(N);
      }
    }
    await expectExactlyOnce();
  });

  it('survives links reset at random moments while the loop drains', async () => {
    openLocal();
    seed(3000);
    const replicator = fresh(50);
    replicator.start();
    for (let i = 0; i < 12; i++) {
      await new Promise((r) => setTimeout(r, 20 + Math.random() * 60));
      proxy.resetAll();
    }
    for (let i = 0; i < 400 && replicator.status().pendingRows > 0; i++)
      await new Promise((r) => setTimeout(r, 25));
    await replicator.stop();
    await expectExactlyOnce();
  });

  it('kill -9 of the replicating process at random moments, then a clean run: exactly once', async () => {
    const fixture = join(here, '../fixtures/replicate-child.mjs');
    expect(
      existsSync(join(here, '../../dist/store/replicator.js')),
      'run `npm run build` first (npm test does)',
    ).toBe(true);
    openLocal();
    const total = 5000;
    seed(total);
    store.close();

    const env = { ...process.env, DATA_DIR: dir, CENTRAL_URL: db.urlFor(login), ORG, BATCH: '10' };
    const runChild = (killAfterMs: number | null) =>
      new Promise<{ code: number | null; signal: NodeJS.Signals | null; out: string }>((resolve, reject) => {
        const child = spawn(process.execPath, [fixture], { env, stdio: ['ignore', 'pipe', 'pipe'] });
        let out = '';
        let err = '';
        child.stdout.on('data', (d: Buffer) => {
          out += d.toString();
          if (killAfterMs !== null && out.includes('started')) {
            const delay = killAfterMs;
            killAfterMs = null; // once
            setTimeout(() => child.kill('SIGKILL'), delay);
          }
        });
        child.stderr.on('data', (d: Buffer) => (err += d.toString()));
        child.on('error', reject);
        child.on('exit', (code, signal) =>
          code !== 0 && signal === null ? reject(new Error(err)) : resolve({ code, signal, out }),
        );
      });

    const progress: number[] = [];
    for (let i = 0; i < 6; i++) {
      const r = await runChild(30 + Math.floor(Math.random() * 250));
      store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
      progress.push(
        (
          store.db
            .prepare(
              "SELECT count(*) AS n FROM activity_log WHERE seq <= (SELECT seq FROM replication_watermark WHERE log = 'activity_log')",
            )
            .get() as { n: number }
        ).n,
      );
      store.close();
      if (r.signal === null) break; // it finished before the kill
    }
    // At least one kill landed in the middle of the work.
    expect(progress.some((n) => n > 0 && n < total)).toBe(true);
    const last = await runChild(null);
    expect(last.out).toContain('done');

    store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
    expect(store.db.pragma('integrity_check', { simple: true })).toBe('ok');
    await expectExactlyOnce();
  });
});
