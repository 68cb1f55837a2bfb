import { createHash, createHmac, timingSafeEqual } from 'node:crypto';
import { createServer as createHttpsServer, type Server as HttpsServer } from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { createServer as createTlsServer, type Server as TlsServer, type TLSSocket } from 'node:tls';
import type { AddressInfo } from 'node:net';
import mqttPacket, {
  type IConnectPacket,
  type IPublishPacket,
  type ISubscribePacket,
  type Packet,
} from 'mqtt-packet';
import { applyPatch, createTwin, deviceTwinBody, type JsonObject, type Twin } from './twin-store.js';

/**
 * A local Azure IoT Hub for tests: the device side over MQTT 3.1.1 on TLS, and the service REST
 * API's twin query over HTTPS, both on 127.0.0.1 port 0. Behaviour follows
 * /work/shared/docs/cloud-protocols.md §2 (section numbers in the comments); it checks SAS tokens
 * the way the hub does, on its own code, so it does not trust the provider's signing.
 */
export interface AzureHubSimOptions {
  /** TLS certificate and key of the hub (for localhost / 127.0.0.1), and the CA of client certs. */
  tls: { cert: Buffer; key: Buffer; ca?: Buffer };
  /** The hub's host name as the tokens and usernames must name it. Default `localhost`. */
  hostName?: string;
  /** Close the connection on a publish to an undocumented topic (§2.3 "Sim:"). Default true. */
  closeOnUndocumentedPublish?: boolean;
  /** Refuse a username without `api-version=`. Default false (the hub is lenient, §2.1). */
  requireApiVersion?: boolean;
}

export type DeviceAuth =
  { primaryKey: string; secondaryKey?: string } | { x509: 'ca' } | { x509: { thumbprint: string } };

export type PolicyRight = 'DeviceConnect' | 'RegistryRead' | 'ServiceConnect' | 'RegistryWrite';

export interface TelemetryRecord {
  deviceId: string;
  topic: string;
  /** Decoded property bag, `$.`-system properties included. */
  properties: Record<string, string | null>;
  payload: Buffer;
  qos: number;
}

export interface SimEvent {
  type:
    | 'connected'
    | 'refused'
    | 'kicked'
    | 'token_expired'
    | 'closed_qos2'
    | 'closed_topic'
    | 'closed_subscription'
    | 'closed_too_large'
    | 'throttled'
    | 'keepalive_timeout'
    | 'disconnected';
  deviceId: string;
  /** The hub's error code (429002, 400027, 404104 …) or CONNACK return code. */
  code?: number;
  detail?: string;
}

export interface MethodResult {
  status: number;
  payload: unknown;
}

export interface ServiceRequest {
  method: string;
  path: string;
  headers: IncomingMessage['headers'];
  status: number;
}

export interface AzureHubSim {
  readonly hostName: string;
  readonly port: number;
  /** Port of the HTTPS service API. */
  readonly servicePort: number;
  addDevice(deviceId: string, auth: DeviceAuth): void;
  addPolicy(name: string, key: string, rights: PolicyRight[]): void;
  /** Every telemetry message the hub acknowledged, in order. */
  readonly telemetry: TelemetryRecord[];
  readonly events: SimEvent[];
  readonly serviceRequests: ServiceRequest[];
  /** Device ids with an open, authenticated connection. */
  connectedDevices(): string[];
  /** Open authenticated connections (each device has at most one). */
  connectionCount(): number;
  /** CONNECTs accepted so far, per device. */
  connectsOf(deviceId: string): number;
  twin(deviceId: string): Twin;
  /** A back-end desired update; notifies the device when it subscribed. Returns the new version. */
  updateDesired(deviceId: string, patch: JsonObject): number;
  /** Queues a C2D message (at most 50 pending per device, §2.4); delivered when subscribed. */
  sendC2d(deviceId: string, payload: Buffer | string, properties?: Record<string, string | null>): void;
  /** C2D messages not yet acknowledged by the device. */
  pendingC2d(deviceId: string): number;
  /** Invokes a direct method; rejects when the device is not subscribed (404) or on timeout (504). */
  invokeMethod(
    deviceId: string,
    name: string,
    payload: unknown,
    options?: { timeoutMs?: number },
  ): Promise<MethodResult>;
  /** Withhold telemetry PUBACKs (the messages still count as received) until `holdAcks(false)`. */
  holdAcks(on: boolean): void;
  /** Hub outage: every connection closes and new ones are refused until `outage(false)`. */
  outage(on: boolean): void;
  /**
   * Throttle one device (§2.4): a telemetry publish closes its connection (429002), a twin request
   * is answered 429. For `forMs`, or for the next `publishes` telemetry publishes.
   */
  throttle(deviceId: string, options: { forMs?: number; publishes?: number }): void;
  /** Connections beyond `perSecond` new ones in a second get CONNACK 3 (server unavailable). */
  limitConnects(perSecond: number | undefined): void;
  /** Closes the device's connection as the hub does on a duplicate (400027). */
  kick(deviceId: string): void;
  /** Refuse (true) or allow again the device's CONNECTs with CONNACK 5. */
  deny(deviceId: string, on: boolean): void;
  /** The next `count` service API requests get 429 with Retry-After. */
  throttleService(count: number): void;
  /** Resolves when `predicate` holds, checking after every change; rejects after `timeoutMs`. */
  waitFor(predicate: () => boolean, timeoutMs?: number, what?: string): Promise<void>;
  close(): Promise<void>;
}

