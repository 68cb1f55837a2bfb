import Database from 'better-sqlite3';
import { Readable } from 'node:stream';
import { ErrorCodes, GatewayError, errorMessage } from '../errors.js';
import type { Logger } from '../logger.js';
import type { SqliteDatabase } from './database.js';

/**
 * The embedded broker's persistence (the interface of aedes-persistence 11, promise flavour, as
 * aedes 1 calls it) in the gateway's SQLite file: retained messages, the subscriptions of
 * clean=false sessions, QoS > 0 messages queued for their devices, inbound QoS 2 packets
 * awaiting PUBREL, and wills. Nothing is mirrored in memory but a bounded cache of topic →
 * offline subscribers.
 *
 * Every write joins a queue that runs once per turn of the event loop in one transaction, in
 * call order; a read runs at once when nothing is queued, else behind the writes before it. A
 * batch commits with synchronous=NORMAL (kill -9 cannot undo it). The writes that must also
 * survive a power cut before aedes answers (subscriptions: the SUBACK; queued and retained
 * messages) settle after a WAL sync on the thread pool (the store's syncWal), so the loop never
 * waits for the disk; the others (in-flight packet ids, QoS 2 dedup, wills, last seen) settle
 * at COMMIT. A batch is a few indexed statements per call, never a long transaction.
 */
export interface BrokerPersistence {
  /** The broker given to setup (aedes reads its id and counter). */
  readonly broker: BrokerRef | undefined;
  setup(broker: BrokerRef): Promise<void>;
  storeRetained(packet: PacketLike): Promise<void>;
  createRetainedStream(pattern: string): Readable;
  createRetainedStreamCombi(patterns: string[]): Readable;
  addSubscriptions(client: ClientRef, subs: SubscriptionLike[]): Promise<void>;
  removeSubscriptions(client: ClientRef, topics: string[]): Promise<void>;
  subscriptionsByClient(client: ClientRef): Promise<SubscriptionLike[]>;
  countOffline(): Promise<{ subsCount: number; clientsCount: number }>;
  subscriptionsByTopic(topic: string): Promise<OfflineSubscription[]>;
  /**
   * False only when no stored QoS > 0 subscription can match `topic`, so a QoS > 0 publish to it
   * would be queued for nobody offline: answered at once, without a query (the key filter);
   * true while a subscription change is queued.
   */
  mayHaveSubscribers(topic: string): boolean;
  cleanSubscriptions(client: ClientRef): Promise<void>;
  outgoingEnqueue(sub: { clientId: string }, packet: PacketLike): Promise<void>;
  outgoingEnqueueCombi(subs: { clientId: string }[], packet: PacketLike): Promise<void>;
  outgoingUpdate(client: ClientRef, packet: PacketLike): Promise<void>;
  outgoingClearMessageId(client: ClientRef, packet: PacketLike): Promise<PacketLike | undefined>;
  outgoingStream(client: ClientRef): Readable;
  incomingStorePacket(client: ClientRef, packet: PacketLike): Promise<void>;
  incomingGetPacket(client: ClientRef, packet: PacketLike): Promise<PacketLike>;
  incomingDelPacket(client: ClientRef, packet: PacketLike): Promise<void>;
  cleanIncoming(client: ClientRef): Promise<void>;
  putWill(client: ClientRef, packet: PacketLike): Promise<void>;
  getWill(client: ClientRef): Promise<PacketLike | undefined>;
  delWill(client: ClientRef): Promise<PacketLike | undefined>;
  streamWill(brokers?: Record<string, unknown>): Readable;
  getClientList(topic: string): Readable;
  /** Runs what is queued, stops housekeeping; later calls fail. The store stays open. */
  destroy(): Promise<void>;

  /** A device connected: its session is in use, never expired while it stays. */
  clientConnected(clientId: string): void;
  /** A device disconnected: its session expires `sessionExpiryMs` from now unless it returns. */
  clientDisconnected(clientId: string): void;
  /** New caps and expiry (a config reload); they apply from the next write on. */
  updateLimits(limits: BrokerPersistenceLimits): void;
  /** Deletes the state of sessions not seen for `sessionExpiryMs` (housekeeping runs it). */
  expireSessions(): Promise<number>;
  readonly stats: BrokerPersistenceStats;
}

export interface BrokerPersistenceStats {
  /** Queued messages dropped (oldest first) at a device's queue cap since start. */
  queueDropped: number;
  /** Retained messages dropped (oldest first) at a device's retained cap since start. */
  retainedDropped: number;
  /** Sessions expired by housekeeping since start. */
  sessionsExpired: number;
  /** Topic lookups answered by the subscription cache / by SQLite. */
  subscriptionCacheHits: number;
  subscriptionCacheMisses: number;
  /** Lookups the key filter answered "nobody" without a query (most device telemetry). */
  subscriptionFilterSkips: number;
}

export interface BrokerPersistenceLimits {
  /** Messages queued per client; past it the oldest is dropped. */
  maxQueuedMessages: number;
  /** Bytes (payloads) queued per client; past it the oldest are dropped. */
  maxQueuedBytes: number;
  /** Retained messages per device (topics devices/{id}/…; other topics per first level). */
  maxRetainedPerDevice: number;
  /** A session not seen (connected) for this long is deleted; 0 keeps sessions forever. */
  sessionExpiryMs: number;
}

export interface BrokerPersistenceOptions {
  db: SqliteDatabase;
  logger: Logger;
  limits: BrokerPersistenceLimits;
  /** The store's WAL sync (Store.syncWal); without it batches commit with the connection's setting. */
  syncWal?: (callback: (err: Error | null) => void) => void;
  /** How often housekeeping expires sessions (default 60 s). */
  housekeepingIntervalMs?: number;
  /** Topics whose offline subscribers are cached (default 1,000). */
  subscriptionCacheSize?: number;
  now?: () => number;
}

export interface BrokerRef {
  id: string;
  counter?: number;
}

export interface ClientRef {
  id: string;
}

