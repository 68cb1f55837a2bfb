/**
 * One cloud link per active child device, for clouds where each device identity needs its own
 * connection (Azure IoT Hub: one MQTT connection per device). Generic over the link type: the
 * caller passes `open(deviceId, signal)` and `close(link)` (an MqttLink, usually).
 *
 * API
 * - `createDeviceLinkPool<L>(options)` → `DeviceLinkPool<L>`.
 * - `pool.acquire(deviceId, signal?)`: the device's open link, opened on first use; callers asking
 *   while it opens share that one attempt (never two connections for one identity). Rejects:
 *   `deviceUnavailable(deviceId, …, retryAfterMs)` (GW_ERR_PROVIDER_DEVICE_UNAVAILABLE, the
 *   open error as `cause`) when opening failed or the device is still backing off after a
 *   failure, or when the pool is full of links it may not evict; GW_ERR_ABORTED when `signal`
 *   aborted (the opening goes on for other callers); GW_ERR_PROVIDER_CLOSED after `closeAll()`.
 * - `pool.use(deviceId, fn, signal?)`: acquire, then run `fn(link)`; the link counts as busy (not
 *   idle, never evicted) until `fn` settles.
 * - `pool.lost(deviceId, link, error)`: the link dropped by itself (wire it to the link's loss
 *   report). The device backs off before its next open; a report about a link the pool no
 *   longer holds (replaced, closed) is ignored.
 * - `pool.pin(deviceId, pinned)`: the device is connected locally; its link is neither evicted
 *   nor closed when idle (the cloud delivers its commands only over an open link).
 * - `pool.reconnect(deviceId, signal?)`: a planned swap (credential renewal): the old link is
 *   closed first, then the new one opened, in sequence, because a second connection with the
 *   same identity would kick the first. Callers asking meanwhile wait for the new link.
 * - `pool.close(deviceId)`, `pool.closeAll()`, `pool.peek(deviceId)` (the open link or
 *   undefined, without opening), `pool.counts` → `{ open, opening, backingOff, pinned }`.
 * Bounds: at most `maxLinks` links open or opening; to open one more, the least recently used
 * link that is idle (not busy, not pinned) is closed. Links unused for `idleTimeoutMs` close.
 * Backoff per device uses src/common/backoff.ts; `minRetryMs` is a floor (a cloud's minimum
 * reconnect delay). A link that lived `stableAfterMs` resets its device's failure count.
 */
import { createBackoff, type Backoff } from '../common/backoff.js';
import { ErrorCodes, GatewayError, errorMessage } from '../errors.js';
import type { Logger } from '../logger.js';
import { deviceUnavailable } from './provider.js';

export interface DeviceLinkPoolOptions<L> {
  open(deviceId: string, signal: AbortSignal): Promise<L>;
  close(link: L): Promise<void> | void;
  /** Links open or opening at once. Default 100. */
  maxLinks?: number;
  /** ms without use after which an unpinned link closes. Default 5 min. */
  idleTimeoutMs?: number;
  /** Default: full jitter, 1 s base, 60 s ceiling. */
  backoff?: Backoff;
  /** No device retries sooner than this after a failure (ms). Default 0. */
  minRetryMs?: number;
  /** ms a link must live for its device's failure count to reset. Default 10 s. */
  stableAfterMs?: number;
  /** What callers are told to wait when the pool is full of busy or pinned links (ms). Default 1 s. */
  fullRetryMs?: number;
  logger?: Logger;
}

export interface DeviceLinkPoolCounts {
  open: number;
  opening: number;
  backingOff: number;
  pinned: number;
}

export interface DeviceLinkPool<L> {
  acquire(deviceId: string, signal?: AbortSignal): Promise<L>;
  use<T>(deviceId: string, fn: (link: L) => Promise<T>, signal?: AbortSignal): Promise<T>;
  lost(deviceId: string, link: L, error?: Error): void;
  pin(deviceId: string, pinned: boolean): void;
  reconnect(deviceId: string, signal?: AbortSignal): Promise<L>;
  peek(deviceId: string): L | undefined;
  close(deviceId: string): Promise<void>;
  closeAll(): Promise<void>;
  readonly counts: DeviceLinkPoolCounts;
}

interface Slot<L> {
  deviceId: string;
  link: L | undefined;
  opening: Promise<L> | undefined;
  controller: AbortController | undefined;
  busy: number;
  /** Date.now() of the last use, for the idle timeout */
  lastUsed: number;
  /** Order of the last use, for eviction: Date.now() ties within a millisecond */
  useOrder: number;
  openedAt: number;
  failures: number;
  /** Date.now() before which the device is not opened again */
  retryAt: number;
  lastError: Error | undefined;
}

