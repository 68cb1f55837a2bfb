import Database from 'better-sqlite3';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ErrorCodes, GatewayError } from '../../src/errors.js';
import { createLogger } from '../../src/logger.js';
import { createActivityLog, type ActivityLog } from '../../src/store/activity-log.js';
import { openStore, type Store } from '../../src/store/database.js';
import { createOutbox, type OutboxOptions } from '../../src/store/outbox.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';
import type { EnqueueTarget, IncomingMessage, Outbox, QueueLimits } from '../../src/store/outbox-types.js';

const A = '0b7e0000-0000-4000-8000-00000000000a';
const B = '0b7e0000-0000-4000-8000-00000000000b';

const roomy: QueueLimits = {
  maxMessages: 1_000_000,
  maxBytes: 512 * 1024 * 1024,
  onFull: 'drop-oldest',
  ttlMs: 0,
};

function msg(payload: string | Buffer, overrides: Partial<IncomingMessage> = {}): IncomingMessage {
  return {
    deviceId: 'sensor-1',
    topic: 'devices/sensor-1/telemetry',
    payload: typeof payload === 'string' ? Buffer.from(payload) : payload,
    qos: 1,
    retain: false,
    ...overrides,
  };
}

function target(integrationId: string, limits: Partial<QueueLimits> = {}, qos?: 0 | 1 | 2): EnqueueTarget {
  return { integrationId, limits: { ...roomy, ...limits }, ...(qos === undefined ? {} : { qos }) };
}

/** What the table really holds, read over a second connection (so only committed rows count). */
function tableState(file: string, integrationId: string): { depth: number; bytes: number } {
  const db = new Database(file, { readonly: true });
  try {
    const row = db
      .prepare(
        'SELECT count(*) AS n, coalesce(sum(length(payload)), 0) AS b FROM queue_messages WHERE integration_id = ?',
      )
      .get(integrationId) as { n: number; b: number };
    return { depth: row.n, bytes: row.b };
  } finally {
    db.close();
  }
}

interface Harness {
  dir: string;
  store: Store;
  activity: ActivityLog;
  outbox: Outbox;
  logs: LogRecord[];
  clock: { t: number };
  reopen(options?: { maxBatch?: number }): Promise<void>;
}

let h: Harness;

async function setup(options: { maxBatch?: number; fakeClock?: boolean } = {}): Promise<Harness> {
  const dir = mkdtempSync(join(tmpdir(), 'outbox-test-'));
  const logs: LogRecord[] = [];
  const logger = createCaptureLogger(logs, { gatewayId: 'gw-test' });
  const clock = { t: 1_700_000_000_000 };
  const now = options.fakeClock ? () => clock.t : Date.now;
  const harness = { dir, logs, clock } as Harness;
  const open = (maxBatch?: number) => {
    harness.store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: true, now });
    harness.activity = createActivityLog({ db: harness.store.db, gatewayId: 'gw-test', logger, now });
    harness.outbox = createOutbox({
      db: harness.store.db,
      logger,
      activity: harness.activity,
      now,
      ...(maxBatch === undefined ? {} : { maxBatch }),
    });
  };
  open(options.maxBatch);
  harness.reopen = async (o = {}) => {
    await harness.outbox.close();
    harness.store.close();
    open(o.maxBatch);
  };
  return harness;
}

afterEach(async () => {
  if (h === undefined) return;
  await h.outbox.close();
  h.store.close();
  rmSync(h.dir, { recursive: true, force: true });
});

