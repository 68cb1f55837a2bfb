import { ErrorCodes, GatewayError } from '../errors.js';
import { createAzureIotHubProvider } from './azure-iot-hub/azure-iot-hub.js';
import { createMqttProvider } from './mqtt/mqtt-provider.js';
import type { Provider, ProviderContext, ProviderFactory } from './provider.js';
import type { AvailableType } from './settings.js';

export type { AvailableType };

/**
 * One factory per available type. A plain typed record: adding a settings schema without a
 * factory here (or the reverse) fails to compile.
 */
export const providerRegistry: Record<AvailableType, ProviderFactory> = {
  mqtt: createMqttProvider,
  'azure-iot-hub': createAzureIotHubProvider,
};

export function createProvider(context: ProviderContext): Provider {
  const type = context.integration.type;
  const factory = (providerRegistry as Partial<Record<string, ProviderFactory>>)[type];
  if (factory === undefined) {
    throw new GatewayError(
      ErrorCodes.PROVIDER_UNSUPPORTED,
      `the ${type} provider is not available in this release; available: ${Object.keys(providerRegistry).join(', ')}`,
      { retryable: false, details: { type } },
    );
  }
  return factory(context);
}
