import { afterEach, describe, expect, it } from 'vitest';
import { createBackoff } from '../../src/common/backoff.js';
import { ErrorCodes } from '../../src/errors.js';
import {
  createDeviceLinkPool,
  type DeviceLinkPool,
  type DeviceLinkPoolOptions,
} from '../../src/providers/device-link-pool.js';
import { waitUntil } from '../helpers/raw-mqtt.js';
import { rejection } from '../helpers/rejection.js';

/** A fake link: the pool's injected dependency, a plain object that says whether it is open. */
interface FakeLink {
  n: number;
  deviceId: string;
  open: boolean;
}

/** Fake cloud connections: records every open and close in order; devices can be made to fail or hang. */
function fakeCloud() {
  let n = 0;
  const events: string[] = [];
  const failing = new Set<string>();
  const held = new Map<string, () => void>();
  const hold = new Set<string>();
  return {
    events,
    failing,
    hold,
    release(deviceId: string) {
      held.get(deviceId)?.();
    },
    open: async (deviceId: string, signal: AbortSignal): Promise<FakeLink> => {
      events.push(`open ${deviceId}`);
      if (hold.has(deviceId)) {
        await new Promise<void>((resolve, reject) => {
          held.set(deviceId, resolve);
          signal.addEventListener('abort', () => reject(new Error('aborted')), { once: true });
        });
      }
      if (failing.has(deviceId)) throw new Error(`the cloud refused ${deviceId}`);
      return { n: ++n, deviceId, open: true };
    },
    close: (link: FakeLink) => {
      events.push(`close ${link.deviceId}#${link.n}`);
      link.open = false;
    },
  };
}

let pools: DeviceLinkPool<FakeLink>[] = [];
afterEach(async () => {
  for (const p of pools) await p.closeAll();
  pools = [];
});

function makePool(
  cloud: ReturnType<typeof fakeCloud>,
  options: Partial<DeviceLinkPoolOptions<FakeLink>> = {},
): DeviceLinkPool<FakeLink> {
  const pool = createDeviceLinkPool<FakeLink>({ open: cloud.open, close: cloud.close, ...options });
  pools.push(pool);
  return pool;
}