describe('outbox: enqueue and read', () => {
  beforeEach(async () => {
    h = await setup();
  });

  it('resolves only after the rows are committed, byte-exact, into every target queue', async () => {
    const payload = Buffer.from([0, 1, 2, 255, 0x27, 0x3b]); // NUL, quote, semicolon stay byte-exact
    const seenAtResolve: number[] = [];
    const done = h.outbox
      .enqueue(msg(payload, { qos: 2, retain: true, topic: "devices/x/telemetry/'); DROP TABLE x;--" }), [
        target(A, {}, 1),
        target(B),
      ])
      .then(() => {
        seenAtResolve.push(tableState(h.store.file, A).depth, tableState(h.store.file, B).depth);
      });
    // Staged, not yet committed: another connection sees nothing.
    expect(tableState(h.store.file, A).depth).toBe(0);
    await done;
    expect(seenAtResolve).toEqual([1, 1]);

    const [a] = h.outbox.read(A, 0, 10);
    const [b] = h.outbox.read(B, 0, 10);
    expect(a).toMatchObject({ deviceId: 'sensor-1', qos: 1, retain: true, attempts: 0 });
    expect(a!.topic).toBe("devices/x/telemetry/'); DROP TABLE x;--");
    expect(Buffer.compare(a!.payload, payload)).toBe(0);
    expect(b!.qos).toBe(2); // no per-target qos: the message's own
    expect(b!.retain).toBe(true);
    expect(a!.id).not.toBe(b!.id);
    expect(h.outbox.stats(A)).toMatchObject({ depth: 1, bytes: payload.length });
  });

  it('reads in id order after a given id, up to the limit', async () => {
    await Promise.all(Array.from({ length: 10 }, (_, i) => h.outbox.enqueue(msg(`m${i}`), [target(A)])));
    const first = h.outbox.read(A, 0, 4);
    expect(first.map((m) => m.payload.toString())).toEqual(['m0', 'm1', 'm2', 'm3']);
    const next = h.outbox.read(A, first[3]!.id, 100);
    expect(next.map((m) => m.payload.toString())).toEqual(['m4', 'm5', 'm6', 'm7', 'm8', 'm9']);
    expect(h.outbox.read(B, 0, 100)).toEqual([]);
  });

  it('groups the enqueues of one turn of the loop into one commit and tells listeners which queues grew', async () => {
    const calls: string[][] = [];
    const off = h.outbox.onEnqueue((ids) => calls.push([...ids].sort()));
    await Promise.all([
      ...Array.from({ length: 100 }, (_, i) => h.outbox.enqueue(msg(`a${i}`), [target(A)])),
      h.outbox.enqueue(msg('b'), [target(B)]),
    ]);
    expect(calls).toEqual([[A, B].sort()]);
    off();
    await h.outbox.enqueue(msg('c'), [target(A)]);
    expect(calls).toHaveLength(1);
  });

  it('commits at once when the staged batch reaches maxBatch', async () => {
    await h.reopen({ maxBatch: 10 });
    const promises = Array.from({ length: 25 }, (_, i) => h.outbox.enqueue(msg(`m${i}`), [target(A)]));
    // Two full batches were committed synchronously; the last 5 wait for the next turn.
    expect(tableState(h.store.file, A).depth).toBe(20);
    await Promise.all(promises);
    expect(tableState(h.store.file, A).depth).toBe(25);
  });

  it('resolves an enqueue with no targets without writing anything', async () => {
    await h.outbox.enqueue(msg('nowhere'), []);
    expect(tableState(h.store.file, A).depth).toBe(0);
  });

  it('reports the oldest enqueue time', async () => {
    expect(h.outbox.stats(A).oldestEnqueuedAt).toBeNull();
    const before = Date.now();
    await h.outbox.enqueue(msg('x'), [target(A)]);
    await h.outbox.enqueue(msg('y'), [target(A)]);
    const oldest = h.outbox.stats(A).oldestEnqueuedAt!;
    expect(oldest).toBeGreaterThanOrEqual(before);
    expect(oldest).toBe(h.outbox.read(A, 0, 1)[0]!.enqueuedAt);
  });
});

