import { ErrorCodes, errorMessage, isGatewayError, toGatewayError, type GatewayError } from '../../errors.js';
import type { Logger } from '../../logger.js';
import type { OutboundMessage, Provider } from '../../providers/provider.js';
import type { ActivityLog } from '../../store/activity-log.js';
import type { Outbox } from '../../store/outbox-types.js';
import { createBackoff, type Backoff } from '../../common/backoff.js';
import type { ConnectionSupervisor } from './connection-supervisor.js';
import { createQuotaLimiter } from '../../common/quota-limiter.js';
import { createRateLimiter, type RateLimiter } from '../../common/rate-limiter.js';

export interface Forwarder {
  start(): void;
  /** Waits for in-flight publishes up to a bound; unacknowledged rows stay in the queue. */
  stop(): Promise<void>;
  readonly inflight: number;
  readonly delivered: number;
  readonly lastAckAt: number | null;
  /** Publishes the cloud refused as throttled since start (waited for, never counted). */
  readonly throttled: number;
  /** Devices whose rows wait because their cloud link failed or is throttled, until when (ms). */
  parkedDevices(): { deviceId: string; until: number }[];
  /** New rows were committed (wire to outbox.onEnqueue). */
  wake(): void;
  setLimits(queue: ForwarderLimits): void;
}

export interface ForwarderLimits {
  /** messages per second; 0 = unlimited */
  rate: number;
  /** most unacknowledged publishes at once (further capped by provider.maxInflight) */
  inflight: number;
  /** rows whose retryable failures reach this many attempts go to dead letters */
  maxAttempts: number;
}

export interface ForwarderOptions {
  outbox: Outbox;
  provider: Provider;
  supervisor: ConnectionSupervisor;
  integrationId: string;
  logger: Logger;
  activity: ActivityLog;
  queue: ForwarderLimits;
  /** ms since epoch */
  now?: () => number;
  /** Bound on waiting for in-flight publishes at stop (ms). */
  stopTimeoutMs?: number;
  /** How often the queue is looked at while connected, whatever wakes it (ms; POLL_MS). */
  pollMs?: number;
  /** Pause before resending after a publish timeout on a live link. */
  retryBackoff?: Backoff;
}

/**
 * Acked rows are deleted in groups of this many, or this long after the first: each delete is a
 * commit, and at 20,000 msg/s groups of 100 cost a sixth of the gateway's CPU (measured). A crash
 * resends at most one group (plus the in-flight window).
 */
const ACK_BATCH_ROWS = 500;
const ACK_BATCH_MS = 50;
const DELIVER_REPORT_MS = 10_000;
/** A backstop for a missed wake(): look at the queue at least this often while connected. */
const POLL_MS = 1000;
/** Rows one draw may read past without finding one to send, before yielding the event loop. */
const SCAN_BUDGET = 5000;
/** Rows drawn but waiting for their device's share of a per-device publish rate, at most. */
const MAX_DEVICE_WAITING = 1000;
/** Per-device rate buckets kept at most; idle ones are forgotten beyond this. */
const MAX_DEVICE_LIMITERS = 10_000;
/** Bounds on a provider's retryAfterMs: a missing or silly value must not stall or spin. */
const MIN_RETRY_AFTER_MS = 10;
const MAX_RETRY_AFTER_MS = 10 * 60_000;
const DEFAULT_RETRY_AFTER_MS = 1000;
/**
 * Unparks are gathered so that rewinds (each waits for the in-flight set to drain and reads the
 * queue's backlog again) come at most this often, however many devices flap.
 */
const MIN_REWIND_INTERVAL_MS = 200;

/** A device's answer to a cloud command: sent at once, not behind its telemetry backlog. */
const COMMAND_RESPONSE = /^devices\/[^/]+\/commands\/[^/]+\/response$/;

/** One reading position in the queue with a read-ahead buffer. */
interface Cursor {
  /** id of the last row read into the buffer */
  readTo: number;
  /** id of the last row taken from the buffer (sent, skipped or dead-lettered) */
  drawn: number;
  buffer: OutboundMessage[];
}

