import { connect as netConnect, type Socket } from 'node:net';
import mqttPacket, { type Packet } from 'mqtt-packet';

/** Anything a test closes after each case; the raw connection adds its socket here. */
export interface Closable {
  close(): Promise<void> | void;
}

/** A raw MQTT 3.1.1 connection for byte-level assertions. */
export interface RawMqtt {
  socket: Socket;
  /** Packets received and not yet taken by `next`. */
  packets: Packet[];
  /** Takes the first packet of `cmd`, waiting for it up to `timeoutMs` (default 5000). */
  next(cmd: Packet['cmd'], timeoutMs?: number): Promise<Packet>;
  send(packet: Packet): void;
  write(bytes: Buffer): void;
  closed: Promise<void>;
  readonly isClosed: boolean;
}

export interface RawMqttOptions {
  /**
   * Drop bytes from the broker that do not parse instead of throwing from the socket's data
   * handler (which fails the run as an uncaught error). Off by default.
   */
  ignoreParseErrors?: boolean;
}

/** Connects to 127.0.0.1:`port`; the socket is pushed onto `running` for the test to destroy. */
export function connectRaw(
  port: number,
  running: Closable[],
  options: RawMqttOptions = {},
): Promise<RawMqtt> {
  return new Promise((resolve, reject) => {
    const socket = netConnect({ host: '127.0.0.1', port });
    const parser = mqttPacket.parser({ protocolVersion: 4 });
    const packets: Packet[] = [];
    const waiters: (() => void)[] = [];
    let isClosed = false;
    parser.on('packet', (p: Packet) => {
      packets.push(p);
      for (const w of waiters.splice(0)) w();
    });
    if (options.ignoreParseErrors) parser.on('error', () => {});
    socket.on('data', (d) => parser.parse(d));
    socket.on('error', () => {});
    const closed = new Promise<void>((r) =>
      socket.once('close', () => {
        isClosed = true;
        r();
      }),
    );
    running.push({ close: () => void socket.destroy() });
    socket.once('connect', () =>
      resolve({
        socket,
        packets,
        closed,
        get isClosed() {
          return isClosed;
        },
        send: (p) => socket.write(mqttPacket.generate(p)),
        write: (bytes) => socket.write(bytes),
        next: (cmd, timeoutMs = 5000) =>
          new Promise((res, rej) => {
            let settled = false;
            const timer = setTimeout(() => {
              settled = true;
              rej(new Error(`no ${cmd} within ${timeoutMs} ms`));
            }, timeoutMs);
            const check = () => {
              if (settled) return;
              const i = packets.findIndex((p) => p.cmd === cmd);
              if (i >= 0) {
                settled = true;
                clearTimeout(timer);
                res(packets.splice(i, 1)[0]!);
              } else waiters.push(check);
            };
            check();
          }),
      }),
    );
    socket.once('error', reject);
  });
}

/** An MQTT 3.1.1 CONNECT with a clean session and a 60 s keepalive; `extra` overrides any field. */
export function connectPacket(clientId: string, extra: Partial<mqttPacket.IConnectPacket> = {}): Packet {
  return {
    cmd: 'connect',
    protocolId: 'MQTT',
    protocolVersion: 4,
    clean: true,
    clientId,
    keepalive: 60,
    ...extra,
  };
}

/** Polls `check` every 10 ms; rejects after `timeoutMs` so a regression fails fast. */
export async function waitUntil(check: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 10));
  }
}