describe('outbox: ack, attempts, dead letters', () => {
  beforeEach(async () => {
    h = await setup();
  });

  it('ack deletes rows and keeps counters exact when ids are missing, repeated or of another queue', async () => {
    await Promise.all(['aa', 'bbbb', 'cccccc'].map((p) => h.outbox.enqueue(msg(p), [target(A), target(B)])));
    const rows = h.outbox.read(A, 0, 10);
    h.outbox.ack(A, [rows[0]!.id, rows[0]!.id, 999_999]);
    h.outbox.ack(A, [rows[0]!.id]);
    const bRow = h.outbox.read(B, 0, 1)[0]!;
    h.outbox.ack(A, [bRow.id]); // a B row acked under A: not A's, nothing happens
    expect(h.outbox.stats(A)).toMatchObject({ depth: 2, bytes: 10 });
    expect(tableState(h.store.file, A)).toEqual({ depth: 2, bytes: 10 });
    expect(h.outbox.stats(B)).toMatchObject({ depth: 3, bytes: 12 });
    h.outbox.ack(
      A,
      rows.map((r) => r.id),
    );
    expect(h.outbox.stats(A)).toMatchObject({ depth: 0, bytes: 0, oldestEnqueuedAt: null });
  });

  it('keeps counters exact when a range ack finds fewer rows than the cache held', async () => {
    await Promise.all(['a', 'bb', 'ccc', 'dddd'].map((p) => h.outbox.enqueue(msg(p), [target(A)])));
    const rows = h.outbox.read(A, 0, 10);
    // A row deleted behind the outbox's back (an operator's sqlite3 shell): the cache still has it.
    h.store.db.prepare('DELETE FROM queue_messages WHERE id = ?').run(rows[1]!.id);
    h.outbox.ack(
      A,
      rows.slice(0, 3).map((r) => r.id),
    );
    expect(h.outbox.stats(A)).toMatchObject({ depth: 1, bytes: 4 });
    expect(tableState(h.store.file, A)).toEqual({ depth: 1, bytes: 4 });
    expect(h.logs.some((l) => l.msg === 'queue_counter_drift')).toBe(true);
  });

  it('counts delivery attempts across a restart', async () => {
    await h.outbox.enqueue(msg('x'), [target(A)]);
    const [row] = h.outbox.read(A, 0, 1);
    h.outbox.markAttempt(A, [row!.id]);
    h.outbox.markAttempt(A, [row!.id]);
    h.outbox.markAttempt(B, [row!.id]); // wrong queue: no effect
    await h.reopen();
    expect(h.outbox.read(A, 0, 1)[0]!.attempts).toBe(2);
  });

  it('moves a rejected row to dead letters with its reason, counts, logs and records it', async () => {
    await Promise.all(['poison', 'next'].map((p) => h.outbox.enqueue(msg(p), [target(A)])));
    const [poison, next] = h.outbox.read(A, 0, 10);
    h.outbox.markAttempt(A, [poison!.id]);
    h.outbox.deadLetter(A, poison!, ErrorCodes.PROVIDER_TOO_LARGE, 'payload exceeds 128 KB');

    expect(h.outbox.read(A, 0, 10).map((m) => m.id)).toEqual([next!.id]);
    expect(h.outbox.stats(A)).toMatchObject({ depth: 1, bytes: 4, deadLettered: 1, deadLetters: 1 });
    const dead = h.store.db.prepare('SELECT * FROM dead_letters').all() as Record<string, unknown>[];
    expect(dead).toHaveLength(1);
    expect(dead[0]).toMatchObject({
      message_id: poison!.id,
      integration_id: A,
      topic: poison!.topic,
      attempts: 1,
      error_code: ErrorCodes.PROVIDER_TOO_LARGE,
      reason: 'payload exceeds 128 KB',
    });
    expect((dead[0]!.payload as Buffer).toString()).toBe('poison');

    const rows = h.activity.list({ activityType: 'dead_letter' });
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({
      integrationId: A,
      status: 'failed',
      errorCode: ErrorCodes.PROVIDER_TOO_LARGE,
    });
    expect(rows[0]!.metadata).toEqual({
      messageId: poison!.id,
      topic: poison!.topic,
      deviceId: 'sensor-1',
      reason: 'payload exceeds 128 KB',
    });
    expect(
      h.logs.some((l) => l.msg === 'queue_dead_lettered' && l.level === 'warn' && l.integrationId === A),
    ).toBe(true);

    // Twice, or for a row already gone: nothing moves, nothing is counted twice.
    h.outbox.deadLetter(A, poison!, ErrorCodes.PROVIDER_TOO_LARGE, 'again');
    expect(h.outbox.stats(A)).toMatchObject({ depth: 1, deadLettered: 1, deadLetters: 1 });
  });
});

