import type { Aedes } from 'aedes';

/** The parts of an aedes publish packet the ordering reads. */
interface EmittedPacket {
  brokerId?: string | null;
  brokerCounter?: number;
}

type Done = (err?: Error | null) => void;

interface InFlight {
  counter: number;
  /** The held emit, once the publish reached it. */
  emit?: () => void;
  emitted: boolean;
  /** Its publish ended (a refused or failed one without an emit). */
  finished: boolean;
  /** The next publish not yet emitted under the same counter (a will from before a restart). */
  same: InFlight | undefined;
}

/**
 * Makes aedes emit publishes to subscribers in the order they were published.
 *
 * aedes drops, per client, a message whose brokerCounter is below one it already delivered to
 * that client (its cluster dedupe). A publish's steps before the emit are asynchronous: a
 * retained message waits for its store (a WAL sync with broker.persistence: sqlite), a QoS > 0
 * one for its offline enqueue. A later publish that needs neither (a QoS 0 or non-retained
 * command) was emitted first, and the retained one was then silently dropped for every client
 * that had received the later one. Holding each emit until the earlier publishes were emitted
 * (or ended) keeps the counters in emit order.
 */
export function keepEmitOrder(aedes: Aedes): void {
  const broker = aedes as unknown as {
    counter: number;
    id: string;
    publish: (packet: EmittedPacket, client?: unknown, done?: Done) => void;
    mq: { emit: (packet: EmittedPacket, done?: Done) => void };
  };
  const queue: InFlight[] = [];
  let head = 0;
  /**
   * Publishes not yet emitted, per counter: the first, the others chained through `same` (a
   * will from before a restart may reuse a counter; no array per publish on the hot path).
   */
  const byCounter = new Map<number, InFlight>();

  const forget = (entry: InFlight): void => {
    const first = byCounter.get(entry.counter);
    if (first === undefined) return;
    if (first === entry) {
      if (entry.same === undefined) byCounter.delete(entry.counter);
      else byCounter.set(entry.counter, entry.same);
      return;
    }
    for (let e = first; e.same !== undefined; e = e.same) {
      if (e.same === entry) {
        e.same = entry.same;
        return;
      }
    }
  };

  const waitingEmit = (counter: number): InFlight | undefined => {
    for (let e = byCounter.get(counter); e !== undefined; e = e.same) {
      if (!e.emit && !e.emitted && !e.finished) return e;
    }
    return undefined;
  };

  // An emit can run a nested publish or its done (both drain): only the outer loop moves the head.
  let draining = false;
  const drain = (): void => {
    if (draining) return;
    draining = true;
    try {
      while (head < queue.length) {
        const first = queue[head]!;
        const emit = first.emit;
        if (!emit && !first.emitted && !first.finished) break;
        head++;
        forget(first);
        if (emit) {
          first.emit = undefined;
          first.emitted = true;
          emit();
        }
      }
    } finally {
      draining = false;
    }
    if (head === queue.length) {
      queue.length = 0;
      head = 0;
    } else if (head > 1024 && head * 2 > queue.length) {
      queue.splice(0, head);
      head = 0;
    }
  };

  const publish = broker.publish.bind(aedes);
  broker.publish = (packet, client, done) => {
    if (typeof client === 'function') {
      done = client as Done;
      client = null;
    }
    // aedes numbers the packet synchronously at the start of publish (a stored will keeps its own).
    const counter = packet.brokerCounter || broker.counter + 1;
    const entry: InFlight = { counter, emit: undefined, emitted: false, finished: false, same: undefined };
    queue.push(entry);
    let last = byCounter.get(counter);
    if (last === undefined) byCounter.set(counter, entry);
    else {
      while (last.same !== undefined) last = last.same;
      last.same = entry;
    }
    publish(packet, client, (err) => {
      entry.finished = true;
      drain();
      done?.(err);
    });
  };

  const emit = broker.mq.emit.bind(broker.mq);
  broker.mq.emit = (packet, done) => {
    const entry =
      packet.brokerId === broker.id && typeof packet.brokerCounter === 'number'
        ? waitingEmit(packet.brokerCounter)
        : undefined;
    if (!entry) {
      emit(packet, done);
      return;
    }
    entry.emit = () => emit(packet, done);
    drain();
  };
}