export interface PacketLike {
  cmd?: string;
  topic?: string;
  payload?: Buffer | Uint8Array | string;
  qos?: number;
  retain?: boolean;
  dup?: boolean;
  messageId?: number;
  brokerId?: string | null;
  brokerCounter?: number;
  clientId?: string;
  [key: string]: unknown;
}

export interface SubscriptionLike {
  topic: string;
  qos: number;
  rh?: number;
  rap?: boolean;
  nl?: boolean;
  subscriptionIdentifier?: number;
}

export interface OfflineSubscription {
  clientId: string;
  topic: string;
  qos: number;
  rh?: number;
  rap?: boolean;
  nl?: boolean;
}

/** Rows read per page by the streams: what one of them holds in memory at most. */
const PAGE = 128;
/** Sessions expired per housekeeping transaction. */
const EXPIRE_CHUNK = 200;
/** Topics whose mayHaveSubscribers answer is remembered; the memo starts over when full. */
const SUBSCRIBER_MEMO_TOPICS = 1000;

interface QueuedCall {
  run: () => unknown;
  /** Changes subscriptions: the topic cache is invalid once it has run. */
  subscriptions: boolean;
  /** Settles only once its commit is synced to disk (else at COMMIT: safe from kill -9, not power loss). */
  durable: boolean;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
}

interface PacketRow {
  meta: string;
  payload: Buffer | null;
}