describe('outbox: bounds', () => {
  beforeEach(async () => {
    h = await setup({ fakeClock: true });
  });

  it('drop-oldest keeps the newest rows within maxMessages and counts the drops', async () => {
    await Promise.all(
      Array.from({ length: 8 }, (_, i) => h.outbox.enqueue(msg(`m${i}`), [target(A, { maxMessages: 5 })])),
    );
    expect(h.outbox.read(A, 0, 100).map((m) => m.payload.toString())).toEqual(['m3', 'm4', 'm5', 'm6', 'm7']);
    expect(h.outbox.stats(A)).toMatchObject({ depth: 5, bytes: 10, dropped: 3 });
    expect(tableState(h.store.file, A)).toEqual({ depth: 5, bytes: 10 });
    const rows = h.activity.list({ activityType: 'queue_dropped' });
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ integrationId: A, direction: 'internal', status: 'failed' });
    expect(rows[0]!.metadata).toEqual({ count: 3, reason: 'max-messages' });
  });

  it('drop-oldest drops as many old rows as a big message needs under maxBytes, and no more', async () => {
    const limits = { maxBytes: 100 };
    for (let i = 0; i < 10; i++) await h.outbox.enqueue(msg(Buffer.alloc(10, i)), [target(A, limits)]);
    expect(h.outbox.stats(A)).toMatchObject({ depth: 10, bytes: 100, dropped: 0 });
    await h.outbox.enqueue(msg(Buffer.alloc(35, 99)), [target(A, limits)]);
    // 35 more bytes need 4 rows of 10 gone: 60 + 35 = 95 <= 100.
    expect(h.outbox.read(A, 0, 100).map((m) => m.payload[0])).toEqual([4, 5, 6, 7, 8, 9, 99]);
    expect(h.outbox.stats(A)).toMatchObject({ depth: 7, bytes: 95, dropped: 4 });
    expect(tableState(h.store.file, A)).toEqual({ depth: 7, bytes: 95 });
  });

  it('reject-new refuses the message for every target, so nothing is acknowledged', async () => {
    const targets = [target(A), target(B, { maxMessages: 3, onFull: 'reject-new' })];
    const results = await Promise.allSettled(
      Array.from({ length: 5 }, (_, i) => h.outbox.enqueue(msg(`m${i}`), targets)),
    );
    expect(results.map((r) => r.status)).toEqual([
      'fulfilled',
      'fulfilled',
      'fulfilled',
      'rejected',
      'rejected',
    ]);
    const err = (results[3] as PromiseRejectedResult).reason as GatewayError;
    expect(err).toBeInstanceOf(GatewayError);
    expect(err.code).toBe(ErrorCodes.QUEUE_FULL);
    expect(err.retryable).toBe(false);
    // A has room, but must not hold a message the device will send again.
    expect(h.outbox.read(A, 0, 100).map((m) => m.payload.toString())).toEqual(['m0', 'm1', 'm2']);
    expect(h.outbox.stats(B)).toMatchObject({ depth: 3, rejected: 2, dropped: 0 });
    expect(h.outbox.stats(A)).toMatchObject({ depth: 3, rejected: 0 });

    // Room made by an ack is used again.
    h.outbox.ack(B, [h.outbox.read(B, 0, 1)[0]!.id]);
    await h.outbox.enqueue(msg('again'), targets);
    expect(h.outbox.stats(B).depth).toBe(3);
  });

  it('reject-new also refuses on maxBytes', async () => {
    const targets = [target(A, { maxBytes: 10, onFull: 'reject-new' })];
    await h.outbox.enqueue(msg('123456'), targets);
    await expect(h.outbox.enqueue(msg('12345'), targets)).rejects.toMatchObject({
      code: ErrorCodes.QUEUE_FULL,
    });
    await h.outbox.enqueue(msg('1234'), targets);
    expect(h.outbox.stats(A)).toMatchObject({ depth: 2, bytes: 10, rejected: 1 });
  });

  it('refuses a single message larger than maxBytes, whatever the policy', async () => {
    const targets = [target(A), target(B, { maxBytes: 8, onFull: 'drop-oldest' })];
    await h.outbox.enqueue(msg('small'), targets);
    await expect(h.outbox.enqueue(msg('much too large'), targets)).rejects.toMatchObject({
      code: ErrorCodes.QUEUE_FULL,
      retryable: false,
    });
    expect(h.outbox.stats(B)).toMatchObject({ depth: 1, rejected: 1, dropped: 0 });
    expect(h.outbox.stats(A).depth).toBe(1);
    await h.outbox.close();
    expect(h.activity.list({ activityType: 'queue_rejected' })[0]!.metadata).toEqual({
      count: 1,
      reason: 'too-large',
    });
  });

  it('reports a flood of refusals at most once per second per queue, and the rest on close', async () => {
    const targets = [target(A, { maxMessages: 1, onFull: 'reject-new' })];
    await h.outbox.enqueue(msg('keep'), targets);
    let refused = 0;
    for (let round = 0; round < 3; round++) {
      const results = await Promise.allSettled(
        Array.from({ length: 50 }, () => h.outbox.enqueue(msg('x'), targets)),
      );
      refused += results.filter((r) => r.status === 'rejected').length;
    }
    expect(refused).toBe(150);
    // The clock stands still: the first round is reported, the next two wait.
    const rejectedLines = () => h.logs.filter((l) => l.msg === 'queue_rejected');
    expect(rejectedLines().map((l) => l.count)).toEqual([50]);
    expect(h.activity.list({ activityType: 'queue_rejected' })).toHaveLength(1);

    await h.outbox.close();
    expect(rejectedLines().map((l) => l.count)).toEqual([50, 100]);
    expect(rejectedLines()[1]).toMatchObject({ level: 'warn', integrationId: A, total: 150 });
    const rows = h.activity.list({ activityType: 'queue_rejected' });
    expect(rows.map((r) => r.metadata.count).sort()).toEqual([100, 50]);
    expect(
      rows.every((r) => r.status === 'failed' && r.direction === 'internal' && r.integrationId === A),
    ).toBe(true);
  });

  it('reports again at once when a second has passed', async () => {
    const targets = [target(A, { maxMessages: 1 })];
    await h.outbox.enqueue(msg('a'), targets);
    await h.outbox.enqueue(msg('b'), targets);
    await h.outbox.enqueue(msg('c'), targets);
    h.clock.t += 1000;
    await h.outbox.enqueue(msg('d'), targets);
    expect(h.logs.filter((l) => l.msg === 'queue_dropped').map((l) => l.count)).toEqual([1, 2]);
  });

  it('keeps counters exact under drop-oldest with concurrent enqueues and acks', async () => {
    const limitsA = { maxMessages: 300, maxBytes: 1_000_000 };
    const limitsB = { maxMessages: 1_000_000, maxBytes: 20_000 };
    let seed = 7;
    const random = () => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    let acked = 0;
    const client = async (c: number) => {
      for (let i = 0; i < 100; i++) {
        const size = 1 + Math.floor(random() * 200);
        await h.outbox.enqueue(msg(Buffer.alloc(size, c)), [target(A, limitsA), target(B, limitsB)]);
        if (i % 10 === 0) {
          // A forwarder acking rows that drop-oldest may already have removed.
          const rows = h.outbox.read(A, 0, 5);
          h.outbox.ack(
            A,
            rows.map((r) => r.id),
          );
          acked += rows.length;
        }
      }
    };
    await Promise.all(Array.from({ length: 40 }, (_, c) => client(c)));

    const a = h.outbox.stats(A);
    const b = h.outbox.stats(B);
    expect({ depth: a.depth, bytes: a.bytes }).toEqual(tableState(h.store.file, A));
    expect({ depth: b.depth, bytes: b.bytes }).toEqual(tableState(h.store.file, B));
    expect(a.depth).toBe(300);
    expect(a.depth + a.dropped + acked).toBe(4000);
    expect(b.bytes).toBeLessThanOrEqual(20_000);
    expect(b.depth + b.dropped).toBe(4000);
    expect(b.dropped).toBeGreaterThan(0);
  });
});

