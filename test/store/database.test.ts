import { spawn } from 'node:child_process';
import {
  existsSync,
  mkdtempSync,
  readdirSync,
  writeFileSync,
  openSync,
  writeSync,
  closeSync,
  statSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { openStore, STORE_FILE } from '../../src/store/database.js';
import { LOCAL_MIGRATIONS } from '../../src/store/migrations.js';

const logger = pino({ level: 'silent' });
const tempDir = () => mkdtempSync(join(tmpdir(), 'gw-db-'));

describe('local store', () => {
  it('runs WAL with synchronous=FULL, files 0600, and migrates forward', () => {
    const dataDir = join(tempDir(), 'state'); // created by openStore
    const store = openStore({ dataDir, logger, onCorrupt: 'refuse', lock: true });
    expect(store.db.pragma('journal_mode', { simple: true })).toBe('wal');
    expect(store.db.pragma('synchronous', { simple: true })).toBe(2);
    expect(store.db.pragma('user_version', { simple: true })).toBeGreaterThanOrEqual(1);
    expect(statSync(store.file).mode & 0o777).toBe(0o600);
    // The WAL and the shared-memory index hold the same data; SQLite gives them the file's mode.
    store.db
      .prepare("INSERT INTO replication_watermark (log, seq) VALUES ('sync_log', 0) ON CONFLICT DO NOTHING")
      .run();
    for (const suffix of ['-wal', '-shm']) expect(statSync(store.file + suffix).mode & 0o777).toBe(0o600);
    expect(statSync(dataDir).mode & 0o777).toBe(0o700);
    store.close();
    // Reopening is a no-op migration.
    openStore({ dataDir, logger, onCorrupt: 'refuse', lock: true }).close();
  });

  it('turns per-row replication marks of an older store into a watermark below the oldest pending row', () => {
    const dataDir = tempDir();
    const old = new Database(join(dataDir, STORE_FILE));
    old.exec(LOCAL_MIGRATIONS[0]! + LOCAL_MIGRATIONS[1]!);
    old.pragma('user_version = 2');
    const insert = old.prepare(
      `INSERT INTO activity_log (id, gateway_id, activity_type, direction, status, created_at, replicated_at, replication_error)
       VALUES (?, 'gw', 'publish', 'outgoing', 'success', 1, ?, ?)`,
    );
    // 1–3 replicated, 4 set aside, 5 replicated, 6–7 pending (the old replicator went in seq order).
    for (const [seq, at, error] of [
      [1, 5, null],
      [2, 5, null],
      [3, 5, null],
      [4, null, '42501: rejected'],
      [5, 5, null],
      [6, null, null],
      [7, null, null],
    ] as const)
      insert.run(`id-${seq}`, at, error);
    old.close();

    const store = openStore({ dataDir, logger, onCorrupt: 'refuse', lock: false });
    const marks = store.db.prepare('SELECT log, seq FROM replication_watermark ORDER BY log').all();
    expect(marks).toEqual([
      { log: 'activity_log', seq: 5 },
      { log: 'sync_log', seq: 0 },
    ]);
    const columns = store.db.prepare("SELECT name FROM pragma_table_info('activity_log')").all();
    expect(columns).not.toContainEqual({ name: 'replicated_at' });
    expect(store.db.prepare('SELECT count(*) AS n FROM activity_log').get()).toEqual({ n: 7 });
    store.close();
  });

  it('refuses a second daemon on the same dataDir, and takes over a stale lock', async () => {
    const dataDir = tempDir();
    const first = openStore({ dataDir, logger, onCorrupt: 'refuse', lock: true });
    // The lock holder must be another live process for the check to mean anything: write its pid.
    const holder = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 20000)']);
    first.close();
    writeFileSync(join(dataDir, 'gateway.lock'), String(holder.pid));
    expect(() => openStore({ dataDir, logger, onCorrupt: 'refuse', lock: true })).toThrow(
      /another iot-gateway \(pid \d+\) is running on .*; stop it first/,
    );
    holder.kill('SIGKILL');
    await new Promise((r) => holder.once('exit', r));
    // The holder died without cleaning up (kill -9): its lock is stale and is taken over.
    const again = openStore({ dataDir, logger, onCorrupt: 'refuse', lock: true });
    again.close();
    expect(existsSync(join(dataDir, 'gateway.lock'))).toBe(false);
  });

  it('refuses a corrupt file by default and keeps it untouched', () => {
    const dataDir = tempDir();
    writeFileSync(join(dataDir, STORE_FILE), Buffer.alloc(8192, 0x41));
    expect(() => openStore({ dataDir, logger, onCorrupt: 'refuse', lock: true })).toThrow(
      /is corrupt .*move it and its -wal\/-shm files aside .* or set gateway.onCorruptStore: quarantine/,
    );
    expect(readdirSync(dataDir)).toContain(STORE_FILE);
    expect(existsSync(join(dataDir, 'gateway.lock'))).toBe(false); // the lock is released on failure
  });

  it('quarantines a corrupt file when configured and reports where it went', () => {
    const dataDir = tempDir();
    const store0 = openStore({ dataDir, logger, onCorrupt: 'refuse', lock: true });
    store0.db
      .prepare(
        "INSERT INTO queue_messages (integration_id, device_id, topic, payload, qos, enqueued_at) VALUES ('i', 'd', 't', x'00', 1, 0)",
      )
      .run();
    store0.close();
    // Overwrite page 2 onward: the header survives, the b-trees do not.
    const fd = openSync(join(dataDir, STORE_FILE), 'r+');
    writeSync(fd, Buffer.alloc(4096 * 3, 0xff), 0, 4096 * 3, 4096);
    closeSync(fd);
    const store = openStore({ dataDir, logger, onCorrupt: 'quarantine', lock: true });
    expect(store.quarantinedTo).toMatch(/gateway\.db\.corrupt-/);
    expect(existsSync(store.quarantinedTo!)).toBe(true);
    expect((store.db.prepare('SELECT count(*) AS n FROM queue_messages').get() as { n: number }).n).toBe(0);
    store.close();
  });

  it('explains a data directory it cannot create', () => {
    const notADir = join(tempDir(), 'plain-file');
    writeFileSync(notADir, '');
    expect(() =>
      openStore({ dataDir: join(notADir, 'data'), logger, onCorrupt: 'refuse', lock: true }),
    ).toThrow(/cannot create data directory .*change gateway.dataDir/);
  });
});
