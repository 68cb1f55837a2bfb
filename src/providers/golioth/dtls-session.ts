import { dtls } from 'node-dtls-client';
import { ErrorCodes, GatewayError } from '../../errors.js';
import type { DatagramTransport } from './coap-channel.js';
import { applyDtlsClientFixes } from './dtls-client-fixes.js';

/**
 * One DTLS 1.2 PSK session (node-dtls-client 1.x; its 2.x needs Node 22) for one identity:
 * Golioth devices authenticate with PSK-ID `<name>@<project>` and their PSK (§3.2).
 * node-dtls-client does not retransmit lost handshake flights, so a handshake that loses a
 * datagram ends at `handshakeTimeoutMs`; the caller backs off and opens a new session.
 */

export interface DtlsSession extends DatagramTransport {
  /** Sends close_notify and closes the socket. */
  close(): Promise<void>;
  /** Called once when the session ends without our close (socket error, fatal alert, peer close). */
  onClose(handler: (error: Error) => void): void;
}

export interface DtlsSessionOptions {
  host: string;
  port: number;
  identity: string;
  /** node-dtls-client takes the PSK as an ASCII string, as Golioth issues them. */
  psk: string;
  handshakeTimeoutMs: number;
  signal?: AbortSignal;
}

// Golioth's firmware SDK negotiates TLS_PSK_WITH_AES_128_CCM_8 over mbedTLS/Zephyr ([UNCONFIRMED]
// for the server side, §6 item 8); the GCM and CBC suites keep other peers (OpenSSL) reachable.
const PSK_CIPHERS = [
  'TLS_PSK_WITH_AES_128_CCM_8',
  'TLS_PSK_WITH_AES_128_GCM_SHA256',
  'TLS_PSK_WITH_AES_128_CBC_SHA256',
] as const;

export function openDtlsSession(options: DtlsSessionOptions): Promise<DtlsSession> {
  return new Promise((resolve, reject) => {
    options.signal?.throwIfAborted();
    applyDtlsClientFixes();
    const socket = dtls.createSocket({
      type: 'udp4',
      address: options.host,
      port: options.port,
      psk: { [options.identity]: options.psk },
      timeout: options.handshakeTimeoutMs,
      ciphers: [...PSK_CIPHERS],
    });
    let connected = false;
    let ended = false;
    let closeHandler: ((error: Error) => void) | undefined;
    const messageHandlers: ((datagram: Buffer) => void)[] = [];

    const onAbort = () => {
      ended = true;
      socket.close();
      reject(options.signal!.reason);
    };
    options.signal?.addEventListener('abort', onAbort, { once: true });

    const end = (error: Error) => {
      if (ended) return;
      ended = true;
      options.signal?.removeEventListener('abort', onAbort);
      if (!connected) {
        reject(
          new GatewayError(
            ErrorCodes.PROVIDER_CONNECT,
            `the DTLS handshake as ${options.identity} failed (${error.message}): check the device's PSK and that its identity exists in the project`,
            { retryable: true, cause: error, details: { identity: options.identity } },
          ),
        );
      } else {
        closeHandler?.(error);
      }
    };

    socket.on('connected', () => {
      connected = true;
      options.signal?.removeEventListener('abort', onAbort);
      resolve({
        send(datagram) {
          if (ended) return;
          socket.send(datagram);
        },
        onMessage(handler) {
          messageHandlers.push(handler);
        },
        onClose(handler) {
          closeHandler = handler;
        },
        close() {
          return new Promise<void>((done) => {
            if (ended) {
              done();
              return;
            }
            ended = true;
            socket.close(() => done());
            // close() waits for the socket's close event; do not hang if it never comes.
            setTimeout(done, 1000).unref();
          });
        },
      });
    });
    socket.on('message', (msg: Buffer) => {
      for (const h of messageHandlers) h(msg);
    });
    socket.on('error', (err: Error) => end(err));
    socket.on('close', () => end(new Error('the DTLS session was closed by the peer')));
  });
}
