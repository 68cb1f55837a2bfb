import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { startDaemon } from '../helpers/daemon.js';
import {
  allDelivered,
  checkDelivery,
  connectDevice,
  pump,
  startDurabilityWorld,
  waitFor,
} from '../helpers/sequenced-devices.js';

/**
 * R12: a second daemon on the same dataDir, and another process holding SQLite's write lock.
 * The second daemon must refuse to start and leave the first one alone; a lock held for less
 * than busy_timeout (5 s) only delays PUBACKs; one held longer costs the waiting publishes their
 * PUBACK (the devices keep them and send them again), never the daemon or a message.
 */

describe('durability: one daemon per dataDir, and a locked store', () => {
  const cleanup: (() => Promise<unknown> | void)[] = [];
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn();
  });

  it('refuses a second daemon, and rides out a held write lock', { timeout: 120_000 }, async () => {
    const { dir, port, password, devices, configFile, proxy, received } = await startDurabilityWorld(
      'locked',
      1,
      cleanup,
    );
    const first = startDaemon(configFile);
    cleanup.push(() => first.stop('SIGKILL'));
    await first.ready;

    const second = startDaemon(configFile);
    cleanup.push(() => second.stop('SIGKILL'));
    const code = await second.exited;
    const said = second.stderr.join('') + JSON.stringify(second.lines);
    expect(code).toBe(1);
    expect(said).toContain(`another iot-gateway (pid ${first.proc.pid}) is running`);
    expect(said).not.toMatch(/\n\s+at /); // one sentence, no stack trace

    const d = devices[0]!;
    d.client = await connectDevice(port, d, password);
    await pump(d, 20, 8);
    expect(d.acked.size).toBe(20);

    // Another process takes the write lock: for 1.5 s (under busy_timeout), the publishes wait.
    const other = new Database(join(dir, 'data', 'gateway.db'));
    cleanup.push(() => {
      other.close();
    });
    other.exec('BEGIN EXCLUSIVE');
    const waiting = pump(d, 40, 8);
    await new Promise((r) => setTimeout(r, 1_500));
    expect(d.acked.size).toBe(20);
    other.exec('COMMIT');
    await waiting;
    expect(d.acked.size).toBe(40);

    // Past busy_timeout (SQLite waits inside the commit, so the daemon's loop waits 5 s too): the
    // commit fails, the device gets no PUBACK and its link is closed so it sends again; the
    // daemon stays up and takes the messages once the lock is gone.
    other.exec('BEGIN EXCLUSIVE');
    const refused = pump(d, 48, 8);
    await first.waitForLine((l) => l.msg === 'queue_commit_failed', 15_000);
    other.exec('COMMIT');
    await refused;
    expect(d.acked.size).toBe(40);
    expect(first.proc.exitCode).toBeNull();
    d.next = 40; // the device resends what was never acknowledged
    d.client = await connectDevice(port, d, password);
    await pump(d, 60, 8);
    expect(d.acked.size).toBe(60);
    await d.client.endAsync();

    proxy.setMode('pass');
    await waitFor(allDelivered(devices, received), 30_000);
    expect(checkDelivery(devices, received)).toBe(0);
    expect(await first.stop('SIGTERM')).toBe(0);
  });
});
