import { ErrorCodes, GatewayError } from '../errors.js';
import type { Provider, ProviderContext, ProviderFactory } from './provider.js';
import type { AvailableType } from './settings.js';

export type { AvailableType };

/** Provider factories keyed by integration type; the gateway takes one (tests inject fakes). */
export type ProviderFactories = Readonly<Partial<Record<string, ProviderFactory>>>;

/**
 * How to load each available type. A plain typed record: adding a settings schema without a
 * loader here (or the reverse) fails to compile. A provider's module (and what it brings:
 * undici, node-dtls-client, ...) is loaded only when an integration of its type is configured,
 * so a gateway that bridges to one cloud does not carry the others in memory.
 */
const providerLoaders: Record<AvailableType, () => Promise<ProviderFactory>> = {
  mqtt: async () => (await import('./mqtt/mqtt-provider.js')).createMqttProvider,
  'azure-iot-hub': async () => (await import('./azure-iot-hub/azure-iot-hub.js')).createAzureIotHubProvider,
  golioth: async () => (await import('./golioth/golioth-provider.js')).createGoliothProvider,
  'aws-iot': async () => (await import('./aws-iot/aws-iot.js')).createAwsIotProvider,
};

const loaded: Partial<Record<string, ProviderFactory>> = {};

/** The built-in factories loaded so far (see loadProviders); the gateway's default. */
export const providerRegistry: ProviderFactories = loaded;

/** Loads the factories of these types into providerRegistry; unknown types are left to createProvider. */
export async function loadProviders(types: Iterable<string>): Promise<void> {
  for (const type of new Set(types)) {
    if (loaded[type] !== undefined || !Object.hasOwn(providerLoaders, type)) continue;
    loaded[type] = await providerLoaders[type as AvailableType]();
  }
}

export function createProvider(
  context: ProviderContext,
  factories: ProviderFactories = providerRegistry,
): Provider {
  const type = context.integration.type;
  const factory = factories[type];
  if (factory === undefined) {
    throw new GatewayError(
      ErrorCodes.PROVIDER_UNSUPPORTED,
      factories === providerRegistry && Object.hasOwn(providerLoaders, type)
        ? `the ${type} provider was not loaded before use (loadProviders); this is a bug`
        : `the ${type} provider is not available in this release; available: ${Object.keys(factories === providerRegistry ? providerLoaders : factories).join(', ')}`,
      { retryable: false, details: { type } },
    );
  }
  return factory(context);
}
