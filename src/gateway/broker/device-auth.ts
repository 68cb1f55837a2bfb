import { createHash, timingSafeEqual } from 'node:crypto';
import type { Config, DeviceConfig } from '../../config/schema.js';
import { anonymousAcl, deviceAcl, sameAcl } from './acl.js';
import { createLoginBackoff, type LoginLock } from './admission.js';
import { createPasswordVerifier, type PasswordVerifier } from './password-hash.js';

/**
 * Who may connect to the embedded broker (SPEC §4, S1–S7). A device is bound to one identity:
 * its id is the username, or the CN of its verified client certificate, and the MQTT client id
 * must equal it — so one device can never take over another's session (aedes #16).
 */

export type Identity =
  { kind: 'device'; id: string; method: 'password' | 'certificate' } | { kind: 'anonymous'; id: string };

export interface ConnectAttempt {
  /** As sent on the wire; '' when the client sent none. */
  clientId: string;
  username: string | undefined;
  password: Buffer | undefined;
  clean: boolean;
  /** CN of a verified client certificate, when the listener requires one. */
  certIdentity: string | null;
  /** Source address, for the per-source login backoff; null or absent when unknown. */
  remoteAddress?: string | null;
}

export type AuthFailureReason =
  | 'invalid_client_id'
  | 'empty_client_id_persistent'
  | 'invalid_username'
  | 'missing_password'
  | 'unknown_device'
  | 'bad_password'
  | 'client_id_mismatch'
  | 'username_mismatch'
  | 'unknown_certificate'
  | 'anonymous_refused'
  | 'login_backoff'
  | 'busy';

/** MQTT 3.1.1 CONNACK codes: 2 identifier rejected, 3 server unavailable, 4 bad username or password, 5 not authorized. */
export type ConnackRefusal = 2 | 3 | 4 | 5;

export type AuthResult =
  | { ok: true; identity: Identity }
  | {
      ok: false;
      returnCode: ConnackRefusal;
      reason: AuthFailureReason;
      /** login_backoff: the lock in force; a failed password check: the locks it started. */
      locks?: LoginLock[];
    };

export interface DeviceAuthenticator {
  authenticate(attempt: ConnectAttempt): Promise<AuthResult>;
  /**
   * Live reload: the next attempts see the new devices, anonymous policy and backoff settings.
   * Cached logins of devices whose passwordHash changed (or that were removed) are dropped, and
   * so is the failure count of a device whose credentials changed or that was added.
   */
  update(config: Config['broker']): void;
  device(id: string): DeviceConfig | undefined;
  /**
   * A password session of this device ended: its cached login stays valid for loginCacheTtl
   * from now, so a network blip's reconnect storm does not cost one scrypt per device.
   */
  sessionEnded(id: string): void;
}

export interface DeviceAuthOptions {
  config: Config['broker'];
  verifier?: PasswordVerifier;
  /**
   * scrypt runs in libuv's pool (4 threads by default), next to the WAL syncs every durable
   * PUBACK waits for: logins take at most this many threads (default 2), so a login storm
   * neither starves the syncs nor holds more than two of scrypt's 16 MiB blocks at once.
   */
  maxConcurrentVerifications?: number;
  /** Logins waiting beyond this are answered "server unavailable" instead of queueing forever. */
  maxQueuedVerifications?: number;
  /** Usernames and sources tracked by the login backoff, per table. */
  maxBackoffEntries?: number;
  /** ms, for the login cache and the backoff; monotonic by default, injectable for tests. */
  now?: () => number;
}

interface CachedLogin {
  /** sha256 of the password that matched. */
  digest: Buffer;
  /** The hash it matched; a different hash in the config is a miss. */
  hash: string;
  expires: number;
}

const MAX_ID_LENGTH = 256;

/** Client ids and usernames with `+ # / $` or NUL could widen topic templates (CVE-2017-7650 class). */
export function isSafeIdentifier(value: string): boolean {
  if (value.length > MAX_ID_LENGTH) return false;
  for (const ch of ['+', '#', '/', '$', '\u0000']) if (value.includes(ch)) return false;
  return true;
}