export function createBrokerPersistence(options: BrokerPersistenceOptions): BrokerPersistence {
  const { db, logger, syncWal } = options;
  let limits = { ...options.limits };
  const now = options.now ?? Date.now;
  const cacheSize = options.subscriptionCacheSize ?? 1000;
  const housekeepingMs = options.housekeepingIntervalMs ?? 60_000;

  const st = {
    totalChanges: db.prepare('SELECT total_changes()').pluck(),
    synchronousNormal: db.prepare('PRAGMA synchronous = NORMAL'),
    synchronousFull: db.prepare('PRAGMA synchronous = FULL'),

    retainedUpsert: db.prepare(
      'INSERT OR REPLACE INTO broker_retained (topic, owner, meta, payload) VALUES (?, ?, ?, ?)',
    ),
    retainedDelete: db.prepare('DELETE FROM broker_retained WHERE topic = ?'),
    retainedCountOwner: db.prepare('SELECT count(*) FROM broker_retained WHERE owner = ?').pluck(),
    retainedDropOldest: db.prepare(
      'DELETE FROM broker_retained WHERE rowid IN (SELECT rowid FROM broker_retained WHERE owner = ? ORDER BY rowid LIMIT ?)',
    ),
    retainedExact: db.prepare('SELECT topic, meta, payload FROM broker_retained WHERE topic = ?'),
    retainedRange: db.prepare(
      'SELECT topic, meta, payload FROM broker_retained WHERE topic >= ? AND topic < ? ORDER BY topic LIMIT ?',
    ),
    retainedAll: db.prepare(
      'SELECT topic, meta, payload FROM broker_retained WHERE topic >= ? ORDER BY topic LIMIT ?',
    ),

    sessionEnsure: db.prepare(
      'INSERT INTO broker_sessions (client_id, last_seen) VALUES (?, ?) ON CONFLICT (client_id) DO NOTHING',
    ),
    // Only a session with state stored has a row: a clean=true client's connect writes nothing.
    sessionTouch: db.prepare('UPDATE broker_sessions SET last_seen = ? WHERE client_id = ?'),
    sessionQueued: db.prepare(
      'SELECT queued_rows AS rows, queued_bytes AS bytes FROM broker_sessions WHERE client_id = ?',
    ),
    sessionAddQueued: db.prepare(
      'UPDATE broker_sessions SET queued_rows = queued_rows + ?, queued_bytes = queued_bytes + ?, dropped = dropped + ? WHERE client_id = ?',
    ),
    sessionsExpired: db.prepare(
      'SELECT client_id FROM broker_sessions WHERE last_seen < ? ORDER BY last_seen LIMIT ?',
    ),
    sessionDelete: db.prepare('DELETE FROM broker_sessions WHERE client_id = ?'),

    subUpsert: db.prepare(
      `INSERT INTO broker_subscriptions (client_id, topic, qos, rh, rap, nl, sub_id, match_key)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT (client_id, topic) DO UPDATE SET qos = excluded.qos, rh = excluded.rh,
         rap = excluded.rap, nl = excluded.nl, sub_id = excluded.sub_id`,
    ),
    subDelete: db.prepare('DELETE FROM broker_subscriptions WHERE client_id = ? AND topic = ?'),
    subDeleteClient: db.prepare('DELETE FROM broker_subscriptions WHERE client_id = ?'),
    subsOfClient: db.prepare(
      'SELECT topic, qos, rh, rap, nl, sub_id FROM broker_subscriptions WHERE client_id = ? ORDER BY rowid',
    ),
    subsByKeys: db.prepare(
      `SELECT rowid, client_id, topic, qos, rh, rap, nl, match_key FROM broker_subscriptions
       WHERE qos > 0 AND match_key IN (SELECT value FROM json_each(?))`,
    ),
    subsByKey: db.prepare(
      `SELECT rowid, client_id, topic, qos, rh, rap, nl, match_key FROM broker_subscriptions
       WHERE qos > 0 AND match_key = ?`,
    ),
    subsCount: db.prepare(
      `SELECT (SELECT count(*) FROM broker_subscriptions WHERE qos > 0) AS subs,
              (SELECT count(DISTINCT client_id) FROM broker_subscriptions) AS clients`,
    ),
    subKeys: db.prepare('SELECT DISTINCT match_key FROM broker_subscriptions WHERE qos > 0').pluck(),
    clientsOfTopic: db.prepare(
      'SELECT rowid, client_id FROM broker_subscriptions WHERE topic = ? AND rowid > ? ORDER BY rowid LIMIT ?',
    ),

    outInsert: db.prepare(
      'INSERT INTO broker_outgoing (client_id, broker_id, broker_counter, message_id, bytes, meta, payload) VALUES (?, ?, ?, ?, ?, ?, ?)',
    ),
    outOldest: db.prepare('SELECT seq, bytes FROM broker_outgoing WHERE client_id = ? ORDER BY seq LIMIT ?'),
    outByCounter: db.prepare(
      'SELECT seq, meta, payload FROM broker_outgoing WHERE client_id = ? AND broker_counter = ? AND broker_id IS ? ORDER BY seq LIMIT 1',
    ),
    outByMessageIdOtherBroker: db.prepare(
      'SELECT seq, bytes FROM broker_outgoing WHERE client_id = ? AND message_id = ? AND broker_id IS NOT ? ORDER BY seq LIMIT 1',
    ),
    outByMessageId: db.prepare(
      'SELECT seq, bytes, meta, payload FROM broker_outgoing WHERE client_id = ? AND message_id = ? ORDER BY seq LIMIT 1',
    ),
    outSetMessageId: db.prepare('UPDATE broker_outgoing SET message_id = ?, meta = ? WHERE seq = ?'),
    outReplace: db.prepare(
      'UPDATE broker_outgoing SET broker_id = ?, broker_counter = ?, message_id = ?, bytes = ?, meta = ?, payload = ? WHERE seq = ?',
    ),
    outDelete: db.prepare('DELETE FROM broker_outgoing WHERE seq = ?'),
    outDeleteClient: db.prepare('DELETE FROM broker_outgoing WHERE client_id = ?'),
    outMaxSeq: db.prepare('SELECT max(seq) FROM broker_outgoing WHERE client_id = ?').pluck(),
    outPage: db.prepare(
      'SELECT seq, meta, payload FROM broker_outgoing WHERE client_id = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?',
    ),

    inUpsert: db.prepare(
      'INSERT OR REPLACE INTO broker_incoming (client_id, message_id, meta, payload) VALUES (?, ?, ?, ?)',
    ),
    inGet: db.prepare('SELECT meta, payload FROM broker_incoming WHERE client_id = ? AND message_id = ?'),
    inDelete: db.prepare('DELETE FROM broker_incoming WHERE client_id = ? AND message_id = ?'),
    inDeleteClient: db.prepare('DELETE FROM broker_incoming WHERE client_id = ?'),

    willUpsert: db.prepare(
      'INSERT OR REPLACE INTO broker_wills (client_id, broker_id, meta, payload) VALUES (?, ?, ?, ?)',
    ),
    willGet: db.prepare('SELECT meta, payload FROM broker_wills WHERE client_id = ?'),
    willDelete: db.prepare('DELETE FROM broker_wills WHERE client_id = ?'),
    willPage: db.prepare(
      'SELECT client_id, broker_id, meta, payload FROM broker_wills WHERE client_id > ? ORDER BY client_id LIMIT ?',
    ),
  };

  const stats: BrokerPersistenceStats = {
    queueDropped: 0,
    retainedDropped: 0,
    sessionsExpired: 0,
    subscriptionCacheHits: 0,
    subscriptionCacheMisses: 0,
    subscriptionFilterSkips: 0,
  };

  let broker: BrokerRef | undefined;
  let destroyed = false;
  let housekeeping: NodeJS.Timeout | undefined;
  /** Connections per client id (a takeover overlaps two). */
  const connected = new Map<string, number>();

  // --- the per-turn batch ---------------------------------------------------------------------
  let queue: QueuedCall[] = [];
  let scheduled = false;
  /** Calls queued that change subscriptions: while any is, the topic cache may be stale. */
  let pendingSubscriptionChanges = 0;
  /** Drops made by the running batch, logged once it committed. */
  const queueDrops = new Map<string, number>();
  const retainedDrops = new Map<string, number>();

  const call = <T>(run: () => T, kind: { subscriptions?: boolean; durable?: boolean } = {}): Promise<T> => {
    if (destroyed) return Promise.reject(destroyedError());
    const subscriptions = kind.subscriptions ?? false;
    const durable = kind.durable ?? subscriptions;
    return new Promise<T>((resolve, reject) => {
      queue.push({ run, subscriptions, durable, resolve: resolve as (v: unknown) => void, reject });
      if (subscriptions) pendingSubscriptionChanges++;
      if (!scheduled) {
        scheduled = true;
        setImmediate(flush);
      }
    });
  };

  /**
   * A call that only reads: at once when nothing is queued before it (it could not see anything
   * newer by waiting), else in the queue behind the writes it must see.
   */
  const read = <T>(run: () => T): Promise<T> => {
    if (destroyed || queue.length > 0) return call(run);
    try {
      return Promise.resolve(run());
    } catch (err) {
      if (!(err instanceof Database.SqliteError)) return Promise.reject(err as Error);
      logger.error({ err }, 'broker_persistence_read_failed');
      return Promise.reject(
        new GatewayError(
          ErrorCodes.STORE_WRITE,
          `cannot read the broker's state from the store: ${errorMessage(err)}; check the disk of gateway.dataDir`,
          { cause: err, retryable: true },
        ),
      );
    }
  };

  function flush(): void {
    scheduled = false;
    const batch = queue;
    queue = [];
    if (batch.length === 0) return;
    const results: unknown[] = new Array(batch.length);
    const failures: (Error | undefined)[] = new Array(batch.length);
    let changed = false;
    try {
      const before = st.totalChanges.get() as number;
      if (syncWal) st.synchronousNormal.run();
      try {
        db.transaction(() => {
          for (let i = 0; i < batch.length; i++) {
            const item = batch[i]!;
            try {
              results[i] = item.run();
            } catch (err) {
              // A failed statement fails the batch; a call's own refusal (no such packet) is
              // raised before it writes anything and fails that call only.
              if (err instanceof Database.SqliteError) throw err;
              failures[i] = err as Error;
            }
            if (item.subscriptions) subscriptionCache.clear();
          }
        })();
      } finally {
        if (syncWal) st.synchronousFull.run();
      }
      changed = (st.totalChanges.get() as number) !== before;
    } catch (err) {
      subscriptionCache.clear();
      queueDrops.clear();
      retainedDrops.clear();
      const failure = new GatewayError(
        ErrorCodes.STORE_WRITE,
        `cannot write the broker's state to the store: ${errorMessage(err)}; check the disk of gateway.dataDir`,
        { cause: err, retryable: true },
      );
      logger.error({ err, calls: batch.length }, 'broker_persistence_write_failed');
      for (const item of batch) settle(item, failure);
      return;
    }
    logDrops();
    if (filterDeletes > Math.max(1000, filterKeys)) rebuildKeyFilter();
    const settleAll = (syncError: Error | null, durable: boolean) => {
      for (let i = 0; i < batch.length; i++) {
        const item = batch[i]!;
        if (item.durable !== durable) continue;
        const failure = failures[i] ?? syncError ?? undefined;
        if (failure) settle(item, failure);
        else {
          if (item.subscriptions) pendingSubscriptionChanges--;
          item.resolve(results[i]);
        }
      }
    };
    // What kill -9 cannot take any more settles now; what must survive a power cut (a SUBACK's
    // subscription, a queued message, a retained one) after the WAL sync.
    settleAll(null, false);
    if (!changed || !syncWal) {
      settleAll(null, true);
      return;
    }
    afterSync((err) =>
      settleAll(
        err
          ? new GatewayError(
              ErrorCodes.STORE_WRITE,
              `cannot sync the broker's state to disk: ${errorMessage(err)}; check the disk of gateway.dataDir`,
              { cause: err, retryable: true },
            )
          : null,
        true,
      ),
    );
  }

  function settle(item: QueuedCall, err: Error): void {
    if (item.subscriptions) pendingSubscriptionChanges--;
    item.reject(err);
  }

  // One sync at a time; a batch committed while one runs waits for the next, which began after it.
  let syncing = false;
  let syncWaiters: ((err: Error | null) => void)[] = [];
  function afterSync(waiter: (err: Error | null) => void): void {
    syncWaiters.push(waiter);
    if (!syncing) startSync();
  }
  function startSync(): void {
    syncing = true;
    const waiters = syncWaiters;
    syncWaiters = [];
    syncWal!((err) => {
      syncing = false;
      for (const w of waiters) w(err);
      if (syncWaiters.length > 0) startSync();
    });
  }

  /** After COMMIT: the drops of the batch are counted and logged (a rolled-back one made none). */
  function logDrops(): void {
    for (const dropped of queueDrops.values()) stats.queueDropped += dropped;
    for (const dropped of retainedDrops.values()) stats.retainedDropped += dropped;
    for (const [clientId, dropped] of queueDrops)
      logger.warn({ clientId, dropped, maxQueuedMessages: limits.maxQueuedMessages }, 'broker_queue_dropped');
    for (const [owner, dropped] of retainedDrops)
      logger.warn(
        { owner, dropped, maxRetainedPerDevice: limits.maxRetainedPerDevice },
        'broker_retained_dropped',
      );
    queueDrops.clear();
    retainedDrops.clear();
  }

  // --- subscription key filter ------------------------------------------------------------------
  /**
   * A Bloom filter of the match keys of QoS > 0 subscriptions (fixed 128 KiB): a topic none of
   * whose keys is in it has no offline subscriber, answered without a query. Keys are added as
   * subscriptions are; deleted ones stay until a rebuild from the table, once as many rows were
   * deleted as there were keys (until then they only cost a query that finds nothing).
   */
  const keyFilter = createKeyFilter();
  let filterKeys = 0;
  let filterDeletes = 0;
  /** mayHaveSubscribers' answers by topic, for the key filter as it is; cleared when it changes. */
  const mayHaveMemo = new Map<string, boolean>();
  const rebuildKeyFilter = (): void => {
    keyFilter.clear();
    mayHaveMemo.clear();
    filterKeys = 0;
    filterDeletes = 0;
    for (const key of st.subKeys.iterate() as IterableIterator<string>) {
      keyFilter.add(key);
      filterKeys++;
    }
  };
  const noteDeletes = (rows: number): void => {
    filterDeletes += rows;
  };
  rebuildKeyFilter();

  // --- subscription cache -----------------------------------------------------------------------
  /** topic → offline subscribers; insertion order is recency (re-inserted on a hit). */
  const subscriptionCache = new Map<string, OfflineSubscription[]>();
  /** The match keys of `topic`'s filters that the key filter may hold. */
  const candidateKeys = (levels: readonly string[]): string[] => {
    const keys: string[] = [];
    let prefix = '';
    for (let n = 0; n <= levels.length; n++) {
      if (n > 0) prefix = n === 1 ? levels[0]! : `${prefix}/${levels[n - 1]!}`;
      const key = `${n}:${prefix}`;
      if (keyFilter.mayHave(key)) keys.push(key);
    }
    return keys;
  };
  const lookUpSubscribers = (topic: string): OfflineSubscription[] => {
    const levels = topic.split('/');
    const keys = candidateKeys(levels);
    if (keys.length === 0) {
      stats.subscriptionFilterSkips++;
      return [];
    }
    // One key is the usual case (the filter ruled out the others): a plain index probe.
    const rows = (
      keys.length === 1 ? st.subsByKey.all(keys[0]) : st.subsByKeys.all(JSON.stringify(keys))
    ) as SubscriptionRow[];
    const wildcard: SubscriptionRow[] = [];
    const exact: SubscriptionRow[] = [];
    for (const row of rows) {
      if (!topicMatches(row.topic, levels)) continue;
      (isExactKey(row.match_key, row.topic) ? exact : wildcard).push(row);
    }
    // aedes' own trie lists filters with wildcards before the exact filter.
    const byRowid = (a: SubscriptionRow, b: SubscriptionRow) => a.rowid - b.rowid;
    return [...wildcard.sort(byRowid), ...exact.sort(byRowid)].map((row) => ({
      clientId: row.client_id,
      topic: row.topic,
      qos: row.qos,
      rh: row.rh ?? undefined,
      rap: fromFlag(row.rap),
      nl: fromFlag(row.nl),
    }));
  };
  const copySubs = (subs: OfflineSubscription[]) => subs.map((s) => ({ ...s }));
  const cached = (topic: string): OfflineSubscription[] | undefined => {
    const hit = subscriptionCache.get(topic);
    if (hit === undefined) return undefined;
    subscriptionCache.delete(topic);
    subscriptionCache.set(topic, hit);
    return hit;
  };
  const remember = (topic: string, subs: OfflineSubscription[]) => {
    if (cacheSize <= 0) return;
    if (subscriptionCache.size >= cacheSize) {
      const oldest = subscriptionCache.keys().next().value;
      if (oldest !== undefined) subscriptionCache.delete(oldest);
    }
    subscriptionCache.set(topic, subs);
  };

  // --- writes, run inside the batch -------------------------------------------------------------
  const enqueueOne = (clientId: string, packet: PacketLike): void => {
    const stored = toAedesPacket(packet);
    const { meta, payload } = encodePacket(stored);
    const bytes = payload?.length ?? 0;
    st.sessionEnsure.run(clientId, now());
    st.outInsert.run(
      clientId,
      stored.brokerId ?? null,
      stored.brokerCounter ?? null,
      stored.messageId ?? null,
      bytes,
      meta,
      payload,
    );
    st.sessionAddQueued.run(1, bytes, 0, clientId);
    const queued = st.sessionQueued.get(clientId) as { rows: number; bytes: number };
    if (queued.rows <= limits.maxQueuedMessages && queued.bytes <= limits.maxQueuedBytes) return;
    // Oldest first, until the queue is back within both caps (the newest always stays).
    let rows = queued.rows;
    let total = queued.bytes;
    let dropped = 0;
    let droppedBytes = 0;
    const over = () => (rows > limits.maxQueuedMessages || total > limits.maxQueuedBytes) && rows > 1;
    while (over()) {
      const page = st.outOldest.all(clientId, Math.min(PAGE, rows - 1)) as { seq: number; bytes: number }[];
      if (page.length === 0) break;
      for (const old of page) {
        if (!over()) break;
        st.outDelete.run(old.seq);
        rows--;
        total -= old.bytes;
        dropped++;
        droppedBytes += old.bytes;
      }
    }
    if (dropped === 0) return;
    st.sessionAddQueued.run(-dropped, -droppedBytes, dropped, clientId);
    queueDrops.set(clientId, (queueDrops.get(clientId) ?? 0) + dropped);
  };

  const deleteSession = (clientId: string): void => {
    noteDeletes(st.subDeleteClient.run(clientId).changes);
    st.outDeleteClient.run(clientId);
    st.inDeleteClient.run(clientId);
    st.willDelete.run(clientId);
    st.sessionDelete.run(clientId);
  };

  // --- streams -------------------------------------------------------------------------------
  /** Resolves once every call queued before it has run. */
  const barrier = () => read(() => undefined);

  async function* retainedMatching(pattern: string): AsyncGenerator<PacketLike> {
    const levels = pattern.split('/');
    let literal = levels.findIndex((l) => l === '+' || l === '#');
    if (literal < 0) literal = levels.length;
    if (literal === levels.length) {
      const row = st.retainedExact.get(pattern) as RetainedRow | undefined;
      if (row) yield decodePacket(row);
      return;
    }
    const prefix = levels.slice(0, literal).join('/');
    // `a/#` matches `a` itself too.
    if (literal > 0 && levels[literal] === '#' && literal === levels.length - 1) {
      const parent = st.retainedExact.get(prefix) as RetainedRow | undefined;
      if (parent) yield decodePacket(parent);
    }
    // Topics under `prefix/` sort from `prefix/` (itself a topic: an empty last level) up to
    // `prefix0` ('0' follows '/'); a page goes on just after the last topic (a topic holds no NUL).
    let from = literal === 0 ? '' : `${prefix}/`;
    const upper = literal === 0 ? undefined : `${prefix}0`;
    for (;;) {
      const rows = (
        upper === undefined ? st.retainedAll.all(from, PAGE) : st.retainedRange.all(from, upper, PAGE)
      ) as RetainedRow[];
      for (const row of rows) if (topicMatches(pattern, row.topic.split('/'))) yield decodePacket(row);
      if (rows.length < PAGE) return;
      from = `${rows[rows.length - 1]!.topic}\u0000`;
      // Let the loop serve others between pages of a large scan.
      await new Promise((resolve) => setImmediate(resolve));
    }
  }

  const live = (): void => {
    if (destroyed) throw destroyedError();
  };

  const persistence: BrokerPersistence = {
    get broker() {
      return broker;
    },
    get stats() {
      return { ...stats };
    },

    async setup(b: BrokerRef) {
      broker = b;
      // Runs whatever sessionExpiry is now: a reload may turn expiry on.
      if (housekeeping === undefined && !destroyed) {
        housekeeping = setInterval(() => {
          persistence.expireSessions().catch((err: unknown) => {
            logger.error({ err }, 'broker_sessions_expire_failed');
          });
        }, housekeepingMs);
        housekeeping.unref();
      }
    },

    storeRetained(packet) {
      const copy: PacketLike = { ...packet };
      return call(
        () => {
          const topic = String(copy.topic);
          const payloadLength =
            typeof copy.payload === 'string' ? Buffer.byteLength(copy.payload) : (copy.payload?.length ?? 0);
          if (payloadLength === 0) {
            st.retainedDelete.run(topic);
            return;
          }
          const owner = retainedOwner(topic);
          const { meta, payload } = encodePacket(copy);
          st.retainedUpsert.run(topic, owner, meta, payload);
          const count = st.retainedCountOwner.get(owner) as number;
          if (count > limits.maxRetainedPerDevice) {
            const drop = count - limits.maxRetainedPerDevice;
            st.retainedDropOldest.run(owner, drop);
            retainedDrops.set(owner, (retainedDrops.get(owner) ?? 0) + drop);
          }
        },
        { durable: true },
      );
    },

    createRetainedStream(pattern) {
      return Readable.from(
        (async function* () {
          await barrier();
          yield* retainedMatching(pattern);
        })(),
      );
    },

    createRetainedStreamCombi(patterns) {
      return Readable.from(
        (async function* () {
          await barrier();
          for (const pattern of patterns) yield* retainedMatching(pattern);
        })(),
      );
    },

    addSubscriptions(client, subs) {
      const clientId = client.id;
      const list = subs.map((s) => ({ ...s }));
      return call(
        () => {
          st.sessionEnsure.run(clientId, now());
          for (const sub of list) {
            st.subUpsert.run(
              clientId,
              sub.topic,
              sub.qos,
              sub.rh ?? null,
              toFlag(sub.rap),
              toFlag(sub.nl),
              sub.subscriptionIdentifier ?? null,
              matchKey(sub.topic),
            );
            // A QoS 0 one replacing a QoS > 0 one takes a key out: counted like a delete.
            if (sub.qos > 0) {
              keyFilter.add(matchKey(sub.topic));
              mayHaveMemo.clear();
              filterKeys++;
            } else noteDeletes(1);
          }
        },
        { subscriptions: true },
      );
    },

    removeSubscriptions(client, topics) {
      const clientId = client.id;
      const list = [...topics];
      return call(
        () => {
          for (const topic of list) noteDeletes(st.subDelete.run(clientId, topic).changes);
        },
        { subscriptions: true },
      );
    },

    subscriptionsByClient(client) {
      const clientId = client.id;
      return read(() =>
        (st.subsOfClient.all(clientId) as SubscriptionRow[]).map((row) => {
          const sub: SubscriptionLike = {
            topic: row.topic,
            qos: row.qos,
            rh: row.rh ?? undefined,
            rap: fromFlag(row.rap),
            nl: fromFlag(row.nl),
          };
          if (row.sub_id !== null) sub.subscriptionIdentifier = row.sub_id;
          return sub;
        }),
      );
    },

    countOffline() {
      return read(() => {
        const row = st.subsCount.get() as { subs: number; clients: number };
        return { subsCount: row.subs, clientsCount: row.clients };
      });
    },

    subscriptionsByTopic(topic) {
      // The hot path of every QoS > 0 publish: answered at once from the cache when no change to
      // subscriptions is waiting in the queue.
      if (pendingSubscriptionChanges === 0 && !destroyed) {
        const hit = cached(topic);
        if (hit !== undefined) {
          stats.subscriptionCacheHits++;
          return Promise.resolve(copySubs(hit));
        }
      }
      return read(() => {
        stats.subscriptionCacheMisses++;
        const subs = lookUpSubscribers(topic);
        remember(topic, subs);
        return copySubs(subs);
      });
    },

    mayHaveSubscribers(topic) {
      if (pendingSubscriptionChanges > 0 || destroyed) return true;
      let answer = mayHaveMemo.get(topic);
      if (answer === undefined) {
        answer = candidateKeys(topic.split('/')).length > 0;
        if (mayHaveMemo.size >= SUBSCRIBER_MEMO_TOPICS) mayHaveMemo.clear();
        mayHaveMemo.set(topic, answer);
      }
      return answer;
    },

    cleanSubscriptions(client) {
      const clientId = client.id;
      return call(
        () => {
          noteDeletes(st.subDeleteClient.run(clientId).changes);
        },
        { subscriptions: true },
      );
    },

    outgoingEnqueue(sub, packet) {
      const clientId = sub.clientId;
      return call(() => enqueueOne(clientId, packet), { durable: true });
    },

    outgoingEnqueueCombi(subs, packet) {
      if (subs.length === 0) return destroyed ? Promise.reject(destroyedError()) : Promise.resolve();
      const clientIds = subs.map((s) => s.clientId);
      return call(
        () => {
          for (const clientId of clientIds) enqueueOne(clientId, packet);
        },
        { durable: true },
      );
    },

    outgoingUpdate(client, packet) {
      const clientId = client.id;
      const update = { ...packet };
      return call(() => {
        if (update.brokerId !== undefined && update.brokerCounter !== undefined) {
          const row = st.outByCounter.get(clientId, update.brokerCounter, update.brokerId ?? null) as
            (PacketRow & { seq: number }) | undefined;
          if (row) {
            const stored = decodePacket(row);
            stored.messageId = update.messageId;
            const encoded = encodePacket(stored);
            st.outSetMessageId.run(update.messageId ?? null, encoded.meta, row.seq);
            return;
          }
        }
        // Another packet under this id (a PUBREL replacing its PUBLISH): it takes the place.
        const other = st.outByMessageIdOtherBroker.get(
          clientId,
          update.messageId ?? null,
          update.brokerId ?? null,
        ) as { seq: number; bytes: number } | undefined;
        if (!other) throw new Error('no such packet');
        const { meta, payload } = encodePacket(update);
        const bytes = payload?.length ?? 0;
        st.outReplace.run(
          update.brokerId ?? null,
          update.brokerCounter ?? null,
          update.messageId ?? null,
          bytes,
          meta,
          payload,
          other.seq,
        );
        st.sessionAddQueued.run(0, bytes - other.bytes, 0, clientId);
      });
    },

    outgoingClearMessageId(client, packet) {
      const clientId = client.id;
      const messageId = (packet as PacketLike | null)?.messageId;
      return call(() => {
        if (typeof messageId !== 'number') return undefined;
        const row = st.outByMessageId.get(clientId, messageId) as
          (PacketRow & { seq: number; bytes: number }) | undefined;
        if (!row) return undefined;
        st.outDelete.run(row.seq);
        st.sessionAddQueued.run(-1, -row.bytes, 0, clientId);
        return decodePacket(row);
      });
    },

    outgoingStream(client) {
      const clientId = client.id;
      return Readable.from(
        (async function* () {
          await barrier();
          // What is queued now, like a snapshot: rows queued while the stream runs wait for the next.
          const last = (st.outMaxSeq.get(clientId) as number | null) ?? 0;
          let after = 0;
          for (;;) {
            live();
            const rows = st.outPage.all(clientId, after, last, PAGE) as (PacketRow & { seq: number })[];
            for (const row of rows) yield decodePacket(row);
            if (rows.length < PAGE) return;
            after = rows[rows.length - 1]!.seq;
          }
        })(),
      );
    },

    incomingStorePacket(client, packet) {
      const clientId = client.id;
      const stored = toAedesPacket(packet);
      stored.messageId = packet.messageId;
      return call(() => {
        st.sessionEnsure.run(clientId, now());
        const { meta, payload } = encodePacket(stored);
        st.inUpsert.run(clientId, stored.messageId ?? null, meta, payload);
      });
    },

    incomingGetPacket(client, packet) {
      const clientId = client.id;
      const messageId = packet.messageId ?? null;
      return read(() => {
        const row = st.inGet.get(clientId, messageId) as PacketRow | undefined;
        if (!row) throw new Error('no such packet');
        return decodePacket(row);
      });
    },

    incomingDelPacket(client, packet) {
      const clientId = client.id;
      const messageId = packet.messageId ?? null;
      return call(() => {
        if (st.inDelete.run(clientId, messageId).changes === 0) throw new Error('no such packet');
      });
    },

    cleanIncoming(client) {
      const clientId = client.id;
      return call(() => {
        st.inDeleteClient.run(clientId);
      });
    },

    putWill(client, packet) {
      // As aedes' own persistence does: the will carries its owner and broker from now on.
      packet.brokerId = broker?.id;
      packet.clientId = client.id;
      const { meta, payload } = encodePacket(packet);
      const clientId = client.id;
      const brokerId = packet.brokerId ?? null;
      return call(() => {
        st.willUpsert.run(clientId, brokerId, meta, payload);
      });
    },

    getWill(client) {
      const clientId = client.id;
      return read(() => {
        const row = st.willGet.get(clientId) as PacketRow | undefined;
        return row ? decodePacket(row) : undefined;
      });
    },

    delWill(client) {
      const clientId = client.id;
      return call(() => {
        const row = st.willGet.get(clientId) as PacketRow | undefined;
        if (!row) return undefined;
        st.willDelete.run(clientId);
        return decodePacket(row);
      });
    },

    streamWill(brokers = {}) {
      return Readable.from(
        (async function* () {
          await barrier();
          let after = '';
          for (;;) {
            live();
            const rows = st.willPage.all(after, PAGE) as (PacketRow & {
              client_id: string;
              broker_id: string | null;
            })[];
            for (const row of rows)
              if (row.broker_id === null || !brokers[row.broker_id]) yield decodePacket(row);
            if (rows.length < PAGE) return;
            after = rows[rows.length - 1]!.client_id;
          }
        })(),
      );
    },

    getClientList(topic) {
      return Readable.from(
        (async function* () {
          await barrier();
          let after = 0;
          for (;;) {
            live();
            const rows = st.clientsOfTopic.all(topic, after, PAGE) as { rowid: number; client_id: string }[];
            for (const row of rows) yield row.client_id;
            if (rows.length < PAGE) return;
            after = rows[rows.length - 1]!.rowid;
          }
        })(),
      );
    },

    async destroy() {
      if (destroyed) return;
      if (housekeeping) clearInterval(housekeeping);
      housekeeping = undefined;
      // What aedes handed over before closing still lands (a cleanIncoming after a disconnect).
      if (queue.length > 0) flush();
      destroyed = true;
      subscriptionCache.clear();
    },

    updateLimits(next) {
      limits = { ...next };
    },

    clientConnected(clientId) {
      connected.set(clientId, (connected.get(clientId) ?? 0) + 1);
      const at = now();
      call(() => st.sessionTouch.run(at, clientId)).catch((err: unknown) =>
        logger.warn({ err, clientId }, 'broker_session_touch_failed'),
      );
    },

    clientDisconnected(clientId) {
      const left = (connected.get(clientId) ?? 1) - 1;
      if (left > 0) connected.set(clientId, left);
      else connected.delete(clientId);
      if (destroyed) return;
      const at = now();
      call(() => st.sessionTouch.run(at, clientId)).catch((err: unknown) =>
        logger.warn({ err, clientId }, 'broker_session_touch_failed'),
      );
    },

    async expireSessions() {
      if (limits.sessionExpiryMs <= 0) return 0;
      // Connected devices are seen now, every round: a kill -9 costs them at most one round.
      const online = [...connected.keys()];
      for (let i = 0; i < online.length; i += EXPIRE_CHUNK) {
        const chunk = online.slice(i, i + EXPIRE_CHUNK);
        const at = now();
        await call(() => {
          for (const clientId of chunk) st.sessionTouch.run(at, clientId);
        });
      }
      let expired = 0;
      // Chunks keep each transaction short; bounded by the sessions there are.
      for (;;) {
        const cutoff = now() - limits.sessionExpiryMs;
        const { removed, full } = await call(
          () => {
            const ids = st.sessionsExpired.all(cutoff, EXPIRE_CHUNK) as { client_id: string }[];
            let count = 0;
            for (const { client_id: clientId } of ids) {
              if (connected.has(clientId)) {
                // Connected all along: seen now.
                st.sessionTouch.run(now(), clientId);
                continue;
              }
              deleteSession(clientId);
              count++;
            }
            return { removed: count, full: ids.length === EXPIRE_CHUNK };
          },
          { subscriptions: true },
        );
        expired += removed;
        if (!full) break;
      }
      if (expired > 0) {
        stats.sessionsExpired += expired;
        logger.info({ expired, sessionExpiryMs: limits.sessionExpiryMs }, 'broker_sessions_expired');
      }
      return expired;
    },
  };
  return persistence;
}

