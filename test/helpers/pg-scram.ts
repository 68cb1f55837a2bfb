import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chownSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { freePort } from './ports.js';

const run = promisify(execFile);

/** Debian's server binaries (postgresql-15); not on PATH. */
export const PG_BIN = process.env.PG_BIN ?? '/usr/lib/postgresql/15/bin';
const SYSTEM_USER = 'postgres';
const START_ATTEMPTS = 3;
const STEP_TIMEOUT_MS = 30_000;

export interface ScramCluster {
  readonly port: number;
  /** The superuser `postgres`'s password. */
  readonly password: string;
  /** URL on 127.0.0.1 (TCP, where scram-sha-256 applies); password null leaves it out of the URL. */
  url(options?: { user?: string; password?: string | null; database?: string }): string;
  /** Stops the server (immediate shutdown, bounded wait) and deletes its directory. Idempotent. */
  stop(): Promise<void>;
}

/**
 * A throwaway PostgreSQL cluster in a temp dir whose every login needs a password
 * (scram-sha-256): the machine's own server trusts everyone on loopback, so a wrong password
 * cannot be tested against it. initdb refuses to run as root; as root the server runs as the
 * `postgres` system user (runuser), otherwise as the current user.
 */
export async function startScramCluster(): Promise<ScramCluster> {
  const asRoot = process.getuid?.() === 0;
  const dir = mkdtempSync(join(tmpdir(), 'iot-pg-scram-'));
  const data = join(dir, 'data');
  const log = join(dir, 'server.log');
  const password = randomBytes(12).toString('hex');
  const exec = (bin: string, args: string[]) =>
    asRoot
      ? run('runuser', ['-u', SYSTEM_USER, '--', join(PG_BIN, bin), ...args], { timeout: STEP_TIMEOUT_MS })
      : run(join(PG_BIN, bin), args, { timeout: STEP_TIMEOUT_MS });

  let started = false;
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    if (started) {
      try {
        await exec('pg_ctl', ['-D', data, '-m', 'immediate', '-w', '-t', '15', 'stop']);
      } catch {
        killPostmaster(data);
      }
    }
    rmSync(dir, { recursive: true, force: true });
  };

  try {
    const pwfile = join(dir, 'pwfile');
    writeFileSync(pwfile, `${password}\n`, { mode: 0o600 });
    if (asRoot) {
      const uid = Number((await run('id', ['-u', SYSTEM_USER])).stdout.trim());
      const gid = Number((await run('id', ['-g', SYSTEM_USER])).stdout.trim());
      chownSync(dir, uid, gid);
      chownSync(pwfile, uid, gid);
    }
    // -N: no fsync of the data files; this cluster lives for one test file.
    await exec('initdb', [
      '-D',
      data,
      '-U',
      'postgres',
      '--auth=scram-sha-256',
      `--pwfile=${pwfile}`,
      '-N',
      '-E',
      'UTF8',
      '--locale=C',
    ]);
    rmSync(pwfile);

    let port = 0;
    let lastError: unknown;
    // A port free a moment ago can be taken before the server binds it: try another.
    for (let attempt = 0; attempt < START_ATTEMPTS && !started; attempt++) {
      port = await freePort();
      try {
        await exec('pg_ctl', [
          '-D',
          data,
          '-l',
          log,
          '-o',
          `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=30`,
          '-w',
          '-t',
          '30',
          'start',
        ]);
        started = true;
      } catch (err) {
        lastError = err;
        killPostmaster(data);
      }
    }
    if (!started) {
      const tail = existsSync(log) ? readFileSync(log, 'utf8').split('\n').slice(-10).join('\n') : '';
      throw new Error(`pg_ctl start failed: ${String(lastError)}\n${tail}`);
    }
    const portFinal = port;
    return {
      port: portFinal,
      password,
      url({ user = 'postgres', password: pw = password, database = 'postgres' } = {}) {
        const auth =
          pw === null ? encodeURIComponent(user) : `${encodeURIComponent(user)}:${encodeURIComponent(pw)}`;
        return `postgres://${auth}@127.0.0.1:${portFinal}/${database}`;
      },
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** Last resort when pg_ctl cannot stop it: the postmaster's pid is the first line of postmaster.pid. */
function killPostmaster(data: string): void {
  const pidFile = join(data, 'postmaster.pid');
  if (!existsSync(pidFile)) return;
  const pid = Number(readFileSync(pidFile, 'utf8').split('\n')[0]);
  if (!Number.isInteger(pid) || pid <= 1) return;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
}
