import { Aedes, type AedesPublishPacket, type Client, type PublishPacket, type Subscription } from 'aedes';
import { writeToStream } from 'mqtt-packet';
import type { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';
import type { Config } from '../../config/schema.js';
import { ErrorCodes, GatewayError, errorMessage } from '../../errors.js';
import type { Logger } from '../../logger.js';
import { createFloodReporter, latestEvent } from '../../common/flood-reporter.js';
import type { ActivityEntry, ActivityLog } from '../../store/activity-log.js';
import type { BrokerPersistence } from '../../store/broker-persistence.js';
import type { IncomingMessage } from '../../store/outbox-types.js';
import {
  EMPTY_ACL,
  anonymousAcl,
  canPublish,
  canReceive,
  canSubscribe,
  deviceAcl,
  type EffectiveAcl,
} from './acl.js';
import { createConnectRateLimiter } from './admission.js';
import { DeviceLane, type LaneHost, type LaneMessage } from './device-lane.js';
import { keepEmitOrder } from './emit-order.js';
import {
  createDeviceAuthenticator,
  revocationReason,
  type AuthFailureReason,
  type ConnackRefusal,
  type Identity,
} from './device-auth.js';
import {
  createListeners,
  type BoundListener,
  type ConnectionInfo,
  type ConnectionRejection,
} from './listeners.js';
import { routedConnection } from './packet-limit.js';
import type { PasswordVerifier } from './password-hash.js';

export interface BrokerOptions {
  config: Config['broker'];
  gatewayId: string;
  /** features.retainedStatus: retained `gateway/{id}/status` online / offline. */
  retainedStatus: boolean;
  logger: Logger;
  activity: ActivityLog;
  /**
   * Called after the ACL allowed a device publish; the broker awaits the promise (if any)
   * before calling back, so the PUBACK (QoS 1) / PUBREC (QoS 2) goes out only after the
   * durable commit. If it rejects, aedes closes the connection without PUBACK.
   */
  ingest: (message: IncomingMessage) => Promise<void> | null;
  /** Aggregation window for auth-failure and rejection activity rows per remote address. */
  activityWindowMs?: number;
  /** Checks device passwords (default: scrypt); injectable to count checks in tests. */
  verifier?: PasswordVerifier;
  /** ms clock of the connect-rate buckets, login backoff and login cache; monotonic by default. */
  now?: () => number;
  /**
   * How long a write to a device that stopped reading may wait for its socket to drain before
   * aedes closes that connection (default 30 s); other devices are served meanwhile.
   */
  drainTimeoutMs?: number;
  /**
   * Local presence, by device id (the id its rows carry): a client finished its CONNECT (true)
   * or its current session ended (false). A takeover by the same client id may report offline
   * then online; a session that ends after a newer one took its place reports nothing.
   */
  onPresence?: (deviceId: string, online: boolean) => void;
  /**
   * Where aedes keeps retained messages, sessions and queued messages (broker.persistence:
   * sqlite); aedes' in-memory default without it. Told when devices come and go; its owner
   * destroys it after close().
   */
  persistence?: BrokerPersistence;
}

export interface BrokerStats {
  /** Open client sockets across all listeners (authenticated or not). */
  connections: number;
  /** Device publishes accepted (after ingest). */
  messagesIn: number;
  authFailures: number;
  /** Connections cut for an oversized or malformed packet header. */
  rejectedPackets: number;
  /** Connections refused at the maxConnections cap. */
  rejectedConnections: number;
  /** Sockets closed at accept by broker.connectRate (per source or total). */
  rateLimitedConnections: number;
  /** Logins refused without a password check while their username or source was locked. */
  loginBackoffRefusals: number;
}

export interface ConnectedDevice {
  id: string;
  connectedAt: number;
  remoteAddress: string | null;
}

export interface Broker {
  listen(): Promise<BoundListener[]>;
  readonly listening: boolean;
  /** Cloud → device: publish on a local topic (commands, desired state). */
  publish(message: { topic: string; payload: Buffer; qos: 0 | 1 | 2; retain: boolean }): Promise<void>;
  /**
   * Live reload: new device list / ACLs / anonymous policy; disconnects devices that were
   * removed or whose password hash / ACL changed; leaves others connected.
   */
  updateConfig(config: Config['broker']): void;
  /**
   * TLS listeners read their cert, key, ca and crl files again, for new connections (a renewed
   * certificate, a new CRL); one sentence per listener that kept its old files.
   */
  refreshTls(): string[];
  connectedDevices(): ConnectedDevice[];
  readonly stats: BrokerStats;
  /** Stops accepting, publishes the retained offline status, closes clients and aedes. */
  close(): Promise<void>;
}

/**
 * aedes' errors for a link that timed out or stopped reading: the state of the network or of the
 * device, not a protocol violation.
 */
const LINK_ERRORS = new Set([
  'keep alive timeout',
  'drain timeout',
  'connection closed',
  'Client queue limit reached',
]);

/** How long a graceful stop waits for publishes being committed and their PUBACKs. */
const DRAIN_COMMITS_MS = 5_000;

/** Levels a topic may have (aedes' maxTopicLevels). */
const MAX_TOPIC_LEVELS = 100;

/** Topics per ACL whose publish permission is remembered; the memo starts over when full. */
const PUBLISH_MEMO_TOPICS = 1000;

interface Session {
  identity: Identity;
  client: Client;
  connectedAt: number;
  remoteAddress: string | null;
}

/** What preConnect saw on the wire; aedes replaces an empty client id before authenticate. */
interface ConnectFields {
  clientId: string;
  clean: boolean;
  willTopic: string | null;
  /** Seconds; 0 = no keepalive. */
  keepalive: number;
}

/**
 * Where a publish to a `$` topic goes once acknowledged: a `$` name that no client may subscribe
 * to (canSubscribe refuses every `$` filter) and that no aedes-internal `$SYS/+/…` handler matches.
 */
const DISCARDED_TOPIC = '$gateway-discarded';

/**
 * The CONNACK refusal for a CONNECT whose keepalive this gateway will not serve, or null. MQTT
 * 3.1.1 has no return code for it (aedes' 6 is not one); Mosquitto answers 2 for a 3.1.1 client.
 */
export function keepaliveRefusal(
  keepaliveSeconds: number,
  config: Pick<Config['broker'], 'keepaliveLimit' | 'allowKeepaliveZero'>,
): 'keepalive_zero' | 'keepalive_too_long' | null {
  if (keepaliveSeconds === 0) return config.allowKeepaliveZero ? null : 'keepalive_zero';
  return keepaliveSeconds * 1000 > config.keepaliveLimit ? 'keepalive_too_long' : null;
}

const DRAIN_TIMEOUT_MS = 30_000;
const STATUS_PUBLISH_TIMEOUT_MS = 2_000;

export function createBroker(options: BrokerOptions): Broker {
  // mqtt-packet (shared by aedes and mqtt.js) would build 65,536 cached 2-byte Buffers (~7 MB of
  // heap) on the first packet written; allocating a number's two bytes per packet is enough.
  writeToStream.cacheNumbers = false;
  const { gatewayId, logger, activity } = options;
  let config = options.config;
  const statusTopic = `gateway/${gatewayId}/status`;
  const auth = createDeviceAuthenticator({ config, verifier: options.verifier, now: options.now });
  const connectRate = createConnectRateLimiter({ config: config.connectRate, now: options.now });
  const sessions = new WeakMap<Client, Session>();
  /** Connected (CONNACKed) clients by client id: connectedDevices() and wills without a client. */
  const connected = new Map<string, Session>();
  const connectFields = new WeakMap<Client, ConnectFields>();
  const connections = new WeakMap<Duplex, ConnectionInfo>();
  const aclCache = new Map<string, EffectiveAcl>();
  const stats = {
    messagesIn: 0,
    authFailures: 0,
    rejectedPackets: 0,
    rejectedConnections: 0,
    rateLimitedConnections: 0,
    loginBackoffRefusals: 0,
  };
  const throttle = createActivityThrottle(activity, logger, options.activityWindowMs ?? 1000);
  let listening = false;
  let closing: Promise<void> | undefined;
  /**
   * Set while close() drains: a publish that reaches authorizePublish now is never answered, so
   * it is neither committed nor acknowledged, and its device sends it again after the restart.
   */
  let draining = false;
  /** QoS 2 messages taken from each client, by packet id (a new message with the id replaces it). */
  const qos2Taken = new WeakMap<Client, Map<number, Promise<void>>>();
  /** QoS > 0 publishes being committed; close() waits for their PUBACKs before closing links. */
  let committing = 0;
  let onCommitted: (() => void) | undefined;

  /** The anonymous ACL of the current config (one object per config, so its memo below holds). */
  let anonymous: { config: typeof config; acl: EffectiveAcl } | undefined;
  /**
   * Per ACL object and topic: 0 refused, 1 allowed, 2 allowed and a plain topic the device lane
   * may take (see plainTopic). A reload makes new ACL objects.
   */
  const publishMemo = new WeakMap<EffectiveAcl, Map<string, 0 | 1 | 2>>();
  const publishVerdict = (acl: EffectiveAcl, topic: string): 0 | 1 | 2 => {
    let memo = publishMemo.get(acl);
    if (memo === undefined) {
      memo = new Map();
      publishMemo.set(acl, memo);
    }
    let verdict = memo.get(topic);
    if (verdict === undefined) {
      verdict = !canPublish(acl, topic) ? 0 : plainTopic(topic) ? 2 : 1;
      if (memo.size >= PUBLISH_MEMO_TOPICS) memo.clear();
      memo.set(topic, verdict);
    }
    return verdict;
  };
  const mayPublish = (acl: EffectiveAcl, topic: string): boolean => publishVerdict(acl, topic) > 0;

  const aclOf = (identity: Identity): EffectiveAcl => {
    if (identity.kind === 'anonymous') {
      if (anonymous === undefined || anonymous.config !== config) {
        anonymous = { config, acl: anonymousAcl(config) };
      }
      return anonymous.acl;
    }
    let acl = aclCache.get(identity.id);
    if (acl === undefined) {
      const device = auth.device(identity.id);
      acl = device ? deviceAcl(device, gatewayId) : EMPTY_ACL;
      aclCache.set(identity.id, acl);
    }
    return acl;
  };

  /** A CONNACK refusal: aedes sends `returnCode`, which must be one MQTT 3.1.1 defines (2–5). */
  const refuse = (returnCode: ConnackRefusal, message: string): Error & { returnCode: number } =>
    Object.assign(new Error(message), { returnCode });

  const recordAuthFailure = (
    clientId: string,
    remoteAddress: string | null,
    reason: AuthFailureReason | 'will_not_allowed',
  ) => {
    stats.authFailures++;
    throttle.note(
      'auth_failed',
      remoteAddress,
      { clientId, remoteAddress, reason },
      ErrorCodes.AUTH_FAILED,
      `connection refused: ${reason}`,
    );
  };

  const aedes = new Aedes({
    id: gatewayId,
    connectTimeout: config.connectTimeout,
    // aedes would answer keepalive 0 and keepalives over its limit with CONNACK 6, which MQTT
    // 3.1.1 does not define; authenticate checks them against the live config instead.
    keepaliveLimit: 0,
    maxTopicLevels: MAX_TOPIC_LEVELS,
    drainTimeout: options.drainTimeoutMs ?? DRAIN_TIMEOUT_MS,
    concurrency: 1000,
    persistence: options.persistence,

    preConnect(client, packet, callback) {
      connectFields.set(client, {
        clientId: typeof packet.clientId === 'string' ? packet.clientId : '',
        clean: packet.clean !== false,
        willTopic: packet.will ? String(packet.will.topic) : null,
        keepalive: typeof packet.keepalive === 'number' ? packet.keepalive : 0,
      });
      callback(null, true);
    },

    authenticate(client, username, password, done) {
      const fields = connectFields.get(client);
      const info = connections.get(client.conn as Duplex);
      const remoteAddress = info?.remoteAddress ?? null;
      const clientId = fields?.clientId ?? '';
      const attempt = {
        clientId,
        username: typeof username === 'string' ? username : undefined,
        password: password === undefined || password === null ? undefined : Buffer.from(password),
        clean: fields?.clean ?? true,
        certIdentity: info?.certIdentity ?? null,
        remoteAddress,
      };
      // Checked before the password, so a refused keepalive costs no scrypt.
      const keepaliveProblem = keepaliveRefusal(fields?.keepalive ?? 0, config);
      if (keepaliveProblem !== null) {
        throttle.note(
          'connection_rejected',
          remoteAddress,
          { clientId, remoteAddress, reason: keepaliveProblem, keepalive: fields?.keepalive ?? 0 },
          null,
          keepaliveProblem === 'keepalive_zero'
            ? 'keepalive 0 refused (broker.allowKeepaliveZero is false)'
            : `keepalive over broker.keepaliveLimit (${config.keepaliveLimit} ms)`,
        );
        done(refuse(2, keepaliveProblem) as never, false);
        return;
      }
      auth
        .authenticate(attempt)
        .then((result) => {
          if (!result.ok) {
            if (result.reason === 'login_backoff') stats.loginBackoffRefusals++;
            else
              for (const lock of result.locks ?? [])
                throttle.note(
                  'login_locked',
                  remoteAddress,
                  {
                    username: attempt.username ?? null,
                    remoteAddress,
                    scope: lock.scope,
                    lockMs: lock.remainingMs,
                  },
                  ErrorCodes.AUTH_FAILED,
                  'logins locked after repeated failures (broker.loginBackoff)',
                );
            recordAuthFailure(clientId, remoteAddress, result.reason);
            done(refuse(result.returnCode, result.reason) as never, false);
            return;
          }
          // Anonymous clients without an id get aedes' generated one.
          const identity: Identity =
            result.identity.kind === 'anonymous' ? { ...result.identity, id: client.id } : result.identity;
          // S10: a will is a publish on the client's behalf, checked now, not only when it fires.
          if (fields?.willTopic != null && !canPublish(aclOf(identity), fields.willTopic)) {
            recordAuthFailure(clientId, remoteAddress, 'will_not_allowed');
            done(refuse(5, 'will_not_allowed') as never, false);
            return;
          }
          sessions.set(client, { identity, client, connectedAt: Date.now(), remoteAddress });
          done(null, true);
        })
        .catch((err: unknown) => {
          logger.error({ err, clientId }, 'authenticate_failed');
          done(refuse(3, 'server unavailable') as never, false);
        });
    },

    authorizePublish(client, packet, callback) {
      let called = false;
      const done = (err: Error | null) => {
        if (called) return;
        called = true;
        if (client !== null) lanes.get(client)?.answered();
        callback(err);
      };
      try {
        const topic = packet.topic;
        // `$` topics are the server's (MQTT 4.7.2). A client's publish there is acknowledged as its
        // QoS requires and discarded, as Mosquitto does: MQTT 3.1.1 allows that or a close
        // (MQTT-3.3.5-2). It goes through aedes under a name nothing receives and not retained,
        // so neither aedes' own `$SYS/+/new/clients` takeover (aedes #597) nor a subscriber sees it.
        if (topic.startsWith('$')) {
          if (client === null) {
            return done(new GatewayError(ErrorCodes.ACL_DENIED, `publishing to ${topic} is not allowed`));
          }
          const remoteAddress = sessions.get(client)?.remoteAddress ?? null;
          logger.warn({ clientId: client.id, topic }, 'publish_discarded');
          throttle.note(
            'acl_denied',
            remoteAddress,
            { clientId: client.id, remoteAddress, topic },
            ErrorCodes.ACL_DENIED,
            'publish to a reserved $ topic acknowledged and discarded',
          );
          packet.topic = DISCARDED_TOPIC;
          packet.retain = false;
          packet.payload = Buffer.alloc(0);
          return done(null);
        }
        // A will published after its client is gone arrives without a client (aedes _clearWills).
        const willOwner = (packet as { clientId?: unknown }).clientId;
        const session = client
          ? sessions.get(client)
          : typeof willOwner === 'string'
            ? connected.get(willOwner)
            : undefined;
        if (!session || !mayPublish(aclOf(session.identity), topic)) {
          const remoteAddress = session?.remoteAddress ?? null;
          logger.warn({ clientId: client?.id ?? null, topic }, 'publish_denied');
          throttle.note(
            'acl_denied',
            remoteAddress,
            { clientId: client?.id ?? null, remoteAddress, topic },
            ErrorCodes.ACL_DENIED,
            'publish outside the ACL refused',
          );
          return done(new GatewayError(ErrorCodes.ACL_DENIED, `publishing to ${topic} is not allowed`));
        }
        if (draining && packet.qos > 0) return;
        // QoS 2 is exactly once: a retransmission (DUP) of a message this device already sent
        // under its packet id is answered when the first copy is durable, and not queued again.
        const messageId = packet.qos === 2 ? packet.messageId : undefined;
        if (messageId === undefined || client === null) {
          ingestPublish(session, packet, done);
          return;
        }
        let taken = qos2Taken.get(client);
        if (taken === undefined) qos2Taken.set(client, (taken = new Map()));
        const first = taken.get(messageId);
        if (packet.dup && first !== undefined) {
          first.then(
            () => done(null),
            (err: unknown) => done(asError(err)),
          );
          return;
        }
        const record = taken;
        const ingestAndRecord = () => {
          const pending = ingestPublish(session, packet, done);
          if (pending !== undefined) record.set(messageId, pending);
        };
        if (!packet.dup) {
          ingestAndRecord();
          return;
        }
        // Sent before a reconnect (clean=false)? Then aedes still holds it, awaiting PUBREL.
        awaitingPubrel(client, messageId).then(() => done(null), ingestAndRecord);
      } catch (err) {
        logger.error({ err, clientId: client?.id ?? null }, 'authorize_publish_failed');
        done(asError(err));
      }
    },

    authorizeSubscribe(client, subscription, callback) {
      let allowed = false;
      try {
        const session = sessions.get(client);
        allowed = session !== undefined && canSubscribe(aclOf(session.identity), subscription.topic);
        if (!allowed) logger.info({ clientId: client.id, filter: subscription.topic }, 'subscribe_denied');
      } catch (err) {
        logger.error({ err, clientId: client.id }, 'authorize_subscribe_failed');
      }
      // A null subscription is SUBACK 0x80 for this filter; an error would close the connection.
      callback(null, allowed ? subscription : (null as unknown as Subscription));
    },

    authorizeForward(client, packet): AedesPublishPacket | null {
      try {
        const session = sessions.get(client);
        return session !== undefined && canReceive(aclOf(session.identity), packet.topic) ? packet : null;
      } catch (err) {
        logger.error({ err, clientId: client.id }, 'authorize_forward_failed');
        return null;
      }
    },
  });

  keepEmitOrder(aedes);

  /** Whether a publish to `topic` may have a local receiver: an online subscriber, or (QoS > 0) a stored one. */
  const mq = (aedes as unknown as { mq: LocalEmitter }).mq;
  let onlineMemo = new Map<string, boolean>();
  for (const method of ['on', 'removeListener', 'removeAllListeners'] as const) {
    const original = mq[method].bind(mq) as (...args: unknown[]) => unknown;
    (mq as unknown as Record<string, unknown>)[method] = (...args: unknown[]) => {
      onlineMemo = new Map();
      return original(...args);
    };
  }
  const hasLocalSubscribers = (topic: string, qos: number): boolean => {
    let online = onlineMemo.get(topic);
    if (online === undefined) {
      online = mq._matcher.match(topic).length > 0;
      if (onlineMemo.size >= PUBLISH_MEMO_TOPICS) onlineMemo = new Map();
      onlineMemo.set(topic, online);
    }
    if (online || qos === 0) return online;
    // aedes' in-memory store has no cheap answer: its publish path asks it.
    return options.persistence?.mayHaveSubscribers(topic) ?? true;
  };

  const lanes = new WeakMap<Client, DeviceLane<Session>>();
  const laneHost: LaneHost<Session> = {
    accepts: (session, topic) => publishVerdict(aclOf(session.identity), topic) === 2,
    get draining() {
      return draining;
    },
    ingest: (session, message) =>
      options.ingest({
        deviceId: session.identity.id,
        topic: message.topic,
        payload: message.payload,
        qos: message.qos,
        retain: message.retain,
      }),
    accepted() {
      stats.messagesIn++;
    },
    commitStarted() {
      committing++;
    },
    commitEnded() {
      if (--committing === 0) onCommitted?.();
    },
    wantsLocal: (message) => message.retain || hasLocalSubscribers(message.topic, message.qos),
    publishLocal(session, message: LaneMessage) {
      const packet = publishPacket(message);
      (
        aedes as unknown as { publish(p: PublishPacket, c: Client, done: (err?: Error) => void): void }
      ).publish(packet, session.client, (err) => {
        if (err)
          logger.warn({ err, clientId: session.client.id, topic: message.topic }, 'local_publish_failed');
      });
    },
    touched(session) {
      const client = session.client as unknown as KeepaliveState;
      if (client._keepaliveInterval > 0) client._keepaliveTimer?.refresh();
    },
    ingestFailed(session, topic, err) {
      logger.error({ err, clientId: session.identity.id, topic }, 'ingest_failed');
      // After this turn's PUBACKs of the commits before it have left (next tick).
      setImmediate(() => session.client.close());
    },
  };

  const presence = (session: Session, online: boolean) => {
    try {
      options.onPresence?.(session.identity.id, online);
    } catch (err) {
      logger.error({ err, clientId: session.client.id }, 'presence_listener_failed');
    }
  };

  aedes.on('clientReady', (client) => {
    options.persistence?.clientConnected(client.id);
    const session = sessions.get(client);
    if (!session) return;
    session.connectedAt = Date.now();
    connected.set(client.id, session);
    lanes.get(client)?.open(session);
    logger.info({ clientId: client.id, remoteAddress: session.remoteAddress }, 'device_connected');
    presence(session, true);
  });
  aedes.on('clientDisconnect', (client) => {
    lanes.get(client)?.close();
    options.persistence?.clientDisconnected(client.id);
    const current = connected.get(client.id);
    if (current?.client === client) {
      connected.delete(client.id);
      presence(current, false);
    }
    const identity = sessions.get(client)?.identity;
    if (identity?.kind === 'device' && identity.method === 'password') auth.sessionEnded(identity.id);
    logger.info({ clientId: client.id }, 'device_disconnected');
  });
  aedes.on('clientError', (client, err) => {
    // Socket errors, our own refusals (recorded where they are made) and a link that went quiet
    // or stopped reading are not the device breaking the protocol.
    if (
      (err as NodeJS.ErrnoException).code !== undefined ||
      err instanceof GatewayError ||
      LINK_ERRORS.has(err.message)
    ) {
      logger.debug({ clientId: client.id, error: err.message }, 'client_error');
      return;
    }
    // A malformed packet or a forbidden one from a connected device (SPEC §4: closed, with an
    // activity row); aedes has closed the connection already.
    const remoteAddress = connected.get(client.id)?.remoteAddress ?? null;
    logger.warn({ clientId: client.id, remoteAddress, error: err.message }, 'protocol_error');
    throttle.note(
      'protocol_error',
      remoteAddress,
      { clientId: client.id, remoteAddress, reason: err.message },
      null,
      `connection closed: ${err.message}`,
    );
  });
  aedes.on('connectionError', (client, err) => {
    const info = connections.get(client.conn as Duplex);
    // Socket errors (ECONNRESET …) are the network's business; protocol errors are the client's.
    if ((err as NodeJS.ErrnoException).code !== undefined) return;
    const remoteAddress = info?.remoteAddress ?? null;
    throttle.note(
      'connection_rejected',
      remoteAddress,
      { remoteAddress, reason: err.message },
      null,
      err.message,
    );
  });
  // aedes emits 'error' for persistence failures; without a listener that would crash the process.
  (aedes as EventEmitter).on('error', (err: Error) => logger.error({ err }, 'broker_error'));

  const listeners = createListeners({
    listeners: config.listeners,
    maxConnections: config.maxConnections,
    maxPacketSize: config.maxPacketSize,
    connectTimeout: config.connectTimeout,
    connectRate,
    logger,
    onConnection(stream, info) {
      connections.set(stream, info);
      const client = aedes.handle(stream);
      const conn = routedConnection(stream);
      if (conn !== undefined) lanes.set(client, new DeviceLane(conn, laneHost));
    },
    onReject(rejection: ConnectionRejection) {
      const { reason, remoteAddress } = rejection;
      const tooLarge = reason === 'packet_too_large' || reason === 'malformed_length';
      if (tooLarge) stats.rejectedPackets++;
      else if (reason === 'max_connections') stats.rejectedConnections++;
      else stats.rateLimitedConnections++;
      const message = tooLarge
        ? `packet over broker.maxPacketSize (${config.maxPacketSize} bytes)`
        : reason === 'max_connections'
          ? `broker.maxConnections (${config.maxConnections}) reached`
          : reason === 'connect_rate_ip'
            ? `source over broker.connectRate.perIp (${config.connectRate.perIp}/s)`
            : `gateway over broker.connectRate.total (${config.connectRate.total}/s)`;
      throttle.note(
        tooLarge ? 'packet_rejected' : 'connection_rejected',
        // Total-rate refusals share one row per window, whatever the (many) sources.
        reason === 'connect_rate_total' ? null : remoteAddress,
        {
          remoteAddress,
          reason,
          listener: rejection.listener,
          declaredSize: rejection.declaredSize ?? null,
        },
        null,
        message,
      );
    },
  });

  const aedesPublish = (message: {
    topic: string;
    payload: Buffer;
    qos: 0 | 1 | 2;
    retain: boolean;
  }): Promise<void> =>
    new Promise((resolve, reject) => {
      aedes.publish(publishPacket(message), (err) =>
        err
          ? reject(
              new GatewayError(
                ErrorCodes.BROKER_PUBLISH,
                `cannot publish to ${message.topic}: ${err.message}`,
                { cause: err },
              ),
            )
          : resolve(),
      );
    });

  const publishStatus = async (state: 'online' | 'offline'): Promise<void> => {
    if (!options.retainedStatus) return;
    let timer: NodeJS.Timeout | undefined;
    // A frozen subscriber can hold a QoS 1 delivery until drainTimeout: do not let it hold startup or shutdown.
    const timeout = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, STATUS_PUBLISH_TIMEOUT_MS);
    });
    try {
      await Promise.race([
        aedesPublish({ topic: statusTopic, payload: Buffer.from(state), qos: 1, retain: true }),
        timeout,
      ]);
    } catch (err) {
      logger.warn({ err, state }, 'status_publish_failed');
    } finally {
      clearTimeout(timer);
    }
  };

  const closeAedes = (): Promise<void> => new Promise((resolve) => aedes.close(() => resolve()));
  /**
   * Whether aedes holds an inbound QoS 2 packet of this client id awaiting PUBREL (its types
   * leave the persistence untyped; it is there once the broker listens).
   */
  const awaitingPubrel = (client: Client, messageId: number): Promise<unknown> =>
    (
      aedes as unknown as {
        persistence: { incomingGetPacket(client: Client, packet: { messageId: number }): Promise<unknown> };
      }
    ).persistence.incomingGetPacket(client, { messageId });

  /**
   * Queues a device's publish and calls `done` once it is durable (aedes then sends the PUBACK,
   * or the PUBREC), or with the error that closes the link. Returns the commit, if there is one.
   */
  function ingestPublish(
    session: Session,
    packet: PublishPacket,
    done: (err: Error | null) => void,
  ): Promise<void> | undefined {
    let pending: Promise<void> | null;
    try {
      const payload = typeof packet.payload === 'string' ? Buffer.from(packet.payload) : packet.payload;
      pending = options.ingest({
        deviceId: session.identity.id,
        topic: packet.topic,
        payload,
        qos: packet.qos,
        retain: packet.retain,
      });
    } catch (err) {
      logger.error({ err, clientId: session.identity.id }, 'authorize_publish_failed');
      done(asError(err));
      return undefined;
    }
    if (pending === null) {
      stats.messagesIn++;
      done(null);
      return undefined;
    }
    committing++;
    // One reaction per message (no .finally: that is two more promises on the hot path).
    pending.then(
      () => {
        stats.messagesIn++;
        // aedes writes the PUBACK inside this call (PUBREC after its own publish step).
        try {
          done(null);
        } finally {
          if (--committing === 0) onCommitted?.();
        }
      },
      (err: unknown) => {
        if (--committing === 0) onCommitted?.();
        logger.error({ err, clientId: session.identity.id, topic: packet.topic }, 'ingest_failed');
        // The error closes the link. PUBACKs aedes wrote a moment ago for this device's
        // earlier messages of the same batch sit corked until the next tick (mqtt-packet
        // writeToStream); closing now would discard them, and the device would send those
        // committed messages again.
        setImmediate(() => done(asError(err)));
      },
    );
    return pending;
  }

  /**
   * Graceful stop (R3): no new QoS > 0 publish is taken; those already being committed get their
   * PUBACK and the links flush it before aedes closes them. A message committed whose PUBACK
   * never left would come again from its device after the restart: a duplicate upstream.
   */
  async function drainPublishes(): Promise<void> {
    draining = true;
    const deadline = performance.now() + DRAIN_COMMITS_MS;
    if (committing > 0) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, DRAIN_COMMITS_MS);
        onCommitted = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      onCommitted = undefined;
      if (committing > 0) logger.warn({ committing }, 'broker_drain_timed_out');
    }
    // PUBACKs handed to a socket that could not take them at once wait in its buffer; PUBRECs
    // go out a few turns of the loop after the commit.
    for (let turn = 0; performance.now() < deadline; turn++) {
      await new Promise((resolve) => setTimeout(resolve, 5));
      if (turn >= 2 && [...connected.values()].every((s) => s.client.conn.writableLength === 0)) break;
    }
  }

  return {
    get listening() {
      return listening;
    },
    get stats() {
      return { connections: listeners.openConnections, ...stats };
    },
    async listen() {
      if (closing)
        throw new GatewayError(
          ErrorCodes.LISTEN_FAILED,
          'the broker was closed; create a new one to listen again',
        );
      if (listening) throw new GatewayError(ErrorCodes.LISTEN_FAILED, 'the broker is already listening');
      await aedes.listen();
      let bound: BoundListener[];
      try {
        bound = await listeners.listen();
      } catch (err) {
        await closeAedes();
        throw err;
      }
      listening = true;
      await publishStatus('online');
      logger.info({ listeners: bound }, 'broker_listening');
      return bound;
    },
    async publish(message) {
      if (closing || !listening) {
        throw new GatewayError(
          ErrorCodes.BROKER_PUBLISH,
          `cannot publish to ${message.topic}: the broker is not running`,
          { retryable: true },
        );
      }
      const { topic } = message;
      if (
        topic.length === 0 ||
        topic.includes('+') ||
        topic.includes('#') ||
        topic.startsWith('$') ||
        topic.includes('\u0000')
      ) {
        throw new GatewayError(
          ErrorCodes.BROKER_PUBLISH,
          `"${topic}" is not a topic devices may receive (empty, wildcard, NUL or $)`,
        );
      }
      await aedesPublish(message);
    },
    refreshTls() {
      return listeners.refreshTls();
    },
    updateConfig(next) {
      const previous = config;
      config = next;
      auth.update(next);
      connectRate.configure(next.connectRate);
      aclCache.clear();
      for (const session of [...connected.values()]) {
        const reason = revocationReason(session.identity, previous, next, gatewayId);
        if (reason === null) continue;
        logger.info({ clientId: session.client.id, reason }, 'device_disconnected_by_config');
        session.client.close();
      }
    },
    connectedDevices() {
      return [...connected.values()].map((s) => ({
        id: s.client.id,
        connectedAt: s.connectedAt,
        remoteAddress: s.remoteAddress,
      }));
    },
    close() {
      closing ??= (async () => {
        listeners.stopAccepting();
        await drainPublishes();
        if (listening) await publishStatus('offline');
        await closeAedes();
        await listeners.close();
        throttle.flush();
        connected.clear();
        listening = false;
        logger.info('broker_closed');
      })();
      return closing;
    },
  };
}

