import { createRequire } from 'node:module';
import { dtls } from 'node-dtls-client';

/**
 * Two repairs to node-dtls-client 1.1.1, applied once on first use:
 *
 * 1. Its handshake handler knows how to read a PSK ServerKeyExchange (the server's identity
 *    hint, RFC 4279 §2), but the message type is missing from its parser table, so a server
 *    that sends a hint (OpenSSL/libcoap does by default) ends the handshake with an exception.
 * 2. That exception, like any other thrown while it parses a datagram, escapes from the UDP
 *    socket's message handler and would take the daemon down; we turn it into the socket's
 *    ordinary error, which ends that one session.
 */

interface HandshakeModule {
  HandshakeMessages: Record<number, unknown>;
  HandshakeType: { server_key_exchange: number };
  ServerKeyExchange: unknown;
}

interface PatchableSocket {
  udp_onMessage(msg: Buffer, rinfo: unknown): void;
  killConnection(err: Error): void;
}

let applied = false;

export function applyDtlsClientFixes(): void {
  if (applied) return;
  applied = true;
  const require = createRequire(import.meta.url);
  const handshake = require('node-dtls-client/build/DTLS/Handshake.js') as HandshakeModule;
  handshake.HandshakeMessages[handshake.HandshakeType.server_key_exchange] ??= handshake.ServerKeyExchange;

  const proto = dtls.Socket.prototype as unknown as PatchableSocket;
  const original = proto.udp_onMessage;
  proto.udp_onMessage = function guarded(this: PatchableSocket, msg: Buffer, rinfo: unknown) {
    try {
      original.call(this, msg, rinfo);
    } catch (err) {
      this.killConnection(err instanceof Error ? err : new Error(String(err)));
    }
  };
}
