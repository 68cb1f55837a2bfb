import cron from 'node-cron';
import { z } from 'zod';
import { providerIntegrationChecks, providerSettingsSchemas, PROVIDER_TYPES } from '../providers/settings.js';
import { topicFilterProblem } from './topic-filter.js';
import { durationSchema, rateSchema, sizeSchema } from './units.js';

/**
 * The configuration schema (SPEC §3). Validated once, then frozen. Durations come out as
 * milliseconds, sizes as bytes, rates as messages per second. Unknown keys are errors.
 */

const duration = (fallback?: string) =>
  fallback === undefined ? durationSchema() : durationSchema().default(fallback);
const size = (fallback: string) => sizeSchema().default(fallback);
const rate = rateSchema().default(0);

const cronExpr = z.string().refine(
  (v) => cron.validate(v),
  (v) => ({
    message: `"${v}" is not a valid cron expression (five or six fields, e.g. "*/5 * * * *")`,
  }),
);

/** MQTT topic filter: no empty string, '#' only last, '+' and '#' only as a whole level. */
export const topicFilter = z.string().superRefine((v, ctx) => {
  const problem = topicFilterProblem(v);
  if (problem) ctx.addIssue({ code: z.ZodIssueCode.custom, message: problem });
});

const identifier = z
  .string()
  .min(1)
  .max(128)
  .regex(
    /^[A-Za-z0-9][A-Za-z0-9._:-]*$/,
    'use letters, digits, ".", "_", ":" and "-" only, starting with a letter or digit',
  );

const aclSchema = z
  .object({
    publish: z.array(topicFilter).default([]),
    subscribe: z.array(topicFilter).default([]),
    deny: z.array(topicFilter).default([]),
  })
  .strict();

const listenerBase = { host: z.string().default('0.0.0.0'), port: z.number().int().min(0).max(65535) };

const listenerSchema = z.discriminatedUnion('type', [
  z.object({ type: z.literal('tcp'), ...listenerBase }).strict(),
  z
    .object({
      type: z.literal('tls'),
      ...listenerBase,
      cert: z.string().min(1),
      key: z.string().min(1),
      ca: z.string().min(1).optional(),
      requireClientCert: z.boolean().default(false),
      /** PEM certificate revocation list(s) of the device CA; read again on every reload. */
      crl: z.string().min(1).optional(),
    })
    .strict(),
  z
    .object({ type: z.literal('ws'), ...listenerBase, path: z.string().startsWith('/').default('/mqtt') })
    .strict(),
]);

const deviceSchema = z
  .object({
    id: identifier,
    passwordHash: z
      .string()
      .regex(/^\$scrypt\$/, 'must be a hash from `iot-gateway hash-password` (starts with $scrypt$)')
      .optional(),
    acl: aclSchema.optional(),
  })
  .strict();

const queueSchema = z
  .object({
    maxMessages: z.number().int().positive().default(1_000_000),
    maxBytes: size('512MB'),
    onFull: z.enum(['drop-oldest', 'reject-new']).default('drop-oldest'),
    ttl: duration('7d'),
    rate: rate,
    inflight: z.number().int().min(1).max(1000).default(100),
    maxAttempts: z.number().int().min(1).default(10),
  })
  .strict();

const routeSchema = z
  .object({ from: topicFilter, qos: z.union([z.literal(0), z.literal(1), z.literal(2)]).default(1) })
  .strict();

const integrationSchema = z
  .object({
    name: identifier,
    id: z.string().uuid('must be a UUID (integration_id in the log tables)'),
    type: z.enum(PROVIDER_TYPES),
    enabled: z.boolean().default(true),
    settings: z.record(z.unknown()).default({}),
    routes: z.array(routeSchema).default([]),
    schedule: z.object({ sync: cronExpr.optional() }).strict().default({}),
    queue: queueSchema.default({}),
    health: z
      .object({
        degradedAfter: duration('60s'),
        alertFailures: z.number().int().min(1).default(5),
        alertWindow: duration('10m'),
      })
      .strict()
      .default({}),
  })
  .strict()
  .superRefine((integration, ctx) => {
    const settingsSchema = providerSettingsSchemas[integration.type];
    if (settingsSchema === undefined) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        path: ['type'],
        message: `the ${integration.type} provider is not available in this release; available: ${Object.keys(providerSettingsSchemas).join(', ')}`,
      });
      return;
    }
    const parsed = settingsSchema.safeParse(integration.settings);
    if (!parsed.success) {
      for (const issue of parsed.error.issues) ctx.addIssue({ ...issue, path: ['settings', ...issue.path] });
    } else {
      integration.settings = parsed.data as Record<string, unknown>;
    }
  });

