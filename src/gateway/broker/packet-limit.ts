import { Duplex } from 'node:stream';

/**
 * aedes 1.x (through mqtt-packet) buffers a whole packet of up to 256 MiB before it looks at
 * it and has no size option (aedes #831). This reader sits between the socket and
 * `aedes.handle`: it follows MQTT fixed headers across chunk boundaries and cuts the
 * connection as soon as a header declares a packet larger than the limit, before any of the
 * body is buffered. Bytes pass through untouched otherwise.
 */

export type PacketRejectReason = 'packet_too_large' | 'malformed_length';

export interface PacketRejection {
  reason: PacketRejectReason;
  /** Declared size of the whole packet in bytes (fixed header included); null when malformed. */
  declaredSize: number | null;
  packetType: number;
}

/** Incremental MQTT fixed-header scanner. `push` returns a rejection, or null while all is well. */
export interface PacketSizeScanner {
  push(chunk: Buffer): PacketRejection | null;
}

export function createPacketSizeScanner(maxPacketSize: number): PacketSizeScanner {
  // State: reading the type byte, reading the remaining length, or skipping a body.
  let state: 'type' | 'length' | 'body' = 'type';
  let packetType = 0;
  let remaining = 0;
  let multiplier = 1;
  let lengthBytes = 0;
  let bodyLeft = 0;

  return {
    push(chunk) {
      let i = 0;
      while (i < chunk.length) {
        if (state === 'body') {
          const skip = Math.min(bodyLeft, chunk.length - i);
          bodyLeft -= skip;
          i += skip;
          if (bodyLeft === 0) state = 'type';
          continue;
        }
        const byte = chunk[i++]!;
        if (state === 'type') {
          packetType = byte >> 4;
          remaining = 0;
          multiplier = 1;
          lengthBytes = 0;
          state = 'length';
          continue;
        }
        // Remaining length: 7 bits a byte, continuation in the high bit, at most 4 bytes.
        remaining += (byte & 0x7f) * multiplier;
        multiplier *= 128;
        lengthBytes++;
        if (byte & 0x80) {
          if (lengthBytes === 4) return { reason: 'malformed_length', declaredSize: null, packetType };
          continue;
        }
        const total = 1 + lengthBytes + remaining;
        if (total > maxPacketSize) return { reason: 'packet_too_large', declaredSize: total, packetType };
        bodyLeft = remaining;
        state = bodyLeft === 0 ? 'type' : 'body';
      }
      return null;
    },
  };
}

export interface PacketLimitOptions {
  maxPacketSize: number;
  /** Called once, just before the connection is destroyed. */
  onReject: (rejection: PacketRejection) => void;
}

/**
 * What a router did with one PUBLISH packet. Pass: left to aedes, in its place in the stream.
 * Taken: aedes never sees it. Stall: not now; it and everything after it wait for `resume()`,
 * and reading stops meanwhile.
 */
export const Routed = { Pass: 0, Taken: 1, Stall: 2 } as const;
export type Routed = (typeof Routed)[keyof typeof Routed];

/** Sees each whole PUBLISH packet before aedes does (the broker's device lane). */
export interface PacketRouter {
  /** The packet is `data[start, end)`, fixed header included; the bytes stay as they are. */
  route(data: Buffer, start: number, end: number): Routed;
}

/** The connection side a router works with. */
export interface RoutedConnection {
  /** From now on, every whole PUBLISH packet is offered to `router` first. */
  setRouter(router: PacketRouter): void;
  /** Writes bytes straight to the device's socket (bypassing aedes); false once it must drain. */
  write(bytes: Buffer): boolean;
  /** Routes what a Stall held back, and reads on. */
  resume(): void;
  /** Stops (true) or restarts (false) reading from the device, for the router's own bound. */
  hold(on: boolean): void;
  readonly destroyed: boolean;
}

const routed = new WeakMap<Duplex, RoutedConnection>();

/** The router hook of a connection made by limitPacketSize. */
export function routedConnection(outer: Duplex): RoutedConnection | undefined {
  return routed.get(outer);
}

/** The whole size of the packet at `data[start]` (fixed header included), or -1 while its header is cut. */
function packetSize(data: Buffer, start: number): number {
  let remaining = 0;
  let multiplier = 1;
  for (let i = start + 1; i < data.length && i <= start + 4; i++) {
    const byte = data[i]!;
    remaining += (byte & 0x7f) * multiplier;
    if ((byte & 0x80) === 0) return i + 1 - start + remaining;
    multiplier *= 128;
  }
  return -1;
}

/**
 * Wraps a connection (TCP or TLS socket, WebSocket stream) in a duplex that aedes reads MQTT
 * from; writes go straight to the underlying connection. Destroying either side destroys both.
 * With a router set, what aedes reads is whole packets only, less the PUBLISHes the router took.
 */
