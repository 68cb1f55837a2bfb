import Database from 'better-sqlite3';
import {
  closeSync,
  existsSync,
  fdatasync,
  mkdirSync,
  openSync,
  readFileSync,
  renameSync,
  unlinkSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { ErrorCodes, GatewayError, errorMessage } from '../errors.js';
import type { Logger } from '../logger.js';
import { LOCAL_MIGRATIONS } from './migrations.js';

export type SqliteDatabase = Database.Database;
export type Statement = Database.Statement;

export interface OpenStoreOptions {
  dataDir: string;
  logger: Logger;
  /** What to do when the file fails its integrity check (config `gateway.onCorruptStore`). */
  onCorrupt: 'refuse' | 'quarantine';
  /** Take the single-instance lock: the daemon does, one-shot CLI commands do not. */
  lock: boolean;
  now?: () => number;
}

export interface Store {
  readonly db: SqliteDatabase;
  readonly file: string;
  /** Set when a corrupt file was moved aside at open (policy `quarantine`). */
  readonly quarantinedTo: string | undefined;
  /**
   * fdatasync of the WAL file on libuv's thread pool, off the event loop: what synchronous=FULL
   * does inside COMMIT, for commits made with synchronous=NORMAL. Every commit that returned
   * before the call is durable when the callback runs without an error.
   */
  syncWal(callback: (err: Error | null) => void): void;
  /** Checkpoints the WAL, closes the database and releases the lock. Idempotent. */
  close(): void;
}

export const STORE_FILE = 'gateway.db';
const LOCK_FILE = 'gateway.lock';

/**
 * Opens the local store: WAL with synchronous=FULL (asserted, so a PUBACK means the message
 * survives power loss), forward-only migrations, the single-instance lock and an integrity
 * check whose failure is never answered with a silent empty queue.
 */
export function openStore(options: OpenStoreOptions): Store {
  const { dataDir, logger } = options;
  const now = options.now ?? Date.now;
  try {
    mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  } catch (err) {
    throw new GatewayError(
      ErrorCodes.STORE_OPEN,
      `cannot create data directory ${dataDir} (${(err as NodeJS.ErrnoException).code ?? errorMessage(err)}); create it for the gateway's user or change gateway.dataDir`,
      { cause: err },
    );
  }
  const releaseLock = options.lock ? takeLock(dataDir) : () => {};
  const file = join(dataDir, STORE_FILE);
  let quarantinedTo: string | undefined;
  let db: SqliteDatabase;
  try {
    try {
      db = openChecked(file);
    } catch (err) {
      if (!isCorruption(err)) throw err;
      if (options.onCorrupt === 'refuse') {
        throw new GatewayError(
          ErrorCodes.STORE_CORRUPT,
          `the store ${file} is corrupt (${errorMessage(err)}); move it and its -wal/-shm files aside to keep them for recovery and restart, or set gateway.onCorruptStore: quarantine`,
          { cause: err },
        );
      }
      quarantinedTo = `${file}.corrupt-${new Date(now()).toISOString().replace(/[:.]/g, '-')}`;
      for (const suffix of ['', '-wal', '-shm']) {
        if (existsSync(file + suffix)) renameSync(file + suffix, quarantinedTo + suffix);
      }
      logger.error({ file, quarantinedTo, err }, 'store_quarantined');
      db = openChecked(file);
    }
  } catch (err) {
    releaseLock();
    if (err instanceof GatewayError) throw err;
    throw new GatewayError(ErrorCodes.STORE_OPEN, `cannot open the store ${file}: ${errorMessage(err)}`, {
      cause: err,
    });
  }

  let closed = false;
  /** The WAL file, opened at the first sync (a WAL-mode commit has created it by then). */
  let walFd: number | undefined;
  let syncsInFlight = 0;
  const closeWal = () => {
    if (walFd === undefined || syncsInFlight > 0) return;
    closeSync(walFd);
    walFd = undefined;
  };
  return {
    db,
    file,
    quarantinedTo,
    syncWal(callback) {
      if (closed) {
        callback(new Error('the store is closed'));
        return;
      }
      try {
        walFd ??= openSync(file + '-wal', 'r+');
      } catch (err) {
        callback(err as Error);
        return;
      }
      syncsInFlight++;
      fdatasync(walFd, (err) => {
        syncsInFlight--;
        // Closed meanwhile: the fd outlived close() only for this sync.
        if (closed) closeWal();
        callback(err);
      });
    },
    close() {
      if (closed) return;
      closed = true;
      // Not while a sync runs on the thread pool: its fd number could be reused meanwhile.
      closeWal();
      try {
        db.pragma('wal_checkpoint(TRUNCATE)');
      } catch (err) {
        logger.warn({ err }, 'store_checkpoint_failed');
      }
      db.close();
      releaseLock();
    },
  };
}

function openChecked(file: string): SqliteDatabase {
  if (!existsSync(file)) closeSync(openSync(file, 'a', 0o600));
  const db = new Database(file);
  try {
    db.pragma('busy_timeout = 5000');
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = FULL');
    db.pragma('foreign_keys = ON');
    db.pragma('journal_size_limit = 67108864');
    const journal = db.pragma('journal_mode', { simple: true });
    const sync = db.pragma('synchronous', { simple: true });
    if (journal !== 'wal' || sync !== 2) {
      throw new GatewayError(
        ErrorCodes.STORE_NOT_DURABLE,
        `the store ${file} runs with journal_mode=${String(journal)} synchronous=${String(sync)}, not WAL/FULL; its filesystem must support WAL (no network filesystems)`,
      );
    }
    const check = db.pragma('quick_check', { simple: true });
    if (check !== 'ok')
      throw Object.assign(new Error(`quick_check: ${String(check)}`), { code: 'SQLITE_CORRUPT' });
    migrate(db);
    return db;
  } catch (err) {
    db.close();
    throw err;
  }
}

function migrate(db: SqliteDatabase): void {
  const version = db.pragma('user_version', { simple: true }) as number;
  if (version > LOCAL_MIGRATIONS.length) {
    throw new GatewayError(
      ErrorCodes.STORE_OPEN,
      `the store has schema version ${version} but this build knows only ${LOCAL_MIGRATIONS.length}; run the newer iot-gateway that wrote it`,
    );
  }
  for (let v = version; v < LOCAL_MIGRATIONS.length; v++) {
    db.transaction(() => {
      db.exec(LOCAL_MIGRATIONS[v]!);
      db.pragma(`user_version = ${v + 1}`);
    })();
  }
}

function isCorruption(err: unknown): boolean {
  const code = (err as { code?: string }).code ?? '';
  return code === 'SQLITE_CORRUPT' || code === 'SQLITE_NOTADB' || code.startsWith('SQLITE_CORRUPT');
}

/** Single-instance lock: a pid file created exclusively; a stale one (dead pid) is taken over. */
function takeLock(dataDir: string): () => void {
  const lockPath = join(dataDir, LOCK_FILE);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fd = openSync(lockPath, 'wx', 0o600);
      writeSync(fd, String(process.pid));
      closeSync(fd);
      return () => {
        try {
          if (readFileSync(lockPath, 'utf8') === String(process.pid)) unlinkSync(lockPath);
        } catch {
          // already gone
        }
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
        throw new GatewayError(
          ErrorCodes.STORE_OPEN,
          `cannot create lock file ${lockPath} (${(err as NodeJS.ErrnoException).code ?? errorMessage(err)}); the gateway's user must own gateway.dataDir`,
          { cause: err },
        );
      }
      const pid = Number.parseInt(readFileSafe(lockPath), 10);
      if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && processAlive(pid)) {
        throw new GatewayError(
          ErrorCodes.STORE_LOCKED,
          `another iot-gateway (pid ${pid}) is running on ${dataDir}; stop it first, or give this one its own gateway.dataDir`,
        );
      }
      try {
        unlinkSync(lockPath); // stale: its owner died (kill -9, power loss)
      } catch {
        // raced with another starter; the next attempt decides
      }
    }
  }
  throw new GatewayError(
    ErrorCodes.STORE_LOCKED,
    `another iot-gateway is starting on ${dataDir}; stop it first`,
  );
}

function readFileSafe(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