export const configSchema = z
  .object({
    gateway: z
      .object({
        id: identifier,
        organizationId: z.string().uuid('must be the UUID of the tenant in the central database').optional(),
        dataDir: z.string().min(1).default('./data'),
        log: z
          .object({
            level: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
          })
          .strict()
          .default({}),
        onCorruptStore: z.enum(['refuse', 'quarantine']).default('refuse'),
        shutdownTimeout: duration('20s'),
      })
      .strict(),
    broker: z
      .object({
        listeners: z
          .array(listenerSchema)
          .min(1, 'at least one listener is needed')
          .default([{ type: 'tcp', port: 1883 }]),
        allowAnonymous: z.boolean().default(false),
        anonymousAcl: aclSchema.default({}),
        maxPacketSize: size('256KB'),
        maxConnections: z.number().int().positive().default(10_000),
        connectTimeout: duration('10s'),
        keepaliveLimit: duration('20m'),
        // Keepalive 0 (no keepalive, allowed by MQTT 3.1.1) is accepted unless a site refuses it;
        // idle sockets are reaped by connectTimeout, maxConnections and TCP keepalive meanwhile.
        allowKeepaliveZero: z.boolean().default(true),
        // Token buckets checked when a socket is accepted, before TLS or MQTT (S13, R15).
        connectRate: z
          .object({
            perIp: rate.removeDefault().default('20/s'),
            perIpBurst: z.number().int().min(1).default(50),
            total: rate.removeDefault().default('500/s'),
            totalBurst: z.number().int().min(1).default(1000),
          })
          .strict()
          .default({}),
        // Failed password checks lock the username and the source for a while (S2).
        loginBackoff: z
          .object({
            failures: z.number().int().min(0).default(5),
            ipFailures: z.number().int().min(0).default(20),
            window: duration('5m').refine((ms) => ms > 0, 'must be longer than 0'),
            initial: duration('1s'),
            max: duration('5m'),
          })
          .strict()
          .default({}),
        // Successful logins remembered so a reconnect storm is not one scrypt per device (S3).
        loginCacheTtl: duration('5m'),
        // Where the broker keeps retained messages, persistent sessions and the messages queued
        // for offline devices: the gateway's SQLite file (survives restarts) or aedes' memory.
        persistence: z.enum(['sqlite', 'memory']).default('sqlite'),
        // A clean=false session whose device has not been connected for this long is deleted
        // (subscriptions, queued messages); 0 keeps sessions forever. SQLite persistence only.
        sessionExpiry: duration('7d'),
        // Messages queued per device for delivery (offline or in flight); past either cap the
        // oldest are dropped and counted. SQLite persistence only.
        offlineQueue: z
          .object({
            maxMessages: z.number().int().min(1).default(1000),
            maxBytes: size('16MB'),
          })
          .strict()
          .default({}),
        // Retained messages per device (topics devices/{id}/…; other topics per first level);
        // past it the device's oldest retained message is dropped. SQLite persistence only.
        maxRetainedPerDevice: z.number().int().min(1).default(100),
        devices: z.array(deviceSchema).default([]),
      })
      .strict()
      .default({}),
    integrations: z.array(integrationSchema).default([]),
    central: z
      .object({
        url: z.string().min(1),
        batchSize: z.number().int().min(1).max(10_000).default(500),
        interval: duration('5s'),
        connectTimeout: duration('10s'),
      })
      .strict()
      .optional(),
    retention: z
      .object({
        localReplicated: duration('7d'),
        localUnreplicated: duration('90d'),
        schedule: cronExpr.default('17 3 * * *'),
      })
      .strict()
      .default({}),
    http: z
      .object({
        enabled: z.boolean().default(true),
        host: z.string().default('127.0.0.1'),
        port: z.number().int().min(0).max(65535).default(9180),
      })
      .strict()
      .default({}),
    features: z
      .object({
        dashboard: z.boolean().default(true),
        retainedStatus: z.boolean().default(true),
      })
      .strict()
      .default({}),
  })
  .strict()
  .superRefine((cfg, ctx) => {
    const names = new Map<string, number>();
    const ids = new Map<string, number>();
    cfg.integrations.forEach((integration, i) => {
      const prevName = names.get(integration.name);
      if (prevName !== undefined) {
        ctx.addIssue({
          code: z.ZodIssueCode.custom,
          path: ['integrations', i, 'name'],
          message: `duplicate integration name "${integration.name}" (also integrations[${prevName}])`,
        });
      }
      names.set(integration.name, i);
      const prevId = ids.get(integration.id);
      if (prevId !== undefined) {
        ctx.addIssue({
          code: z.ZodIssueCode.custom,
          path: ['integrations', i, 'id'],
          message: `duplicate integration id (also integrations[${prevId}])`,
        });
      }
      ids.set(integration.id, i);
    });
    // Provider checks across settings, routes and the listed devices (e.g. Golioth telemetry needs PSKs).
    const deviceIds = cfg.broker.devices.map((d) => d.id);
    cfg.integrations.forEach((integration, i) => {
      const check = providerIntegrationChecks[integration.type];
      if (check === undefined || !integration.enabled) return;
      for (const problem of check(integration.settings, integration.routes, deviceIds)) {
        ctx.addIssue({
          code: z.ZodIssueCode.custom,
          path: ['integrations', i, ...problem.path],
          message: problem.message,
        });
      }
    });
    const devices = new Map<string, number>();
    cfg.broker.devices.forEach((device, i) => {
      const prev = devices.get(device.id);
      if (prev !== undefined) {
        ctx.addIssue({
          code: z.ZodIssueCode.custom,
          path: ['broker', 'devices', i, 'id'],
          message: `duplicate device id "${device.id}" (also broker.devices[${prev}])`,
        });
      }
      devices.set(device.id, i);
      if (
        device.passwordHash === undefined &&
        !cfg.broker.listeners.some((l) => l.type === 'tls' && l.requireClientCert)
      ) {
        ctx.addIssue({
          code: z.ZodIssueCode.custom,
          path: ['broker', 'devices', i, 'passwordHash'],
          message:
            'a device needs a passwordHash (from `iot-gateway hash-password`) unless a TLS listener has requireClientCert',
        });
      }
    });
    const ports = new Map<string, number>();
    cfg.broker.listeners.forEach((l, i) => {
      if (l.type === 'tls' && l.requireClientCert && l.ca === undefined) {
        ctx.addIssue({
          code: z.ZodIssueCode.custom,
          path: ['broker', 'listeners', i, 'ca'],
          message: 'requireClientCert needs `ca`: the CA that signs the device certificates',
        });
      }
      if (l.type === 'tls' && l.crl !== undefined && !l.requireClientCert) {
        ctx.addIssue({
          code: z.ZodIssueCode.custom,
          path: ['broker', 'listeners', i, 'crl'],
          message: 'a crl only applies to client certificates: set requireClientCert: true, or remove crl',
        });
      }
      if (l.port === 0) return;
      const key = `${l.host}:${l.port}`;
      const prev = ports.get(key);
      if (prev !== undefined) {
        ctx.addIssue({
          code: z.ZodIssueCode.custom,
          path: ['broker', 'listeners', i, 'port'],
          message: `port ${l.port} is used twice (also broker.listeners[${prev}])`,
        });
      }
      ports.set(key, i);
    });
    if (cfg.central !== undefined && cfg.gateway.organizationId === undefined) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        path: ['gateway', 'organizationId'],
        message: 'central replication needs gateway.organizationId (the tenant UUID)',
      });
    }
    if (cfg.retention.localUnreplicated < cfg.retention.localReplicated) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        path: ['retention', 'localUnreplicated'],
        message: 'must be at least retention.localReplicated',
      });
    }
  });

