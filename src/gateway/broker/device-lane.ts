import { Routed, type PacketRouter, type RoutedConnection } from './packet-limit.js';

/**
 * The device lane: a connected device's plain QoS 0 and QoS 1 PUBLISHes, taken out of the
 * socket's bytes before aedes parses them. Each is parsed in place, committed through the same
 * ingest as aedes' path, and its PUBACK written straight to the socket once the commit is
 * durable. aedes still sees everything else (CONNECT, SUBSCRIBE, PINGREQ, acknowledgements of
 * what it delivers, QoS 2, and any publish the lane does not take: before the CONNACK, to a `$`
 * topic, outside the ACL, malformed), and publishes to local subscribers after the PUBACK, as
 * it does for its own.
 *
 * Order is kept as MQTT 3.1.1 asks (4.6): PUBACKs leave in the order their PUBLISHes came, and
 * the device's messages reach ingest in the order they were sent. A publish left to aedes while
 * PUBACKs of taken ones are outstanding waits (a stall) until they are written; once aedes holds
 * a publish, the lane leaves it the ones after it too, until aedes has answered them all.
 */

/** A publish the lane took, as ingest and local subscribers get it. */
export interface LaneMessage {
  topic: string;
  /** A view of the bytes the device sent. */
  payload: Buffer;
  qos: 0 | 1;
  retain: boolean;
}

/** What the broker does for its lanes (one object for all of them). */
export interface LaneHost<S> {
  /** Whether the lane may take a publish to `topic` from this session (a plain topic its ACL allows). */
  accepts(session: S, topic: string): boolean;
  /** A graceful stop: QoS 1 publishes are neither committed nor acknowledged. */
  readonly draining: boolean;
  /** Queues the message: the commit to wait for before the PUBACK, or null. May throw. */
  ingest(session: S, message: LaneMessage): Promise<void> | null;
  /** A message was taken for good (committed, or queued without a commit to wait for). */
  accepted(): void;
  /** A commit is awaited (the broker's graceful stop waits for the PUBACKs). */
  commitStarted(): void;
  commitEnded(): void;
  /** Whether aedes must publish it locally (a retained message, or a subscriber may match). */
  wantsLocal(message: LaneMessage): boolean;
  /** Publishes it through aedes to local subscribers (and the retained store). */
  publishLocal(session: S, message: LaneMessage): void;
  /** The device sent a packet aedes did not see: its keepalive starts over. */
  touched(session: S): void;
  /** The commit failed: the connection is closed without a PUBACK (the device sends it again). */
  ingestFailed(session: S, topic: string, err: unknown): void;
}

/** QoS 1 publishes taken and not yet acknowledged per connection before reading stops (aedes' own concurrency). */
export const MAX_UNACKED = 1000;

/** A QoS 1 publish taken, waiting for its commit. */
class Pending<S> {
  done = false;
  constructor(
    readonly id: number,
    /** For local subscribers after the PUBACK, or null when none wants it. */
    readonly local: LaneMessage | null,
    readonly session: S,
  ) {}
}

export class DeviceLane<S> implements PacketRouter {
  /** Set from the CONNACK (aedes' clientReady) to the session's end. */
  private session: S | null = null;
  /** Publishes left to aedes that it has not answered yet. */
  private slowPending = 0;
  /** Taken QoS 1 publishes, in arrival order, from `head` on; PUBACKs leave from the front. */
  private queue: Pending<S>[] = [];
  private head = 0;
  /** Packet ids whose PUBACKs leave at the next tick, as one write. */
  private acks: number[] = [];
  private locals: Pending<S>[] = [];
  private flushing = false;
  private holding = false;
  /** A commit failed: the connection is closing; nothing more is taken or acknowledged. */
  private failed = false;
  private touchedThisTurn = false;

  constructor(
    private readonly conn: RoutedConnection,
    private readonly host: LaneHost<S>,
  ) {
    conn.setRouter(this);
  }

  /** The device's CONNACK went out: its publishes may be taken from now on. */
  open(session: S): void {
    this.session = session;
  }

  /** Its session ended (disconnect, takeover, revocation): aedes sees the rest. */
  close(): void {
    this.session = null;
  }

  /** aedes answered (authorized or refused) a publish the lane left to it. */
  answered(): void {
    if (this.slowPending > 0) this.slowPending--;
  }

  /** Taken QoS 1 publishes whose PUBACK has not been written yet. */
  get unacked(): number {
    return this.queue.length - this.head + this.acks.length;
  }

