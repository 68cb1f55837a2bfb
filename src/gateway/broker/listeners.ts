import { readFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer as createNetServer, type AddressInfo, type Server, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { createServer as createTlsServer, type Server as TlsServer, type TLSSocket } from 'node:tls';
import type { WebSocketServer } from 'ws';
import type { ListenerConfig } from '../../config/schema.js';
import { ErrorCodes, GatewayError, errorMessage } from '../../errors.js';
import type { Logger } from '../../logger.js';
import type { ConnectRateLimiter, ConnectRateRefusal } from './admission.js';
import { limitPacketSize, type PacketRejectReason } from './packet-limit.js';

/** What the broker learns about a connection from the listener that accepted it. */
export interface ConnectionInfo {
  listener: ListenerConfig['type'];
  /** Index in `broker.listeners`. */
  listenerIndex: number;
  remoteAddress: string | null;
  /** CN of a verified client certificate (TLS listener with requireClientCert), else null. */
  certIdentity: string | null;
}

export interface BoundListener {
  type: ListenerConfig['type'];
  host: string;
  port: number;
}

export type ConnectionRejectReason = 'max_connections' | ConnectRateRefusal | PacketRejectReason;

export interface ConnectionRejection {
  reason: ConnectionRejectReason;
  remoteAddress: string | null;
  listener: ListenerConfig['type'];
  /** Declared packet size for packet_too_large. */
  declaredSize?: number | null;
}

export interface ListenersOptions {
  listeners: readonly ListenerConfig[];
  /** Cap on open sockets across all listeners; aedes' own counter drifts (aedes #1023). */
  maxConnections: number;
  maxPacketSize: number;
  /** ms; also bounds TLS handshakes and WebSocket upgrades, so half-open floods are cut. */
  connectTimeout: number;
  /** Per-source and total accept rate, checked before TLS, HTTP or aedes see the socket. */
  connectRate?: ConnectRateLimiter;
  logger: Logger;
  /** A new connection, already wrapped in the packet-size limit: hand it to `aedes.handle`. */
  onConnection: (stream: Duplex, info: ConnectionInfo) => void;
  onReject: (rejection: ConnectionRejection) => void;
}

export interface Listeners {
  /** Binds every listener; resolves with the bound addresses (port 0 → the real port). */
  listen(): Promise<BoundListener[]>;
  /** Open sockets across all listeners, counted by us. */
  readonly openConnections: number;
  /**
   * Reads every TLS listener's cert, key, ca and crl files again and uses them for new
   * connections (a renewed certificate, a new CRL) without closing any. A listener whose files
   * cannot be read or used keeps the ones it has; returns what failed, one sentence each.
   */
  refreshTls(): string[];
  /** Stops accepting new connections; open ones stay. */
  stopAccepting(): void;
  /** Stops accepting, destroys every remaining socket and waits for the servers to close. */
  close(): Promise<void>;
}

interface Started {
  server: Server;
  wss?: WebSocketServer;
  /** TLS listeners: reads the files again and swaps the secure context (see refreshTls). */
  refresh?: () => void;
}

/** Idle time before the kernel starts TCP keepalive probes on an accepted socket. */
export const TCP_KEEPALIVE_IDLE_MS = 60_000;

export function createListeners(options: ListenersOptions): Listeners {
  const { logger } = options;
  const sockets = new Set<Socket>();
  const started: Started[] = [];
  let closing = false;

  /**
   * Counts a raw socket (before TLS or HTTP), or refuses it when the cap is reached or its
   * source or the gateway accepts too fast. A refused socket is only closed: clients retry.
   */
  const admit = (socket: Socket, type: ListenerConfig['type']): boolean => {
    const remoteAddress = socket.remoteAddress ?? null;
    const reason: ConnectionRejectReason | null = closing
      ? null
      : sockets.size >= options.maxConnections
        ? 'max_connections'
        : (options.connectRate?.admit(remoteAddress) ?? null);
    if (closing || reason !== null) {
      socket.on('error', () => {});
      socket.destroy();
      if (reason !== null) options.onReject({ reason, remoteAddress, listener: type });
      return false;
    }
    socket.setNoDelay(true);
    // A client with keepalive 0 (or a peer that vanished) is found by TCP probes instead.
    socket.setKeepAlive(true, TCP_KEEPALIVE_IDLE_MS);
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
    return true;
  };

  const hand = (stream: Duplex, info: ConnectionInfo): void => {
    const limited = limitPacketSize(stream, {
      maxPacketSize: options.maxPacketSize,
      onReject: (r) =>
        options.onReject({
          reason: r.reason,
          remoteAddress: info.remoteAddress,
          listener: info.listener,
          declaredSize: r.declaredSize,
        }),
    });
    try {
      options.onConnection(limited, info);
    } catch (err) {
      logger.error({ err, remoteAddress: info.remoteAddress }, 'connection_handler_failed');
      limited.destroy();
    }
  };

  const build = (config: ListenerConfig, index: number, ws: typeof import('ws') | undefined): Started => {
    switch (config.type) {
      case 'tcp': {
        const server = createNetServer({ noDelay: true });
        server.on('connection', (socket: Socket) => {
          if (!admit(socket, 'tcp')) return;
          hand(socket, {
            listener: 'tcp',
            listenerIndex: index,
            remoteAddress: socket.remoteAddress ?? null,
            certIdentity: null,
          });
        });
        return { server };
      }
      case 'tls': {
        const read = (key: 'cert' | 'key' | 'ca' | 'crl', path: string): Buffer => {
          try {
            return readFileSync(path);
          } catch (err) {
            throw new GatewayError(
              ErrorCodes.CONFIG_INVALID,
              `cannot read broker.listeners[${index}].${key} ${path} (${(err as NodeJS.ErrnoException).code ?? errorMessage(err)}); fix the path or the file's permissions`,
              { cause: err, details: { path: `broker.listeners[${index}].${key}` } },
            );
          }
        };
        // What a secure context is made of; read again by refreshTls.
        const files = () => ({
          cert: read('cert', config.cert),
          key: read('key', config.key),
          ...(config.ca === undefined ? {} : { ca: read('ca', config.ca) }),
          ...(config.crl === undefined ? {} : { crl: read('crl', config.crl) }),
          minVersion: 'TLSv1.2' as const,
        });
        const unusable = (err: unknown) =>
          err instanceof GatewayError
            ? err
            : new GatewayError(
                ErrorCodes.CONFIG_INVALID,
                `broker.listeners[${index}]: the TLS certificate, key, CA or CRL is not usable (${errorMessage(err)}); check broker.listeners[${index}].cert, .key, .ca and .crl`,
                { cause: err },
              );
        let server: TlsServer;
        try {
          server = createTlsServer({
            ...files(),
            requestCert: config.requireClientCert,
            rejectUnauthorized: config.requireClientCert,
            handshakeTimeout: options.connectTimeout,
            noDelay: true,
          });
        } catch (err) {
          throw unusable(err);
        }
        const refresh = () => {
          try {
            server.setSecureContext(files());
          } catch (err) {
            throw unusable(err);
          }
        };
        server.on('connection', (socket: Socket) => void admit(socket, 'tls'));
        server.on('secureConnection', (socket: TLSSocket) => {
          let certIdentity: string | null = null;
          if (config.requireClientCert && socket.authorized) {
            const cn = socket.getPeerCertificate()?.subject?.CN;
            certIdentity = typeof cn === 'string' && cn.length > 0 ? cn : null;
          }
          hand(socket, {
            listener: 'tls',
            listenerIndex: index,
            remoteAddress: socket.remoteAddress ?? null,
            certIdentity,
          });
        });
        server.on('tlsClientError', (err, socket) => {
          logger.debug({ err, remoteAddress: socket.remoteAddress }, 'tls_handshake_failed');
        });
        return { server, refresh };
      }
      case 'ws': {
        const server = createHttpServer((_req, res) => {
          res.writeHead(426, { 'content-type': 'text/plain' });
          res.end('MQTT over WebSocket only\n');
        });
        server.headersTimeout = options.connectTimeout;
        server.requestTimeout = options.connectTimeout;
        server.on('connection', (socket: Socket) => void admit(socket, 'ws'));
        const wss = new ws!.WebSocketServer({
          server,
          path: config.path,
          // Frames are cut by ws itself; MQTT packets by limitPacketSize on the stream.
          maxPayload: options.maxPacketSize,
          perMessageDeflate: false,
        });
        wss.on('connection', (socket, req) => {
          const stream = ws!.createWebSocketStream(socket);
          hand(stream, {
            listener: 'ws',
            listenerIndex: index,
            remoteAddress: req.socket.remoteAddress ?? null,
            certIdentity: null,
          });
        });
        wss.on('error', (err) => logger.error({ err }, 'ws_server_error'));
        return { server, wss };
      }
    }
  };

  const bind = (entry: Started, config: ListenerConfig, index: number): Promise<BoundListener> =>
    new Promise((resolve, reject) => {
      const { server } = entry;
      const onError = (err: NodeJS.ErrnoException) => {
        server.off('listening', onListening);
        reject(listenError(err, config, index));
      };
      const onListening = () => {
        server.off('error', onError);
        // Accept errors (EMFILE …) must not crash the daemon.
        server.on('error', (err) =>
          logger.error({ err, listener: config.type, port: config.port }, 'listener_error'),
        );
        const address = server.address() as AddressInfo;
        resolve({ type: config.type, host: address.address, port: address.port });
      };
      server.once('error', onError);
      server.once('listening', onListening);
      server.listen({ host: config.host, port: config.port });
    });

  const closeServer = (entry: Started): Promise<void> =>
    new Promise((resolve) => {
      entry.wss?.close();
      if (!entry.server.listening) return resolve();
      entry.server.close(() => resolve());
    });

  return {
    get openConnections() {
      return sockets.size;
    },
    async listen() {
      const bound: BoundListener[] = [];
      try {
        for (const [index, config] of options.listeners.entries()) {
          // ws is loaded only when a WebSocket listener is configured (it costs ~10 MB of RSS).
          const ws = config.type === 'ws' ? await import('ws') : undefined;
          const entry = build(config, index, ws);
          started.push(entry);
          bound.push(await bind(entry, config, index));
        }
      } catch (err) {
        await this.close();
        throw err;
      }
      return bound;
    },
    refreshTls() {
      const failures: string[] = [];
      for (const entry of started) {
        try {
          entry.refresh?.();
        } catch (err) {
          failures.push(errorMessage(err));
        }
      }
      return failures;
    },
    stopAccepting() {
      closing = true;
      for (const entry of started) {
        entry.wss?.close();
        if (entry.server.listening) entry.server.close();
      }
    },
    async close() {
      closing = true;
      const closed = Promise.all(started.map(closeServer));
      for (const socket of sockets) socket.destroy();
      await closed;
      started.length = 0;
    },
  };
}

function listenError(err: NodeJS.ErrnoException, config: ListenerConfig, index: number): GatewayError {
  const where = `broker.listeners[${index}]`;
  const details = { host: config.host, port: config.port, path: `${where}.port`, errno: err.code };
  switch (err.code) {
    case 'EADDRINUSE':
      return new GatewayError(
        ErrorCodes.LISTEN_IN_USE,
        `port ${config.port} on ${config.host} is already in use (${where}.port); stop the other program or change ${where}.port`,
        { cause: err, details },
      );
    case 'EACCES':
      return new GatewayError(
        ErrorCodes.LISTEN_FAILED,
        `permission denied to listen on port ${config.port} on ${config.host} (${where}.port); use a port above 1023 or grant the gateway's user the right to bind it`,
        { cause: err, details },
      );
    case 'EADDRNOTAVAIL':
    case 'ENOTFOUND':
      return new GatewayError(
        ErrorCodes.LISTEN_FAILED,
        `address ${config.host} is not an address of this machine (${where}.host); use 0.0.0.0, 127.0.0.1 or an address of one of its interfaces`,
        { cause: err, details: { ...details, path: `${where}.host` } },
      );
    default:
      return new GatewayError(
        ErrorCodes.LISTEN_FAILED,
        `cannot listen on ${config.host}:${config.port} (${where}): ${err.code ?? errorMessage(err)}`,
        { cause: err, details },
      );
  }
}