interface SubscriptionRow {
  rowid: number;
  client_id: string;
  topic: string;
  qos: number;
  rh: number | null;
  rap: number | null;
  nl: number | null;
  sub_id: number | null;
  match_key: string;
}

interface RetainedRow extends PacketRow {
  topic: string;
}

function destroyedError(): GatewayError {
  return new GatewayError(
    ErrorCodes.STORE_WRITE,
    "the broker's persistence was destroyed; the broker is stopping and cannot take this call",
  );
}

/**
 * Whom a retained message counts against: the device of `devices/{id}/…`, else the first
 * topic level (gateway/{id}/status and the like share one allowance).
 */
export function retainedOwner(topic: string): string {
  const levels = topic.split('/', 3);
  if (levels[0] === 'devices' && levels.length >= 2) return `devices/${levels[1]}`;
  return levels[0] ?? '';
}

/** `{n}:{the n literal levels before the first wildcard}`: a topic's lookup probes n = 0…levels. */
function matchKey(filter: string): string {
  const levels = filter.split('/');
  let n = levels.findIndex((l) => l === '+' || l === '#');
  if (n < 0) n = levels.length;
  return `${n}:${levels.slice(0, n).join('/')}`;
}

function isExactKey(key: string, filter: string): boolean {
  return key === `${filter.split('/').length}:${filter}`;
}

