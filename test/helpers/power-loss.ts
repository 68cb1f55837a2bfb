import { execFileSync } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, openSync, readFileSync, readSync, writeSync } from 'node:fs';
import { basename, join, resolve } from 'node:path';

/**
 * R2 power-loss model: `test/fixtures/power-loss/shim.c`, built here with the system C
 * compiler, is LD_PRELOADed into the daemon and journals an undo record before every write or
 * truncate of a file under a directory, and a record of every fsync/fdatasync. After a kill -9,
 * `powerCut` undoes what no sync covered, so the files hold what a disk would after a power cut.
 * `fixture: 'disk-full'` builds the R10 shim instead (`test/fixtures/disk-full/shim.c`).
 */
export function buildShim(outDir: string, fixture: 'power-loss' | 'disk-full' = 'power-loss'): string {
  const out = join(outDir, `${fixture}-shim.so`);
  execFileSync('cc', [
    '-shared',
    '-fPIC',
    '-O1',
    '-Wall',
    '-Werror',
    '-o',
    out,
    resolve(`test/fixtures/${fixture}/shim.c`),
    '-ldl',
    '-lpthread',
  ]);
  return out;
}

/**
 * The environment that makes a child journal its writes under `dir` to `journal`; with
 * `status`, the shim keeps a '1' in that file while a WAL holds frames no sync covered yet
 * (see killDuringSync).
 */
export function shimEnv(shim: string, dir: string, journal: string, status?: string): NodeJS.ProcessEnv {
  // libuv's io_uring path would sync without calling fdatasync(), which the shim cannot see.
  return {
    LD_PRELOAD: shim,
    PL_DIR: dir,
    PL_JOURNAL: journal,
    UV_USE_IO_URING: '0',
    ...(status === undefined ? {} : { PL_STATUS: status }),
  };
}

/**
 * SIGKILLs `proc` while its WAL holds frames that no sync covered yet, so the cut lands between
 * a commit's writes and their sync; kills it anyway after `timeoutMs`. Resolves whether it
 * caught that window.
 */
export async function killBeforeSync(
  proc: { kill(signal: NodeJS.Signals): boolean },
  status: string,
  timeoutMs: number,
): Promise<boolean> {
  const fd = openSync(status, existsSync(status) ? 'r' : 'w+');
  const byte = Buffer.alloc(1);
  const deadline = Date.now() + timeoutMs;
  try {
    // Each turn yields to the event loop, so the devices in this process keep publishing.
    while (Date.now() < deadline) {
      if (readSync(fd, byte, 0, 1, 0) === 1 && byte[0] === 0x31) {
        proc.kill('SIGKILL');
        return true;
      }
      await new Promise((r) => setImmediate(r));
    }
    proc.kill('SIGKILL');
    return false;
  } finally {
    closeSync(fd);
  }
}

interface Undo {
  seq: number;
  path: string;
  kind: 'W' | 'T';
  /** W: where the write went; T: the new length. */
  at: number;
  oldSize: number;
  old: Buffer;
}

export interface PowerCutResult {
  /** Writes and truncates undone: they reached the page cache but no sync made them durable. */
  undone: number;
  /** The same, per file name. */
  undoneByFile: Record<string, number>;
  /** Writes and truncates a later sync of their file covered. */
  durable: number;
  syncs: number;
}

/** Undoes every journaled write that no later sync of its file covered, newest first. */
export function powerCut(journal: string): PowerCutResult {
  const data = existsSync(journal) ? readFileSync(journal) : Buffer.alloc(0);
  const undos: Undo[] = [];
  const syncedBefore = new Map<string, number>();
  let syncs = 0;
  let pos = 0;
  const u64 = () => {
    const v = Number(data.readBigUInt64LE(pos));
    pos += 8;
    return v;
  };
  // A record cut short by the kill is dropped: its write had not happened yet.
  while (pos + 13 <= data.length) {
    const start = pos;
    try {
      const kind = String.fromCharCode(data[pos]!);
      pos += 1;
      const seq = u64();
      const len = data.readUInt32LE(pos);
      pos += 4;
      if (pos + len > data.length) break;
      const path = data.toString('utf8', pos, pos + len);
      pos += len;
      if (kind === 'S') {
        const began = u64();
        syncs++;
        syncedBefore.set(path, Math.max(syncedBefore.get(path) ?? 0, began));
        continue;
      }
      const at = u64();
      const oldSize = u64();
      const kept = u64();
      if (pos + kept > data.length) break;
      undos.push({ seq, path, kind: kind as 'W' | 'T', at, oldSize, old: data.subarray(pos, pos + kept) });
      pos += kept;
    } catch {
      pos = start;
      break;
    }
  }
  let undone = 0;
  let durable = 0;
  const undoneByFile: Record<string, number> = {};
  for (const u of undos.reverse()) {
    if (u.seq < (syncedBefore.get(u.path) ?? 0)) {
      durable++;
      continue;
    }
    if (!existsSync(u.path)) continue;
    const fd = openSync(u.path, 'r+');
    try {
      if (u.kind === 'W') {
        if (u.old.length > 0) writeSync(fd, u.old, 0, u.old.length, u.at);
        ftruncateSync(fd, u.oldSize);
      } else {
        ftruncateSync(fd, u.oldSize);
        if (u.old.length > 0) writeSync(fd, u.old, 0, u.old.length, u.at);
      }
    } finally {
      closeSync(fd);
    }
    undone++;
    const name = basename(u.path);
    undoneByFile[name] = (undoneByFile[name] ?? 0) + 1;
  }
  return { undone, undoneByFile, durable, syncs };
}