export function limitPacketSize(inner: Duplex, options: PacketLimitOptions): Duplex {
  const scanner = createPacketSizeScanner(options.maxPacketSize);
  let pendingWrite: ((err?: Error | null) => void) | null = null;
  let rejected = false;
  let router: PacketRouter | null = null;
  /** The start of a packet cut at a chunk's end: its pieces, their length, its size (-1: unknown). */
  let cut: Buffer[] = [];
  let cutLength = 0;
  let cutSize = -1;
  /** Input from a stalled packet on, routed again at resume(). */
  let stalled: Buffer | null = null;
  /** Why reading is stopped: aedes is full, a stall, the router's hold. */
  let aedesFull = false;
  let held = false;
  /** The device ended its side while a stall held input back: aedes hears the end after it. */
  let endedWhileStalled = false;

  const flow = (): void => {
    if (aedesFull || stalled !== null || held) inner.pause();
    else inner.resume();
  };

  const releaseWrite = (err?: Error | null) => {
    const cb = pendingWrite;
    pendingWrite = null;
    cb?.(err);
  };

  const outer = new Duplex({
    // Small buffer: the bound on what we hold is the socket's own buffer plus one chunk.
    readableHighWaterMark: 16 * 1024,
    read() {
      aedesFull = false;
      flow();
    },
    write(chunk: Buffer, encoding, callback) {
      if (inner.destroyed) {
        callback(new Error('connection closed'));
        return;
      }
      if (inner.write(chunk, encoding)) {
        callback();
      } else {
        pendingWrite = callback;
        inner.once('drain', () => releaseWrite());
      }
    },
    // aedes corks per tick (mqtt-packet's writeToStream): hand the batch to the socket as one
    // writev instead of a syscall per PUBACK.
    writev(chunks, callback) {
      if (inner.destroyed) {
        callback(new Error('connection closed'));
        return;
      }
      inner.cork();
      let ok = true;
      for (const { chunk, encoding } of chunks) ok = inner.write(chunk as Buffer, encoding) && ok;
      inner.uncork();
      if (ok) {
        callback();
      } else {
        pendingWrite = callback;
        inner.once('drain', () => releaseWrite());
      }
    },
    final(callback) {
      inner.end();
      callback();
    },
    destroy(err, callback) {
      releaseWrite(err ?? new Error('connection closed'));
      if (!inner.destroyed) inner.destroy();
      callback(err);
    },
  });

  const toAedes = (bytes: Buffer): void => {
    if (!outer.push(bytes)) {
      aedesFull = true;
      flow();
    }
  };

  /** Routes the whole packets of `data`; keeps a cut one for the next chunk. */
  const route = (data: Buffer): void => {
    let pos = 0;
    let run = 0;
    while (pos < data.length) {
      const size = packetSize(data, pos);
      if (size < 0 || pos + size > data.length) break;
      const end = pos + size;
      if (data[pos]! >> 4 === 3) {
        const verdict = router!.route(data, pos, end);
        if (verdict !== Routed.Pass) {
          if (pos > run) toAedes(data.subarray(run, pos));
          if (verdict === Routed.Stall) {
            stalled = data.subarray(pos);
            flow();
            return;
          }
          run = end;
        }
      }
      pos = end;
    }
    if (pos > run) toAedes(data.subarray(run, pos));
    if (pos < data.length) {
      const rest = data.subarray(pos);
      cut = [rest];
      cutLength = rest.length;
      cutSize = packetSize(rest, 0);
    }
  };

  const routeChunk = (chunk: Buffer): void => {
    if (stalled !== null) {
      stalled = Buffer.concat([stalled, chunk]);
      return;
    }
    if (cutLength === 0) {
      route(chunk);
      return;
    }
    if (cutSize < 0) {
      // The cut packet's header itself was cut (a few bytes): join and start over.
      const joined = Buffer.concat([...cut, chunk]);
      cut = [];
      cutLength = 0;
      route(joined);
      return;
    }
    const need = cutSize - cutLength;
    if (chunk.length < need) {
      cut.push(chunk);
      cutLength += chunk.length;
      return;
    }
    const whole = Buffer.concat([...cut, chunk.subarray(0, need)], cutSize);
    cut = [];
    cutLength = 0;
    cutSize = -1;
    route(whole);
    if (stalled !== null) {
      if (need < chunk.length) stalled = Buffer.concat([stalled, chunk.subarray(need)]);
    } else if (need < chunk.length) route(chunk.subarray(need));
  };

  routed.set(outer, {
    setRouter(next) {
      router = next;
    },
    write(bytes) {
      if (inner.destroyed || !inner.writable) return false;
      return inner.write(bytes);
    },
    resume() {
      const input = stalled;
      if (input === null) return;
      stalled = null;
      flow();
      if (!rejected && !inner.destroyed) route(input);
      if (endedWhileStalled && stalled === null) outer.push(null);
    },
    hold(on) {
      held = on;
      flow();
    },
    get destroyed() {
      return inner.destroyed;
    },
  });

  inner.on('data', (chunk: Buffer | string) => {
    if (rejected) return;
    const buf = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
    const rejection = scanner.push(buf);
    if (rejection) {
      rejected = true;
      try {
        options.onReject(rejection);
      } finally {
        inner.destroy();
        outer.destroy();
      }
      return;
    }
    if (router === null && cutLength === 0) toAedes(buf);
    else routeChunk(buf);
  });
  inner.on('end', () => {
    if (stalled !== null) endedWhileStalled = true;
    else outer.push(null);
  });
  inner.on('close', () => {
    releaseWrite(new Error('connection closed'));
    if (!outer.destroyed) outer.destroy();
  });
  // aedes listens for errors on `outer`; the inner error ends in a close either way.
  inner.on('error', (err) => {
    if (!outer.destroyed) outer.destroy(err);
  });
  return outer;
}
