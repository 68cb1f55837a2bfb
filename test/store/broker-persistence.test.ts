import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/logger.js';
import {
  createBrokerPersistence,
  type BrokerPersistence,
  type BrokerPersistenceLimits,
  type PacketLike,
} from '../../src/store/broker-persistence.js';
import { openStore, type Store } from '../../src/store/database.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';

const roomy: BrokerPersistenceLimits = {
  maxQueuedMessages: 10_000,
  maxQueuedBytes: 64 * 1024 * 1024,
  maxRetainedPerDevice: 10_000,
  sessionExpiryMs: 0,
};

let dir: string;
let store: Store;
let logs: LogRecord[];
let clock: number;
const opened: BrokerPersistence[] = [];

function open(limits: Partial<BrokerPersistenceLimits> = {}): BrokerPersistence {
  const persistence = createBrokerPersistence({
    db: store.db,
    syncWal: store.syncWal,
    logger: createCaptureLogger(logs),
    limits: { ...roomy, ...limits },
    now: () => clock,
  });
  opened.push(persistence);
  void persistence.setup({ id: 'gw-test', counter: 0 });
  return persistence;
}

function reopenStore(): void {
  store.close();
  store = openStore({
    dataDir: dir,
    logger: createLogger({ level: 'silent', gatewayId: 'gw-test' }),
    onCorrupt: 'refuse',
    lock: false,
  });
}

async function all<T = PacketLike>(stream: Readable): Promise<T[]> {
  const out: T[] = [];
  for await (const item of stream) out.push(item as T);
  return out;
}

const publish = (topic: string, payload: string | Buffer, counter: number, qos = 1): PacketLike => ({
  cmd: 'publish',
  topic,
  payload: typeof payload === 'string' ? Buffer.from(payload) : payload,
  qos,
  retain: false,
  dup: false,
  brokerId: 'gw-test',
  brokerCounter: counter,
});

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'broker-persistence-'));
  store = openStore({
    dataDir: dir,
    logger: createLogger({ level: 'silent', gatewayId: 'gw-test' }),
    onCorrupt: 'refuse',
    lock: false,
  });
  logs = [];
  clock = 1_700_000_000_000;
});

