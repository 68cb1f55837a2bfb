/**
 * IoT Hub property bags (cloud-protocols.md §2.3): `k1=v1&k2=v2`, keys and values encoded like an
 * HTTP query string, as the last topic segment of D2C and C2D messages. A key without `=` has a
 * null value; `key=` is an empty string.
 */
export type PropertyBag = Record<string, string | null>;

export function encodePropertyBag(properties: PropertyBag): string {
  const parts: string[] = [];
  for (const [key, value] of Object.entries(properties)) {
    // System properties keep their `$.` as the SDKs write them (`$.ct=application%2Fjson`).
    const k = encodeURIComponent(key).replace(/^%24\./, '$.');
    parts.push(value === null ? k : `${k}=${encodeURIComponent(value)}`);
  }
  return parts.join('&');
}

export function decodePropertyBag(bag: string): PropertyBag {
  const out: PropertyBag = {};
  if (bag === '') return out;
  // The SDKs put a leading `?` on some topics ($rid on twin/method topics).
  const text = bag.startsWith('?') ? bag.slice(1) : bag;
  for (const part of text.split('&')) {
    if (part === '') continue;
    const eq = part.indexOf('=');
    const key = safeDecode(eq < 0 ? part : part.slice(0, eq));
    out[key] = eq < 0 ? null : safeDecode(part.slice(eq + 1));
  }
  return out;
}

function safeDecode(text: string): string {
  try {
    return decodeURIComponent(text.replace(/\+/g, ' '));
  } catch {
    // A stray `%` is kept as written rather than losing the property.
    return text;
  }
}