/**
 * Drains one integration's queue to its provider while the supervisor reports a connection.
 *
 * Order and duplicates: rows are published in id order on one connection (which keeps MQTT
 * order), at most `window` unacknowledged; a row is deleted only after its publish resolved.
 * A retryable failure or a lost link forgets the in-flight set and starts again from the
 * oldest row still queued, so delivery is at-least-once with at most `window` duplicates.
 *
 * Backlog and live traffic: when a link comes up with rows queued, the highest id is the
 * watermark W and the devices with queued rows form the backlog set. Two cursors then take
 * turns: the backlog cursor walks ids ≤ W in order; the live cursor walks ids > W and sends a
 * row only when its device has no unsent backlog left. A live row whose device still has
 * backlog pins that device to the backlog cursor for the rest of this connection (the backlog
 * cursor sends the pinned devices' newer rows after W in order), so every device's rows go out
 * in order and devices without backlog are not starved behind a large one.
 *
 * Poison rows: a non-retryable failure (too large, not authorised) dead-letters the row and
 * the queue moves on. A broker that drops the link on a bad publish says nothing about which
 * one it was, and may drop the PUBACKs of good rows it took in the same read. So a lost link
 * counts an attempt on a row only when it was the one row in flight. When several were, none is
 * blamed; if the link is then lost again with the same oldest row still unacknowledged, the rows
 * up to the newest in flight are sent one at a time (probing), where the bad one is caught
 * alone. An ordinary outage loses the link once and costs no probing. A row that reaches
 * maxAttempts is dead-lettered.
 *
 * Provider signals (provider.ts) are not failures and count no attempt: a link-wide throttle
 * pauses sending for retryAfterMs; a throttle or failure scoped to one device parks that device
 * (its rows are passed over, the others keep flowing) until retryAfterMs. Both end with a rewind:
 * once the rows in flight settled, reading starts again from the oldest queued row, so the
 * refused rows go out again in order (rows of the device already in flight when it failed may
 * arrive before them). Command responses of a device with a backlog are sent by the live cursor
 * at once. A planned reconnect of the provider forgets the in-flight set without blame.
 * Publish rates: the config's `rate` (a token bucket) and the provider's maxPublishRate (a hard
 * quota per connection, or per device) both apply.
 */
