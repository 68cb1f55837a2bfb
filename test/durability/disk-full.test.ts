import { existsSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { startDaemon } from '../helpers/daemon.js';
import { buildShim } from '../helpers/power-loss.js';
import {
  allDelivered,
  checkDelivery,
  connectDevice,
  deliveredCount,
  expectIntactStore,
  pump,
  startDurabilityWorld,
  waitFor,
} from '../helpers/sequenced-devices.js';

/**
 * R10 at the daemon: the disk fills up while devices publish (an LD_PRELOAD shim makes every
 * write that would lengthen a file under dataDir fail with ENOSPC, as a full ext4 does). No
 * message may be acknowledged that is not on disk, the daemon must not crash, and once space is
 * back it must take messages again by itself, deliver everything it acknowledged and leave an
 * intact store.
 */

const DEVICES = 2;
const WINDOW = 16;

/**
 * A durability world whose daemon runs with the disk-full shim; `switches` names the shim's
 * switch files (DF_SWITCH: no room to grow a file, DF_SYNC_EIO: syncs fail) inside the world's dir.
 */
async function shimmedWorld(
  name: string,
  switches: { DF_SWITCH?: string; DF_SYNC_EIO?: string },
  cleanup: (() => Promise<unknown> | void)[],
) {
  const world = await startDurabilityWorld(name, DEVICES, cleanup);
  const dataDir = join(world.dir, 'data');
  const env: NodeJS.ProcessEnv = {
    LD_PRELOAD: buildShim(world.dir, 'disk-full'),
    DF_DIR: dataDir,
    UV_USE_IO_URING: '0',
  };
  for (const [key, file] of Object.entries(switches)) env[key] = join(world.dir, file);
  const daemon = startDaemon(world.configFile, env);
  cleanup.push(() => daemon.stop('SIGKILL'));
  await daemon.ready;
  /** Each device connects and sends `count` more messages, or fewer if its link is closed. */
  const publishMore = async (count: number) => {
    for (const d of world.devices) d.client = await connectDevice(world.port, d, world.password);
    await Promise.all(world.devices.map((d) => pump(d, d.next + count, WINDOW)));
    for (const d of world.devices) d.client?.end(true);
  };
  return { ...world, dataDir, daemon, publishMore };
}

describe('durability: disk full while devices publish', () => {
  const cleanup: (() => Promise<unknown> | void)[] = [];
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn();
  });

  it(
    'acknowledges nothing it could not write, stays up, and recovers when space is back',
    { timeout: 120_000 },
    async () => {
      const { dir, port, password, devices, proxy, received, dataDir, daemon, publishMore } =
        await shimmedWorld('diskfull', { DF_SWITCH: 'disk-is-full' }, cleanup);
      const full = join(dir, 'disk-is-full');

      // The upstream is down: the queue grows on disk.
      await publishMore(400);
      expect(devices.every((d) => d.acked.size === 400)).toBe(true);

      // The disk fills up. The daemon may still take what fits in blocks its files already have;
      // then commits fail, the devices get no PUBACK and lose their links, and they try again.
      writeFileSync(full, '');
      const ackedBefore = devices.map((d) => d.acked.size);
      for (
        let attempt = 0;
        attempt < 20 && !daemon.lines.some((l) => l.msg === 'queue_commit_failed');
        attempt++
      ) {
        await publishMore(200);
      }
      const failed = daemon.lines.find((l) => l.msg === 'queue_commit_failed');
      expect(failed, 'a commit failed on the full disk').toBeDefined();
      expect(JSON.stringify(failed)).toMatch(/SQLITE_FULL|database or disk is full/);
      const sentWhileFull = devices.reduce((n, d, i) => n + d.next - ackedBefore[i]!, 0);
      const ackedWhileFull = devices.reduce((n, d, i) => n + d.acked.size - ackedBefore[i]!, 0);
      console.log(`diskfull: while full, ${sentWhileFull} sent, ${ackedWhileFull} acknowledged`);
      expect(ackedWhileFull).toBeLessThan(sentWhileFull);
      // Still full: a device that connects again gets in, but its messages are refused again.
      const d0 = devices[0]!;
      d0.client = await connectDevice(port, d0, password);
      const stuck = d0.acked.size;
      await pump(d0, d0.next + 50, WINDOW);
      d0.client.end(true);
      expect(d0.acked.size).toBe(stuck);
      expect(daemon.proc.exitCode).toBeNull();

      // Space is back: without a restart, the same daemon takes messages again.
      rmSync(full);
      expect(existsSync(full)).toBe(false);
      const ackedAfterFull = devices.map((d) => d.acked.size);
      await publishMore(300);
      devices.forEach((d, i) => expect(d.acked.size).toBe(ackedAfterFull[i]! + 300));

      proxy.setMode('pass');
      await waitFor(allDelivered(devices, received), 60_000);
      const duplicates = checkDelivery(devices, received);
      const acked = devices.reduce((n, d) => n + d.acked.size, 0);
      console.log(
        `diskfull: ${acked} acknowledged, ${deliveredCount(received)} delivered, ${duplicates} duplicates`,
      );
      expect(duplicates).toBe(0);
      expect(await daemon.stop('SIGTERM')).toBe(0);
      expectIntactStore(dataDir);
    },
  );

  it(
    'a disk whose syncs fail (EIO) gets no PUBACK, and the daemon carries on once they work',
    { timeout: 120_000 },
    async () => {
      const { dir, port, password, devices, proxy, received, dataDir, daemon, publishMore } =
        await shimmedWorld('synceio', { DF_SYNC_EIO: 'syncs-fail' }, cleanup);
      const failing = join(dir, 'syncs-fail');
      await publishMore(200);

      writeFileSync(failing, '');
      const ackedBefore = devices.map((d) => d.acked.size);
      // Many at once (their sync is deferred to the thread pool), then one at a time (SQLite's
      // own sync inside COMMIT): neither may be acknowledged.
      await publishMore(100);
      const d0 = devices[0]!;
      d0.client = await connectDevice(port, d0, password);
      await pump(d0, d0.next + 5, 1);
      d0.client.end(true);
      const failed = daemon.lines.filter(
        (l) => l.msg === 'queue_commit_failed' || l.msg === 'queue_sync_failed',
      );
      expect(failed.length).toBeGreaterThan(0);
      devices.forEach((d, i) => expect(d.acked.size).toBe(ackedBefore[i]));
      expect(daemon.proc.exitCode).toBeNull();

      rmSync(failing);
      const ackedAfter = devices.map((d) => d.acked.size);
      await publishMore(200);
      devices.forEach((d, i) => expect(d.acked.size).toBe(ackedAfter[i]! + 200));

      proxy.setMode('pass');
      await waitFor(allDelivered(devices, received), 60_000);
      // Messages whose sync failed may still be in the WAL and go out: never a loss, and a
      // duplicate only if their device sends them again.
      const extra = devices.reduce(
        (n, d) => n + [...new Set(received.get(d.id) ?? [])].filter((s) => !d.acked.has(s)).length,
        0,
      );
      console.log(
        `synceio: ${failed.map((l) => `${String(l.msg)} (${String((l.err as { message?: string } | undefined)?.message ?? '')})`).join(', ')}; ${extra} unacknowledged messages delivered anyway`,
      );
      expect(checkDelivery(devices, received)).toBe(0);
      expect(await daemon.stop('SIGTERM')).toBe(0);
      expectIntactStore(dataDir);
      // Every queued row went out and was deleted: none stayed behind, unseen by the forwarder.
      const db = new Database(join(dataDir, 'gateway.db'), { readonly: true });
      try {
        expect((db.prepare('SELECT count(*) AS n FROM queue_messages').get() as { n: number }).n).toBe(0);
      } finally {
        db.close();
      }
    },
  );
});
