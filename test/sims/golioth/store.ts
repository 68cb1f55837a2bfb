import { randomBytes } from 'node:crypto';

/**
 * The in-memory world of the Golioth simulator: projects, their API keys, devices, PSK
 * credentials, LightDB State, settings and LightDB Stream rows. Shapes follow
 * /work/shared/docs/cloud-protocols.md §3.1; the REST server and the CoAP endpoint share it.
 */

export interface SimDevice {
  id: string;
  name: string;
  hardwareIds: string[];
  tagIds: string[];
  blueprintId: string;
  cohortId: string;
  certificateId: string;
  enabled: boolean;
  createdAt: string;
  updatedAt: string;
  /** The LightDB State document (root). */
  state: Record<string, unknown>;
  metadata: { lastReport: string | null; lastSeenOnline: string | null };
}

export interface SimCredential {
  id: string;
  type: 'PRE_SHARED_KEY';
  identity: string;
  preSharedKey: string;
  createdAt: string;
}

export type SettingDataType = 'string' | 'float' | 'integer' | 'boolean';

export interface SimSetting {
  id: string;
  key: string;
  value: unknown;
  dataType: SettingDataType;
  projectId: string;
  blueprintId: string;
  deviceId: string;
  createdAt: string;
  updatedAt: string;
}

/** One LightDB Stream record: the JSON posted to `/.s/<path>`, nested under that path. */
export interface SimStreamRow {
  deviceId: string;
  time: string;
  data: Record<string, unknown>;
}

export interface SimProject {
  id: string;
  name: string;
  organizationId: string;
  createdAt: string;
  apiKeys: Set<string>;
  devices: Map<string, SimDevice>;
  credentials: Map<string, SimCredential[]>;
  settings: Map<string, SimSetting>;
  stream: SimStreamRow[];
}

export const objectId = () => randomBytes(12).toString('hex');
export const now = () => new Date().toISOString();

export function createProject(id: string, name = id): SimProject {
  return {
    id,
    name,
    organizationId: objectId(),
    createdAt: now(),
    apiKeys: new Set(),
    devices: new Map(),
    credentials: new Map(),
    settings: new Map(),
    stream: [],
  };
}

export function newDevice(input: {
  name: string;
  hardwareIds?: string[];
  tagIds?: string[];
  blueprintId?: string;
  cohortId?: string;
}): SimDevice {
  const t = now();
  return {
    id: objectId(),
    name: input.name,
    // Golioth generates a hardware ID when none is given (§3.1 Devices).
    hardwareIds: input.hardwareIds?.length ? [...input.hardwareIds] : [randomBytes(8).toString('hex')],
    tagIds: [...(input.tagIds ?? [])],
    blueprintId: input.blueprintId ?? '',
    cohortId: input.cohortId ?? '',
    certificateId: '',
    enabled: true,
    createdAt: t,
    updatedAt: t,
    state: {},
    metadata: { lastReport: null, lastSeenOnline: null },
  };
}

/** The REST view of a device; `data` only when a statePath was asked for. */
export function deviceView(device: SimDevice, data?: unknown): Record<string, unknown> {
  const { state: _state, ...rest } = device;
  return { ...rest, ...(data === undefined ? {} : { data }) };
}

const segments = (path: string) => path.split('/').filter((s) => s.length > 0);

/** The value at a `/`-separated path of a JSON document, or undefined. */
export function getAtPath(doc: unknown, path: string): unknown {
  let node: unknown = doc;
  for (const seg of segments(path)) {
    if (node === null || typeof node !== 'object' || Array.isArray(node)) return undefined;
    node = (node as Record<string, unknown>)[seg];
  }
  return node;
}

/** Sets the sub-tree at `path` and leaves its siblings intact (§3.1 LightDB State, §3.2 `/.d`). */
export function setAtPath(
  doc: Record<string, unknown>,
  path: string,
  value: unknown,
): Record<string, unknown> {
  const segs = segments(path);
  if (segs.length === 0) {
    return value !== null && typeof value === 'object' && !Array.isArray(value)
      ? { ...(value as Record<string, unknown>) }
      : doc;
  }
  let node = doc;
  for (const seg of segs.slice(0, -1)) {
    const next = node[seg];
    if (next === null || typeof next !== 'object' || Array.isArray(next)) node[seg] = {};
    node = node[seg] as Record<string, unknown>;
  }
  node[segs[segs.length - 1]!] = value;
  return doc;
}

export function deleteAtPath(doc: Record<string, unknown>, path: string): boolean {
  const segs = segments(path);
  const parent = getAtPath(doc, segs.slice(0, -1).join('/'));
  if (parent === null || typeof parent !== 'object' || Array.isArray(parent)) return false;
  const last = segs[segs.length - 1]!;
  if (!(last in parent)) return false;
  delete (parent as Record<string, unknown>)[last];
  return true;
}

/** Deep merge for PATCH: objects merge key by key, anything else replaces. */
export function mergeDeep(target: unknown, patch: unknown): unknown {
  if (
    patch === null ||
    typeof patch !== 'object' ||
    Array.isArray(patch) ||
    target === null ||
    typeof target !== 'object' ||
    Array.isArray(target)
  ) {
    return patch;
  }
  const out: Record<string, unknown> = { ...(target as Record<string, unknown>) };
  for (const [k, v] of Object.entries(patch as Record<string, unknown>)) out[k] = mergeDeep(out[k], v);
  return out;
}

/** A setting value's JSON type must fit its data type (§3.1 Settings). */
export function settingValueFits(dataType: SettingDataType, value: unknown): boolean {
  switch (dataType) {
    case 'string':
      return typeof value === 'string';
    case 'boolean':
      return typeof value === 'boolean';
    case 'integer':
      return typeof value === 'number' && Number.isInteger(value);
    case 'float':
      return typeof value === 'number';
  }
}

/** A device's effective settings: device > blueprint > project, one entry per key (§3.1). */
export function effectiveSettings(project: SimProject, device: SimDevice): SimSetting[] {
  const byKey = new Map<string, { rank: number; setting: SimSetting }>();
  for (const s of project.settings.values()) {
    let rank: number;
    if (s.deviceId !== '') {
      if (s.deviceId !== device.id) continue;
      rank = 3;
    } else if (s.blueprintId !== '') {
      if (s.blueprintId !== device.blueprintId) continue;
      rank = 2;
    } else {
      rank = 1;
    }
    const prev = byKey.get(s.key);
    if (prev === undefined || prev.rank < rank) byKey.set(s.key, { rank, setting: s });
  }
  return [...byKey.values()].map((e) => e.setting).sort((a, b) => a.key.localeCompare(b.key));
}

/** Flattens `{a:{b:1}}` into `{"a.b":1}`: stream fields are addressed by dotted paths (§3.1 LightDB Stream). */
export function flatten(
  value: unknown,
  prefix = '',
  out: Record<string, unknown> = {},
): Record<string, unknown> {
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
      flatten(v, prefix === '' ? k : `${prefix}.${k}`, out);
    }
  } else if (prefix !== '') {
    out[prefix] = value;
  }
  return out;
}