describe('outbox: ttl', () => {
  beforeEach(async () => {
    h = await setup({ fakeClock: true });
  });

  it('never reads expired rows; expire deletes, counts, logs and records them', async () => {
    await h.outbox.enqueue(msg('short'), [target(A, { ttlMs: 1000 })]);
    await h.outbox.enqueue(msg('forever'), [target(A, { ttlMs: 0 })]);
    h.clock.t += 500;
    await h.outbox.enqueue(msg('later'), [target(A, { ttlMs: 1000 })]);
    expect(h.outbox.read(A, 0, 10).map((m) => m.payload.toString())).toEqual(['short', 'forever', 'later']);

    h.clock.t += 500; // 'short' reached its expiry time
    expect(h.outbox.read(A, 0, 10).map((m) => m.payload.toString())).toEqual(['forever', 'later']);
    expect(h.outbox.expire()).toBe(1);
    expect(h.outbox.stats(A)).toMatchObject({ depth: 2, bytes: 12, expired: 1 });
    expect(tableState(h.store.file, A)).toEqual({ depth: 2, bytes: 12 });

    expect(h.outbox.expire(h.clock.t + 10 * 365 * 86_400_000)).toBe(1);
    expect(h.outbox.read(A, 0, 10).map((m) => m.payload.toString())).toEqual(['forever']);
    expect(h.outbox.stats(A)).toMatchObject({ depth: 1, expired: 2 });

    const rows = h.activity.list({ activityType: 'queue_expired' });
    expect(rows).toHaveLength(2);
    expect(rows[0]).toMatchObject({ integrationId: A, direction: 'internal', status: 'failed' });
    expect(rows[0]!.metadata).toEqual({ count: 1, reason: 'ttl' });
    expect(h.logs.filter((l) => l.msg === 'queue_expired')).toHaveLength(2);
    expect(h.outbox.expire()).toBe(0);
    expect(h.activity.list({ activityType: 'queue_expired' })).toHaveLength(2);
  });

  it('expires large backlogs across chunks', async () => {
    await Promise.all(
      Array.from({ length: 12_000 }, () => h.outbox.enqueue(msg('x'), [target(A, { ttlMs: 10 })])),
    );
    h.clock.t += 10;
    expect(h.outbox.expire()).toBe(12_000);
    expect(h.outbox.stats(A)).toMatchObject({ depth: 0, bytes: 0, expired: 12_000 });
    expect(h.activity.list({ activityType: 'queue_expired' })[0]!.metadata).toEqual({
      count: 12_000,
      reason: 'ttl',
    });
  });

  it('acks of a backlog older than the cache delete exactly the acked rows, not an expired row a read skipped', async () => {
    // 12,000 rows in each of two queues whose ids interleave; ten of A's, below the cache's
    // floor (it holds the newest 10,000), expire, so the reads of SQLite skip them.
    const put = (n: number, ttlMs: number) =>
      Promise.all(
        Array.from({ length: n }, (_, k) =>
          h.outbox.enqueue(msg(`m${k}`), [target(A, { ttlMs }), target(B)]),
        ),
      );
    await put(500, 0);
    await put(10, 1_000);
    await put(11_490, 0);
    h.clock.t += 1_000;
    let after = 0;
    for (let i = 0; i < 100; i++) {
      const rows = h.outbox.read(A, after, 1_000);
      if (rows.length === 0) break;
      after = rows[rows.length - 1]!.id;
      h.outbox.ack(
        A,
        rows.map((r) => r.id),
      );
    }
    expect(tableState(h.store.file, A)).toEqual({ depth: 10, bytes: 20 });
    expect(h.outbox.stats(A)).toMatchObject({ depth: 10, bytes: 20 });
    expect(h.outbox.stats(B)).toMatchObject({ depth: 12_000 });
    expect(h.logs.filter((l) => l.msg === 'queue_counter_drift')).toEqual([]);
    expect(h.outbox.expire()).toBe(10);
    expect(h.outbox.stats(A)).toMatchObject({ depth: 0, bytes: 0, expired: 10 });
  });
});