export function createDeviceAuthenticator(options: DeviceAuthOptions): DeviceAuthenticator {
  // The login cache below is keyed by device and dropped on reload; the verifier need not cache.
  const verifier = options.verifier ?? createPasswordVerifier({ cacheSize: 0 });
  const maxConcurrent = options.maxConcurrentVerifications ?? 2;
  const maxQueued = options.maxQueuedVerifications ?? 1000;
  const now = options.now ?? (() => performance.now());
  let config = options.config;
  let devices = indexDevices(config);
  let running = 0;
  const queue: (() => void)[] = [];
  const backoff = createLoginBackoff({
    config: config.loginBackoff,
    maxEntries: options.maxBackoffEntries,
    now,
  });
  /** Keyed by device id, so it never holds more entries than there are devices. */
  const logins = new Map<string, CachedLogin>();

  const digestOf = (password: Buffer): Buffer => createHash('sha256').update(password).digest();

  const cachedLogin = (device: DeviceConfig | undefined, digest: Buffer): boolean => {
    if (device?.passwordHash === undefined) return false;
    const entry = logins.get(device.id);
    if (entry === undefined) return false;
    if (entry.hash !== device.passwordHash || entry.expires <= now()) {
      logins.delete(device.id);
      return false;
    }
    return timingSafeEqual(entry.digest, digest);
  };

  const rememberLogin = (device: DeviceConfig, digest: Buffer): void => {
    if (config.loginCacheTtl <= 0 || device.passwordHash === undefined) return;
    logins.set(device.id, { digest, hash: device.passwordHash, expires: now() + config.loginCacheTtl });
  };

  /** Runs a verification under the concurrency bound; undefined when the queue is full. */
  const limited = async (run: () => Promise<boolean>): Promise<boolean | undefined> => {
    if (running >= maxConcurrent) {
      if (queue.length >= maxQueued) return undefined;
      await new Promise<void>((resolve) => queue.push(resolve));
    } else {
      running++;
    }
    try {
      return await run();
    } finally {
      const next = queue.shift();
      // The slot passes to the next waiter directly; `running` only drops when nobody waits.
      if (next) next();
      else running--;
    }
  };

  const fail = (returnCode: ConnackRefusal, reason: AuthFailureReason): AuthResult => ({
    ok: false,
    returnCode,
    reason,
  });

  return {
    device: (id) => devices.get(id),
    sessionEnded(id) {
      const entry = logins.get(id);
      if (entry === undefined || config.loginCacheTtl <= 0) return;
      if (devices.get(id)?.passwordHash !== entry.hash) logins.delete(id);
      else entry.expires = now() + config.loginCacheTtl;
    },
    update(next) {
      const previous = devices;
      config = next;
      devices = indexDevices(next);
      backoff.configure(next.loginBackoff);
      if (next.loginCacheTtl <= 0) logins.clear();
      for (const [id, entry] of logins) if (devices.get(id)?.passwordHash !== entry.hash) logins.delete(id);
      // A device just provisioned or given new credentials should not wait out old failures.
      for (const device of next.devices)
        if (previous.get(device.id)?.passwordHash !== device.passwordHash) backoff.reset(device.id);
    },
    async authenticate(attempt) {
      const { clientId, username, password, certIdentity } = attempt;
      if (!isSafeIdentifier(clientId)) return fail(2, 'invalid_client_id');
      // MQTT-3.1.3-8; aedes 1.x accepts it (aedes #1095).
      if (clientId === '' && !attempt.clean) return fail(2, 'empty_client_id_persistent');

      if (certIdentity !== null) {
        const device = devices.get(certIdentity);
        if (!device) return fail(5, 'unknown_certificate');
        if (username !== undefined && username !== '' && username !== certIdentity)
          return fail(4, 'username_mismatch');
        if (clientId !== certIdentity) return fail(2, 'client_id_mismatch');
        return { ok: true, identity: { kind: 'device', id: device.id, method: 'certificate' } };
      }

      if (username !== undefined) {
        // Ids that cannot exist in the config: the format is public, so answering fast reveals nothing.
        if (username === '' || !isSafeIdentifier(username)) return fail(4, 'invalid_username');
        if (password === undefined) return fail(4, 'missing_password');
        const remoteAddress = attempt.remoteAddress ?? null;
        // Known and unknown usernames alike: the lock says nothing about which ids exist (S2).
        const lock = backoff.check(username, remoteAddress);
        if (lock !== null) return { ...fail(5, 'login_backoff'), locks: [lock] };
        const device = devices.get(username);
        const digest = digestOf(password);
        if (!cachedLogin(device, digest)) {
          // Unknown devices and certificate-only devices spend a dummy scrypt (same timing).
          const ok = await limited(() => verifier.verify(password, device?.passwordHash));
          if (ok === undefined) return fail(3, 'busy');
          if (!ok || device === undefined) {
            const locks = backoff.failed(username, remoteAddress);
            return { ...fail(4, device ? 'bad_password' : 'unknown_device'), locks };
          }
          rememberLogin(device, digest);
        }
        backoff.reset(username);
        if (clientId !== username) return fail(2, 'client_id_mismatch');
        return { ok: true, identity: { kind: 'device', id: username, method: 'password' } };
      }

      if (!config.allowAnonymous) return fail(5, 'anonymous_refused');
      return { ok: true, identity: { kind: 'anonymous', id: clientId } };
    },
  };
}

function indexDevices(config: Config['broker']): Map<string, DeviceConfig> {
  return new Map(config.devices.map((d) => [d.id, d]));
}

/**
 * Why a connected client must be disconnected after a config change, or null when the change
 * does not concern it: its device was removed, its password hash or ACL changed, or anonymous
 * access was withdrawn or narrowed.
 */
export function revocationReason(
  identity: Identity,
  before: Config['broker'],
  after: Config['broker'],
  gatewayId: string,
): 'device_removed' | 'credentials_changed' | 'acl_changed' | 'anonymous_disabled' | null {
  if (identity.kind === 'anonymous') {
    if (!after.allowAnonymous) return 'anonymous_disabled';
    return sameAcl(anonymousAcl(before), anonymousAcl(after)) ? null : 'acl_changed';
  }
  const next = after.devices.find((d) => d.id === identity.id);
  if (!next) return 'device_removed';
  const prev = before.devices.find((d) => d.id === identity.id);
  if (!prev) return 'credentials_changed';
  if (identity.method === 'password' && prev.passwordHash !== next.passwordHash) return 'credentials_changed';
  return sameAcl(deviceAcl(prev, gatewayId), deviceAcl(next, gatewayId)) ? null : 'acl_changed';
}
