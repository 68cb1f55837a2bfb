import { createServer, type Server, type Socket } from 'node:net';
import { createServer as createTlsServer, type TLSSocket, type TlsOptions } from 'node:tls';
import mqttPacket, {
  type IConnackPacket,
  type IConnectPacket,
  type IPublishPacket,
  type ISubscribePacket,
  type Packet,
} from 'mqtt-packet';

/**
 * How a scripted server answers. Each hook returns the reason code to send (3.1.1 return code
 * for CONNACK on a 3.1.1 connection), or `null` to stay silent.
 */
export interface ScriptedMqttBehaviour {
  connack?(connect: IConnectPacket): { code: number; properties?: IConnackPacket['properties'] } | null;
  puback?(publish: IPublishPacket): number | null;
  suback?(subscribe: ISubscribePacket): number[] | null;
  /** Listen with TLS (cert, key, ALPNProtocols, requestCert …) instead of plain TCP. */
  tls?: TlsOptions;
}

/** What the TLS handshake of one connection carried. */
export interface TlsHello {
  servername: string | false | null | undefined;
  alpnProtocol: string | false | null | undefined;
  /** CN of the client certificate, when one was sent */
  clientCn: string | undefined;
}

export interface ScriptedMqttServer {
  readonly port: number;
  /** Every CONNECT received, in order. */
  readonly connects: IConnectPacket[];
  readonly publishes: IPublishPacket[];
  /** One per TLS connection, in order. */
  readonly hellos: TlsHello[];
  /** Sends a PUBLISH to every connected client. */
  publishToAll(topic: string, payload: string, qos?: 0 | 1): void;
  /** Resets every open connection (a lost link). */
  dropAll(): void;
  close(): Promise<void>;
}

/**
 * A tiny MQTT 3.1.1/5 server on a loopback socket whose answers a test scripts: CONNACK and
 * PUBACK reason codes, silence, a cut. For the reason-code paths real brokers reach only by
 * policy (quota exceeded, payload format invalid) and the half-open cases.
 */
export async function startScriptedMqtt(behaviour: ScriptedMqttBehaviour = {}): Promise<ScriptedMqttServer> {
  const sockets = new Set<Socket>();
  const connects: IConnectPacket[] = [];
  const publishes: IPublishPacket[] = [];
  const hellos: TlsHello[] = [];
  const versions = new Map<Socket, number>();
  let nextId = 1;
  const send = (socket: Socket, packet: Packet) =>
    socket.write(mqttPacket.generate(packet, { protocolVersion: versions.get(socket) ?? 4 }));

  const onConnection = (socket: Socket) => {
    sockets.add(socket);
    if (behaviour.tls) {
      const tlsSocket = socket as TLSSocket;
      const cn = tlsSocket.getPeerCertificate().subject?.CN;
      hellos.push({
        servername: tlsSocket.servername,
        alpnProtocol: tlsSocket.alpnProtocol,
        clientCn: typeof cn === 'string' ? cn : undefined,
      });
    }
    socket.on('error', () => {});
    socket.on('close', () => sockets.delete(socket));
    const parser = mqttPacket.parser({ protocolVersion: 4 });
    parser.on('error', () => socket.destroy());
    socket.on('data', (d) => parser.parse(d));
    parser.on('packet', (packet: Packet) => {
      switch (packet.cmd) {
        case 'connect': {
          connects.push(packet);
          versions.set(socket, packet.protocolVersion ?? 4);
          const answer = behaviour.connack ? behaviour.connack(packet) : { code: 0 };
          if (answer === null) return;
          const v5 = packet.protocolVersion === 5;
          send(socket, {
            cmd: 'connack',
            sessionPresent: false,
            ...(v5
              ? { reasonCode: answer.code, properties: answer.properties }
              : { returnCode: answer.code }),
          });
          if (answer.code !== 0) socket.end();
          return;
        }
        case 'publish': {
          publishes.push(packet);
          if (packet.qos === 0) return;
          const code = behaviour.puback ? behaviour.puback(packet) : 0;
          if (code === null) return;
          send(socket, { cmd: 'puback', messageId: packet.messageId, reasonCode: code });
          return;
        }
        case 'subscribe': {
          const granted = behaviour.suback
            ? behaviour.suback(packet)
            : packet.subscriptions.map((s) => s.qos);
          if (granted === null) return;
          send(socket, { cmd: 'suback', messageId: packet.messageId, granted });
          return;
        }
        case 'pingreq':
          send(socket, { cmd: 'pingresp' });
          return;
        case 'disconnect':
          socket.end();
          return;
        default:
          return;
      }
    });
  };
  const server: Server = behaviour.tls
    ? (createTlsServer(behaviour.tls, onConnection) as unknown as Server)
    : createServer(onConnection);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as { port: number }).port,
    connects,
    publishes,
    hellos,
    publishToAll(topic, payload, qos = 0) {
      for (const socket of sockets) {
        send(socket, {
          cmd: 'publish',
          topic,
          payload: Buffer.from(payload),
          qos,
          retain: false,
          dup: false,
          ...(qos > 0 ? { messageId: nextId++ } : {}),
        });
      }
    },
    dropAll() {
      for (const socket of sockets) socket.resetAndDestroy();
    },
    close() {
      for (const socket of sockets) socket.destroy();
      return new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
