import type { OutboundMessage } from '../common/outbound-message.js';

/** A message a device published, on its way into the durable queues. */
export interface IncomingMessage {
  deviceId: string;
  topic: string;
  payload: Buffer;
  qos: 0 | 1 | 2;
  retain: boolean;
}

export interface QueueLimits {
  maxMessages: number;
  maxBytes: number;
  onFull: 'drop-oldest' | 'reject-new';
  /** ms; 0 = never expires */
  ttlMs: number;
}

export interface EnqueueTarget {
  integrationId: string;
  limits: QueueLimits;
  /** QoS of the row in this queue (min of message and route QoS); the message's QoS when absent. */
  qos?: 0 | 1 | 2;
}

export interface QueueStats {
  depth: number;
  bytes: number;
  /** ms since epoch of the oldest row, null when empty */
  oldestEnqueuedAt: number | null;
  /** counters since start */
  dropped: number;
  expired: number;
  rejected: number;
  deadLettered: number;
  /** rows in the dead-letter table now */
  deadLetters: number;
}

/**
 * The durable store-and-forward queues, one per integration, in one SQLite file.
 * `enqueue` groups many messages per transaction: the promise resolves after COMMIT with
 * synchronous=FULL, which is when the broker may send the PUBACK.
 */
export interface Outbox {
  /** Rejects with GW_ERR_QUEUE_FULL (reject-new policy) or GW_ERR_STORE_WRITE (disk full, I/O). */
  enqueue(message: IncomingMessage, targets: readonly EnqueueTarget[]): Promise<void>;
  /** Up to `limit` oldest rows of a queue with id > afterId, in id order. */
  read(integrationId: string, afterId: number, limit: number): OutboundMessage[];
  /** Deletes rows the upstream acknowledged. */
  ack(integrationId: string, ids: readonly number[]): void;
  /** Counts a delivery attempt on rows (kept across restarts). */
  markAttempt(integrationId: string, ids: readonly number[]): void;
  /**
   * Devices with rows in a queue and the highest row id of each (one GROUP BY, bounded by the
   * number of devices). The forwarder reads it once per (re)connect to interleave a backlog with
   * live traffic; without it a queue drains in plain id order.
   */
  backlogByDevice(integrationId: string): { deviceId: string; maxId: number }[];
  /** Moves a row the upstream rejected for good to the dead-letter table, with the reason. */
  deadLetter(integrationId: string, message: OutboundMessage, code: string, reason: string): void;
  stats(integrationId: string): QueueStats;
  /** Deletes expired rows of every queue; counts, logs and records each drop. Returns how many. */
  expire(now?: number): number;
  /**
   * The wall clock jumped forward by `deltaMs` (R17: an RTC-less box setting its clock from NTP
   * after boot): every queued row's expiry moves by as much, so the jump does not expire rows
   * that waited less than their ttl. Returns the rows moved.
   */
  shiftExpiry(deltaMs: number): number;
  /** Listeners learn which queues got new rows (after commit) so forwarders wake up. */
  onEnqueue(listener: (integrationIds: ReadonlySet<string>) => void): () => void;
  /** Commits whatever is staged now. */
  flush(): Promise<void>;
  /** Flushes, then refuses further enqueues. */
  close(): Promise<void>;
}
