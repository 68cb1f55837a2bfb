import { readFileSync, writeFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { startDaemon } from '../helpers/daemon.js';
import { connectDevice, pump, startDurabilityWorld, waitFor } from '../helpers/sequenced-devices.js';

/**
 * R18: the upstream stays down until the queue reaches its cap. `drop-oldest` keeps taking
 * messages and drops exactly the oldest ones, counted in the log; the newest `maxMessages`
 * arrive in order once the upstream is back. `reject-new` takes exactly `maxMessages`, then gives
 * no PUBACK (the device keeps its copy) and stays up.
 */

const CAP = 300;

async function capWorld(
  name: string,
  onFull: 'drop-oldest' | 'reject-new',
  cleanup: (() => Promise<unknown> | void)[],
) {
  const world = await startDurabilityWorld(name, 1, cleanup);
  const yaml = readFileSync(world.configFile, 'utf8');
  writeFileSync(
    world.configFile,
    yaml.replace(
      /queue: \{ inflight: (\d+) \}/,
      `queue: { inflight: $1, maxMessages: ${CAP}, onFull: ${onFull} }`,
    ),
  );
  const daemon = startDaemon(world.configFile);
  cleanup.push(() => daemon.stop('SIGKILL'));
  await daemon.ready;
  return { ...world, daemon };
}

describe('durability: a long outage fills the queue to its cap', () => {
  const cleanup: (() => Promise<unknown> | void)[] = [];
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn();
  });

  it(
    'drop-oldest drops exactly the oldest, counts them, and delivers the newest in order',
    { timeout: 60_000 },
    async () => {
      const { port, password, devices, proxy, received, daemon } = await capWorld(
        'cap-drop',
        'drop-oldest',
        cleanup,
      );
      const d = devices[0]!;
      d.client = await connectDevice(port, d, password);
      await pump(d, 3 * CAP, 16);
      await d.client.endAsync();
      expect(d.acked.size).toBe(3 * CAP); // the cap never refuses under drop-oldest

      // Counts are logged at most once a second per queue, the rest when the window closes.
      const dropped = () =>
        daemon.lines
          .filter((l) => l.msg === 'queue_dropped')
          .reduce((n, l) => n + (typeof l.count === 'number' ? l.count : 0), 0);
      await waitFor(() => dropped() === 2 * CAP, 10_000);

      proxy.setMode('pass');
      const newest = Array.from({ length: CAP }, (_, i) => 2 * CAP + i);
      await waitFor(() => (received.get(d.id) ?? []).length >= CAP, 30_000);
      await new Promise((r) => setTimeout(r, 500)); // nothing else may follow
      expect(received.get(d.id)).toEqual(newest);
      expect(await daemon.stop('SIGTERM')).toBe(0);
    },
  );

  it(
    'reject-new takes exactly the cap, then no PUBACK, and the daemon stays up',
    { timeout: 60_000 },
    async () => {
      const { port, password, devices, proxy, received, daemon } = await capWorld(
        'cap-reject',
        'reject-new',
        cleanup,
      );
      const d = devices[0]!;
      d.client = await connectDevice(port, d, password);
      await pump(d, CAP + 50, 8);
      d.client.end(true);
      expect(d.acked.size).toBe(CAP);
      expect([...d.acked].sort((a, b) => a - b)).toEqual(Array.from({ length: CAP }, (_, i) => i));
      await waitFor(() => daemon.lines.some((l) => l.msg === 'queue_rejected'), 10_000);
      expect(daemon.proc.exitCode).toBeNull();

      proxy.setMode('pass');
      await waitFor(() => (received.get(d.id) ?? []).length >= CAP, 30_000);
      expect(received.get(d.id)).toEqual(Array.from({ length: CAP }, (_, i) => i));
      // Room again once the delivered rows are deleted (acks are grouped, up to 50 ms): the
      // device's next messages are taken.
      d.next = CAP;
      for (let attempt = 0; attempt < 50 && d.acked.size === CAP; attempt++) {
        d.client = await connectDevice(port, d, password);
        await pump(d, d.next + 1, 1);
        d.client.end(true);
        if (d.acked.size === CAP) await new Promise((r) => setTimeout(r, 100));
      }
      d.client = await connectDevice(port, d, password);
      await pump(d, d.next + 20, 8);
      d.client.end(true);
      expect(d.acked.size).toBeGreaterThanOrEqual(CAP + 20);
      expect(await daemon.stop('SIGTERM')).toBe(0);
    },
  );
});