/** MQTT filter matching (no `$` rule here: aedes applies it to what it gets back). */
export function topicMatches(filter: string, topicLevels: readonly string[]): boolean {
  const f = filter.split('/');
  for (let i = 0; i < f.length; i++) {
    const level = f[i];
    if (level === '#') return true;
    if (i >= topicLevels.length) return false;
    if (level !== '+' && level !== topicLevels[i]) return false;
  }
  return f.length === topicLevels.length;
}

const toFlag = (value: boolean | undefined): number | null => (value === undefined ? null : value ? 1 : 0);
const fromFlag = (value: number | null): boolean | undefined => (value === null ? undefined : value === 1);

/**
 * The packet aedes queues (what aedes-packet's Packet keeps of a publish): its fields and no
 * others, messageId unset for QoS > 0 until delivery assigns one.
 */
function toAedesPacket(original: PacketLike): PacketLike {
  const packet: PacketLike = {};
  for (const key of ['clientId', 'nl', 'properties', 'messageExpiry'] as const)
    if (Object.prototype.hasOwnProperty.call(original, key))
      (packet as Record<string, unknown>)[key] = original[key];
  packet.cmd = original.cmd || 'publish';
  packet.brokerId = original.brokerId || undefined;
  packet.brokerCounter = original.brokerCounter || 0;
  packet.topic = original.topic;
  packet.payload = original.payload || Buffer.alloc(0);
  packet.qos = original.qos || 0;
  packet.retain = original.retain || false;
  packet.dup = original.dup || false;
  if (packet.qos > 0 || packet.cmd !== 'publish') packet.messageId = undefined;
  return packet;
}

