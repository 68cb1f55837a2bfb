import { z } from 'zod';
import { parseDuration } from '../../config/units.js';
import { matchTopic } from '../../common/topic-match.js';

const durationMs = (fallback: string) =>
  z
    .union([z.string(), z.number()])
    .transform((v, ctx) => {
      const ms = parseDuration(v);
      if (ms === undefined) {
        ctx.addIssue({ code: z.ZodIssueCode.custom, message: `"${v}" is not a duration; write e.g. 10s` });
        return z.NEVER;
      }
      return ms;
    })
    .default(fallback);

// LightDB paths are `/`-separated without a leading slash (§3.1 LightDB State, §3.2 `/.s/<path>`).
const lightDbPath = z
  .string()
  .regex(
    /^[A-Za-z0-9_-]+(\/[A-Za-z0-9_-]+)*$/,
    'must be a path like `desired` or `gateway/state` (no leading /)',
  );

/**
 * Settings of the `golioth` provider. `apiKey` and each device's `psk` are secrets: write them
 * as `${ENV_NAME}` or `{ file: /path }`.
 */
export const goliothSettingsSchema = z
  .object({
    /** The project ID (slug), as in the console URL and in PSK identities `<name>@<projectId>`. */
    projectId: z.string().regex(/^[a-z0-9][a-z0-9-]*$/, 'must be a Golioth project ID (lower-case slug)'),
    /** A project API key (management API, `x-api-key`). */
    apiKey: z.string().min(1),
    baseUrl: z
      .string()
      .url()
      .regex(/^https?:\/\//, 'must be an http(s) URL')
      .default('https://api.golioth.io'),
    /** PEM file of the CA that signs the API's certificate, when it is not a public one. */
    ca: z.string().optional(),
    /** CoAP over DTLS endpoint of the devices (§3.2). */
    coapHost: z.string().min(1).default('coap.golioth.io'),
    coapPort: z.number().int().min(1).max(65535).default(5684),
    /** LightDB State path imported as the device's desired state. */
    desiredPath: lightDbPath.default('desired'),
    /** LightDB State path that export (and `devices/{id}/state` on a route) writes. */
    reportedPath: lightDbPath.default('reported'),
    /** LightDB Stream path of telemetry: `/.s/<streamPath>[/<stream>]`. */
    streamPath: lightDbPath.default('telemetry'),
    /** How local device ids find their Golioth device: by name, by hardware ID, or either. */
    match: z.enum(['name', 'hardwareId', 'either']).default('either'),
    /** Import the devices' effective settings (device > blueprint > project) into `desired`. */
    importSettings: z.boolean().default(true),
    /**
     * Per local device: its PSK for CoAP over DTLS, and its Golioth name when it differs from the
     * local id. The PSK identity is `<name>@<projectId>` unless `identity` says otherwise.
     */
    devices: z
      .record(
        z.string().min(1),
        z
          .object({
            psk: z.string().min(1).optional(),
            name: z.string().min(1).optional(),
            identity: z.string().min(1).optional(),
          })
          .strict(),
      )
      .default({}),
    /** Most DTLS sessions open at once (one per device that sends); the least recently used idle one closes first. */
    maxSessions: z.number().int().min(1).max(10_000).default(200),
    sessionIdleTimeout: durationMs('5m'),
    handshakeTimeout: durationMs('10s'),
    requestTimeout: durationMs('15s'),
    /** CoAP ACK_TIMEOUT and MAX_RETRANSMIT (RFC 7252 §4.8): a request is given up after about 2^(n+1) × this. */
    coapAckTimeout: durationMs('2s'),
    coapMaxRetransmit: z.number().int().min(0).max(8).default(4),
    /** REST requests in flight at once during a sync. */
    syncConcurrency: z.number().int().min(1).max(32).default(8),
  })
  .strict();

export type GoliothSettings = z.output<typeof goliothSettingsSchema>;

export interface ConfigProblem {
  path: (string | number)[];
  message: string;
}

/**
 * Telemetry reaches LightDB Stream only over CoAP with the device's own PSK (§3.1 Ingest), so a
 * route that sends a device's telemetry to Golioth needs that device's PSK. Checked by
 * `check-config` against the devices the config lists.
 */
export function goliothRouteProblems(
  settings: GoliothSettings,
  routes: readonly { from: string }[],
  deviceIds: readonly string[],
): ConfigProblem[] {
  const problems: ConfigProblem[] = [];
  const hasPsk = (id: string) => settings.devices[id]?.psk !== undefined;
  routes.forEach((route, i) => {
    // A filter that can match some devices/<id>/telemetry[/...] topic.
    const probe = (id: string) =>
      matchTopic(route.from, `devices/${id}/telemetry`) !== null ||
      matchTopic(route.from, `devices/${id}/telemetry/x`) !== null;
    const sendsTelemetry =
      probe('+any+') || deviceIds.some(probe) || Object.keys(settings.devices).some(probe);
    if (!sendsTelemetry) return;
    const missing = deviceIds.filter((id) => probe(id) && !hasPsk(id));
    if (Object.values(settings.devices).every((d) => d.psk === undefined)) {
      problems.push({
        path: ['routes', i, 'from'],
        message:
          'this route sends telemetry to Golioth, which takes it only over CoAP with each device’s PSK: add settings.devices.<id>.psk, or remove the route',
      });
    } else if (missing.length > 0) {
      problems.push({
        path: ['settings', 'devices'],
        message: `telemetry of ${missing.join(', ')} is routed to Golioth but has no PSK: add settings.devices.<id>.psk for each (Golioth takes telemetry only over CoAP with the device’s PSK)`,
      });
    }
  });
  return problems;
}
