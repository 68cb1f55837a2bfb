import type { z } from 'zod';
import { awsIotSettingsSchema } from './aws-iot/settings.js';
import { azureIotHubSettingsSchema, azureRouteProblems } from './azure-iot-hub/settings.js';
import { goliothRouteProblems, goliothSettingsSchema } from './golioth/settings.js';
import { mqttSettingsSchema } from './mqtt/settings.js';

/** Every provider type the config names (SPEC §3). */
export const PROVIDER_TYPES = ['mqtt', 'aws-iot', 'azure-iot-hub', 'golioth'] as const;
export type ProviderType = (typeof PROVIDER_TYPES)[number];

/**
 * Settings schema per provider type that this release ships. A type missing here is refused by
 * the config validator with a message naming the types that are available.
 */
const availableSettingsSchemas = {
  mqtt: mqttSettingsSchema,
  'azure-iot-hub': azureIotHubSettingsSchema,
  golioth: goliothSettingsSchema,
  'aws-iot': awsIotSettingsSchema,
} satisfies Partial<Record<ProviderType, z.ZodTypeAny>>;

/** The types that have a settings schema; the provider registry must have a factory for each. */
export type AvailableType = keyof typeof availableSettingsSchemas;

export const providerSettingsSchemas: Partial<Record<ProviderType, z.ZodTypeAny>> = availableSettingsSchemas;

/** A problem a provider finds between its settings, the integration's routes and the configured devices. */
export interface IntegrationProblem {
  /** Relative to the integration. */
  path: (string | number)[];
  message: string;
}

/**
 * Checks that need more than a provider's own settings (check-config): its routes and the
 * devices the config lists. Settings are the parsed output of the type's schema.
 */
export const providerIntegrationChecks: Partial<
  Record<
    ProviderType,
    (
      settings: unknown,
      routes: readonly { from: string }[],
      deviceIds: readonly string[],
    ) => IntegrationProblem[]
  >
> = {
  'azure-iot-hub': (settings, routes, deviceIds) => {
    const parsed = azureIotHubSettingsSchema.safeParse(settings);
    return parsed.success ? azureRouteProblems(parsed.data, routes, deviceIds) : [];
  },
  golioth: (settings, routes, deviceIds) => {
    // Settings that failed their own schema were reported already.
    const parsed = goliothSettingsSchema.safeParse(settings);
    return parsed.success ? goliothRouteProblems(parsed.data, routes, deviceIds) : [];
  },
};