export function createDeviceLinkPool<L>(options: DeviceLinkPoolOptions<L>): DeviceLinkPool<L> {
  const maxLinks = Math.max(1, options.maxLinks ?? 100);
  const idleTimeoutMs = options.idleTimeoutMs ?? 300_000;
  const backoff = options.backoff ?? createBackoff({ baseMs: 1000, maxMs: 60_000 });
  const minRetryMs = options.minRetryMs ?? 0;
  const stableAfterMs = options.stableAfterMs ?? 10_000;
  const fullRetryMs = options.fullRetryMs ?? 1000;
  const logger = options.logger;

  const slots = new Map<string, Slot<L>>();
  const pinned = new Set<string>();
  let closed = false;
  let uses = 0;

  const idleSweep = setInterval(sweepIdle, Math.max(20, Math.min(5000, Math.floor(idleTimeoutMs / 4))));
  idleSweep.unref();

  function slotOf(deviceId: string): Slot<L> {
    let slot = slots.get(deviceId);
    if (slot === undefined) {
      slot = {
        deviceId,
        link: undefined,
        opening: undefined,
        controller: undefined,
        busy: 0,
        lastUsed: Date.now(),
        useOrder: ++uses,
        openedAt: 0,
        failures: 0,
        retryAt: 0,
        lastError: undefined,
      };
      slots.set(deviceId, slot);
    }
    return slot;
  }

  function touch(slot: Slot<L>): void {
    slot.lastUsed = Date.now();
    slot.useOrder = ++uses;
  }

  /** A slot with no link, no opening and no backoff holds nothing worth keeping. */
  function forgetIfEmpty(slot: Slot<L>): void {
    if (
      slot.link === undefined &&
      slot.opening === undefined &&
      slot.failures === 0 &&
      slots.get(slot.deviceId) === slot
    ) {
      slots.delete(slot.deviceId);
    }
  }

  async function closeLink(deviceId: string, link: L, why: string): Promise<void> {
    logger?.info({ deviceId, why }, 'device_link_closed');
    try {
      await options.close(link);
    } catch (err) {
      logger?.warn({ deviceId, err: errorMessage(err) }, 'device_link_close_failed');
    }
  }

  function occupied(): number {
    let n = 0;
    for (const slot of slots.values()) if (slot.link !== undefined || slot.opening !== undefined) n++;
    return n;
  }

  /** Closes the least recently used idle link; false when every link is busy, pinned or opening. */
  function evictOne(): boolean {
    let victim: Slot<L> | undefined;
    for (const slot of slots.values()) {
      if (slot.link === undefined || slot.busy > 0 || pinned.has(slot.deviceId)) continue;
      if (victim === undefined || slot.useOrder < victim.useOrder) victim = slot;
    }
    if (victim === undefined) return false;
    release(victim, 'evicted');
    return true;
  }

  /** Takes the link out of its slot for the pool to close; a link that lived long enough clears the device's failures. */
  function release(slot: Slot<L>, why: string): void {
    const link = slot.link as L;
    slot.link = undefined;
    if (Date.now() - slot.openedAt >= stableAfterMs) slot.failures = 0;
    forgetIfEmpty(slot);
    void closeLink(slot.deviceId, link, why);
  }

  function sweepIdle(): void {
    const cutoff = Date.now() - idleTimeoutMs;
    for (const slot of [...slots.values()]) {
      if (slot.link === undefined || slot.busy > 0 || pinned.has(slot.deviceId) || slot.lastUsed > cutoff)
        continue;
      release(slot, 'idle');
    }
  }

  function noteFailure(slot: Slot<L>, err: Error): number {
    slot.failures++;
    slot.lastError = err;
    const delay = Math.max(minRetryMs, backoff.delay(slot.failures - 1));
    slot.retryAt = Date.now() + delay;
    return delay;
  }

  /** Starts an opening for `slot`, after `before` (the old link's close, for a swap). */
  function startOpening(slot: Slot<L>, before?: Promise<void>): Promise<L> {
    const controller = new AbortController();
    slot.controller = controller;
    const opening = (async () => {
      if (before) await before;
      if (controller.signal.aborted) throw closedError();
      try {
        const link = await options.open(slot.deviceId, controller.signal);
        if (controller.signal.aborted) {
          void closeLink(slot.deviceId, link, 'pool_closed');
          throw closedError();
        }
        return link;
      } catch (err) {
        if (controller.signal.aborted) throw closedError();
        const cause = err instanceof Error ? err : new Error(String(err));
        const delay = noteFailure(slot, cause);
        logger?.warn(
          { deviceId: slot.deviceId, err: cause.message, retryInMs: delay, failures: slot.failures },
          'device_link_failed',
        );
        throw deviceUnavailable(
          slot.deviceId,
          `cannot open the cloud link of device ${slot.deviceId}: ${cause.message}`,
          delay,
          cause,
        );
      }
    })();
    slot.opening = opening;
    opening.then(
      (link) => {
        if (slot.opening !== opening) return;
        slot.opening = undefined;
        slot.controller = undefined;
        slot.link = link;
        slot.openedAt = Date.now();
        touch(slot);
        slot.retryAt = 0;
      },
      () => {
        if (slot.opening !== opening) return;
        slot.opening = undefined;
        slot.controller = undefined;
        forgetIfEmpty(slot);
      },
    );
    return opening;
  }

  function waitFor(opening: Promise<L>, signal: AbortSignal | undefined): Promise<L> {
    if (signal === undefined) return opening;
    if (signal.aborted) return Promise.reject(abortedError());
    return new Promise<L>((resolve, reject) => {
      const onAbort = () => reject(abortedError());
      signal.addEventListener('abort', onAbort, { once: true });
      opening.then(
        (link) => {
          signal.removeEventListener('abort', onAbort);
          resolve(link);
        },
        (err: unknown) => {
          signal.removeEventListener('abort', onAbort);
          reject(err as Error);
        },
      );
    });
  }

  const pool: DeviceLinkPool<L> = {
    acquire(deviceId, signal) {
      if (closed) return Promise.reject(closedError());
      if (signal?.aborted) return Promise.reject(abortedError());
      const slot = slotOf(deviceId);
      touch(slot);
      if (slot.link !== undefined) return Promise.resolve(slot.link);
      if (slot.opening !== undefined) return waitFor(slot.opening, signal);
      const wait = slot.retryAt - Date.now();
      if (wait > 0) {
        return Promise.reject(
          deviceUnavailable(
            deviceId,
            `the cloud link of device ${deviceId} failed ${slot.failures} time(s) (${slot.lastError?.message ?? 'lost'}); next try in ${wait} ms`,
            wait,
            slot.lastError,
          ),
        );
      }
      if (occupied() >= maxLinks && !evictOne()) {
        forgetIfEmpty(slot);
        return Promise.reject(
          deviceUnavailable(
            deviceId,
            `all ${maxLinks} device links are busy or held for locally connected devices; raise the link limit or wait`,
            fullRetryMs,
          ),
        );
      }
      return waitFor(startOpening(slot), signal);
    },

    async use(deviceId, fn, signal) {
      const link = await pool.acquire(deviceId, signal);
      const slot = slots.get(deviceId);
      const holds = slot !== undefined && slot.link === link;
      if (holds) slot.busy++;
      try {
        return await fn(link);
      } finally {
        if (holds) {
          slot.busy--;
          touch(slot);
        }
      }
    },

    lost(deviceId, link, error) {
      const slot = slots.get(deviceId);
      if (slot === undefined || slot.link !== link) return;
      slot.link = undefined;
      const lived = Date.now() - slot.openedAt;
      // A link kicked soon after it opened keeps counting failures, so the device waits longer.
      if (lived >= stableAfterMs) slot.failures = 0;
      const delay = noteFailure(slot, error ?? new Error('the link was lost'));
      logger?.warn({ deviceId, err: error?.message, retryInMs: delay, livedMs: lived }, 'device_link_lost');
    },

    pin(deviceId, pin) {
      if (pin) pinned.add(deviceId);
      else {
        pinned.delete(deviceId);
        const slot = slots.get(deviceId);
        if (slot) touch(slot);
      }
    },

    async reconnect(deviceId, signal) {
      if (closed) throw closedError();
      // Let an opening in progress finish: it is the link being replaced.
      const inProgress = slots.get(deviceId)?.opening;
      if (inProgress !== undefined) await inProgress.catch(() => undefined);
      if (closed) throw closedError();
      const slot = slotOf(deviceId);
      if (slot.opening !== undefined) return waitFor(slot.opening, signal);
      const old = slot.link;
      slot.link = undefined;
      slot.retryAt = 0;
      const before = old === undefined ? undefined : closeLink(deviceId, old, 'planned_reconnect');
      return waitFor(startOpening(slot, before), signal);
    },

    peek(deviceId) {
      return slots.get(deviceId)?.link;
    },

    async close(deviceId) {
      const slot = slots.get(deviceId);
      if (slot === undefined) return;
      slot.controller?.abort();
      slots.delete(deviceId);
      if (slot.link !== undefined) await closeLink(deviceId, slot.link, 'closed');
    },

    async closeAll() {
      closed = true;
      clearInterval(idleSweep);
      const all = [...slots.values()];
      slots.clear();
      for (const slot of all) slot.controller?.abort();
      await Promise.all(
        all.filter((s) => s.link !== undefined).map((s) => closeLink(s.deviceId, s.link as L, 'closed')),
      );
    },

    get counts() {
      const now = Date.now();
      let open = 0;
      let opening = 0;
      let backingOff = 0;
      for (const slot of slots.values()) {
        if (slot.link !== undefined) open++;
        else if (slot.opening !== undefined) opening++;
        else if (slot.retryAt > now) backingOff++;
      }
      return { open, opening, backingOff, pinned: pinned.size };
    },
  };
  return pool;
}

function closedError(): GatewayError {
  return new GatewayError(ErrorCodes.PROVIDER_CLOSED, 'the device link pool was closed', { retryable: true });
}

function abortedError(): GatewayError {
  return new GatewayError(ErrorCodes.ABORTED, 'waiting for the device link was aborted', {
    retryable: false,
  });
}