/**
 * A packet as JSON (Buffers as base64, keys set to undefined listed) plus its payload as a BLOB:
 * it comes back with the same keys, a string payload as a string.
 */
function encodePacket(packet: PacketLike): { meta: string; payload: Buffer | null } {
  const rest: Record<string, unknown> = {};
  const unset: string[] = [];
  let payload: Buffer | null = null;
  let kind: 'b' | 's' | undefined;
  for (const [key, value] of Object.entries(packet)) {
    if (key === 'payload') {
      if (typeof value === 'string') {
        payload = Buffer.from(value, 'utf8');
        kind = 's';
      } else if (value instanceof Uint8Array) {
        payload = Buffer.isBuffer(value)
          ? value
          : Buffer.from(value.buffer, value.byteOffset, value.byteLength);
        kind = 'b';
      } else if (value === undefined) unset.push(key);
      else rest[key] = value;
      continue;
    }
    if (value === undefined) unset.push(key);
    else rest[key] = value;
  }
  if (kind !== undefined) rest.$p = kind;
  if (unset.length > 0) rest.$u = unset;
  return { meta: JSON.stringify(rest, bufferReplacer), payload };
}

function decodePacket(row: PacketRow): PacketLike {
  const packet = JSON.parse(row.meta, bufferReviver) as PacketLike & { $p?: 'b' | 's'; $u?: string[] };
  const { $p: kind, $u: unset } = packet;
  delete packet.$p;
  delete packet.$u;
  if (kind !== undefined) {
    const bytes = row.payload ?? Buffer.alloc(0);
    packet.payload = kind === 's' ? bytes.toString('utf8') : Buffer.from(bytes);
  }
  for (const key of unset ?? []) packet[key] = undefined;
  return packet;
}