describe('outbox: wall-clock jumps (R17)', () => {
  beforeEach(async () => {
    h = await setup({ fakeClock: true });
  });

  it('moves every queued expiry by a forward jump, so the jump expires nothing', async () => {
    // Booted without a real-time clock: the queue fills while the clock says 1970.
    h.clock.t = 86_400_000;
    await h.outbox.enqueue(msg('ttl-1h'), [target(A, { ttlMs: 3_600_000 })]);
    await h.outbox.enqueue(msg('forever'), [target(A, { ttlMs: 0 })]);
    await Promise.all(
      Array.from({ length: 60_000 }, () => h.outbox.enqueue(msg('bulk'), [target(A, { ttlMs: 3_600_000 })])),
    );
    // NTP answers: the clock steps 56 years forward, ten minutes of real time later.
    const jump = Date.UTC(2026, 10, 29) - h.clock.t;
    h.clock.t += jump + 600_000;
    expect(h.outbox.shiftExpiry(jump)).toBe(60_001); // across two chunks; 'forever' has no expiry
    expect(h.outbox.expire()).toBe(0);
    expect(h.outbox.read(A, 0, 2).map((m) => m.payload.toString())).toEqual(['ttl-1h', 'forever']);
    expect(h.logs.filter((l) => l.msg === 'queue_expiry_shifted')).toHaveLength(1);

    // The ttl still counts from when they were queued: an hour later (real time) they expire.
    h.clock.t += 3_000_000;
    expect(h.outbox.expire()).toBe(60_001);
    expect(h.outbox.read(A, 0, 10).map((m) => m.payload.toString())).toEqual(['forever']);
  });

  it('control: without the shift the same jump expires the queue', async () => {
    h.clock.t = 86_400_000;
    await h.outbox.enqueue(msg('ttl-1h'), [target(A, { ttlMs: 3_600_000 })]);
    h.clock.t = Date.UTC(2026, 10, 29);
    expect(h.outbox.read(A, 0, 10)).toEqual([]);
    expect(h.outbox.expire()).toBe(1);
  });
});

