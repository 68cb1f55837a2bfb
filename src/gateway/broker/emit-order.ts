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
  /** Publishes not yet emitted, per counter (a will from before a restart may reuse one). */
  const byCounter = new Map<number, InFlight[]>();

  const forget = (entry: InFlight): void => {
    const same = byCounter.get(entry.counter);
    if (!same) return;
    const i = same.indexOf(entry);
    if (i >= 0) same.splice(i, 1);
    if (same.length === 0) byCounter.delete(entry.counter);
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
    const entry: InFlight = { counter, emitted: false, finished: false };
    queue.push(entry);
    const same = byCounter.get(counter);
    if (same) same.push(entry);
    else byCounter.set(counter, [entry]);
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
        ? byCounter.get(packet.brokerCounter)?.find((e) => !e.emit && !e.emitted && !e.finished)
        : undefined;
    if (!entry) {
      emit(packet, done);
      return;
    }
    entry.emit = () => emit(packet, done);
    drain();
  };
}
