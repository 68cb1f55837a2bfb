import { connect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import mqttPacket, { type Packet } from 'mqtt-packet';

/** A byte-level MQTT client over TLS, to test the simulator without trusting mqtt.js. */
export interface RawTlsMqtt {
  socket: TLSSocket;
  packets: Packet[];
  /** Takes the first packet of `cmd` (and matching `where`), waiting up to `timeoutMs`. */
  next(cmd: Packet['cmd'], timeoutMs?: number, where?: (p: Packet) => boolean): Promise<Packet>;
  send(...packets: Packet[]): void;
  closed: Promise<void>;
  readonly isClosed: boolean;
  close(): void;
}

export function rawTlsConnect(
  port: number,
  tls: ConnectionOptions,
  protocolVersion: 4 | 5 = 5,
): Promise<RawTlsMqtt> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: '127.0.0.1', port, ...tls });
    const parser = mqttPacket.parser({ protocolVersion });
    const packets: Packet[] = [];
    const waiters: (() => void)[] = [];
    let isClosed = false;
    parser.on('packet', (p: Packet) => {
      packets.push(p);
      for (const w of waiters.splice(0)) w();
    });
    parser.on('error', () => {});
    socket.on('data', (d: Buffer) => parser.parse(d));
    const closed = new Promise<void>((r) =>
      socket.once('close', () => {
        isClosed = true;
        for (const w of waiters.splice(0)) w();
        r();
      }),
    );
    socket.once('error', (err) => reject(err));
    socket.once('secureConnect', () =>
      resolve({
        socket,
        packets,
        closed,
        get isClosed() {
          return isClosed;
        },
        send(...out) {
          socket.write(Buffer.concat(out.map((p) => mqttPacket.generate(p, { protocolVersion }))));
        },
        close() {
          socket.destroy();
        },
        next(cmd, timeoutMs = 10_000, where = () => true) {
          return new Promise((res, rej) => {
            const timer = setTimeout(() => rej(new Error(`no ${cmd} within ${timeoutMs} ms`)), timeoutMs);
            const look = () => {
              const i = packets.findIndex((p) => p.cmd === cmd && where(p));
              if (i >= 0) {
                clearTimeout(timer);
                res(packets.splice(i, 1)[0]!);
                return;
              }
              if (isClosed) {
                clearTimeout(timer);
                rej(new Error(`connection closed before ${cmd}`));
                return;
              }
              waiters.push(look);
            };
            look();
          });
        },
      }),
    );
  });
}
