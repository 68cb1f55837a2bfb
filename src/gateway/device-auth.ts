import type { Config, DeviceConfig } from '../config/schema.js';
import { anonymousAcl, deviceAcl, sameAcl } from './acl.js';
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
  | 'busy';

/** MQTT 3.1.1 CONNACK codes: 2 identifier rejected, 3 server unavailable, 4 bad username or password, 5 not authorized. */
export type ConnackRefusal = 2 | 3 | 4 | 5;

export type AuthResult =
  { ok: true; identity: Identity } | { ok: false; returnCode: ConnackRefusal; reason: AuthFailureReason };

export interface DeviceAuthenticator {
  authenticate(attempt: ConnectAttempt): Promise<AuthResult>;
  /** Live reload: the next attempts see the new devices and anonymous policy. */
  update(config: Config['broker']): void;
  device(id: string): DeviceConfig | undefined;
}

export interface DeviceAuthOptions {
  config: Config['broker'];
  verifier?: PasswordVerifier;
  /** scrypt runs in libuv's pool (4 threads by default): bound how much of it logins may take. */
  maxConcurrentVerifications?: number;
  /** Logins waiting beyond this are answered "server unavailable" instead of queueing forever. */
  maxQueuedVerifications?: number;
}

const MAX_ID_LENGTH = 256;

/** Client ids and usernames with `+ # / $` or NUL could widen topic templates (CVE-2017-7650 class). */
export function isSafeIdentifier(value: string): boolean {
  if (value.length > MAX_ID_LENGTH) return false;
  for (const ch of ['+', '#', '/', '$', '\u0000']) if (value.includes(ch)) return false;
  return true;
}

export function createDeviceAuthenticator(options: DeviceAuthOptions): DeviceAuthenticator {
  const verifier = options.verifier ?? createPasswordVerifier();
  const maxConcurrent = options.maxConcurrentVerifications ?? 4;
  const maxQueued = options.maxQueuedVerifications ?? 1000;
  let config = options.config;
  let devices = indexDevices(config);
  let running = 0;
  const queue: (() => void)[] = [];

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
    update(next) {
      config = next;
      devices = indexDevices(next);
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
        const device = devices.get(username);
        // Unknown devices and certificate-only devices spend a dummy scrypt (same timing).
        const ok = await limited(() => verifier.verify(password, device?.passwordHash));
        if (ok === undefined) return fail(3, 'busy');
        if (!ok) return fail(4, device ? 'bad_password' : 'unknown_device');
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