describe('device link pool', () => {
  it('opens one link per device, shared by callers that ask while it opens', async () => {
    const cloud = fakeCloud();
    cloud.hold.add('d1');
    const pool = makePool(cloud);
    const a = pool.acquire('d1');
    const b = pool.acquire('d1');
    expect(pool.counts).toMatchObject({ open: 0, opening: 1 });
    await waitUntil(() => cloud.events.length === 1);
    cloud.release('d1');
    const [la, lb] = await Promise.all([a, b]);
    expect(la).toBe(lb);
    expect(await pool.acquire('d1')).toBe(la);
    await pool.acquire('d2');
    expect(cloud.events).toEqual(['open d1', 'open d2']);
    expect(pool.counts).toEqual({ open: 2, opening: 0, backingOff: 0, pinned: 0 });
    expect(pool.peek('d1')).toBe(la);
    expect(pool.peek('d3')).toBeUndefined();
  });

  it('stays within maxLinks by closing the least recently used idle link, never a pinned or busy one', async () => {
    const cloud = fakeCloud();
    const pool = makePool(cloud, { maxLinks: 3, fullRetryMs: 750 });
    const pinnedLink = await pool.acquire('pinned');
    pool.pin('pinned', true);
    const a = await pool.acquire('a');
    const b = await pool.acquire('b');
    await pool.acquire('a'); // b is now the least recently used
    await pool.acquire('c');
    expect(b.open).toBe(false);
    expect([pinnedLink.open, a.open]).toEqual([true, true]);
    expect(pool.counts.open).toBe(3);

    // a busy (inside use) and pinned: c is the only idle one left.
    let finish: () => void = () => {};
    let inside = false;
    const busy = pool.use('a', () => {
      inside = true;
      return new Promise<void>((resolve) => (finish = resolve));
    });
    await waitUntil(() => inside);
    await pool.acquire('d');
    expect(cloud.events.filter((e) => e.startsWith('close'))).toEqual([`close b#${b.n}`, 'close c#4']);
    // pinned, a (busy) and d, now pinned too: nothing may go, so e waits until a is done.
    pool.pin('d', true);
    const full = await rejection(pool.acquire('e'));
    expect(full.code).toBe(ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE);
    expect(full.details).toMatchObject({ deviceId: 'e', retryAfterMs: 750 });
    finish();
    await busy;
    await pool.acquire('e');
    expect(a.open).toBe(false);
    expect(pool.counts).toMatchObject({ open: 3, pinned: 2 });
  });

  it('closes links idle for idleTimeoutMs, but not the link of a device connected locally', async () => {
    const cloud = fakeCloud();
    const pool = makePool(cloud, { idleTimeoutMs: 100 });
    const local = await pool.acquire('local');
    pool.pin('local', true);
    const first = await pool.acquire('x');
    await waitUntil(() => !first.open);
    const later = await pool.acquire('y');
    await waitUntil(() => !later.open);
    expect(local.open).toBe(true);
    // Unpinned (the device left), it idles out like the others.
    pool.pin('local', false);
    await waitUntil(() => !local.open);
    expect(pool.counts.open).toBe(0);
  });

  it('backs a failing device off: deviceUnavailable with retryAfterMs and the cause, no new attempt until it elapses; others flow', async () => {
    const cloud = fakeCloud();
    cloud.failing.add('bad');
    const pool = makePool(cloud, {
      backoff: createBackoff({ baseMs: 10, maxMs: 10, random: () => 0 }),
      minRetryMs: 2000,
    });
    const first = await rejection(pool.acquire('bad'));
    expect(first.code).toBe(ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE);
    expect(first.retryable).toBe(true);
    expect(first.details).toMatchObject({ deviceId: 'bad', retryAfterMs: 2000 });
    expect((first.cause as Error).message).toBe('the cloud refused bad');
    const second = await rejection(pool.acquire('bad'));
    expect(second.code).toBe(ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE);
    expect(second.details!.retryAfterMs as number).toBeLessThanOrEqual(2000);
    expect(cloud.events.filter((e) => e === 'open bad')).toHaveLength(1);
    await pool.acquire('good');
    expect(pool.counts).toEqual({ open: 1, opening: 0, backingOff: 1, pinned: 0 });

    cloud.failing.delete('bad');
    await waitUntil(() => pool.counts.backingOff === 0, 10_000);
    const recovered = await pool.acquire('bad');
    expect(recovered.open).toBe(true);
    expect(cloud.events.filter((e) => e === 'open bad')).toHaveLength(2);
  });

  it('a lost link makes its device back off before reopening; a loss report about a replaced link is ignored', async () => {
    const cloud = fakeCloud();
    const pool = makePool(cloud, {
      backoff: createBackoff({ baseMs: 10, maxMs: 10, random: () => 0 }),
      minRetryMs: 200,
    });
    const link = await pool.acquire('d');
    pool.lost('d', link, new Error('keepalive timeout'));
    const parked = await rejection(pool.acquire('d'));
    expect(parked.code).toBe(ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE);
    expect(parked.message).toContain('keepalive timeout');
    await waitUntil(() => pool.counts.backingOff === 0);
    const fresh = await pool.acquire('d');
    pool.lost('d', link, new Error('late report of the old link'));
    expect(pool.peek('d')).toBe(fresh);
    expect(pool.counts.backingOff).toBe(0);
  });

  it('swaps a link for a planned reconnect in sequence: the old one closed before the new one opens, callers wait for the new one', async () => {
    const cloud = fakeCloud();
    const pool = makePool(cloud);
    const old = await pool.acquire('d');
    cloud.hold.add('d');
    const swapped = pool.reconnect('d');
    await waitUntil(() => cloud.events.length === 3);
    const waiting = pool.acquire('d');
    expect(pool.counts).toMatchObject({ open: 0, opening: 1 });
    cloud.release('d');
    const fresh = await swapped;
    expect(await waiting).toBe(fresh);
    expect(fresh).not.toBe(old);
    expect(old.open).toBe(false);
    expect(cloud.events).toEqual(['open d', `close d#${old.n}`, 'open d']);
  });

  it('an aborted caller stops waiting while the opening goes on for the others; closeAll ends everything', async () => {
    const cloud = fakeCloud();
    cloud.hold.add('d');
    const pool = makePool(cloud);
    const controller = new AbortController();
    const impatient = pool.acquire('d', controller.signal);
    const patient = pool.acquire('d');
    controller.abort();
    expect((await rejection(impatient)).code).toBe(ErrorCodes.ABORTED);
    await waitUntil(() => cloud.events.length === 1);
    cloud.release('d');
    const link = await patient;
    expect(link.open).toBe(true);

    cloud.hold.add('other');
    const pending = pool.acquire('other');
    await waitUntil(() => cloud.events.includes('open other'));
    await pool.closeAll();
    expect((await rejection(pending)).code).toBe(ErrorCodes.PROVIDER_CLOSED);
    expect(link.open).toBe(false);
    expect((await rejection(pool.acquire('d'))).code).toBe(ErrorCodes.PROVIDER_CLOSED);
  });
});
