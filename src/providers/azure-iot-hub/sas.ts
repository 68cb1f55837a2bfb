import { createHmac } from 'node:crypto';

/**
 * Azure IoT Hub shared access signatures (cloud-protocols.md §2.2), with node:crypto only.
 *
 * `SharedAccessSignature sr=<enc(resource)>&sig=<enc(base64 hmac)>&se=<expiry s>[&skn=<policy>]`,
 * where the HMAC-SHA256 key is the base64-decoded symmetric key and the string to sign is the
 * encoded resource exactly as sent in `sr`, a newline, and `se`.
 */
export interface SasTokenInput {
  /** Resource URI without scheme: `{host}/devices/{deviceId}` for a device link. */
  resource: string;
  /** The symmetric key, base64 as the portal shows it (device key or policy key). */
  key: string;
  /** Expiry, whole seconds since the epoch. */
  expiresAt: number;
  /** The shared access policy's name when `key` is a policy key (e.g. `device`). */
  policyName?: string;
}

/**
 * Percent-encoding as the Azure SDKs do it: encodeURIComponent plus `!'()*`, which it leaves
 * alone but .NET and the service encode.
 */
export function encodeSasComponent(value: string): string {
  return encodeURIComponent(value).replace(
    /[!'()*]/g,
    (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`,
  );
}

export function signSas(encodedResource: string, expiresAt: number, key: string): string {
  return createHmac('sha256', Buffer.from(key, 'base64'))
    .update(`${encodedResource}\n${expiresAt}`, 'utf8')
    .digest('base64');
}

export function createSasToken(input: SasTokenInput): string {
  const sr = encodeSasComponent(input.resource);
  const sig = encodeSasComponent(signSas(sr, input.expiresAt, input.key));
  const skn = input.policyName === undefined ? '' : `&skn=${encodeSasComponent(input.policyName)}`;
  return `SharedAccessSignature sr=${sr}&sig=${sig}&se=${input.expiresAt}${skn}`;
}

export interface ParsedSasToken {
  /** The `sr` value exactly as it appears in the token (still encoded). */
  rawResource: string;
  resource: string;
  signature: string;
  expiresAt: number;
  policyName: string | undefined;
}

/** Parses a token's fields (any order); undefined when it is not a SAS token. */
export function parseSasToken(token: string): ParsedSasToken | undefined {
  const prefix = 'SharedAccessSignature ';
  if (!token.startsWith(prefix)) return undefined;
  const fields = new Map<string, string>();
  for (const part of token.slice(prefix.length).split('&')) {
    const eq = part.indexOf('=');
    if (eq <= 0) return undefined;
    fields.set(part.slice(0, eq), part.slice(eq + 1));
  }
  const sr = fields.get('sr');
  const sig = fields.get('sig');
  const se = fields.get('se');
  if (sr === undefined || sig === undefined || se === undefined || !/^\d+$/.test(se)) return undefined;
  try {
    const skn = fields.get('skn');
    return {
      rawResource: sr,
      resource: decodeURIComponent(sr),
      signature: decodeURIComponent(sig),
      expiresAt: Number(se),
      policyName: skn === undefined ? undefined : decodeURIComponent(skn),
    };
  } catch {
    // A malformed percent-escape: not a token we can read.
    return undefined;
  }
}

/** The device link's resource URI (§2.2): the hub host name, `/devices/`, the device id. */
export function deviceResource(hostName: string, deviceId: string): string {
  return `${hostName}/devices/${deviceId}`;
}
