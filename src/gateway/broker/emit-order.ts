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
  /** Emitted, or finished without emitting (refused, store failed). */
  over: boolean;
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
  const byCounter = new Map<number, InFlight>();

  const drain = (): void => {
    while (head < queue.length) {
      const first = queue[head]!;
      if (!first.over) {
        if (!first.emit) break;
        const emit = first.emit;
        first.emit = undefined;
        first.over = true;
        emit();
      }
      byCounter.delete(first.counter);
      head++;
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
    // aedes numbers the packet synchronously at the start of publish (a forwarded one keeps its own).
    const counter = packet.brokerCounter || broker.counter + 1;
    const entry: InFlight = { counter, over: false };
    queue.push(entry);
    byCounter.set(counter, entry);
    publish(packet, client, (err) => {
      if (!entry.over) {
        entry.over = true;
        entry.emit = undefined;
        drain();
      }
      done?.(err);
    });
  };

  const emit = broker.mq.emit.bind(broker.mq);
  broker.mq.emit = (packet, done) => {
    const entry =
      packet.brokerId === broker.id && typeof packet.brokerCounter === 'number'
        ? byCounter.get(packet.brokerCounter)
        : undefined;
    if (!entry || entry.over) {
      emit(packet, done);
      return;
    }
    entry.emit = () => emit(packet, done);
    drain();
  };
}