function bufferReplacer(this: Record<string, unknown>, key: string, value: unknown): unknown {
  const raw = this[key];
  if (raw instanceof Uint8Array)
    return { $b: Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength).toString('base64') };
  return value;
}

function bufferReviver(_key: string, value: unknown): unknown {
  if (value !== null && typeof value === 'object' && typeof (value as { $b?: unknown }).$b === 'string') {
    const keys = Object.keys(value);
    if (keys.length === 1) return Buffer.from((value as { $b: string }).$b, 'base64');
  }
  return value;
}

interface KeyFilter {
  add(key: string): void;
  mayHave(key: string): boolean;
  clear(): void;
}

/** 2^20 bits, 3 probes by double hashing (FNV-1a and a second seed): ≈ 1 % false hits at 100,000 keys. */
function createKeyFilter(): KeyFilter {
  const BITS = 1 << 20;
  const words = new Uint32Array(BITS >>> 5);
  const hash = (key: string, seed: number): number => {
    let h = seed;
    for (let i = 0; i < key.length; i++) {
      h ^= key.charCodeAt(i);
      h = Math.imul(h, 16777619);
    }
    return h >>> 0;
  };
  const probes = (key: string, visit: (bit: number) => boolean): boolean => {
    const h1 = hash(key, 2166136261);
    const h2 = hash(key, 3560932519) | 1;
    for (let i = 0; i < 3; i++) if (!visit((h1 + i * h2) & (BITS - 1))) return false;
    return true;
  };
  return {
    add(key) {
      probes(key, (bit) => {
        words[bit >>> 5]! |= 1 << (bit & 31);
        return true;
      });
    },
    mayHave(key) {
      return probes(key, (bit) => (words[bit >>> 5]! & (1 << (bit & 31))) !== 0);
    },
    clear() {
      words.fill(0);
    },
  };
}
