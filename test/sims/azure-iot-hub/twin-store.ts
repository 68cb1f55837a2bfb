/**
 * The simulator's device twins (cloud-protocols.md §2.3): desired and reported properties, each
 * with its own `$version` that only ever increases, `null` members deleting, key and size rules.
 */
export type JsonObject = { [key: string]: unknown };

export interface Twin {
  desired: JsonObject;
  desiredVersion: number;
  reported: JsonObject;
  reportedVersion: number;
  /** ISO time of the last change of each side, for the service API's `$metadata`. */
  desiredUpdated: string;
  reportedUpdated: string;
}

/** §2.3: desired and reported are limited to 32 KB each. */
export const TWIN_SECTION_LIMIT = 32 * 1024;

const isObject = (v: unknown): v is JsonObject => typeof v === 'object' && v !== null && !Array.isArray(v);

/** Why a patch is refused (the hub answers 400), or undefined. */
export function patchProblem(patch: unknown, depth = 1): string | undefined {
  if (!isObject(patch)) return 'the patch is not a JSON object';
  if (depth > 10) return 'the patch is nested deeper than 10 levels';
  for (const [key, value] of Object.entries(patch)) {
    // §2.3 twin rules: keys must not contain `.`, `$`, space or control characters.
    const control = [...key].some((c) => c.charCodeAt(0) < 0x20);
    if (key.length === 0 || Buffer.byteLength(key) > 1024 || /[.$ ]/.test(key) || control) {
      return `the key "${key}" is not allowed in a twin`;
    }
    if (typeof value === 'string' && Buffer.byteLength(value) > 4096)
      return `the value of ${key} is over 4 KB`;
    if (isObject(value)) {
      const inner = patchProblem(value, depth + 1);
      if (inner) return inner;
    }
  }
  return undefined;
}

export function mergePatch(target: JsonObject, patch: JsonObject): JsonObject {
  const out: JsonObject = { ...target };
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete out[key];
    else if (isObject(value))
      out[key] = mergePatch(isObject(out[key]) ? (out[key] as JsonObject) : {}, value);
    else out[key] = value;
  }
  return out;
}

export function createTwin(): Twin {
  const now = new Date().toISOString();
  return {
    desired: {},
    desiredVersion: 1,
    reported: {},
    reportedVersion: 1,
    desiredUpdated: now,
    reportedUpdated: now,
  };
}

/** Applies a patch to one side; returns the new version, or a 400 problem. */
export function applyPatch(
  twin: Twin,
  side: 'desired' | 'reported',
  patch: unknown,
): { version: number } | { problem: string } {
  const problem = patchProblem(patch);
  if (problem) return { problem };
  const merged = mergePatch(twin[side], patch as JsonObject);
  if (Buffer.byteLength(JSON.stringify(merged)) > TWIN_SECTION_LIMIT) {
    return { problem: `the ${side} properties would exceed 32 KB` };
  }
  twin[side] = merged;
  const now = new Date().toISOString();
  if (side === 'desired') {
    twin.desiredVersion++;
    twin.desiredUpdated = now;
    return { version: twin.desiredVersion };
  }
  twin.reportedVersion++;
  twin.reportedUpdated = now;
  return { version: twin.reportedVersion };
}

/** The device-side GET body: `{ desired: {…, $version}, reported: {…, $version} }`. */
export function deviceTwinBody(twin: Twin): JsonObject {
  return {
    desired: { ...twin.desired, $version: twin.desiredVersion },
    reported: { ...twin.reported, $version: twin.reportedVersion },
  };
}
