import { createServer, type TLSSocket } from 'node:tls';
import type { Socket } from 'node:net';
import mqttPacket, { type IPublishPacket, type ISubscribePacket, type Packet } from 'mqtt-packet';
import {
  createShadowService,
  type JsonObject,
  type ShadowService,
  type ShadowServiceOptions,
} from './shadow-service.js';

/**
 * A local AWS IoT Core data endpoint for tests: a TLS server written on mqtt-packet so that every
 * byte on the wire is ours to decide. Each rule cites cloud-protocols.md (§1.x). What it leaves
 * out: persistent sessions (cleanSession=0 is treated as clean), the in+out half of the publish
 * quota (only client → broker publishes are counted), WebSocket/HTTPS on 443, Basic Ingest rules.
 */

export interface AwsIotSimOptions {
  /** The data endpoint's host name: clients must send it as SNI (§1.1). */
  endpoint: string;
  /** Server certificate for `endpoint`, and the CA that signs the client certificates (mTLS). */
  cert: Buffer;
  key: Buffer;
  ca: Buffer;
  /** Port-443 mode: MQTT is spoken only to clients offering ALPN `x-amzn-mqtt-ca` (§1.1). */
  alpn443?: boolean;
  /** Client → broker publishes per second per connection (§1.2 quota table: 100). */
  publishRate?: number;
  /** Payload per PUBLISH (§1.2: 128 KB). */
  maxPayloadBytes?: number;
  /** Subscriptions per connection (§1.2: 50) and filters per SUBSCRIBE (8). */
  maxSubscriptions?: number;
  maxFiltersPerSubscribe?: number;
  /** Shadow requests in flight per connection before 429 (§1.3: 10). */
  shadowInflight?: number;
  /** How long the shadow service takes to answer, so that requests can be in flight. */
  shadowLatencyMs?: number;
  /** CONNECTs per client id: at most one per this many ms (§1.2: 1 s). */
  connectIntervalMs?: number;
  shadow?: ShadowServiceOptions;
}

export interface SimPublish {
  clientId: string;
  topic: string;
  payload: Buffer;
  qos: number;
  retain: boolean;
  /** performance.now() when the broker took it. */
  at: number;
}

export type SimEventType =
  | 'connected'
  | 'connect_refused'
  | 'connect_throttled'
  | 'kicked'
  | 'denied'
  | 'throttled'
  | 'qos2_ignored'
  | 'too_large'
  | 'subscribe_refused'
  | 'shadow_throttled'
  | 'closed'
  | 'tls_refused';

export interface SimEvent {
  type: SimEventType;
  clientId?: string;
  detail?: Record<string, unknown>;
}

export interface SimClient {
  clientId: string;
  protocolVersion: number;
  sni: string | false;
  alpn: string | false;
  subscriptions: string[];
}

export interface AwsIotSim {
  readonly host: string;
  readonly port: number;
  readonly endpoint: string;
  readonly shadows: ShadowService;
  /** Publications the broker accepted (not shadow requests), in arrival order. */
  readonly received: SimPublish[];
  /** Shadow requests the service took, in arrival order. */
  readonly shadowRequests: SimPublish[];
  readonly events: SimEvent[];
  clients(): SimClient[];
  /** The cloud publishes (a rule, another device, the console): delivered to subscribers. */
  publish(topic: string, payload: Buffer | string, options?: { qos?: 0 | 1; retain?: boolean }): void;
  /** A change made through the REST API or the console: publishes delta and documents. */
  updateShadow(thing: string, request: JsonObject, shadowName?: string): void;
  /** The policy denies publish and subscribe on topics matching `filter` (§1.2). */
  deny(filter: string): void;
  allow(filter: string): void;
  /** Closes every connection and refuses new ones until `outage(false)`. */
  outage(down: boolean): void;
  /** Closes one client's connection (administrative disconnect). */
  kick(clientId: string): void;
  /** Cuts every connection, as a network loss; new connections are taken. */
  dropConnections(): void;
  /** Withholds PUBACKs (the messages still arrive) until `releaseAcks`. */
  holdAcks(): void;
  releaseAcks(): void;
  /** Leaves CONNECTs unanswered until `releaseConnects`. */
  stallConnects(): void;
  releaseConnects(): void;
  waitFor<T>(probe: () => T | undefined | false, timeoutMs?: number, what?: string): Promise<T>;
  stop(): Promise<void>;
}