/** A PUBLISH for aedes' own publish path (the broker's, or a device's after the lane took it). */
function publishPacket(message: {
  topic: string;
  payload: Buffer;
  qos: 0 | 1 | 2;
  retain: boolean;
}): PublishPacket {
  return {
    cmd: 'publish',
    topic: message.topic,
    payload: message.payload,
    qos: message.qos,
    retain: message.retain,
    dup: false,
  };
}

/** The parts of aedes' mqemitter the local-subscriber check uses. */
interface LocalEmitter {
  _matcher: { match(topic: string): unknown[] };
  on(...args: unknown[]): unknown;
  removeListener(...args: unknown[]): unknown;
  removeAllListeners(...args: unknown[]): unknown;
}

/** aedes' keepalive fields on a client (its handler refreshes the timer on every packet). */
interface KeepaliveState {
  _keepaliveInterval: number;
  _keepaliveTimer: NodeJS.Timeout | null;
}

/**
 * A topic the device lane may take: not a `$` topic (aedes' path acknowledges and discards
 * those), no wildcard or NUL, and at most aedes' 100 levels (aedes refuses deeper ones).
 */
export function plainTopic(topic: string): boolean {
  if (topic.length === 0 || topic.charCodeAt(0) === 0x24) return false;
  let levels = 1;
  for (let i = 0; i < topic.length; i++) {
    const c = topic.charCodeAt(i);
    if (c === 0x2b || c === 0x23 || c === 0) return false;
    if (c === 0x2f && ++levels > MAX_TOPIC_LEVELS) return false;
  }
  return true;
}

