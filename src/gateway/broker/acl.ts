import type { AclConfig, Config, DeviceConfig } from '../../config/schema.js';
import { matchTopic } from '../../common/topic-match.js';

/**
 * Topic access for local clients. Pure functions over an effective ACL: allow lists for
 * publish and subscribe, and a deny list that wins over both. Any `$` topic (`$SYS`, `$share`)
 * is always closed to clients, whatever the lists say.
 */
export interface EffectiveAcl {
  readonly publish: readonly string[];
  readonly subscribe: readonly string[];
  readonly deny: readonly string[];
}

export const EMPTY_ACL: EffectiveAcl = Object.freeze({ publish: [], subscribe: [], deny: [] });

/** Publish and subscribe under `devices/{id}/#`; also read the gateway's retained status. */
export function defaultDeviceAcl(deviceId: string, gatewayId: string): EffectiveAcl {
  return {
    publish: [`devices/${deviceId}/#`],
    subscribe: [`devices/${deviceId}/#`, `gateway/${gatewayId}/status`],
    deny: [],
  };
}

export function deviceAcl(device: DeviceConfig, gatewayId: string): EffectiveAcl {
  return device.acl ? fromConfig(device.acl) : defaultDeviceAcl(device.id, gatewayId);
}

/** The anonymous ACL: only what `broker.anonymousAcl` grants (default nothing), and only if allowed. */
export function anonymousAcl(broker: Config['broker']): EffectiveAcl {
  return broker.allowAnonymous ? fromConfig(broker.anonymousAcl) : EMPTY_ACL;
}

function fromConfig(acl: AclConfig): EffectiveAcl {
  return { publish: [...acl.publish], subscribe: [...acl.subscribe], deny: [...acl.deny] };
}

export function sameAcl(a: EffectiveAcl, b: EffectiveAcl): boolean {
  const same = (x: readonly string[], y: readonly string[]) =>
    x.length === y.length && x.every((v, i) => v === y[i]);
  return same(a.publish, b.publish) && same(a.subscribe, b.subscribe) && same(a.deny, b.deny);
}

function isReserved(topicOrFilter: string): boolean {
  return topicOrFilter.startsWith('$');
}

function matches(filter: string, topic: string): boolean {
  return matchTopic(filter, topic) !== null;
}

/**
 * U+0000 is forbidden in topics and filters (MQTT-4.7.3-2), and U+FFFD is what mqtt-packet
 * makes of ill-formed UTF-8, which a server must refuse (MQTT-1.5.3-1). A topic carrying either
 * would also get the gateway's upstream link closed by a strict cloud broker.
 */
function hasForbiddenCharacter(topicOrFilter: string): boolean {
  return topicOrFilter.includes('\u0000') || topicOrFilter.includes('\uFFFD');
}

/** aedes (through qlobber) cannot route deeper topics; refusing them early also covers wills. */
export const MAX_TOPIC_LEVELS = 100;

/** May a client with this ACL publish to `topic` (a concrete topic name)? */
export function canPublish(acl: EffectiveAcl, topic: string): boolean {
  if (topic.length === 0 || isReserved(topic) || topic.includes('+') || topic.includes('#')) return false;
  if (topic.split('/').length > MAX_TOPIC_LEVELS || hasForbiddenCharacter(topic)) return false;
  if (acl.deny.some((f) => matches(f, topic))) return false;
  return acl.publish.some((f) => matches(f, topic));
}

/** May a message on `topic` be delivered to a client with this ACL (authorizeForward)? */
export function canReceive(acl: EffectiveAcl, topic: string): boolean {
  if (isReserved(topic)) return false;
  if (acl.deny.some((f) => matches(f, topic))) return false;
  return acl.subscribe.some((f) => matches(f, topic));
}

/**
 * May a client subscribe to `filter`? Only when every topic the filter can match lies within
 * one allowed filter — so `devices/a/#` allows `devices/a/x/+` but not `devices/+/telemetry` or
 * `#` — and not every one of them is denied. A filter that only reaches into a denied part (`#`
 * beside a denied `secret/#`) is granted: canReceive drops each denied message at delivery, as
 * a client of an open ACL with one denied topic expects to subscribe to `#` and `+/+`.
 */
export function canSubscribe(acl: EffectiveAcl, filter: string): boolean {
  if (filter.length === 0 || isReserved(filter) || !isValidFilter(filter)) return false;
  if (acl.deny.some((d) => filterCovers(d, filter))) return false;
  return acl.subscribe.some((allowed) => filterCovers(allowed, filter));
}

function isValidFilter(filter: string): boolean {
  if (hasForbiddenCharacter(filter)) return false;
  const levels = filter.split('/');
  return levels.every((level, i) => {
    if (level.includes('#')) return level === '#' && i === levels.length - 1;
    if (level.includes('+')) return level === '+';
    return true;
  });
}

/** True when every topic matched by `inner` is also matched by `outer`. */
export function filterCovers(outer: string, inner: string): boolean {
  const o = outer.split('/');
  const n = inner.split('/');
  // A leading wildcard never matches `$` topics (MQTT-4.7.2-1), a `$` literal level can.
  if ((o[0] === '+' || o[0] === '#') && n[0] !== undefined && n[0].startsWith('$')) return false;
  for (let i = 0; i < n.length; i++) {
    const ol = o[i];
    const nl = n[i]!;
    if (ol === '#') return true;
    if (ol === undefined) return false;
    if (nl === '#') return false;
    if (nl === '+') {
      if (ol !== '+') return false;
      continue;
    }
    if (ol !== '+' && ol !== nl) return false;
  }
  // `inner` ended: `outer` must end too, or continue only with `#` (which matches the parent).
  return o.length === n.length || (o.length === n.length + 1 && o[n.length] === '#');
}

/** True when at least one topic is matched by both filters. */
export function filtersIntersect(a: string, b: string): boolean {
  const x = a.split('/');
  const y = b.split('/');
  const wild = (l: string | undefined) => l === '+' || l === '#';
  if ((wild(x[0]) && y[0]?.startsWith('$')) || (wild(y[0]) && x[0]?.startsWith('$'))) return false;
  const n = Math.max(x.length, y.length);
  for (let i = 0; i < n; i++) {
    const xl = x[i];
    const yl = y[i];
    if (xl === '#' || yl === '#') return true;
    if (xl === undefined || yl === undefined) return false;
    if (xl === '+' || yl === '+' || xl === yl) continue;
    return false;
  }
  return true;
}