describe('outbox: restart, close, disk full, volume', () => {
  beforeEach(async () => {
    h = await setup();
  });

  it('keeps rows and counters across a restart of the store', async () => {
    await Promise.all(['one', 'two', 'three'].map((p) => h.outbox.enqueue(msg(p), [target(A), target(B)])));
    h.outbox.ack(B, [h.outbox.read(B, 0, 1)[0]!.id]);
    const before = h.outbox.read(A, 0, 10);
    await h.reopen();
    expect(h.outbox.stats(A)).toMatchObject({ depth: 3, bytes: 11 });
    expect(h.outbox.stats(B)).toMatchObject({ depth: 2, bytes: 8 });
    expect(h.outbox.read(A, 0, 10)).toEqual(before);
    // New ids continue after the old ones.
    await h.outbox.enqueue(msg('four'), [target(A)]);
    expect(h.outbox.read(A, before[2]!.id, 10).map((m) => m.payload.toString())).toEqual(['four']);
  });

  it('close commits what is staged, then refuses further enqueues', async () => {
    const staged = h.outbox.enqueue(msg('last'), [target(A)]);
    await h.outbox.close();
    await staged;
    expect(tableState(h.store.file, A).depth).toBe(1);
    const err = await h.outbox.enqueue(msg('late'), [target(A)]).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GatewayError);
    expect(err).toMatchObject({
      code: ErrorCodes.STORE_WRITE,
      retryable: false,
      message: 'the store is closing',
    });
    expect(tableState(h.store.file, A).depth).toBe(1);
  });

  it('on a full disk refuses whole batches with a retryable error, half-writes nothing, and recovers', async () => {
    const db = h.store.db;
    const pageCount = db.pragma('page_count', { simple: true }) as number;
    db.pragma(`max_page_count = ${pageCount + 8}`);
    const targets = [target(A), target(B)];
    const payload = Buffer.alloc(3000, 1);
    let accepted = 0;
    let failure: unknown;
    for (let round = 0; round < 200 && failure === undefined; round++) {
      const results = await Promise.allSettled(
        Array.from({ length: 5 }, () => h.outbox.enqueue(msg(payload), targets)),
      );
      accepted += results.filter((r) => r.status === 'fulfilled').length;
      failure = results.find((r): r is PromiseRejectedResult => r.status === 'rejected')?.reason;
      // A batch is all or nothing.
      expect(new Set(results.map((r) => r.status)).size).toBe(1);
    }
    expect(failure).toBeInstanceOf(GatewayError);
    expect(failure).toMatchObject({ code: ErrorCodes.STORE_WRITE, retryable: true });
    expect(h.logs.some((l) => l.msg === 'queue_commit_failed' && l.level === 'error')).toBe(true);
    for (const id of [A, B]) {
      expect(tableState(h.store.file, id)).toEqual({ depth: accepted, bytes: accepted * 3000 });
      expect(h.outbox.stats(id)).toMatchObject({ depth: accepted, bytes: accepted * 3000 });
    }
    expect(db.pragma('integrity_check', { simple: true })).toBe('ok');

    db.pragma('max_page_count = 1073741823');
    await h.outbox.enqueue(msg(payload), targets);
    expect(h.outbox.stats(A).depth).toBe(accepted + 1);
    expect(tableState(h.store.file, B).depth).toBe(accepted + 1);
  });

  it('takes 20,000 enqueues from 50 concurrent clients', async () => {
    const seen = new Set<string>();
    const client = async (c: number) => {
      for (let i = 0; i < 400; i++) {
        await h.outbox.enqueue(msg(`${c}:${i}`, { deviceId: `dev-${c}` }), [target(A)]);
      }
    };
    await Promise.all(Array.from({ length: 50 }, (_, c) => client(c)));
    expect(tableState(h.store.file, A).depth).toBe(20_000);
    expect(h.outbox.stats(A).depth).toBe(20_000);
    let after = 0;
    for (let page = 0; page < 100; page++) {
      const rows = h.outbox.read(A, after, 1000);
      if (rows.length === 0) break;
      for (const r of rows) seen.add(r.payload.toString());
      after = rows[rows.length - 1]!.id;
    }
    expect(seen.size).toBe(20_000);
  });
});