export function createForwarder(options: ForwarderOptions): Forwarder {
  const { outbox, provider, supervisor, integrationId, activity } = options;
  const logger = options.logger.child({ component: 'forwarder' });
  const now = options.now ?? Date.now;
  const stopTimeoutMs = options.stopTimeoutMs ?? 5000;
  const retryBackoff = options.retryBackoff ?? createBackoff({ baseMs: 1000, maxMs: 30_000 });
  let limits: ForwarderLimits = { ...options.queue };
  const limiter = createRateLimiter({ rate: limits.rate });
  /** The provider's own per-connection quota; 0 (unlimited) when it declares none. */
  const quota = createQuotaLimiter({ rate: 0 });
  /** The provider's per-device quota and the rows drawn that wait for it, per device. */
  let deviceRate = 0;
  const deviceQuotas = new Map<string, RateLimiter>();
  const waiting = new Map<string, OutboundMessage[]>();
  let waitingRows = 0;
  /** Devices parked by a device-scoped throttle or failure, until when (ms since epoch). */
  const parked = new Map<string, number>();
  /** Devices parked and not delivered since: parking them again writes no activity row. */
  const stuck = new Set<string>();
  /** No sending before this (ms since epoch): a link-wide throttle. */
  let pausedUntil = 0;
  /** Read again from the oldest queued row once the in-flight set settled. */
  let rewind = false;
  /**
   * After a rewind for a throttle or a park: one row at a time until the cloud takes one, so a
   * throttle that is still on refuses one row, not a window whose later rows it might accept.
   */
  let cautious = false;
  let unparkTimer: NodeJS.Timeout | undefined;
  /** When unparkTimer fires (ms since epoch); Infinity without one. */
  let unparkAt = Infinity;
  let lastRewindAt = -Infinity;
  let throttledCount = 0;

  let running = false;
  let stopping = false;
  /** Sending in the current connection epoch. */
  let active = false;
  /** Bumped whenever in-flight state is forgotten; late results of older epochs are ignored. */
  let epoch = 0;
  const inflight = new Map<number, OutboundMessage>();
  let delivered = 0;
  let lastAckAt: number | null = null;
  let consecutiveFailures = 0;
  /** Rows up to this id go out one at a time, after a link lost with several in flight (0: off). */
  let probeTo = 0;
  /** The oldest row in flight when the link was last lost with several in flight (0: none). */
  let suspect = 0;

  let pendingAcks: number[] = [];
  let ackTimer: NodeJS.Timeout | undefined;
  let wakeScheduled = false;
  let pumpTimer: NodeJS.Timeout | undefined;
  let retryTimer: NodeJS.Timeout | undefined;
  let pollTimer: NodeJS.Timeout | undefined;
  let reportTimer: NodeJS.Timeout | undefined;
  let unsubscribe: (() => void) | undefined;
  let drainWaiter: (() => void) | undefined;
  let pumping = false;
  let pumpAgain = false;

  /** Why the last attempt of a row failed, to name the cause when it is dead-lettered. */
  const lastFailure = new Map<number, { code: string; message: string }>();

  // Per-epoch reading state.
  let watermark = 0;
  let backlog: Cursor | undefined;
  let live: Cursor = { readTo: 0, drawn: 0, buffer: [] };
  let backlogMax = new Map<string, number>();
  let pinned = new Set<string>();
  let turn: 'backlog' | 'live' = 'backlog';

  let report = { count: 0, bytes: 0, fromId: 0, toId: 0, since: 0 };

  function beginEpoch(): void {
    if (!running || stopping || supervisor.state !== 'connected') return;
    epoch++;
    active = true;
    rewind = false;
    inflight.clear();
    clearWaiting();
    applyProviderLimits();
    backlogMax = new Map();
    pinned = new Set();
    watermark = 0;
    if (outbox.backlogByDevice) {
      try {
        for (const { deviceId, maxId } of outbox.backlogByDevice(integrationId)) {
          backlogMax.set(deviceId, maxId);
          if (maxId > watermark) watermark = maxId;
        }
      } catch (err) {
        logger.error({ err }, 'backlog_read_failed');
        backlogMax.clear();
        watermark = 0;
      }
    }
    backlog = watermark > 0 ? { readTo: 0, drawn: 0, buffer: [] } : undefined;
    live = { readTo: watermark, drawn: watermark, buffer: [] };
    turn = 'backlog';
    if (watermark > 0) logger.info({ watermark, devices: backlogMax.size }, 'backlog_drain_started');
    pump();
  }

  /** Stops sending and forgets the in-flight set; acked rows are still deleted. */
  function halt(countAttemptOnOldest: boolean): void {
    clearTimeout(pumpTimer);
    pumpTimer = undefined;
    if (!active) return;
    active = false;
    epoch++;
    if (countAttemptOnOldest && inflight.size === 1) {
      const [only] = inflight.keys();
      safely('mark_attempt_failed', () => outbox.markAttempt(integrationId, [only!]));
    } else if (countAttemptOnOldest && inflight.size > 1) {
      const oldest = Math.min(...inflight.keys());
      if (oldest === suspect) {
        probeTo = Math.max(probeTo, ...inflight.keys());
        suspect = 0;
        logger.info({ inflight: inflight.size, probeTo }, 'deliver_probing');
      } else suspect = oldest;
    }
    inflight.clear();
    clearWaiting();
    backlog = undefined;
    live = { readTo: 0, drawn: 0, buffer: [] };
    flushAcks();
    drainWaiter?.();
  }

  function clearWaiting(): void {
    waiting.clear();
    waitingRows = 0;
  }

  /** The provider's limits can change with its link (a CONNACK announces them): read at each epoch. */
  function applyProviderLimits(): void {
    const declared = provider.limits?.maxPublishRate;
    quota.setRate(declared?.scope === 'connection' ? declared.perSecond : 0);
    const perDevice = declared?.scope === 'device' ? declared.perSecond : 0;
    if (perDevice !== deviceRate) {
      deviceRate = perDevice;
      deviceQuotas.clear();
    }
  }

  function deviceQuota(deviceId: string): RateLimiter {
    let q = deviceQuotas.get(deviceId);
    if (q === undefined) {
      if (deviceQuotas.size >= MAX_DEVICE_LIMITERS) {
        for (const [id, old] of deviceQuotas)
          if (old.peek() === 0 && !waiting.has(id)) deviceQuotas.delete(id);
      }
      q = createQuotaLimiter({ rate: deviceRate });
      deviceQuotas.set(deviceId, q);
    }
    return q;
  }

  function refill(cursor: Cursor): boolean {
    const rows = outbox.read(integrationId, cursor.readTo, Math.max(limits.inflight, 50));
    if (rows.length === 0) return false;
    cursor.buffer = rows;
    cursor.readTo = rows[rows.length - 1]!.id;
    return true;
  }

  function drawBacklog(budget: { rows: number }): OutboundMessage | undefined {
    const cursor = backlog;
    if (cursor === undefined) return undefined;
    while (budget.rows > 0) {
      if (cursor.buffer.length === 0) {
        if (cursor.readTo >= watermark && pinned.size === 0) {
          // Backlog sent and no device waits on this cursor: the live cursor takes everything.
          backlog = undefined;
          logger.info({ watermark }, 'backlog_drain_sent');
          return undefined;
        }
        if (!refill(cursor)) return undefined;
      }
      const row = cursor.buffer.shift()!;
      budget.rows--;
      cursor.drawn = row.id;
      if (parked.has(row.deviceId)) continue; // sent after the device's park, by a rewind
      if (row.id <= watermark) return row;
      // A newer command response goes by the live cursor even for a pinned device (fast lane).
      if (pinned.has(row.deviceId) && !COMMAND_RESPONSE.test(row.topic)) return row;
      // A newer row of a device that is not pinned: the live cursor sends it.
    }
    return undefined;
  }

  function drawLive(budget: { rows: number }): OutboundMessage | undefined {
    while (budget.rows > 0) {
      if (live.buffer.length === 0 && !refill(live)) return undefined;
      const row = live.buffer.shift()!;
      budget.rows--;
      live.drawn = row.id;
      if (parked.has(row.deviceId)) continue;
      if (COMMAND_RESPONSE.test(row.topic)) return row;
      if (pinned.has(row.deviceId)) continue;
      const lastBacklogId = backlogMax.get(row.deviceId);
      if (backlog !== undefined && lastBacklogId !== undefined && backlog.drawn < lastBacklogId) {
        pinned.add(row.deviceId);
        continue;
      }
      return row;
    }
    return undefined;
  }

  function draw(budget: { rows: number }): OutboundMessage | undefined {
    const first = turn;
    turn = turn === 'backlog' ? 'live' : 'backlog';
    if (first === 'backlog') return drawBacklog(budget) ?? drawLive(budget);
    return drawLive(budget) ?? drawBacklog(budget);
  }

  function pump(): void {
    if (pumping) {
      pumpAgain = true;
      return;
    }
    pumping = true;
    try {
      do {
        pumpAgain = false;
        pumpOnce();
      } while (pumpAgain);
    } finally {
      pumping = false;
    }
  }

  function pumpOnce(): void {
    if (!active || stopping || pumpTimer !== undefined) return;
    const t = now();
    if (t < pausedUntil) return pumpLater(pausedUntil - t);
    if (rewind) {
      if (inflight.size > 0) return; // the last settle pumps again
      flushAcks();
      active = false;
      lastRewindAt = now();
      beginEpoch();
      cautious = true;
      return;
    }
    const window = windowSize();
    const budget = { rows: SCAN_BUDGET };
    while (active && inflight.size < window) {
      const wait = Math.max(limiter.peek(), quota.peek());
      if (wait > 0) return pumpLater(wait);
      let row = takeWaiting();
      if (row === undefined) {
        if (waitingRows >= MAX_DEVICE_WAITING) return pumpLater(nextWaitingDue());
        try {
          row = draw(budget);
        } catch (err) {
          logger.error({ err }, 'queue_read_failed');
          return;
        }
        if (row === undefined) {
          if (budget.rows <= 0) setImmediate(pump);
          else if (waitingRows > 0) pumpLater(nextWaitingDue());
          return;
        }
        if (row.attempts >= limits.maxAttempts) {
          const cause = lastFailure.get(row.id);
          deadLetter(
            row,
            cause?.code ?? ErrorCodes.PROVIDER_REJECTED,
            `gave up after ${row.attempts} delivery attempts${cause ? `: ${cause.message}` : ''}`,
          );
          continue;
        }
        if (deviceRate > 0) {
          const queued = waiting.get(row.deviceId);
          // Behind the device's waiting rows, or over its quota: wait in order, others go on.
          if (queued !== undefined || deviceQuota(row.deviceId).peek() > 0) {
            if (queued === undefined) waiting.set(row.deviceId, [row]);
            else queued.push(row);
            waitingRows++;
            continue;
          }
        }
      }
      limiter.take();
      quota.take();
      if (deviceRate > 0) deviceQuota(row.deviceId).take();
      send(row);
    }
  }

  /** Publishes in flight at most: one while probing after a loss, else the integration's window. */
  function windowSize(): number {
    return probeTo > 0 || cautious ? 1 : Math.max(1, Math.min(limits.inflight, provider.maxInflight));
  }

  function pumpLater(ms: number): void {
    pumpTimer = setTimeout(
      () => {
        pumpTimer = undefined;
        pump();
      },
      Math.max(1, ms),
    );
  }

  /** The oldest waiting row of the first device whose quota allows a publish now. */
  function takeWaiting(): OutboundMessage | undefined {
    if (waitingRows === 0) return undefined;
    for (const [deviceId, rows] of waiting) {
      if (deviceQuota(deviceId).peek() > 0) continue;
      const row = rows.shift()!;
      if (rows.length === 0) waiting.delete(deviceId);
      waitingRows--;
      return row;
    }
    return undefined;
  }

  function nextWaitingDue(): number {
    let due = Infinity;
    for (const deviceId of waiting.keys()) due = Math.min(due, deviceQuota(deviceId).peek());
    return due === Infinity ? POLL_MS : due;
  }

  function send(row: OutboundMessage): void {
    const sentIn = epoch;
    inflight.set(row.id, row);
    let publishing: Promise<void>;
    try {
      publishing = provider.publish(row);
    } catch (err) {
      publishing = Promise.reject(err);
    }
    publishing.then(
      () => onAcked(row, sentIn),
      (err: unknown) => onFailed(row, toGatewayError(err, ErrorCodes.PROVIDER_NOT_CONNECTED), sentIn),
    );
  }

  function onAcked(row: OutboundMessage, sentIn: number): void {
    // A late ack of an older epoch still means the cloud has the row: delete it.
    if (sentIn === epoch) {
      inflight.delete(row.id);
      cautious = false;
    }
    consecutiveFailures = 0;
    if (row.id >= probeTo) probeTo = 0; // past every row that was in flight at the loss
    if (row.id === suspect) suspect = 0;
    lastFailure.delete(row.id);
    if (stuck.size > 0) stuck.delete(row.deviceId);
    delivered++;
    lastAckAt = now();
    if (report.count === 0) report = { count: 0, bytes: 0, fromId: row.id, toId: row.id, since: now() };
    report.count++;
    report.bytes += row.payload.length;
    report.fromId = Math.min(report.fromId, row.id);
    report.toId = Math.max(report.toId, row.id);
    pendingAcks.push(row.id);
    if (pendingAcks.length >= ACK_BATCH_ROWS) flushAcks();
    else ackTimer ??= setTimeout(flushAcks, ACK_BATCH_MS);
    if (inflight.size === 0) drainWaiter?.();
    // A saturated window refills a quarter at a time: the PUBACKs of one read of the link free
    // a slot or two, and refilling those at once costs a write (and the cloud a read) for every
    // publish or two. Below three quarters in flight there is no one waiting to batch for.
    const window = windowSize();
    if (inflight.size <= window - Math.max(1, Math.floor(window / 4))) pump();
  }

  function onFailed(row: OutboundMessage, err: GatewayError, sentIn: number): void {
    if (sentIn !== epoch) return; // resent (or to be resent) from the queue in a later epoch
    inflight.delete(row.id);
    if (err.code === ErrorCodes.PROVIDER_THROTTLED || err.code === ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE) {
      // Not a failure: no attempt, never a dead letter. The row is sent again after a rewind.
      const retryAfterMs = retryAfter(err);
      const deviceId =
        typeof err.details?.deviceId === 'string'
          ? err.details.deviceId
          : err.code === ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE
            ? row.deviceId
            : undefined;
      if (err.code === ErrorCodes.PROVIDER_THROTTLED) throttledCount++;
      if (deviceId === undefined) pause(retryAfterMs, err, row);
      else park(deviceId, retryAfterMs, err, row);
      if (inflight.size === 0) drainWaiter?.();
      pump();
      return;
    }
    lastFailure.set(row.id, { code: err.code, message: err.message });
    if (lastFailure.size > 10_000) lastFailure.delete(lastFailure.keys().next().value!);

    if (!err.retryable) {
      safely('mark_attempt_failed', () => outbox.markAttempt(integrationId, [row.id]));
      deadLetter(row, err.code, err.message);
      if (inflight.size === 0) drainWaiter?.();
      pump();
      return;
    }
    if (
      err.code === ErrorCodes.PROVIDER_NOT_CONNECTED ||
      err.code === ErrorCodes.PROVIDER_CLOSED ||
      err.code === ErrorCodes.PROVIDER_PLANNED_RECONNECT
    ) {
      // The link is gone; the supervisor reconnects and the next epoch resends from the queue.
      // A planned replacement blames no row.
      inflight.set(row.id, row);
      halt(err.code === ErrorCodes.PROVIDER_NOT_CONNECTED);
      // Should the supervisor not notice (the provider refused, yet the link looks up), resume anyway.
      scheduleRetry(retryBackoff.delay(0));
      return;
    }
    // A timeout or a "not now" on a live link: resend from the oldest queued row after a pause.
    safely('mark_attempt_failed', () => outbox.markAttempt(integrationId, [row.id]));
    consecutiveFailures++;
    const delayMs = retryBackoff.delay(consecutiveFailures - 1);
    logger.warn(
      { code: err.code, err: err.message, messageId: row.id, attempt: row.attempts + 1, delayMs },
      'deliver_failed',
    );
    activity.record({
      integrationId,
      activityType: 'deliver',
      direction: 'outgoing',
      status: 'failed',
      errorCode: err.code,
      errorMessage: err.message,
      metadata: { messageId: row.id, attempt: row.attempts + 1, retryInMs: delayMs },
    });
    halt(false);
    scheduleRetry(delayMs);
  }

  function retryAfter(err: GatewayError): number {
    const ms = err.details?.retryAfterMs;
    if (typeof ms !== 'number' || !Number.isFinite(ms)) return DEFAULT_RETRY_AFTER_MS;
    return Math.min(MAX_RETRY_AFTER_MS, Math.max(MIN_RETRY_AFTER_MS, ms));
  }

  /** A link-wide throttle: nothing is sent until it ends, then the queue is read again. */
  function pause(retryAfterMs: number, err: GatewayError, row: OutboundMessage): void {
    const wasPaused = now() < pausedUntil;
    pausedUntil = Math.max(pausedUntil, now() + retryAfterMs);
    rewind = true;
    const fields = { code: err.code, messageId: row.id, retryAfterMs };
    if (wasPaused) logger.debug(fields, 'deliver_throttled');
    else logger.info(fields, 'deliver_throttled');
  }

  /** One device's rows wait until `retryAfterMs`; the others keep flowing. */
  function park(deviceId: string, retryAfterMs: number, err: GatewayError, row: OutboundMessage): void {
    const until = now() + retryAfterMs;
    const wasParked = parked.has(deviceId);
    parked.set(deviceId, Math.max(parked.get(deviceId) ?? 0, until));
    // Its rows already drawn and waiting for a device quota go back to the queue.
    const queued = waiting.get(deviceId);
    if (queued !== undefined) {
      waitingRows -= queued.length;
      waiting.delete(deviceId);
    }
    scheduleUnpark(parked.get(deviceId));
    if (wasParked) return;
    const fields = { deviceId, code: err.code, messageId: row.id, retryAfterMs };
    if (err.code === ErrorCodes.PROVIDER_THROTTLED || stuck.has(deviceId)) {
      logger.info(fields, 'device_parked');
      return;
    }
    // A device link that fails is worth one activity row until the device delivers again.
    stuck.add(deviceId);
    logger.warn({ ...fields, err: err.message }, 'device_parked');
    activity.record({
      integrationId,
      activityType: 'device_parked',
      direction: 'outgoing',
      status: 'error',
      errorCode: err.code,
      errorMessage: err.message,
      metadata: { deviceId, messageId: row.id, retryAfterMs },
    });
  }

  /** Arms the unpark timer for the earliest park end (`until`, or all parks when absent). */
  function scheduleUnpark(until?: number): void {
    if (!running) return;
    const first = until ?? (parked.size === 0 ? Infinity : Math.min(...parked.values()));
    if (first === Infinity || (unparkTimer !== undefined && first >= unparkAt)) return;
    clearTimeout(unparkTimer);
    unparkAt = Math.max(first, lastRewindAt + MIN_REWIND_INTERVAL_MS);
    unparkTimer = setTimeout(unpark, Math.max(1, unparkAt - now()));
    unparkTimer.unref();
  }

  function unpark(): void {
    unparkTimer = undefined;
    unparkAt = Infinity;
    const t = now();
    let freed = 0;
    for (const [deviceId, until] of parked) {
      if (until > t) continue;
      parked.delete(deviceId);
      freed++;
      logger.debug({ deviceId }, 'device_unparked');
    }
    scheduleUnpark();
    if (freed === 0) return;
    // Their rows were passed over: read the queue again from its oldest row.
    rewind = true;
    pump();
  }

  function scheduleRetry(delayMs: number): void {
    clearTimeout(retryTimer);
    retryTimer = setTimeout(() => {
      retryTimer = undefined;
      if (!active) beginEpoch();
    }, delayMs);
  }

  function deadLetter(row: OutboundMessage, code: string, reason: string): void {
    lastFailure.delete(row.id);
    // outbox.deadLetter logs the row and records its `dead_letter` activity.
    safely('dead_letter_failed', () => outbox.deadLetter(integrationId, row, code, reason));
  }

  function flushAcks(): void {
    clearTimeout(ackTimer);
    ackTimer = undefined;
    if (pendingAcks.length === 0) return;
    const ids = pendingAcks;
    pendingAcks = [];
    // If the delete fails the rows stay queued and are sent again: a duplicate, never a loss.
    safely('ack_failed', () => outbox.ack(integrationId, ids));
  }

  function flushReport(): void {
    if (report.count === 0) return;
    const { count, bytes, fromId, toId, since } = report;
    report = { count: 0, bytes: 0, fromId: 0, toId: 0, since: 0 };
    logger.info({ count, bytes, fromId, toId }, 'deliver_completed');
    activity.record({
      integrationId,
      activityType: 'deliver',
      direction: 'outgoing',
      status: 'success',
      metadata: { count, bytes, fromId, toId, periodMs: now() - since },
    });
  }

  function safely(event: string, fn: () => void): void {
    try {
      fn();
    } catch (err) {
      logger.error({ err: errorMessage(err) }, event);
    }
  }

  function onState(state: string, cause?: Error): void {
    if (state === 'connected') {
      clearTimeout(retryTimer);
      retryTimer = undefined;
      beginEpoch();
    } else {
      const planned = isGatewayError(cause) && cause.code === ErrorCodes.PROVIDER_PLANNED_RECONNECT;
      halt(!planned);
    }
  }

  return {
    get inflight() {
      return inflight.size;
    },
    get delivered() {
      return delivered;
    },
    get lastAckAt() {
      return lastAckAt;
    },
    get throttled() {
      return throttledCount;
    },
    parkedDevices() {
      return [...parked].map(([deviceId, until]) => ({ deviceId, until }));
    },
    start() {
      if (running) return;
      running = true;
      stopping = false;
      unsubscribe = supervisor.onStateChange(onState);
      pollTimer = setInterval(() => pump(), options.pollMs ?? POLL_MS);
      pollTimer.unref();
      reportTimer = setInterval(flushReport, DELIVER_REPORT_MS);
      reportTimer.unref();
      scheduleUnpark();
      if (supervisor.state === 'connected') beginEpoch();
    },
    async stop() {
      if (!running) return;
      stopping = true;
      unsubscribe?.();
      unsubscribe = undefined;
      clearInterval(pollTimer);
      clearTimeout(retryTimer);
      clearTimeout(unparkTimer);
      unparkTimer = undefined;
      unparkAt = Infinity;
      clearTimeout(pumpTimer);
      pumpTimer = undefined;
      if (inflight.size > 0 && active) {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(done, stopTimeoutMs);
          function done() {
            clearTimeout(timer);
            drainWaiter = undefined;
            resolve();
          }
          drainWaiter = () => {
            if (inflight.size === 0 || !active) done();
          };
        });
      }
      halt(false);
      flushAcks();
      clearInterval(reportTimer);
      flushReport();
      running = false;
      logger.info({ delivered }, 'forwarder_stopped');
    },
    wake() {
      // On the next turn of the loop: a commit wakes the forwarder before the devices' PUBACKs
      // are written (they wait on promise callbacks), and sending upstream first would put the
      // forwarder's work on every PUBACK's path. Wakes in between are one pump.
      if (wakeScheduled) return;
      wakeScheduled = true;
      setImmediate(() => {
        wakeScheduled = false;
        pump();
      });
    },
    setLimits(queue) {
      limits = { ...queue };
      limiter.setRate(queue.rate);
      pump();
    },
  };
}
