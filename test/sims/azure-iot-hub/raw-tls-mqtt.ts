import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import mqttPacket, { type Packet } from 'mqtt-packet';

/** A raw MQTT 3.1.1 client over TLS, for byte-level tests of the simulator. */
export interface RawTlsMqtt {
  socket: TLSSocket;
  packets: Packet[];
  next(cmd: Packet['cmd'], timeoutMs?: number): Promise<Packet>;
  send(packet: Packet): void;
  closed: Promise<void>;
  readonly isClosed: boolean;
  close(): void;
}

export function connectRawTls(
  port: number,
  options: { ca: Buffer; cert?: Buffer; key?: Buffer },
): Promise<RawTlsMqtt> {
  return new Promise((resolve, reject) => {
    const socket = tlsConnect({
      host: '127.0.0.1',
      port,
      servername: 'localhost',
      ca: options.ca,
      ...(options.cert ? { cert: options.cert, key: options.key } : {}),
    });
    const parser = mqttPacket.parser({ protocolVersion: 4 });
    const packets: Packet[] = [];
    const waiters = new Set<() => void>();
    let isClosed = false;
    parser.on('packet', (p: Packet) => {
      packets.push(p);
      for (const w of [...waiters]) w();
    });
    socket.on('data', (d) => parser.parse(d));
    socket.on('error', () => {});
    const closed = new Promise<void>((r) =>
      socket.once('close', () => {
        isClosed = true;
        for (const w of [...waiters]) w();
        r();
      }),
    );
    socket.once('secureConnect', () =>
      resolve({
        socket,
        packets,
        closed,
        get isClosed() {
          return isClosed;
        },
        close: () => void socket.destroy(),
        send: (p) => void socket.write(mqttPacket.generate(p)),
        next: (cmd, timeoutMs = 5000) =>
          new Promise((res, rej) => {
            const timer = setTimeout(() => {
              waiters.delete(check);
              rej(new Error(`no ${cmd} within ${timeoutMs} ms`));
            }, timeoutMs);
            function check() {
              const i = packets.findIndex((p) => p.cmd === cmd);
              if (i >= 0) {
                clearTimeout(timer);
                waiters.delete(check);
                res(packets.splice(i, 1)[0]!);
              } else if (isClosed) {
                clearTimeout(timer);
                waiters.delete(check);
                rej(new Error(`the connection closed before ${cmd}`));
              }
            }
            waiters.add(check);
            check();
          }),
      }),
    );
    socket.once('error', reject);
  });
}
