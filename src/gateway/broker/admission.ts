import { isIPv4, isIPv6 } from 'node:net';
import { exponentialCeiling } from '../../common/backoff.js';
import { refillTokens, type TokenBucket } from '../../common/rate-limiter.js';

/**
 * Admission control for the embedded broker (S2, S13, R15): how fast sockets are accepted, per
 * source and in total, and how long a username or a source that keeps failing its password
 * check must wait before the gateway spends another scrypt on it. Every table is bounded, so a
 * flood from many addresses or with many usernames cannot grow memory.
 */

/** Tracked sources or usernames per table; past this the least recently used entry goes. */
export const DEFAULT_MAX_ENTRIES = 10_000;

/** Entries looked at, oldest first, for one not locked before the oldest is evicted anyway. */
const EVICTION_SCAN = 16;

/** Doublings of the lock; 2^30 × any sane initial delay is far past every cap. */
const MAX_LEVEL = 30;

/**
 * The key a source is counted under: IPv4-mapped IPv6 as plain IPv4, and IPv6 by its /64 (one
 * host usually owns a whole /64, so counting single addresses would let it rotate through them).
 */
export function sourceKey(address: string): string {
  const zoneless = address.split('%')[0]!;
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(zoneless);
  if (mapped && isIPv4(mapped[1]!)) return mapped[1]!;
  if (!isIPv6(zoneless)) return zoneless;
  const groups = expandIPv6(zoneless);
  return groups === undefined ? zoneless : `${groups.slice(0, 4).join(':')}::/64`;
}

function expandIPv6(address: string): string[] | undefined {
  const parse = (part: string): string[] => {
    if (part === '') return [];
    const out: string[] = [];
    for (const piece of part.split(':')) {
      if (isIPv4(piece)) {
        const [a, b, c, d] = piece.split('.').map(Number) as [number, number, number, number];
        out.push(((a << 8) | b).toString(16), ((c << 8) | d).toString(16));
      } else out.push(parseInt(piece, 16).toString(16));
    }
    return out;
  };
  const [head, tail, ...rest] = address.split('::');
  if (rest.length > 0) return undefined;
  const first = parse(head!);
  const last = tail === undefined ? [] : parse(tail);
  const zeros = 8 - first.length - last.length;
  if (zeros < 0) return undefined;
  return [...first, ...Array.from({ length: zeros }, () => '0'), ...last];
}

/** Map iteration order is insertion order: re-inserting on use makes a Map an LRU. */
function touch<V>(map: Map<string, V>, key: string, value: V): void {
  map.delete(key);
  map.set(key, value);
}

// ---------------------------------------------------------------------------------------------
// Connect rate

export interface ConnectRateConfig {
  /** Accepted sockets per second from one source; 0 = unlimited. */
  perIp: number;
  perIpBurst: number;
  /** Accepted sockets per second across all sources; 0 = unlimited. */
  total: number;
  totalBurst: number;
}

/** Why a socket was refused: its source's bucket or the global one was empty. */
export type ConnectRateRefusal = 'connect_rate_ip' | 'connect_rate_total';

export interface ConnectRateLimiter {
  /** Spends a token for a new socket; null when admitted, else which limit refused it. */
  admit(remoteAddress: string | null): ConnectRateRefusal | null;
  /** Live reload; buckets keep their tokens (capped to the new bursts). */
  configure(config: ConnectRateConfig): void;
  /** Sources with a bucket (bounded by maxSources). */
  readonly sources: number;
}

export interface ConnectRateOptions {
  config: ConnectRateConfig;
  maxSources?: number;
  /** ms; monotonic by default (performance.now), injectable for tests. */
  now?: () => number;
}

