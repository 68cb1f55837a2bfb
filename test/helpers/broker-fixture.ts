import { configSchema, type Config, type ConfigInput } from '../../src/config/schema.js';
import { hashPassword } from '../../src/gateway/password-hash.js';

/** The two devices the broker tests log in as. */
export const PASSWORDS = { 'sensor-1': 'secret-one', 'sensor-2': 'secret-two' } as const;
export type DeviceHashes = Record<keyof typeof PASSWORDS, string>;

export async function hashDevicePasswords(): Promise<DeviceHashes> {
  return {
    'sensor-1': await hashPassword(PASSWORDS['sensor-1']),
    'sensor-2': await hashPassword(PASSWORDS['sensor-2']),
  };
}

/** A validated broker section: one TCP listener on port 0 and both devices, plus overrides. */
export function twoDeviceBrokerConfig(
  gatewayId: string,
  dataDir: string,
  hashes: DeviceHashes,
  broker: Partial<NonNullable<ConfigInput['broker']>> = {},
): Config['broker'] {
  return configSchema.parse({
    gateway: { id: gatewayId, dataDir },
    broker: {
      listeners: [{ type: 'tcp', host: '127.0.0.1', port: 0 }],
      devices: [
        { id: 'sensor-1', passwordHash: hashes['sensor-1'] },
        { id: 'sensor-2', passwordHash: hashes['sensor-2'] },
      ],
      ...broker,
    },
  }).broker;
}
