import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { startDaemon, type DaemonHandle } from '../helpers/daemon.js';
import {
  allDelivered,
  checkDelivery,
  deliveredCount,
  expectIntactStore,
  publishInPhases,
  startDurabilityWorld,
  waitFor,
} from '../helpers/sequenced-devices.js';

/**
 * R1: devices publish sequenced QoS 1 messages while the upstream is down; the daemon is killed
 * with SIGKILL mid-burst several times and restarted; then the upstream comes back. Every
 * message a device saw PUBACKed must reach the upstream (Mosquitto), in per-device order after
 * dedup; duplicates are counted and reported.
 */

const DEVICES = 4;
const PER_DEVICE = 2500;
const WINDOW = 32;
const KILLS = 4;

describe('durability: kill -9 mid-burst with the upstream down', () => {
  const cleanup: (() => Promise<unknown> | void)[] = [];
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn();
  });

  it('loses no acknowledged message and keeps per-device order', { timeout: 240_000 }, async () => {
    const { dir, port, password, devices, configFile, proxy, received } = await startDurabilityWorld(
      'kill9',
      DEVICES,
      cleanup,
    );

    let daemon: DaemonHandle = startDaemon(configFile);
    cleanup.push(() => daemon.stop('SIGKILL'));
    await daemon.ready;

    await publishInPhases(
      { port, password, devices },
      {
        perDevice: PER_DEVICE,
        window: WINDOW,
        interruptions: KILLS,
        // Kill mid-burst: once a fraction of this phase is acknowledged, without warning.
        async interrupt(phase) {
          console.log(
            `kill9: phase ${phase}, acknowledged ${devices.map((d) => d.acked.size).join('/')}, SIGKILL`,
          );
          daemon.proc.kill('SIGKILL');
          await daemon.exited;
          expectIntactStore(join(dir, 'data'));
        },
        async restart() {
          daemon = startDaemon(configFile);
          await daemon.ready;
        },
      },
    );

    const ackedTotal = devices.reduce((n, d) => n + d.acked.size, 0);
    expect(ackedTotal).toBeGreaterThan(DEVICES * PER_DEVICE * 0.5);

    // The upstream comes back. A restart connects at once (no backoff left from the outage);
    // then one more kill -9 in the middle of the drain, and a last restart finishes it.
    proxy.setMode('pass');
    await daemon.stop('SIGKILL');
    daemon = startDaemon(configFile);
    await daemon.ready;
    await waitFor(() => deliveredCount(received) >= ackedTotal * 0.3, 60_000);
    console.log(`kill9: draining, ${deliveredCount(received)} delivered, SIGKILL`);
    daemon.proc.kill('SIGKILL');
    await daemon.exited;
    expectIntactStore(join(dir, 'data'));
    daemon = startDaemon(configFile);
    await daemon.ready;
    await waitFor(allDelivered(devices, received), 120_000).catch(() => {});

    const duplicates = checkDelivery(devices, received);
    console.log(
      `kill9: ${KILLS + 2} kills, ${ackedTotal} acknowledged, ${deliveredCount(received)} delivered, ${duplicates} duplicates (bound: window 64 + ack batch 500)`,
    );
    // Only the kill during the drain can duplicate: at most the rows in flight then (window 64)
    // plus the acknowledged rows whose grouped delete had not committed yet (≤ 500 rows / 50 ms).
    expect(duplicates).toBeLessThanOrEqual(64 + 500);
    await daemon.stop('SIGTERM');
  });
});
