import { decodePropertyBag, type PropertyBag } from './property-bag.js';

/**
 * The IoT Hub device topics (cloud-protocols.md §2.3) and the canonical local topics (SPEC §4)
 * they map to. Only documented topics are ever built here: the hub closes the connection on
 * anything else.
 */
export const TWIN_RESPONSES = '$iothub/twin/res/#';
export const DESIRED_PATCHES = '$iothub/twin/PATCH/properties/desired/#';
export const METHOD_REQUESTS = '$iothub/methods/POST/#';

export const c2dFilter = (deviceId: string) => `devices/${deviceId}/messages/devicebound/#`;
export const telemetryTopic = (deviceId: string, bag: string) => `devices/${deviceId}/messages/events/${bag}`;
export const twinGetTopic = (rid: string) => `$iothub/twin/GET/?$rid=${encodeURIComponent(rid)}`;
export const reportedPatchTopic = (rid: string) =>
  `$iothub/twin/PATCH/properties/reported/?$rid=${encodeURIComponent(rid)}`;
export const methodResponseTopic = (status: number, rid: string) =>
  `$iothub/methods/res/${status}/?$rid=${encodeURIComponent(rid)}`;

export interface TwinResponse {
  status: number;
  rid: string;
  version: number | undefined;
}

/** `$iothub/twin/res/{status}/?$rid={rid}[&$version={n}]` */
export function parseTwinResponse(topic: string): TwinResponse | undefined {
  const m = /^\$iothub\/twin\/res\/(\d+)\/(.*)$/.exec(topic);
  if (!m) return undefined;
  const bag = decodePropertyBag(m[2]!);
  const rid = bag.$rid;
  if (rid === undefined || rid === null) return undefined;
  const version = bag.$version === undefined || bag.$version === null ? undefined : Number(bag.$version);
  return { status: Number(m[1]), rid, version: Number.isFinite(version) ? version : undefined };
}

/** `$iothub/twin/PATCH/properties/desired/?$version={n}` */
export function parseDesiredPatchVersion(topic: string): number | undefined {
  const m = /^\$iothub\/twin\/PATCH\/properties\/desired\/(.*)$/.exec(topic);
  if (!m) return undefined;
  const version = Number(decodePropertyBag(m[1]!).$version);
  return Number.isFinite(version) ? version : undefined;
}

/** `$iothub/methods/POST/{name}/?$rid={rid}` */
export function parseMethodRequest(topic: string): { name: string; rid: string } | undefined {
  const m = /^\$iothub\/methods\/POST\/([^/]+)\/(.*)$/.exec(topic);
  if (!m) return undefined;
  const rid = decodePropertyBag(m[2]!).$rid;
  if (rid === undefined || rid === null) return undefined;
  return { name: m[1]!, rid };
}

/** `devices/{id}/messages/devicebound/{bag}`: the property bag of a C2D message. */
export function parseC2dTopic(topic: string, deviceId: string): PropertyBag | undefined {
  const prefix = `devices/${deviceId}/messages/devicebound/`;
  if (!topic.startsWith(prefix)) return undefined;
  return decodePropertyBag(topic.slice(prefix.length));
}

/** What a canonical local topic is, for the hub, and which device it speaks for. */
export type LocalTopic =
  | { kind: 'telemetry'; deviceId: string; stream: string | undefined }
  | { kind: 'state'; deviceId: string }
  | { kind: 'command-response'; deviceId: string; name: string }
  | { kind: 'other' };

/**
 * The device id comes from the topic (`devices/{id}/…`, SPEC §4): it names the hub identity,
 * whichever local client published it (the ACL decided that it may).
 */
export function classifyLocalTopic(topic: string): LocalTopic {
  const m = /^devices\/([^/]+)\/(.+)$/.exec(topic);
  if (!m) return { kind: 'other' };
  const deviceId = m[1]!;
  const rest = m[2]!;
  if (rest === 'telemetry') return { kind: 'telemetry', deviceId, stream: undefined };
  if (rest.startsWith('telemetry/'))
    return { kind: 'telemetry', deviceId, stream: rest.slice('telemetry/'.length) };
  if (rest === 'state') return { kind: 'state', deviceId };
  const c = /^commands\/([^/]+)\/response$/.exec(rest);
  if (c) return { kind: 'command-response', deviceId, name: c[1]! };
  return { kind: 'other' };
}

export const desiredLocalTopic = (deviceId: string) => `devices/${deviceId}/desired`;
export const commandLocalTopic = (deviceId: string, name: string) => `devices/${deviceId}/commands/${name}`;