export type ConfigInput = z.input<typeof configSchema>;
export type Config = z.output<typeof configSchema>;
export type IntegrationConfig = Config['integrations'][number];
export type DeviceConfig = Config['broker']['devices'][number];
export type ListenerConfig = Config['broker']['listeners'][number];
export type AclConfig = z.output<typeof aclSchema>;
export type QueueConfig = IntegrationConfig['queue'];
export type RouteConfig = IntegrationConfig['routes'][number];
export type CentralConfig = NonNullable<Config['central']>;

/**
 * Keys whose change needs a restart of the daemon. Everything else applies live (SPEC §3).
 * A path matches itself and everything below it.
 */
export const RESTART_REQUIRED_KEYS = [
  'gateway.id',
  'gateway.organizationId',
  'gateway.dataDir',
  'gateway.onCorruptStore',
  'broker.listeners',
  'broker.maxPacketSize',
  'broker.maxConnections',
  'broker.connectTimeout',
  'broker.persistence',
  'http',
  'features',
] as const;

/** Every key name the schema knows, for "did you mean" on unknown keys. */
export function knownKeys(): Set<string> {
  const keys = new Set<string>();
  const visit = (schema: z.ZodTypeAny, depth: number): void => {
    if (depth > 12) return;
    const def = schema._def as { typeName?: string } & Record<string, unknown>;
    switch (def.typeName) {
      case 'ZodObject': {
        const shape = (schema as z.AnyZodObject).shape as Record<string, z.ZodTypeAny>;
        for (const [k, v] of Object.entries(shape)) {
          keys.add(k);
          visit(v, depth + 1);
        }
        return;
      }
      case 'ZodEffects':
        return visit(def.schema as z.ZodTypeAny, depth + 1);
      case 'ZodDefault':
      case 'ZodOptional':
      case 'ZodNullable':
        return visit(def.innerType as z.ZodTypeAny, depth + 1);
      case 'ZodArray':
        return visit(def.type as z.ZodTypeAny, depth + 1);
      case 'ZodUnion':
      case 'ZodDiscriminatedUnion':
        for (const option of def.options as z.ZodTypeAny[]) visit(option, depth + 1);
        return;
      case 'ZodRecord':
        return;
      default:
        return;
    }
  };
  visit(configSchema, 0);
  for (const schema of Object.values(providerSettingsSchemas)) if (schema) visit(schema, 0);
  return keys;
}
