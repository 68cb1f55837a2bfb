/**
 * The `integrations:` block of a config whose one integration (`up`, type mqtt) a test serves
 * with an injected provider factory: its URL is never dialled.
 */
export const FAKE_INTEGRATION_ID = '3f1c1f0e-7d8e-4f5a-9a51-0c2b6f1d2e3a';

export const FAKE_INTEGRATION_YAML: readonly string[] = [
  'integrations:',
  '  - name: up',
  `    id: ${FAKE_INTEGRATION_ID}`,
  '    type: mqtt',
  '    settings: { url: "mqtt://127.0.0.1:1", outbound: [{ local: "#", remote: "{topic}" }] }',
  '    routes: [{ from: "devices/+/telemetry" }]',
];
