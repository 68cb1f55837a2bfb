import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { startDaemon, type DaemonHandle } from '../helpers/daemon.js';
import {
  allDelivered,
  checkDelivery,
  deliveredCount,
  publishInPhases,
  startDurabilityWorld,
  waitFor,
} from '../helpers/sequenced-devices.js';

/**
 * R3: `systemctl stop` (SIGTERM) in the middle of a burst, with the upstream down. The daemon
 * must exit 0 well inside TimeoutStopSec with its WAL checkpointed, and lose nothing; a message
 * it committed must also have been acknowledged to its device before the link closed, or the
 * device, rightly, sends it again after the restart and the cloud gets it twice.
 */

const DEVICES = 4;
const PER_DEVICE = 1600;
const WINDOW = 32;
const STOPS = 3;
/** systemd/iot-gateway.service: after this, systemd sends SIGKILL. */
const TIMEOUT_STOP_MS = 30_000;

describe('durability: SIGTERM mid-burst', () => {
  const cleanup: (() => Promise<unknown> | void)[] = [];
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn();
  });

  it(
    'exits 0 with the WAL checkpointed, loses nothing, and acknowledges all it committed',
    { timeout: 180_000 },
    async () => {
      const { dir, port, password, devices, configFile, proxy, received } = await startDurabilityWorld(
        'sigterm',
        DEVICES,
        cleanup,
      );
      const wal = join(dir, 'data', 'gateway.db-wal');

      let daemon: DaemonHandle = startDaemon(configFile);
      cleanup.push(() => daemon.stop('SIGKILL'));
      await daemon.ready;

      await publishInPhases(
        { port, password, devices },
        {
          perDevice: PER_DEVICE,
          window: WINDOW,
          interruptions: STOPS,
          async interrupt(phase) {
            const started = performance.now();
            const code = await daemon.stop('SIGTERM');
            const tookMs = performance.now() - started;
            console.log(
              `sigterm: phase ${phase}, acknowledged ${devices.map((d) => d.acked.size).join('/')}, exit ${code} after ${tookMs.toFixed(0)} ms`,
            );
            expect(code).toBe(0);
            // A correctness bound, not a speed target: past it systemd would SIGKILL.
            expect(tookMs).toBeLessThan(TIMEOUT_STOP_MS);
            expect(daemon.lines.some((l) => l.msg === 'gateway_stopped' && l.failedSteps === 0)).toBe(true);
            // The last connection checkpointed the WAL into the database and removed it.
            expect(existsSync(wal) ? statSync(wal).size : 0).toBe(0);
          },
          async restart() {
            daemon = startDaemon(configFile);
            await daemon.ready;
          },
        },
      );

      const ackedTotal = devices.reduce((n, d) => n + d.acked.size, 0);
      proxy.setMode('pass');
      await waitFor(allDelivered(devices, received), 120_000).catch(() => {});
      // Let anything committed but never acknowledged arrive too, so it is counted below.
      await new Promise((r) => setTimeout(r, 1_000));

      const duplicates = checkDelivery(devices, received);
      let committedNotAcked = 0;
      for (const d of devices) {
        for (const seq of new Set(received.get(d.id) ?? [])) if (!d.acked.has(seq)) committedNotAcked++;
      }
      console.log(
        `sigterm: ${STOPS} stops, ${ackedTotal} acknowledged, ${deliveredCount(received)} delivered, ${duplicates} duplicates, ${committedNotAcked} committed without a PUBACK`,
      );
      expect(duplicates).toBe(0);
      expect(committedNotAcked).toBe(0);
      await daemon.stop('SIGTERM');
    },
  );
});
