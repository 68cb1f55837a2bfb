import type { z } from 'zod';
import { azureIotHubSettingsSchema } from './azure-iot-hub/settings.js';
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
} satisfies Partial<Record<ProviderType, z.ZodTypeAny>>;

/** The types that have a settings schema; the provider registry must have a factory for each. */
export type AvailableType = keyof typeof availableSettingsSchemas;

export const providerSettingsSchemas: Partial<Record<ProviderType, z.ZodTypeAny>> = availableSettingsSchemas;