interface Connection {
  socket: TLSSocket;
  deviceId: string | undefined;
  authenticated: boolean;
  subscriptions: Set<string>;
  nextPacketId: number;
  /** C2D packet id → queue entry, until PUBACK completes it (§2.3). */
  c2dInFlight: Map<number, C2dMessage>;
  timers: NodeJS.Timeout[];
  keepaliveMs: number;
  keepaliveTimer: NodeJS.Timeout | undefined;
  closed: boolean;
}

interface C2dMessage {
  id: string;
  payload: Buffer;
  properties: Record<string, string | null>;
  sent: boolean;
}

interface DeviceRecord {
  auth: DeviceAuth;
  twin: Twin;
  c2d: C2dMessage[];
  connects: number;
  denied: boolean;
  throttledUntil: number;
  throttledPublishes: number;
}

const API_VERSION = '2021-04-12';
/** §2.4 */
const D2C_MAX_BYTES = 256 * 1024;
const C2D_MAX_PENDING = 50;
/** §2.1: the server's keep-alive timeout is 1.5 × the client's, capped at 1767 s. */
const KEEPALIVE_CAP_MS = 1767_000;
/** §2.3: five subscriptions at a time. */
const MAX_SUBSCRIPTIONS = 5;
const METHOD_DEFAULT_TIMEOUT_MS = 30_000;