export function createConnectRateLimiter(options: ConnectRateOptions): ConnectRateLimiter {
  const now = options.now ?? (() => performance.now());
  const maxSources = Math.max(1, options.maxSources ?? DEFAULT_MAX_ENTRIES);
  let config = options.config;
  const buckets = new Map<string, TokenBucket>();
  const global: TokenBucket = { tokens: config.totalBurst, at: now() };

  return {
    get sources() {
      return buckets.size;
    },
    admit(remoteAddress) {
      const t = now();
      let source: TokenBucket | undefined;
      if (config.perIp > 0 && remoteAddress !== null) {
        const key = sourceKey(remoteAddress);
        source = buckets.get(key);
        if (source === undefined) {
          // A new source starts full, so evicting an idle one (full again by now) loses nothing;
          // a flood of fresh addresses is the global bucket's business.
          if (buckets.size >= maxSources) buckets.delete(buckets.keys().next().value!);
          source = { tokens: config.perIpBurst, at: t };
        } else refillTokens(source, config.perIp, config.perIpBurst, t);
        touch(buckets, key, source);
        // Refused here, the socket does not drain the global bucket that other sources share.
        if (source.tokens < 1) return 'connect_rate_ip';
      }
      if (config.total > 0) {
        refillTokens(global, config.total, config.totalBurst, t);
        if (global.tokens < 1) return 'connect_rate_total';
        global.tokens -= 1;
      }
      if (source !== undefined) source.tokens -= 1;
      return null;
    },
    configure(next) {
      config = next;
      global.tokens = Math.min(global.tokens, next.totalBurst);
      for (const bucket of buckets.values()) bucket.tokens = Math.min(bucket.tokens, next.perIpBurst);
      if (next.perIp === 0) buckets.clear();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Login backoff

export interface LoginBackoffConfig {
  /** Failed password checks for one username within `window` that start a lock; 0 = off. */
  failures: number;
  /** The same for one source address (or IPv6 /64), across usernames; 0 = off. */
  ipFailures: number;
  /** ms; the count decays by `failures` per window, so it is forgotten after a quiet window. */
  window: number;
  /** ms; the first lock, doubled by each failure while the count stays at the threshold. */
  initial: number;
  /** ms; the longest lock. */
  max: number;
}

export interface LoginLock {
  /** Which key is locked: the username or the source address. */
  scope: 'username' | 'ip';
  /** ms until attempts are checked again. */
  remainingMs: number;
}

export interface LoginBackoff {
  /** The lock that refuses this attempt without a password check, or null when it may be checked. */
  check(username: string, remoteAddress: string | null): LoginLock | null;
  /**
   * A failed password check, counted against the username and the source alike (known and
   * unknown usernames the same: no enumeration). Returns the locks that this failure started.
   */
  failed(username: string, remoteAddress: string | null): LoginLock[];
  /**
   * Clears a username's count: it logged in, or its credentials changed in the config. A
   * source's count only decays: one valid login must not buy a host more guesses at others.
   */
  reset(username: string): void;
  configure(config: LoginBackoffConfig): void;
  readonly size: { usernames: number; sources: number };
}

export interface LoginBackoffOptions {
  config: LoginBackoffConfig;
  /** Per table (usernames, sources). */
  maxEntries?: number;
  now?: () => number;
}

interface FailureEntry {
  /** Failures, decaying at threshold per window (a leaky bucket). */
  score: number;
  at: number;
  lockedUntil: number;
  /** Locks so far in this run of failures; the next lock is initial × 2^level. */
  level: number;
}

interface FailureTable {
  lockedFor(key: string, t: number): number;
  fail(key: string, t: number): number;
  delete(key: string): void;
  readonly size: number;
}

function createFailureTable(
  field: 'failures' | 'ipFailures',
  config: () => LoginBackoffConfig,
  maxEntries: number,
): FailureTable {
  const entries = new Map<string, FailureEntry>();

  /** Decays the score to `t`; true when the entry holds nothing any more (no count, no lock). */
  const decay = (entry: FailureEntry, t: number): boolean => {
    const { window, [field]: threshold } = config();
    const elapsed = Math.max(0, t - entry.at);
    entry.score = window > 0 ? Math.max(0, entry.score - (elapsed * threshold) / window) : 0;
    entry.at = t;
    return entry.score === 0 && t >= entry.lockedUntil;
  };

  /** Makes room: the oldest unlocked entry among the first few, else the oldest of all. */
  const evict = (t: number): void => {
    let scanned = 0;
    for (const [key, entry] of entries) {
      if (scanned++ >= EVICTION_SCAN) break;
      if (t >= entry.lockedUntil) {
        entries.delete(key);
        return;
      }
    }
    entries.delete(entries.keys().next().value!);
  };

  return {
    get size() {
      return entries.size;
    },
    lockedFor(key, t) {
      const entry = entries.get(key);
      if (entry === undefined) return 0;
      return Math.max(0, entry.lockedUntil - t);
    },
    fail(key, t) {
      const n = config()[field];
      if (n <= 0) return 0;
      let entry = entries.get(key);
      if (entry !== undefined && decay(entry, t)) entry = undefined;
      if (entry === undefined) {
        if (!entries.has(key) && entries.size >= maxEntries) evict(t);
        entry = { score: 0, at: t, lockedUntil: 0, level: 0 };
      }
      entry.score += 1;
      touch(entries, key, entry);
      if (entry.score < n) return 0;
      const { initial, max } = config();
      const lockMs = exponentialCeiling(initial, max, entry.level);
      entry.lockedUntil = t + lockMs;
      entry.level = Math.min(MAX_LEVEL, entry.level + 1);
      return lockMs;
    },
    delete(key) {
      entries.delete(key);
    },
  };
}

export function createLoginBackoff(options: LoginBackoffOptions): LoginBackoff {
  const now = options.now ?? (() => performance.now());
  const maxEntries = Math.max(1, options.maxEntries ?? DEFAULT_MAX_ENTRIES);
  let config = options.config;
  const usernames = createFailureTable('failures', () => config, maxEntries);
  const sources = createFailureTable('ipFailures', () => config, maxEntries);

  return {
    get size() {
      return { usernames: usernames.size, sources: sources.size };
    },
    check(username, remoteAddress) {
      const t = now();
      const ip = remoteAddress === null ? 0 : sources.lockedFor(sourceKey(remoteAddress), t);
      if (ip > 0) return { scope: 'ip', remainingMs: ip };
      const user = usernames.lockedFor(username, t);
      return user > 0 ? { scope: 'username', remainingMs: user } : null;
    },
    failed(username, remoteAddress) {
      const t = now();
      const locks: LoginLock[] = [];
      const user = usernames.fail(username, t);
      if (user > 0) locks.push({ scope: 'username', remainingMs: user });
      if (remoteAddress !== null) {
        const ip = sources.fail(sourceKey(remoteAddress), t);
        if (ip > 0) locks.push({ scope: 'ip', remainingMs: ip });
      }
      return locks;
    },
    reset(username) {
      usernames.delete(username);
    },
    configure(next) {
      config = next;
    },
  };
}
