import { createHash } from 'node:crypto';

/**
 * Loop guard for MQTT 3.1.1, which has no No Local: remembers what we published on remote
 * topics that an inbound filter also covers, and recognises the copy the broker sends back.
 * A message counts as our own echo when its topic and payload equal one we published within
 * `ttlMs` that has not been matched yet; each publication cancels at most one arrival, so a
 * device that really sends the same payload again on that topic still gets it through.
 * Bounded: past `maxEntries` the oldest publications are forgotten first.
 */
export interface EchoFilter {
  /** We published `payload` on `topic`. */
  sent(topic: string, payload: Buffer): void;
  /** True (and forgotten) when an arrival is the echo of an earlier `sent`. */
  isEcho(topic: string, payload: Buffer): boolean;
  readonly size: number;
  /** Arrivals recognised as echoes so far. */
  readonly matched: number;
  /** Publications forgotten without their echo (ttl or bound): the broker did not send it back. */
  readonly unmatched: number;
}

interface Entry {
  /** Publications not matched yet, each with its expiry. */
  expiries: number[];
}

export function createEchoFilter(options: {
  ttlMs: number;
  maxEntries: number;
  now?: () => number;
}): EchoFilter {
  const now = options.now ?? Date.now;
  /**
   * In the order each key was first sent: roughly oldest first (a key sent again keeps its
   * place), which is all expiry and eviction need, since both are bounded anyway.
   */
  const entries = new Map<string, Entry>();
  let size = 0;
  let matched = 0;
  let unmatched = 0;
  // Topic and a digest of the payload: large payloads are not kept in memory twice.
  const keyOf = (topic: string, payload: Buffer) =>
    `${topic}\u0000${payload.length}\u0000${createHash('sha1').update(payload).digest('base64')}`;

  const dropOldest = () => {
    const first = entries.entries().next();
    if (first.done) return;
    const [key, entry] = first.value;
    entry.expiries.shift();
    size--;
    unmatched++;
    if (entry.expiries.length === 0) entries.delete(key);
  };
  const expire = (t: number) => {
    // Bounded by the entries held: each turn removes one publication or stops.
    for (let i = 0; i < options.maxEntries && size > 0; i++) {
      const first = entries.values().next();
      if (first.done || first.value.expiries[0]! > t) return;
      dropOldest();
    }
  };

  return {
    sent(topic, payload) {
      const t = now();
      expire(t);
      if (size >= options.maxEntries) dropOldest();
      const key = keyOf(topic, payload);
      const entry = entries.get(key);
      if (entry === undefined) entries.set(key, { expiries: [t + options.ttlMs] });
      else entry.expiries.push(t + options.ttlMs);
      size++;
    },
    isEcho(topic, payload) {
      if (size === 0) return false;
      expire(now());
      const key = keyOf(topic, payload);
      const entry = entries.get(key);
      if (entry === undefined) return false;
      entry.expiries.shift();
      size--;
      matched++;
      if (entry.expiries.length === 0) entries.delete(key);
      return true;
    },
    get size() {
      return size;
    },
    get matched() {
      return matched;
    },
    get unmatched() {
      return unmatched;
    },
  };
}
