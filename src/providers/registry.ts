import { ErrorCodes, GatewayError } from '../errors.js';
import { createAwsIotProvider } from './aws-iot/aws-iot.js';
import { createAzureIotHubProvider } from './azure-iot-hub/azure-iot-hub.js';
import { createGoliothProvider } from './golioth/golioth-provider.js';
import { createMqttProvider } from './mqtt/mqtt-provider.js';
import type { Provider, ProviderContext, ProviderFactory } from './provider.js';
import type { AvailableType } from './settings.js';

export type { AvailableType };

/** Provider factories keyed by integration type; the gateway takes one (tests inject fakes). */
export type ProviderFactories = Readonly<Partial<Record<string, ProviderFactory>>>;

/**
 * One factory per available type. A plain typed record: adding a settings schema without a
 * factory here (or the reverse) fails to compile.
 */
export const providerRegistry: Record<AvailableType, ProviderFactory> = {
  mqtt: createMqttProvider,
  'azure-iot-hub': createAzureIotHubProvider,
  golioth: createGoliothProvider,
  'aws-iot': createAwsIotProvider,
};

export function createProvider(
  context: ProviderContext,
  factories: ProviderFactories = providerRegistry,
): Provider {
  const type = context.integration.type;
  const factory = factories[type];
  if (factory === undefined) {
    throw new GatewayError(
      ErrorCodes.PROVIDER_UNSUPPORTED,
      `the ${type} provider is not available in this release; available: ${Object.keys(factories).join(', ')}`,
      { retryable: false, details: { type } },
    );
  }
  return factory(context);
}