  route(data: Buffer, start: number, end: number): Routed {
    const flags = data[start]!;
    const qos = (flags >> 1) & 3;
    const session = this.session;
    if (this.failed) return Routed.Taken;
    // QoS 2, QoS 3 and DUP on QoS 0 (a protocol error) are aedes' to answer.
    if (session === null || this.slowPending > 0 || qos > 1 || (qos === 0 && (flags & 0x08) !== 0)) {
      return this.pass(qos);
    }
    let i = start + 1;
    while ((data[i++]! & 0x80) !== 0);
    const topicStart = i + 2;
    const topicEnd = topicStart + ((data[i]! << 8) | data[i + 1]!);
    const payloadStart = topicEnd + qos * 2;
    if (topicEnd === topicStart || payloadStart > end) return this.pass(qos);
    const id = qos === 1 ? (data[topicEnd]! << 8) | data[topicEnd + 1]! : 0;
    if (qos === 1 && id === 0) return this.pass(qos);
    const topic = data.toString('utf8', topicStart, topicEnd);
    if (!this.host.accepts(session, topic)) return this.pass(qos);
    if (!this.touchedThisTurn) {
      this.touchedThisTurn = true;
      this.host.touched(session);
      queueMicrotask(() => (this.touchedThisTurn = false));
    }
    // Not committed and never acknowledged: its device sends it again after the restart.
    if (qos === 1 && this.host.draining) return Routed.Taken;
    const message: LaneMessage = {
      topic,
      payload: data.subarray(payloadStart, end),
      qos: qos as 0 | 1,
      retain: (flags & 0x01) !== 0,
    };
    let pending: Promise<void> | null;
    try {
      pending = this.host.ingest(session, message);
    } catch (err) {
      this.fail(session, topic, err);
      return Routed.Taken;
    }
    const local = this.host.wantsLocal(message) ? message : null;
    if (qos === 0) {
      this.host.accepted();
      if (local !== null) this.host.publishLocal(session, local);
      return Routed.Taken;
    }
    const entry = new Pending(id, local, session);
    this.queue.push(entry);
    if (pending === null) {
      entry.done = true;
      this.host.accepted();
      this.settle();
    } else {
      this.host.commitStarted();
      pending.then(
        () => {
          this.host.commitEnded();
          entry.done = true;
          this.host.accepted();
          this.settle();
        },
        (err: unknown) => {
          this.host.commitEnded();
          this.fail(session, topic, err);
        },
      );
    }
    if (!this.holding && this.queue.length - this.head >= MAX_UNACKED) {
      this.holding = true;
      this.conn.hold(true);
    }
    return Routed.Taken;
  }

  /** Leaves a publish to aedes, or stalls it while PUBACKs of taken ones are outstanding. */
  private pass(qos: number): Routed {
    if (qos > 0 && this.unacked > 0) return Routed.Stall;
    this.slowPending++;
    return Routed.Pass;
  }

  private fail(session: S, topic: string, err: unknown): void {
    if (this.failed) return;
    this.failed = true;
    // The PUBACKs of the commits before it still leave (next tick), before the close.
    this.settle();
    this.host.ingestFailed(session, topic, err);
  }

  /** Moves the committed publishes at the front to the next PUBACK write. */
  private settle(): void {
    const queue = this.queue;
    let head = this.head;
    while (head < queue.length && queue[head]!.done) {
      const entry = queue[head++]!;
      this.acks.push(entry.id);
      if (entry.local !== null) this.locals.push(entry);
    }
    if (head === queue.length) {
      this.queue = [];
      this.head = 0;
    } else this.head = head;
    if (this.acks.length > 0 && !this.flushing) {
      this.flushing = true;
      process.nextTick(this.flush);
    }
  }

  private readonly flush = (): void => {
    this.flushing = false;
    const acks = this.acks;
    const locals = this.locals;
    this.acks = [];
    this.locals = [];
    const bytes = Buffer.allocUnsafe(acks.length * 4);
    for (let k = 0, o = 0; k < acks.length; k++, o += 4) {
      const id = acks[k]!;
      bytes[o] = 0x40;
      bytes[o + 1] = 0x02;
      bytes[o + 2] = id >> 8;
      bytes[o + 3] = id & 0xff;
    }
    this.conn.write(bytes);
    // aedes' order for its own QoS 1 publishes: the PUBACK, then the local publish.
    for (const entry of locals) this.host.publishLocal(entry.session, entry.local!);
    if (this.holding && this.queue.length - this.head < MAX_UNACKED / 2) {
      this.holding = false;
      this.conn.hold(false);
    }
    if (this.unacked === 0 && !this.failed) this.conn.resume();
  };
}
