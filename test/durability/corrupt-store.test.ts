import { readFileSync, readdirSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { startDaemon } from '../helpers/daemon.js';
import { connectDevice, pump, startDurabilityWorld } from '../helpers/sequenced-devices.js';

/**
 * R11 at the daemon: a store file cut short (a disk that lost its tail) is never opened as a
 * silent empty queue. By default the daemon refuses to start, exit 1, one sentence naming the
 * file and both ways out, and leaves the file as it found it; with
 * `gateway.onCorruptStore: quarantine` it moves the file aside, says where, and runs on a new one.
 */

describe('durability: a corrupt store at start', () => {
  const cleanup: (() => Promise<unknown> | void)[] = [];
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn();
  });

  it('refuses it by default, and quarantines it when configured', { timeout: 60_000 }, async () => {
    const { dir, port, password, devices, configFile } = await startDurabilityWorld('corrupt', 1, cleanup);
    const dataDir = join(dir, 'data');
    const file = join(dataDir, 'gateway.db');

    let daemon = startDaemon(configFile);
    cleanup.push(() => daemon.stop('SIGKILL'));
    await daemon.ready;
    const d = devices[0]!;
    d.client = await connectDevice(port, d, password);
    await pump(d, 50, 8);
    await d.client.endAsync();
    expect(await daemon.stop('SIGTERM')).toBe(0);

    // The tail of the file is gone: the header and the first page survive.
    const size = statSync(file).size;
    expect(size).toBeGreaterThan(4096 * 3);
    truncateSync(file, 4096 + 1000);
    const damaged = readFileSync(file);

    daemon = startDaemon(configFile);
    const code = await daemon.exited;
    const said = daemon.stderr.join('') + JSON.stringify(daemon.lines);
    expect(code).toBe(1);
    expect(said).toMatch(/the store .*gateway\.db is corrupt/);
    expect(said).toMatch(/move it and its -wal\/-shm files aside .* gateway\.onCorruptStore: quarantine/);
    expect(said).not.toMatch(/\n\s+at /);
    expect(readFileSync(file).equals(damaged)).toBe(true);

    const yaml = readFileSync(configFile, 'utf8');
    writeFileSync(
      configFile,
      yaml.replace('log: { level: info }', 'log: { level: info }, onCorruptStore: quarantine'),
    );
    daemon = startDaemon(configFile);
    await daemon.ready;
    const quarantined = daemon.lines.find((l) => l.msg === 'store_quarantined');
    expect(quarantined?.quarantinedTo).toMatch(/gateway\.db\.corrupt-/);
    expect(readdirSync(dataDir).some((f) => /^gateway\.db\.corrupt-/.test(f))).toBe(true);
    expect(readFileSync(quarantined!.quarantinedTo as string).equals(damaged)).toBe(true);
    // The new store serves devices.
    d.next = 0;
    d.acked.clear();
    d.client = await connectDevice(port, d, password);
    await pump(d, 10, 4);
    expect(d.acked.size).toBe(10);
    await d.client.endAsync();
    expect(await daemon.stop('SIGTERM')).toBe(0);
  });
});