interface ActivityThrottle {
  /** Records a row now, or counts it into the next row for the same type and address. */
  note(
    activityType: string,
    remoteAddress: string | null,
    metadata: Record<string, unknown>,
    errorCode: string | null,
    errorMessage: string,
  ): void;
  /** Writes every pending count now (shutdown). */
  flush(): void;
}

/**
 * Floods (brute force, oversized packets, connection storms) must not become an activity-row
 * flood: at most one row per second per type and remote address, carrying how many it stands for.
 */
function createActivityThrottle(activity: ActivityLog, logger: Logger, windowMs: number): ActivityThrottle {
  const flood = createFloodReporter<ActivityEntry>({
    windowMs,
    fold: latestEvent,
    overflowKey: (_key, row) => `${row.activityType}|*`,
    report(_key, row, count) {
      const entry = { ...row, metadata: { ...row.metadata, count } };
      logger.warn({ activityType: entry.activityType, ...entry.metadata }, entry.activityType);
      activity.record(entry);
    },
  });
  return {
    note(activityType, remoteAddress, metadata, errorCode, errorMessage) {
      flood.note(`${activityType}|${remoteAddress ?? ''}`, {
        activityType,
        direction: 'incoming',
        status: 'failed',
        errorCode,
        errorMessage,
        metadata,
      });
    },
    flush: () => flood.flush(),
  };
}

function asError(err: unknown): Error {
  return err instanceof Error ? err : new Error(errorMessage(err));
}
