import { describeProviderContract } from './contract.js';
import { createFakeCloud } from './fake-provider.js';

describeProviderContract(
  'fake',
  () => {
    const cloud = createFakeCloud();
    return Promise.resolve({
      provider: cloud.factory(undefined as never),
      cloud: {
        received: () => cloud.received.map((m) => m.payload.toString()),
        holdAcks: () => cloud.holdAcks(),
        releaseAcks: () => cloud.releaseAcks(),
        dropLink: () => cloud.dropLink(),
        stallConnects: () => cloud.stallConnects(),
        releaseConnects: () => cloud.releaseConnects(),
        throttleNext: (n, retryAfterMs, deviceId) => cloud.throttleNext(n, retryAfterMs, deviceId),
        failDevice: (deviceId, retryAfterMs) => cloud.failDevice(deviceId, retryAfterMs),
        restoreDevice: (deviceId) => cloud.restoreDevice(deviceId),
        plannedReconnect: () => cloud.plannedReconnect(),
      },
    });
  },
  { throttles: true, deviceThrottles: true, deviceFailures: true, plannedReconnects: true },
);
