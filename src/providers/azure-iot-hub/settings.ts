import { z } from 'zod';
import { matchTopic } from '../../common/topic-match.js';
import { parseDuration } from '../../config/units.js';
import { parseSasToken } from './sas.js';

const duration = (fallback: string) =>
  z
    .union([z.string(), z.number()])
    .transform((v, ctx) => {
      const ms = parseDuration(v);
      if (ms === undefined) {
        ctx.addIssue({ code: z.ZodIssueCode.custom, message: `"${v}" is not a duration; write e.g. 30s` });
        return z.NEVER;
      }
      return ms;
    })
    .default(fallback);

/** A symmetric key as the portal shows it: base64 of at least 16 bytes. Secrets: `${ENV}` or `{ file: … }`. */
const symmetricKey = z.string().refine((k) => {
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(k)) return false;
  return Buffer.from(k, 'base64').length >= 16;
}, 'is not a base64 symmetric key; copy the primary key of the device or shared access policy from the hub');

const deviceId = z.string().regex(/^[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}$/, 'is not a valid IoT Hub device id');

const auth = z.discriminatedUnion('type', [
  /** Each child device's own key (its primary or secondary key). */
  z.object({ type: z.literal('device-keys'), keys: z.record(deviceId, symmetricKey) }).strict(),
  /**
   * A hub shared access policy with DeviceConnect signs a token for every child device (the
   * "cloud protocol gateway" pattern, cloud-protocols.md §2.5).
   */
  z
    .object({ type: z.literal('policy'), policyName: z.string().min(1).default('device'), key: symmetricKey })
    .strict(),
  /** Tokens made elsewhere, per device; they cannot be renewed, so they are used until `se`. */
  z
    .object({
      type: z.literal('sas-tokens'),
      tokens: z.record(
        deviceId,
        z
          .string()
          .refine(
            (t) => parseSasToken(t) !== undefined,
            'is not a SharedAccessSignature sr=…&sig=…&se=… token',
          ),
      ),
    })
    .strict(),
  /** X.509: a certificate per child whose CN is its device id; `{deviceId}` in the paths. */
  z.object({ type: z.literal('x509'), cert: z.string().min(1), key: z.string().min(1) }).strict(),
]);

/**
 * Settings of the `azure-iot-hub` provider (identity translation: one MQTT 3.1.1 link per active
 * child device, cloud-protocols.md §2).
 */
export const azureIotHubSettingsSchema = z
  .object({
    /** `<hub>.azure-devices.net`: in every username and token. */
    hostName: z
      .string()
      .regex(
        /^[A-Za-z0-9.-]+$/,
        'must be the hub host name, e.g. my-hub.azure-devices.net (no scheme, no port)',
      ),
    /** Dial this address instead of resolving `hostName` (a private endpoint); TLS still checks `hostName`. */
    address: z.string().min(1).optional(),
    port: z.number().int().min(1).max(65535).default(8883),
    /** Extra CA certificate file to trust (a private PKI or a test hub); the system CAs otherwise. */
    ca: z.string().optional(),
    auth,
    /**
     * A service policy with RegistryRead (e.g. `registryRead`, `iothubowner`): `import` reads the
     * twins with the service API's query instead of a twin GET per device.
     */
    service: z
      .object({
        policyName: z.string().min(1),
        key: symmetricKey,
        port: z.number().int().min(1).max(65535).default(443),
      })
      .strict()
      .optional(),
    /** Lifetime of each SAS token the provider signs. */
    tokenTtl: duration('1h'),
    /** A link is replaced with a fresh token this long before its token expires. */
    tokenRenewBefore: duration('5m'),
    /** MQTT keep-alive; the hub's idle limit makes 1177 s the most that is useful (§2.1). */
    keepalive: duration('180s'),
    connectTimeout: duration('10s'),
    publishTimeout: duration('30s'),
    /** How long a direct method waits for the device's response on `commands/{name}/response`. */
    methodTimeout: duration('30s'),
    /** Most device links open at once; the least recently used idle link makes room. */
    maxLinks: z.number().int().min(1).max(100_000).default(1000),
    /** A link with no traffic this long closes, unless its device is connected locally. */
    idleTimeout: duration('5m'),
    /** New device connections per second (the hub throttles connects per unit, §2.4). */
    connectsPerSecond: z.number().positive().default(50),
    /** Twin reads and updates per second during import/export without a service policy (§2.4). */
    twinOpsPerSecond: z.number().positive().default(10),
  })
  .strict()
  .superRefine((s, ctx) => {
    if (s.tokenRenewBefore >= s.tokenTtl) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        path: ['tokenRenewBefore'],
        message: `must be shorter than tokenTtl (${s.tokenTtl} ms), or every link would be renewed at once`,
      });
    }
    if (s.keepalive > 1_177_000) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        path: ['keepalive'],
        message: 'must be at most 1177s: the hub closes a link idle for 1767 s whatever the keep-alive',
      });
    }
  });

export type AzureIotHubSettings = z.output<typeof azureIotHubSettingsSchema>;

export interface AzureRouteProblem {
  /** Relative to the integration. */
  path: (string | number)[];
  message: string;
}

/**
 * check-config: routes that queue nothing this provider can send (every row would be
 * dead-lettered), and routed devices without a key or token when the keys are per device.
 */
export function azureRouteProblems(
  settings: AzureIotHubSettings,
  routes: readonly { from: string }[],
  deviceIds: readonly string[],
): AzureRouteProblem[] {
  const problems: AzureRouteProblem[] = [];
  const mapped = (id: string) => [
    `devices/${id}/telemetry`,
    `devices/${id}/telemetry/x`,
    `devices/${id}/state`,
    `devices/${id}/commands/x/response`,
  ];
  const routedIds = new Set<string>();
  routes.forEach((route, i) => {
    const probe = (id: string) => mapped(id).some((topic) => matchTopic(route.from, topic) !== null);
    if (!probe('+any+') && !deviceIds.some(probe)) {
      problems.push({
        path: ['routes', i, 'from'],
        message:
          'this route matches nothing azure-iot-hub sends (devices/<id>/telemetry[/…], /state, /commands/<name>/response), so every row it queues would be dead-lettered: change or remove it',
      });
    }
    for (const id of deviceIds) if (probe(id)) routedIds.add(id);
  });
  const auth = settings.auth;
  const keyed =
    auth.type === 'device-keys' ? auth.keys : auth.type === 'sas-tokens' ? auth.tokens : undefined;
  if (keyed !== undefined) {
    const missing = [...routedIds].filter((id) => keyed[id] === undefined).sort();
    if (missing.length > 0) {
      problems.push({
        path: ['settings', 'auth', auth.type === 'device-keys' ? 'keys' : 'tokens'],
        message: `${missing.join(', ')} ${missing.length === 1 ? 'is' : 'are'} routed to Azure IoT Hub but ${missing.length === 1 ? 'has' : 'have'} no ${auth.type === 'device-keys' ? 'key' : 'token'} here: add ${missing.length === 1 ? 'it' : 'them'}, or use a DeviceConnect policy`,
      });
    }
  }
  return problems;
}