const ALPN_MQTT = 'x-amzn-mqtt-ca';

/** AWS matching: `+` one level, `#` the rest but not the parent itself (§1.2 deviation). */
export function awsTopicMatch(filter: string, topic: string): boolean {
  const f = filter.split('/');
  const t = topic.split('/');
  if (topic.startsWith('$') !== filter.startsWith('$')) return false;
  for (let i = 0; i < f.length; i++) {
    const level = f[i]!;
    if (level === '#') return t.length > i;
    if (i >= t.length) return false;
    if (level !== '+' && level !== t[i]) return false;
  }
  return f.length === t.length;
}

function levels(topic: string): number {
  const stripped = topic.replace(/^\$aws\/rules\/[^/]+\//, '');
  return stripped.split('/').length - 1;
}

/** Topic names a client may publish to (§1.2 "Topics and wildcards", §1.3, §1.4). */
function publishTopicProblem(topic: string): string | undefined {
  if (topic.length === 0 || Buffer.byteLength(topic) > 256) return 'topic length';
  if (levels(topic) > 7) return 'more than 7 slashes';
  if (/[+#]/.test(topic)) return 'wildcard in a topic name';
  if (topic.startsWith('$') && !/^\$aws\/(things\/[^/]+\/shadow\/|rules\/[^/]+\/)/.test(topic)) {
    return 'reserved topic';
  }
  return undefined;
}

function filterProblem(filter: string): string | undefined {
  if (filter.length === 0 || Buffer.byteLength(filter) > 256) return 'filter length';
  if (levels(filter) > 7) return 'more than 7 slashes';
  const parts = filter.split('/');
  for (let i = 0; i < parts.length; i++) {
    const p = parts[i]!;
    if (p.includes('#') && (p !== '#' || i !== parts.length - 1)) return 'misplaced #';
    if (p.includes('+') && p !== '+') return 'misplaced +';
  }
  if (filter.startsWith('$') && !filter.startsWith('$aws/')) return 'reserved filter';
  return undefined;
}

interface Conn {
  socket: TLSSocket;
  parser: ReturnType<typeof mqttPacket.parser>;
  clientId: string;
  protocolVersion: number;
  connected: boolean;
  subs: Map<string, number>;
  tokens: number;
  refilledAt: number;
  shadowInflight: number;
  nextId: number;
  keepaliveMs: number;
  lastSeen: number;
  keepaliveTimer: NodeJS.Timeout | undefined;
}

export async function startAwsIotSim(options: AwsIotSimOptions): Promise<AwsIotSim> {
  const rate = options.publishRate ?? 100;
  const maxPayload = options.maxPayloadBytes ?? 128 * 1024;
  const maxSubs = options.maxSubscriptions ?? 50;
  const maxFilters = options.maxFiltersPerSubscribe ?? 8;
  const shadowInflight = options.shadowInflight ?? 10;
  const shadowLatency = options.shadowLatencyMs ?? 2;
  const connectInterval = options.connectIntervalMs ?? 1000;
  const shadows = createShadowService(options.shadow);
  const received: SimPublish[] = [];
  const shadowRequests: SimPublish[] = [];
  const events: SimEvent[] = [];
  const conns = new Set<Conn>();
  const byClientId = new Map<string, Conn>();
  const lastConnect = new Map<string, number>();
  const retained = new Map<string, SimPublish>();
  const denied = new Set<string>();
  const sockets = new Set<Socket>();
  const timers = new Set<NodeJS.Timeout>();
  let down = false;
  let stopped = false;
  let holding = false;
  const heldAcks: (() => void)[] = [];
  let stalling = false;
  const heldConnects: (() => void)[] = [];

  const server = createServer({
    cert: options.cert,
    key: options.key,
    ca: options.ca,
    requestCert: true,
    rejectUnauthorized: true,
    minVersion: 'TLSv1.2',
    ALPNCallback: ({ protocols }) => {
      // 443 dispatches by ALPN (§1.1): only x-amzn-mqtt-ca reaches the MQTT broker here.
      if (options.alpn443) return protocols.includes(ALPN_MQTT) ? ALPN_MQTT : undefined;
      return protocols.includes(ALPN_MQTT) ? ALPN_MQTT : protocols[0];
    },
  });
  server.on('connection', (socket: Socket) => {
    if (down) {
      socket.destroy();
      return;
    }
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  });
  server.on('tlsClientError', (err) => {
    events.push({ type: 'tls_refused', detail: { error: err.message } });
  });
  server.on('secureConnection', (socket: TLSSocket) => onSecure(socket));

  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : 0;

  function send(conn: Conn, packet: Packet): void {
    if (conn.socket.destroyed) return;
    conn.socket.write(mqttPacket.generate(packet, { protocolVersion: conn.protocolVersion }));
  }

  function close(conn: Conn, reason: string, disconnectCode?: number): void {
    if (disconnectCode !== undefined && conn.protocolVersion === 5 && conn.connected) {
      send(conn, { cmd: 'disconnect', reasonCode: disconnectCode });
    }
    events.push({ type: 'closed', clientId: conn.clientId, detail: { reason } });
    // end() lets the DISCONNECT out; destroy() bounds a peer that never reads.
    conn.socket.end();
    const t = setTimeout(() => conn.socket.destroy(), 200);
    t.unref();
  }

  function isDenied(topic: string): boolean {
    for (const f of denied) if (awsTopicMatch(f, topic)) return true;
    return false;
  }

  /** Delivers to every matching subscription (§1.2); outbound QoS is the lower of the two. */
  function deliver(topic: string, payload: Buffer, qos: number, retain = false): void {
    for (const c of conns) {
      if (!c.connected) continue;
      let granted = -1;
      for (const [filter, q] of c.subs) if (awsTopicMatch(filter, topic)) granted = Math.max(granted, q);
      if (granted < 0) continue;
      const q = Math.min(granted, qos) as 0 | 1;
      const packet: IPublishPacket = { cmd: 'publish', topic, payload, qos: q, retain, dup: false };
      if (q > 0) {
        c.nextId = (c.nextId % 65535) + 1;
        packet.messageId = c.nextId;
      }
      send(c, packet);
    }
  }

  function respondShadow(responses: { topic: string; body: JsonObject }[]): void {
    for (const r of responses) deliver(r.topic, Buffer.from(JSON.stringify(r.body)), 1);
  }

  function onSecure(socket: TLSSocket): void {
    const sni = socket.servername ?? false;
    const alpn = socket.alpnProtocol ?? false;
    // SNI is required and must name the endpoint (§1.1 "The client must send SNI").
    if (down || !sni || sni !== options.endpoint || (options.alpn443 && alpn !== ALPN_MQTT)) {
      events.push({ type: 'tls_refused', detail: { sni, alpn } });
      socket.destroy();
      return;
    }
    const parser = mqttPacket.parser({ protocolVersion: 4 });
    const conn: Conn = {
      socket,
      parser,
      clientId: '',
      protocolVersion: 4,
      connected: false,
      subs: new Map(),
      tokens: rate,
      refilledAt: performance.now(),
      shadowInflight: 0,
      nextId: 0,
      keepaliveMs: 0,
      lastSeen: performance.now(),
      keepaliveTimer: undefined,
    };
    conns.add(conn);
    (conn as Conn & { sni: string | false; alpn: string | false }).sni = sni;
    (conn as Conn & { sni: string | false; alpn: string | false }).alpn = alpn;
    parser.on('packet', (packet: Packet) => {
      conn.lastSeen = performance.now();
      try {
        onPacket(conn, packet);
      } catch (err) {
        close(conn, `handler failed: ${(err as Error).message}`);
      }
    });
    parser.on('error', () => close(conn, 'malformed packet', 0x81));
    socket.on('data', (d: Buffer) => parser.parse(d));
    socket.on('error', () => {});
    socket.once('close', () => {
      conns.delete(conn);
      clearInterval(conn.keepaliveTimer);
      if (byClientId.get(conn.clientId) === conn) byClientId.delete(conn.clientId);
    });
  }

  function onConnect(conn: Conn, packet: Packet & { cmd: 'connect' }): void {
    conn.protocolVersion = packet.protocolVersion ?? 4;
    const v5 = conn.protocolVersion === 5;
    const id = packet.clientId ?? '';
    const refuse = (v4Code: number, v5Code: number, why: string) => {
      events.push({ type: 'connect_refused', clientId: id, detail: { why } });
      send(conn, {
        cmd: 'connack',
        sessionPresent: false,
        ...(v5 ? { reasonCode: v5Code } : { returnCode: v4Code }),
      });
      close(conn, why);
    };
    // Client id rules (§1.2): at most 128 bytes, `$` reserved.
    if (Buffer.byteLength(id) > 128 || id.startsWith('$') || (id.length === 0 && !v5)) {
      refuse(2, 0x85, 'client identifier not valid');
      return;
    }
    const clientId = id.length === 0 ? `sim-${Math.random().toString(16).slice(2, 10)}` : id;
    // One CONNECT per second per client id (§1.2).
    const now = performance.now();
    const last = lastConnect.get(clientId);
    lastConnect.set(clientId, now);
    if (last !== undefined && now - last < connectInterval) {
      events.push({ type: 'connect_throttled', clientId });
      if (v5) refuse(3, 0x97, 'connect rate per client id exceeded');
      else close(conn, 'connect rate per client id exceeded');
      return;
    }
    if (isDenied(`client/${clientId}`)) {
      if (v5) refuse(5, 0x87, 'policy denies connect');
      else close(conn, 'policy denies connect');
      return;
    }
    conn.clientId = clientId;
    // A second connection with the same client id takes over; the older one goes (§1.2).
    const older = byClientId.get(clientId);
    if (older && older !== conn) {
      events.push({ type: 'kicked', clientId });
      close(older, 'session taken over', 0x8e);
    }
    byClientId.set(clientId, conn);
    conn.connected = true;
    // Keep-alive 1–29 → 30, 0 or > 1200 → 1200; the broker waits 1.5 × (§1.2).
    const asked = packet.keepalive ?? 0;
    const keepalive = asked === 0 || asked > 1200 ? 1200 : Math.max(30, asked);
    conn.keepaliveMs = keepalive * 1500;
    conn.keepaliveTimer = setInterval(() => {
      if (performance.now() - conn.lastSeen > conn.keepaliveMs) close(conn, 'keep-alive timeout', 0x8d);
    }, 1000);
    conn.keepaliveTimer.unref();
    send(conn, {
      cmd: 'connack',
      sessionPresent: false,
      ...(v5
        ? {
            reasonCode: 0,
            properties: {
              maximumQoS: 1,
              retainAvailable: true,
              receiveMaximum: 100,
              topicAliasMaximum: 8,
              subscriptionIdentifiersAvailable: false,
              sharedSubscriptionAvailable: true,
              ...(id.length === 0 ? { assignedClientIdentifier: clientId } : {}),
              ...(asked !== keepalive ? { serverKeepAlive: keepalive } : {}),
            },
          }
        : { returnCode: 0 }),
    });
    events.push({ type: 'connected', clientId, detail: { protocolVersion: conn.protocolVersion } });
  }

  /** The per-connection publish quota as a token bucket of one second's worth. */
  function takeToken(conn: Conn): boolean {
    const now = performance.now();
    conn.tokens = Math.min(rate, conn.tokens + ((now - conn.refilledAt) * rate) / 1000);
    conn.refilledAt = now;
    if (conn.tokens < 1) return false;
    conn.tokens -= 1;
    return true;
  }

  function onPublish(conn: Conn, packet: IPublishPacket): void {
    const v5 = conn.protocolVersion === 5;
    const payload = Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload);
    const puback = (reasonCode: number) => {
      if (packet.qos === 1) {
        send(conn, { cmd: 'puback', messageId: packet.messageId, ...(v5 ? { reasonCode } : {}) });
      }
    };
    // QoS 2 is not supported: no PUBACK, no PUBREC (§1.2 QoS).
    if (packet.qos === 2) {
      events.push({ type: 'qos2_ignored', clientId: conn.clientId, detail: { topic: packet.topic } });
      return;
    }
    // Larger than 128 KB is rejected (§1.2 quota table).
    if (payload.length > maxPayload) {
      events.push({ type: 'too_large', clientId: conn.clientId, detail: { bytes: payload.length } });
      close(conn, 'payload too large', 0x95);
      return;
    }
    const problem = publishTopicProblem(packet.topic);
    if (problem !== undefined || (packet.retain && packet.topic.startsWith('$'))) {
      events.push({ type: 'denied', clientId: conn.clientId, detail: { topic: packet.topic, problem } });
      if (v5) puback(0x90);
      else close(conn, 'topic name invalid');
      return;
    }
    // A denied publish: 3.1.1 has no NACK, so the connection closes without PUBACK (§1.2).
    if (isDenied(packet.topic)) {
      events.push({ type: 'denied', clientId: conn.clientId, detail: { topic: packet.topic } });
      if (v5) puback(0x87);
      else close(conn, 'policy denies publish');
      return;
    }
    // 100 publishes/s per connection; the excess is discarded (§1.2), 0x97 on MQTT 5.
    if (!takeToken(conn)) {
      events.push({ type: 'throttled', clientId: conn.clientId, detail: { topic: packet.topic } });
      if (v5) puback(0x97);
      return;
    }
    const message: SimPublish = {
      clientId: conn.clientId,
      topic: packet.topic,
      payload,
      qos: packet.qos,
      retain: packet.retain,
      at: performance.now(),
    };
    if (holding) heldAcks.push(() => puback(0));
    else puback(0);
    if (shadows.isRequest(packet.topic)) {
      shadowRequests.push(message);
      // More than 10 requests in flight on one connection: 429 (§1.3 error codes).
      if (conn.shadowInflight >= shadowInflight) {
        events.push({ type: 'shadow_throttled', clientId: conn.clientId, detail: { topic: packet.topic } });
        respondShadow(shadows.reject(packet.topic, payload, 429, 'Too Many Requests'));
        return;
      }
      conn.shadowInflight++;
      const t = setTimeout(() => {
        timers.delete(t);
        conn.shadowInflight--;
        respondShadow(shadows.handle(packet.topic, payload));
      }, shadowLatency);
      timers.add(t);
      return;
    }
    received.push(message);
    if (packet.retain) {
      if (payload.length === 0) retained.delete(packet.topic);
      else retained.set(packet.topic, message);
    }
    deliver(packet.topic, payload, packet.qos);
  }

  function onSubscribe(conn: Conn, packet: ISubscribePacket): void {
    const v5 = conn.protocolVersion === 5;
    if (packet.subscriptions.length > maxFilters) {
      events.push({
        type: 'subscribe_refused',
        clientId: conn.clientId,
        detail: { filters: packet.subscriptions.length },
      });
      close(conn, 'too many filters in one SUBSCRIBE', 0x97);
      return;
    }
    // QoS 2 SUBSCRIBE is not supported: no SUBACK (§1.2 QoS).
    if (packet.subscriptions.some((s) => s.qos === 2)) {
      events.push({ type: 'qos2_ignored', clientId: conn.clientId, detail: { subscribe: true } });
      return;
    }
    const granted: number[] = [];
    const retainedOut: SimPublish[] = [];
    for (const sub of packet.subscriptions) {
      const problem = filterProblem(sub.topic);
      if (problem !== undefined) {
        granted.push(v5 ? 0x8f : 0x80);
        events.push({
          type: 'subscribe_refused',
          clientId: conn.clientId,
          detail: { filter: sub.topic, problem },
        });
        continue;
      }
      if (isDenied(sub.topic)) {
        events.push({ type: 'denied', clientId: conn.clientId, detail: { filter: sub.topic } });
        if (!v5) {
          close(conn, 'policy denies subscribe');
          return;
        }
        granted.push(0x87);
        continue;
      }
      if (!conn.subs.has(sub.topic) && conn.subs.size >= maxSubs) {
        events.push({
          type: 'subscribe_refused',
          clientId: conn.clientId,
          detail: { filter: sub.topic, limit: maxSubs },
        });
        granted.push(v5 ? 0x97 : 0x80);
        continue;
      }
      conn.subs.set(sub.topic, sub.qos);
      granted.push(sub.qos);
      // Only an exact-topic subscription gets the retained message (§1.2 retained deviation).
      if (!/[+#]/.test(sub.topic)) {
        const r = retained.get(sub.topic);
        if (r) retainedOut.push(r);
      }
    }
    send(conn, {
      cmd: 'suback',
      messageId: packet.messageId,
      granted,
      ...(v5 ? { reasonCode: 0 } : {}),
    } as Packet);
    for (const r of retainedOut) {
      send(conn, {
        cmd: 'publish',
        topic: r.topic,
        payload: r.payload,
        qos: 0,
        retain: true,
        dup: false,
      });
    }
  }

  function onPacket(conn: Conn, packet: Packet): void {
    if (packet.cmd === 'connect') {
      if (conn.connected) {
        close(conn, 'second CONNECT', 0x82);
        return;
      }
      if (stalling) heldConnects.push(() => !conn.socket.destroyed && onConnect(conn, packet));
      else onConnect(conn, packet);
      return;
    }
    if (!conn.connected) {
      close(conn, 'packet before CONNECT');
      return;
    }
    switch (packet.cmd) {
      case 'publish':
        onPublish(conn, packet);
        return;
      case 'subscribe':
        onSubscribe(conn, packet);
        return;
      case 'unsubscribe':
        for (const t of packet.unsubscriptions) conn.subs.delete(t);
        send(conn, {
          cmd: 'unsuback',
          messageId: packet.messageId,
          ...(conn.protocolVersion === 5 ? { granted: packet.unsubscriptions.map(() => 0) } : {}),
        } as Packet);
        return;
      case 'pingreq':
        send(conn, { cmd: 'pingresp' });
        return;
      case 'puback':
        return;
      case 'disconnect':
        conn.connected = false;
        conn.socket.end();
        return;
      default:
        // PUBREC/PUBREL/PUBCOMP and AUTH are not supported (§1.2).
        close(conn, `unsupported ${packet.cmd}`, 0x82);
    }
  }

  return {
    host: '127.0.0.1',
    port,
    endpoint: options.endpoint,
    shadows,
    received,
    shadowRequests,
    events,
    clients() {
      return [...conns]
        .filter((c) => c.connected && !c.socket.destroyed)
        .map((c) => {
          const extra = c as Conn & { sni: string | false; alpn: string | false };
          return {
            clientId: c.clientId,
            protocolVersion: c.protocolVersion,
            sni: extra.sni,
            alpn: extra.alpn,
            subscriptions: [...c.subs.keys()],
          };
        });
    },
    publish(topic, payload, opts = {}) {
      const body = typeof payload === 'string' ? Buffer.from(payload) : payload;
      if (opts.retain)
        retained.set(topic, {
          clientId: '',
          topic,
          payload: body,
          qos: opts.qos ?? 0,
          retain: true,
          at: performance.now(),
        });
      deliver(topic, body, opts.qos ?? 1);
    },
    updateShadow(thing, request, shadowName) {
      const out = shadows.update(thing, shadowName, request);
      if (out.length === 0) throw new Error(`the shadow service refused the update of ${thing}`);
      respondShadow(out);
    },
    deny(filter) {
      denied.add(filter);
    },
    allow(filter) {
      denied.delete(filter);
    },
    outage(isDown) {
      down = isDown;
      if (isDown) for (const s of sockets) s.destroy();
    },
    dropConnections() {
      for (const s of sockets) s.destroy();
    },
    holdAcks() {
      holding = true;
    },
    releaseAcks() {
      holding = false;
      for (const ack of heldAcks.splice(0)) ack();
    },
    stallConnects() {
      stalling = true;
    },
    releaseConnects() {
      stalling = false;
      for (const c of heldConnects.splice(0)) c();
    },
    kick(clientId) {
      const c = byClientId.get(clientId);
      if (c) close(c, 'administrative action', 0x98);
    },
    async waitFor(probe, timeoutMs = 20_000, what = 'condition') {
      const deadline = performance.now() + timeoutMs;
      for (;;) {
        const v = probe();
        if (v !== undefined && v !== false) return v;
        if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      for (const t of timers) clearTimeout(t);
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
