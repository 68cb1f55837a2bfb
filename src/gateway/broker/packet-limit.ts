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
 * Wraps a connection (TCP or TLS socket, WebSocket stream) in a duplex that aedes reads MQTT
 * from; writes go straight to the underlying connection. Destroying either side destroys both.
 */
export function limitPacketSize(inner: Duplex, options: PacketLimitOptions): Duplex {
  const scanner = createPacketSizeScanner(options.maxPacketSize);
  let pendingWrite: ((err?: Error | null) => void) | null = null;
  let rejected = false;

  const releaseWrite = (err?: Error | null) => {
    const cb = pendingWrite;
    pendingWrite = null;
    cb?.(err);
  };

  const outer = new Duplex({
    // Small buffer: the bound on what we hold is the socket's own buffer plus one chunk.
    readableHighWaterMark: 16 * 1024,
    read() {
      inner.resume();
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
    if (!outer.push(buf)) inner.pause();
  });
  inner.on('end', () => outer.push(null));
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