describe('outbox: WAL sync off the event loop', () => {
  let dir: string;
  let store: Store;
  let outbox: Outbox;
  let logs: LogRecord[];
  /** Syncs the outbox asked for, held until the test releases them (to the store's real sync, or with an error). */
  let held: ((err: Error | null) => void)[];

  /** Another outbox on the same store, quiet, with its own sync settings. */
  function secondOutbox(options: Pick<OutboxOptions, 'asyncSyncBatch' | 'asyncSyncRate' | 'syncWal'>) {
    const silent = createLogger({ level: 'silent', gatewayId: 't' });
    const activity = createActivityLog({ db: store.db, gatewayId: 'gw-test', logger: silent });
    return createOutbox({ db: store.db, logger: silent, activity, ...options });
  }

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'outbox-sync-'));
    logs = [];
    const logger = createCaptureLogger(logs);
    store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: true });
    const activity = createActivityLog({ db: store.db, gatewayId: 'gw-test', logger });
    held = [];
    outbox = createOutbox({
      db: store.db,
      logger,
      activity,
      asyncSyncBatch: 4,
      asyncSyncRate: Number.POSITIVE_INFINITY,
      syncWal: (callback) => void held.push(callback),
    });
  });
  afterEach(async () => {
    // Every sync asked for, also by close() itself, goes to the real one until close() is done.
    let closed = false;
    const closing = outbox.close().then(() => void (closed = true));
    for (let i = 0; i < 1000 && !closed; i++) {
      while (held.length > 0) store.syncWal(held.shift()!);
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
    await closing;
    store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  /** Enqueues in one turn of the loop (one batch); `settled` counts resolved and rejected promises. */
  function burst(n: number, tag: string) {
    const state = { resolved: 0, rejected: [] as unknown[] };
    const all = Promise.all(
      Array.from({ length: n }, (_, i) =>
        outbox.enqueue(msg(`${tag}${i}`), [target(A)]).then(
          () => void state.resolved++,
          (err: unknown) => void state.rejected.push(err),
        ),
      ),
    );
    return { state, all };
  }
  const turn = () => new Promise((resolve) => setImmediate(resolve));
  const release = (err: Error | null = null) => {
    const callback = held.shift()!;
    if (err === null) store.syncWal(callback);
    else callback(err);
  };

  it('settles a batch under load only after a WAL sync that began after its COMMIT; later batches wait for the next', async () => {
    const first = burst(10, 'a');
    await turn();
    await turn();
    expect(tableState(store.file, A).depth).toBe(10); // committed and visible to the forwarder …
    expect(outbox.read(A, 0, 100)).toHaveLength(10);
    expect(first.state.resolved).toBe(0); // … but no PUBACK before the sync
    expect(held).toHaveLength(1);

    // Staged while the first sync runs: committed when it ends, as one batch, for the next sync.
    const second = burst(5, 'b');
    await turn();
    await turn();
    expect(tableState(store.file, A).depth).toBe(10);
    expect(held).toHaveLength(1);

    release();
    await first.all;
    expect(first.state.resolved).toBe(10);
    expect(tableState(store.file, A).depth).toBe(15);
    expect(second.state.resolved).toBe(0);
    expect(held).toHaveLength(1); // the next sync, started when the first ended

    // A small batch commits with synchronous=FULL inline: that syncs the WAL, the second batch's
    // frames included, so both settle without waiting for the second sync.
    const third = burst(1, 'c');
    const order: string[] = [];
    void second.all.then(() => order.push('second'));
    void third.all.then(() => order.push('third'));
    await third.all;
    await second.all;
    expect(third.state.resolved).toBe(1);
    expect(second.state.resolved).toBe(5);
    // PUBACKs in publish order: the earlier batch's before the later one's.
    expect(order).toEqual(['second', 'third']);
    release(Object.assign(new Error('EIO'), { code: 'EIO' })); // too late to matter
    await turn();
    expect(logs.filter((l) => l.msg === 'queue_sync_failed')).toHaveLength(0);
  });

  it('commits a small batch on a quiet store with synchronous=FULL inline, without a deferred sync', async () => {
    await outbox.enqueue(msg('quiet'), [target(A)]);
    expect(held).toHaveLength(0);
    expect(store.db.pragma('synchronous', { simple: true })).toBe(2);
  });

  it('defers the sync of small batches too while messages arrive fast', async () => {
    const fast = secondOutbox({
      asyncSyncBatch: 1000,
      asyncSyncRate: 1, // any traffic at all counts as fast once a 100 ms window has passed
      syncWal: (callback) => void held.push(callback),
    });
    const first = fast.enqueue(msg('first'), [target(B)]); // starts the rate's window
    await turn();
    while (held.length > 0) release();
    await first;
    await new Promise((resolve) => setTimeout(resolve, 150));
    let settled = false;
    const second = fast.enqueue(msg('second'), [target(B)]).then(() => void (settled = true));
    await turn();
    await turn();
    expect(held).toHaveLength(1);
    expect(settled).toBe(false);
    release();
    await second;
    await fast.close();
  });

  it('refuses the PUBACK when the sync fails: the devices keep their copies', async () => {
    const batch = burst(6, 'x');
    await turn();
    await turn();
    release(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' }));
    await batch.all;
    expect(batch.state.resolved).toBe(0);
    expect(batch.state.rejected).toHaveLength(6);
    expect(batch.state.rejected[0]).toBeInstanceOf(GatewayError);
    expect((batch.state.rejected[0] as GatewayError).code).toBe(ErrorCodes.STORE_WRITE);
    expect((batch.state.rejected[0] as GatewayError).message).toMatch(/cannot make 6 messages durable.*EIO/);
    expect(logs.filter((l) => l.msg === 'queue_sync_failed')).toHaveLength(1);
  });

  it('close() waits for the last sync', async () => {
    const batch = burst(8, 'c');
    await turn();
    await turn();
    let closed = false;
    const closing = outbox.close().then(() => void (closed = true));
    await turn();
    expect(closed).toBe(false);
    release();
    await closing;
    await batch.all;
    expect(batch.state.resolved).toBe(8);
  });

  it("the store's own sync makes concurrent enqueues durable", async () => {
    const real = secondOutbox({
      asyncSyncBatch: 2,
      syncWal: store.syncWal,
    });
    await Promise.all(Array.from({ length: 500 }, (_, i) => real.enqueue(msg(`r${i}`), [target(B)])));
    await real.close();
    expect(tableState(store.file, B).depth).toBe(500);
  });
});