export async function createAzureHubSim(options: AzureHubSimOptions): Promise<AzureHubSim> {
  const hostName = options.hostName ?? 'localhost';
  const closeOnUndocumented = options.closeOnUndocumentedPublish ?? true;
  const devices = new Map<string, DeviceRecord>();
  const policies = new Map<string, { key: string; rights: Set<PolicyRight> }>();
  const live = new Map<string, Connection>();
  const sockets = new Set<TLSSocket>();
  const telemetry: TelemetryRecord[] = [];
  const events: SimEvent[] = [];
  const serviceRequests: ServiceRequest[] = [];
  const watchers = new Set<() => void>();
  const methodWaiters = new Map<string, (result: MethodResult) => void>();
  let down = false;
  let connectLimit: number | undefined;
  let connectWindow = { start: 0, count: 0 };
  let serviceThrottle = 0;
  let holding = false;
  const heldAcks: (() => void)[] = [];
  let ridSeq = 0;
  let c2dSeq = 0;

  const changed = () => {
    for (const w of [...watchers]) w();
  };
  const event = (e: SimEvent) => {
    events.push(e);
    changed();
  };

  const send = (conn: Connection, packet: Packet) => {
    if (!conn.closed) conn.socket.write(mqttPacket.generate(packet));
  };

  function close(conn: Connection, why?: SimEvent) {
    if (conn.closed) return;
    conn.closed = true;
    for (const t of conn.timers) clearTimeout(t);
    clearTimeout(conn.keepaliveTimer);
    if (why) event(why);
    conn.socket.destroy();
  }

  function onClosed(conn: Connection) {
    conn.closed = true;
    for (const t of conn.timers) clearTimeout(t);
    clearTimeout(conn.keepaliveTimer);
    if (conn.deviceId !== undefined && live.get(conn.deviceId) === conn) {
      live.delete(conn.deviceId);
      // C2D messages sent but not acknowledged are delivered again (PUBACK completes them).
      const record = devices.get(conn.deviceId);
      if (record) for (const m of conn.c2dInFlight.values()) m.sent = false;
      event({ type: 'disconnected', deviceId: conn.deviceId });
    }
  }

  function keepaliveReset(conn: Connection) {
    if (conn.keepaliveMs === 0) return;
    clearTimeout(conn.keepaliveTimer);
    conn.keepaliveTimer = setTimeout(
      () => close(conn, { type: 'keepalive_timeout', deviceId: conn.deviceId ?? '', code: 404104 }),
      conn.keepaliveMs,
    );
    conn.keepaliveTimer.unref();
  }

  // §2.2 "Sim:" — the raw `sr` is signed as received; the decoded `sr` must cover the device's
  // resource by path segment, case-insensitively; an expired `se` is refused.
  function verifySas(
    password: string,
    deviceId: string,
  ): { ok: true; expiresAt: number } | { ok: false; why: string } {
    const prefix = 'SharedAccessSignature ';
    if (!password.startsWith(prefix)) return { ok: false, why: 'not a SharedAccessSignature' };
    const fields = new Map<string, string>();
    for (const part of password.slice(prefix.length).split('&')) {
      const eq = part.indexOf('=');
      if (eq <= 0) return { ok: false, why: 'malformed token field' };
      fields.set(part.slice(0, eq), part.slice(eq + 1));
    }
    const sr = fields.get('sr');
    const sig = fields.get('sig');
    const se = fields.get('se');
    const skn = fields.get('skn');
    if (sr === undefined || sig === undefined || se === undefined)
      return { ok: false, why: 'sr, sig or se missing' };
    if (!/^\d+$/.test(se)) return { ok: false, why: 'se is not a number' };
    const expiresAt = Number(se);
    if (expiresAt * 1000 <= Date.now()) return { ok: false, why: 'token expired' };
    let resource: string;
    let signature: Buffer;
    try {
      resource = decodeURIComponent(sr).toLowerCase();
      signature = Buffer.from(decodeURIComponent(sig), 'base64');
    } catch {
      return { ok: false, why: 'bad percent-encoding' };
    }
    const target = `${hostName}/devices/${deviceId}`.toLowerCase().split('/');
    const covered = resource.replace(/\/+$/, '').split('/');
    if (covered.length > target.length || covered.some((seg, i) => seg !== target[i])) {
      return { ok: false, why: `sr ${resource} does not cover ${target.join('/')}` };
    }
    let keys: string[];
    if (skn !== undefined) {
      const policy = policies.get(decodeURIComponent(skn));
      if (!policy) return { ok: false, why: `no policy ${skn}` };
      if (!policy.rights.has('DeviceConnect')) return { ok: false, why: `policy ${skn} lacks DeviceConnect` };
      keys = [policy.key];
    } else {
      const auth = devices.get(deviceId)?.auth;
      if (!auth || !('primaryKey' in auth)) return { ok: false, why: 'the device has no symmetric key' };
      keys = [auth.primaryKey, ...(auth.secondaryKey ? [auth.secondaryKey] : [])];
    }
    for (const key of keys) {
      const expected = createHmac('sha256', Buffer.from(key, 'base64'))
        .update(`${sr}\n${se}`, 'utf8')
        .digest();
      if (expected.length === signature.length && timingSafeEqual(expected, signature))
        return { ok: true, expiresAt };
    }
    return { ok: false, why: 'signature mismatch' };
  }

  function refuse(conn: Connection, deviceId: string, returnCode: number, why: string) {
    send(conn, { cmd: 'connack', returnCode, sessionPresent: false });
    event({ type: 'refused', deviceId, code: returnCode, detail: why });
    // The hub closes the socket after a refused CONNACK.
    setImmediate(() => close(conn));
  }

  function onConnect(conn: Connection, packet: IConnectPacket) {
    const deviceId = packet.clientId;
    conn.deviceId = deviceId;
    // §2.1: MQTT 3.1.1 only; the bridge bit (0x84) is refused as an unacceptable version (§2.3).
    const level = packet.protocolVersion as number;
    if (level !== 4 || (packet as IConnectPacket & { bridgeMode?: boolean }).bridgeMode) {
      return refuse(conn, deviceId, 1, `protocol level ${level}`);
    }
    if (down) return refuse(conn, deviceId, 3, 'outage');
    if (connectLimit !== undefined) {
      const now = Date.now();
      if (now - connectWindow.start >= 1000) connectWindow = { start: now, count: 0 };
      if (++connectWindow.count > connectLimit) return refuse(conn, deviceId, 3, 'connection throttle');
    }
    const record = devices.get(deviceId);
    if (!record) return refuse(conn, deviceId, 5, 'unknown device');
    if (record.denied) return refuse(conn, deviceId, 5, 'denied by the test');
    // §2.1 username: `{host}/{deviceId}/` then an optional `?` and `&`-separated parameters.
    const username = packet.username ?? '';
    const expectedPrefix = `${hostName}/${deviceId}/`;
    if (!username.startsWith(expectedPrefix)) return refuse(conn, deviceId, 5, `username ${username}`);
    const query = username.slice(expectedPrefix.length).replace(/^\?/, '');
    if (options.requireApiVersion && !query.split('&').includes(`api-version=${API_VERSION}`)) {
      return refuse(conn, deviceId, 5, 'api-version missing');
    }
    let expiresAt: number | undefined;
    if ('x509' in record.auth) {
      const cert = conn.socket.getPeerCertificate();
      if (!cert || Object.keys(cert).length === 0) return refuse(conn, deviceId, 5, 'no client certificate');
      if (record.auth.x509 === 'ca') {
        // §2.2 X.509 CA-signed: a chain to the registered CA and CN = deviceId.
        if (!conn.socket.authorized) return refuse(conn, deviceId, 5, 'certificate not signed by the CA');
        if (cert.subject.CN !== deviceId)
          return refuse(conn, deviceId, 5, `certificate CN ${cert.subject.CN}`);
      } else {
        const thumb = createHash('sha1').update(cert.raw).digest('hex');
        const want = record.auth.x509.thumbprint.toLowerCase().replace(/:/g, '');
        if (thumb !== want) return refuse(conn, deviceId, 5, 'thumbprint mismatch');
      }
    } else {
      const verdict = verifySas(packet.password?.toString('utf8') ?? '', deviceId);
      if (!verdict.ok) return refuse(conn, deviceId, 5, verdict.why);
      expiresAt = verdict.expiresAt;
    }

    // §2.1: one connection per device; a new one drops the old (400027).
    const previous = live.get(deviceId);
    if (previous) close(previous, { type: 'kicked', deviceId, code: 400027 });
    live.set(deviceId, conn);
    conn.authenticated = true;
    record.connects++;
    const keepalive = packet.keepalive ?? 0;
    conn.keepaliveMs = keepalive === 0 ? 0 : Math.min(keepalive * 1500, KEEPALIVE_CAP_MS);
    keepaliveReset(conn);
    if (expiresAt !== undefined) {
      // §2.2: the hub severs the connection when the token expires.
      const t = setTimeout(
        () => close(conn, { type: 'token_expired', deviceId }),
        Math.max(0, expiresAt * 1000 - Date.now()),
      );
      t.unref();
      conn.timers.push(t);
    }
    send(conn, { cmd: 'connack', returnCode: 0, sessionPresent: false });
    event({ type: 'connected', deviceId });
  }

  function documentedFilter(deviceId: string, filter: string): boolean {
    return (
      filter === `devices/${deviceId}/messages/devicebound/#` ||
      filter === '$iothub/twin/res/#' ||
      filter === '$iothub/twin/PATCH/properties/desired/#' ||
      filter === '$iothub/methods/POST/#'
    );
  }

  function onSubscribe(conn: Connection, packet: ISubscribePacket) {
    const deviceId = conn.deviceId!;
    const granted: number[] = [];
    for (const s of packet.subscriptions) {
      // §2.3: the hub disconnects on a filter outside the documented set instead of a SUBACK failure.
      if (!documentedFilter(deviceId, s.topic)) {
        return close(conn, { type: 'closed_subscription', deviceId, detail: s.topic });
      }
      conn.subscriptions.add(s.topic);
      if (conn.subscriptions.size > MAX_SUBSCRIPTIONS) {
        return close(conn, { type: 'closed_subscription', deviceId, detail: 'more than 5 subscriptions' });
      }
      // QoS 2 is granted as 1.
      granted.push(Math.min(s.qos, 1));
    }
    send(conn, { cmd: 'suback', messageId: packet.messageId, granted });
    if (packet.subscriptions.some((s) => s.topic.endsWith('/messages/devicebound/#'))) deliverC2d(deviceId);
    changed();
  }

  function twinThrottled(record: DeviceRecord): boolean {
    return record.throttledUntil > Date.now() || record.throttledPublishes > 0;
  }

  function twinReply(conn: Connection, status: number, rid: string, body?: unknown, version?: number) {
    if (!conn.subscriptions.has('$iothub/twin/res/#')) return;
    const v = version === undefined ? '' : `&$version=${version}`;
    send(conn, {
      cmd: 'publish',
      topic: `$iothub/twin/res/${status}/?$rid=${rid}${v}`,
      payload: body === undefined ? Buffer.alloc(0) : Buffer.from(JSON.stringify(body)),
      qos: 0,
      retain: false,
      dup: false,
    });
  }

  function parseBag(text: string): Record<string, string | null> {
    const out: Record<string, string | null> = {};
    for (const part of text.replace(/^\?/, '').split('&')) {
      if (part === '') continue;
      const eq = part.indexOf('=');
      const dec = (s: string) => {
        try {
          return decodeURIComponent(s.replace(/\+/g, ' '));
        } catch {
          return s;
        }
      };
      out[dec(eq < 0 ? part : part.slice(0, eq))] = eq < 0 ? null : dec(part.slice(eq + 1));
    }
    return out;
  }

  function onPublish(conn: Connection, packet: IPublishPacket) {
    const deviceId = conn.deviceId!;
    const record = devices.get(deviceId)!;
    // §2.3: a QoS 2 PUBLISH closes the connection.
    if (packet.qos === 2) return close(conn, { type: 'closed_qos2', deviceId });
    const topic = packet.topic;
    const payload = typeof packet.payload === 'string' ? Buffer.from(packet.payload) : packet.payload;
    const ack = () => {
      if (packet.qos === 1) send(conn, { cmd: 'puback', messageId: packet.messageId! });
    };
    const eventsPrefix = `devices/${deviceId}/messages/events`;
    if (topic === eventsPrefix || topic.startsWith(`${eventsPrefix}/`)) {
      if (payload.length > D2C_MAX_BYTES)
        return close(conn, { type: 'closed_too_large', deviceId, code: 413 });
      const now = Date.now();
      if (record.throttledUntil > now || record.throttledPublishes > 0) {
        if (record.throttledPublishes > 0) record.throttledPublishes--;
        // §2.4: over the throttle the hub rejects with 429002; over MQTT that closes the link.
        return close(conn, { type: 'throttled', deviceId, code: 429002 });
      }
      const properties = parseBag(topic.slice(eventsPrefix.length + 1));
      // §2.3: RETAIN is not stored; the message carries `mqtt-retain`.
      if (packet.retain) properties['mqtt-retain'] = 'true';
      telemetry.push({ deviceId, topic, properties, payload, qos: packet.qos });
      if (holding) heldAcks.push(ack);
      else ack();
      changed();
      return;
    }
    let m = /^\$iothub\/twin\/GET\/\?\$rid=(.+)$/.exec(topic);
    if (m) {
      ack();
      const rid = m[1]!;
      if (twinThrottled(record)) return twinReply(conn, 429, rid);
      return twinReply(conn, 200, rid, deviceTwinBody(record.twin));
    }
    m = /^\$iothub\/twin\/PATCH\/properties\/reported\/\?\$rid=(.+)$/.exec(topic);
    if (m) {
      ack();
      const rid = m[1]!;
      if (twinThrottled(record)) return twinReply(conn, 429, rid);
      let patch: unknown;
      try {
        patch = JSON.parse(payload.toString('utf8'));
      } catch {
        return twinReply(conn, 400, rid);
      }
      const outcome = applyPatch(record.twin, 'reported', patch);
      if ('problem' in outcome) return twinReply(conn, 400, rid, { message: outcome.problem });
      twinReply(conn, 204, rid, undefined, outcome.version);
      changed();
      return;
    }
    m = /^\$iothub\/methods\/res\/(\d+)\/\?\$rid=(.+)$/.exec(topic);
    if (m) {
      ack();
      const waiter = methodWaiters.get(`${deviceId}\u0000${decodeURIComponent(m[2]!)}`);
      if (waiter) {
        let body: unknown = null;
        if (payload.length > 0) {
          try {
            body = JSON.parse(payload.toString('utf8'));
          } catch {
            body = payload.toString('utf8');
          }
        }
        waiter({ status: Number(m[1]), payload: body });
      }
      return;
    }
    // §2.3: only documented topics; the hub closes the connection (configurable, [UNCONFIRMED]).
    if (closeOnUndocumented) return close(conn, { type: 'closed_topic', deviceId, detail: topic });
    ack();
  }

  function deliverC2d(deviceId: string) {
    const conn = live.get(deviceId);
    const record = devices.get(deviceId);
    if (!conn || !record || !conn.subscriptions.has(`devices/${deviceId}/messages/devicebound/#`)) return;
    for (const message of record.c2d) {
      if (message.sent) continue;
      message.sent = true;
      const messageId = nextId(conn);
      conn.c2dInFlight.set(messageId, message);
      const bag = Object.entries({
        '$.mid': message.id,
        '$.to': `/devices/${deviceId}/messages/deviceBound`,
        ...message.properties,
      })
        .map(([k, v]) => {
          // §2.3 example: system keys keep their `$` (`$.mid=…&$.to=%2Fdevices%2F…`).
          const key = encodeURIComponent(k).replace(/^%24/, '$');
          return v === null ? key : `${key}=${encodeURIComponent(v)}`;
        })
        .join('&');
      send(conn, {
        cmd: 'publish',
        topic: `devices/${deviceId}/messages/devicebound/${bag}`,
        payload: message.payload,
        qos: 1,
        messageId,
        retain: false,
        dup: false,
      });
    }
  }

  function nextId(conn: Connection): number {
    conn.nextPacketId = (conn.nextPacketId % 65535) + 1;
    return conn.nextPacketId;
  }

  function onPuback(conn: Connection, messageId: number) {
    const message = conn.c2dInFlight.get(messageId);
    if (!message || conn.deviceId === undefined) return;
    conn.c2dInFlight.delete(messageId);
    const record = devices.get(conn.deviceId);
    if (record) record.c2d = record.c2d.filter((m) => m !== message);
    changed();
  }

  function onPacket(conn: Connection, packet: Packet) {
    keepaliveReset(conn);
    if (packet.cmd === 'connect') {
      if (conn.deviceId !== undefined) return close(conn);
      return onConnect(conn, packet);
    }
    if (!conn.authenticated) return close(conn);
    switch (packet.cmd) {
      case 'publish':
        return onPublish(conn, packet);
      case 'puback':
        return onPuback(conn, packet.messageId!);
      case 'subscribe':
        return onSubscribe(conn, packet);
      case 'unsubscribe':
        // Mosquitto's bridge_attempt_unsubscribe is refused by the hub (§2.3).
        return close(conn, { type: 'closed_subscription', deviceId: conn.deviceId!, detail: 'unsubscribe' });
      case 'pingreq':
        return send(conn, { cmd: 'pingresp' });
      case 'disconnect':
        return close(conn);
      default:
        return close(conn);
    }
  }

  const mqttServer: TlsServer = createTlsServer(
    {
      cert: options.tls.cert,
      key: options.tls.key,
      ...(options.tls.ca ? { ca: options.tls.ca } : {}),
      requestCert: true,
      rejectUnauthorized: false,
      minVersion: 'TLSv1.2',
    },
    (socket) => {
      if (down) {
        socket.destroy();
        return;
      }
      sockets.add(socket);
      const conn: Connection = {
        socket,
        deviceId: undefined,
        authenticated: false,
        subscriptions: new Set(),
        nextPacketId: 0,
        c2dInFlight: new Map(),
        timers: [],
        keepaliveMs: 0,
        keepaliveTimer: undefined,
        closed: false,
      };
      const parser = mqttPacket.parser({ protocolVersion: 4 });
      parser.on('packet', (p: Packet) => {
        if (!conn.closed) onPacket(conn, p);
      });
      parser.on('error', () => close(conn));
      socket.on('data', (d) => parser.parse(d));
      socket.on('error', () => {});
      socket.on('close', () => {
        sockets.delete(socket);
        onClosed(conn);
      });
    },
  );
  mqttServer.on('tlsClientError', () => {});
  // An outage refuses at TCP level, before any TLS handshake, like a hub that is not there.
  mqttServer.on('connection', (socket: import('node:net').Socket) => {
    if (down) socket.destroy();
  });

  // --- service REST API (§2.5): twin query with paging, GET twin ---
  function serviceAuth(req: IncomingMessage, right: PolicyRight): boolean {
    const header = req.headers.authorization ?? '';
    const prefix = 'SharedAccessSignature ';
    if (!header.startsWith(prefix)) return false;
    const fields = new Map(
      header
        .slice(prefix.length)
        .split('&')
        .map((p) => [p.slice(0, p.indexOf('=')), p.slice(p.indexOf('=') + 1)] as const),
    );
    const sr = fields.get('sr');
    const sig = fields.get('sig');
    const se = fields.get('se');
    const skn = fields.get('skn');
    if (!sr || !sig || !se || !skn || !/^\d+$/.test(se) || Number(se) * 1000 <= Date.now()) return false;
    const policy = policies.get(decodeURIComponent(skn));
    if (!policy || !policy.rights.has(right)) return false;
    if (decodeURIComponent(sr).toLowerCase().split('/')[0] !== hostName.toLowerCase()) return false;
    const expected = createHmac('sha256', Buffer.from(policy.key, 'base64')).update(`${sr}\n${se}`).digest();
    let given: Buffer;
    try {
      given = Buffer.from(decodeURIComponent(sig), 'base64');
    } catch {
      return false;
    }
    return expected.length === given.length && timingSafeEqual(expected, given);
  }

  function serviceTwin(deviceId: string, record: DeviceRecord) {
    const t = record.twin;
    return {
      deviceId,
      etag: Buffer.from(`${t.desiredVersion}.${t.reportedVersion}`).toString('base64'),
      version: t.desiredVersion + t.reportedVersion,
      status: 'enabled',
      connectionState: live.has(deviceId) ? 'Connected' : 'Disconnected',
      properties: {
        desired: { ...t.desired, $metadata: { $lastUpdated: t.desiredUpdated }, $version: t.desiredVersion },
        reported: {
          ...t.reported,
          $metadata: { $lastUpdated: t.reportedUpdated },
          $version: t.reportedVersion,
        },
      },
    };
  }

  function handleService(req: IncomingMessage, res: ServerResponse, body: string) {
    const url = new URL(req.url ?? '/', `https://${hostName}`);
    const reply = (status: number, payload: unknown, headers: Record<string, string> = {}) => {
      serviceRequests.push({ method: req.method ?? '', path: url.pathname, headers: req.headers, status });
      res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', ...headers });
      res.end(payload === undefined ? undefined : JSON.stringify(payload));
      changed();
    };
    if (serviceThrottle > 0) {
      serviceThrottle--;
      return reply(
        429,
        { Message: 'ErrorCode:ThrottlingException;', ExceptionMessage: '' },
        { 'retry-after': '1' },
      );
    }
    if (url.searchParams.get('api-version') === null) {
      return reply(400, { Message: 'ErrorCode:InvalidProtocolVersion;api-version is missing' });
    }
    if (req.method === 'POST' && url.pathname === '/devices/query') {
      if (!serviceAuth(req, 'RegistryRead'))
        return reply(401, { Message: 'ErrorCode:IotHubUnauthorizedAccess;Unauthorized' });
      let query: unknown;
      try {
        query = (JSON.parse(body) as { query?: unknown }).query;
      } catch {
        return reply(400, { Message: 'ErrorCode:ArgumentInvalid;the body is not JSON' });
      }
      if (typeof query !== 'string' || !/^\s*select\s+\*\s+from\s+devices\s*$/i.test(query)) {
        return reply(400, {
          Message: 'ErrorCode:ArgumentInvalid;the simulator runs SELECT * FROM devices only',
        });
      }
      // §2.5: page size from x-ms-max-item-count (default 1000 as the SDK sends, max 10000).
      const asked = Number(req.headers['x-ms-max-item-count'] ?? 1000);
      const size = Math.max(1, Math.min(Number.isFinite(asked) ? asked : 1000, 10_000));
      const token = req.headers['x-ms-continuation'];
      const start = typeof token === 'string' ? Number(Buffer.from(token, 'base64').toString('utf8')) : 0;
      const all = [...devices.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
      const page = all.slice(start, start + size).map(([id, record]) => serviceTwin(id, record));
      const next: Record<string, string> =
        start + size < all.length
          ? { 'x-ms-continuation': Buffer.from(String(start + size)).toString('base64') }
          : {};
      return reply(200, page, { 'x-ms-item-type': 'Twin', ...next });
    }
    const twinPath = /^\/twins\/([^/]+)$/.exec(url.pathname);
    if (req.method === 'GET' && twinPath) {
      if (!serviceAuth(req, 'ServiceConnect') && !serviceAuth(req, 'RegistryRead')) {
        return reply(401, { Message: 'ErrorCode:IotHubUnauthorizedAccess;Unauthorized' });
      }
      const id = decodeURIComponent(twinPath[1]!);
      const record = devices.get(id);
      if (!record) return reply(404, { Message: 'ErrorCode:DeviceNotFound;' });
      return reply(200, serviceTwin(id, record));
    }
    return reply(404, { Message: 'ErrorCode:NotFound;' });
  }

  const serviceServer: HttpsServer = createHttpsServer(
    { cert: options.tls.cert, key: options.tls.key },
    (req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => handleService(req, res, Buffer.concat(chunks).toString('utf8')));
    },
  );

  const listen = (server: TlsServer | HttpsServer) =>
    new Promise<number>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port));
    });
  const port = await listen(mqttServer);
  const servicePort = await listen(serviceServer);

  const device = (id: string) => {
    const record = devices.get(id);
    if (!record) throw new Error(`the simulator has no device ${id}`);
    return record;
  };

  return {
    hostName,
    port,
    servicePort,
    telemetry,
    events,
    serviceRequests,
    addDevice(deviceId, auth) {
      devices.set(deviceId, {
        auth,
        twin: createTwin(),
        c2d: [],
        connects: 0,
        denied: false,
        throttledUntil: 0,
        throttledPublishes: 0,
      });
    },
    addPolicy(name, key, rights) {
      policies.set(name, { key, rights: new Set(rights) });
    },
    connectedDevices: () => [...live.keys()],
    connectionCount: () => live.size,
    connectsOf: (deviceId) => devices.get(deviceId)?.connects ?? 0,
    twin: (deviceId) => device(deviceId).twin,
    updateDesired(deviceId, patch) {
      const record = device(deviceId);
      const outcome = applyPatch(record.twin, 'desired', patch);
      if ('problem' in outcome) throw new Error(outcome.problem);
      const conn = live.get(deviceId);
      if (conn && conn.subscriptions.has('$iothub/twin/PATCH/properties/desired/#')) {
        send(conn, {
          cmd: 'publish',
          topic: `$iothub/twin/PATCH/properties/desired/?$version=${outcome.version}`,
          payload: Buffer.from(JSON.stringify({ ...patch, $version: outcome.version })),
          qos: 0,
          retain: false,
          dup: false,
        });
      }
      changed();
      return outcome.version;
    },
    sendC2d(deviceId, payload, properties = {}) {
      const record = device(deviceId);
      if (record.c2d.length >= C2D_MAX_PENDING)
        throw new Error(`device ${deviceId} has 50 pending C2D messages`);
      record.c2d.push({
        id: `c2d-${++c2dSeq}`,
        payload: typeof payload === 'string' ? Buffer.from(payload) : payload,
        properties,
        sent: false,
      });
      deliverC2d(deviceId);
    },
    pendingC2d: (deviceId) => device(deviceId).c2d.length,
    invokeMethod(deviceId, name, payload, opts = {}) {
      const conn = live.get(deviceId);
      if (!conn || !conn.subscriptions.has('$iothub/methods/POST/#')) {
        return Promise.reject(
          Object.assign(new Error(`device ${deviceId} is not online (404103)`), { status: 404 }),
        );
      }
      const rid = (++ridSeq).toString(16);
      const key = `${deviceId}\u0000${rid}`;
      return new Promise<MethodResult>((resolve, reject) => {
        const timer = setTimeout(() => {
          methodWaiters.delete(key);
          reject(
            Object.assign(new Error(`device ${deviceId} did not answer ${name} in time (504101)`), {
              status: 504,
            }),
          );
        }, opts.timeoutMs ?? METHOD_DEFAULT_TIMEOUT_MS);
        methodWaiters.set(key, (result) => {
          clearTimeout(timer);
          methodWaiters.delete(key);
          resolve(result);
        });
        send(conn, {
          cmd: 'publish',
          topic: `$iothub/methods/POST/${name}/?$rid=${rid}`,
          payload: Buffer.from(payload === undefined ? '' : JSON.stringify(payload)),
          qos: 0,
          retain: false,
          dup: false,
        });
      });
    },
    holdAcks(on) {
      holding = on;
      if (!on) for (const ack of heldAcks.splice(0)) ack();
    },
    outage(on) {
      down = on;
      if (on) for (const conn of [...live.values()]) close(conn);
      if (on) for (const s of [...sockets]) s.destroy();
      changed();
    },
    throttle(deviceId, opts) {
      const record = device(deviceId);
      if (opts.forMs !== undefined) record.throttledUntil = Date.now() + opts.forMs;
      if (opts.publishes !== undefined) record.throttledPublishes = opts.publishes;
    },
    limitConnects(perSecond) {
      connectLimit = perSecond;
    },
    kick(deviceId) {
      const conn = live.get(deviceId);
      if (conn) close(conn, { type: 'kicked', deviceId, code: 400027 });
    },
    deny(deviceId, on) {
      device(deviceId).denied = on;
    },
    throttleService(count) {
      serviceThrottle = count;
    },
    waitFor(predicate, timeoutMs = 20_000, what = 'condition') {
      if (predicate()) return Promise.resolve();
      return new Promise<void>((resolve, reject) => {
        const check = () => {
          if (!predicate()) return;
          cleanup();
          resolve();
        };
        // Also poll: some conditions change without a simulator event (time passing).
        const poll = setInterval(check, 50);
        const timer = setTimeout(() => {
          cleanup();
          reject(new Error(`simulator: ${what} did not happen within ${timeoutMs} ms`));
        }, timeoutMs);
        const cleanup = () => {
          clearInterval(poll);
          clearTimeout(timer);
          watchers.delete(check);
        };
        watchers.add(check);
      });
    },
    async close() {
      for (const s of [...sockets]) s.destroy();
      await Promise.all([
        new Promise<void>((r) => mqttServer.close(() => r())),
        new Promise<void>((r) => {
          serviceServer.closeAllConnections();
          serviceServer.close(() => r());
        }),
      ]);
    },
  };
}
