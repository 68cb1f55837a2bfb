import { connect as netConnect, type Socket } from 'node:net';
import mqttPacket, { type Packet } from 'mqtt-packet';

/**
 * A minimal MQTT 3.1.1 client on mqtt-packet: much lighter than mqtt.js, so the load
 * generator costs little CPU next to the broker under test on a 2-core machine. Writes are
 * gathered per event-loop turn into one socket write.
 */
export interface RawClient {
  readonly clientId: string;
  /** QoS 0: sent at once, onAck never called. QoS 1: onAck(sentAt) at PUBACK. False when no packet id is free. */
  publish(
    topic: string,
    payload: Buffer,
    qos: 0 | 1,
    onAck?: (sentAt: number) => void,
    retain?: boolean,
  ): boolean;
  subscribe(filter: string, qos: 0 | 1, timeoutMs?: number): Promise<void>;
  /** Messages received on subscriptions; QoS 1 ones are PUBACKed right after the callback. */
  onMessage(handler: (topic: string, payload: Buffer) => void): void;
  onClose(handler: () => void): void;
  readonly inflight: number;
  readonly connected: boolean;
  /** Sends DISCONNECT and closes. */
  end(): Promise<void>;
  destroy(): void;
}

export interface RawConnectOptions {
  port: number;
  host?: string;
  clientId: string;
  clean?: boolean;
  keepalive?: number;
  username?: string;
  password?: string;
  timeoutMs?: number;
}

export async function connectRaw(opts: RawConnectOptions): Promise<RawClient> {
  const socket: Socket = netConnect({ port: opts.port, host: opts.host ?? '127.0.0.1' });
  socket.setNoDelay(true);
  const parser = mqttPacket.parser({ protocolVersion: 4 });
  const inflightAcks = new Map<number, { sentAt: number; onAck: ((sentAt: number) => void) | undefined }>();
  const subacks = new Map<number, () => void>();
  let messageHandler: (topic: string, payload: Buffer) => void = () => {};
  const closeHandlers: (() => void)[] = [];
  let nextId = 1;
  let open = false;
  let pending: Buffer[] = [];
  let flushScheduled = false;

  const flush = () => {
    flushScheduled = false;
    if (pending.length === 0 || socket.destroyed) return;
    const out = pending.length === 1 ? pending[0]! : Buffer.concat(pending);
    pending = [];
    socket.write(out);
  };
  const send = (packet: Packet) => {
    pending.push(mqttPacket.generate(packet));
    if (!flushScheduled) {
      flushScheduled = true;
      setImmediate(flush);
    }
  };
  const allocateId = (): number | undefined => {
    for (let tries = 0; tries < 65535; tries++) {
      const id = nextId;
      nextId = nextId === 65535 ? 1 : nextId + 1;
      if (!inflightAcks.has(id) && !subacks.has(id)) return id;
    }
    return undefined;
  };

  const connack = new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no CONNACK for ${opts.clientId} within ${opts.timeoutMs ?? 10_000} ms`));
    }, opts.timeoutMs ?? 10_000);
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    socket.once('close', () => {
      clearTimeout(timer);
      reject(new Error(`connection closed before CONNACK (${opts.clientId})`));
    });
    parser.on('packet', (packet: Packet) => {
      switch (packet.cmd) {
        case 'connack':
          clearTimeout(timer);
          if (packet.returnCode === 0 || packet.reasonCode === 0) {
            open = true;
            resolve();
          } else {
            socket.destroy();
            reject(
              new Error(`CONNACK return code ${packet.returnCode ?? packet.reasonCode} for ${opts.clientId}`),
            );
          }
          return;
        case 'puback': {
          const entry = inflightAcks.get(packet.messageId!);
          if (entry) {
            inflightAcks.delete(packet.messageId!);
            entry.onAck?.(entry.sentAt);
          }
          return;
        }
        case 'suback': {
          const done = subacks.get(packet.messageId!);
          subacks.delete(packet.messageId!);
          done?.();
          return;
        }
        case 'publish':
          messageHandler(packet.topic, packet.payload as Buffer);
          if (packet.qos === 1) send({ cmd: 'puback', messageId: packet.messageId! });
          return;
        default:
          return;
      }
    });
  });
  socket.on('data', (chunk) => parser.parse(chunk));
  socket.on('error', () => {});
  socket.on('close', () => {
    open = false;
    for (const handler of closeHandlers) handler();
  });
  socket.once('connect', () => {
    send({
      cmd: 'connect',
      protocolId: 'MQTT',
      protocolVersion: 4,
      clientId: opts.clientId,
      clean: opts.clean ?? true,
      keepalive: opts.keepalive ?? 600,
      ...(opts.username !== undefined ? { username: opts.username } : {}),
      ...(opts.password !== undefined ? { password: Buffer.from(opts.password) } : {}),
    });
  });
  await connack;

  return {
    clientId: opts.clientId,
    get inflight() {
      return inflightAcks.size;
    },
    get connected() {
      return open;
    },
    publish(topic, payload, qos, onAck, retain = false) {
      if (!open) return false;
      if (qos === 0) {
        send({ cmd: 'publish', topic, payload, qos: 0, retain, dup: false });
        return true;
      }
      const id = allocateId();
      if (id === undefined) return false;
      inflightAcks.set(id, { sentAt: performance.now(), onAck });
      send({ cmd: 'publish', topic, payload, qos: 1, messageId: id, retain, dup: false });
      return true;
    },
    subscribe(filter, qos, timeoutMs = 5_000) {
      const id = allocateId() ?? 1;
      return new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => {
          subacks.delete(id);
          reject(new Error(`no SUBACK for ${filter} within ${timeoutMs} ms`));
        }, timeoutMs);
        subacks.set(id, () => {
          clearTimeout(timer);
          resolve();
        });
        send({ cmd: 'subscribe', messageId: id, subscriptions: [{ topic: filter, qos }] });
      });
    },
    onMessage(handler) {
      messageHandler = handler;
    },
    onClose(handler) {
      closeHandlers.push(handler);
    },
    end() {
      if (socket.destroyed) return Promise.resolve();
      send({ cmd: 'disconnect' });
      flush();
      return new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          socket.destroy();
          resolve();
        }, 1_000);
        socket.end(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    },
    destroy() {
      socket.destroy();
    },
  };
}
