export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

export function isJsonObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * Applies a twin patch (cloud-protocols.md §2.3): every member upserts, `null` deletes, nested
 * objects merge member by member. Returns a new object; `target` is not changed.
 */
export function mergeTwinPatch(target: JsonObject, patch: JsonObject): JsonObject {
  const out: JsonObject = { ...target };
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete out[key];
    else if (isJsonObject(value)) {
      const current = out[key];
      out[key] = mergeTwinPatch(isJsonObject(current) ? current : {}, value);
    } else out[key] = value;
  }
  return out;
}

/** The properties without the service's `$version` / `$metadata` members, for local devices. */
export function withoutTwinMeta(properties: JsonObject): JsonObject {
  const out: JsonObject = {};
  for (const [key, value] of Object.entries(properties)) {
    if (key === '$version' || key === '$metadata') continue;
    out[key] = value;
  }
  return out;
}
