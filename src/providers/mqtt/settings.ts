import { z } from 'zod';
import { templateProblem, topicFilterProblem } from '../../config/topic-filter.js';
import { durationSchema, sizeSchema } from '../../config/units.js';

const durationMs = (fallback: string) => durationSchema().default(fallback);
const sizeBytes = sizeSchema().refine((bytes) => bytes >= 1, 'must be at least 1 byte');

const qos = z.union([z.literal(0), z.literal(1), z.literal(2)]);

/**
 * Settings of the generic `mqtt` provider. Topic templates take `{topic}` (the whole source
 * topic), `{deviceId}`, `{gatewayId}` and `{1}`, `{2}`, … for the levels matched by `+`/`#` in
 * the filter, in order.
 */
export const mqttSettingsSchema = z
  .object({
    url: z
      .string()
      .regex(/^(mqtts?|tcp|tls|ssl):\/\/[^\s/]+(:\d+)?\/?$/, 'must be mqtt://host:port or mqtts://host:port'),
    protocolVersion: z.union([z.literal(4), z.literal(5)]).default(4),
    clientId: z.string().min(1).max(128).optional(),
    username: z.string().optional(),
    password: z.string().optional(),
    ca: z.string().optional(),
    cert: z.string().optional(),
    key: z.string().optional(),
    servername: z.string().optional(),
    rejectUnauthorized: z.boolean().default(true),
    keepalive: durationMs('30s'),
    connectTimeout: durationMs('10s'),
    publishTimeout: durationMs('30s'),
    cleanSession: z.boolean().default(true),
    noLocal: z.boolean().default(true),
    /**
     * MQTT 3.1.1: connect as a bridge (protocol level 0x84, Mosquitto's try_private), which a
     * broker that knows the flag answers by not sending our own publications back. `auto` sets
     * it when both inbound and outbound rules exist and drops it when the broker refuses it;
     * `true` always sets it; `false` never. Either way an echo filter drops copies of our own
     * publications that still come back.
     */
    bridgeMode: z.union([z.literal('auto'), z.boolean()]).default('auto'),
    /**
     * MQTT 3.1.1 with inbound and outbound rules: how long a publication waits for its echo.
     * Someone else's identical message on the same topic within this window is taken for our
     * echo, so keep it short; on a bridge-flag link whose broker never echoes, the filter stops
     * after 20 publications.
     */
    echoWindow: durationMs('10s'),
    /**
     * Largest payload the remote broker takes (its configured limit); larger rows are
     * dead-lettered without being sent. Default 256 MiB, the MQTT maximum. An MQTT 5 server's
     * Maximum Packet Size lowers it further on its own.
     */
    maxPayloadSize: sizeBytes.optional(),
    outbound: z
      .array(
        z
          .object({
            local: z.string().min(1),
            remote: z.string().min(1).default('{topic}'),
            qos: qos.optional(),
            retain: z.union([z.boolean(), z.literal('as-published')]).default('as-published'),
          })
          .strict(),
      )
      .default([{ local: '#', remote: '{topic}', retain: 'as-published' }]),
    inbound: z
      .array(z.object({ remote: z.string().min(1), local: z.string().min(1), qos: qos.default(1) }).strict())
      .default([]),
  })
  .strict()
  .superRefine((s, ctx) => {
    if ((s.cert === undefined) !== (s.key === undefined)) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        path: ['cert'],
        message: 'cert and key go together: give both for a client certificate, or neither',
      });
    }
    // Mapping mistakes surface here, not as dead-lettered messages at run time.
    const check = (path: (string | number)[], filter: string, template: string) => {
      const problem = topicFilterProblem(filter) ?? templateProblem(template, filter);
      if (problem) ctx.addIssue({ code: z.ZodIssueCode.custom, path, message: problem });
    };
    s.outbound.forEach((rule, i) => check(['outbound', i], rule.local, rule.remote));
    s.inbound.forEach((rule, i) => check(['inbound', i], rule.remote, rule.local));
  });

export type MqttSettings = z.output<typeof mqttSettingsSchema>;
