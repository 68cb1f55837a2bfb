import { z } from 'zod';
import { durationSchema, formatDuration } from '../../config/units.js';
import { SHADOW_NAME, templateProblem } from './topics.js';

/** A duration in ms with a default, optionally bounded (AWS keep-alive: 30 s to 1200 s). */
const durationMs = (fallback: string, min = 0, max = Number.MAX_SAFE_INTEGER) =>
  durationSchema()
    .refine(
      (ms) => ms >= min && ms <= max,
      max === Number.MAX_SAFE_INTEGER
        ? `must be at least ${formatDuration(min)}`
        : `out of range; use ${formatDuration(min)} to ${formatDuration(max)}`,
    )
    .default(fallback);

/** A bare DNS host name: the iot:Data-ATS endpoint has no scheme, port or path (§1.1). */
const HOST_NAME =
  /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$/;

const commandRule = z
  .object({
    /** AWS topic of the commands; `{thingName}` and `{name}` are whole levels (subscribed as `+`). */
    topic: z.string().min(1),
    /** A fixed command name when the topic has no `{name}`. */
    name: z
      .string()
      .regex(/^[^/+#]+$/, 'a command name is one topic level: no /, + or #')
      .optional(),
    /** Where `devices/{id}/commands/{name}/response` goes; `{thingName}`, `{name}`, `{gatewayId}`. */
    responseTopic: z.string().min(1).optional(),
  })
  .strict();

/**
 * Settings of the `aws-iot` provider: one MQTT connection as the gateway's thing, mutual TLS on
 * 8883 (or 443 with ALPN `x-amzn-mqtt-ca`), child devices as thing names through a template.
 * `cert`, `key` and `ca` are PEM file paths.
 */
export const awsIotSettingsSchema = z
  .object({
    endpoint: z
      .string()
      .regex(
        HOST_NAME,
        'must be the bare host name of the iot:Data-ATS endpoint (e.g. abc123-ats.iot.eu-west-1.amazonaws.com), without scheme, port or path',
      ),
    /** 8883 (MQTT over mutual TLS) or 443 (the same with ALPN x-amzn-mqtt-ca). */
    port: z.number().int().min(1).max(65535).default(8883),
    /** Offer ALPN `x-amzn-mqtt-ca`; default on for port 443, where AWS needs it to tell MQTT from HTTPS (§1.1). */
    alpn: z.boolean().optional(),
    /** Open the TCP connection here instead (a proxy, a test); SNI and the certificate check still use `endpoint`. */
    address: z.string().min(1).optional(),
    /** The gateway's thing name; default the gateway id. */
    clientId: z
      .string()
      .min(1)
      .refine(
        (v) => Buffer.byteLength(v) <= 128 && !v.startsWith('$'),
        'a client id is at most 128 bytes and cannot start with $',
      )
      .optional(),
    cert: z.string().min(1, 'give the path of the thing certificate (PEM)'),
    key: z.string().min(1, 'give the path of the private key of the thing certificate (PEM)'),
    /** Amazon Root CA 1 (PEM); default the system's roots. */
    ca: z.string().min(1).optional(),
    protocolVersion: z.union([z.literal(4), z.literal(5)]).default(5),
    /** AWS takes 30 s to 1200 s (§1.2). */
    keepalive: durationMs('60s', 30_000, 1_200_000),
    connectTimeout: durationMs('10s', 1),
    publishTimeout: durationMs('30s', 1),
    /** How long a shadow request waits for accepted/rejected. */
    shadowTimeout: durationMs('10s', 1),
    /** Child thing names: `{deviceId}` once, `{gatewayId}` allowed. */
    thingName: z.string().default('{deviceId}'),
    /** `devices/{id}/telemetry[/{stream}]` goes here, followed by `/{stream}` when there is one. */
    telemetryTopic: z.string().default('dt/{gatewayId}/{thingName}/telemetry'),
    /** A named shadow for `devices/{id}/state` and desired state; default the classic shadow. */
    shadowName: z.string().regex(SHADOW_NAME, 'a shadow name is 1–64 of [$a-zA-Z0-9:_-]').optional(),
    commands: z
      .array(commandRule)
      .max(8, 'at most 8 command rules (one SUBSCRIBE; the connection has 50 subscriptions)')
      .default([
        {
          topic: 'cmd/{gatewayId}/{thingName}/{name}',
          responseTopic: 'cmd/{gatewayId}/{thingName}/{name}/response',
        },
      ]),
    /** A 409 on a shadow update is fetched, merged and retried at most this many times. */
    maxConflictRetries: z.number().int().min(0).max(10).default(3),
  })
  .strict()
  .superRefine((s, ctx) => {
    const check = (path: (string | number)[], problem: string | undefined) => {
      if (problem) ctx.addIssue({ code: z.ZodIssueCode.custom, path, message: problem });
    };
    check(['thingName'], templateProblem(s.thingName, ['deviceId', 'gatewayId'], ['deviceId']));
    check(
      ['telemetryTopic'],
      templateProblem(s.telemetryTopic, ['thingName', 'deviceId', 'gatewayId'], []) ??
        (s.telemetryTopic.startsWith('$')
          ? `"${s.telemetryTopic}": topics starting with $ are reserved by AWS`
          : undefined),
    );
    s.commands.forEach((rule, i) => {
      check(
        ['commands', i, 'topic'],
        templateProblem(
          rule.topic,
          ['thingName', 'name', 'gatewayId'],
          rule.name === undefined ? ['thingName', 'name'] : ['thingName'],
          {
            wholeLevels: true,
          },
        ),
      );
      if (rule.responseTopic !== undefined) {
        check(
          ['commands', i, 'responseTopic'],
          templateProblem(rule.responseTopic, ['thingName', 'name', 'gatewayId'], ['thingName']),
        );
      }
    });
  });

export type AwsIotSettings = z.output<typeof awsIotSettingsSchema>;