afterEach(async () => {
  for (const p of opened.splice(0)) await p.destroy();
  store.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('the broker persistence across a reopen of the store', () => {
  it('keeps retained messages, sessions, queued, in-flight QoS 2 packets and wills', async () => {
    const before = open();
    await before.storeRetained({ ...publish('devices/d1/desired', '{"on":true}', 1, 0), retain: true });
    await before.addSubscriptions({ id: 'd1' }, [{ topic: 'devices/d1/commands/#', qos: 1 }]);
    await before.outgoingEnqueueCombi([{ clientId: 'd1' }], publish('devices/d1/commands/reboot', 'now', 7));
    await before.incomingStorePacket(
      { id: 'd1' },
      { ...publish('devices/d1/state', 'x', 0, 2), messageId: 9 },
    );
    await before.putWill(
      { id: 'd1' },
      { topic: 'devices/d1/state', payload: Buffer.from('gone'), qos: 1, retain: false },
    );
    await before.destroy();
    reopenStore();

    const after = open();
    const retained = await all(after.createRetainedStream('devices/+/desired'));
    expect(retained.map((p) => [p.topic, String(p.payload)])).toEqual([
      ['devices/d1/desired', '{"on":true}'],
    ]);
    expect(await after.subscriptionsByClient({ id: 'd1' })).toMatchObject([
      { topic: 'devices/d1/commands/#', qos: 1 },
    ]);
    expect(await after.subscriptionsByTopic('devices/d1/commands/reboot')).toMatchObject([
      { clientId: 'd1', topic: 'devices/d1/commands/#', qos: 1 },
    ]);
    const queued = await all(after.outgoingStream({ id: 'd1' }));
    expect(queued.map((p) => [p.topic, String(p.payload), p.brokerCounter])).toEqual([
      ['devices/d1/commands/reboot', 'now', 7],
    ]);
    expect((await after.incomingGetPacket({ id: 'd1' }, { messageId: 9 })).topic).toBe('devices/d1/state');
    expect(String((await after.getWill({ id: 'd1' }))?.payload)).toBe('gone');
  });
});

describe('bounds', () => {
  it('drops the oldest queued messages of a device past maxQueuedMessages, counts and logs them', async () => {
    const p = open({ maxQueuedMessages: 3 });
    for (let i = 1; i <= 5; i++)
      await p.outgoingEnqueue({ clientId: 'd1' }, publish('devices/d1/commands/c', `m${i}`, i));
    await p.outgoingEnqueue({ clientId: 'd2' }, publish('devices/d2/commands/c', 'other', 6));

    expect((await all(p.outgoingStream({ id: 'd1' }))).map((m) => String(m.payload))).toEqual([
      'm3',
      'm4',
      'm5',
    ]);
    expect(await all(p.outgoingStream({ id: 'd2' }))).toHaveLength(1);
    expect(p.stats.queueDropped).toBe(2);
    const dropped = logs.filter((l) => l.msg === 'broker_queue_dropped');
    expect(dropped.reduce((n, l) => n + (l.dropped as number), 0)).toBe(2);
    expect(dropped.every((l) => l.clientId === 'd1')).toBe(true);
  });

  it('drops the oldest queued messages past maxQueuedBytes, keeping the newest', async () => {
    const p = open({ maxQueuedBytes: 2500 });
    for (let i = 1; i <= 4; i++)
      await p.outgoingEnqueue({ clientId: 'd1' }, publish('devices/d1/commands/c', Buffer.alloc(1000, i), i));
    const left = await all(p.outgoingStream({ id: 'd1' }));
    expect(left.map((m) => m.brokerCounter)).toEqual([3, 4]);
    expect(p.stats.queueDropped).toBe(2);
    // A delivered message frees its room: the counters follow deletes too.
    await p.outgoingUpdate({ id: 'd1' }, { ...left[0]!, messageId: 1 });
    await p.outgoingClearMessageId({ id: 'd1' }, { messageId: 1 });
    await p.outgoingEnqueue({ clientId: 'd1' }, publish('devices/d1/commands/c', Buffer.alloc(1000, 5), 5));
    expect((await all(p.outgoingStream({ id: 'd1' }))).map((m) => m.brokerCounter)).toEqual([4, 5]);
    expect(p.stats.queueDropped).toBe(2);
  });

  it('keeps at most maxRetainedPerDevice retained messages per device, the newest', async () => {
    const p = open({ maxRetainedPerDevice: 3 });
    for (let i = 1; i <= 5; i++)
      await p.storeRetained({ ...publish(`devices/d1/r${i}`, `v${i}`, i, 0), retain: true });
    await p.storeRetained({ ...publish('devices/d2/r1', 'mine', 6, 0), retain: true });
    // Replacing a topic's message is not a new one.
    await p.storeRetained({ ...publish('devices/d1/r3', 'v3b', 7, 0), retain: true });

    const d1 = await all(p.createRetainedStream('devices/d1/#'));
    expect(d1.map((m) => [m.topic, String(m.payload)])).toEqual([
      ['devices/d1/r3', 'v3b'],
      ['devices/d1/r4', 'v4'],
      ['devices/d1/r5', 'v5'],
    ]);
    expect(await all(p.createRetainedStream('devices/d2/#'))).toHaveLength(1);
    expect(p.stats.retainedDropped).toBe(2);
    expect(logs.some((l) => l.msg === 'broker_retained_dropped' && l.owner === 'devices/d1')).toBe(true);
  });

  it('expires the sessions of devices not seen for sessionExpiry, never a connected one', async () => {
    const p = open({ sessionExpiryMs: 60_000 });
    for (const id of ['gone', 'sleepy', 'online']) {
      await p.addSubscriptions({ id }, [{ topic: `devices/${id}/commands/#`, qos: 1 }]);
      await p.outgoingEnqueue({ clientId: id }, publish(`devices/${id}/commands/c`, 'x', 1));
    }
    p.clientConnected('online');
    p.clientConnected('sleepy');
    clock += 30_000;
    p.clientDisconnected('sleepy');
    clock += 40_000;

    expect(await p.expireSessions()).toBe(1);
    expect(await p.subscriptionsByClient({ id: 'gone' })).toEqual([]);
    expect(await all(p.outgoingStream({ id: 'gone' }))).toEqual([]);
    expect(await p.subscriptionsByTopic('devices/gone/commands/c')).toEqual([]);
    for (const id of ['sleepy', 'online']) {
      expect(await p.subscriptionsByClient({ id })).toHaveLength(1);
      expect(await all(p.outgoingStream({ id }))).toHaveLength(1);
    }
    clock += 40_000;
    expect(await p.expireSessions()).toBe(1); // sleepy; online stays while connected
    expect(await p.subscriptionsByClient({ id: 'online' })).toHaveLength(1);
    expect(p.stats.sessionsExpired).toBe(2);
    expect(logs.filter((l) => l.msg === 'broker_sessions_expired')).toHaveLength(2);
  });
});

describe('the topic → subscriber lookup', () => {
  it('matches wildcards and follows subscription changes through its cache', async () => {
    const p = open();
    await p.addSubscriptions({ id: 'a' }, [
      { topic: 'devices/+/desired', qos: 1 },
      { topic: 'devices/a/#', qos: 2 },
      { topic: 'devices/a/desired/x', qos: 1 },
      { topic: 'devices/a/quiet', qos: 0 },
    ]);
    const ids = async (topic: string) =>
      (await p.subscriptionsByTopic(topic)).map((s) => `${s.clientId}:${s.topic}`).sort();
    expect(await ids('devices/a/desired')).toEqual(['a:devices/+/desired', 'a:devices/a/#']);
    expect(await ids('devices/a')).toEqual(['a:devices/a/#']);
    expect(await ids('devices/a/quiet')).toEqual(['a:devices/a/#']);
    expect(await ids('devices/b/desired')).toEqual(['a:devices/+/desired']);
    expect(p.stats.subscriptionCacheMisses).toBe(4);
    expect(await ids('devices/b/desired')).toEqual(['a:devices/+/desired']);
    expect(p.stats.subscriptionCacheHits).toBe(1);
    // No filter could match: answered without a query.
    expect(await ids('sensors/s1/telemetry')).toEqual([]);
    expect(p.stats.subscriptionFilterSkips).toBe(1);

    // Not awaited: a lookup called right after a change sees it.
    void p.addSubscriptions({ id: 'b' }, [{ topic: 'devices/b/desired', qos: 1 }]);
    expect(await ids('devices/b/desired')).toEqual(['a:devices/+/desired', 'b:devices/b/desired']);
    void p.removeSubscriptions({ id: 'a' }, ['devices/+/desired']);
    expect(await ids('devices/b/desired')).toEqual(['b:devices/b/desired']);
    // A filter downgraded to QoS 0 no longer matches offline, and one added later again does.
    await p.addSubscriptions({ id: 'b' }, [{ topic: 'devices/b/desired', qos: 0 }]);
    expect(await ids('devices/b/desired')).toEqual([]);
    await p.addSubscriptions({ id: 'c' }, [{ topic: 'sensors/+/telemetry', qos: 1 }]);
    expect(await ids('sensors/s1/telemetry')).toEqual(['c:sensors/+/telemetry']);
  });
});

it('keeps answering right across many deletes (the key filter is rebuilt from the table)', async () => {
  const p = open();
  for (let round = 0; round < 3; round++) {
    const subs = Array.from({ length: 800 }, (_, i) => ({ topic: `devices/d${i}/commands/#`, qos: 1 }));
    await p.addSubscriptions({ id: `r${round}` }, subs);
    expect((await p.subscriptionsByTopic('devices/d7/commands/x')).map((s) => s.clientId)).toEqual([
      `r${round}`,
    ]);
    await p.cleanSubscriptions({ id: `r${round}` });
    expect(await p.subscriptionsByTopic('devices/d7/commands/x')).toEqual([]);
  }
  await p.addSubscriptions({ id: 'last' }, [{ topic: 'devices/d1/commands/#', qos: 1 }]);
  expect((await p.subscriptionsByTopic('devices/d1/commands/x')).map((s) => s.clientId)).toEqual(['last']);
  expect(await p.subscriptionsByTopic('devices/d2/commands/x')).toEqual([]);
});

describe('memory', () => {
  it('stays flat while 24 MB of retained and queued messages pile up on disk', async () => {
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    const p = open();
    const heap = () => {
      gc();
      return process.memoryUsage().heapUsed;
    };
    const payload = Buffer.alloc(1024, 7);
    // Warm up the statements and the streams once before measuring.
    await p.storeRetained({ ...publish('devices/warm/r', payload, 1, 0), retain: true });
    await all(p.createRetainedStream('#'));
    const start = heap();
    for (let batch = 0; batch < 24; batch++) {
      const writes: Promise<void>[] = [];
      for (let i = 0; i < 500; i++) {
        const n = batch * 500 + i;
        writes.push(p.storeRetained({ ...publish(`devices/d${n}/desired`, payload, n, 0), retain: true }));
        writes.push(
          p.outgoingEnqueue({ clientId: `d${n % 100}` }, publish(`devices/d${n % 100}/c`, payload, n)),
        );
      }
      await Promise.all(writes);
    }
    const grown = heap() - start;
    // 24,000 messages of 1 KB (24 MB) are on disk; the in-memory default would hold all of them.
    expect(grown).toBeLessThan(4 * 1024 * 1024);
    let seen = 0;
    for await (const _ of p.createRetainedStream('devices/+/desired')) seen++;
    expect(seen).toBe(12_000);
  });
});
