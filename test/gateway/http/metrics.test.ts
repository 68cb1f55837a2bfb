import { describe, expect, it } from 'vitest';
import { createMetrics } from '../../../src/gateway/http/metrics.js';
import type { GatewayStatusSnapshot } from '../../../src/gateway/http/status.js';
import { buildIntegration, buildSnapshot } from '../../helpers/status-snapshot.js';

function value(text: string, series: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(series + ' '));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

function withDelivered(delivered: number, dropped = 0): GatewayStatusSnapshot {
  const i = buildIntegration({ name: 'x', id: 'id-x', delivered });
  return buildSnapshot({ integrations: [{ ...i, queue: { ...i.queue, dropped } }] });
}

describe('createMetrics', () => {
  it('keeps counters monotonic when the source total resets after an integration restart', async () => {
    let snapshot = withDelivered(10, 5);
    const metrics = createMetrics({ getStatus: () => snapshot, processMetrics: false });
    const out = 'iot_gateway_messages_out_total{integration="x",type="mqtt"}';
    const dropped = 'iot_gateway_messages_dropped_total{integration="x",type="mqtt",reason="dropped"}';

    expect(value(await metrics.render(), out)).toBe(10);
    snapshot = withDelivered(15, 5);
    expect(value(await metrics.render(), out)).toBe(15);
    // restart: the forwarder counts from zero again; 3 new deliveries on top of 15
    snapshot = withDelivered(3, 1);
    let text = await metrics.render();
    expect(value(text, out)).toBe(18);
    expect(value(text, dropped)).toBe(6);
    snapshot = withDelivered(4, 1);
    text = await metrics.render();
    expect(value(text, out)).toBe(19);
    expect(value(text, dropped)).toBe(6);
  });

  it('uses a private registry: two instances do not collide and see their own snapshots', async () => {
    const a = createMetrics({ getStatus: () => withDelivered(1), processMetrics: true });
    const b = createMetrics({ getStatus: () => withDelivered(2), processMetrics: true });
    const series = 'iot_gateway_messages_out_total{integration="x",type="mqtt"}';
    expect(value(await a.render(), series)).toBe(1);
    expect(value(await b.render(), series)).toBe(2);
  });

  it('reads the snapshot once per scrape', async () => {
    let calls = 0;
    const metrics = createMetrics({
      getStatus: () => {
        calls++;
        return buildSnapshot();
      },
      processMetrics: false,
    });
    await metrics.render();
    expect(calls).toBe(1);
  });

  it('reports the age of the last ack and leaves it out before the first ack', async () => {
    const s = buildSnapshot();
    const metrics = createMetrics({
      getStatus: () => ({
        ...s,
        integrations: [
          buildIntegration({ name: 'a', id: 'a', lastAckAt: s.now - 2_500 }),
          buildIntegration({ name: 'b', id: 'b', lastAckAt: null }),
        ],
      }),
      processMetrics: false,
    });
    const text = await metrics.render();
    expect(value(text, 'iot_gateway_integration_last_ack_age_seconds{integration="a",type="mqtt"}')).toBe(
      2.5,
    );
    expect(text).not.toContain('iot_gateway_integration_last_ack_age_seconds{integration="b"');
  });
});
